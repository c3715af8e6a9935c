"""Integer grids: the scales and zero points that map float weights to `bits`-bit integers.

Every quantizer in `compression/` shares this one grid. Integers are signed, in
[-2^(bits-1), 2^(bits-1) - 1], so any width up to 8 fits int8 (`compression.qtensor` packs 2
bits four per byte and 3 or 4 bits two per byte):
  symmetric   w ~ q * scale,            scale = absmax / (2^(bits-1) - 1), no zero point;
  asymmetric  w ~ (q - zero) * scale,   scale = (max - min) / (2^bits - 1), min -> the lowest
              integer; the range always holds 0, so zero is an integer inside the grid.
A group is a run of `group_size` consecutive inputs (rows of the [in, out] matrix) sharing one
scale per output; group_size 0 means one group over all inputs (per output channel), and -1 one
scale for the whole matrix (per tensor). `clip` < 1 shrinks the range before rounding
(clipping outliers for a finer step; `search_clip` picks it per group and output).
"""

from typing import Optional, Tuple

import jax.numpy as jnp

BITS = (2, 3, 4, 8)
PER_CHANNEL, PER_TENSOR = 0, -1


def check(bits: int, group_size: int, n_in: Optional[int] = None, where: str = 'a weight'):
  """One-line ValueErrors for bit widths outside BITS and groups that do not divide the inputs."""
  if isinstance(bits, bool) or bits not in BITS:
    raise ValueError(f'bits={bits!r} is not one of {", ".join(map(str, BITS))}')
  if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < -1:
    raise ValueError(f'group_size={group_size!r} must be a positive integer, 0 (per output '
                     f'channel) or -1 (per tensor)')
  if n_in is not None and group_size > 0 and n_in % group_size:
    raise ValueError(f'group_size={group_size} does not divide the {n_in} inputs of {where}')


def qrange(bits: int) -> Tuple[int, int]:
  """The signed integers of a `bits`-bit grid: (-2^(bits-1), 2^(bits-1) - 1)."""
  return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def n_groups(n_in: int, group_size: int) -> int:
  return n_in // group_size if group_size > 0 else 1


def grouped(w_IxO, group_size: int):
  """[in, out] -> [groups, group_size, out] (per tensor: one group whose scale is shared)."""
  n_in = w_IxO.shape[0]
  return w_IxO.reshape(n_groups(n_in, group_size), -1, w_IxO.shape[1])


def fit(w_GxKxO, bits: int, symmetric: bool, clip=1.0, per_tensor: bool = False):
  """(scale [G, O], zero [G, O]) of each group of `w` (reduced over K; over K and O per tensor).

  zero is integer-valued (float dtype), 0 when symmetric. Scales are never 0: an all-zero group
  gets scale 1 (its integers are 0 anyway).
  """
  w = w_GxKxO.astype(jnp.float32)
  axes = (1, 2) if per_tensor else (1,)
  lo, hi = qrange(bits)
  if symmetric:
    absmax = jnp.max(jnp.abs(w), axis=axes, keepdims=True)[:, 0] * clip
    scale = absmax / hi
    zero = jnp.zeros_like(scale)
  else:
    w_min = jnp.minimum(jnp.min(w, axis=axes, keepdims=True)[:, 0], 0.0) * clip
    w_max = jnp.maximum(jnp.max(w, axis=axes, keepdims=True)[:, 0], 0.0) * clip
    scale = (w_max - w_min) / (hi - lo)
    zero = jnp.clip(lo - jnp.round(w_min / jnp.where(scale > 0, scale, 1.0)), lo, hi)
  scale = jnp.where(scale > 0, scale, 1.0)
  shape = (w.shape[0], w.shape[2])
  return jnp.broadcast_to(scale, shape), jnp.broadcast_to(zero, shape)


def quantize(w, scale, zero, bits: int):
  """Integers (int32) of `w` on the grid: clip(round(w / scale) + zero); shapes broadcast."""
  lo, hi = qrange(bits)
  return jnp.clip(jnp.round(w.astype(jnp.float32) / scale) + zero, lo, hi).astype(jnp.int32)


def dequantize(q, scale, zero):
  return (q.astype(jnp.float32) - zero) * scale


def fake_quant(w_IxO, bits: int, group_size: int, symmetric: bool, clip=1.0):
  """w rounded to its grid and back (float), with the grid fitted to `w` itself."""
  g = grouped(w_IxO, group_size)
  scale, zero = fit(g, bits, symmetric, clip, per_tensor=group_size == PER_TENSOR)
  q = quantize(g, scale[:, None], zero[:, None], bits)
  return dequantize(q, scale[:, None], zero[:, None]).reshape(w_IxO.shape)


CLIP_GRID = tuple(1.0 - 0.05 * i for i in range(10))   # 1.0 ... 0.55


def search_clip(w_IxO, bits: int, group_size: int, symmetric: bool, gram_IxI=None):
  """Per group and output, the clip factor in CLIP_GRID of least error: squared weight error,
  or with `gram_IxI` (X^T X of calibration inputs) the output error of the group's columns
  through its own diagonal block sum_k,l dw_k H_kl dw_l. Returns clip [G, O]."""
  g = grouped(w_IxO, group_size).astype(jnp.float32)
  per_tensor = group_size == PER_TENSOR
  if gram_IxI is not None:
    k = g.shape[1]
    h = gram_IxI.reshape(g.shape[0], k, g.shape[0], k)
    blocks = jnp.einsum('gkgl->gkl', h)   # each group's diagonal block [G, K, K]
  errors = []
  for c in CLIP_GRID:
    scale, zero = fit(g, bits, symmetric, c, per_tensor)
    d = dequantize(quantize(g, scale[:, None], zero[:, None], bits), scale[:, None],
                   zero[:, None]) - g
    if gram_IxI is None:
      err = jnp.sum(jnp.square(d), axis=1)
    else:
      err = jnp.einsum('gko,gkl,glo->go', d, blocks, d)
    errors.append(jnp.sum(err, keepdims=True) * jnp.ones_like(err) if per_tensor else err)
  best = jnp.argmin(jnp.stack(errors), axis=0)
  return jnp.asarray(CLIP_GRID, jnp.float32)[best]
