"""Multi-head / grouped-query attention with rotary embeddings, masks and a ring-buffer KV cache."""

from typing import NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import axes
from models.config import ModelConfig
from models.layers import Linear


class Geometry(NamedTuple):
  """Who may attend to whom in one call, shared by all layers.

  Without a cache, attention is causal by index within the chunk, restricted to equal segment ids
  (`q_seg`, None meaning one segment per row). With a cache, keys are the cached slots followed by
  the chunk, and masking uses the stored positions and segments (`k_pos`, `k_seg`); segment 0
  marks padding and empty slots, which real tokens never see.
  """
  q_pos: jax.Array                   # [B, L] positions of the chunk's tokens (for RoPE)
  q_seg: Optional[jax.Array]         # [B, L] segment ids, or None
  k_pos: Optional[jax.Array] = None  # [B, S] with a cache: the cached slots, then the chunk
  k_seg: Optional[jax.Array] = None  # [B, S] with a cache
  write_slots: Optional[jax.Array] = None  # [n] cache slots receiving the chunk's last n tokens


def rope(x_BxLxNxH: jax.Array, pos_BxL: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding, rotating the two halves of each head (the Llama/NeoX layout).

  The heads axis may be query heads (N) or key/value heads (K).
  """
  h = x_BxLxNxH.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))
  angle = pos_BxL.astype(jnp.float32)[..., None] * inv_freq[None, None, :]   # [B, L, H/2]
  cos = jnp.cos(angle)[:, :, None, :]
  sin = jnp.sin(angle)[:, :, None, :]
  x1, x2 = jnp.split(x_BxLxNxH.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxLxNxH.dtype)


def cache_mask(geo: Geometry, window: Optional[int]) -> jax.Array:
  """Boolean [B, 1, L, S] mask for attention over cached slots plus the current chunk."""
  q_pos_BxLx1, k_pos_Bx1xS = geo.q_pos[:, :, None], geo.k_pos[:, None, :]
  mask_BxLxS = (geo.q_seg[:, :, None] == geo.k_seg[:, None, :]) & (k_pos_Bx1xS <= q_pos_BxLx1)
  if window is not None:
    mask_BxLxS &= q_pos_BxLx1 - k_pos_Bx1xS < window
  return mask_BxLxS[:, None]


def select_impl(cfg: ModelConfig) -> str:
  """cuDNN flash attention where it exists and applies, else XLA; `attention_impl` overrides."""
  if cfg.attention_impl != 'auto':
    return cfg.attention_impl
  fused_ok = (jax.default_backend() == 'gpu' and cfg.dtype in ('bfloat16', 'float16')
              and cfg.head_dim % 8 == 0 and cfg.head_dim <= 128)
  return 'cudnn' if fused_ok else 'xla'


def write_cache(cache: jax.Array, new_BxLx: jax.Array, slots: jax.Array) -> jax.Array:
  """Writes the chunk's last len(slots) entries into those slots of `cache` [B, slots, ...]."""
  n = slots.shape[0]
  return cache.at[:, slots].set(new_BxLx[:, new_BxLx.shape[1] - n:].astype(cache.dtype))


class Attention(nn.Module):
  """Causal self-attention; `kv` is this layer's (keys, values) cache or None."""
  config: ModelConfig
  out_init_std: float = 0.02

  @nn.compact
  def __call__(self, x_BxLxD: jax.Array, geo: Geometry, kv=None):
    cfg = self.config
    n, k, h, d = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_model
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    proj = lambda name, heads, head_axis: Linear(
        (d,), (heads, h), (axes.EMBED,), (head_axis, axes.HEAD_DIM), use_bias=cfg.qkv_bias,
        dtype=dtype, param_dtype=param_dtype, init_std=cfg.init_std, name=name)
    q_BxLxNxH = proj('query', n, axes.HEADS)(x_BxLxD)
    k_BxLxKxH = proj('key', k, axes.KV_HEADS)(x_BxLxD)
    v_BxLxKxH = proj('value', k, axes.KV_HEADS)(x_BxLxD)
    if cfg.position == 'rope':
      q_BxLxNxH = rope(q_BxLxNxH, geo.q_pos, cfg.rope_theta)
      k_BxLxKxH = rope(k_BxLxKxH, geo.q_pos, cfg.rope_theta)
    q_BxLxNxH = nn.with_logical_constraint(q_BxLxNxH,
                                           (axes.BATCH, axes.LENGTH, axes.HEADS, axes.HEAD_DIM))

    if kv is None:
      mask = None
      if geo.q_seg is not None:
        mask = (geo.q_seg[:, :, None] == geo.q_seg[:, None, :])[:, None]
      window = None if cfg.sliding_window is None else (cfg.sliding_window - 1, 0)
      out_BxLxNxH = jax.nn.dot_product_attention(
          q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, mask=mask, is_causal=True,
          local_window_size=window, implementation=select_impl(cfg))
      new_kv = None
    else:
      cache_k, cache_v = kv
      k_BxSxKxH = jnp.concatenate([cache_k.astype(dtype), k_BxLxKxH], axis=1)
      v_BxSxKxH = jnp.concatenate([cache_v.astype(dtype), v_BxLxKxH], axis=1)
      out_BxLxNxH = jax.nn.dot_product_attention(
          q_BxLxNxH, k_BxSxKxH, v_BxSxKxH, mask=cache_mask(geo, cfg.sliding_window),
          implementation='xla')
      new_kv = (write_cache(cache_k, k_BxLxKxH, geo.write_slots),
                write_cache(cache_v, v_BxLxKxH, geo.write_slots))

    out_BxLxD = Linear((n, h), (d,), (axes.HEADS, axes.HEAD_DIM), (axes.EMBED,),
                       use_bias=cfg.out_bias, dtype=dtype, param_dtype=param_dtype,
                       init_std=self.out_init_std, name='out')(out_BxLxNxH.astype(dtype))
    return out_BxLxD, new_kv


def cache_length(cfg: ModelConfig, max_len: int) -> int:
  """Slots needed to decode up to `max_len` tokens: a sliding window needs only the window."""
  return max_len if cfg.sliding_window is None else min(max_len, cfg.sliding_window)


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> dict:
  """An empty, fixed-shape KV cache for `batch` rows of up to `max_len` tokens.

  `k`/`v` are [n_layers, B, slots, K, H]; `pos`/`seg` [B, slots] record what each slot
  holds (segment 0 = empty); `index` counts tokens written so far (slot = index mod slots).
  """
  length = cache_length(cfg, max_len)
  dtype = jnp.dtype(cfg.dtype if dtype is None else dtype)
  shape = (cfg.n_layers, batch, length, cfg.n_kv_heads, cfg.head_dim)
  return dict(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
              pos=jnp.zeros((batch, length), jnp.int32), seg=jnp.zeros((batch, length), jnp.int32),
              index=jnp.zeros((), jnp.int32))
