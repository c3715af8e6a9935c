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


def apply(rows: list, models: dict, config, src, tokenizer, decode_tokens: int,
          rounds: int) -> list:
  """The rows with `forward_ms` and `decode_tokens_per_s` of the models in `models` ({row name:
  (model, params)}) timed together on a calibration batch of `src` drawn as `config` says."""
  if not models:
    return [dict(r, timed_in_stage=True) for r in rows]
  batch = source.calibration_batches(config, src, tokenizer, 1, config.seed)[0]
  print(f'timing {len(models)} models together: {rounds} alternating rounds of a forward pass '
        f'and {decode_tokens} decoded tokens', flush=True)
  timed = source.timed_together(models, batch, decode_tokens, rounds)
  return [dict(r, **timed[r['name']]) if r['name'] in timed else dict(r, timed_in_stage=True)
          for r in rows]
