"""GPTQ on one weight matrix: rounding to the integer grid with inverse-Hessian error feedback.

GPTQ (Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", Algorithm 1). A kernel is seen as [in, out] (y = x @ w) and its
calibration inputs through H = X^T X [in, in], as in `compression.sparsegpt`, whose
inverse-Hessian factor this shares. Inputs are visited in order, in blocks: each input's row is
rounded to the grid (`compression.grid`), its error divided by U_ii is pushed onto the block's
later inputs through row i of U (H^-1 = U^T U), and the block's errors reach all later inputs in
one matmul (lazy batch updates). Each output column is its own least-squares problem; what
couples them is only a shared grid.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax

from compression import grid
from compression.sparsegpt import inverse_hessian_factor

_HIGHEST = lax.Precision.HIGHEST


@functools.partial(jax.jit, static_argnames=('bits', 'group_size', 'symmetric', 'act_order',
                                             'block_size', 'dampening'))
def gptq(kernel_IxO, hessian_IxI, bits: int, group_size: int = grid.PER_CHANNEL,
         symmetric: bool = True, act_order: bool = False, block_size: int = 128,
         dampening: float = 0.01, clip=None):
  """GPTQ on one kernel: returns (q [in, out] int8 on the grid, scale [G, O], zero [G, O]).

  w ~ (q - zero) * scale (`dequantize`) is the GPTQ weight. group_size is the grid's: 0 one
  group per output channel, -1 per tensor, k > 0 groups of k consecutive inputs (G = in / k).
  Per channel and per tensor, the grid is fitted to the whole kernel before the visit. Groups
  (k > 0) are fitted when the visit reaches their first input, from their current weights, which
  hold every update from the inputs visited before. (The paper's code reads them as of the start
  of their block: the same when groups start blocks, as with its default 128 and 128.) Blocks are
  rounded to whole groups (a multiple of k, at least k) so that a group never spans two blocks;
  the result does not depend on the block size.

  act_order visits the inputs in order of decreasing diag(H). Groups then stay contiguous runs of
  the original input order (what the storage needs), so their grids can no longer be fitted as
  the visit reaches them: every group's grid is fitted up front from the original weights
  ("static groups") and each input is rounded on its own group's grid wherever it is visited.

  Inputs never seen (zero diagonal of H) are set to 0 and round to the grid's 0. `clip`: None, a
  scalar, or [G, O] factors for `grid.fit` (e.g. from `grid.search_clip`). H is dampened by
  `dampening` times its mean diagonal (`sparsegpt.inverse_hessian_factor`).
  """
  n_in, n_out = _check(kernel_IxO, hessian_IxI, bits, group_size, block_size)
  n_groups = grid.n_groups(n_in, group_size)
  clip_GxO = _clip(clip, n_groups, n_out)
  h = hessian_IxI.astype(jnp.float32)
  w = jnp.where((jnp.diag(h) == 0)[:, None], 0.0, kernel_IxO.astype(jnp.float32))
  group_I = jnp.arange(n_in) // group_size if group_size > 0 else jnp.zeros(n_in, jnp.int32)
  refit = group_size if group_size > 0 and not act_order else 0
  if refit:
    block_size = max(block_size // refit, 1) * refit
    scale_GxO = zero_GxO = jnp.ones((n_groups, n_out), jnp.float32)   # placeholders, refitted
  else:
    scale_GxO, zero_GxO = grid.fit(grid.grouped(w, group_size), bits, symmetric, clip_GxO,
                                   per_tensor=group_size == grid.PER_TENSOR)
  if act_order:
    order = jnp.argsort(-jnp.diag(h), stable=True)
    w, h, group_I = w[order], h[order][:, order], group_I[order]
  u, _ = inverse_hessian_factor(h, dampening)

  q_rows, scale_rows, zero_rows = [], [], []
  for start in range(0, n_in, block_size):
    stop = min(start + block_size, n_in)
    rows = group_I[start:stop]
    q, scale, zero, err = _quantize_block(
        w[start:stop], u[start:stop, start:stop], scale_GxO[rows], zero_GxO[rows],
        clip_GxO[rows], bits, symmetric, refit)
    q_rows.append(q)
    scale_rows.append(scale)
    zero_rows.append(zero)
    # Lazy update: the block's errors reach every later input in one matmul.
    w = w.at[stop:].add(-jnp.matmul(u[start:stop, stop:].T, err, precision=_HIGHEST))
  q_IxO = jnp.concatenate(q_rows)
  if act_order:   # back to input order
    q_IxO = jnp.zeros_like(q_IxO).at[order].set(q_IxO)
  if refit:   # visit order is input order here; each group's grid is on its rows
    scale_GxO = jnp.concatenate(scale_rows)[::refit]
    zero_GxO = jnp.concatenate(zero_rows)[::refit]
  return q_IxO.astype(jnp.int8), scale_GxO, zero_GxO


def _quantize_block(w_BxO, u_BxB, scale_BxO, zero_BxO, clip_BxO, bits, symmetric, refit):
  """Visits the block's inputs in order: round each on its row's grid, spread the error over the
  later inputs. With `refit` = k, the grid of each group of k rows is fitted at its first row."""
  size = w_BxO.shape[0]
  diag = jnp.diag(u_BxB)

  def fit_group(i, w, scale, zero):
    group = lax.dynamic_slice_in_dim(w, i, refit, axis=0)
    s, z = grid.fit(group[None], bits, symmetric, clip_BxO[i][None])
    scale = lax.dynamic_update_slice_in_dim(scale, jnp.broadcast_to(s, group.shape), i, axis=0)
    zero = lax.dynamic_update_slice_in_dim(zero, jnp.broadcast_to(z, group.shape), i, axis=0)
    return scale, zero

  def visit(i, carry):
    w, q, scale, zero, err = carry
    if refit:
      scale, zero = lax.cond(i % refit == 0, fit_group, lambda i, w, s, z: (s, z),
                             i, w, scale, zero)
    row = w[i]
    q_row = grid.quantize(row, scale[i], zero[i], bits)
    e = (row - grid.dequantize(q_row, scale[i], zero[i])) / diag[i]
    # U is upper triangular: this touches inputs i.. only, and sets input i to its grid value.
    w = w - jnp.outer(u_BxB[i], e)
    return w, q.at[i].set(q_row), scale, zero, err.at[i].set(e)

  carry = (w_BxO, jnp.zeros(w_BxO.shape, jnp.int32), scale_BxO, zero_BxO, jnp.zeros_like(w_BxO))
  _, q, scale, zero, err = lax.fori_loop(0, size, visit, carry)
  return q, scale, zero, err


def dequantize(q_IxO, scale_GxO, zero_GxO):
  """The float [in, out] weight of integers and their per-group grid: (q - zero) * scale."""
  n_groups = scale_GxO.shape[0]
  q = q_IxO.reshape(n_groups, -1, q_IxO.shape[1])
  return grid.dequantize(q, scale_GxO[:, None], zero_GxO[:, None]).reshape(q_IxO.shape)


def _check(kernel_IxO, hessian_IxI, bits, group_size, block_size):
  if kernel_IxO.ndim != 2:
    raise ValueError(f'GPTQ takes one [in, out] kernel, got shape {tuple(kernel_IxO.shape)}')
  n_in, n_out = kernel_IxO.shape
  if hessian_IxI.shape != (n_in, n_in):
    raise ValueError(f'hessian shape {tuple(hessian_IxI.shape)} does not match the kernel\'s '
                     f'{n_in} inputs: want ({n_in}, {n_in})')
  grid.check(bits, group_size, n_in, 'the kernel')
  if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
    raise ValueError(f'block_size={block_size!r} must be a positive integer')
  return n_in, n_out


def _clip(clip, n_groups, n_out):
  """Clip factors as [G, O] (1 where none are given)."""
  if clip is None:
    return jnp.ones((n_groups, n_out), jnp.float32)
  clip = jnp.asarray(clip, jnp.float32)
  if clip.shape not in ((), (n_groups, n_out)):
    raise ValueError(f'clip shape {tuple(clip.shape)} must be () or (groups, outputs) = '
                     f'({n_groups}, {n_out})')
  return jnp.broadcast_to(clip, (n_groups, n_out))
