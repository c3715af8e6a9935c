"""The source of a compression runner (pruning, quantization): a trained run, read-only.

What every runner that derives variants from a trained run (or a Hugging Face checkpoint scored
on that run's data) shares: checking the source and the workdir before any work, loading the
parameters unrolled, calibration batches, evaluation and forward timing of any parameter tree
(plain or with compressed leaves), and writing results files atomically.
"""

import json
import logging
import os
import re
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

import sharding
from compression import cost, smoothing
from experiments import data, memory, runtime, steps, validate
from experiments import workdir as workdir_lib
from experiments.errors import UserError
from models import Transformer, decode, hf, layouts, unstack_layers

# The timed decode's prompt: the first tokens of the timing batch's first row.
PROMPT_TOKENS = 16


def source_config(source_workdir) -> ml_collections.ConfigDict:
  path = epath.Path(source_workdir) / 'config.json'
  if not path.is_file():
    raise UserError(f'config.source_workdir={str(source_workdir)!r} has no config.json: train '
                    f'there first (or point it at a training run)')
  return ml_collections.ConfigDict(workdir_lib.read_json(path, 'the source run\'s config'))


def positive_int(config, name: str, minimum: int = 1) -> None:
  value = config[name]
  if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
    raise UserError(f'config.{name}={value!r} must be an integer >= {minimum}')


def on_mesh(config, src) -> ml_collections.ConfigDict:
  """The source run's config with this runner's mesh and rules (unset ones: the source's)."""
  out = ml_collections.ConfigDict(src.to_dict())
  for name, size in config.mesh.items():
    if name == 'dcn':
      out.mesh.dcn.update({k: v for k, v in size.items() if v is not None})
    elif size is not None:
      out.mesh[name] = size
  if config.sharding_rules:
    out.sharding_rules = config.sharding_rules
  return out


def check(config, workdir, mode: str):
  """Checks the fields every derived-run config has, its source and its workdir.

  Returns (the source run's config on this runner's mesh, the source model's config unrolled,
  the abstract unrolled parameters).
  """
  validate.check_kind(config, mode)
  for name in ('calibration_batches', 'calibration_rows'):
    positive_int(config, name)
  positive_int(config, 'seed', 0)
  positive_int(config, 'decode_tokens', 0)
  positive_int(config.outliers, 'channels', 0)
  factor = config.outliers.factor
  if config.outliers.channels and (isinstance(factor, bool) or
                                   not isinstance(factor, (int, float)) or factor <= 0):
    raise UserError(f'config.outliers.factor={factor!r} must be a number > 0')
  src = source_config(config.source_workdir)
  validate.check_kind(src, 'train')
  validate.check_fields(src)
  validate.check_mesh(on_mesh(config, src))
  data.check_available(src.data)
  if config.get('hf_path'):
    try:
      cfg = hf.config_from_pretrained(config.hf_path)
    except (OSError, ValueError, KeyError) as e:
      raise UserError(f'config.hf_path={config.hf_path!r}: {e}') from None
  else:
    validate.check_run(src, epath.Path(config.source_workdir))
    cfg = steps.model_config(src, src.data.vocab_size)
  cfg = cfg.replace(scan_layers=False)
  if cfg.position == 'learned' and PROMPT_TOKENS + config.decode_tokens > cfg.max_len:
    raise UserError(f'config.decode_tokens={config.decode_tokens}: the timed decode of '
                    f'{PROMPT_TOKENS} prompt tokens + decode_tokens exceeds the model\'s '
                    f'max_len={cfg.max_len}; allowed: 0 to {max(cfg.max_len - PROMPT_TOKENS, 0)}')
  if config.outliers.channels > cfg.d_model:
    raise UserError(f'config.outliers.channels={config.outliers.channels} exceeds the model\'s '
                    f'{cfg.d_model} channels')
  shapes = nn.meta.unbox(jax.eval_shape(lambda: Transformer(cfg).init(
      jax.random.key(0), jnp.zeros((1, 1), jnp.int32))['params']))
  workdir = epath.Path(workdir)
  if workdir.exists() and not workdir.is_dir():
    raise UserError(f'--workdir={workdir} is a file, not a directory')
  if os.path.abspath(str(workdir)) == os.path.abspath(str(config.source_workdir)):
    raise UserError(f'--workdir={workdir} is the source run: {mode} writes its results '
                    f'elsewhere and never touches the source')
  validate.check_writable(workdir)
  return on_mesh(config, src), cfg, shapes


def run(config, workdir, check_fn, run_fn):
  """`run_fn(config, workdir, src, variants)` after `check_fn(config, workdir) -> (src,
  variants)` found nothing wrong, holding the workdir's lock (a runner's `run`)."""
  workdir = epath.Path(workdir)
  src, variants = check_fn(config, workdir)
  with workdir_lib.claim(workdir):
    return run_fn(config, workdir, src, variants)


def load(config, src):
  """(step, model, tokenizer, host parameters), unrolled: calibration sees one block at a time;
  with `config.outliers.channels`, outlier features planted (`compression.smoothing`)."""
  if config.get('hf_path'):   # a Hugging Face checkpoint, evaluated on the source run's data
    tokenizer, _, _ = runtime.setup(src, config.source_workdir)
    model, params = hf.from_pretrained(config.hf_path)
    step = 0
    if model.config.vocab_size < tokenizer.vocab_size:
      raise UserError(f'{config.hf_path}: vocab_size={model.config.vocab_size} is smaller than '
                      f'the {tokenizer.vocab_size} ids of the source run\'s tokenizer')
  else:
    step, model, tokenizer, params, _ = runtime.load_params(src, config.source_workdir)
    params = steps.model_only(params)   # a QAT source's float weights, not its scales
  model, params = unrolled(model, params)
  if config.outliers.channels:   # the testbed: the float function is unchanged
    params = smoothing.plant_outliers(params, model.config, config.outliers.channels,
                                      config.outliers.factor, seed=config.seed)
  return step, model, tokenizer, params


def unrolled(model, params):
  """(model, host parameters) with scanned layers unstacked: the form runners work on."""
  if model.config.scan_layers:
    params = unstack_layers(params, model.config)
    model = Transformer(model.config.replace(scan_layers=False))
  return model, jax.device_get(params)


def start(config, src):
  """(step, model, tokenizer, parameters, calibration batches) of a runner's source."""
  step, model, tokenizer, params = load(config, src)
  logging.info('loaded %s at step %d', config.source_workdir, step)
  calib = calibration_batches(config, src, tokenizer, config.calibration_batches, config.seed)
  return step, model, tokenizer, params, calib


def calibration_batches(config, src, tokenizer, n: int, seed: int):
  it = data.train_iterator(src.data, tokenizer, batch_size=config.calibration_rows, seed=seed)
  return [jax.tree.map(jnp.asarray, next(it)) for _ in range(n)]


def evaluate(src, model, params, tokenizer) -> float:
  """Validation nats per byte of any parameter tree (leaves laid out by their logical names)."""
  placement = runtime.Placement(src, model, steps.make_optimizer(src.optimizer, 1))
  layout = sharding.tree_shardings(params, placement.mesh, placement.rules,
                                   layouts.logical_names(model))
  return runtime.evaluate_params(src, jax.device_put(params, layout), model, tokenizer,
                                 placement)['nats_per_byte']


def measured(model, params, batch, decode_tokens: int, rounds: int = 5) -> dict:
  """What a variant costs to run here, for its results row: `forward_ms` (the forward pass on
  `batch`), `decode_tokens_per_s` (greedy decoding of `decode_tokens` tokens for one request,
  its prefill included: serving one user), `decode_peak_bytes` (the decode program's bytes by
  XLA's buffer assignment: weights, KV cache and temporaries) and the `device`; medians of
  `rounds`. No decode figures when `decode_tokens` is 0."""
  figures = timed_together({'': (model, params)}, batch, decode_tokens, rounds)['']
  return dict(figures, device=jax.devices()[0].device_kind)


def timed_together(models: dict, batch, decode_tokens: int, rounds: int = 5) -> dict:
  """{name: figures as `measured` gives them} of several `(model, params)`, timed in one
  process in alternating rounds (each round times every model once, forward then decode),
  medians over the rounds: a comparison that a drift of the machine's speed does not bias."""
  programs = {name: _programs(model, params, batch, decode_tokens)
              for name, (model, params) in models.items()}
  for calls, _ in programs.values():   # compiled and run once before anything is timed
    for call in calls:
      jax.block_until_ready(call())
  times = {name: [[] for _ in calls] for name, (calls, _) in programs.items()}
  for _ in range(rounds):
    for name, (calls, _) in programs.items():
      for call, out in zip(calls, times[name]):
        t0 = time.perf_counter()
        jax.block_until_ready(call())
        out.append(time.perf_counter() - t0)
  out = {}
  for name, (_, peak) in programs.items():
    median = [float(np.median(t)) for t in times[name]]
    out[name] = dict(forward_ms=1e3 * median[0])
    if decode_tokens:
      out[name].update(decode_tokens_per_s=decode_tokens / median[1], decode_peak_bytes=peak)
  return out


def _programs(model, params, batch, decode_tokens: int):
  """((forward call, [decode call]), the decode program's bytes or None): the decode is greedy,
  one request of `PROMPT_TOKENS` prompt tokens (the batch's first row) and `decode_tokens` new
  ones."""
  fwd = jax.jit(lambda p, x: model.apply({'params': p}, x))
  forward = lambda: fwd(params, batch['inputs'])
  if not decode_tokens:
    return (forward,), None
  prompt = [np.asarray(batch['inputs'][0, :PROMPT_TOKENS]).tolist()]
  lowered, args = decode.lower_greedy(model, params, prompt, decode_tokens)
  program = lowered.compile()
  return (forward, lambda: program(*args)), memory.compiled_bytes(program)


def cost_figures(model, params, seq_len: int) -> dict:
  """The cost model's figures of a parameter tree (`compression.cost`): bytes by storage type,
  parameters, non-zero parameters, and forward FLOPs per token at `seq_len` (active, and
  effective: minus what its zero weights multiply)."""
  f = cost.flops_per_token(model.config, params, seq_len)
  return dict(storage_bytes=cost.storage_bytes(params), **cost.counts(params),
              flops_per_token=f['active'], effective_flops_per_token=f['effective'])


def slug(spec: str) -> str:
  """A variant spec as a folder name: 'wanda:2:4' -> 'wanda-2-4'."""
  return re.sub(r'[^A-Za-z0-9_.]+', '-', spec.strip()).strip('-')


def write_results(workdir: epath.Path, config, rows, table: str) -> None:
  """results.json and results.md, each written to a temporary name and renamed into place."""
  workdir.mkdir(parents=True, exist_ok=True)
  for name, text in (('results.json', json.dumps(dict(config=config.to_dict(), rows=rows),
                                                   indent=2)),
                     ('results.md', table)):
    tmp = workdir / (name + '.tmp')
    tmp.write_text(text)
    tmp.replace(workdir / name)
