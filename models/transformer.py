"""The decoder-only Transformer: `Transformer(config).apply({'params': p}, tokens)` -> logits."""

import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import axes
from models.attention import Attention, Geometry, chunk_mask, probabilities, rope
from models.config import ModelConfig
from models.layers import WEIGHT_DOT, Embed, Linear, Mlp, Norm
from models.moe import MoeMlp

_policies = jax.checkpoint_policies
_weight_dots = _policies.save_only_these_names(WEIGHT_DOT)
REMAT_POLICIES = {
    'full': None,  # save nothing: recompute the whole block in the backward pass
    # Weight contractions (`models.layers.dot`, named WEIGHT_DOT) and any other dot.
    'dots': _policies.save_from_both_policies(_policies.checkpoint_dots, _weight_dots),
    # Weight contractions only: not the attention scores (dots with batch dims).
    'dots_no_batch': _policies.save_from_both_policies(
        _policies.checkpoint_dots_with_no_batch_dims, _weight_dots),
}


class Block(nn.Module):
  """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)) (MoE where `moe`)."""
  config: ModelConfig
  moe: bool = False

  @nn.compact
  def __call__(self, x_BxLxD: jax.Array, geo: Geometry, kv=None):
    cfg = self.config
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    # GPT-2's scaled init of residual projections keeps the residual stream's variance bounded.
    out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
    norm = lambda name: Norm(cfg.norm, cfg.norm_eps, dtype, param_dtype, name=name)
    h_BxLxD, kv = Attention(cfg, out_std, name='attn')(norm('attn_norm')(x_BxLxD), geo, kv)
    x_BxLxD = x_BxLxD + h_BxLxD
    mlp = MoeMlp(cfg, out_std, name='mlp') if self.moe else Mlp(cfg, out_std, name='mlp')
    x_BxLxD = x_BxLxD + mlp(norm('mlp_norm')(x_BxLxD))
    x_BxLxD = nn.with_logical_constraint(x_BxLxD, (axes.BATCH, axes.LENGTH, axes.EMBED))
    return x_BxLxD, kv


def block_class(cfg: ModelConfig):
  """The block, wrapped in remat and/or scan as the config asks."""
  cls = Block
  if cfg.remat != 'none':
    cls = nn.remat(cls, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
  if cfg.scan_layers:
    cls = nn.scan(cls, variable_axes={'params': 0, 'moe': 0},
                  split_rngs={'params': True, 'jitter': True},
                  in_axes=(nn.broadcast, 0), length=cfg.n_unique_layers,
                  metadata_params={nn.PARTITION_NAME: axes.LAYERS})
  return cls


class Transformer(nn.Module):
  """Decoder-only language model (Llama or GPT-2 family, see `ModelConfig`).

  `__call__(tokens, positions=None, segment_ids=None, cache=None)` returns float32 logits
  [batch, length, vocab]; with a cache (see `models.attention.init_cache`) it returns
  `(logits, new_cache)` after appending the chunk to the cache. With `cache_window=W` the
  chunk reads only the W cache entries just before the index: the caller guarantees that all
  it may attend lies there (the serving engine tracks its requests' spans), and a decode step
  then reads W entries instead of the whole cache.

  Parameters: `embed`, `pos_embed` (learned positions), `blocks_{i}` for each of the
  `n_unique_layers` blocks (or one stacked `blocks` under `scan_layers`), `final_norm`,
  `lm_head` (untied head). Layer l uses block l mod n_unique_layers.

  `layers_fn(x, geometry) -> (x, extra)` replaces the blocks (cache-less calls of a scanned
  model): the pipeline (`sharding.pipeline`) runs them from parameters it holds itself, and
  its `extra` (router statistics) is sown into 'moe' as 'pipeline'. The call then returns the
  residual stream after the layers [B, L, D]; `output_logits` turns it into logits.

  MoE layers sow router statistics into the 'moe' collection: apply with `mutable=['moe']` to
  read them (`models.moe.summarize`), and pass `rngs={'jitter': key}` for router jitter.
  """
  config: ModelConfig

  @nn.compact
  def __call__(self, tokens_BxL: jax.Array, positions: Optional[jax.Array] = None,
               segment_ids: Optional[jax.Array] = None, cache: Optional[dict] = None,
               cache_window: Optional[int] = None, layers_fn=None):
    cfg = self.config
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    b, length = tokens_BxL.shape
    if positions is None:
      start = 0 if cache is None else cache['index']
      positions = jnp.broadcast_to(start + jnp.arange(length, dtype=jnp.int32), (b, length))

    embed = _token_embedding(cfg)
    x_BxLxD = embed(tokens_BxL)
    if cfg.position == 'learned':
      x_BxLxD = x_BxLxD + Embed(cfg.max_len, cfg.d_model, axes.POSITION, dtype, param_dtype,
                                cfg.init_std, name='pos_embed')(positions)
    x_BxLxD = nn.with_logical_constraint(x_BxLxD, (axes.BATCH, axes.LENGTH, axes.EMBED))

    geo, new_cache = geometry(positions, segment_ids, cache, length, cache_window)
    if layers_fn is None:
      x_BxLxD, new_cache = self._layers(x_BxLxD, geo, cache, new_cache)
    elif cache is not None:
      raise ValueError('layers_fn runs cache-less calls only (the pipeline trains and evaluates)')
    else:
      x_BxLxD, extra = layers_fn(x_BxLxD, geo)
      if extra:
        self.sow('moe', 'pipeline', extra)
      return x_BxLxD   # the caller ends the forward (`output_logits`), a microbatch at a time

    norm, head = _output_modules(cfg, embed)
    return (_logits(head(norm(x_BxLxD))) if cache is None
            else (_logits(head(norm(x_BxLxD))), new_cache))

  def _layers(self, x_BxLxD, geo, cache, new_cache):
    cfg = self.config
    u, repeats = cfg.n_unique_layers, cfg.n_layers // cfg.n_unique_layers
    cls = block_class(cfg)
    if cfg.scan_layers:   # one stacked module, applied `repeats` times
      blocks = [cls(cfg, cfg.is_moe_layer(0), name='blocks')] * repeats
    else:
      blocks = [cls(cfg, cfg.is_moe_layer(i), name=block_name(i)) for i in range(u)] * repeats
    ks, vs = [], []
    for call, block in enumerate(blocks):
      kv = None if cache is None else (cache['k'][call], cache['v'][call])
      x_BxLxD, kv = block(x_BxLxD, geo, kv)
      if cache is not None:
        ks.append(kv[0])
        vs.append(kv[1])
    if cache is not None:
      new_cache = dict(new_cache, k=tuple(ks), v=tuple(vs))
    return x_BxLxD, new_cache


def _token_embedding(cfg: ModelConfig) -> Embed:
  return Embed(cfg.vocab_size, cfg.d_model, axes.VOCAB, jnp.dtype(cfg.dtype),
               jnp.dtype(cfg.param_dtype), cfg.init_std, name='embed')


def _output_modules(cfg: ModelConfig, embed: Embed) -> tuple:
  """(final norm, output head): bound to the model inside its call, standalone elsewhere."""
  dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
  norm = Norm(cfg.norm, cfg.norm_eps, dtype, param_dtype, name='final_norm')
  if cfg.tie_embeddings:
    return norm, embed.attend
  return norm, Linear((cfg.d_model,), (cfg.vocab_size,), (axes.EMBED,), (axes.VOCAB,),
                      dtype=dtype, param_dtype=param_dtype, init_std=cfg.init_std,
                      name='lm_head')


def _logits(logits_BxLxV):
  return nn.with_logical_constraint(logits_BxLxV.astype(jnp.float32),
                                    (axes.BATCH, axes.LENGTH, axes.VOCAB))


def output_logits(cfg: ModelConfig, params: dict, x_BxLxD: jax.Array) -> jax.Array:
  """The end of `Transformer.__call__` on its own: the final norm and the output head of
  `params` on the residual stream `x` -> float32 logits (the pipeline's head, run a
  microbatch at a time)."""
  embed = _token_embedding(cfg)
  norm, head = _output_modules(cfg, embed)
  x_BxLxD = norm.apply({'params': params['final_norm']}, x_BxLxD)
  if cfg.tie_embeddings:   # the head is the embedding table's transpose
    return _logits(embed.apply({'params': params['embed']}, x_BxLxD, method=Embed.attend))
  return _logits(head.apply({'params': params['lm_head']}, x_BxLxD))


def geometry(pos_BxL, segment_ids, cache, length, window=None):
  """The attention geometry of a chunk of `length` tokens and the cache's new bookkeeping
  (positions, segments, index); shared by every layer of one call."""
  if cache is None:
    return Geometry(pos_BxL, segment_ids), None
  n_slots = cache['pos'].shape[1]
  seg_BxL = jnp.ones_like(pos_BxL) if segment_ids is None else segment_ids
  n = min(length, n_slots)   # the chunk's last n tokens are written to the cache
  slots = (cache['index'] + (length - n) + jnp.arange(n)) % n_slots
  read, cached_pos, cached_seg = None, cache['pos'], cache['seg']
  # A window that leaves room for the chunk: the entries read and written are disjoint.
  if window is not None and window + n <= n_slots:
    read = (cache['index'] - window + jnp.arange(window)) % n_slots
    cached_pos, cached_seg = cache['pos'][:, read], cache['seg'][:, read]
  geo = Geometry(pos_BxL, seg_BxL, jnp.concatenate([cached_pos, pos_BxL], axis=1),
                 jnp.concatenate([cached_seg, seg_BxL], axis=1), slots, read)
  new_cache = dict(cache, pos=cache['pos'].at[:, slots].set(pos_BxL[:, length - n:]),
                   seg=cache['seg'].at[:, slots].set(seg_BxL[:, length - n:]),
                   index=cache['index'] + length)
  return geo, new_cache


def capture_blocks(module: nn.Module, method_name: str) -> bool:
  """`apply(..., capture_intermediates=capture_blocks, mutable=['intermediates'])` records each
  block's output (the residual stream after it) for `block_outputs`."""
  return method_name == '__call__' and isinstance(module, Block)


def block_outputs(intermediates: dict, cfg: ModelConfig) -> list:
  """The residual stream [B, L, D] after each of the `n_layers` layers, from what
  `capture_blocks` recorded (unrolled layers; a shared block once per call)."""
  if cfg.scan_layers:
    raise ValueError('block outputs are read from unrolled layers (scan_layers=False)')
  u = cfg.n_unique_layers
  return [intermediates[block_name(i % u)]['__call__'][i // u][0] for i in range(cfg.n_layers)]


def capture_attention(module: nn.Module, method_name: str) -> bool:
  """A `capture_intermediates` filter recording each attention layer's query and key
  projections (before rotary embedding), for `attention_maps`."""
  return (method_name == '__call__' and isinstance(module, Linear)
          and module.name in ('query', 'key') and isinstance(module.parent, Attention))


def capture_filter(blocks: bool = False, attention: bool = False):
  """The `capture_intermediates` argument recording block outputs (`capture_blocks`) and/or
  attention projections (`capture_attention`) in one apply; False when neither."""
  chosen = [f for f, on in ((capture_blocks, blocks), (capture_attention, attention)) if on]
  if not chosen:
    return False
  return lambda module, method_name: any(f(module, method_name) for f in chosen)


def attention_maps(intermediates: dict, cfg: ModelConfig, positions: Optional[jax.Array] = None,
                   segment_ids: Optional[jax.Array] = None) -> list:
  """Each of the `n_layers` layers' attention probabilities [B, N, L, L] (float32), from what
  `capture_attention` recorded in a cache-less call with these `positions` (None: 0..L-1) and
  `segment_ids`: the same rotary embedding, mask and softmax as the model's XLA attention.

  Unrolled layers only, a shared block once per call, as `block_outputs`. Each map holds
  B * N * L^2 floats: meant for the short sequences of distillation.
  """
  if cfg.scan_layers:
    raise ValueError('attention maps are read from unrolled layers (scan_layers=False)')
  u = cfg.n_unique_layers
  maps = []
  for i in range(cfg.n_layers):
    attn = intermediates[block_name(i % u)]['attn']
    q_BxLxNxH, k_BxLxKxH = (attn[name]['__call__'][i // u] for name in ('query', 'key'))
    b, length = q_BxLxNxH.shape[:2]
    pos_BxL = (jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
               if positions is None else positions)
    if cfg.position == 'rope':
      q_BxLxNxH = rope(q_BxLxNxH, pos_BxL, cfg.rope_theta)
      k_BxLxKxH = rope(k_BxLxKxH, pos_BxL, cfg.rope_theta)
    mask = chunk_mask(Geometry(pos_BxL, segment_ids), length, cfg.sliding_window)
    maps.append(probabilities(q_BxLxNxH, k_BxLxKxH, mask))
  return maps


def block_name(i: int) -> str:
  """The parameter key of unrolled block `i` (`scan_layers=False`)."""
  return f'blocks_{i}'


def stack_layers(params: dict, cfg: ModelConfig) -> dict:
  """Unrolled parameters (`blocks_{i}`) -> the `scan_layers` layout (one stacked `blocks`)."""
  out = {k: v for k, v in params.items() if not k.startswith('blocks_')}
  layers = [params[block_name(i)] for i in range(cfg.n_unique_layers)]
  out['blocks'] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
  return out


def unstack_layers(params: dict, cfg: ModelConfig) -> dict:
  """The `scan_layers` layout -> unrolled parameters (`blocks_{i}`)."""
  out = {k: v for k, v in params.items() if k != 'blocks'}
  for i in range(cfg.n_unique_layers):
    out[block_name(i)] = jax.tree.map(lambda x, i=i: x[i], params['blocks'])
  return out
