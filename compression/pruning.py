"""Unstructured and N:M pruning: `prune(params, method, sparsity, ...) -> (params, masks)`.

Methods (scores: higher = keep):
  magnitude  |w|, per layer or over all selected weights together (scope='global');
  random     a seeded baseline;
  saliency   |w * dL/dw| (first-order Taylor), gradients averaged over calibration batches;
  wanda      |w| * ||x|| per input feature, compared within each output (calibration inputs);
  sparsegpt  layer-wise reconstruction with the inverse Hessian (calibration inputs).
Wanda and SparseGPT go block by block: a block's inputs are collected from the model with the
earlier blocks already pruned, as the published methods do. Patterns: unstructured at
`sparsity`, or `nm=(N, M)` keeping N of every M consecutive inputs of each output.
"""

import re
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from compression import calibrated, calibration, masks, paths

METHODS = ('magnitude', 'random', 'saliency', 'wanda', 'sparsegpt')
CALIBRATED = ('saliency', 'wanda', 'sparsegpt')


def prune(params, method: str, sparsity: float = 0.5, *, nm=None, scope: str = 'layer',
          include: Optional[str] = None, exclude: Optional[str] = paths.DEFAULT_EXCLUDE,
          model=None, batches=None, loss_fn: Optional[Callable] = None, seed: int = 0,
          block_size: int = 128, dampening: float = 0.01):
  """Prunes the selected weights of `params`; returns (pruned params, mask tree).

  Args:
    params: the parameter tree (unrolled for the calibrated methods).
    method: one of METHODS.
    sparsity: fraction removed, in [0, 1) (ignored with `nm`).
    nm: (N, M) for N:M sparsity along each weight's input dimension, e.g. (2, 4).
    scope: 'layer' (each weight to `sparsity`) or 'global' (one ranking over all selected
      weights); magnitude, random and saliency only.
    include, exclude: regexes over parameter paths (see `compression.paths.select`).
    model, batches: the model and calibration batches, for saliency, wanda and sparsegpt.
    loss_fn: `loss_fn(params, model, batch) -> scalar`, for saliency.
  """
  selected = check(params, method, sparsity, nm=nm, scope=scope, include=include,
                   exclude=exclude)
  if method in CALIBRATED and (model is None or not batches):
    raise ValueError(f'{method} needs the model and calibration batches')
  flat = paths.flatten(params)
  if method in ('wanda', 'sparsegpt'):
    return _layer_by_layer(params, method, sparsity, nm, selected, model, batches, block_size,
                           dampening)
  if method == 'magnitude':
    scores = {p: jnp.abs(flat[p]) for p in selected}
  elif method == 'random':
    keys = jax.random.split(jax.random.key(seed), len(selected))
    scores = {p: jax.random.uniform(k, flat[p].shape) for p, k in zip(selected, keys)}
  else:
    grads = paths.flatten(calibration.gradients(model, params, batches, loss_fn))
    scores = {p: jnp.abs(flat[p] * grads[p]) for p in selected}
  mask_tree = masks.from_scores(params, scores, sparsity, nm, scope)
  return masks.apply(params, mask_tree), mask_tree


def check(params, method: str, sparsity: float = 0.5, *, nm=None, scope: str = 'layer',
          include: Optional[str] = None, exclude: Optional[str] = paths.DEFAULT_EXCLUDE):
  """Everything `prune` can reject, from shapes alone (`params` may hold ShapeDtypeStructs).

  Returns the selected paths; raises ValueError in one line.
  """
  if method not in METHODS:
    raise ValueError(f'unknown pruning method {method!r}; methods: {", ".join(METHODS)}')
  masks.check_sparsity(sparsity)
  masks.check_nm(nm)
  if method in ('wanda', 'sparsegpt') and scope != 'layer':
    raise ValueError(f'{method} ranks weights within each layer: scope must be layer')
  selected = paths.select(params, include, exclude)
  flat = paths.flatten(params)
  for p in selected:
    stack, inputs, _ = paths.matrix_shape(p, flat[p].shape)
    masks.check_nm(nm, inputs, p)   # N:M needs M to divide every selected weight's inputs
    if method in ('wanda', 'sparsegpt') and stack != 1:
      raise ValueError(f'{method} prunes plain kernels; {p} is a stack of {stack} '
                       f'(exclude expert weights or use magnitude)')
  return selected


def _block_of(path: str) -> str:
  """Paths are pruned in groups of one Transformer block ('blocks_3/...'), then the rest."""
  m = re.match(r'blocks_(\d+)/', path)
  return f'{int(m.group(1)):06d}' if m else 'zzzzzz'


def _layer_by_layer(params, method, sparsity, nm, selected, model, batches, block_size,
                    dampening):
  flat = paths.flatten(params)
  keep = {}
  for group in sorted({_block_of(p) for p in selected}):
    group_paths = [p for p in selected if _block_of(p) == group]
    stats = calibration.input_statistics(model, paths.unflatten(flat), batches, group_paths,
                                         gram=method == 'sparsegpt')
    for p in group_paths:
      mats, back = paths.as_matrices(p, flat[p])
      w = mats[0]
      if method == 'wanda':
        mask = calibrated.wanda_mask(w, stats[p]['sq'], sparsity, nm)
        new = jnp.where(mask, w, 0)
      else:
        new, mask = calibrated.sparsegpt(w, stats[p]['gram'], sparsity, nm, block_size, dampening)
      flat[p] = back(new[None].astype(flat[p].dtype))
      keep[p] = back(mask[None])
  mask_tree = paths.unflatten({p: keep.get(p, jnp.ones((), jnp.bool_)) for p in flat})
  return paths.unflatten(flat), mask_tree
