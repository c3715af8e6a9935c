"""Structural pruning: remove FFN neurons, attention heads, whole layers or experts for real.

Each function takes a `ModelConfig` and unrolled parameters and returns a smaller config and
parameter tree (fewer FLOPs and bytes), plus the keep-indices per layer so the same removal can
be checked against the masked full model (`mask_of`). A unit is an index along one logical axis
(`mlp` for FFN neurons, `kv_heads` groups for heads, `expert` for experts): removing it takes
that index out of every parameter of the block carrying the axis, whatever the block's module
names (read from the model's logical names, `models.layouts`). Units are ranked within each
layer by importance over the matmul weights that own them: 'l1' / 'l2' norms, or 'taylor'
|sum(w * g)| with gradients from calibration batches. Every layer keeps the same count, since
one config describes all layers.
"""

import jax.numpy as jnp
import numpy as np

from compression import paths
from models import axes, layouts
from models.transformer import block_name

IMPORTANCE = ('l1', 'l2', 'taylor')


KINDS = ('ffn', 'heads', 'layers', 'experts')


def check(kind: str, cfg, amount, importance: str = 'l2', grads=None) -> None:
  """Everything removing `amount` units of `kind` can reject, from the config alone.

  `amount` is a fraction in [0, 1), or for 'layers' a number of blocks. Raises ValueError in one
  line.
  """
  if kind not in KINDS:
    raise ValueError(f'unknown structural kind {kind!r}; kinds: {", ".join(KINDS)}')
  if cfg.scan_layers or cfg.n_unique_layers != cfg.n_layers:
    raise ValueError('structural pruning needs unrolled, unshared layers (scan_layers=False, '
                     'n_unique_layers=None)')
  if importance not in IMPORTANCE:
    raise ValueError(f'importance={importance!r} is not one of {", ".join(IMPORTANCE)}')
  if kind == 'layers':
    if not float(amount).is_integer() or not 0 <= amount < cfg.n_layers:
      raise ValueError(f'layers: n_remove={amount} must be an integer in [0, {cfg.n_layers})')
    return
  if not 0 <= amount < 1:
    raise ValueError(f'{kind}: fraction={amount!r} must be in [0, 1)')
  if kind == 'ffn' and cfg.n_experts:
    raise ValueError('ffn prunes dense MLPs; prune experts with `experts`')
  if kind == 'heads' and cfg.n_kv_heads - int(round(cfg.n_kv_heads * amount)) < 1:
    raise ValueError(f'heads: fraction={amount} would remove all {cfg.n_kv_heads} key/value heads')
  if kind == 'experts':
    if not cfg.n_experts:
      raise ValueError('experts: the model has no experts (n_experts=0)')
    n_keep = cfg.n_experts - int(round(cfg.n_experts * amount))
    if n_keep < cfg.experts_per_token:
      raise ValueError(f'experts: keeping {n_keep} experts is fewer than experts_per_token='
                       f'{cfg.experts_per_token}')


def _check_grads(importance: str, grads) -> None:
  if importance == 'taylor' and grads is None:
    raise ValueError('taylor importance needs gradients (compression.calibration.gradients)')


def _score(pieces, importance):
  """pieces: [(weight, grad or None, axis of the unit)] -> importance per unit.

  Taylor: |sum of w * g over all the unit's weights|, the first-order change in loss when the
  whole unit is removed.
  """
  total = 0.0
  for w, g, axis in pieces:
    w = np.moveaxis(np.asarray(w, np.float64), axis, 0).reshape(w.shape[axis], -1)
    if importance == 'taylor':
      g = np.moveaxis(np.asarray(g, np.float64), axis, 0).reshape(w.shape)
      total = total + np.sum(w * g, axis=1)
    elif importance == 'l1':
      total = total + np.sum(np.abs(w), axis=1)
    else:
      total = total + np.sum(np.square(w), axis=1)
  return np.abs(total) if importance == 'taylor' else total


def _keep_top(scores, n_keep: int):
  return np.sort(np.argsort(-scores, kind='stable')[:n_keep])


def _block_params(cfg, params, axis: str):
  """[(block key, {path in block: (names, dim of `axis`)})] for the parameters carrying `axis`."""
  names = layouts.names_of_config(cfg)
  out = []
  for i in range(cfg.n_layers):
    block = block_name(i)
    found = {}
    for p, n in names.items():
      if p.startswith(block + '/') and axis in n:
        found[p[len(block) + 1:]] = (n, n.index(axis))
    out.append((block, found))
  return out


def _unit_scores(cfg, params, grads, block, found, importance, group: int = 1):
  """Importance of each unit of a block, over its matmul weights (not tables, heads, routers)."""
  lay = layouts.of_config(cfg)
  flat = paths.flatten(params[block])
  gflat = None if grads is None else paths.flatten(grads[block])
  pieces = []
  for p, (_, dim) in sorted(found.items()):
    full = f'{block}/{p}'
    if full not in lay or paths.default_excluded(lay[full]):
      continue
    w, g = np.asarray(flat[p]), None if gflat is None else np.asarray(gflat[p])
    if group > 1:   # query heads: [.., heads, ..] -> [.., kv groups, heads per group, ..]
      shape = w.shape[:dim] + (w.shape[dim] // group, group) + w.shape[dim + 1:]
      w, g = w.reshape(shape), None if g is None else g.reshape(shape)
    pieces.append((w, g, dim))
  return _score(pieces, importance)


def _take_units(params, block, found, idx):
  """Keeps units `idx` along their axis in every parameter of `block` that has it."""
  flat = paths.flatten(params[block])
  for p, (_, dim) in found.items():
    flat[p] = jnp.take(flat[p], idx, axis=dim)
  params[block] = paths.unflatten(flat)


def ffn_neurons(cfg, params, fraction: float, importance: str = 'l2', grads=None):
  """Removes round(d_ff * fraction) hidden neurons of every dense MLP.

  Returns (cfg, params, {layer: kept neuron indices}).
  """
  check('ffn', cfg, fraction, importance)
  _check_grads(importance, grads)
  n_keep = cfg.d_ff - int(round(cfg.d_ff * fraction))
  params = jax_tree_copy(params)
  keep = {}
  for block, found in _block_params(cfg, params, axes.MLP):
    idx = _keep_top(_unit_scores(cfg, params, grads, block, found, importance), n_keep)
    _take_units(params, block, found, idx)
    keep[block] = idx
  return cfg.replace(d_ff=n_keep), params, keep


def attention_heads(cfg, params, fraction: float, importance: str = 'l2', grads=None):
  """Removes round(n_kv_heads * fraction) key/value groups with their query heads, per layer.

  Grouped-query models keep their grouping: a kv head and the query heads reading it go
  together. Returns (cfg, params, {layer: kept query heads}).
  """
  check('heads', cfg, fraction, importance)
  _check_grads(importance, grads)
  groups, per_group = cfg.n_kv_heads, cfg.n_heads // cfg.n_kv_heads
  n_keep = groups - int(round(groups * fraction))
  params = jax_tree_copy(params)
  keep = {}
  kv = dict(_block_params(cfg, params, axes.KV_HEADS))
  for block, found in _block_params(cfg, params, axes.HEADS):
    scores = (_unit_scores(cfg, params, grads, block, found, importance, per_group)
              + _unit_scores(cfg, params, grads, block, kv[block], importance))
    kept_groups = _keep_top(scores, n_keep)
    heads = np.concatenate([np.arange(k * per_group, (k + 1) * per_group) for k in kept_groups])
    _take_units(params, block, found, heads)
    _take_units(params, block, kv[block], kept_groups)
    keep[block] = heads
  new = cfg.replace(n_heads=n_keep * per_group, n_kv_heads=n_keep, head_dim=cfg.head_dim)
  return new, params, keep


def layers(cfg, params, n_remove: int, importance: str = 'l2', grads=None):
  """Removes the `n_remove` least important whole blocks; returns (cfg, params, kept layers)."""
  check('layers', cfg, n_remove, importance)
  _check_grads(importance, grads)
  names = [block_name(i) for i in range(cfg.n_layers)]
  scores = []
  for layer in names:
    flat = paths.flatten(params[layer])
    gflat = None if grads is None else paths.flatten(grads[layer])
    # Mean over the block's tensors of a per-weight score, so wide tensors do not dominate.
    per_tensor = [_score([(np.asarray(v).reshape(1, -1),
                           None if gflat is None else np.asarray(gflat[p]).reshape(1, -1), 0)],
                         importance)[0] / v.size for p, v in flat.items()]
    scores.append(np.mean(per_tensor))
  return keep_layers(cfg, params, _keep_top(np.array(scores), cfg.n_layers - n_remove))


def keep_layers(cfg, params, kept):
  """The blocks `kept` (ascending layer indices), renumbered 0..len-1, and everything outside
  the blocks; returns (cfg, params, kept layers)."""
  names = [block_name(i) for i in range(cfg.n_layers)]
  out = {k: v for k, v in params.items() if k not in names}
  for i, old in enumerate(kept):
    out[block_name(i)] = params[names[old]]
  return cfg.replace(n_layers=len(kept)), out, list(kept)


def every_nth_layer(cfg, params, n: int):
  """A shallower model from blocks 0, n, 2n, ... (a student initialised from its teacher, as
  DistilBERT is); returns (cfg, params, kept layers)."""
  if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= cfg.n_layers:
    raise ValueError(f'every n-th layer: n={n!r} must be an integer in [1, {cfg.n_layers}]')
  check('layers', cfg, 0)   # unrolled, unshared blocks
  return keep_layers(cfg, params, list(range(0, cfg.n_layers, n)))


def experts(cfg, params, fraction: float, importance: str = 'l2', grads=None):
  """Removes round(n_experts * fraction) experts of every MoE layer (and their router columns)."""
  check('experts', cfg, fraction, importance)
  _check_grads(importance, grads)
  n_keep = cfg.n_experts - int(round(cfg.n_experts * fraction))
  params = jax_tree_copy(params)
  keep = {}
  for block, found in _block_params(cfg, params, axes.EXPERT):
    if not found:   # a dense layer of a model with MoE every n-th layer
      continue
    idx = _keep_top(_unit_scores(cfg, params, grads, block, found, importance), n_keep)
    _take_units(params, block, found, idx)
    keep[block] = idx
  return cfg.replace(n_experts=n_keep), params, keep


def jax_tree_copy(params):
  """A structural copy (new dicts, same arrays), so the caller's tree is never modified."""
  return {k: jax_tree_copy(v) if isinstance(v, dict) else v for k, v in params.items()}


def mask_of(kind: str, cfg, params, keep: dict):
  """The masked full model equal to a structural removal: every parameter entry of a removed
  unit zeroed (FFN neurons or attention heads)."""
  if kind not in ('ffn', 'heads'):
    raise ValueError(f'no masked equivalent for {kind!r}')
  axis = axes.MLP if kind == 'ffn' else axes.HEADS
  params = jax_tree_copy(params)
  for block, found in _block_params(cfg, params, axis):
    flat = paths.flatten(params[block])
    for p, (_, dim) in found.items():
      kept = np.zeros(flat[p].shape[dim], bool)
      kept[keep[block]] = True
      shape = [1] * flat[p].ndim
      shape[dim] = -1
      flat[p] = jnp.where(kept.reshape(shape), flat[p], 0)
    params[block] = paths.unflatten(flat)
  return params
