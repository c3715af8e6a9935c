"""Building blocks, and the four weight contractions that form the compression seam.

Every weight the model multiplies by goes through one of `dot` (dense projections and the tied
output head), `expert_dot` (each expert on its own slab of tokens), `ragged_dot` (experts on
rows sorted by expert) and `take` (embedding lookups). Each dispatches on the weight leaf's type
through the registry in `models.seam`: plain arrays use the built-in rule below; a compression
transform can replace a kernel with another leaf type (integer values with scales, a factored
kernel) and register how it executes, without touching model code. Modules fetch weights with
`weight(...)`, which accepts any leaf type whose dense shape is the one asked for.
"""

import functools
import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from models import axes, seam
from models.config import ModelConfig

Dtype = jnp.dtype


def dot(x: jax.Array, w, n_contract: int, dtype, transpose_w: bool = False) -> jax.Array:
  """Contracts the last `n_contract` dims of `x` with the leading dims of weight `w`.

  With `transpose_w`, the trailing dims of `w` are contracted instead (the tied output head
  multiplies by the embedding table [vocab, embed] this way).
  """
  x_dims = tuple(range(x.ndim - n_contract, x.ndim))
  ndim = len(w.shape)
  w_dims = tuple(range(ndim - n_contract, ndim)) if transpose_w else tuple(range(n_contract))
  rule = seam.rule_for(w)
  if rule is not None and rule.dot is not None:
    y = rule.dot(x, w, x_dims, w_dims, dtype)
  else:
    y = _weight_dot(x.astype(dtype), seam.dense(w, dtype), x_dims, w_dims)
  return checkpoint_name(y, WEIGHT_DOT)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _weight_dot(x, w, x_dims, w_dims):
  """dot_general(x, w) contracting `x_dims` (x's trailing dims) with `w_dims`, with a gradient
  that chooses which operand of the weight gradient XLA transposes.

  The weight gradient contracts the token dims of x and of the output gradient g. JAX's own rule
  always makes g the left operand, so XLA's dot emitters (left operand [rows, contracted])
  materialize g transposed, often fused into the elementwise op producing g (the SwiGLU
  gradient, 3x the width of x) as a strided write. Here the narrower of x and g is the one
  transposed. Same products and sums; the result is only laid out differently.
  """
  return lax.dot_general(x, w, ((x_dims, w_dims), ((), ())))


def _weight_dot_fwd(x, w, x_dims, w_dims):
  return _weight_dot(x, w, x_dims, w_dims), (x, w)


def _weight_dot_bwd(x_dims, w_dims, res, g):
  x, w = res
  tokens = tuple(range(x.ndim - len(x_dims)))
  w_free = tuple(d for d in range(w.ndim) if d not in w_dims)
  d_x = lax.dot_general(g, w, ((tuple(range(len(tokens), g.ndim)), w_free), ((), ())))
  if math.prod(x.shape[len(tokens):]) <= math.prod(g.shape[len(tokens):]):
    d_w, order = lax.dot_general(x, g, ((tokens, tokens), ((), ()))), tuple(w_dims) + w_free
  else:
    d_w, order = lax.dot_general(g, x, ((tokens, tokens), ((), ()))), w_free + tuple(w_dims)
  d_w = lax.transpose(d_w, tuple(order.index(i) for i in range(w.ndim)))
  return d_x.astype(x.dtype), d_w.astype(w.dtype)


_weight_dot.defvjp(_weight_dot_fwd, _weight_dot_bwd)

# Name of every `dot` output, so remat policies can save them (`models.transformer`): a custom
# gradient hides the dot_general inside from `jax.checkpoint_policies.checkpoint_dots`.
WEIGHT_DOT = 'weight_dot'


def expert_dot(x_ExMxI: jax.Array, w_ExIxO, dtype) -> jax.Array:
  """Each expert's rows times its own weight: [E, M, I] x [E, I, O] -> [E, M, O]."""
  rule = seam.rule_for(w_ExIxO)
  if rule is not None and rule.expert_dot is not None:
    return rule.expert_dot(x_ExMxI, w_ExIxO, dtype)
  return lax.dot_general(x_ExMxI.astype(dtype), seam.dense(w_ExIxO, dtype),
                         (((2,), (1,)), ((0,), (0,))))


def ragged_dot(x_MxI: jax.Array, w_ExIxO, group_sizes_E: jax.Array, dtype,
               rows_M=None) -> jax.Array:
  """Rows sorted by expert times their expert's weight: rows [sum(sizes[:e]), sum(sizes[:e+1]))
  use expert e; rows past sum(sizes) come out as zeros. `rows_M` (optional) is the token each
  row came from, for rules that observe inputs (calibration)."""
  rule = seam.rule_for(w_ExIxO)
  if rule is not None and rule.ragged_dot is not None:
    return rule.ragged_dot(x_MxI, w_ExIxO, group_sizes_E, dtype, rows_M)
  return lax.ragged_dot(x_MxI.astype(dtype), seam.dense(w_ExIxO, dtype), group_sizes_E)


def take(w_VxD, ids: jax.Array, dtype) -> jax.Array:
  """Rows `ids` of a table (an embedding lookup: the one-hot product ids x table)."""
  rule = seam.rule_for(w_VxD)
  if rule is not None and rule.take is not None:
    return rule.take(w_VxD, ids, dtype)
  w = w_VxD if rule is None else rule.dense(w_VxD, dtype)
  return jnp.take(jnp.asarray(w), ids, axis=0).astype(dtype)


def weight(module: nn.Module, name: str, init, shape, names, dtype):
  """The weight `name` of `module`: created with `init` and logical `names` at init time, else
  whatever leaf the parameter tree holds, provided its dense shape is `shape`.

  (flax's own `param` compares the shapes of the leaf's children with `shape`, which a leaf of
  values and scales, or of two factors, does not pass.)
  """
  if module.has_variable('params', name):
    w = module.get_variable('params', name)
    if isinstance(w, nn.meta.AxisMetadata):
      w = w.unbox()
    if tuple(w.shape) != tuple(shape):
      raise ValueError(f'{"/".join(module.path + (name,))} has shape {tuple(w.shape)}; the model '
                       f'config makes it {tuple(shape)}')
    return w
  return module.param(name, partitioned(init, names), tuple(shape), dtype)


def _lead(v: jax.Array, ndim: int) -> jax.Array:
  """Adds leading unit dims so `v` broadcasts explicitly (tests run with rank promotion off)."""
  return v.reshape((1,) * (ndim - v.ndim) + v.shape)


def partitioned(init, names):
  return nn.with_logical_partitioning(init, tuple(names))


class Linear(nn.Module):
  """y = x·W (+ b) with multi-dimensional input/output features and logical axis names."""
  in_features: Sequence[int]
  out_features: Sequence[int]
  in_axes: Sequence[str]
  out_axes: Sequence[str]
  use_bias: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  init_std: float = 0.02

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    shape = tuple(self.in_features) + tuple(self.out_features)
    kernel = weight(self, 'kernel', nn.initializers.normal(self.init_std), shape,
                    tuple(self.in_axes) + tuple(self.out_axes), self.param_dtype)
    y = dot(x, kernel, len(self.in_features), self.dtype)
    if self.use_bias:
      bias = self.param('bias', partitioned(nn.initializers.zeros, self.out_axes),
                        tuple(self.out_features), self.param_dtype)
      y = y + _lead(jnp.asarray(bias).astype(self.dtype), y.ndim)
    return y


class Embed(nn.Module):
  """Token (or position) embedding table; `attend` is the tied output head."""
  num: int
  features: int
  row_axis: str = axes.VOCAB
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  init_std: float = 0.02

  def setup(self):
    self.embedding = weight(self, 'embedding', nn.initializers.normal(self.init_std),
                            (self.num, self.features), (self.row_axis, axes.EMBED),
                            self.param_dtype)

  def __call__(self, ids: jax.Array) -> jax.Array:
    return take(self.embedding, ids, self.dtype)

  def attend(self, x: jax.Array) -> jax.Array:
    return dot(x, self.embedding, 1, self.dtype, transpose_w=True)


class Norm(nn.Module):
  """RMSNorm (scale only) or LayerNorm (scale and bias), computed in float32."""
  kind: str = 'rmsnorm'
  eps: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = x.shape[-1]
    x32 = x.astype(jnp.float32)
    if self.kind == 'layernorm':
      x32 = x32 - jnp.mean(x32, axis=-1, keepdims=True)
    scale = self.param('scale', partitioned(nn.initializers.ones, (axes.EMBED,)), (d,),
                       self.param_dtype)
    y = rms_scale(x32, jnp.asarray(scale).astype(jnp.float32), self.eps)
    if self.kind == 'layernorm':
      bias = self.param('bias', partitioned(nn.initializers.zeros, (axes.EMBED,)), (d,),
                        self.param_dtype)
      y = y + _lead(jnp.asarray(bias).astype(jnp.float32), y.ndim)
    return y.astype(self.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def rms_scale(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  """x / rms(x) * scale over the last axis, with a hand-written gradient.

  Autodiff would keep the scale broadcast to the activations' shape for the backward pass, a
  full-size array XLA writes and reads once per norm; this gradient needs only the input and
  one inverse rms per token.
  """
  return _rms_scale_fwd(x, scale, eps)[0]


def _rms_scale_fwd(x, scale, eps):
  r = lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)
  return x * r * _lead(scale, x.ndim), (x, r, scale)


def _rms_scale_bwd(eps, res, g):
  x, r, scale = res
  x_hat = x * r
  g_scaled = g * _lead(scale, x.ndim)
  d_scale = jnp.sum(g * x_hat, axis=tuple(range(x.ndim - 1)))
  d_x = r * (g_scaled - x_hat * jnp.mean(g_scaled * x_hat, axis=-1, keepdims=True))
  return d_x, d_scale


rms_scale.defvjp(_rms_scale_fwd, _rms_scale_bwd)


ACTIVATION_FNS = {
    'silu': nn.silu,
    'gelu_tanh': lambda x: nn.gelu(x, approximate=True),
    'gelu': lambda x: nn.gelu(x, approximate=False),
}


class Mlp(nn.Module):
  """Gated (SwiGLU: down(act(gate·x) * up·x)) or plain two-layer (down(act(up·x))) MLP."""
  config: ModelConfig
  out_init_std: float = 0.02

  @nn.compact
  def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
    cfg = self.config
    dense = lambda name, fin, fout, ain, aout, std: Linear(
        (fin,), (fout,), (ain,), (aout,), use_bias=cfg.mlp_bias, dtype=jnp.dtype(cfg.dtype),
        param_dtype=jnp.dtype(cfg.param_dtype), init_std=std, name=name)
    act = ACTIVATION_FNS[cfg.activation]
    up_BxLxF = dense('up', cfg.d_model, cfg.d_ff, axes.EMBED, axes.MLP, cfg.init_std)(x_BxLxD)
    if cfg.mlp == 'swiglu':
      gate_BxLxF = dense('gate', cfg.d_model, cfg.d_ff, axes.EMBED, axes.MLP, cfg.init_std)(x_BxLxD)
      h_BxLxF = act(gate_BxLxF) * up_BxLxF
    else:
      h_BxLxF = act(up_BxLxF)
    h_BxLxF = nn.with_logical_constraint(h_BxLxF, (axes.BATCH, axes.LENGTH, axes.MLP))
    return dense('down', cfg.d_ff, cfg.d_model, axes.MLP, axes.EMBED, self.out_init_std)(h_BxLxF)
