"""Start-up checks: every config field, the data and the workdir, before any work is done.

`check(config, workdir, mode)` raises `UserError` with one line naming the bad value and what
is allowed. It reads files but writes none (except a probe that the workdir is writable, after
every other check has passed), compiles nothing and prepares no data.
"""

import math
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
from etils import epath

import compression
import sharding
from sharding import pipeline
from compression import grid, low_precision, qat
from experiments import data, steps
from experiments import workdir as workdir_lib
from experiments.errors import UserError
from models import Transformer, axes, layouts
from models import early_exit as early_exit_model

POSITIVE = ('num_train_steps', 'batch_size', 'grad_accum_steps', 'eval_batch_size', 'log_every',
            'eval_every', 'checkpoint_every', 'keep_checkpoints', 'max_nonfinite_steps')
SCHEDULES = ('cosine', 'linear')
NONFINITE = ('skip', 'stop')
RESUME = ('auto', 'new', 'params')
MODES = ('train', 'eval', 'sample')


def _bad(field: str, value, allowed: str):
  raise UserError(f'config.{field}={value!r} {allowed}')


def _is_int(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def _finite(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_kind(config, mode: str) -> None:
  """A training config for train/eval/sample/benchmark; a compression config (pruning,
  quantization or distillation: variants of a source run) for prune, quantize and distill."""
  is_training = 'model' in config and 'optimizer' in config
  derived = mode in ('prune', 'quantize', 'distill')
  kind, name = dict(prune=('pruning', 'prune'), distill=('distillation', 'distill')).get(
      mode, ('quantization', 'quantize'))
  wanted = f'--mode={mode} needs a {kind} config such as experiments/configs/{name}.py'
  if derived and is_training:
    raise UserError(f'{wanted}; this is a training config')
  if derived and 'variants' not in config:
    raise UserError(f'{wanted}; this one has no variants')
  if not derived and not is_training:
    hint = (' (a pruning or quantization config: use --mode=prune or --mode=quantize'
            + (f'; --mode={mode} --variant=SPEC reads a variant that --mode=quantize saved)'
               if mode in ('eval', 'sample') else ')') if 'variants' in config else '')
    what = 'the benchmark' if mode == 'benchmark' else f'--mode={mode}'
    raise UserError(f'{what} needs a training config such as '
                    f'experiments/configs/shakespeare.py; this one has no model/optimizer{hint}')


def check_fields(config) -> None:
  """Every field of a training config, without touching files."""
  for name in POSITIVE:
    if not _is_int(config[name]) or config[name] <= 0:
      _bad(name, config[name], 'must be a positive integer')
  if not _is_int(config.eval_batches) or config.eval_batches < 0:
    _bad('eval_batches', config.eval_batches, 'must be >= 0 (0: the whole split)')
  if not _is_int(config.seed) or not 0 <= config.seed < 2**31:
    _bad('seed', config.seed, 'must be an integer in [0, 2**31)')
  if config.nonfinite not in NONFINITE:
    _bad('nonfinite', config.nonfinite, f'is not one of {", ".join(NONFINITE)}')
  _check_optimizer(config.optimizer)
  try:
    data.check_config(config.data)
  except ValueError as e:
    raise UserError(str(e)) from None
  try:
    model_cfg = steps.model_config(config, vocab_size=config.data.vocab_size)
  except TypeError as e:   # an unknown field name
    raise UserError(f'config.model: {e}') from None
  except ValueError as e:
    raise UserError(str(e)) from None
  if config.data.seq_len > model_cfg.max_len:
    _bad('data.seq_len', config.data.seq_len,
         f'exceeds the model\'s max_len={model_cfg.max_len} (raise config.model.max_len)')
  _check_sample(config.sample, model_cfg)
  _check_pruning(config, model_cfg)
  _check_qat(config, model_cfg)
  _check_low_precision(config, model_cfg)
  _check_early_exit(config, model_cfg)


def _check_optimizer(opt) -> None:
  if opt.schedule not in SCHEDULES:
    _bad('optimizer.schedule', opt.schedule, f'is not one of {", ".join(SCHEDULES)}')
  rules = [('learning_rate', lambda v: v > 0, 'must be a finite number > 0'),
           ('weight_decay', lambda v: v >= 0, 'must be a finite number >= 0'),
           ('grad_clip', lambda v: v > 0, 'must be a finite number > 0 (the global-norm limit)'),
           ('eps', lambda v: v >= 0, 'must be a finite number >= 0'),
           ('b1', lambda v: 0 <= v < 1, 'must be in [0, 1)'),
           ('b2', lambda v: 0 <= v < 1, 'must be in [0, 1)'),
           ('end_lr_factor', lambda v: 0 <= v <= 1, 'must be in [0, 1] (final / peak rate)'),
           ('z_loss', lambda v: v >= 0, 'must be a finite number >= 0')]
  for name, ok, allowed in rules:
    if not _finite(opt[name]) or not ok(opt[name]):
      _bad(f'optimizer.{name}', opt[name], allowed)
  if not _is_int(opt.warmup_steps) or opt.warmup_steps < 0:
    _bad('optimizer.warmup_steps', opt.warmup_steps, 'must be an integer >= 0')


def _check_sample(s, model_cfg) -> None:
  for name in ('num_prompts', 'top_k'):
    if not _is_int(s[name]) or s[name] < 0:
      _bad(f'sample.{name}', s[name], 'must be an integer >= 0 (0: off)')
  for name in ('prompt_chars', 'max_new_tokens'):
    if not _is_int(s[name]) or s[name] <= 0:
      _bad(f'sample.{name}', s[name], 'must be a positive integer')
  if s.max_new_tokens >= model_cfg.max_len:
    _bad('sample.max_new_tokens', s.max_new_tokens,
         f'must be below the model\'s max_len={model_cfg.max_len}')
  if not _finite(s.temperature) or s.temperature < 0:
    _bad('sample.temperature', s.temperature, 'must be a finite number >= 0 (0: greedy)')
  if not _finite(s.top_p) or not 0 < s.top_p <= 1:
    _bad('sample.top_p', s.top_p, 'must be in (0, 1]')


def _check_pruning(config, model_cfg) -> None:
  p = config.pruning
  if not _finite(p.final_sparsity) or not 0 <= p.final_sparsity < 1:
    _bad('pruning.final_sparsity', p.final_sparsity, 'must be in [0, 1) (0: off)')
  for name in ('start_step', 'end_step'):
    if not _is_int(p[name]) or p[name] < 0:
      _bad(f'pruning.{name}', p[name], 'must be an integer >= 0')
  if not _is_int(p.every) or p.every <= 0:
    _bad('pruning.every', p.every, 'must be a positive integer')
  try:
    re.compile(p.include)
  except (re.error, TypeError) as e:
    _bad('pruning.include', p.include, f'is not a regular expression ({e})')
  if p.final_sparsity == 0:
    return
  end = p.end_step or config.num_train_steps
  if p.start_step > end:
    _bad('pruning.start_step', p.start_step, f'is after pruning.end_step ({end})')
  shapes = jax.eval_shape(lambda: Transformer(model_cfg).init(
      jax.random.key(0), jnp.zeros((1, 1), jnp.int32))['params'])
  try:
    compression.paths.select(nn.meta.unbox(shapes), layouts.of_config(model_cfg),
                             p.include or None)
  except ValueError as e:
    _bad('pruning.include', p.include, f'selects nothing: {e}')


def _check_qat(config, model_cfg) -> None:
  q = config.get('qat')
  if q is None or (_is_int(q.bits) and q.bits == 0):
    return
  if not _is_int(q.bits) or q.bits not in grid.BITS:
    _bad('qat.bits', q.bits, f'is not one of 0 (off), {", ".join(map(str, grid.BITS))}')
  _check_on_model('qat', q, lambda shapes: qat.check(
      shapes, steps.qat_spec(config), layouts.of_config(model_cfg), model_cfg), model_cfg)


def _check_low_precision(config, model_cfg) -> None:
  lp = config.get('low_precision')
  if lp is None or lp.format == '':
    return
  if lp.format not in low_precision.FORMATS:
    _bad('low_precision.format', lp.format,
         f'is not one of \'\' (off), {", ".join(low_precision.FORMATS)}')
  if config.get('qat') and config.qat.bits:
    raise UserError(f'config.low_precision.format={lp.format!r} and config.qat.bits='
                    f'{config.qat.bits} cannot be combined: quantization-aware training rounds '
                    f'the weights itself (set one of them off)')
  _check_on_model('low_precision', lp, lambda shapes: low_precision.check(
      shapes, steps.low_precision_spec(config), layouts.of_config(model_cfg), model_cfg),
                  model_cfg)


def _check_early_exit(config, model_cfg) -> None:
  ee = config.get('early_exit')
  if ee is None or ee.layers == '':
    return
  try:
    layers = steps.exit_layers(ee.layers)
  except ValueError:
    _bad('early_exit.layers', ee.layers, 'is not a comma-separated list of layer indices')
  try:
    early_exit_model.check_exits(model_cfg, layers)
  except ValueError as e:
    _bad('early_exit.layers', ee.layers, str(e))
  if model_cfg.scan_layers:
    _bad('early_exit.layers', ee.layers, 'needs unrolled layers (model.scan_layers=False)')
  if not isinstance(ee.weight, (int, float)) or isinstance(ee.weight, bool) or ee.weight <= 0:
    _bad('early_exit.weight', ee.weight, 'must be a number > 0')


def _check_on_model(name: str, section, check, model_cfg) -> None:
  """`config.<name>.include` compiles, and `check(parameter shapes)` (a compression method's
  own check, raising one-line ValueErrors) passes on the model's shapes."""
  try:
    re.compile(section.include)
  except (re.error, TypeError) as e:
    _bad(f'{name}.include', section.include, f'is not a regular expression ({e})')
  shapes = jax.eval_shape(lambda: Transformer(model_cfg).init(
      jax.random.key(0), jnp.zeros((1, 1), jnp.int32))['params'])
  try:
    check(nn.meta.unbox(shapes))
  except ValueError as e:   # messages start with the bad field ('bits=5 ...') or a path
    field = str(e).split('=')[0]
    raise UserError(f'config.{name}.{e}' if field in section else f'config.{name}: {e}') from None


def _mesh_and_batch_split(config) -> tuple:
  """(mesh axis sizes, rules, how many ways the mesh splits the batch) of `config`."""
  try:
    shape = sharding.mesh_shape(config.mesh, jax.device_count())
    rules = sharding.rules_for(config.sharding_rules)
  except ValueError as e:
    raise UserError(str(e)) from None
  return shape, rules, math.prod(shape[a] for a in sharding.mesh_axes_of(rules, axes.BATCH))


def check_mesh(config) -> None:
  """The mesh, the rules and how the batch and the experts divide over them."""
  shape, rules, split = _mesh_and_batch_split(config)
  accum = config.grad_accum_steps
  if config.batch_size % (split * accum):
    raise UserError(f'config.batch_size={config.batch_size} must be divisible by the '
                    f'{split} batch shards of the mesh times grad_accum_steps ({accum})')
  if split % jax.process_count():
    raise UserError(f'the mesh splits the batch {split} ways, which does not divide over '
                    f'{jax.process_count()} processes: give the data/fsdp/expert axes a '
                    f'multiple of the process count')
  experts, expert_split = config.model.get('n_experts') or 0, math.prod(
      shape[a] for a in sharding.mesh_axes_of(rules, axes.EXPERT))
  if experts and experts % expert_split:
    raise UserError(f'config.model.n_experts={experts} does not divide over the '
                    f'{expert_split} expert shards of the mesh')
  if config.eval_batch_size % split:
    raise UserError(f'config.eval_batch_size={config.eval_batch_size} must be divisible by '
                    f'the {split} batch shards of the mesh')
  if shape[sharding.STAGE] > 1:
    _check_pipeline(config, shape[sharding.STAGE])


def check_eval_batch(config) -> None:
  """With pipeline stages evaluation runs the step's microbatches: its batch must divide."""
  shape, _, split = _mesh_and_batch_split(config)
  accum = config.grad_accum_steps
  if shape[sharding.STAGE] > 1 and config.eval_batch_size % (split * accum):
    raise UserError(f'config.eval_batch_size={config.eval_batch_size} must be divisible by '
                    f'the {split} batch shards of the mesh times grad_accum_steps ({accum}) '
                    f'with pipeline stages')


def _check_pipeline(config, stages: int) -> None:
  """A pipeline's schedule, model and loss (`sharding.pipeline.check`), in one line each."""
  others = [name for name, on in (('qat', steps.qat_spec(config) is not None),
                                  ('low_precision', steps.low_precision_spec(config) is not None),
                                  ('early_exit', bool(config.get('early_exit')
                                                      and config.early_exit.layers)))
            if on]
  if others:
    raise UserError(f'mesh.stage={stages} pipelines the language-model loss only; config.'
                    f'{others[0]} is on (train it without pipeline stages)')
  if config.get('pipeline') is None:
    raise UserError(f'mesh.stage={stages} needs a config.pipeline section (schedule, repeats; '
                    f'see experiments/configs/base.py)')
  try:
    schedule = pipeline.schedule_of(config.pipeline, stages, config.grad_accum_steps)
    pipeline.check(steps.model_config(config, config.data.vocab_size), schedule)
  except ValueError as e:
    raise UserError(str(e)) from None


def check(config, workdir, mode: str = 'train', resume: str = 'auto') -> None:
  """Raises UserError with one line naming the bad value and what is allowed."""
  if mode not in MODES:
    raise UserError(f'mode {mode!r} is not one of {", ".join(MODES)}')
  if resume not in RESUME:
    raise UserError(f'--resume={resume} is not one of {", ".join(RESUME)}')
  check_kind(config, mode)
  check_fields(config)
  check_mesh(config)
  check_eval_batch(config)
  data.check_available(config.data)
  workdir = epath.Path(workdir)
  if mode == 'train':
    check_train_workdir(config, workdir, resume)
  else:
    check_run(config, workdir)


def _check_signature(config, workdir, keys=None) -> None:
  saved = workdir_lib.saved_signature(workdir)
  if saved is None:
    return
  current = workdir_lib.signature(config)
  if keys is not None:
    saved = {k: v for k, v in saved.items() if k in keys}
  problems = workdir_lib.signature_mismatch(saved, current, ignore_sha=True)
  if problems:
    more = f' (and {len(problems) - 3} more)' if len(problems) > 3 else ''
    raise UserError(f'--workdir={workdir} holds a run of another configuration '
                    f'({"; ".join(problems[:3])}{more})' + (
                        '; resume it with the config it was trained with, or pass '
                        '--resume=new (archive it, start over) or --resume=params (start over '
                        'from its parameters)' if keys is None else ''))


def check_train_workdir(config, workdir: epath.Path, resume: str) -> None:
  """The workdir can be written and its run (if any) is the one this config resumes."""
  if workdir.exists() and not workdir.is_dir():
    raise UserError(f'--workdir={workdir} is a file, not a directory')
  steps_on_disk = workdir_lib.checkpoint_steps(workdir)
  damaged = workdir_lib.damaged_steps(workdir)
  if resume == 'params':
    if not steps_on_disk:
      raise UserError(f'--resume=params needs a checkpoint in {workdir}/checkpoints; there is '
                      f'none')
    _check_signature(config, workdir, keys=('model',))
  elif resume == 'auto' and (steps_on_disk or damaged):
    _check_signature(config, workdir)
    if not steps_on_disk:
      raise workdir_lib.all_damaged(workdir)
    if steps_on_disk[-1] > config.num_train_steps:
      raise UserError(f'config.num_train_steps={config.num_train_steps} is below the step of '
                      f'the newest checkpoint in {workdir} ({steps_on_disk[-1]}); raise it to '
                      f'train on, or use --mode=eval')
  check_writable(workdir)


def check_writable(workdir: epath.Path) -> None:
  """A probe file in an existing workdir; else the nearest existing parent must be writable."""
  if workdir.exists():
    try:
      probe = workdir / f'.write_probe.{os.getpid()}'   # hosts may share the workdir
      probe.write_text('ok')
      probe.unlink()
    except OSError as e:
      raise UserError(f'--workdir={workdir} is not writable ({e.strerror or e})') from None
    return
  if not workdir_lib.is_local(workdir):
    return
  parent = os.path.abspath(str(workdir))
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise UserError(f'--workdir={workdir} cannot be created: {parent} is a file')
  if not os.access(parent, os.W_OK | os.X_OK):
    raise UserError(f'--workdir={workdir} cannot be created: {parent} is not writable')


def check_run(config, workdir: epath.Path) -> None:
  """A trained run to read: checkpoints exist and were made by this model and tokenizer."""
  if not workdir.is_dir():
    raise UserError(f'--workdir={workdir} does not exist: train there first')
  if not workdir_lib.checkpoint_steps(workdir):
    damaged = workdir_lib.damaged_steps(workdir)
    note = f' (damaged, set aside: {", ".join(damaged)})' if damaged else ''
    raise UserError(f'--workdir={workdir} holds no checkpoint{note}: train there first')
  _check_signature(config, workdir, keys=('model', 'tokenizer'))
