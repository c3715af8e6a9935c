"""Unstructured and N:M pruning: `prune(params, method, sparsity, model=...) -> (params, masks)`.

Methods are a registry (`METHODS`): a scoring function over a weight seen as a stack of matrices
[stack, in, out] (higher = keep), what it needs from the data, and how it compares weights;
or, for SparseGPT, an update that rewrites each matrix. Adding a method is one function and one
line in `METHODS`. Built in:
  magnitude  |w|, per layer or over all selected weights together (scope='global');
  random     a seeded baseline;
  saliency   |w * dL/dw| (first-order Taylor), gradients averaged over calibration batches;
  wanda      |w| * ||x|| per input feature, compared within each output (Sun et al., 2023);
  sparsegpt  layer-wise reconstruction with the inverse Hessian (Frantar & Alistarh, 2023).
Methods that need inputs go block by block, as the published ones do: a block's inputs are
observed at the seam (`compression.calibration`) with the earlier blocks already pruned; MoE
experts are pruned one by one, each from the tokens routed to it. Patterns: unstructured at
`sparsity`, or `nm=(N, M)` keeping N of every M consecutive inputs of each output.
"""

import logging
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from compression import calibration, masks, paths, sparsegpt as sparsegpt_lib
from models import layouts as layouts_lib


class Context(NamedTuple):
  """What a scoring function may use, each shaped as the weight's matrices [stack, ...]."""
  key: Optional[jax.Array] = None    # random methods
  grad: Optional[jax.Array] = None   # [stack, in, out] mean loss gradient
  sq: Optional[jax.Array] = None     # [stack, in] per-input sums of squares of the inputs


class Method(NamedTuple):
  """A pruning method. `score(w_SxIxO, ctx)` ranks weights; or `update(w_IxO, gram_IxI,
  sparsity, nm, **options)` returns (new matrix, keep-mask) for one matrix at a time.

  needs: None, 'gradients', 'inputs' (sums of squares) or 'gram' (X^T X); compare: the scope
  the method always ranks within (None: the caller's `scope`).
  """
  score: Optional[Callable] = None
  update: Optional[Callable] = None
  needs: Optional[str] = None
  compare: Optional[str] = None


def magnitude(w, ctx):
  return jnp.abs(w)


def random(w, ctx):
  return jax.random.uniform(ctx.key, w.shape)


def saliency(w, ctx):
  return jnp.abs(w * ctx.grad)


def wanda(w, ctx):
  return jnp.abs(w.astype(jnp.float32)) * jnp.sqrt(ctx.sq.astype(jnp.float32))[:, :, None]


METHODS = {
    'magnitude': Method(magnitude),
    'random': Method(random),
    'saliency': Method(saliency, needs='gradients'),
    'wanda': Method(wanda, needs='inputs', compare='output'),
    'sparsegpt': Method(update=sparsegpt_lib.sparsegpt, needs='gram', compare='layer'),
}


def prune(params, method: str, sparsity: float = 0.5, *, nm=None, scope: str = 'layer',
          include: Optional[str] = None, exclude: Optional[str] = paths.DEFAULT,
          model=None, layouts=None, batches=None, loss_fn: Optional[Callable] = None,
          seed: int = 0, block_size: int = 128, dampening: float = 0.01):
  """Prunes the selected weights of `params`; returns (pruned params, mask tree).

  Args:
    params: the parameter tree (unrolled for the methods that need inputs).
    method: a name in METHODS.
    sparsity: fraction removed, in [0, 1) (ignored with `nm`).
    nm: N:M sparsity along each weight's input dimension, e.g. (2, 4) (`masks.NM`).
    scope: 'layer' (each matrix to `sparsity`) or 'global' (one ranking over all selected
      weights), for methods without a fixed comparison.
    include, exclude: which weights (see `compression.paths.select`).
    model: the `Transformer`; its layouts say what each weight's dims are (or pass `layouts`).
    batches: calibration batches, for methods that need inputs or gradients.
    loss_fn: `loss_fn(params, model, batch) -> scalar`, for saliency.
  """
  layouts = _layouts(model, layouts)
  nm = masks.NM.of(nm)
  selected = check(params, method, sparsity, nm=nm, scope=scope, include=include,
                   exclude=exclude, layouts=layouts)
  spec = METHODS[method]
  if spec.needs and (model is None or not batches):
    raise ValueError(f'{method} needs the model and calibration batches')
  if spec.needs in ('inputs', 'gram'):
    return _block_by_block(params, spec, sparsity, nm, selected, model, layouts, batches,
                           dict(block_size=block_size, dampening=dampening))
  flat = paths.flatten(params)
  grads = (paths.flatten(calibration.gradients(model, params, batches, loss_fn))
           if spec.needs == 'gradients' else {})
  keys = dict(zip(selected, jax.random.split(jax.random.key(seed), len(selected))))
  scores = {}
  for p in selected:
    mats, back = paths.as_matrices(flat[p], layouts[p])
    grad = paths.as_matrices(grads[p], layouts[p])[0] if p in grads else None
    scores[p] = back(spec.score(mats, Context(key=keys[p], grad=grad)))
  mask_tree = masks.from_scores(params, scores, sparsity, nm, spec.compare or scope,
                                layouts=layouts)
  return masks.apply(params, mask_tree), mask_tree


def _layouts(model, layouts):
  if layouts is not None:
    return layouts
  if model is None:
    raise ValueError('pass the model (or its layouts, models.layouts.of_config(cfg)): it says '
                     'which parameters are weights and how')
  return layouts_lib.of_model(model)


def check(params, method: str, sparsity: float = 0.5, *, nm=None, scope: str = 'layer',
          include: Optional[str] = None, exclude: Optional[str] = paths.DEFAULT, layouts):
  """Everything `prune` can reject, from shapes alone (`params` may hold ShapeDtypeStructs).

  Returns the selected paths; raises ValueError in one line.
  """
  if method not in METHODS:
    raise ValueError(f'unknown pruning method {method!r}; methods: {", ".join(METHODS)}')
  masks.check_sparsity(sparsity)
  nm = masks.NM.of(nm)
  if scope not in ('layer', 'global'):
    raise ValueError(f'scope={scope!r} is not one of layer, global')
  compare = METHODS[method].compare
  if compare is not None and scope != 'layer':
    raise ValueError(f'{method} ranks weights within each {compare}: scope must be layer')
  selected = paths.select(params, layouts, include, exclude)
  flat = paths.flatten(params)
  for p in selected:
    _, inputs, _ = layouts[p].matrix_shape(flat[p].shape)
    masks.check_nm(nm, inputs, p)   # N:M needs M to divide every selected weight's inputs
  return selected


def _block_by_block(params, spec: Method, sparsity, nm, selected, model, layouts, batches,
                    options):
  flat = paths.flatten(params)
  keep = {}
  for group in calibration.blocks(model, params, batches[0], selected):
    stats = calibration.input_statistics(model, paths.unflatten(flat), batches, group,
                                         gram=spec.needs == 'gram')
    for p in group:
      layout = layouts[p]
      mats, back = paths.as_matrices(flat[p], layout)
      n_in = mats.shape[1]
      sq = stats[p]['sq'].reshape(-1, n_in)
      seen = jnp.reshape(stats[p]['tokens'], (-1,)) > 0
      if not bool(jnp.all(seen)):
        logging.warning('%s: %d of %d matrices saw no calibration token; they are pruned by '
                        'magnitude', p, int(jnp.sum(~seen)), seen.shape[0])
      if spec.update is not None:
        gram = stats[p]['gram'].reshape(-1, n_in, n_in)
        new, mask = [], []
        for i in range(mats.shape[0]):
          if bool(seen[i]):
            w_i, m_i = spec.update(mats[i], gram[i], sparsity, nm, **options)
          else:
            m_i = masks.from_matrices(jnp.abs(mats[i:i + 1]), sparsity, nm, 'layer')[0]
            w_i = jnp.where(m_i, mats[i], 0)
          new.append(w_i)
          mask.append(m_i)
        new, mask = jnp.stack(new), jnp.stack(mask)
      else:
        scores = spec.score(mats, Context(sq=sq))
        scores = jnp.where(seen[:, None, None], scores, jnp.abs(mats).astype(scores.dtype))
        mask = masks.from_matrices(scores, sparsity, nm, spec.compare or 'layer')
        new = jnp.where(mask, mats, 0)
      flat[p] = back(new.astype(flat[p].dtype))
      keep[p] = back(mask)
  mask_tree = paths.unflatten({p: keep.get(p, jnp.ones((), jnp.bool_)) for p in flat})
  return paths.unflatten(flat), mask_tree
