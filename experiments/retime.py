"""A report's models timed again, together in one process (recipes and sweep merges).

Each stage of a recipe and each point of a sweep timed its models in its own process, and this
machine's speed drifts between processes by more than the differences being compared. Before a
report is written, every model it names that is still on disk is loaded and timed again with
the others in alternating rounds (`source.timed_together`); a row whose model is not kept keeps
its own figures and is marked `timed_in_stage`.
"""

import jax
from etils import epath

from experiments import runtime, saved, source
from experiments.errors import UserError

DECODE_TOKENS = 128   # defaults of a recipe config or a sweep block
ROUNDS = 15


def check_settings(block, where: str) -> None:
  """The timing and price fields a recipe config or a sweep block may give, one line if bad:
  `decode_tokens`, `timing_rounds` (integers >= 1), `price_per_hour` (USD, >= 0; 0: none)."""
  for field in ('decode_tokens', 'timing_rounds'):
    value = block.get(field, 1)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise UserError(f'{where}.{field}={value!r} must be an integer >= 1')
  price = block.get('price_per_hour') or 0
  if isinstance(price, bool) or not isinstance(price, (int, float)) or price < 0:
    raise UserError(f'{where}.price_per_hour={price!r} must be a number >= 0 (USD per hour of '
                    f'the machine the report is measured on; 0: no prices)')


def load_run(path):
  """(model, host parameters, tokenizer, run config) of a training run's newest checkpoint,
  unrolled as the runners time models; None where `path` holds no run."""
  path = epath.Path(path)
  if not (path / 'config.json').exists():
    return None
  run = source.source_config(path)
  _, model, tokenizer, params, _ = runtime.load_served(run, path)
  model, params = source.unrolled(model, params)
  return model, params, tokenizer, run


def load_variant(config, workdir, spec: str):
  """(model, host parameters) of a variant `--mode=quantize` saved in `workdir`; None where it
  was not saved."""
  if not (epath.Path(workdir) / 'params' / source.slug(spec)).exists():
    return None
  v = saved.open_variant(config, workdir, spec)
  return v.model, jax.device_get(v.params)


def apply(rows: list, models: dict, config, src, tokenizer, settings) -> list:
  """The rows with `forward_ms` and `decode_tokens_per_s` of the models in `models` ({row name:
  (model, params)}) timed together on a calibration batch of `src` drawn as `config` says,
  as `settings` (a recipe config or a sweep block) sets the timing; peak bytes stay the
  stages'."""
  if not models:
    return [dict(r, timed_in_stage=True) for r in rows]
  decode_tokens = int(settings.get('decode_tokens') or DECODE_TOKENS)
  rounds = int(settings.get('timing_rounds') or ROUNDS)
  batch = source.calibration_batches(config, src, tokenizer, 1, config.seed)[0]
  print(f'timing {len(models)} models together: {rounds} alternating rounds of a forward pass '
        f'and {decode_tokens} decoded tokens', flush=True)
  timed = source.timed_together(models, batch, decode_tokens, rounds)
  keep = ('forward_ms', 'decode_tokens_per_s')
  return [dict(r, **{k: timed[r['name']][k] for k in keep}) if r['name'] in timed
          else dict(r, timed_in_stage=True) for r in rows]
