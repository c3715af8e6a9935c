"""Quantization-aware training: the loss sees fake-quantized kernels; `convert` makes them integers.

The selected kernels (a path regex, `compression.paths.select`: by default every matmul weight
but embeddings, the head and routers) are rounded to their `compression.grid` grid and back
inside the loss (`loss`), so `experiments.steps.train_step` stays the one step: QAT is a loss
passed into the one loop. Gradients pass straight through the rounding where a weight lies
inside the grid's range (its integer was not clipped) and are zero outside (clipped STE).

Ranges (`Spec.ranges`):
  minmax   each step's grid is fitted to the current weights (`grid.fit`), no parameters;
  learned  a scale per group and output is a parameter (LSQ, Esser et al., 2020), initialised
           from min-max and trained with LSQ's gradient, d w_hat / d s = round(w/s) - w/s inside
           the range and the clipped integer (minus the zero point) outside, scaled by
           1 / sqrt(weights per scale * Q), Q = 2^(bits-1) - 1 (symmetric) or 2^bits - 1.
           Asymmetric grids keep `grid.fit`'s integer zero point, recomputed from the weights
           with the learned scale. The scales live beside the model's parameters in
           `params[SCALES]`, a tree mirroring the kernels' paths, shaped [stack..., groups,
           out...] like a QTensor's scale: the optimizer trains them (`split_optimizer` keeps
           them out of wrappers written for the model's tree, such as frozen pruning masks),
           checkpoints save them, weight decay skips them (`experiments.steps.decay_mask`).
With `act_bits=8` the inputs of the selected layers are also rounded to int8 per token
(dynamic, straight-through), through the seam leaf `ActQuant` registered here. Pruned weights
stay exactly zero: 0 rounds to the integer zero point, which dequantizes to 0.

`convert` returns the integer tree: `QTensor` leaves on exactly the fake-quantized grid, whose
dequantized weights equal the fake-quantized ones bit for bit, so the served model's logits
equal the trained model's to the float rounding of its execution (the integer matmuls sum in
another order, and on CPU activations are split into two int8 limbs).
"""

import dataclasses
import functools
import math
from typing import Callable, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax import lax

from compression import grid, paths, qtensor, schedules
from compression import quantize as quantize_lib
from models import layouts as layouts_lib
from models import seam
from models.layouts import Layout

SCALES = 'qat_scales'   # the params entry holding the learned scales
RANGES = ('minmax', 'learned')
ACT_BITS = (0, 8)
_MIN_SCALE = 1e-12   # a learned scale pushed to or below 0 is held here


@dataclasses.dataclass(frozen=True)
class Spec:
  """What QAT fake-quantizes and how; `group_size` and `clip` as in `compression.grid`."""
  bits: int
  group_size: int = 0
  symmetric: bool = True
  ranges: str = 'minmax'
  clip: float = 1.0        # min-max range shrink factor (also the learned scales' start)
  act_bits: int = 0        # 8: int8 inputs per token (W8A8, or W4A8 with bits=4)
  include: Optional[str] = None
  exclude: Optional[str] = paths.DEFAULT


def check(params, spec: Spec, layouts: paths.Layouts, model_config=None):
  """One-line ValueErrors for anything `convert` could not serve; returns the selected paths."""
  if spec.ranges not in RANGES:
    raise ValueError(f'ranges={spec.ranges!r} is not one of {", ".join(RANGES)}')
  if isinstance(spec.act_bits, bool) or spec.act_bits not in ACT_BITS:
    raise ValueError(f'act_bits={spec.act_bits!r} is not one of 0 (off), 8')
  if not isinstance(spec.symmetric, bool):
    raise ValueError(f'symmetric={spec.symmetric!r} must be True or False')
  if isinstance(spec.clip, bool) or not isinstance(spec.clip, (int, float)) or not (
      0 < spec.clip <= 1):
    raise ValueError(f'clip={spec.clip!r} must be in (0, 1] (a fraction of the min-max range)')
  model_params = {k: v for k, v in params.items() if k != SCALES}
  return quantize_lib.check(model_params, 'rtn', spec.bits, group_size=spec.group_size,
                            act='dynamic' if spec.act_bits else 'none', include=spec.include,
                            exclude=spec.exclude, layouts=layouts, model_config=model_config)


# ---- the straight-through round trip

@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def round_trip(w, scale, zero, bits: int, grad_scale: float = 1.0):
  """(clip(round(w / scale) + zero) - zero) * scale, shapes broadcasting (`grid.quantize`),
  with the clipped straight-through gradient for `w` and LSQ's for `scale`."""
  return grid.dequantize(grid.quantize(w, scale, zero, bits), scale, zero)


def _round_trip_fwd(w, scale, zero, bits, grad_scale):
  return round_trip(w, scale, zero, bits, grad_scale), (w, scale, zero)


def _round_trip_bwd(bits, grad_scale, res, g):
  w, scale, zero = res
  lo, hi = grid.qrange(bits)
  v = w.astype(jnp.float32) / scale
  r = jnp.round(v) + zero
  inside = (r >= lo) & (r <= hi)
  d_w = jnp.where(inside, g, 0.0).astype(w.dtype)
  d_scale = g * jnp.where(inside, jnp.round(v) - v, jnp.clip(r, lo, hi) - zero) * grad_scale
  return d_w, _sum_to(d_scale, scale.shape), jnp.zeros_like(zero)


round_trip.defvjp(_round_trip_fwd, _round_trip_bwd)


def _sum_to(x, shape):
  axes = tuple(i for i, (a, b) in enumerate(zip(x.shape, shape)) if b == 1 and a != 1)
  return jnp.sum(x, axis=axes, keepdims=True).reshape(shape)


# ---- grids of the selected kernels

def _grouped(w, layout: Layout, group_size: int):
  """The kernel as [matrices, groups, group inputs, outputs] (float32)."""
  mats = w.reshape(layout.matrix_shape(w.shape)).astype(jnp.float32)
  return jax.vmap(lambda m: grid.grouped(m, group_size))(mats)


def _minmax(g_SxGxKxO, spec: Spec):
  """`grid.fit` per matrix, exactly as `qtensor.quantize` calls it: (scale, zero) [S, G, O]."""
  s, n_g, _, o = g_SxGxKxO.shape
  clip = jnp.full((s, n_g, o), spec.clip, jnp.float32)
  per_tensor = spec.group_size == grid.PER_TENSOR
  return jax.vmap(lambda m, c: grid.fit(m, spec.bits, spec.symmetric, c, per_tensor))(
      g_SxGxKxO, clip)


def _scale_shape(w_shape, layout: Layout, group_size: int):
  """A learned scale's shape: [stack..., groups, out...] (per tensor: [stack..., 1, 1...])."""
  n_in = layout.matrix_shape(w_shape)[1]
  stack, outputs = w_shape[:layout.stack], w_shape[layout.stack + layout.inputs:]
  if group_size == grid.PER_TENSOR:
    return stack + (1,) + (1,) * len(outputs)
  return stack + (grid.n_groups(n_in, group_size),) + outputs


def _grid(g_SxGxKxO, spec: Spec, scale=None):
  """(scale, zero) [S, G, 1, O or 1] of the matrices: min-max (held constant), or `scale`."""
  if scale is None:
    s, z = _minmax(g_SxGxKxO, spec)
    return lax.stop_gradient(s[:, :, None]), lax.stop_gradient(z[:, :, None])
  n_s, n_g = g_SxGxKxO.shape[:2]
  s = jnp.maximum(scale.astype(jnp.float32).reshape(n_s, n_g, 1, -1), _MIN_SCALE)
  if spec.symmetric:
    return s, jnp.zeros_like(s)
  lo, hi = grid.qrange(spec.bits)
  axes = (2, 3) if spec.group_size == grid.PER_TENSOR else (2,)
  w_min = jnp.minimum(jnp.min(g_SxGxKxO, axis=axes, keepdims=True), 0.0) * spec.clip
  return s, lax.stop_gradient(jnp.clip(lo - jnp.round(w_min / s), lo, hi))   # as grid.fit


def _lsq_grad_scale(g_shape, s_shape, spec: Spec) -> float:
  shared = math.prod(a for a, b in zip(g_shape, s_shape) if b == 1)
  lo, hi = grid.qrange(spec.bits)
  return 1.0 / math.sqrt(shared * (hi if spec.symmetric else hi - lo))


def fake_quant(w, layout: Layout, spec: Spec, scale=None):
  """The kernel `w` on its grid and back, in its dtype (`scale`: its learned scale, or None)."""
  g = _grouped(w, layout, spec.group_size)
  s, z = _grid(g, spec, scale)
  w_hat = round_trip(g, s, z, spec.bits, _lsq_grad_scale(g.shape, s.shape, spec))
  return w_hat.reshape(w.shape).astype(w.dtype)


def init_scales(params, spec: Spec, layouts: paths.Layouts):
  """{kernel path tree: min-max scale} of the selected kernels, boxed with logical names where
  the kernels are (as `model.init` returns them)."""
  flat = paths.flatten({k: v for k, v in params.items() if k != SCALES})
  out = {}
  for p in check(nn.meta.unbox(params), spec, layouts):
    w, layout = flat[p], layouts[p]
    value = nn.meta.unbox(w)
    s, _ = _minmax(_grouped(value, layout, spec.group_size), spec)
    per_tensor = spec.group_size == grid.PER_TENSOR
    out[p] = (s[:, :, :1] if per_tensor else s).reshape(
        _scale_shape(value.shape, layout, spec.group_size))
    if isinstance(w, nn.meta.AxisMetadata):   # named like a QTensor's scale
      stack, outs = layout.names[:layout.stack], layout.names[layout.stack + layout.inputs:]
      names = stack + (None,) + ((None,) * len(outs) if per_tensor else outs)
      out[p] = w.replace_boxed(out[p]).replace(names=names)
  return paths.unflatten(out)


def with_scales(params, spec: Spec, layouts: paths.Layouts):
  """`params` and, for learned ranges, their starting scales in `params[SCALES]`."""
  if spec.ranges != 'learned' or SCALES in params:
    return params
  return dict(params, **{SCALES: init_scales(params, spec, layouts)})


def _scales_of(params, spec: Spec):
  if spec.ranges != 'learned':
    return {}
  if SCALES not in params:
    raise ValueError(f'learned QAT ranges need their scales in params[{SCALES!r}]; add them with '
                     f'compression.qat.with_scales (steps.state_init_fn(..., loss=) does)')
  return paths.flatten(params[SCALES])


def fake_quantize(params, spec: Spec, layouts: paths.Layouts, model_config=None):
  """The tree the QAT model runs: selected kernels fake-quantized (wrapped in `ActQuant` with
  act_bits), the learned scales consumed."""
  scales = _scales_of(params, spec)
  flat = paths.flatten({k: v for k, v in params.items() if k != SCALES})
  for p in check(params, spec, layouts, model_config):
    layout = layouts[p]
    flat[p] = fake_quant(flat[p], layout, spec, scales.get(p))
    if spec.act_bits:
      flat[p] = ActQuant(flat[p], layout.names, layout.inputs, layout.outputs)
  return paths.unflatten(flat)


def convert(params, spec: Spec, layouts: paths.Layouts, model_config=None):
  """The QAT-trained tree -> integers: QTensor leaves on the grids `fake_quantize` used."""
  scales = _scales_of(params, spec)
  flat = paths.flatten({k: v for k, v in params.items() if k != SCALES})
  act = 'dynamic' if spec.act_bits else 'none'
  for p in check(params, spec, layouts, model_config):
    w, layout = flat[p], layouts[p]
    g = _grouped(w, layout, spec.group_size)
    s, z = _grid(g, spec, scales.get(p))
    q = grid.quantize(g, s, z, spec.bits).reshape(layout.matrix_shape(w.shape))
    full = (g.shape[0], g.shape[1], g.shape[3])
    s, z = jnp.broadcast_to(s[:, :, 0], full), jnp.broadcast_to(z[:, :, 0], full)
    flat[p] = qtensor.from_codes(q, s, None if spec.symmetric else z, layout, w.shape,
                                 bits=spec.bits, group_size=spec.group_size, dtype=w.dtype,
                                 act=act)
  return paths.unflatten(flat)


# ---- the loss

@dataclasses.dataclass(frozen=True)
class Loss:
  """`base` (a hashable `loss(params, batch, rng) -> (total, sums)`) on the fake-quantized tree.

  Frozen and hashable: a static argument of jit, like `experiments.steps.LmLoss`.
  """
  base: Callable
  spec: Spec
  model: nn.Module   # the Transformer (its layouts say which parameters are weights)

  @property
  def layouts(self) -> paths.Layouts:
    return layouts_lib.of_model(self.model)

  def __call__(self, params, batch, rng=None):
    # Entries `base` reads beside the model (a teacher, projections) pass through untouched.
    return self.base(fake_quantize(params, self.spec, self.layouts, self.model.config), batch,
                     rng)

  def model_params(self, params):
    """The tree the model runs (fake-quantized) from the trained one (after `base`'s own
    `model_params`, if it has one)."""
    if hasattr(self.base, 'model_params'):
      params = self.base.model_params(params)
    return fake_quantize(params, self.spec, self.layouts, self.model.config)

  def init_params(self, params):
    """The model's parameters plus the ones this loss and `base` train (learned scales)."""
    if hasattr(self.base, 'init_params'):
      params = self.base.init_params(params)
    return with_scales(params, self.spec, self.layouts)


def loss(base: Callable, spec: Spec, model=None) -> Loss:
  """The QAT loss around `base` (default model: `base.model`, as `LmLoss` holds it)."""
  model = model if model is not None else getattr(base, 'model', None)
  if model is None:
    raise ValueError('pass the model: the base loss does not hold one')
  return Loss(base, spec, model)


def split_optimizer(model_tx: optax.GradientTransformation,
                    scales_tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """`model_tx` on the model's parameters, `scales_tx` on `{SCALES: ...}`: wrappers written for
  the model's tree (frozen pruning masks) never see the scales."""
  return schedules.split(SCALES, model_tx, scales_tx)


# ---- int8 activations at the seam

@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ActQuant(seam.Wrapped):
  """A (fake-quantized) kernel whose contractions round their inputs to int8 per token, as a
  W8A8 `QTensor` (act='dynamic') does: where that runs integer activations, so does this."""


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def act_round_trip(x, axes: Tuple[int, ...]):
  """x (float32) rounded to int8 with one scale per row (max |x| over `axes` / 127) and back;
  the gradient passes straight through (nothing lies outside a row's own range)."""
  s = jnp.max(jnp.abs(x), axis=axes, keepdims=True) / 127.0   # as qtensor's _row_scale
  s = jnp.where(s > 0, s, 1.0)
  return jnp.clip(jnp.round(x / s), -127, 127) * s


act_round_trip.defvjp(lambda x, axes: (act_round_trip(x, axes), None), lambda axes, _, g: (g,))


def _dot(x, t: ActQuant, x_dims, w_dims, dtype):
  if not t.stack and tuple(w_dims) == tuple(range(t.inputs)):   # QTensor's W8A8 cases
    x = act_round_trip(x.astype(jnp.float32), tuple(x_dims))
  return lax.dot_general(x.astype(dtype), t.w.astype(dtype), ((x_dims, w_dims), ((), ())))


def _expert_dot(x_ExMxI, t: ActQuant, dtype):
  x = act_round_trip(x_ExMxI.astype(jnp.float32), (2,)).astype(dtype)
  return lax.dot_general(x, t.w.astype(dtype), (((2,), (1,)), ((0,), (0,))))


seam.register(ActQuant, seam.Rule(dense=lambda t, dtype: t.w.astype(dtype), dot=_dot,
                                  expert_dot=_expert_dot))
