"""Post-training quantization: `quantize(params, method, bits, ...) -> params with QTensor leaves`.

The selected kernels (a path regex, the same rules as pruning: `compression.paths.select`)
become `compression.qtensor.QTensor` leaves, integers with scales that execute through the
model's seam; everything else stays as it was. Methods (`METHODS`):
  rtn   round-to-nearest on each weight's own grid, the range from min/max or (clip='mse')
        searched per group and output for least squared error (with calibration batches, least
        output error on the calibration inputs);
  gptq  inverse-Hessian error feedback from calibration inputs (Frantar et al., 2022), block by
        block as the forward pass reaches them, each block seeing the earlier ones quantized.
AWQ and SmoothQuant rescale the float model first (`compression.smoothing`, function-preserving)
and then quantize with one of these. `act='dynamic'` or `'static'` makes layers with int8
activations (per-token scales, or one calibrated scale per layer) times the integer weights:
W8A8, or W4A8 (torchao's "8da4w": int8 dynamic activations, int4 grouped weights), one s8 x s8
-> s32 product per group.
"""

import logging
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from compression import calibration, grid, paths, qtensor
from models import layouts as layouts_lib


class Method(NamedTuple):
  """`matrix(w_IxO, gram_IxI or None, clip, options) -> (q_IxO, scale_GxO, zero_GxO)`; `needs`
  'gram' when calibration inputs are required."""
  matrix: Callable
  needs: Optional[str] = None


def _rtn(w_IxO, gram_IxI, *, bits, group_size, symmetric, clip, **_):
  g = grid.grouped(w_IxO.astype(jnp.float32), group_size)
  if clip == 'mse':
    c = grid.search_clip(w_IxO, bits, group_size, symmetric, gram_IxI)
  else:
    c = jnp.ones((g.shape[0], g.shape[2]), jnp.float32)
  scale, zero = grid.fit(g, bits, symmetric, c, group_size == grid.PER_TENSOR)
  q = grid.quantize(g, scale[:, None], zero[:, None], bits).reshape(w_IxO.shape)
  return q.astype(jnp.int8), scale, zero


def _gptq(w_IxO, gram_IxI, *, bits, group_size, symmetric, clip, act_order, block_size,
          dampening):
  from compression import gptq   # pylint: disable=g-import-not-at-top
  c = None
  if clip == 'mse':
    c = grid.search_clip(w_IxO, bits, group_size, symmetric, gram_IxI)
  return gptq.gptq(w_IxO, gram_IxI, bits, group_size=group_size, symmetric=symmetric,
                   act_order=act_order, block_size=block_size, dampening=dampening, clip=c)


METHODS = {
    'rtn': Method(_rtn),
    'gptq': Method(_gptq, needs='gram'),
}
CLIPS = ('minmax', 'mse')


def check(params, method: str, bits: int, *, group_size: int = 0, clip: str = 'minmax',
          act: str = 'none', include=None, exclude=paths.DEFAULT, layouts, model_config=None):
  """Everything `quantize` can reject, from shapes alone; returns the selected paths."""
  if method not in METHODS:
    raise ValueError(f'unknown quantization method {method!r}; methods: {", ".join(METHODS)}')
  grid.check(bits, group_size)
  if clip not in CLIPS:
    raise ValueError(f'clip={clip!r} is not one of {", ".join(CLIPS)}')
  if act not in qtensor.ACTIVATIONS:
    raise ValueError(f'act={act!r} is not one of {", ".join(qtensor.ACTIVATIONS)}')
  flat = paths.flatten(params)
  selected = [p for p in paths.select(params, layouts, include, exclude)
              if not isinstance(flat[p], qtensor.QTensor)]
  if not selected:
    raise ValueError('every selected weight is quantized already')
  for p in selected:
    layout = layouts[p]
    _, n_in, _ = layout.matrix_shape(flat[p].shape)
    grid.check(bits, group_size, n_in, p)
    n = qtensor.per_byte(bits)
    last = flat[p].shape[layout.stack + layout.inputs - 1]
    if last % n:
      raise ValueError(f'{p}: {bits}-bit packing splits its last input dim in {n}, and it has '
                       f'{last} entries')
    if act != 'none':
      paths.check_runnable(p, layout, model_config, 'W8A8')
  return selected


def quantize(params, method: str = 'rtn', bits: int = 8, *, group_size: int = 0,
             symmetric: bool = True, clip: str = 'minmax', act: str = 'none',
             include: Optional[str] = None, exclude: Optional[str] = paths.DEFAULT, model=None,
             layouts=None, batches=None, act_order: bool = False, block_size: int = 128,
             dampening: float = 0.01):
  """Quantizes the selected kernels of `params`; returns the new tree (the input is untouched).

  Args:
    params: the parameter tree (unrolled, for methods or options that read calibration data).
    method: a name in METHODS.
    bits: 2, 3, 4 or 8 (2 bits packed four per byte, 3 and 4 bits two per byte).
    group_size: inputs per scale: k > 0 (dividing every selected weight's inputs), 0 per output
      channel, -1 per tensor.
    symmetric: no zero points (False: asymmetric grids with int8 zero points).
    clip: 'minmax' or 'mse' (searched clipping; uses the calibration inputs when given).
    act: 'none' (weight-only), 'dynamic' or 'static' (int8 activations, any `bits`; static
      needs calibration batches).
    include, exclude: which weights (`compression.paths.select`).
    model: the `Transformer` (its layouts; its forward pass for calibration).
    batches: calibration batches (`compression.calibration.input_statistics`).
    act_order, block_size, dampening: GPTQ's options.
  """
  if layouts is None:
    if model is None:
      raise ValueError('pass the model (or its layouts): it says which parameters are weights')
    layouts = layouts_lib.of_model(model)
  selected = check(params, method, bits, group_size=group_size, clip=clip, act=act,
                   include=include, exclude=exclude, layouts=layouts,
                   model_config=None if model is None else model.config)
  spec = METHODS[method]
  calibrated = spec.needs == 'gram' or act == 'static' or (clip == 'mse' and batches)
  if calibrated and (model is None or not batches):
    raise ValueError(f'{method} with act={act!r} needs the model and calibration batches')
  options = dict(bits=bits, group_size=group_size, symmetric=symmetric, clip=clip,
                 act_order=act_order, block_size=block_size, dampening=dampening)
  flat = paths.flatten(params)
  groups = (calibration.blocks(model, params, batches[0], selected) if calibrated
            else [selected])
  for group in groups:
    stats = {}
    if calibrated:
      stats = calibration.input_statistics(model, paths.unflatten(flat), batches, group,
                                           gram=True, absmax=act == 'static')
    for p in group:
      flat[p] = _one(p, flat[p], layouts[p], spec, stats.get(p), options, act)
  return paths.unflatten(flat)


def _one(path: str, w, layout, spec: Method, stats, options, act: str) -> qtensor.QTensor:
  mats, _ = paths.as_matrices(w, layout)
  n_in = mats.shape[1]
  gram = None if stats is None else stats['gram'].reshape(-1, n_in, n_in)
  if stats is not None and not bool(jnp.all(jnp.reshape(stats['tokens'], (-1,)) > 0)):
    logging.warning('a matrix of %s saw no calibration token; it is rounded to nearest', path)
  out = []
  for i in range(mats.shape[0]):
    seen = gram is not None and bool(jnp.any(jnp.diag(gram[i]) > 0))
    fn = spec.matrix if (spec.needs is None or seen) else _rtn
    out.append(fn(mats[i], gram[i] if seen else None, **options))
  q, scale, zero = (jnp.stack(x) for x in zip(*out))
  act_scale = None
  if act == 'static':
    act_scale = (jnp.max(stats['absmax']) / 127.0).astype(jnp.float32)
    act_scale = jnp.where(act_scale > 0, act_scale, 1.0)
  return qtensor.from_codes(q, scale, None if options['symmetric'] else zero, layout, w.shape,
                            bits=options['bits'], group_size=options['group_size'],
                            dtype=w.dtype, act=act, act_scale=act_scale)


def weight_bytes(params) -> int:
  """Bytes of every parameter as stored (integers, scales and float leaves)."""
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params)))
