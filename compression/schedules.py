"""Pruning during training: a sparsity ramp and an optax wrapper that keeps pruned weights at 0.

`gradual(inner, ...)` wraps any optax optimizer. Its state holds the mask tree (created like the
parameters, so it is sharded like them). Every `every` steps between `start` and `end` it
re-ranks the selected weights by magnitude at the ramp's current sparsity; on every step the
update of a pruned weight is exactly `-param`, so pruned weights are exactly zero after each
update whatever the inner optimizer (momentum, weight decay) would have done.

`split(key, model_tx, own_tx)` gives the entries a loss keeps beside the model's parameters
(QAT's learned scales, low-precision amax histories) an optimizer of their own.
"""

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from compression import masks, paths


def polynomial_sparsity(step, final: float, start: int, end: int, initial: float = 0.0,
                        power: float = 3.0):
  """Zhu & Gupta (2017): s_t = s_f + (s_i - s_f) (1 - (t - start) / (end - start))^power."""
  frac = jnp.clip((step - start) / max(end - start, 1), 0.0, 1.0)
  return final + (initial - final) * (1.0 - frac) ** power


class GradualState(NamedTuple):
  inner: optax.OptState
  masks: optax.Params
  count: jax.Array


def _magnitude_masks(params, selected, sparsity, current, layouts):
  """Per-layer magnitude masks at a traced sparsity (exact count per matrix, rounded down);
  leaves not selected keep their `current` mask."""
  flat, current = paths.flatten(params), paths.flatten(current)
  out = {}

  def keep(m):   # one matrix: its lowest floor(size * sparsity) magnitudes removed
    rank = jnp.argsort(jnp.argsort(jnp.abs(m).reshape(-1), stable=True), stable=True)
    return (rank >= jnp.floor(m.size * sparsity).astype(jnp.int32)).reshape(m.shape)

  for p in selected:
    mats, back = paths.as_matrices(flat[p], layouts[p])
    out[p] = back(jax.vmap(keep)(mats))
  return paths.unflatten({p: out.get(p, current[p]) for p in flat})


def gradual(inner: optax.GradientTransformation, final_sparsity: float, start: int, end: int,
            every: int = 10, include: Optional[str] = None,
            exclude: Optional[str] = paths.DEFAULT, *,
            layouts: paths.Layouts) -> optax.GradientTransformation:
  """`inner`, with magnitude pruning ramped cubically to `final_sparsity` over [start, end].

  `layouts` ({path: models.layouts.Layout}, e.g. `models.layouts.of_config(cfg)`) says which
  leaves are matmul weights and how each is a stack of matrices.
  """
  masks.check_sparsity(final_sparsity)
  if not 0 <= start <= end or every < 1:
    raise ValueError(f'gradual pruning needs 0 <= start <= end and every >= 1 '
                     f'(start={start}, end={end}, every={every})')

  def init(params):
    mask_tree = jax.tree.map(lambda p: jnp.ones(jnp.shape(p), jnp.bool_), params)
    return GradualState(inner.init(params), mask_tree, jnp.zeros((), jnp.int32))

  def update(updates, state, params=None):
    if params is None:
      raise ValueError('gradual pruning needs the parameters in update()')
    selected = paths.select(params, layouts, include, exclude)
    updates, inner_state = inner.update(updates, state.inner, params)
    step = state.count
    due = (step >= start) & (step <= end) & ((step - start) % every == 0)
    sparsity = polynomial_sparsity(step, final_sparsity, start, end)
    mask_tree = jax.lax.cond(due, lambda: _magnitude_masks(
        jax.tree.map(lambda p, m: jnp.where(m, p, 0), params, state.masks), selected, sparsity,
        state.masks, layouts),
        lambda: state.masks)
    updates = jax.tree.map(lambda u, p, m: jnp.where(m, u, -p), updates, params, mask_tree)
    return updates, GradualState(inner_state, mask_tree, step + 1)

  return optax.GradientTransformation(init, update)


class FrozenState(NamedTuple):
  inner: optax.OptState
  masks: optax.Params


def frozen(inner: optax.GradientTransformation, mask_tree) -> optax.GradientTransformation:
  """`inner` with a fixed mask: fine-tuning a pruned model keeps its zeros exactly.

  The mask tree lives in the optimizer state, one full-shape leaf per parameter built like it
  (so it is sharded like the parameters and checkpointed with them), not in the compiled step.
  """
  def init(params):
    # Mapping over `params` keeps its logical-name boxes, so the masks shard like the params.
    leaves, treedef = jax.tree.flatten(params)
    # (A copy: a train step donating its state must not delete the caller's masks.)
    masks = [jnp.array(jnp.broadcast_to(jnp.asarray(m, jnp.bool_), jnp.shape(p)), copy=True)
             for p, m in zip(leaves, jax.tree.leaves(mask_tree))]
    return FrozenState(inner.init(params), jax.tree.unflatten(treedef, masks))

  def update(updates, state, params=None):
    updates, inner_state = inner.update(updates, state.inner, params)
    updates = jax.tree.map(lambda u, p, m: jnp.where(m, u, -p), updates, params, state.masks)
    return updates, FrozenState(inner_state, state.masks)

  return optax.GradientTransformation(init, update)


class SplitState(NamedTuple):
  model: optax.OptState
  own: optax.OptState


def split(key: str, model_tx: optax.GradientTransformation,
          own_tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """`model_tx` on every top-level entry of the parameters but `key`, `own_tx` on `{key: ...}`:
  wrappers written for the model's tree (clipping, frozen pruning masks) never see it."""
  def parts(tree):
    return ({k: v for k, v in tree.items() if k != key},
            {k: v for k, v in tree.items() if k == key})

  def init(params):
    model, own = parts(params)
    return SplitState(model_tx.init(model), own_tx.init(own))

  def update(updates, state, params=None):
    u_model, u_own = parts(updates)
    p_model, p_own = parts(params) if params is not None else (None, None)
    u_model, s_model = model_tx.update(u_model, state.model, p_model)
    u_own, s_own = own_tx.update(u_own, state.own, p_own)
    return dict(u_model, **u_own), SplitState(s_model, s_own)

  return optax.GradientTransformation(init, update)
