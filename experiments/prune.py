"""Pruning experiments on a trained checkpoint: `run(config, workdir)` (main.py --mode=prune).

Loads the source run (its config.json and latest checkpoint, read-only; or, with
`config.hf_path`, a Hugging Face checkpoint evaluated on the source run's data and tokenizer),
evaluates it, then for
each variant in `config.variants` prunes a copy (one-shot, or in `config.rounds` rounds with
fine-tuning between them), evaluates it, optionally fine-tunes it with the mask frozen (or the
smaller model, for structural variants) and evaluates again, timing the forward pass. Writes
results.json and results.md into the workdir.

Fine-tunes are training runs (`experiments/finetune.py`) on the config's mesh, each in its own
workdir `<workdir>/finetune/<variant>/` (`<variant>-round<r>` between rounds) with checkpoints
and metrics.jsonl: running the command again continues an interrupted fine-tune and skips a
complete one.

Variant specs (comma-separated in `config.variants`):
  magnitude:0.5  wanda:0.5  sparsegpt:0.7  random:0.5  saliency:0.5   unstructured, per layer
  magnitude_global:0.5                                               one ranking over all
  wanda:2:4  sparsegpt:4:8  magnitude:2:4                             N:M along the inputs
  ffn:0.25  heads:0.5  layers:1  experts:0.25                         structural (removed)
"""

import logging
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

import compression
from compression import structural
from experiments import distill, finetune, source, steps, validate
from experiments.errors import UserError
from models import Transformer, layouts

STRUCTURAL = structural.KINDS


def parse_variant(spec: str) -> dict:
  """'wanda:2:4' -> {'method': 'wanda', 'nm': (2, 4)}; one-line errors for bad specs."""
  parts = spec.strip().split(':')
  name, args = parts[0], parts[1:]
  scope = 'layer'
  if name.endswith('_global'):
    name, scope = name[:-len('_global')], 'global'
  known = tuple(compression.METHODS) + STRUCTURAL
  if name not in known:
    raise UserError(f'variant {spec!r}: unknown method {name!r}; known: {", ".join(known)}')
  try:
    numbers = [float(a) for a in args]
  except ValueError:
    raise UserError(f'variant {spec!r}: expected numbers after the method') from None
  if name in STRUCTURAL:
    if len(numbers) != 1:
      raise UserError(f'variant {spec!r}: give one amount, e.g. {name}:0.25')
    amount = numbers[0]
    return dict(spec=spec, kind=name, amount=int(amount) if amount.is_integer() and
                name == 'layers' else amount)
  try:
    if len(numbers) == 1:
      compression.masks.check_sparsity(numbers[0])
      return dict(spec=spec, method=name, sparsity=numbers[0], nm=None, scope=scope)
    if len(numbers) == 2 and all(n.is_integer() for n in numbers):
      nm = (int(numbers[0]), int(numbers[1]))
      compression.masks.check_nm(nm)
      return dict(spec=spec, method=name, sparsity=0.0, nm=nm, scope=scope)
  except ValueError as e:
    raise UserError(f'variant {spec!r}: {e}') from None
  raise UserError(f'variant {spec!r}: use method:sparsity or method:N:M')


def check(config, workdir):
  """Validates a pruning config, its workdir and its source before any work is done.

  Every variant is checked against the source model's shapes, so none fails after others ran.
  Returns (the source run's config, the parsed variants).
  """
  validate.check_kind(config, 'prune')
  variants = [parse_variant(s) for s in str(config.variants).split(',') if s.strip()]
  if not variants:
    raise UserError('config.variants is empty: name at least one, e.g. wanda:0.5')
  source.positive_int(config, 'rounds')
  source.positive_int(config, 'finetune_steps', 0)
  if config.importance not in structural.IMPORTANCE:
    raise UserError(f'config.importance={config.importance!r} is not one of '
                    f'{", ".join(structural.IMPORTANCE)}')
  lr = config.finetune_learning_rate
  if not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
    raise UserError(f'config.finetune_learning_rate={lr!r} must be a finite number > 0')
  distill.check_recovery(config)
  src, cfg, shapes = source.check(config, workdir, 'prune')
  for v in variants:
    try:
      if 'kind' in v:
        structural.check(v['kind'], cfg, v['amount'], config.importance)
      else:
        compression.pruning.check(shapes, v['method'], v['sparsity'], nm=v['nm'],
                                  scope=v['scope'], layouts=layouts.of_config(cfg))
    except ValueError as e:
      raise UserError(f'variant {v["spec"]!r}: {e}') from None
  return src, variants


def _finetune(config, src, workdir, name: str, model, params, masks, n_steps: int,
              origin: dict, teacher):
  """Fine-tunes `params` (masked weights held at exactly 0) through the training loop in
  `workdir/finetune/name`, by cross-entropy or distilled from `teacher` (the dense (model,
  params)) as `config.recover` says; returns (its final eval metrics, its config, its workdir)."""
  sub_config = finetune.derived_config(
      src, model.config, num_steps=n_steps, learning_rate=config.finetune_learning_rate,
      seed=config.seed + 1, origin=dict(origin, **distill.recovery_origin(config, n_steps)))
  sub = epath.Path(workdir) / 'finetune' / name
  return finetune.run(sub_config, sub, params, masks, config.source_workdir,
                      **distill.recovery(config, *teacher, n_steps)), sub_config, sub


def apply_variant(v: dict, model, params, calib, grads_fn, importance: str = 'l2'):
  """(model, params, mask tree or None) after the variant's pruning."""
  cfg = model.config
  if 'kind' in v:
    grads = grads_fn() if importance == 'taylor' else None
    fn = dict(ffn=structural.ffn_neurons, heads=structural.attention_heads,
              layers=structural.layers, experts=structural.experts)[v['kind']]
    new_cfg, new_params, _ = fn(cfg, params, v['amount'], importance, grads)
    return Transformer(new_cfg), new_params, None
  pruned, mask_tree = compression.prune(
      params, v['method'], v['sparsity'], nm=v['nm'], scope=v['scope'], model=model,
      batches=calib, loss_fn=lambda p, m, b: steps.lm_loss(m)(p, b)[0] / jnp.maximum(
          jnp.sum(b['weights']), 1.0))
  return model, pruned, mask_tree


def run(config, workdir) -> list:
  """Runs every variant; returns the result rows (also written to results.json / results.md)."""
  return source.run(config, workdir, check, _run)


def _run(config, workdir, src, variants) -> list:
  step, model, tokenizer, params, calib = source.start(config, src)
  timing_batch = calib[0]
  rows = [dict(variant='dense', params=_count(params), nonzero=_count(params, nonzero=True),
               nats_per_byte=source.evaluate(src, model, params, tokenizer),
               **source.measured(model, params, timing_batch, config.decode_tokens),
               **_report(model, params, src.data.seq_len))]
  logging.info('dense: %s', rows[0])
  grads_fn = lambda: compression.calibration.gradients(
      model, params, calib, lambda p, m, b: steps.lm_loss(m)(p, b)[0])
  origin = dict(runner='prune', source_workdir=os.path.abspath(str(config.source_workdir)),
                source_step=step, hf_path=config.get('hf_path') or '',
                calibration_batches=config.calibration_batches,
                calibration_rows=config.calibration_rows, importance=config.importance,
                rounds=config.rounds, seed=config.seed)
  for v in variants:
    t0 = time.perf_counter()
    start = params
    if config.rounds > 1 and 'method' in v and v['nm'] is None:
      # Iterative: prune to 1 - (1 - s)^(r / R) in round r, fine-tuning between rounds; the
      # zeros of earlier rounds score lowest, so masks only grow.
      for r in range(1, config.rounds):
        step_v = dict(v, sparsity=1 - (1 - v['sparsity']) ** (r / config.rounds))
        _, start, mask_tree = apply_variant(step_v, model, start, calib, grads_fn)
        _, sub_config, sub = _finetune(config, src, workdir, f'{source.slug(v["spec"])}-round{r}',
                                       model, start, mask_tree, config.finetune_steps or 50,
                                       dict(origin, variant=v['spec'], stage=f'round {r}'),
                                       (model, params))
        start = finetune.trained_params(sub_config, sub)
    new_model, new_params, mask_tree = apply_variant(v, model, start, calib, grads_fn,
                                                     config.importance)
    row = dict(variant=v['spec'], prune_s=time.perf_counter() - t0, params=_count(new_params),
               nonzero=_count(new_params, nonzero=True),
               nats_per_byte=source.evaluate(src, new_model, new_params, tokenizer),
               **source.measured(new_model, new_params, timing_batch,
                                 config.decode_tokens),
               **_report(new_model, new_params, src.data.seq_len))
    if config.finetune_steps:
      tuned, _, _ = _finetune(config, src, workdir, source.slug(v['spec']), new_model, new_params,
                              mask_tree, config.finetune_steps,
                              dict(origin, variant=v['spec'], stage='final'), (model, params))
      row['finetuned_nats_per_byte'] = tuned['nats_per_byte']
    logging.info('%s: %s', v['spec'], row)
    rows.append(row)
  _write(workdir, config, rows)
  return rows


def _report(model, params, seq_len: int) -> dict:
  """The sparsity report's totals and per-weight sparsity, for results.json."""
  rep = compression.report.sparsity_report(params, model.config, seq_len)
  t = rep['total']
  return dict(sparsity=t['sparsity'], dense_flops_per_token=t['dense_flops_per_token'],
              effective_flops_per_token=t['effective_flops_per_token'],
              dense_bytes=t['dense_bytes'], sparse_bytes=t['sparse_bytes'],
              layer_sparsity={p: l['sparsity'] for p, l in rep['layers'].items()})


def _count(params, nonzero: bool = False) -> int:
  leaves = jax.tree.leaves(params)
  return int(sum(np.count_nonzero(np.asarray(x)) if nonzero else np.size(x) for x in leaves))


def _write(workdir: epath.Path, config, rows) -> None:
  dense = rows[0]['nats_per_byte']
  tuned = any('finetuned_nats_per_byte' in r for r in rows)
  head = ('| variant | params | non-zero | sparsity | MFLOP/token (effective) | nats/byte | '
          'vs dense |' + (' fine-tuned |' if tuned else '') + ' forward ms |')
  lines = [head, '|' + '---|' * (head.count('|') - 1)]
  for r in rows:
    cells = [r['variant'], f"{r['params']:,}", f"{r['nonzero']:,}", f"{100 * r['sparsity']:.1f}%",
             f"{r['dense_flops_per_token'] / 1e6:.2f} ({r['effective_flops_per_token'] / 1e6:.2f})",
             f"{r['nats_per_byte']:.4f}", f"{r['nats_per_byte'] - dense:+.4f}"]
    if tuned:
      ft = r.get('finetuned_nats_per_byte')
      cells.append('' if ft is None else f'{ft:.4f}')
    cells.append(f"{r['forward_ms']:.1f}")
    lines.append('| ' + ' | '.join(cells) + ' |')
  source.write_results(workdir, config, rows, '\n'.join(lines) + '\n')
