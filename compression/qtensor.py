"""Quantized weights as parameter leaves, and how they execute at the model's seam.

A `QTensor` stands for a kernel [stack..., in..., out...] (`models.layouts`) as integers on a
`compression.grid` grid: `values` int8 [stack..., out..., in...] (inputs minor, the layout
XLA-CPU's integer dots read fastest: 1.6x faster than [in, out] for decode-sized products), or
packed (uint8, the last input dim split: 3- and 4-bit integers two per byte, its first half in the low nibbles and its second
half in the high ones; 2-bit integers four per byte likewise), so unpacking is shifts and a
concatenate, no interleave; `scale` (and, asymmetric, `zero`) per group of consecutive inputs
and per output [stack..., groups, out...]. Every child carries logical axis names (the kernel's;
the groups axis is replicated), so a quantized tree shards like the float one and Orbax saves it
as integers.

Execution (`seam.register` below) depends on the backend, because the fast form differs:
  accelerator  weight-only: the integers dequantized into the dot's operand (XLA fuses it);
               int8 activations (W8A8, W4A8...): s8 x s8 -> s32 `dot_general`s (one per
               group), then rescaled.
  cpu          XLA-CPU converts int8 -> float at ~1 element/ns and runs mixed or low-precision
               dots 10-15x slower than float ones, but its s8 x s8 -> s32 matrix products are
               as fast as float ones once there are 2+ rows. So weight-only layers split each
               activation row into two int8 limbs (x ~ s (hi + lo / 254), 15-bit precision) and
               run one integer dot; W8A8 pads a single row to two.
Above `_LIMB_ROWS` rows (prefill, training) the CPU dequantizes the weight once per call
instead: its cost is the weight's size, which that many rows amortise.
"""

import contextlib
import dataclasses
import math
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
from jax import lax

from compression import grid
from models import seam
from models.layouts import Layout

ACTIVATIONS = ('none', 'dynamic', 'static')   # weight-only; int8 per-token or calibrated scales


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QTensor(seam.Leaf):
  """Integers with scales standing for a float kernel (see the module docstring)."""
  values: jax.Array                   # int8 [stack..., out..., in...] (uint8: last dim packed)
  scale: jax.Array                    # float32 [stack..., groups, out...]
  zero: Optional[jax.Array]           # int8 like scale (asymmetric grids), or None
  act_scale: Optional[jax.Array]      # float32 [] static W8A8 activation scale, or None
  names: Tuple = dataclasses.field(metadata=dict(static=True))   # the kernel's logical names
  inputs: int = dataclasses.field(metadata=dict(static=True))
  outputs: int = dataclasses.field(metadata=dict(static=True))
  bits: int = dataclasses.field(metadata=dict(static=True))
  group_size: int = dataclasses.field(metadata=dict(static=True))   # grid.py's convention
  dtype: str = dataclasses.field(metadata=dict(static=True))        # the float kernel's dtype
  act: str = dataclasses.field(default='none', metadata=dict(static=True))

  @property
  def per_byte(self) -> int:
    return per_byte(self.bits) if self.values.dtype == jnp.uint8 else 1

  @property
  def stack(self) -> int:   # under nn.scan the layer slice has one stack dim fewer
    return self.values.ndim - self.inputs - self.outputs

  @property
  def shape(self):
    v = self.values.shape
    outs, ins = v[self.stack:self.stack + self.outputs], v[self.stack + self.outputs:]
    return v[:self.stack] + ins[:-1] + (ins[-1] * self.per_byte,) + outs

  def logical_axes(self):
    matrix = self.names[len(self.names) - self.inputs - self.outputs:]
    stack = self.names[:len(self.names) - len(matrix)]
    ins, outs = matrix[:self.inputs], matrix[self.inputs:]
    grouped = stack + (None,) + outs
    return dataclasses.replace(self, values=stack + outs + ins, scale=grouped,
                               zero=None if self.zero is None else grouped,
                               act_scale=None if self.act_scale is None else ())

  def nbytes(self) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(self))


# ---- building and undoing

def per_byte(bits: int) -> int:
  """Integers stored per byte: 4 of 2 bits, 2 of 3 or 4 bits (in nibbles), 1 of 8 bits."""
  return 4 if bits <= 2 else 2 if bits <= 4 else 1


def pack(q, axis: int, n: int):
  """int8 values of 8 // n bits -> uint8: `axis` split in n parts, part j in the j-th 8 // n
  bits."""
  width = 8 // n
  parts = jnp.split(q.astype(jnp.uint8), n, axis=axis)
  out = parts[0] & ((1 << width) - 1)
  for j, part in enumerate(parts[1:], 1):
    out = out | ((part & ((1 << width) - 1)) << (width * j))
  return out


def unpack(p, axis: int, n: int):
  """The inverse of `pack`: int8 values (sign-extended), `axis` n times longer."""
  width = 8 // n
  s = p.astype(jnp.int8)
  parts = [lax.shift_right_arithmetic(lax.shift_left(s, jnp.int8(8 - width * (j + 1))),
                                      jnp.int8(8 - width)) for j in range(n)]
  return jnp.concatenate(parts, axis=axis)


def from_codes(q_SxIxO, scale_SxGxO, zero_SxGxO, layout: Layout, shape, *, bits: int,
               group_size: int, dtype, act: str = 'none', act_scale=None) -> QTensor:
  """A QTensor from integers and grids of the kernel's matrices (`compression.paths.as_matrices`
  view); `shape` is the kernel's."""
  stack, inputs = shape[:layout.stack], shape[layout.stack:layout.stack + layout.inputs]
  outputs = shape[layout.stack + layout.inputs:]
  s, i = layout.stack, layout.inputs
  values = q_SxIxO.astype(jnp.int8).reshape(shape)
  values = values.transpose(tuple(range(s)) + tuple(range(s + i, len(shape)))
                            + tuple(range(s, s + i)))   # [stack..., out..., in...]
  n = per_byte(bits)
  if n > 1:
    if inputs[-1] % n:
      raise ValueError(f'{bits}-bit packing splits the last input dim in {n}; it has '
                       f'{inputs[-1]} entries')
    values = pack(values, len(shape) - 1, n)
  g = scale_SxGxO.shape[1]
  scale = scale_SxGxO.astype(jnp.float32).reshape(stack + (g,) + outputs)
  zero = None if zero_SxGxO is None else zero_SxGxO.astype(jnp.int8).reshape(scale.shape)
  return QTensor(values, scale, zero, act_scale, tuple(layout.names), layout.inputs,
                 len(outputs), bits, group_size, jnp.dtype(dtype).name, act)


def quantize(w, layout: Layout, bits: int, group_size: int = 0, symmetric: bool = True,
             clip=1.0, act: str = 'none') -> QTensor:
  """Round-to-nearest: each matrix of the stack on its own grid (`clip`: [S, G, O] or scalar)."""
  mats = w.reshape(layout.matrix_shape(w.shape)).astype(jnp.float32)
  grid.check(bits, group_size, mats.shape[1])
  g = jax.vmap(lambda m: grid.grouped(m, group_size))(mats)   # [S, G, K, O]
  clip = jnp.broadcast_to(jnp.asarray(clip, jnp.float32), (g.shape[0], g.shape[1], g.shape[3]))
  scale, zero = jax.vmap(lambda m, c: grid.fit(m, bits, symmetric, c,
                                               group_size == grid.PER_TENSOR))(g, clip)
  q = grid.quantize(g, scale[:, :, None], zero[:, :, None], bits).reshape(mats.shape)
  return from_codes(q, scale, None if symmetric else zero, layout, w.shape, bits=bits,
                    group_size=group_size, dtype=w.dtype, act=act)


def codes(t: QTensor):
  """(integers [S, O, I] int8 (as stored: inputs minor), scale [S, G, O], zero [S, G, O] float)
  of the matrices."""
  v = unpack(t.values, t.values.ndim - 1, t.per_byte) if t.per_byte > 1 else t.values
  s_shape, o_shape = v.shape[:t.stack], v.shape[t.stack:t.stack + t.outputs]
  q = v.reshape((math.prod(s_shape), math.prod(o_shape), -1))
  scale = t.scale.reshape((q.shape[0], -1, q.shape[1]))
  zero = (jnp.zeros_like(scale) if t.zero is None else
          t.zero.astype(jnp.float32).reshape(scale.shape))
  return q, scale, zero


def dequantize(t: QTensor, dtype=None) -> jax.Array:
  """The float kernel the integers stand for."""
  q, scale, zero = codes(t)
  s, o, n_in = q.shape
  g = scale.shape[1]
  q_SxGxKxO = q.reshape(s, o, g, n_in // g).transpose(0, 2, 3, 1)
  w = grid.dequantize(q_SxGxKxO, scale[:, :, None], zero[:, :, None])
  return w.reshape(t.shape).astype(dtype or t.dtype)


# ---- execution

_FORCED = []


@contextlib.contextmanager
def execution(kind: str):
  """Forces the 'cpu' or 'accelerator' formulation inside (tests compare the two)."""
  if kind not in ('cpu', 'accelerator'):
    raise ValueError(f'execution {kind!r} is not one of cpu, accelerator')
  _FORCED.append(kind)
  try:
    yield
  finally:
    _FORCED.pop()


def _backend() -> str:
  if _FORCED:
    return _FORCED[-1]
  return 'cpu' if jax.default_backend() == 'cpu' else 'accelerator'


# Up to this many rows (decoding), the CPU runs weight-only layers as integer dots; above it
# (prefill, training) the weight is dequantized once per call, a cost the rows amortise.
_LIMB_ROWS = 32


def _row_scale(x_MxI, limit: float = 127.0):
  s = jnp.max(jnp.abs(x_MxI), axis=1, keepdims=True) / limit
  return jnp.where(s > 0, s, 1.0)


def integer_dot(a_MxI, q_OxI, n_groups: int, backend: str = 'accelerator'):
  """Exact integer products of each group of inputs: int8 [M, I] x int8 [O, I] -> int32
  [G, M, O] (s8 x s8 -> s32 `dot_general`s).

  On the CPU each group is its own 2-D product of the group's columns of `a` and `q`: XLA-CPU's
  batched integer dots with few rows run an order of magnitude slower than plain ones, and G
  plain products of K inputs cost 2.5-5x less than one product of a block-diagonal expansion
  of `a` ([G * M, I], G times the work) at decode shapes (1024 x 4096 and 4096 x 1024, g128).
  """
  m, n_in = a_MxI.shape
  g, k = n_groups, n_in // n_groups
  dims = (((1,), (1,)), ((), ()))
  if g == 1:
    return lax.dot_general(a_MxI, q_OxI, dims, preferred_element_type=jnp.int32)[None]
  if backend == 'cpu':
    return jnp.stack([lax.dot_general(a_MxI[:, j * k:(j + 1) * k], q_OxI[:, j * k:(j + 1) * k],
                                      dims, preferred_element_type=jnp.int32)
                      for j in range(g)])
  return lax.dot_general(a_MxI.reshape(m, g, k), q_OxI.reshape(-1, g, k),
                         (((2,), (2,)), ((1,), (1,))), preferred_element_type=jnp.int32)


def _scaled(acc_GxMxO, scale_GxO):
  return jnp.sum(acc_GxMxO.astype(jnp.float32) * scale_GxO[:, None, :], axis=0)


def _zero_share(x_MxI, zero_GxO, scale_GxO):
  """What the zero points subtract: sum over groups of (x's sum over the group) * zero * scale."""
  m, g = x_MxI.shape[0], zero_GxO.shape[0]
  sums_MxG = jnp.sum(x_MxI.reshape(m, g, -1), axis=2)
  return jnp.matmul(sums_MxG, zero_GxO * scale_GxO, precision=lax.Precision.HIGHEST)


def matmul(x_MxI, t: QTensor, q_OxI, scale_GxO, zero_GxO, backend: str):
  """x [M, I] times one quantized matrix, in the formulation fastest on `backend`."""
  x = x_MxI.astype(jnp.float32)
  m = x.shape[0]
  g, o = scale_GxO.shape
  if t.act != 'none':   # W8A8 / W4A8: integer activations times integer weights
    s = _row_scale(x) if t.act == 'dynamic' else jnp.broadcast_to(t.act_scale, (m, 1))
    a = jnp.clip(jnp.round(x / s), -127, 127).astype(jnp.int8)
    if backend == 'cpu' and m == 1:   # XLA-CPU's s8 matrix-vector product is 10x slower
      a = jnp.concatenate([a, a])
    y = _scaled(integer_dot(a, q_OxI, g, backend)[:, :m], scale_GxO) * s
    x = a[:m].astype(jnp.float32) * s   # the zero points meet the activations as rounded
  elif backend == 'accelerator' or m > _LIMB_ROWS:
    w_OxGxK = q_OxI.reshape(o, g, -1).astype(jnp.float32) * scale_GxO.T[:, :, None]
    y = lax.dot_general(x, w_OxGxK.reshape(o, -1), (((1,), (1,)), ((), ())))
  else:   # two int8 limbs per row: x = s * hi + (s / 254) * lo, |lo| <= 127
    s = _row_scale(x)
    hi = jnp.round(x / s)
    lo = jnp.round((x - hi * s) * (254.0 / s))
    a = jnp.concatenate([hi, lo]).astype(jnp.int8)
    both = _scaled(integer_dot(a, q_OxI, g, backend), scale_GxO)
    y = both[:m] * s + both[m:] * (s / 254.0)
  if t.zero is not None:
    y = y - _zero_share(x, zero_GxO, scale_GxO)
  return y


def _dot(x, t: QTensor, x_dims, w_dims, dtype):
  if t.stack or tuple(w_dims) != tuple(range(t.inputs)):   # e.g. a table used as tied head
    return lax.dot_general(x.astype(dtype), dequantize(t, dtype), ((x_dims, w_dims), ((), ())))
  q, scale, zero = codes(t)
  lead = x.shape[:x.ndim - len(x_dims)]
  x_MxI = x.reshape((math.prod(lead), q.shape[2]))
  y = matmul(x_MxI, t, q[0], scale[0], zero[0], _backend())
  return y.reshape(lead + t.shape[t.inputs:]).astype(dtype)


def _expert_dot(x_ExMxI, t: QTensor, dtype):
  q, scale, zero = codes(t)
  backend = _backend()
  y = jax.vmap(lambda x, qe, se, ze: matmul(x, t, qe, se, ze, backend))(x_ExMxI, q, scale, zero)
  return y.astype(dtype)


seam.register(QTensor, seam.Rule(dense=lambda t, dtype: dequantize(t, dtype), dot=_dot,
                                 expert_dot=_expert_dot))
