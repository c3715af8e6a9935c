"""Quantization experiments on a trained run: `run(config, workdir)` (main.py --mode=quantize).

Loads the source run (read-only; or `config.hf_path`, a Hugging Face checkpoint scored on the
source run's data), optionally plants outlier features (`config.outliers`, a function-preserving
testbed), evaluates it, then for each variant in `config.variants` quantizes a copy, evaluates
it, times its forward pass, and saves its parameters with Orbax under
`<workdir>/params/<variant>/` (integers stay integers on disk), described by
`<workdir>/params/<variant>.json` (`experiments/saved.py`: --mode=eval and --mode=sample read a
variant with --variant=SPEC). Writes results.json (one row per variant: `variant`,
`nats_per_byte`, `weight_bytes`, ...) and results.md.

Variant specs (comma-separated in `config.variants`): a method, then options, ':'-separated:
  rtn | gptq | awq | smoothquant      awq and smoothquant rescale the float model first
  mixed                               a bit width per weight (2, 3, 4 or 8, from measured
                                      sensitivity) within the bytes of uniform `bits`
  int8 int4 int3 int2                 bits (default int8)
  g128 (any g<k>) | pt                groups of k inputs, or one scale per tensor (default: per
                                      output channel)
  asym  mse  act                      zero points; searched clipping; GPTQ's act-order
  a8 (or w8a8) | static               int8 activations, per-token (dynamic) or calibrated,
                                      times the weights' integers (rtn:int4:g32:a8 is W4A8)
  a0.5                                AWQ / SmoothQuant strength alpha
  ft100 | qat100                      first fine-tune 100 steps: plainly (then quantize), or
                                      quantization-aware on the variant's grid (then convert)
  lsq                                 qat<N> with learned (LSQ) ranges instead of min/max
e.g. rtn:int8  rtn:int4:g128  gptq:int3:g128:act  awq:int4:g128  smoothquant:w8a8:a0.5
rtn:int4:g128:qat100  rtn:int4:g32:a8:qat100 (QAT with int8 activations too). Fine-tunes are training runs in <workdir>/finetune/<variant>/ (resumed, or
skipped when complete, when the command runs again).
"""

import functools
import logging
import os
import re
import time

import jax
import jax.numpy as jnp

from compression import grid, mixed, paths, qat, qtensor, quantize as quantize_lib, smoothing
from experiments import data, distill, finetune, saved, source, steps
from experiments.configs import base
from experiments.errors import UserError
from models import decode, layouts
from models.config import KV_CACHE_DTYPES

METHODS = ('rtn', 'gptq', 'awq', 'smoothquant', 'mixed')


def parse_variant(spec: str) -> dict:
  """'gptq:int4:g128:act' -> {'method': 'gptq', 'bits': 4, 'group_size': 128, ...}."""
  parts = [p for p in spec.strip().split(':') if p]
  if not parts or parts[0] not in METHODS:
    raise UserError(f'variant {spec!r}: unknown method {parts[0] if parts else ""!r}; known: '
                    f'{", ".join(METHODS)}')
  v = dict(spec=spec.strip(), method=parts[0], bits=8, group_size=grid.PER_CHANNEL,
           symmetric=True, clip='minmax', act='none', act_order=False, alpha=None,
           tune=None, tune_steps=0, ranges='minmax')
  for token in parts[1:]:
    if re.fullmatch(r'int\d+', token):
      v['bits'] = int(token[3:])
    elif re.fullmatch(r'g\d+', token):
      v['group_size'] = int(token[1:])
    elif re.fullmatch(r'(ft|qat)\d+', token):
      kind = 'qat' if token.startswith('qat') else 'ft'
      v.update(tune=kind, tune_steps=int(token[len(kind):]))
      if not v['tune_steps']:
        raise UserError(f'variant {spec!r}: {token!r} fine-tunes no step')
    elif re.fullmatch(r'a[0-9.]+', token) and token != 'a8':   # a8: int8 activations
      try:
        v['alpha'] = float(token[1:])
      except ValueError:
        raise UserError(f'variant {spec!r}: {token!r} is not a number after a') from None
    elif token == 'lsq':
      v['ranges'] = 'learned'
    elif token in ('pt', 'asym', 'mse', 'act', 'a8', 'w8a8', 'static'):
      v.update(dict(pt=dict(group_size=grid.PER_TENSOR), asym=dict(symmetric=False),
                    mse=dict(clip='mse'), act=dict(act_order=True), a8=dict(act='dynamic'),
                    w8a8=dict(act='dynamic'), static=dict(act='static'))[token])
    else:
      raise UserError(f'variant {spec!r}: unknown option {token!r}; options: int<bits>, g<k>, '
                      f'pt, asym, mse, act, a8, w8a8, static, a<alpha>, ft<N>, qat<N>, lsq')
  if v['method'] == 'smoothquant' and v['act'] == 'none':
    v['act'] = 'dynamic'   # SmoothQuant exists to make W8A8 work
  if v['method'] == 'mixed' and (v['act'] != 'none' or v['clip'] != 'minmax'):
    raise UserError(f'variant {spec!r}: mixed chooses round-to-nearest bit widths (weight-only, '
                    f'min/max ranges)')
  if v['tune'] == 'qat' and (v['method'] != 'rtn' or v['clip'] != 'minmax'):
    raise UserError(f'variant {spec!r}: qat trains on the round-to-nearest min/max grid; use '
                    f'rtn without mse')
  if v['tune'] == 'qat' and v['act'] == 'static':
    raise UserError(f'variant {spec!r}: qat trains int8 activations with per-token (dynamic) '
                    f'scales; use a8, not static')
  if v['ranges'] == 'learned' and v['tune'] != 'qat':
    raise UserError(f'variant {spec!r}: lsq (learned ranges) applies to qat<N> fine-tunes only')
  if v['act_order'] and v['method'] != 'gptq':
    raise UserError(f'variant {spec!r}: act (act-order) applies to gptq only')
  if v['alpha'] is not None and not 0.0 <= v['alpha'] <= 1.0:
    raise UserError(f'variant {spec!r}: alpha={v["alpha"]} must be in [0, 1]')
  return v


def check(config, workdir):
  """Validates a quantization config, its workdir and its source before any work is done;
  every variant is checked against the source model's shapes. Returns (source config,
  variants)."""
  variants = [parse_variant(s) for s in str(config.variants).split(',') if s.strip()]
  if not variants:
    raise UserError('config.variants is empty: name at least one, e.g. rtn:int8')
  distill.check_recovery(config)
  src, cfg, shapes = source.check(config, workdir, 'quantize')
  source.positive_int(config, 'kv_chunk')
  if config.get('hf_path') and any(v['tune'] for v in variants):
    raise UserError('ft<N> and qat<N> variants fine-tune the source run\'s own model; '
                    'config.hf_path cannot be fine-tuned here')
  lr = config.finetune_learning_rate
  if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
    raise UserError(f'config.finetune_learning_rate={lr!r} must be a number > 0')
  for storage in filter(None, str(config.kv_cache).split(',')):
    if storage not in KV_CACHE_DTYPES:
      raise UserError(f'config.kv_cache: {storage!r} is not one of {", ".join(KV_CACHE_DTYPES)}')
  for v in variants:
    method = 'gptq' if v['method'] == 'gptq' else 'rtn'
    try:
      quantize_lib.check(shapes, method, v['bits'], group_size=v['group_size'], clip=v['clip'],
                         act=v['act'], include=config.include or None,
                         layouts=layouts.of_config(cfg), model_config=cfg)
    except ValueError as e:
      raise UserError(f'variant {v["spec"]!r}: {e}') from None
  return src, variants


def run(config, workdir) -> list:
  """Runs every variant; returns the result rows (also written to results.json / results.md)."""
  return source.run(config, workdir, check, _run)


def _run(config, workdir, src, variants) -> list:
  step, model, tokenizer, params, calib = source.start(config, src)
  float_bytes = quantize_lib.weight_bytes(params)
  rows = [dict(variant='float', nats_per_byte=source.evaluate(src, model, params, tokenizer),
               weight_bytes=float_bytes, **source.cost_figures(model, params, src.data.seq_len),
               **source.measured(model, params, calib[0], config.decode_tokens))]
  logging.info('float: %s', rows[0])
  for v in variants:
    start, tuned, tune_config = params, {}, None
    if v['tune']:
      tune_config = _tune_config(v, config, src, model, step)
      start, tuned = _fine_tune(v, config, tune_config, workdir, params, (model, params))
    t0 = time.perf_counter()
    if v['tune'] == 'qat':   # the grid the fine-tune trained on, as integers
      new = qat.convert(start, steps.qat_spec(tune_config), layouts.of_model(model))
    else:
      new = apply_variant(v, model, start, calib, config.include or None)
    row = dict(variant=v['spec'], quantize_s=time.perf_counter() - t0, **tuned,
               nats_per_byte=source.evaluate(src, model, new, tokenizer),
               weight_bytes=quantize_lib.weight_bytes(new), **_quantized_bytes(params, new),
               **source.cost_figures(model, new, src.data.seq_len),
               **source.measured(model, new, calib[0], config.decode_tokens))
    row['disk_bytes'] = saved.save(workdir / 'params' / source.slug(v['spec']), new,
                                   _origin(v, config, step))
    logging.info('%s: %s', v['spec'], row)
    rows.append(row)
  for storage in filter(None, str(config.kv_cache).split(',')):
    row = dict(variant=f'kv_cache:{storage}', weight_bytes=float_bytes, chunk=config.kv_chunk,
               nats_per_byte=cached_nats_per_byte(src, model, params, tokenizer, storage,
                                                  config.kv_chunk))
    logging.info('%s', row)
    rows.append(row)
  source.write_results(workdir, config, rows, _table(rows))
  return rows


def cached_nats_per_byte(src, model, params, tokenizer, storage: str, chunk: int) -> float:
  """Validation nats per byte with each row read `chunk` tokens at a time through a KV cache
  stored as `storage` (decoding's path): every chunk attends to the earlier ones as the cache
  holds them, so an int8 cache's rounding reaches the loss as it would reach generated text."""
  token_bytes = jnp.asarray(tokenizer.token_bytes, jnp.float32)

  @jax.jit
  def score(params, batch):
    b, length = batch['inputs'].shape
    cache = decode.init_cache(model.config, b, length, storage)
    total = 0.0
    for start in range(0, length, chunk):
      part = {k: v[:, start:start + chunk] for k, v in batch.items()}
      logits, cache = model.apply({'params': params}, part['inputs'], cache=cache,
                                  positions=part['positions'], segment_ids=part['segment_ids'])
      ce, _ = steps.token_losses(logits, part['targets'], 0.0)
      total += jnp.sum(ce * part['weights'])
    return total, jnp.sum(token_bytes[batch['targets']] * batch['weights'])

  nats, n_bytes = 0.0, 0.0
  for batch in data.eval_batches(src.data, tokenizer, batch_size=src.eval_batch_size,
                                 max_batches=src.eval_batches or None):
    ce, nb = score(params, jax.tree.map(jnp.asarray, batch))
    nats, n_bytes = nats + float(ce), n_bytes + float(nb)
  return nats / max(n_bytes, 1.0)


def apply_variant(v: dict, model, params, calib, include=None):
  """The parameter tree quantized as variant `v` says (the input tree is not changed)."""
  method = 'gptq' if v['method'] == 'gptq' else 'rtn'
  options = dict(group_size=v['group_size'], symmetric=v['symmetric'], clip=v['clip'],
                 act=v['act'], include=include, model=model, act_order=v['act_order'])
  if v['method'] == 'mixed':
    return _mixed(v, model, params, calib, include)
  if v['method'] in ('awq', 'smoothquant'):
    params = _rescale(v, model, params, calib)
  needs_data = method == 'gptq' or v['clip'] == 'mse' or v['act'] == 'static'
  return quantize_lib.quantize(params, method, v['bits'], batches=calib if needs_data else None,
                               **options)


def _tune_config(v: dict, config, src, model, step: int):
  """The training config of variant `v`'s fine-tune (quantization-aware for qat<N>)."""
  origin = dict(runner='quantize', source_workdir=os.path.abspath(str(config.source_workdir)),
                source_step=step, hf_path=config.get('hf_path') or '', variant=v['spec'],
                outliers=config.outliers.to_dict(),
                **distill.recovery_origin(config, v['tune_steps']))
  sub = finetune.derived_config(src, model.config, num_steps=v['tune_steps'],
                                learning_rate=config.finetune_learning_rate, seed=config.seed + 1,
                                origin=origin)
  sub.qat = base.base_config().qat
  if v['tune'] == 'qat':
    sub.qat.update(bits=v['bits'], group_size=v['group_size'], symmetric=v['symmetric'],
                   ranges=v['ranges'], act_bits=8 if v['act'] == 'dynamic' else 0,
                   include=config.include)
  return sub


def _origin(v: dict, config, step: int) -> dict:
  """Where variant `v` comes from (saved with its parameters: `saved.save`'s info)."""
  return dict(variant=v, source_workdir=os.path.abspath(str(config.source_workdir)),
              source_step=step, hf_path=config.get('hf_path') or '',
              outliers=config.outliers.to_dict())


def _fine_tune(v: dict, config, sub_config, workdir, params, teacher):
  """(fine-tuned float parameters, row fields): variant `v`'s fine-tune (`sub_config`) through
  the training loop in <workdir>/finetune/<variant>/ (continued or skipped when run again), by
  cross-entropy or distilled from `teacher` (the float (model, params)) as `config.recover`
  says."""
  sub = workdir / 'finetune' / source.slug(v['spec'])
  metrics = finetune.run(sub_config, sub, params, None, config.source_workdir,
                         **distill.recovery(config, *teacher, sub_config.num_train_steps))
  trained = finetune.trained_params(sub_config, sub)
  # A quantization-aware run evaluates its fake-quantized model; a plain one its float model.
  return trained, {f'{v["tune"]}_eval_nats_per_byte': metrics['nats_per_byte']}


def _mixed(v: dict, model, params, calib, include):
  """Round-to-nearest with a bit width per weight: the least summed calibration-loss increase
  (`compression.mixed`) within the bytes of the same grid at uniform `v['bits']`."""
  loss = steps.lm_loss(model)
  loss_fn = lambda p, b: loss(p, b)[0] / jnp.maximum(jnp.sum(b['weights']), 1.0)
  options = dict(group_size=v['group_size'], symmetric=v['symmetric'], include=include)
  sens = mixed.sensitivity(params, model, calib, loss_fn, **options)
  sizes = mixed.layer_bytes(params, list(sens), model=model, group_size=v['group_size'],
                            symmetric=v['symmetric'])
  bits = mixed.allocate(sens, sizes, mixed.uniform_budget(sizes, v['bits']))
  logging.info('%s: bits %s', v['spec'], bits)
  return mixed.quantize_mixed(params, bits, model=model, group_size=v['group_size'],
                              symmetric=v['symmetric'])


def _rescale(v: dict, model, params, calib):
  """The float model rescaled by AWQ (searched for `v`'s grid) or SmoothQuant (its alpha)."""
  stats = smoothing.calibrate(model, params, calib, gram=v['method'] == 'awq')
  if v['method'] == 'smoothquant':
    alpha = 0.5 if v['alpha'] is None else v['alpha']
    return smoothing.smoothquant(params, model.config, stats, alpha)
  fake = functools.partial(grid.fake_quant, bits=v['bits'], group_size=v['group_size'],
                           symmetric=v['symmetric'])
  alphas = smoothing.ALPHAS if v['alpha'] is None else (v['alpha'],)
  params, chosen = smoothing.awq(params, model.config, stats, fake, alphas)
  logging.info('%s: AWQ alphas %s', v['spec'], chosen)
  return params


def _quantized_bytes(before, after) -> dict:
  """Bytes of the quantized kernels before (float) and after (integers, scales, zero points)."""
  old, new = paths.flatten(before), paths.flatten(after)
  chosen = [p for p, x in new.items() if isinstance(x, qtensor.QTensor)]
  return dict(quantized_float_bytes=sum(old[p].nbytes for p in chosen),
              quantized_bytes=sum(new[p].nbytes() for p in chosen))


def _ratio(row) -> str:
  if 'quantized_bytes' not in row:
    return ''
  return f"{row['quantized_bytes'] / row['quantized_float_bytes']:.3f} of float"


def _table(rows) -> str:
  base = rows[0]
  head = ('| variant | nats/byte | vs float | weight bytes | vs float | quantized kernels | '
          'disk bytes | forward ms |')
  lines = [head, '|' + '---|' * (head.count('|') - 1)]
  for r in rows:
    if r['variant'].startswith('kv_cache:'):
      lines.append(f"| {r['variant']} ({r['chunk']}-token chunks) | {r['nats_per_byte']:.4f} | "
                   f"{100 * (r['nats_per_byte'] / base['nats_per_byte'] - 1):+.2f}% | | | | | |")
      continue
    lines.append(
        f"| {r['variant']} | {r['nats_per_byte']:.4f} | "
        f"{100 * (r['nats_per_byte'] / base['nats_per_byte'] - 1):+.2f}% | "
        f"{r['weight_bytes']:,} | {r['weight_bytes'] / base['weight_bytes']:.3f} | "
        f"{_ratio(r)} | "
        f"{r.get('disk_bytes', 0):,} | {r['forward_ms']:.1f} |")
  return '\n'.join(lines) + '\n'

