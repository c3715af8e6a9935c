"""Masks as trees: one boolean leaf per parameter (True = kept), shaped and sharded like it.

Leaves a method does not touch hold a scalar True, so `apply` is one `jax.tree.map` over any
parameter tree. Masks come from scores (`from_scores`): the lowest-scoring weights are removed,
exactly `int(n * sparsity)` of every group, per layer, globally, or N of every M consecutive
weights along the input dimension.
"""

from typing import NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp

from compression import paths


class NM(NamedTuple):
  """N:M sparsity: N of every M consecutive inputs of each output are kept (2:4, 4:8)."""
  n: int
  m: int

  @classmethod
  def of(cls, value: Union['NM', tuple, str, None]) -> Optional['NM']:
    """An NM from (n, m), 'n:m' or None (None stays None); ValueError in one line if invalid."""
    if value is None:
      return None
    if isinstance(value, str):
      try:
        value = tuple(int(v) for v in value.split(':'))
      except ValueError:
        raise ValueError(f'N:M pattern {value!r} is not two integers N:M') from None
    if len(value) != 2:
      raise ValueError(f'N:M pattern {value!r} is not two integers N:M')
    n, m = value
    if not (isinstance(n, int) and isinstance(m, int) and 0 <= n < m):
      raise ValueError(f'N:M pattern {n}:{m} needs integers 0 <= N < M')
    return cls(n, m)

  def __str__(self):
    return f'{self.n}:{self.m}'


def check_sparsity(sparsity: float) -> None:
  if not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
    raise ValueError(f'sparsity={sparsity!r} must be in [0, 1)')


def check_nm(nm, in_features: Optional[int] = None, where: str = '') -> None:
  nm = NM.of(nm)
  if nm is None:
    return
  n, m = nm
  if in_features is not None and in_features % m:
    raise ValueError(f'N:M pattern {n}:{m}: M={m} does not divide the {in_features} inputs of '
                     f'{where}')


def keep_lowest_removed(scores, n_remove: int):
  """Mask of `scores` (any shape) without its `n_remove` lowest entries (ties: lower index)."""
  flat = scores.reshape(-1)
  order = jnp.argsort(flat, stable=True)
  removed = jnp.zeros(flat.shape, jnp.bool_).at[order[:n_remove]].set(True)
  return ~removed.reshape(scores.shape)


def nm_mask(scores_BxIxO, nm: NM):
  """Keeps the N highest of every M consecutive inputs, for every output (and batch entry)."""
  n, m = nm
  b, i, o = scores_BxIxO.shape
  groups = scores_BxIxO.reshape(b, i // m, m, o)
  rank = jnp.argsort(jnp.argsort(-groups, axis=2, stable=True), axis=2, stable=True)
  return (rank < n).reshape(b, i, o)


def per_output_mask(scores_BxIxO, sparsity: float):
  """Removes int(in * sparsity) inputs of every output column (Wanda's comparison group)."""
  b, i, o = scores_BxIxO.shape
  order = jnp.argsort(scores_BxIxO, axis=1, stable=True)
  rank = jnp.argsort(order, axis=1, stable=True)
  return rank >= int(i * sparsity)


def from_scores(params, scores: dict, sparsity: float, nm: Optional[NM] = None,
                scope: str = 'layer', *, layouts: paths.Layouts):
  """A mask tree from {path: score array shaped like the leaf} (higher score = keep).

  `layouts` ({path: models.layouts.Layout}) says how each scored leaf is a stack of matrices.

  scope 'layer' removes int(size * sparsity) weights of every scored matrix (each scanned layer
  and each expert of a stacked leaf separately), 'global' the same
  fraction of all scored weights together, 'output' int(in * sparsity) inputs per output column
  of every matrix; `nm` instead keeps N of every M consecutive inputs.
  """
  check_sparsity(sparsity)
  if scope not in ('layer', 'global', 'output'):
    raise ValueError(f'scope={scope!r} is not one of layer, global, output')
  flat = paths.flatten(params)
  masks = {}
  if nm is None and scope == 'global':
    order = sorted(scores)
    joined = jnp.concatenate([scores[p].reshape(-1).astype(jnp.float32) for p in order])
    kept = keep_lowest_removed(joined, int(joined.size * sparsity))
    offsets = 0
    for p in order:
      size = scores[p].size
      masks[p] = kept[offsets:offsets + size].reshape(scores[p].shape)
      offsets += size
  else:
    for path, s in scores.items():
      mats, back = paths.as_matrices(s, layouts[path])
      check_nm(nm, mats.shape[1], path)
      masks[path] = back(from_matrices(mats, sparsity, nm, scope))
  return paths.unflatten({p: like(masks[p], flat[p]) if p in masks else jnp.ones((), jnp.bool_)
                          for p in flat})


def from_matrices(scores_SxIxO, sparsity: float, nm: Optional[NM] = None, scope: str = 'layer'):
  """Keep-mask of a stack of matrices: N:M, or per matrix ('layer') or per output ('output')."""
  if nm is not None:
    return nm_mask(scores_SxIxO, nm)
  if scope == 'output':
    return per_output_mask(scores_SxIxO, sparsity)
  n_remove = int(scores_SxIxO[0].size * sparsity)   # each matrix of a stack is its own layer
  return jax.vmap(lambda m: keep_lowest_removed(m, n_remove))(scores_SxIxO)


def like(mask, param):
  """`mask` laid out as `param` is (sharded the same way when it is a sharded array)."""
  sharding = getattr(param, 'sharding', None)
  return mask if sharding is None else jax.device_put(mask, sharding)


def full(params):
  """The all-True mask tree (nothing pruned)."""
  return jax.tree.map(lambda _: jnp.ones((), jnp.bool_), params)


def apply(params, mask_tree):
  """Zeros every masked-out weight."""
  return jax.tree.map(lambda p, m: jnp.where(m, p, jnp.zeros((), p.dtype)), params, mask_tree)


def combine(a, b):
  """Kept in both (pruning more on top of an earlier mask)."""
  return jax.tree.map(jnp.logical_and, a, b)


def sparsity_of(mask_tree, selected: Sequence[str]) -> dict:
  """{path: fraction removed} for the selected leaves."""
  flat = paths.flatten(mask_tree)
  return {p: 1.0 - float(jnp.mean(flat[p].astype(jnp.float32))) for p in selected}
