"""Mixture-of-Experts feed-forward: a router picks k of E expert MLPs for every token.

Routing: softmax over the router's logits (float32), the top k probabilities are the token's
weights, renormalised to sum to 1 when k > 1 (Mixtral); k = 1 keeps the raw probability (Switch),
so the router still gets a gradient. Optional multiplicative jitter on the router input during
training, optional shared experts applied to every token.

Two dispatch paths, picked by `moe_dispatch`:
  'dropless'  every assignment is computed: assignments are sorted by expert and run through
              grouped matmuls (`lax.ragged_dot`), so no token is ever dropped;
  'capacity'  each expert takes at most C = ceil(capacity_factor * L * k / E) tokens of every
              row of L tokens (first choices before second choices, then in token order);
              overflow assignments are dropped and the token keeps its residual stream.

Expert parallelism: when the rules map the `expert` axis onto a mesh axis of size > 1, the
dispatch runs under `jax.shard_map` with each device holding E / ep experts: the capacity path
exchanges its fixed-size expert buffers with two all-to-alls; the dropless path all-gathers the
tokens of the expert group, runs the local experts on them and reduce-scatters the results.

Router statistics are sown into the 'moe' collection (see `summarize`) for the auxiliary losses
and the training metrics.
"""

import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from models import axes
from models.config import ModelConfig
from models import layers
from models.layers import ACTIVATION_FNS, Linear, Mlp

STATS = ('aux_loss', 'z_loss', 'entropy', 'dropped', 'load')


class Routing(NamedTuple):
  experts: jax.Array   # [M, X] int32 chosen experts, best first
  weights: jax.Array   # [M, X] float32 combine weights
  probs: jax.Array     # [M, E] float32 router probabilities
  logits: jax.Array    # [M, E] float32 router logits


def route(logits_MxE: jax.Array, k: int) -> Routing:
  """Top-k softmax routing; weights renormalised over the chosen experts when k > 1."""
  logits_MxE = logits_MxE.astype(jnp.float32)
  probs = jax.nn.softmax(logits_MxE, axis=-1)
  weights, experts = lax.top_k(probs, k)
  if k > 1:
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
  return Routing(experts.astype(jnp.int32), weights, probs, logits_MxE)


def router_stats(r: Routing, n_experts: int) -> dict:
  """Load-balancing loss (Switch form, 1.0 when balanced), router z-loss, entropy and load.

  load[e] is the fraction of all N*k assignments that went to expert e (sums to 1);
  aux_loss = E * sum_e load[e] * mean_prob[e].
  """
  load = jnp.mean(jax.nn.one_hot(r.experts, n_experts, dtype=jnp.float32), axis=(0, 1))
  importance = jnp.mean(r.probs, axis=0)
  log_probs = jax.nn.log_softmax(r.logits, axis=-1)
  return dict(aux_loss=n_experts * jnp.sum(load * importance),
              z_loss=jnp.mean(jnp.square(jax.nn.logsumexp(r.logits, axis=-1))),
              entropy=jnp.mean(-jnp.sum(r.probs * log_probs, axis=-1)), load=load)


def capacity(tokens_per_group: int, k: int, n_experts: int, factor: float) -> int:
  return max(1, math.ceil(factor * tokens_per_group * k / n_experts))


def capacity_masks(experts_BxLxX, weights_BxLxX, n_experts: int, cap: int):
  """(dispatch [B,L,E,C] 0/1, combine [B,L,E,C] weights, kept [B,L,X]) for each row.

  Slots are handed out to all first choices of a group in token order, then second choices, ...
  """
  b, l, x = experts_BxLxX.shape
  onehot_BxLxXxE = jax.nn.one_hot(experts_BxLxX, n_experts, dtype=jnp.int32)
  by_choice = onehot_BxLxXxE.transpose(0, 2, 1, 3).reshape(b, x * l, n_experts)
  slot = (jnp.cumsum(by_choice, axis=1) - 1) * by_choice
  slot_BxLxX = jnp.sum(slot.reshape(b, x, l, n_experts).transpose(0, 2, 1, 3), axis=-1)
  kept_BxLxX = slot_BxLxX < cap
  slot_onehot = jax.nn.one_hot(jnp.where(kept_BxLxX, slot_BxLxX, cap), cap, dtype=jnp.float32)
  expert_onehot = onehot_BxLxXxE.astype(jnp.float32)
  dispatch = jnp.einsum('blxe,blxc->blec', expert_onehot, slot_onehot)
  combine = jnp.einsum('blxe,blxc,blx->blec', expert_onehot, slot_onehot,
                       weights_BxLxX.astype(jnp.float32))
  return dispatch, combine, kept_BxLxX


def _expert_mlp(mm, x, w: dict, cfg: ModelConfig):
  """The expert MLP (SwiGLU or plain) with `mm(x, kernel)` as its matmul."""
  act = ACTIVATION_FNS[cfg.activation]
  up = mm(x, w['up'])
  h = act(mm(x, w['gate'])) * up if cfg.mlp == 'swiglu' else act(up)
  return mm(h, w['down'])


def experts_dense(x_ExMxD, w: dict, cfg: ModelConfig, dtype):
  """Each expert's MLP on its own [M, D] slab (the capacity path's fixed-size buffers)."""
  mm = lambda x, kernel: layers.expert_dot(x, kernel, dtype)
  return _expert_mlp(mm, x_ExMxD, w, cfg)


def experts_ragged(x_MxD, group_sizes_E, w: dict, cfg: ModelConfig, dtype, rows_M=None):
  """Expert MLPs on rows sorted by expert: rows [sum(sizes[:e]), sum(sizes[:e+1])) use expert e.

  Rows past sum(group_sizes) come out as zeros; `rows_M` is the token each row came from.
  """
  mm = lambda x, kernel: layers.ragged_dot(x, kernel, group_sizes_E, dtype, rows_M)
  return _expert_mlp(mm, x_MxD, w, cfg)


def dispatch_capacity(x_BxLxD, r_experts, r_weights, w, cfg, dtype, cap, expert_axis=None):
  """Capacity-based dispatch of groups (rows); returns (out [B,L,D], kept [B,L,X])."""
  n_experts = cfg.n_experts
  dispatch, combine, kept = capacity_masks(r_experts, r_weights, n_experts, cap)
  x_ExBxCxD = jnp.einsum('blec,bld->ebcd', dispatch.astype(dtype), x_BxLxD.astype(dtype))
  d = x_ExBxCxD.shape[-1]
  if expert_axis is not None:   # send each expert's slots to the device holding that expert
    x_ExBxCxD = lax.all_to_all(x_ExBxCxD, expert_axis, 0, 1, tiled=True)
  y = experts_dense(x_ExBxCxD.reshape(x_ExBxCxD.shape[0], -1, d), w, cfg, dtype)
  y_ExBxCxD = y.reshape(x_ExBxCxD.shape[:3] + (d,))
  if expert_axis is not None:
    y_ExBxCxD = lax.all_to_all(y_ExBxCxD, expert_axis, 1, 0, tiled=True)
  out = jnp.einsum('blec,ebcd->bld', combine.astype(dtype), y_ExBxCxD.astype(dtype))
  return out, kept


def dispatch_dropless(x_MxD, r_experts, r_weights, w, cfg, dtype, first_expert=0):
  """Dropless dispatch: sort the N*k assignments by expert, grouped matmuls, weighted scatter.

  Only experts [first_expert, first_expert + local experts) are computed (all of them on one
  device); the other assignments contribute nothing here.
  """
  n, k = r_experts.shape
  n_local = w['down'].shape[0]
  local = r_experts.reshape(-1) - first_expert
  key = jnp.where((local >= 0) & (local < n_local), local, n_local)   # n_local: not here
  order = jnp.argsort(key, stable=True)
  token = order // k
  sizes = jnp.bincount(key, length=n_local + 1)[:n_local].astype(jnp.int32)
  y = experts_ragged(x_MxD[token], sizes, w, cfg, dtype, token)
  y = y * r_weights.reshape(-1)[order][:, None].astype(y.dtype)
  return jnp.zeros_like(x_MxD, dtype=y.dtype).at[token].add(y)


class MoeMlp(nn.Module):
  """The MoE feed-forward block: [B, T, D] -> [B, T, D]; sows router statistics into 'moe'."""
  config: ModelConfig
  out_init_std: float = 0.02

  @nn.compact
  def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
    cfg = self.config
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    b, l, d = x_BxLxD.shape
    e, f = cfg.n_experts, cfg.moe_d_ff

    router_in = x_BxLxD
    if cfg.router_jitter > 0 and self.has_rng('jitter'):
      noise = jax.random.uniform(self.make_rng('jitter'), x_BxLxD.shape, jnp.float32,
                                 1.0 - cfg.router_jitter, 1.0 + cfg.router_jitter)
      router_in = (x_BxLxD.astype(jnp.float32) * noise).astype(x_BxLxD.dtype)
    logits = Linear((d,), (e,), (axes.EMBED,), (axes.EXPERT,), dtype=jnp.float32,
                    param_dtype=param_dtype, init_std=cfg.init_std, name='router')(router_in)
    r = route(logits.reshape(b * l, e), cfg.experts_per_token)

    kernel = lambda name, shape, names, std: layers.weight(
        self, name, nn.initializers.normal(std), shape, names, param_dtype)
    w = dict(up=kernel('up', (e, d, f), (axes.EXPERT, axes.EMBED, axes.MLP), cfg.init_std),
             down=kernel('down', (e, f, d), (axes.EXPERT, axes.MLP, axes.EMBED),
                         self.out_init_std))
    if cfg.mlp == 'swiglu':
      w['gate'] = kernel('gate', (e, d, f), (axes.EXPERT, axes.EMBED, axes.MLP), cfg.init_std)

    out, kept = self._dispatch(x_BxLxD, r.experts.reshape(b, l, -1),
                               r.weights.reshape(b, l, -1), w, dtype)
    stats = router_stats(r, e)
    stats['dropped'] = 1.0 - jnp.mean(kept.astype(jnp.float32))
    self.sow('moe', 'stats', stats)
    out = nn.with_logical_constraint(out.astype(dtype), (axes.BATCH, axes.LENGTH, axes.EMBED))
    if cfg.n_shared_experts:
      shared = Mlp(cfg.replace(d_ff=f * cfg.n_shared_experts), self.out_init_std, name='shared')
      out = out + shared(x_BxLxD)
    return out

  def _dispatch(self, x_BxLxD, experts_BxLxX, weights_BxLxX, w, dtype):
    cfg = self.config
    cap = capacity(x_BxLxD.shape[1], cfg.experts_per_token, cfg.n_experts, cfg.capacity_factor)
    mesh, expert_axis, batch_axes = _expert_parallel_mesh()

    def local(x, ex, wt, w, first_expert=0, axis=None):
      if cfg.moe_dispatch == 'capacity':
        return dispatch_capacity(x, ex, wt, w, cfg, dtype, cap, axis)
      bl, tl, dl = x.shape
      out = dispatch_dropless(x.reshape(bl * tl, dl), ex.reshape(bl * tl, -1),
                              wt.reshape(bl * tl, -1), w, cfg, dtype, first_expert)
      return out.reshape(bl, tl, dl), jnp.ones(ex.shape, jnp.bool_)

    if expert_axis is None:
      return local(x_BxLxD, experts_BxLxX, weights_BxLxX, w)
    ep = mesh.shape[expert_axis]
    if cfg.n_experts % ep:
      raise ValueError(f'n_experts={cfg.n_experts} does not divide over the {expert_axis!r} '
                       f'mesh axis of size {ep}')

    def sharded(x, ex, wt, w):
      if cfg.moe_dispatch == 'capacity':
        return local(x, ex, wt, w, axis=expert_axis)
      # Dropless: every device of the expert group sees the group's tokens, runs its own
      # experts on them, and the partial outputs are summed back onto the tokens' owners.
      gather = lambda a: lax.all_gather(a, expert_axis, axis=0, tiled=True)
      first = lax.axis_index(expert_axis) * (cfg.n_experts // ep)
      out, kept = local(gather(x), gather(ex), gather(wt), w, first_expert=first)
      out = lax.psum_scatter(out, expert_axis, scatter_dimension=0, tiled=True)
      return out, kept[:x.shape[0]]

    rows = P(batch_axes)
    w_spec = {name: P(expert_axis) for name in w}
    return jax.shard_map(sharded, mesh=mesh, in_specs=(rows, rows, rows, w_spec),
                         out_specs=(rows, rows), check_vma=False)(
                             x_BxLxD, experts_BxLxX, weights_BxLxX, w)


def _expert_parallel_mesh():
  """(mesh, expert mesh axis, batch mesh axes) when experts are split over devices, else Nones."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return None, None, None
  expert = nn.logical_to_mesh_axes((axes.EXPERT,))[0]
  if expert is None:
    return None, None, None
  if not isinstance(expert, str):
    raise ValueError(f'the expert axis must map to one mesh axis, not {expert}')
  if mesh.shape[expert] == 1:
    return None, None, None
  batch = nn.logical_to_mesh_axes((axes.BATCH,))[0]
  batch = () if batch is None else (batch,) if isinstance(batch, str) else tuple(batch)
  if expert not in batch:
    raise ValueError(f'expert parallelism needs the batch split over {expert!r} too (the '
                     f'rules split it over {batch}); use the ep preset')
  return mesh, expert, batch


def summarize(moe_collection) -> dict:
  """Mean over MoE layers of each statistic sown by `MoeMlp` ('load' stays per expert).

  Also returns 'load_per_layer' [layers, E]. Empty dict for a dense model.
  """
  found = {name: [] for name in STATS}

  def visit(tree):
    if isinstance(tree, dict) and set(STATS) <= set(tree):
      for name in STATS:
        value = jnp.asarray(tree[name])
        found[name].append(value.reshape((-1,) + ((value.shape[-1],) if name == 'load' else ())))
      return
    children = tree.values() if isinstance(tree, dict) else tree if isinstance(
        tree, (list, tuple)) else ()
    for child in children:
      visit(child)

  visit(moe_collection)
  if not found['load']:
    return {}
  out = {name: jnp.mean(jnp.concatenate(found[name])) for name in STATS if name != 'load'}
  per_layer = jnp.concatenate(found['load'])
  return dict(out, load=jnp.mean(per_layer, axis=0), load_per_layer=per_layer)



METRICS = ('moe_aux_loss', 'moe_z_loss', 'router_entropy', 'dropped', 'expert_load',
           'expert_load_per_layer')


def router_loss(moe_collection, cfg: ModelConfig):
  """(the per-token router loss, router metrics) from the 'moe' collection of one forward pass.

  The loss is router_aux_weight * load-balancing loss + router_z_weight * router z-loss, both
  means over MoE layers; the metrics are named as in `METRICS`. A dense model gives (0.0, {}).
  """
  stats = summarize(moe_collection)
  if not stats:
    return 0.0, {}
  loss = cfg.router_aux_weight * stats['aux_loss'] + cfg.router_z_weight * stats['z_loss']
  return loss, dict(moe_aux_loss=stats['aux_loss'], moe_z_loss=stats['z_loss'],
                    router_entropy=stats['entropy'], dropped=stats['dropped'],
                    expert_load=stats['load'], expert_load_per_layer=stats['load_per_layer'])
