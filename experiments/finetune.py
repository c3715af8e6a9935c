"""Runs derived from a trained model: the one training loop, started from given parameters.

A pruned model's fine-tune (and later a quantized or distilled one's) is a training run in its
own workdir, trained by `train.train_and_evaluate`: sharded on the mesh, checkpointed, logged to
metrics.jsonl, resumable and compiled once like any run. `derived_config` writes everything about
it into an ordinary training config: the model it trains (a structural variant's smaller one),
the optimizer, the data order, and `origin`, what its starting parameters were made from. The
origin is part of the run's signature, so a sub-run whose starting point changed (the source
trained on, another variant, other pruning settings) is archived and started again, never
continued.
"""

import dataclasses
import logging

import jax
import ml_collections
from etils import epath

from compression import schedules
from experiments import runtime, train
from experiments import workdir as workdir_lib
from experiments.errors import UserError


def derived_config(source, model_cfg, *, num_steps: int, learning_rate: float, seed: int,
                   origin: dict, mesh=None, sharding_rules=None,
                   warmup_steps: int = 10) -> ml_collections.ConfigDict:
  """The training config of a short run of `model_cfg` on `source`'s data and optimizer.

  Args:
    source: the training config of the run the parameters come from (its config.json).
    model_cfg: the `ModelConfig` to train (e.g. a structural variant's smaller one).
    num_steps, learning_rate: the run's length and peak rate (warmup min(warmup_steps,
      num_steps)).
    seed: data order (and router jitter) of the run.
    origin: JSON-able description of the starting parameters; part of the run's signature.
    mesh, sharding_rules: where it runs (default: the source's).
  """
  d = source.to_dict()
  d['model'] = dataclasses.asdict(model_cfg)   # with vocab_size: it may exceed the tokenizer's
  d['optimizer'].update(learning_rate=learning_rate, warmup_steps=min(warmup_steps, num_steps))
  d['pruning'].update(final_sparsity=0.0)   # masks, if any, come frozen with the parameters
  d['sample'].update(num_prompts=0)
  d.update(num_train_steps=num_steps, eval_every=num_steps, seed=seed,
           checkpoint_every=min(d['checkpoint_every'], num_steps),
           log_every=min(d['log_every'], num_steps),
           origin=dict(origin, num_train_steps=num_steps, learning_rate=learning_rate))
  if mesh is not None:
    d['mesh'] = mesh
  if sharding_rules:
    d['sharding_rules'] = sharding_rules
  return ml_collections.ConfigDict(d)


def run(config, workdir, params, masks=None, source_workdir=None, make_loss=None,
        frozen=None, batch_extras=None) -> dict:
  """Fine-tunes `params` by `config` in `workdir` (weights where `masks` is False stay 0);
  `params` None starts from the config's initialisation. `make_loss`, `frozen` and
  `batch_extras` (e.g. a distillation loss, its teacher, offline teacher logits) are
  `train.train_and_evaluate`'s.

  Continues the workdir's fine-tune, or returns at once with its final evaluation when it is
  complete; one of another origin is archived first (workdir/archive/<n>/). The run uses the
  tokenizer of `source_workdir` when that holds one. Returns the final eval metrics; raises
  `UserError` if the run stopped before its last step (a stop was requested: run again).
  """
  workdir = epath.Path(workdir)
  _prepare(config, workdir, source_workdir)
  wrap = None if masks is None else lambda tx: schedules.frozen(tx, masks)
  metrics = train.train_and_evaluate(config, workdir, params=params, wrap_optimizer=wrap,
                                     make_loss=make_loss, frozen=frozen,
                                     batch_extras=batch_extras)
  done = workdir_lib.checkpoint_steps(workdir)
  if not done or done[-1] < config.num_train_steps:
    raise UserError(f'the fine-tune in {workdir} stopped at step {done[-1] if done else 0} of '
                    f'{config.num_train_steps}; run the same command again to resume it')
  return metrics


def trained_params(config, workdir):
  """The fine-tuned parameters of a complete `run` (on the host)."""
  return jax.device_get(runtime.load_params(config, workdir)[3])


def _prepare(config, workdir: epath.Path, source_workdir) -> None:
  """Archives a sub-run of another origin; gives the workdir the source's tokenizer."""
  with workdir_lib.claim(workdir):
    saved = workdir_lib.saved_signature(workdir)
    stale = saved is not None and workdir_lib.signature_mismatch(
        saved, workdir_lib.signature(config), ignore_sha=True)
    broken = workdir_lib.damaged_steps(workdir) and not workdir_lib.checkpoint_steps(workdir)
    if stale or broken:
      logging.warning('the fine-tune in %s started from %s; it starts again', workdir,
                      'other parameters' if stale else 'checkpoints that are all damaged')
      workdir_lib.archive(workdir)
    source = epath.Path(source_workdir or '') / workdir_lib.TOKENIZER
    own = workdir / workdir_lib.TOKENIZER
    if source_workdir and source.exists() and not own.exists():
      tmp = workdir / f'.{workdir_lib.TOKENIZER}.tmp'
      tmp.write_bytes(source.read_bytes())
      tmp.replace(own)
