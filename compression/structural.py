"""Structural pruning: remove FFN neurons, attention heads, whole layers or experts for real.

Each function takes a `ModelConfig` and unrolled parameters and returns a smaller config and
parameter tree (fewer FLOPs and bytes), plus the keep-indices per layer so the same removal can
be checked against the masked full model (`mask_of`). Units are ranked within each layer by
importance: 'l1' / 'l2' norms of every weight the unit owns, or 'taylor' |sum(w * g)| over them
with gradients from calibration batches. Every layer keeps the same count, since one config
describes all layers.
"""

import re
from typing import Optional

import jax.numpy as jnp
import numpy as np

from compression import paths

IMPORTANCE = ('l1', 'l2', 'taylor')


KINDS = ('ffn', 'heads', 'layers', 'experts')


def check(kind: str, cfg, amount, importance: str = 'l2', grads=None) -> None:
  """Everything removing `amount` units of `kind` can reject, from the config alone.

  `amount` is a fraction in [0, 1), or for 'layers' a number of blocks. Raises ValueError in one
  line.
  """
  if kind not in KINDS:
    raise ValueError(f'unknown structural kind {kind!r}; kinds: {", ".join(KINDS)}')
  if cfg.scan_layers or cfg.n_unique_layers is not None:
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
  if kind == 'heads' and cfg.kv_heads - int(round(cfg.kv_heads * amount)) < 1:
    raise ValueError(f'heads: fraction={amount} would remove all {cfg.kv_heads} key/value heads')
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


def _layers(params):
  return sorted((k for k in params if re.fullmatch(r'blocks_\d+', k)), key=lambda k: int(k[7:]))


def _get(tree, path):
  for k in path.split('/'):
    tree = tree[k]
  return tree


def ffn_neurons(cfg, params, fraction: float, importance: str = 'l2', grads=None):
  """Removes round(d_ff * fraction) hidden neurons of every dense MLP.

  Returns (cfg, params, {layer: kept neuron indices}).
  """
  check('ffn', cfg, fraction, importance)
  _check_grads(importance, grads)
  n_keep = cfg.d_ff - int(round(cfg.d_ff * fraction))
  params = jax_tree_copy(params)
  keep = {}
  for layer in _layers(params):
    mlp = params[layer]['mlp']
    g = None if grads is None else grads[layer]['mlp']   # `g and x`: None unless Taylor
    names = [n for n in ('up', 'gate') if n in mlp]
    pieces = [(mlp[n]['kernel'], g and g[n]['kernel'], 1) for n in names]
    pieces.append((mlp['down']['kernel'], g and g['down']['kernel'], 0))
    idx = _keep_top(_score(pieces, importance), n_keep)
    for n in names:
      mlp[n]['kernel'] = mlp[n]['kernel'][:, idx]
      if 'bias' in mlp[n]:
        mlp[n]['bias'] = mlp[n]['bias'][idx]
    mlp['down']['kernel'] = mlp['down']['kernel'][idx]
    keep[layer] = idx
  return cfg.replace(d_ff=n_keep), params, keep


def attention_heads(cfg, params, fraction: float, importance: str = 'l2', grads=None):
  """Removes round(kv_heads * fraction) key/value groups with their query heads, per layer.

  Grouped-query models keep their grouping: a kv head and the query heads reading it go
  together. Returns (cfg, params, {layer: kept query heads}).
  """
  check('heads', cfg, fraction, importance)
  _check_grads(importance, grads)
  groups, per_group, h = cfg.kv_heads, cfg.n_heads // cfg.kv_heads, cfg.head_size
  n_keep = groups - int(round(groups * fraction))
  params = jax_tree_copy(params)
  keep = {}
  for layer in _layers(params):
    attn = params[layer]['attn']
    g = None if grads is None else grads[layer]['attn']
    q = lambda t: np.asarray(t).reshape(t.shape[:1] + (groups, per_group * h) + t.shape[3:])
    pieces = [(q(attn['query']['kernel']), g and q(g['query']['kernel']), 1),
              (attn['key']['kernel'], g and g['key']['kernel'], 1),
              (attn['value']['kernel'], g and g['value']['kernel'], 1),
              (np.asarray(attn['out']['kernel']).reshape(groups, per_group * h, -1),
               g and np.asarray(g['out']['kernel']).reshape(groups, per_group * h, -1), 0)]
    kept_groups = _keep_top(_score(pieces, importance), n_keep)
    heads = np.concatenate([np.arange(k * per_group, (k + 1) * per_group) for k in kept_groups])
    for name, idx, axis in (('query', heads, 1), ('key', kept_groups, 1),
                            ('value', kept_groups, 1), ('out', heads, 0)):
      leaf = attn[name]
      leaf['kernel'] = jnp.take(leaf['kernel'], idx, axis=axis)
      if 'bias' in leaf and name != 'out':
        leaf['bias'] = jnp.take(leaf['bias'], idx, axis=0)
    keep[layer] = heads
  new = cfg.replace(n_heads=n_keep * per_group,
                    n_kv_heads=None if cfg.n_kv_heads is None else n_keep, head_dim=h)
  return new, params, keep


def layers(cfg, params, n_remove: int, importance: str = 'l2', grads=None):
  """Removes the `n_remove` least important whole blocks; returns (cfg, params, kept layers)."""
  check('layers', cfg, n_remove, importance)
  _check_grads(importance, grads)
  names = _layers(params)
  scores = []
  for layer in names:
    flat = paths.flatten(params[layer])
    gflat = None if grads is None else paths.flatten(grads[layer])
    # Mean over the block's tensors of a per-weight score, so wide tensors do not dominate.
    per_tensor = [_score([(np.asarray(v).reshape(1, -1),
                           None if gflat is None else np.asarray(gflat[p]).reshape(1, -1), 0)],
                         importance)[0] / v.size for p, v in flat.items()]
    scores.append(np.mean(per_tensor))
  kept = _keep_top(np.array(scores), cfg.n_layers - n_remove)
  out = {k: v for k, v in params.items() if k not in names}
  for i, old in enumerate(kept):
    out[f'blocks_{i}'] = params[names[old]]
  return cfg.replace(n_layers=len(kept)), out, kept


def experts(cfg, params, fraction: float, importance: str = 'l2', grads=None):
  """Removes round(n_experts * fraction) experts of every MoE layer (and their router columns)."""
  check('experts', cfg, fraction, importance)
  _check_grads(importance, grads)
  n_keep = cfg.n_experts - int(round(cfg.n_experts * fraction))
  params = jax_tree_copy(params)
  keep = {}
  for layer in _layers(params):
    mlp = params[layer]['mlp']
    if 'router' not in mlp:
      continue
    g = None if grads is None else grads[layer]['mlp']
    names = [n for n in ('up', 'gate', 'down') if n in mlp]
    idx = _keep_top(_score([(mlp[n], g and g[n], 0) for n in names], importance), n_keep)
    for n in names:
      mlp[n] = mlp[n][idx]
    mlp['router']['kernel'] = mlp['router']['kernel'][:, idx]
    keep[layer] = idx
  return cfg.replace(n_experts=n_keep), params, keep


def jax_tree_copy(params):
  """A structural copy (new dicts, same arrays), so the caller's tree is never modified."""
  return {k: jax_tree_copy(v) if isinstance(v, dict) else v for k, v in params.items()}


def mask_of(kind: str, cfg, params, keep: dict, n_heads_before: Optional[int] = None):
  """The masked full model equal to a structural removal: removed units' weights zeroed."""
  params = jax_tree_copy(params)
  for layer, idx in keep.items():
    if kind == 'ffn':
      mlp = params[layer]['mlp']
      m = np.zeros(mlp['down']['kernel'].shape[0], bool)
      m[idx] = True
      mlp['down']['kernel'] = jnp.where(m[:, None], mlp['down']['kernel'], 0)
    elif kind == 'heads':
      out = params[layer]['attn']['out']
      m = np.zeros(out['kernel'].shape[0], bool)
      m[idx] = True
      out['kernel'] = jnp.where(m[:, None, None], out['kernel'], 0)
    else:
      raise ValueError(f'no masked equivalent for {kind!r}')
  return params
