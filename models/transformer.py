"""The decoder-only Transformer: `Transformer(config).apply({'params': p}, tokens)` -> logits."""

import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import axes
from models.attention import Attention, Geometry
from models.config import ModelConfig
from models.layers import Embed, Linear, Mlp, Norm
from models.moe import MoeMlp

REMAT_POLICIES = {
    'full': None,  # save nothing: recompute the whole block in the backward pass
    'dots': jax.checkpoint_policies.checkpoint_dots,
    'dots_no_batch': jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class Block(nn.Module):
  """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)) (MoE where `moe`)."""
  config: ModelConfig
  moe: bool = False

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array, geo: Geometry, kv=None):
    cfg = self.config
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    # GPT-2's scaled init of residual projections keeps the residual stream's variance bounded.
    out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
    norm = lambda name: Norm(cfg.norm, cfg.norm_eps, dtype, param_dtype, name=name)
    h_BxTxD, kv = Attention(cfg, out_std, name='attn')(norm('attn_norm')(x_BxTxD), geo, kv)
    x_BxTxD = x_BxTxD + h_BxTxD
    mlp = MoeMlp(cfg, out_std, name='mlp') if self.moe else Mlp(cfg, out_std, name='mlp')
    x_BxTxD = x_BxTxD + mlp(norm('mlp_norm')(x_BxTxD))
    x_BxTxD = nn.with_logical_constraint(x_BxTxD, (axes.BATCH, axes.LENGTH, axes.EMBED))
    return x_BxTxD, kv


def block_class(cfg: ModelConfig):
  """The block, wrapped in remat and/or scan as the config asks."""
  cls = Block
  if cfg.remat != 'none':
    cls = nn.remat(cls, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
  if cfg.scan_layers:
    cls = nn.scan(cls, variable_axes={'params': 0, 'moe': 0},
                  split_rngs={'params': True, 'jitter': True},
                  in_axes=(nn.broadcast, 0), length=cfg.unique_layers,
                  metadata_params={nn.PARTITION_NAME: axes.LAYERS})
  return cls


class Transformer(nn.Module):
  """Decoder-only language model (Llama or GPT-2 family, see `ModelConfig`).

  `__call__(tokens, positions=None, segment_ids=None, cache=None)` returns float32 logits
  [batch, length, vocab]; with a cache (see `models.attention.init_cache`) it returns
  `(logits, new_cache)` after appending the chunk to the cache.

  Parameters: `embed`, `pos_embed` (learned positions), `blocks_{i}` for each of the
  `n_unique_layers` blocks (or one stacked `blocks` under `scan_layers`), `final_norm`,
  `lm_head` (untied head). Layer l uses block l mod n_unique_layers.

  MoE layers sow router statistics into the 'moe' collection: apply with `mutable=['moe']` to
  read them (`models.moe.summarize`), and pass `rngs={'jitter': key}` for router jitter.
  """
  config: ModelConfig

  @nn.compact
  def __call__(self, tokens_BxT: jax.Array, positions: Optional[jax.Array] = None,
               segment_ids: Optional[jax.Array] = None, cache: Optional[dict] = None):
    cfg = self.config
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    b, t = tokens_BxT.shape
    if positions is None:
      start = 0 if cache is None else cache['index']
      positions = jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), (b, t))

    embed = Embed(cfg.vocab_size, cfg.d_model, axes.VOCAB, dtype, param_dtype, cfg.init_std,
                  name='embed')
    x_BxTxD = embed(tokens_BxT)
    if cfg.position == 'learned':
      x_BxTxD = x_BxTxD + Embed(cfg.max_len, cfg.d_model, axes.POSITION, dtype, param_dtype,
                                cfg.init_std, name='pos_embed')(positions)
    x_BxTxD = nn.with_logical_constraint(x_BxTxD, (axes.BATCH, axes.LENGTH, axes.EMBED))

    geo, new_cache = _geometry(positions, segment_ids, cache, t)
    x_BxTxD, new_cache = self._layers(x_BxTxD, geo, cache, new_cache)

    x_BxTxD = Norm(cfg.norm, cfg.norm_eps, dtype, param_dtype, name='final_norm')(x_BxTxD)
    if cfg.tie_embeddings:
      logits_BxTxV = embed.attend(x_BxTxD)
    else:
      logits_BxTxV = Linear((cfg.d_model,), (cfg.vocab_size,), (axes.EMBED,), (axes.VOCAB,),
                            dtype=dtype, param_dtype=param_dtype, init_std=cfg.init_std,
                            name='lm_head')(x_BxTxD)
    logits_BxTxV = nn.with_logical_constraint(logits_BxTxV.astype(jnp.float32),
                                              (axes.BATCH, axes.LENGTH, axes.VOCAB))
    return logits_BxTxV if cache is None else (logits_BxTxV, new_cache)

  def _layers(self, x_BxTxD, geo, cache, new_cache):
    cfg = self.config
    u, repeats = cfg.unique_layers, cfg.n_layers // cfg.unique_layers
    cls = block_class(cfg)
    if cfg.scan_layers:   # one stacked module, applied `repeats` times
      blocks = [cls(cfg, cfg.is_moe_layer(0), name='blocks')] * repeats
      group = u                                       # layers handled per call
    else:
      blocks = [cls(cfg, cfg.is_moe_layer(i), name=f'blocks_{i}') for i in range(u)] * repeats
      group = 1
    ks, vs = [], []
    for call, block in enumerate(blocks):
      lo, hi = call * group, (call + 1) * group
      kv = None
      if cache is not None:
        kv = (cache['k'][lo:hi], cache['v'][lo:hi])
        if not cfg.scan_layers:
          kv = (kv[0][0], kv[1][0])
      x_BxTxD, kv = block(x_BxTxD, geo, kv)
      if cache is not None:
        k, v = kv if cfg.scan_layers else (kv[0][None], kv[1][None])
        ks.append(k)
        vs.append(v)
    if cache is not None:
      new_cache = dict(new_cache, k=jnp.concatenate(ks), v=jnp.concatenate(vs))
    return x_BxTxD, new_cache


def _geometry(positions, segment_ids, cache, t):
  """Builds the attention geometry and the cache's new bookkeeping (positions, segments, index)."""
  if cache is None:
    return Geometry(positions, segment_ids), None
  b, length = cache['pos'].shape
  seg = jnp.ones_like(positions) if segment_ids is None else segment_ids
  n = min(t, length)
  slots = (cache['index'] + (t - n) + jnp.arange(n)) % length
  geo = Geometry(positions, seg, jnp.concatenate([cache['pos'], positions], axis=1),
                 jnp.concatenate([cache['seg'], seg], axis=1), slots)
  new_cache = dict(cache, pos=cache['pos'].at[:, slots].set(positions[:, t - n:]),
                   seg=cache['seg'].at[:, slots].set(seg[:, t - n:]), index=cache['index'] + t)
  return geo, new_cache


def stack_layers(params: dict, cfg: ModelConfig) -> dict:
  """Unrolled parameters (`blocks_{i}`) -> the `scan_layers` layout (one stacked `blocks`)."""
  out = {k: v for k, v in params.items() if not k.startswith('blocks_')}
  layers = [params[f'blocks_{i}'] for i in range(cfg.unique_layers)]
  out['blocks'] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
  return out


def unstack_layers(params: dict, cfg: ModelConfig) -> dict:
  """The `scan_layers` layout -> unrolled parameters (`blocks_{i}`)."""
  out = {k: v for k, v in params.items() if k != 'blocks'}
  for i in range(cfg.unique_layers):
    out[f'blocks_{i}'] = jax.tree.map(lambda x, i=i: x[i], params['blocks'])
  return out
