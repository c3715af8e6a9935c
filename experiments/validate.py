"""Start-up checks: a bad config or workdir is rejected with one clear line before any work."""

import json
import os
import math

import jax
from etils import epath

import sharding
from experiments import data, steps
from models import axes

POSITIVE = ('num_train_steps', 'batch_size', 'grad_accum_steps', 'eval_batch_size', 'log_every',
            'eval_every', 'checkpoint_every', 'keep_checkpoints')
SCHEDULES = ('cosine', 'linear')


def model_signature(config) -> dict:
  """What a checkpoint's shapes depend on; a workdir must not mix two of these."""
  return dict(model=config.model.to_dict(), tokenizer=config.data.tokenizer,
              vocab_size=config.data.vocab_size if config.data.tokenizer != 'byte' else None)


def check(config, workdir, mode: str = 'train') -> None:
  """Raises ValueError with one line naming the bad value and what is allowed."""
  for name in POSITIVE:
    if not isinstance(config[name], int) or config[name] <= 0:
      raise ValueError(f'config.{name}={config[name]!r} must be a positive integer')
  if config.eval_batches < 0:
    raise ValueError(f'config.eval_batches={config.eval_batches} must be >= 0 (0: all)')
  if config.optimizer.schedule not in SCHEDULES:
    raise ValueError(f'config.optimizer.schedule={config.optimizer.schedule!r} is not one of '
                     f'{", ".join(SCHEDULES)}')
  if config.optimizer.learning_rate <= 0:
    raise ValueError(f'config.optimizer.learning_rate={config.optimizer.learning_rate} must be > 0')
  data.check_config(config.data)
  try:
    steps.model_config(config, vocab_size=config.data.vocab_size)
  except TypeError as e:   # an unknown field name
    raise ValueError(f'config.model: {e}') from None
  shape = sharding.mesh_shape(config.mesh, jax.device_count())
  rules = sharding.rules_for(config.sharding_rules)
  split = math.prod(shape[a] for a in sharding.mesh_axes_of(rules, axes.BATCH))
  accum = config.grad_accum_steps
  if config.batch_size % (split * accum):
    raise ValueError(f'config.batch_size={config.batch_size} must be divisible by the '
                     f'{split} batch shards of the mesh times grad_accum_steps ({accum})')
  if split % jax.process_count():
    raise ValueError(f'the mesh splits the batch {split} ways, which does not divide over '
                     f'{jax.process_count()} processes: give the data/fsdp/expert axes a '
                     f'multiple of the process count')
  experts, expert_split = config.model.get('n_experts') or 0, math.prod(
      shape[a] for a in sharding.mesh_axes_of(rules, axes.EXPERT))
  if experts and experts % expert_split:
    raise ValueError(f'config.model.n_experts={experts} does not divide over the '
                     f'{expert_split} expert shards of the mesh')
  if config.eval_batch_size % split:
    raise ValueError(f'config.eval_batch_size={config.eval_batch_size} must be divisible by '
                     f'the {split} batch shards of the mesh')
  _check_workdir(config, epath.Path(workdir), mode)


def _check_workdir(config, workdir: epath.Path, mode: str) -> None:
  if mode != 'train':
    if not (workdir / 'checkpoints').exists():
      raise ValueError(f'--workdir={workdir} holds no checkpoints: train there first')
    return
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    probe = workdir / f'.write_probe.{os.getpid()}'   # hosts may share the workdir
    probe.write_text('ok')
    probe.unlink()
  except OSError as e:
    raise ValueError(f'--workdir={workdir} is not writable ({e.strerror or e})') from None
  saved = workdir / 'model.json'
  current = model_signature(config)
  if saved.exists():
    previous = json.loads(saved.read_text())
    if previous != json.loads(json.dumps(current)):
      diff = _differences(previous, current)
      raise ValueError(f'--workdir={workdir} holds a checkpoint of another model ({diff}); '
                       'use a new workdir')


def _differences(old: dict, new: dict, prefix: str = '') -> str:
  out = []
  for k in sorted(set(old) | set(new)):
    a, b = old.get(k), new.get(k)
    if isinstance(a, dict) and isinstance(b, dict):
      inner = _differences(a, b, f'{prefix}{k}.')
      out += [inner] if inner else []
    elif a != b:
      out.append(f'{prefix}{k}: {a!r} there, {b!r} here')
  return ', '.join(out)
