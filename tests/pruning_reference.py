"""Plain-NumPy (float64) references for calibrated LLM pruning: Wanda and SparseGPT.

Layout: a kernel `w` has shape (in_features, out_features) and a layer computes y = x @ w, i.e. the
transpose of PyTorch's (out, in) `weight`. Calibration inputs `x` have shape (tokens, in_features).
Every mask is boolean with True = keep.

Conventions chosen here (the papers leave them open):
  * Exactly `int(size * sparsity)` weights are pruned per comparison group; ties are broken by
    position, the lower index being pruned first (stable sort). When `nm=(n, m)` is given it
    replaces `sparsity`: every group of m consecutive inputs keeps its n best weights.
  * SparseGPT's unstructured selection pools one whole block (all its inputs and all outputs)
    into one group, flattened in our row-major (input, output) order: index i * out + o.
"""

import numpy as np


def _prune_lowest(scores, count):
  """Prunes the `count` lowest scores along axis 1 of a (groups, size, cols) array.

  Returns (keep, margin). The margin is the smallest relative gap, over all (group, col), between
  the lowest kept and the highest pruned score: how far the data is from a tie, i.e. how much
  float error the selection tolerates before it can flip (inf when nothing can flip).
  """
  keep = np.ones(scores.shape, bool)
  if count == 0 or count == scores.shape[1]:
    keep[:, :count] = False
    return keep, np.inf
  order = np.argsort(scores, axis=1, kind='stable')  # Stable: on ties the lower index goes first.
  np.put_along_axis(keep, order[:, :count], False, axis=1)
  ranked = np.take_along_axis(scores, order, axis=1)
  pruned_max, kept_min = ranked[:, count - 1], ranked[:, count]
  with np.errstate(invalid='ignore', divide='ignore'):
    gap = np.where(kept_min > 0, (kept_min - pruned_max) / kept_min, 0.0)
  return keep, float(gap.min())


def _per_output_mask(scores, sparsity, nm):
  """Per output column: drops the lowest-scoring inputs, or the m - n lowest of every N:M group."""
  n_in, n_out = scores.shape
  if nm is None:
    assert 0 <= sparsity <= 1, sparsity
    keep, margin = _prune_lowest(scores[None], int(n_in * sparsity))
  else:
    n, m = nm
    assert 0 < n <= m and n_in % m == 0, (nm, n_in)
    keep, margin = _prune_lowest(scores.reshape(n_in // m, m, n_out), m - n)
  return keep.reshape(n_in, n_out), margin


def magnitude_mask(w, sparsity, nm=None, *, return_margin=False):
  """Magnitude pruning baseline: per output column, drops the inputs with the lowest |w|."""
  keep, margin = _per_output_mask(np.abs(np.asarray(w, np.float64)), sparsity, nm)
  return (keep, margin) if return_margin else keep


def wanda_mask(w, x, sparsity, nm=None, *, return_margin=False):
  """Wanda (Sun et al. 2023, "A Simple and Effective Pruning Approach for Large Language Models").

  Score |w[j, o]| * ||x[:, j]||_2, compared per output o (the paper's per-row group in PyTorch's
  layout is our column). Unstructured: each output keeps all but its int(in * sparsity)
  lowest-scoring inputs; N:M: every group of m consecutive inputs keeps its n best per output.
  Ties: the lower input index is pruned first. Returns the (in, out) keep mask, plus the selection
  margin (see `_prune_lowest`) when `return_margin`.
  """
  w, x = np.asarray(w, np.float64), np.asarray(x, np.float64)
  norms = np.sqrt(np.sum(x * x, axis=0))
  keep, margin = _per_output_mask(np.abs(w) * norms[:, None], sparsity, nm)
  return (keep, margin) if return_margin else keep


def sparsegpt(w, x, sparsity, nm=None, block_size=128, dampening=0.01, *, return_margin=False):
  """SparseGPT (Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately
  Pruned in One-Shot"), the published reference algorithm transposed to our (in, out) layout.

  H = 2 X^T X; dead inputs (H[j, j] == 0) get H[j, j] = 1 and zero weights; the diagonal is
  dampened by `dampening * mean(diag(H))`; U = upper Cholesky factor of inv(H). Inputs (PyTorch's
  columns, our rows) are processed in blocks. Unstructured: per block, the int(numel * sparsity)
  lowest w^2 / diag(U)^2 over the whole block (all outputs pooled) are pruned, ties to the lower
  flat index i * out + o. N:M: at every input i with i % m == 0, each output prunes the m - n
  lowest scores among inputs i..i+m-1, scored on the weights updated so far. Each input i then
  has its pruning error err = (w_i - q_i) / U[i, i] compensated on the block's later inputs,
  w[i:] -= outer(U[i, i:], err), and on later blocks lazily: w[end:] -= U[block, end:]^T @ Err.

  Returns (new_w, keep) in (in, out) layout, pruned weights exactly 0; plus the smallest selection
  margin over all selections (see `_prune_lowest`) when `return_margin`.
  """
  w = np.array(w, np.float64)  # A copy: updated in place below.
  x = np.asarray(x, np.float64)
  n_in, n_out = w.shape
  if nm is not None:
    n, m = nm
    # Groups must not straddle blocks, or they would differ from Wanda's fixed input groups.
    assert 0 < n <= m and n_in % m == 0 and block_size % m == 0, (nm, n_in, block_size)
  else:
    assert 0 <= sparsity <= 1, sparsity

  h = 2 * x.T @ x
  dead = np.diag(h) == 0
  h[dead, dead] = 1  # Keeps H invertible; these inputs never fire, so their weights are moot.
  w[dead] = 0
  h += dampening * np.mean(np.diag(h)) * np.eye(n_in)
  # inv(H) = U^T U. Row i of U, divided by U[i, i], is the OBS update that removes input i given
  # that inputs < i are already fixed, which is what sequential column-by-column pruning needs.
  u = np.linalg.cholesky(np.linalg.inv(h)).T

  keep = np.ones((n_in, n_out), bool)
  margin = np.inf
  for start in range(0, n_in, block_size):
    end = min(start + block_size, n_in)
    wb = w[start:end].copy()  # Already holds the lazy updates of all earlier blocks.
    ub = u[start:end, start:end]
    d = np.diag(ub)
    kb = keep[start:end]  # A view: selections below write straight into `keep`.
    if nm is None:
      scores = wb ** 2 / d[:, None] ** 2
      sel, mg = _prune_lowest(scores.reshape(1, -1, 1), int(scores.size * sparsity))
      kb[:] = sel.reshape(wb.shape)
      margin = min(margin, mg)
    q = np.zeros_like(wb)
    err = np.zeros_like(wb)
    for i in range(end - start):
      if nm is not None and i % m == 0:
        scores = wb[i:i + m] ** 2 / d[i:i + m, None] ** 2
        sel, mg = _prune_lowest(scores[None], m - n)
        kb[i:i + m] = sel[0]
        margin = min(margin, mg)
      # Stored separately (not read back from wb) so that pruned weights are exactly 0.
      q[i] = wb[i] * kb[i]
      err[i] = (wb[i] - q[i]) / ub[i, i]
      wb[i:] -= np.outer(ub[i, i:], err[i])
    w[start:end] = q
    w[end:] -= u[start:end, end:].T @ err
  return (w, keep, margin) if return_margin else (w, keep)


def reconstruction_error(w_old, w_new, x):
  """||x @ w_old - x @ w_new||_F^2: the layer-wise objective both papers minimize."""
  x = np.asarray(x, np.float64)
  diff = x @ (np.asarray(w_old, np.float64) - np.asarray(w_new, np.float64))
  return float(np.sum(diff * diff))
