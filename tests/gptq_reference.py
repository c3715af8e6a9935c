"""Plain-NumPy (float64) reference for GPTQ, written from the paper, not from the library.

GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers"), in its plainest form: the Optimal Brain Quantization update applied
one input at a time in a fixed order, with the inverse Hessian of the inputs not yet quantized
kept explicitly (Gaussian elimination of each quantized input), no Cholesky factor, no blocks.

Layout: a kernel `w` has shape (in, out) and a layer computes y = x @ w (PyTorch's weight
transposed); inputs are the paper's columns. The grid is written out here too: signed integers
in [-2^(b-1), 2^(b-1) - 1], w ~ (q - zero) * scale; symmetric scale = absmax / (2^(b-1) - 1),
zero 0; asymmetric over [min(w, 0), max(w, 0)], scale = range / (2^b - 1), zero =
lo - round(min / scale); `clip` multiplies the range ends; a zero scale becomes 1.

Float32 code rounds a value lying within its own rounding error of a half-integer either way,
and a flipped integer changes every later update of its output column. `adopt=(q, zero)` from
the code under test makes the comparison exact anyway: wherever the reference's own value lies
within `tol` (in grid steps) of a half-integer, it takes the given neighbouring integer instead
of its own, and counts it. Away from ties it rounds on its own.
"""

import numpy as np


def qrange(bits):
  return -2 ** (bits - 1), 2 ** (bits - 1) - 1


class _Rounder:
  """np.round (half to even, like jnp.round), or the adopted integer at near-ties."""

  def __init__(self, tol):
    self.tol, self.adopted = tol, 0

  def __call__(self, x, theirs=None, offset=0):
    mine = np.round(x)
    if theirs is None:
      return mine
    near = np.abs(x - np.floor(x) - 0.5) < self.tol
    theirs = np.asarray(theirs, np.float64) - offset   # back to the unshifted rounding argument
    take = near & ((theirs == np.floor(x)) | (theirs == np.floor(x) + 1))
    self.adopted += int(np.sum(take & (theirs != mine)))
    return np.where(take, theirs, mine)


def fit(w_kxo, bits, symmetric, clip, rnd, zero_theirs=None):
  """(scale, zero) per output of a group of rows: w_kxo [rows, out] -> two [out] arrays."""
  lo, hi = qrange(bits)
  if symmetric:
    scale = np.max(np.abs(w_kxo), axis=0) * clip / hi
    zero = np.zeros_like(scale)
  else:
    w_min = np.minimum(np.min(w_kxo, axis=0), 0) * clip
    w_max = np.maximum(np.max(w_kxo, axis=0), 0) * clip
    scale = (w_max - w_min) / (hi - lo)
    safe = np.where(scale > 0, scale, 1.0)
    # zero = lo - round(w_min / scale): adopt the other side's round() at ties.
    theirs = None if zero_theirs is None else lo - np.asarray(zero_theirs, np.float64)
    zero = np.clip(lo - rnd(w_min / safe, theirs), lo, hi)
  return np.where(scale > 0, scale, 1.0), zero


def quantize(row, scale, zero, bits, rnd, theirs=None):
  """Integers of one row: clip(round(w / scale) + zero, lo, hi)."""
  lo, hi = qrange(bits)
  return np.clip(rnd(row / scale, theirs, zero) + zero, lo, hi)


def gptq(w, h, bits, group_size=0, symmetric=True, act_order=False, dampening=0.01, clip=None,
         *, adopt=None, tol=1e-4, return_visits=False):
  """GPTQ of kernel `w` (in, out) with Hessian `h` = X^T X (in, in).

  Dead inputs (h_jj = 0) get h_jj = 1 and zero weights; h += dampening * mean(diag h) * I.
  group_size: 0 one grid per output over all inputs, -1 one grid for the whole kernel (fitted
  before the visit), k > 0 groups of k consecutive inputs, fitted to the current weights of the
  group when the visit reaches its first input. act_order visits inputs by decreasing diag(h)
  (ties: lower index first); with groups, every group is then fitted up front from the original
  weights, and each input is rounded on its own group's grid. `clip`: scalar or (groups, out).

  Returns (q, scale, zero, adopted): integers (in, out) as float64, grids (groups, out), and the
  number of near-ties where `adopt` was followed against our own rounding. With
  `return_visits`, also the dampened h and each input's row just before it was rounded.
  """
  w = np.array(w, np.float64)
  h = np.array(h, np.float64)
  n_in, n_out = w.shape
  n_groups = n_in // group_size if group_size > 0 else 1
  clip = np.broadcast_to(np.ones(()) if clip is None else np.asarray(clip, np.float64),
                         (n_groups, n_out))
  q_theirs, zero_theirs = (None, None) if adopt is None else (
      np.asarray(adopt[0], np.float64), np.asarray(adopt[1], np.float64))
  rnd = _Rounder(tol)

  dead = np.diag(h) == 0
  order = np.argsort(-np.diag(h), kind='stable') if act_order else np.arange(n_in)
  h[dead, dead] = 1
  w[dead] = 0
  h += dampening * np.mean(np.diag(h)) * np.eye(n_in)

  def group_of(j):
    return j // group_size if group_size > 0 else 0

  scale, zero = np.ones((n_groups, n_out)), np.zeros((n_groups, n_out))
  if group_size == -1:   # one scale for everything, from the whole kernel
    s, z = fit(w.reshape(-1, 1), bits, symmetric, clip[0, 0], rnd,
               None if zero_theirs is None else zero_theirs[:1, :1].reshape(1))
    scale[:], zero[:] = s, z
  elif group_size == 0 or act_order:   # fixed before the visit, from the original weights
    for g in range(n_groups):
      rows = [j for j in range(n_in) if group_of(j) == g]
      scale[g], zero[g] = fit(w[rows], bits, symmetric, clip[g], rnd,
                              None if zero_theirs is None else zero_theirs[g])

  h_inv = np.linalg.inv(h)
  q = np.zeros((n_in, n_out))
  visits = np.zeros((n_in, n_out))
  remaining = list(order)
  for j in order:
    g = group_of(j)
    if group_size > 0 and not act_order and j % group_size == 0:
      rows = list(range(j, j + group_size))
      scale[g], zero[g] = fit(w[rows], bits, symmetric, clip[g], rnd,
                              None if zero_theirs is None else zero_theirs[g])
    visits[j] = w[j]
    q[j] = quantize(w[j], scale[g], zero[g], bits, rnd, None if q_theirs is None else q_theirs[j])
    # OBQ: quantizing input j to v costs (w_j - v)^2 / [H^-1]_jj per output and is best
    # compensated by moving the remaining inputs by -[H^-1]_{:,j} (w_j - v) / [H^-1]_jj.
    err = (w[j] - (q[j] - zero[g]) * scale[g]) / h_inv[j, j]
    remaining.remove(j)
    w[remaining] -= np.outer(h_inv[remaining, j], err)
    w[j] = (q[j] - zero[g]) * scale[g]
    # Input j is now fixed: the inverse Hessian of the rest, by eliminating row and column j.
    h_inv -= np.outer(h_inv[:, j], h_inv[j, :]) / h_inv[j, j]
  out = (q, scale, zero, rnd.adopted)
  return out + (h, visits) if return_visits else out


def dequantize(q, scale, zero):
  """(in, out) weights from integers and (groups, out) grids of consecutive inputs."""
  k = q.shape[0] // scale.shape[0]
  return (q - np.repeat(zero, k, axis=0)) * np.repeat(scale, k, axis=0)


def rtn(w, bits, group_size=0, symmetric=True, clip=None):
  """Round to nearest on the same grid, fitted to `w` itself: (q, scale, zero)."""
  w = np.asarray(w, np.float64)
  n_in, n_out = w.shape
  k = n_in if group_size <= 0 else group_size
  clip = np.broadcast_to(1.0 if clip is None else np.asarray(clip, np.float64),
                         (n_in // k, n_out))
  rnd = _Rounder(0)
  if group_size == -1:
    s, z = fit(w.reshape(-1, 1), bits, symmetric, clip[0, 0], rnd)
    scale, zero = np.full((1, n_out), s[0]), np.full((1, n_out), z[0])
  else:
    grids = [fit(w[g:g + k], bits, symmetric, clip[g // k], rnd) for g in range(0, n_in, k)]
    scale, zero = np.stack([s for s, _ in grids]), np.stack([z for _, z in grids])
  q = quantize(w, np.repeat(scale, k, axis=0), np.repeat(zero, k, axis=0), bits, rnd)
  return q, scale, zero


def output_error(w_old, w_new, h):
  """tr(dW^T H dW) = ||X (W_old - W_new)||_F^2 for H = X^T X: the layer-wise objective."""
  d = np.asarray(w_old, np.float64) - np.asarray(w_new, np.float64)
  return float(np.sum(d * (np.asarray(h, np.float64) @ d)))
