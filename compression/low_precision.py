"""Low-precision training matmuls: int8 (AQT-style) and fp8 dots at the seam, chosen per layer.

The selected kernels (a path regex, `compression.paths.select`; by default every matmul weight
but embeddings, the head and routers) are wrapped in a `LowPrecision` seam leaf inside the loss
(`Loss`), so their forward dot, and with `backward=True` both gradient dots, run on integers or
fp8 while the parameters, the optimizer and everything else stay float32. It is a loss passed to
the one training loop, like quantization-aware training; nothing is fake: the dots are
`lax.dot_general` on int8 (s32 sums) or float8 operands (f32 sums) on every backend (XLA-CPU
runs both, faster than f32 at training sizes).

  int8  (AQT-style) every operand is rounded to int8 with a dynamic scale per index of its
        non-contracted dims (max |x| / 127 over the contracted ones): per token for activations
        and gradients, per output channel for the weight in the forward dot, per input channel
        in the gradient dot that contracts the outputs, per feature in the weight-gradient dot.
  fp8   activations and weights as e4m3 (max 448), output gradients as e5m2 (max 57344), one
        scale per tensor: `current` scaling takes each tensor's own max |x|; `delayed`
        (Micikevicius et al., 2022; Transformer Engine) the largest of the last `history`
        steps' maxima for activations and gradients, which lets a fused kernel scale before it
        has seen the tensor. Weights always use their current max (it is known).
Gradients are straight-through: d loss / d x is the (low-precision) product of the output
gradient with the weight, as if the rounding were the identity; nothing is clipped because
every scale covers its tensor's (or its history's) range.

Delayed scaling keeps its amax histories in `params[HISTORY]` ([stack..., history, 2]: the
activation and gradient maxima of each selected kernel), so checkpoints save them and scanned
layers slice them. They are state, not parameters: each step's observed maxima leave the loss
as the histories' "gradient" ([observed, 1] in the first two rows, the 1 counting uses), which
`split_optimizer` turns into the rolled history. Gradients are summed over microbatches and
divided by the token count, so the ratio of the two rows is the mean of the microbatches'
maxima; the clipping and the optimizer never see them.
"""

import dataclasses
import functools
from typing import Callable, NamedTuple, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax import lax

from compression import paths, schedules
from models import seam
from models import layouts as layouts_lib

FORMATS = ('int8', 'fp8')
SCALINGS = ('current', 'delayed')
HISTORY = 'lowp_amax'   # the params entry holding delayed scaling's amax histories

_FP8 = dict(forward=jnp.float8_e4m3fn, backward=jnp.float8_e5m2)


@dataclasses.dataclass(frozen=True)
class Spec:
  """Which kernels train in low precision, and how."""
  format: str                        # 'int8' or 'fp8'
  backward: bool = True              # the two gradient dots too (else float32 from the inputs)
  scaling: str = 'current'           # fp8: 'current' or 'delayed'
  history: int = 16                  # delayed: steps of amax history
  include: Optional[str] = None
  exclude: Optional[str] = paths.DEFAULT


def check(params, spec: Spec, layouts: paths.Layouts, model_config=None):
  """One-line ValueErrors for a spec the model cannot train with; returns the selected paths."""
  if spec.format not in FORMATS:
    raise ValueError(f'format={spec.format!r} is not one of {", ".join(FORMATS)}')
  if spec.scaling not in SCALINGS:
    raise ValueError(f'scaling={spec.scaling!r} is not one of {", ".join(SCALINGS)}')
  if spec.scaling == 'delayed' and spec.format != 'fp8':
    raise ValueError(f'scaling=\'delayed\' applies to fp8 (int8 scales every row as it comes), '
                     f'not format={spec.format!r}')
  if (isinstance(spec.history, bool) or not isinstance(spec.history, int)
      or spec.history < 1):
    raise ValueError(f'history={spec.history!r} must be an integer >= 1')
  if not isinstance(spec.backward, bool):
    raise ValueError(f'backward={spec.backward!r} must be True or False')
  model_params = {k: v for k, v in params.items() if k != HISTORY}
  chosen = paths.select(model_params, layouts, spec.include, spec.exclude)
  for p in chosen:
    paths.check_runnable(p, layouts[p], model_config, f'{spec.format} training')
  return chosen


# ---- the dots

def _int8(x, contracted: Tuple[int, ...]):
  """(int8 values, float32 scales shaped like x with `contracted` dims of size 1)."""
  x = x.astype(jnp.float32)
  s = jnp.max(jnp.abs(x), axis=contracted, keepdims=True) / 127.0
  s = jnp.where(s > 0, s, 1.0)
  return jnp.clip(jnp.round(x / s), -127, 127).astype(jnp.int8), s


def _free(s, contracted):
  return s.reshape(tuple(n for i, n in enumerate(s.shape) if i not in contracted))


def int8_dot(a, b, a_dims: Tuple[int, ...], b_dims: Tuple[int, ...]):
  """dot_general(a, b) contracting `a_dims` with `b_dims` (no batch dims), each operand rounded
  to int8 per index of its free dims, summed in int32 and rescaled (float32 result)."""
  qa, sa = _int8(a, a_dims)
  qb, sb = _int8(b, b_dims)
  y = lax.dot_general(qa, qb, ((a_dims, b_dims), ((), ())), preferred_element_type=jnp.int32)
  sa, sb = _free(sa, a_dims), _free(sb, b_dims)
  return (y.astype(jnp.float32) * sa.reshape(sa.shape + (1,) * sb.ndim)
          * sb.reshape((1,) * sa.ndim + sb.shape))


def _amax(x):
  return jnp.max(jnp.abs(x)).astype(jnp.float32)


def _fp8_scale(amax, dtype):
  return jnp.where(amax > 0, amax, 1.0) / float(jnp.finfo(dtype).max)


def _to_fp8(x, scale, dtype):
  top = float(jnp.finfo(dtype).max)   # a delayed scale may be below this step's max: saturate
  return jnp.clip(x.astype(jnp.float32) / scale, -top, top).astype(dtype)


def _fp8_dot(a, sa, b, sb, a_dims, b_dims):
  y = lax.dot_general(a, b, ((a_dims, b_dims), ((), ())), preferred_element_type=jnp.float32)
  return y * (sa * sb)


class _Static(NamedTuple):
  format: str
  backward: bool
  delayed: bool
  x_dims: Tuple[int, ...]
  w_dims: Tuple[int, ...]


def _dims(x_ndim, w_ndim, st: _Static):
  """Dims of the two gradient dots: (g's output dims, w's free dims, x's token dims, order of
  the weight gradient's dims)."""
  n_tok = x_ndim - len(st.x_dims)
  g_out = tuple(range(n_tok, n_tok + w_ndim - len(st.w_dims)))
  w_free = tuple(d for d in range(w_ndim) if d not in st.w_dims)
  tokens = tuple(range(n_tok))
  order = tuple(st.w_dims) + w_free   # dot(x, g) over tokens gives [w_dims..., w_free...]
  return g_out, w_free, tokens, tuple(order.index(i) for i in range(w_ndim))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _lowp_dot(x, w, hist, st: _Static):
  return _forward(x, w, hist, st)[0]


def _forward(x, w, hist, st: _Static):
  if st.format == 'int8':
    return int8_dot(x, w, st.x_dims, st.w_dims), (x, w, None, None, None)
  dt = _FP8['forward']
  ax = _amax(x)
  past = jnp.max(hist[:, 0]) if st.delayed else ax
  sx, sw = _fp8_scale(jnp.where(past > 0, past, ax), dt), _fp8_scale(_amax(w), dt)
  xq, wq = _to_fp8(x, sx, dt), _to_fp8(w, sw, dt)
  y = _fp8_dot(xq, sx, wq, sw, st.x_dims, st.w_dims)
  return y, (xq, wq, (sx, sw), ax, hist)


def _fwd(x, w, hist, st):
  y, res = _forward(x, w, hist, st)
  return y, (res, x, w)


def _bwd(st: _Static, saved, g):
  (xr, wr, scales, ax, hist), x, w = saved
  g_out, w_free, tokens, order = _dims(x.ndim, w.ndim, st)
  d_hist = None
  if not st.backward:
    g32 = g.astype(jnp.float32)
    d_x = lax.dot_general(g32, w.astype(jnp.float32), ((g_out, w_free), ((), ())))
    d_w = lax.dot_general(x.astype(jnp.float32), g32, ((tokens, tokens), ((), ())))
  elif st.format == 'int8':
    d_x = int8_dot(g, w, g_out, w_free)
    d_w = int8_dot(x, g, tokens, tokens)
  else:
    dt = _FP8['backward']
    ag = _amax(g)
    past = jnp.max(hist[:, 1]) if st.delayed else ag
    sg = _fp8_scale(jnp.where(past > 0, past, ag), dt)
    gq = _to_fp8(g, sg, dt)
    sx, sw = scales
    d_x = _fp8_dot(gq, sg, wr, sw, g_out, w_free)
    d_w = _fp8_dot(xr, sx, gq, sg, tokens, tokens)
  if st.delayed:   # the observed maxima and a use count (see the module docstring)
    d_hist = jnp.zeros_like(hist).at[0].set(jnp.stack([ax, _amax(g)])).at[1].set(1.0)
  elif hist is not None:
    d_hist = jnp.zeros_like(hist)
  return d_x.astype(x.dtype), lax.transpose(d_w, order).astype(w.dtype), d_hist


_lowp_dot.defvjp(_fwd, _bwd)


# ---- the seam leaf

@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LowPrecision(seam.Wrapped):
  """A float kernel whose contractions run in low precision (see the module docstring)."""
  hist: Optional[jax.Array]          # delayed fp8: [stack..., history, 2] amax history; or None
  format: str = dataclasses.field(metadata=dict(static=True))
  backward: bool = dataclasses.field(metadata=dict(static=True))

  def logical_axes(self):
    names = self.names[len(self.names) - self.w.ndim:]
    hist = None if self.hist is None else names[:self.stack] + (None, None)
    return dataclasses.replace(self, w=names, hist=hist)


def _static(t: LowPrecision, x_dims, w_dims) -> _Static:
  return _Static(t.format, t.backward, t.hist is not None, tuple(x_dims), tuple(w_dims))


def _dot(x, t: LowPrecision, x_dims, w_dims, dtype):
  return _lowp_dot(x, t.w, t.hist, _static(t, x_dims, w_dims)).astype(dtype)


def _expert_dot(x_ExMxI, t: LowPrecision, dtype):
  st = _static(t, (1,), (0,))
  if t.hist is None:
    return jax.vmap(lambda x, w: _lowp_dot(x, w, None, st))(x_ExMxI, t.w).astype(dtype)
  return jax.vmap(lambda x, w, h: _lowp_dot(x, w, h, st))(x_ExMxI, t.w, t.hist).astype(dtype)


seam.register(LowPrecision, seam.Rule(dense=lambda t, dtype: t.w.astype(dtype), dot=_dot,
                                      expert_dot=_expert_dot))


# ---- the loss and its state

def init_history(params, spec: Spec, layouts: paths.Layouts):
  """{kernel path tree: zeros [stack..., history, 2]} of the selected kernels (delayed fp8),
  boxed with logical names where the kernels are."""
  flat = paths.flatten({k: v for k, v in params.items() if k != HISTORY})
  out = {}
  for p in check(nn.meta.unbox(params), spec, layouts):
    w, layout = flat[p], layouts[p]
    stack = nn.meta.unbox(w).shape[:layout.stack]
    out[p] = jnp.zeros(stack + (spec.history, 2), jnp.float32)
    if isinstance(w, nn.meta.AxisMetadata):
      out[p] = w.replace_boxed(out[p]).replace(names=layout.names[:layout.stack] + (None, None))
  return paths.unflatten(out)


def wrap(params, spec: Spec, layouts: paths.Layouts, model_config=None):
  """The tree the low-precision model runs: selected kernels as `LowPrecision` leaves (with
  their histories, delayed), the histories entry consumed."""
  hist = paths.flatten(params[HISTORY]) if spec.scaling == 'delayed' else {}
  if spec.scaling == 'delayed' and HISTORY not in params:
    raise ValueError(f'delayed fp8 scaling needs its histories in params[{HISTORY!r}]; add them '
                     f'with compression.low_precision.init_history')
  flat = paths.flatten({k: v for k, v in params.items() if k != HISTORY})
  for p in check(params, spec, layouts, model_config):
    layout = layouts[p]
    flat[p] = LowPrecision(w=flat[p], names=layout.names, inputs=layout.inputs,
                           outputs=layout.outputs, hist=hist.get(p), format=spec.format,
                           backward=spec.backward)
  return paths.unflatten(flat)


@dataclasses.dataclass(frozen=True)
class Loss:
  """`base` (a hashable `loss(params, batch, rng) -> (total, sums)`) with the selected kernels'
  dots in low precision. Frozen and hashable: a static argument of jit."""
  base: Callable
  spec: Spec
  model: nn.Module

  @property
  def layouts(self) -> paths.Layouts:
    return layouts_lib.of_model(self.model)

  def __call__(self, params, batch, rng=None):
    return self.base(wrap(params, self.spec, self.layouts, self.model.config), batch, rng)

  def model_params(self, params):
    """The float model the run trains (evaluated and served as it is): histories dropped (and
    what `base`'s own `model_params` drops)."""
    if hasattr(self.base, 'model_params'):
      params = self.base.model_params(params)
    return {k: v for k, v in params.items() if k != HISTORY}

  def init_params(self, params):
    """The model's parameters plus the amax histories of delayed scaling (and what `base`
    trains)."""
    if hasattr(self.base, 'init_params'):
      params = self.base.init_params(params)
    if self.spec.scaling != 'delayed' or HISTORY in params:
      return params
    return dict(params, **{HISTORY: init_history(params, self.spec, self.layouts)})


def loss(base: Callable, spec: Spec, model=None) -> Loss:
  """The low-precision loss around `base` (default model: `base.model`, as `LmLoss` holds it)."""
  model = model if model is not None else getattr(base, 'model', None)
  if model is None:
    raise ValueError('pass the model: the base loss does not hold one')
  return Loss(base, spec, model)


def roll_history():
  """The optimizer of the histories: each step's observed maxima (the ratio of the gradient's
  two first rows) pushed in front, the oldest dropped; no observation keeps the history."""
  def update(grads, state, params):
    def one(g, h):
      seen = g[..., 0, :] / jnp.where(g[..., 1, :] > 0, g[..., 1, :], 1.0)
      new = jnp.concatenate([seen[..., None, :], h[..., :-1, :]], axis=-2)
      return jnp.where(g[..., 1:2, :] > 0, new, h) - h   # an update: params + update = new
    return jax.tree.map(one, grads, params), state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def split_optimizer(model_tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """`model_tx` on the model's parameters (its clipping and wrappers never see the histories),
  `roll_history` on params[HISTORY]."""
  return schedules.split(HISTORY, model_tx, roll_history())
