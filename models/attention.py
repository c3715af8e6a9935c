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
  q_pos: jax.Array                   # [B, T] positions of the chunk's tokens (for RoPE)
  q_seg: Optional[jax.Array]         # [B, T] segment ids, or None
  k_pos: Optional[jax.Array] = None  # [B, L + T] with a cache
  k_seg: Optional[jax.Array] = None  # [B, L + T] with a cache
  write_slots: Optional[jax.Array] = None  # [n] cache slots receiving the chunk's last n tokens


def rope(x_BxTxNxH: jax.Array, pos_BxT: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding, rotating the two halves of each head (the Llama/NeoX layout)."""
  h = x_BxTxNxH.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))
  angle_BxTxH2 = pos_BxT.astype(jnp.float32)[..., None] * inv_freq[None, None, :]
  cos = jnp.cos(angle_BxTxH2)[:, :, None, :]
  sin = jnp.sin(angle_BxTxH2)[:, :, None, :]
  x1, x2 = jnp.split(x_BxTxNxH.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxTxNxH.dtype)


def cache_mask(geo: Geometry, window: Optional[int]) -> jax.Array:
  """Boolean [B, 1, T, L + T] mask for attention over cached slots plus the current chunk."""
  q_pos, k_pos = geo.q_pos[:, :, None], geo.k_pos[:, None, :]
  mask = (geo.q_seg[:, :, None] == geo.k_seg[:, None, :]) & (k_pos <= q_pos)
  if window is not None:
    mask &= q_pos - k_pos < window
  return mask[:, None]


def select_impl(cfg: ModelConfig) -> str:
  """cuDNN flash attention where it exists and applies, else XLA; `attention_impl` overrides."""
  if cfg.attention_impl != 'auto':
    return cfg.attention_impl
  fused_ok = (jax.default_backend() == 'gpu' and cfg.dtype in ('bfloat16', 'float16')
              and cfg.head_size % 8 == 0 and cfg.head_size <= 128)
  return 'cudnn' if fused_ok else 'xla'


def write_cache(cache_BxLx: jax.Array, new_BxTx: jax.Array, slots: jax.Array) -> jax.Array:
  """Writes the last len(slots) entries of the chunk into the given cache slots."""
  n = slots.shape[0]
  return cache_BxLx.at[:, slots].set(new_BxTx[:, new_BxTx.shape[1] - n:].astype(cache_BxLx.dtype))


class Attention(nn.Module):
  """Causal self-attention; `kv` is this layer's (keys, values) cache or None."""
  config: ModelConfig
  out_init_std: float = 0.02

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array, geo: Geometry, kv=None):
    cfg = self.config
    n, k, h, d = cfg.n_heads, cfg.kv_heads, cfg.head_size, cfg.d_model
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    proj = lambda name, heads, head_axis: Linear(
        (d,), (heads, h), (axes.EMBED,), (head_axis, axes.HEAD_DIM), use_bias=cfg.qkv_bias,
        dtype=dtype, param_dtype=param_dtype, init_std=cfg.init_std, name=name)
    q_BxTxNxH = proj('query', n, axes.HEADS)(x_BxTxD)
    k_BxTxKxH = proj('key', k, axes.KV_HEADS)(x_BxTxD)
    v_BxTxKxH = proj('value', k, axes.KV_HEADS)(x_BxTxD)
    if cfg.position == 'rope':
      q_BxTxNxH = rope(q_BxTxNxH, geo.q_pos, cfg.rope_theta)
      k_BxTxKxH = rope(k_BxTxKxH, geo.q_pos, cfg.rope_theta)
    q_BxTxNxH = nn.with_logical_constraint(q_BxTxNxH,
                                           (axes.BATCH, axes.LENGTH, axes.HEADS, axes.HEAD_DIM))

    if kv is None:
      mask = None
      if geo.q_seg is not None:
        mask = (geo.q_seg[:, :, None] == geo.q_seg[:, None, :])[:, None]
      window = None if cfg.sliding_window is None else (cfg.sliding_window - 1, 0)
      out_BxTxNxH = jax.nn.dot_product_attention(
          q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, mask=mask, is_causal=True,
          local_window_size=window, implementation=select_impl(cfg))
      new_kv = None
    else:
      cache_k, cache_v = kv
      keys = jnp.concatenate([cache_k.astype(dtype), k_BxTxKxH], axis=1)
      values = jnp.concatenate([cache_v.astype(dtype), v_BxTxKxH], axis=1)
      out_BxTxNxH = jax.nn.dot_product_attention(
          q_BxTxNxH, keys, values, mask=cache_mask(geo, cfg.sliding_window), implementation='xla')
      new_kv = (write_cache(cache_k, k_BxTxKxH, geo.write_slots),
                write_cache(cache_v, v_BxTxKxH, geo.write_slots))

    out = Linear((n, h), (d,), (axes.HEADS, axes.HEAD_DIM), (axes.EMBED,), use_bias=cfg.out_bias,
                 dtype=dtype, param_dtype=param_dtype, init_std=self.out_init_std,
                 name='out')(out_BxTxNxH.astype(dtype))
    return out, new_kv


def cache_length(cfg: ModelConfig, max_len: int) -> int:
  """Slots needed to decode up to `max_len` tokens: a sliding window needs only the window."""
  return max_len if cfg.sliding_window is None else min(max_len, cfg.sliding_window)


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> dict:
  """An empty, fixed-shape KV cache for `batch` rows of up to `max_len` tokens.

  `k`/`v` are [layers, batch, slots, kv_heads, head_dim]; `pos`/`seg` record what each slot
  holds (segment 0 = empty); `index` counts tokens written so far (slot = index mod slots).
  """
  length = cache_length(cfg, max_len)
  dtype = jnp.dtype(cfg.dtype if dtype is None else dtype)
  shape = (cfg.n_layers, batch, length, cfg.kv_heads, cfg.head_size)
  return dict(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
              pos=jnp.zeros((batch, length), jnp.int32), seg=jnp.zeros((batch, length), jnp.int32),
              index=jnp.zeros((), jnp.int32))
