"""SparseGPT on one weight matrix, and the inverse-Hessian factor it shares with GPTQ.

A kernel is seen as [in, out] (y = x @ w) and its calibration inputs through the Gram matrix
H = X^T X [in, in] (`compression.calibration.input_statistics(..., gram=True)`).

SparseGPT (Frantar & Alistarh, 2023): approximate layer-wise reconstruction. Inputs are visited
in order, in blocks; within a block the mask is chosen from w^2 / [H^-1]_ii^2 (the OBS saliency),
each pruned weight's error is pushed onto the not-yet-visited inputs through the Cholesky factor
of H^-1, and the block's accumulated error updates later blocks in one matmul (lazy updates).
H is dampened by a fraction of its mean diagonal; inputs never seen (zero diagonal) are pruned.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax

from compression import masks

_HIGHEST = lax.Precision.HIGHEST


def inverse_hessian_factor(hessian_IxI, dampening: float):
  """Upper Cholesky factor U of H^-1 (H^-1 = U^T U), after dampening; and the dead inputs."""
  h = hessian_IxI.astype(jnp.float32)
  dead = jnp.diag(h) == 0
  h = h + jnp.diag(dead.astype(jnp.float32))
  h = h + dampening * jnp.mean(jnp.diag(h)) * jnp.eye(h.shape[0], dtype=h.dtype)
  h_inv = jnp.linalg.inv(h)
  h_inv = (h_inv + h_inv.T) / 2   # symmetric to the last bit before the factorisation
  return jnp.linalg.cholesky(h_inv).T, dead


@functools.partial(jax.jit, static_argnames=('sparsity', 'nm', 'block_size', 'dampening'))
def sparsegpt(kernel_IxO, hessian_IxI, sparsity: float, nm=None, block_size: int = 128,
              dampening: float = 0.01):
  """SparseGPT on one kernel: returns (updated kernel with pruned weights exactly 0, keep-mask).

  `hessian_IxI` is X^T X over the calibration tokens (the paper's 2 X^T X differs by a factor
  that the relative dampening and the saliency ratio cancel).
  """
  masks.check_sparsity(sparsity)
  masks.check_nm(nm, kernel_IxO.shape[0], 'the kernel')
  dtype = kernel_IxO.dtype
  u, dead = inverse_hessian_factor(hessian_IxI, dampening)
  w = jnp.where(dead[:, None], 0.0, kernel_IxO.astype(jnp.float32))
  n_in = w.shape[0]
  keep = jnp.ones(w.shape, jnp.bool_)
  for start in range(0, n_in, block_size):
    stop = min(start + block_size, n_in)
    w_block, u_block = w[start:stop], u[start:stop, start:stop]
    diag = jnp.diag(u_block)
    if nm is None:
      saliency = jnp.square(w_block) / jnp.square(diag)[:, None]
      block_keep = masks.keep_lowest_removed(saliency, int(saliency.size * sparsity))
    else:
      block_keep = jnp.ones(w_block.shape, jnp.bool_)
    w_block, block_keep, err = _prune_block(w_block, u_block, block_keep, nm)
    w = w.at[start:stop].set(w_block)
    keep = keep.at[start:stop].set(block_keep)
    # Lazy update: the block's errors reach every later input in one matmul.
    w = w.at[stop:].add(-jnp.matmul(u[start:stop, stop:].T, err, precision=_HIGHEST))
  keep = keep & ~dead[:, None]
  return jnp.where(keep, w, 0.0).astype(dtype), keep


def _prune_block(w_BxO, u_BxB, keep_BxO, nm):
  """Visits the block's inputs in order: prune, then spread the error over the later inputs."""
  size = w_BxO.shape[0]
  diag = jnp.diag(u_BxB)

  def visit(i, carry):
    w, keep, err = carry
    if nm is not None:
      n, m = nm
      # At the start of each group of M inputs, pick its N survivors from the current weights.
      start = (i // m) * m
      group = lax.dynamic_slice_in_dim(w, start, m, axis=0)
      saliency = jnp.square(group) / jnp.square(lax.dynamic_slice_in_dim(diag, start, m))[:, None]
      rank = jnp.argsort(jnp.argsort(-saliency, axis=0, stable=True), axis=0, stable=True)
      chosen = rank < n
      fresh = lax.dynamic_update_slice_in_dim(keep, chosen, start, axis=0)
      keep = jnp.where(i % m == 0, fresh, keep)
    row = w[i]
    kept = jnp.where(keep[i], row, 0.0)
    e = (row - kept) / diag[i]
    # U is upper triangular: row i of U is zero before i, so this touches inputs i.. only,
    # and sets input i itself to its pruned value.
    w = w - jnp.outer(u_BxB[i], e)
    return w, keep, err.at[i].set(e)

  err0 = jnp.zeros_like(w_BxO)
  return lax.fori_loop(0, size, visit, (w_BxO, keep_BxO, err0))
