"""Building blocks. `dot` is the compression seam: every weight matmul in the model goes through it.

The seam. Modules fetch a weight with `self.param(...)` and multiply through `dot(x, w, ...)`.
Flax returns whatever leaf the caller's parameter tree holds, so a compression transform can
replace a kernel with another leaf type (integer values with scales, a kernel with its mask) and
teach `dot` to execute it, e.g. as an integer `lax.dot_general`, without touching model code.
Plain arrays are the only leaf type handled here.
"""

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from models import axes
from models.config import ModelConfig

Dtype = jnp.dtype


def dot(x: jax.Array, w, n_contract: int, dtype, transpose_w: bool = False) -> jax.Array:
  """Contracts the last `n_contract` dims of `x` with the leading dims of weight `w`.

  With `transpose_w`, the trailing dims of `w` are contracted instead (the tied output head
  multiplies by the embedding table [vocab, embed] this way).
  """
  x_dims = tuple(range(x.ndim - n_contract, x.ndim))
  if transpose_w:
    w_dims = tuple(range(w.ndim - n_contract, w.ndim))
  else:
    w_dims = tuple(range(n_contract))
  return lax.dot_general(x.astype(dtype), jnp.asarray(w).astype(dtype),
                         ((x_dims, w_dims), ((), ())))


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
    kernel = self.param('kernel', partitioned(nn.initializers.normal(self.init_std),
                                              tuple(self.in_axes) + tuple(self.out_axes)),
                        shape, self.param_dtype)
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
    self.embedding = self.param(
        'embedding', partitioned(nn.initializers.normal(self.init_std), (self.row_axis, axes.EMBED)),
        (self.num, self.features), self.param_dtype)

  def __call__(self, ids: jax.Array) -> jax.Array:
    return jnp.take(jnp.asarray(self.embedding), ids, axis=0).astype(self.dtype)

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
    y = x32 * lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    scale = self.param('scale', partitioned(nn.initializers.ones, (axes.EMBED,)), (d,),
                       self.param_dtype)
    y = y * _lead(jnp.asarray(scale).astype(jnp.float32), y.ndim)
    if self.kind == 'layernorm':
      bias = self.param('bias', partitioned(nn.initializers.zeros, (axes.EMBED,)), (d,),
                        self.param_dtype)
      y = y + _lead(jnp.asarray(bias).astype(jnp.float32), y.ndim)
    return y.astype(self.dtype)


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
  def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
    cfg = self.config
    dense = lambda name, fin, fout, ain, aout, std: Linear(
        (fin,), (fout,), (ain,), (aout,), use_bias=cfg.mlp_bias, dtype=jnp.dtype(cfg.dtype),
        param_dtype=jnp.dtype(cfg.param_dtype), init_std=std, name=name)
    act = ACTIVATION_FNS[cfg.activation]
    up_BxTxF = dense('up', cfg.d_model, cfg.d_ff, axes.EMBED, axes.MLP, cfg.init_std)(x_BxTxD)
    if cfg.mlp == 'swiglu':
      gate_BxTxF = dense('gate', cfg.d_model, cfg.d_ff, axes.EMBED, axes.MLP, cfg.init_std)(x_BxTxD)
      h_BxTxF = act(gate_BxTxF) * up_BxTxF
    else:
      h_BxTxF = act(up_BxTxF)
    h_BxTxF = nn.with_logical_constraint(h_BxTxF, (axes.BATCH, axes.LENGTH, axes.MLP))
    return dense('down', cfg.d_ff, cfg.d_model, axes.MLP, axes.EMBED, self.out_init_std)(h_BxTxF)
