"""Multi-head / grouped-query attention with rotary embeddings, masks and a ring-buffer KV cache
(stored in a float dtype, or as int8 with a scale per row, slot and key/value head)."""

from typing import NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import axes
from models.config import KV_CACHE_DTYPES, ModelConfig
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
  read_slots: Optional[jax.Array] = None   # [W] the cache slots read (None: all of them)


def rope(x_BxLxNxH: jax.Array, pos_BxL: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding, rotating the two halves of each head (the Llama/NeoX layout).

  The heads axis may be query heads (N) or key/value heads (K). Written without splitting and
  concatenating the halves: the head is viewed as [2, H/2] and multiplied by cos and by the
  reversed view times (-sin, sin). Same products and sums, but the gradient is elementwise too,
  where a concatenate's gradient is slices and pads that XLA's CPU backend runs slowly.
  """
  h = x_BxLxNxH.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))
  angle_BxLxP = pos_BxL.astype(jnp.float32)[..., None] * inv_freq[None, None, :]   # P = H/2
  cos_BxLx2xP = jnp.stack([jnp.cos(angle_BxLxP)] * 2, axis=2)
  sin_BxLx2xP = jnp.stack([-jnp.sin(angle_BxLxP), jnp.sin(angle_BxLxP)], axis=2)
  x_BxLxNx2xP = x_BxLxNxH.astype(jnp.float32).reshape(x_BxLxNxH.shape[:-1] + (2, h // 2))
  out = (x_BxLxNx2xP * cos_BxLx2xP[:, :, None]
         + jnp.flip(x_BxLxNx2xP, axis=3) * sin_BxLx2xP[:, :, None])
  return out.reshape(x_BxLxNxH.shape).astype(x_BxLxNxH.dtype)


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


def attend(q_BxLxNxH: jax.Array, k_BxSxKxH: jax.Array, v_BxSxKxH: jax.Array,
           mask_Bx1xLxS: jax.Array) -> jax.Array:
  """softmax(q k^T / sqrt(H), masked) v with the softmax in float32: the XLA formulation.

  Grouped-query heads (G = N / K query heads per key/value head) become a group axis; plain
  multi-head attention keeps 4-D tensors, since a unit group axis makes every elementwise op of
  the softmax and its gradient a reshaped (and on CPU several times slower) loop.
  """
  b, length, n, h = q_BxLxNxH.shape
  k = k_BxSxKxH.shape[2]
  if n == k:
    s_BxNxLxS = jnp.einsum('blnh,bsnh->bnls', q_BxLxNxH, k_BxSxKxH,
                           preferred_element_type=jnp.float32)
    p_BxNxLxS = _masked_softmax(s_BxNxLxS, mask_Bx1xLxS, h).astype(v_BxSxKxH.dtype)
    return jnp.einsum('bnls,bsnh->blnh', p_BxNxLxS, v_BxSxKxH)
  q_BxLxKxGxH = q_BxLxNxH.reshape(b, length, k, n // k, h)
  s_BxKxGxLxS = jnp.einsum('blkgh,bskh->bkgls', q_BxLxKxGxH, k_BxSxKxH,
                           preferred_element_type=jnp.float32)
  p_BxKxGxLxS = _masked_softmax(s_BxKxGxLxS, mask_Bx1xLxS[:, :, None], h).astype(
      v_BxSxKxH.dtype)
  out_BxLxKxGxH = jnp.einsum('bkgls,bskh->blkgh', p_BxKxGxLxS, v_BxSxKxH)
  return out_BxLxKxGxH.reshape(b, length, n, h)


def attend_cache(q_BxLxNxH: jax.Array, k_BxKxSxH: jax.Array, v_BxKxSxH: jax.Array,
                 mask_Bx1xLxS: jax.Array, chunk: tuple) -> jax.Array:
  """`attend` over a cache's keys and values [B, K, S, H] followed by the chunk's own
  (`chunk` = (k, v) [B, L, K, H]), with every operand heads first.

  The batched dots run over (batch, heads): with heads first they read the cache as it lies,
  and the queries and the chunk's keys (a few tokens) are transposed instead. With the tokens
  axis first XLA transposes the whole cache for every dot, and a chunk of more than one query
  makes the score dot a slow loop (measured on CPU: 10x a 1-token step at 8 x 464 entries).
  """
  b, length, n, h = q_BxLxNxH.shape
  k = k_BxKxSxH.shape[1]
  first = lambda x: jnp.swapaxes(x, 1, 2)        # [B, L, K, H] -> [B, K, L, H]
  pairs = [(k_BxKxSxH, v_BxKxSxH), (first(chunk[0]), first(chunk[1]))]
  if n == k:
    q_BxNxLxH = first(q_BxLxNxH)
    scores = [jnp.einsum('bnlh,bnsh->bnls', q_BxNxLxH, kk, preferred_element_type=jnp.float32)
              for kk, _ in pairs]
    p_BxNxLxS = _masked_softmax(_join(scores), mask_Bx1xLxS, h).astype(v_BxKxSxH.dtype)
    out_BxNxLxH = sum(jnp.einsum('bnls,bnsh->bnlh', p, vv)
                      for p, (_, vv) in zip(_split(p_BxNxLxS, pairs), pairs))
    return first(out_BxNxLxH)
  q_BxKxGxLxH = q_BxLxNxH.reshape(b, length, k, n // k, h).transpose(0, 2, 3, 1, 4)
  scores = [jnp.einsum('bkglh,bksh->bkgls', q_BxKxGxLxH, kk, preferred_element_type=jnp.float32)
            for kk, _ in pairs]
  p_BxKxGxLxS = _masked_softmax(_join(scores), mask_Bx1xLxS[:, :, None], h).astype(
      v_BxKxSxH.dtype)
  out_BxKxGxLxH = sum(jnp.einsum('bkgls,bksh->bkglh', p, vv)
                      for p, (_, vv) in zip(_split(p_BxKxGxLxS, pairs), pairs))
  return out_BxKxGxLxH.transpose(0, 3, 1, 2, 4).reshape(b, length, n, h)


def _join(scores: list) -> jax.Array:
  return jnp.concatenate(scores, axis=-1)


def _split(p: jax.Array, pairs: list) -> list:
  s = pairs[0][0].shape[2]
  return [p[..., :s], p[..., s:]]


def probabilities(q_BxLxNxH: jax.Array, k_BxSxKxH: jax.Array,
                  mask_Bx1xLxS: jax.Array) -> jax.Array:
  """The float32 weights [B, N, L, S] that `attend` gives the values: the same scores and
  masked softmax, with each key head repeated for the G = N / K query heads of its group (query
  head n reads key head n // G, as `attend`'s [K, G] split does)."""
  n, k = q_BxLxNxH.shape[2], k_BxSxKxH.shape[2]
  k_BxSxNxH = jnp.repeat(k_BxSxKxH, n // k, axis=2)
  s_BxNxLxS = jnp.einsum('blnh,bsnh->bnls', q_BxLxNxH, k_BxSxNxH,
                         preferred_element_type=jnp.float32)
  return _masked_softmax(s_BxNxLxS, mask_Bx1xLxS, q_BxLxNxH.shape[-1])


def attend_causal(q_BxLxNxH: jax.Array, k_BxLxKxH: jax.Array, v_BxLxKxH: jax.Array,
                  mask_Bx1xLxL: jax.Array, chunks: int = 2) -> jax.Array:
  """`attend` within one causal chunk, skipping the keys no query of a block can see.

  The queries are split into `chunks` blocks; block i attends to the keys up to its last query
  only, so the scores above the diagonal blocks are never computed: 2 blocks do 3/4 of the
  score and value products and softmax work (measured on CPU: 4 blocks are no faster at
  length 128 or 256, where the smaller dots run less efficiently).
  """
  length = q_BxLxNxH.shape[1]
  bounds = sorted({(length * i) // chunks for i in range(chunks + 1)})
  outs = [attend(q_BxLxNxH[:, lo:hi], k_BxLxKxH[:, :hi], v_BxLxKxH[:, :hi],
                 mask_Bx1xLxL[:, :, lo:hi, :hi]) for lo, hi in zip(bounds, bounds[1:])]
  return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)


def _masked_softmax(scores: jax.Array, mask: jax.Array, head_dim: int) -> jax.Array:
  scores = scores * jnp.float32(head_dim ** -0.5)
  return jax.nn.softmax(jnp.where(mask, scores, _MASKED), axis=-1)


_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)   # a masked score: exp() of it is 0


def chunk_mask(geo: Geometry, length: int, window: Optional[int]) -> jax.Array:
  """Boolean [B or 1, 1, L, L] mask within a chunk: causal, same segment, inside the window."""
  i_Lx1 = jnp.arange(length)[:, None]
  j_1xL = jnp.arange(length)[None, :]
  mask_LxL = j_1xL <= i_Lx1
  if window is not None:
    mask_LxL &= i_Lx1 - j_1xL < window
  mask = mask_LxL[None, None]
  if geo.q_seg is not None:
    mask = mask & (geo.q_seg[:, :, None] == geo.q_seg[:, None, :])[:, None]
  return mask


SCALE_BYTES = 4   # an int8 cache entry ends with the 4 bytes of its float32 scale
_QMAX = 127       # symmetric int8 grid: -127..127, so that -x is representable whenever x is


def quantize_kv(x_BxLxKxH: jax.Array) -> jax.Array:
  """int8 [B, L, K, H + SCALE_BYTES]: each head vector on a symmetric grid, then its scale.

  scale = absmax over the head / 127 (1 for an all-zero head), so the rounding error of an
  element is at most scale / 2 and zeros stay exact. The float32 scale is stored bitcast in the
  last 4 lanes so that an int8 cache is still one array for keys and one for values, sliced and
  stacked per layer exactly like a float cache.
  """
  x_BxLxKxH = x_BxLxKxH.astype(jnp.float32)
  absmax_BxLxKx1 = jnp.max(jnp.abs(x_BxLxKxH), axis=-1, keepdims=True)
  scale_BxLxKx1 = jnp.where(absmax_BxLxKx1 > 0, absmax_BxLxKx1 / _QMAX, 1.0)
  q_BxLxKxH = jnp.clip(jnp.round(x_BxLxKxH / scale_BxLxKx1), -_QMAX, _QMAX).astype(jnp.int8)
  scale_BxLxKx4 = jax.lax.bitcast_convert_type(scale_BxLxKx1[..., 0], jnp.int8)
  return jnp.concatenate([q_BxLxKxH, scale_BxLxKx4], axis=-1)


def kv_scale(packed_xE: jax.Array) -> jax.Array:
  """The float32 scales [...] of int8 cache entries [..., E] (E = H + SCALE_BYTES)."""
  return jax.lax.bitcast_convert_type(packed_xE[..., -SCALE_BYTES:], jnp.float32)


def dequantize_kv(packed_xE: jax.Array, dtype=jnp.float32) -> jax.Array:
  """[..., H] in `dtype` from `quantize_kv`'s packing [..., E]: integers times their scale."""
  q_xH = packed_xE[..., :-SCALE_BYTES].astype(jnp.float32)
  return (q_xH * kv_scale(packed_xE)[..., None]).astype(dtype)


def read_cache(cache: jax.Array, dtype) -> jax.Array:
  """Cached keys or values [B, K, slots, H] in the compute dtype (dequantized if int8).

  Empty slots of an int8 cache hold zero bytes, a zero scale included: they read as zeros.
  """
  if cache.dtype == jnp.int8:
    return dequantize_kv(cache, dtype)
  return cache.astype(dtype)


def write_cache(cache: jax.Array, new_BxLxKxH: jax.Array, slots: jax.Array) -> jax.Array:
  """Writes the chunk's last len(slots) entries into those slots of `cache` [B, K, slots, W].

  One entry (a decode step) is a dynamic-update-slice, which XLA does in place in a donated
  or loop-carried cache; a chunk may wrap around the ring, so it is a scatter.
  """
  new_BxNxKxH = new_BxLxKxH[:, new_BxLxKxH.shape[1] - slots.shape[0]:]
  new_BxNxKxW = (quantize_kv(new_BxNxKxH) if cache.dtype == jnp.int8
                 else new_BxNxKxH.astype(cache.dtype))
  new_BxKxNxW = jnp.swapaxes(new_BxNxKxW, 1, 2)
  if slots.shape[0] == 1:
    return jax.lax.dynamic_update_slice_in_dim(cache, new_BxKxNxW, slots[0], axis=2)
  return cache.at[:, :, slots].set(new_BxKxNxW)


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
      impl = select_impl(cfg)
      if impl == 'xla':
        out_BxLxNxH = attend_causal(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH,
                                    chunk_mask(geo, x_BxLxD.shape[1], cfg.sliding_window))
      else:
        mask = None
        if geo.q_seg is not None:
          mask = (geo.q_seg[:, :, None] == geo.q_seg[:, None, :])[:, None]
        window = None if cfg.sliding_window is None else (cfg.sliding_window - 1, 0)
        out_BxLxNxH = jax.nn.dot_product_attention(
            q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, mask=mask, is_causal=True,
            local_window_size=window, implementation=impl)
      new_kv = None
    else:
      cache_k, cache_v = kv
      mask = cache_mask(geo, cfg.sliding_window)
      length, n_slots = x_BxLxD.shape[1], cache_k.shape[-2]
      # Writing first is safe where the slots written hold nothing the chunk attends to: one
      # token, or a ring with room for the window besides the chunk (full attention: the
      # caller keeps the ring longer than what is live).
      whole = geo.write_slots.shape[0] == length and (
          length == 1 or cfg.sliding_window is None or geo.read_slots is not None
          or n_slots >= cfg.sliding_window + length - 1)
      if whole:
        # A decode step or short chunk writes first and then reads: XLA updates the cache in
        # place only when no read of the old buffer follows the write (else it copies the whole
        # cache per layer, which dominates a decode step or a speculative verify chunk). The
        # slots just written are masked out of the cached keys, so what is attended is the same.
        cache_k = write_cache(cache_k, k_BxLxKxH, geo.write_slots)
        cache_v = write_cache(cache_v, v_BxLxKxH, geo.write_slots)
        if geo.read_slots is None:   # a window never holds the slots written
          written = jnp.zeros(mask.shape[-1], bool).at[geo.write_slots].set(True)
          mask = mask & ~written[None, None, None]
      # The chunk attends to its own keys and values as computed; only the cached ones pass
      # through the cache's storage (and so its rounding).
      read_k, read_v = cache_k, cache_v
      if geo.read_slots is not None:
        read_k, read_v = (jnp.take(c, geo.read_slots, axis=-2) for c in (cache_k, cache_v))
      out_BxLxNxH = attend_cache(q_BxLxNxH, read_cache(read_k, dtype),
                                 read_cache(read_v, dtype), mask, (k_BxLxKxH, v_BxLxKxH))
      if whole:
        new_kv = (cache_k, cache_v)
      else:
        new_kv = (write_cache(cache_k, k_BxLxKxH, geo.write_slots),
                  write_cache(cache_v, v_BxLxKxH, geo.write_slots))

    out_BxLxD = Linear((n, h), (d,), (axes.HEADS, axes.HEAD_DIM), (axes.EMBED,),
                       use_bias=cfg.out_bias, dtype=dtype, param_dtype=param_dtype,
                       init_std=self.out_init_std, name='out')(out_BxLxNxH.astype(dtype))
    return out_BxLxD, new_kv


def cache_length(cfg: ModelConfig, max_len: int) -> int:
  """Slots needed to decode up to `max_len` tokens: a sliding window needs only the window."""
  return max_len if cfg.sliding_window is None else min(max_len, cfg.sliding_window)


def cache_storage(cfg: ModelConfig, kv_cache_dtype: Optional[str] = None) -> str:
  """The cache's storage: `kv_cache_dtype` (None: the config's), with 'auto' resolved to cfg.dtype.

  A NumPy/JAX dtype (`jnp.bfloat16`) is accepted too, as its name.
  """
  name = cfg.kv_cache_dtype if kv_cache_dtype is None else kv_cache_dtype
  if isinstance(name, type) or isinstance(name, jnp.dtype):
    name = jnp.dtype(name).name
  if name not in KV_CACHE_DTYPES:
    raise ValueError(f'kv_cache_dtype={name!r} is not one of {", ".join(KV_CACHE_DTYPES)}')
  return cfg.dtype if name == 'auto' else name


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> dict:
  """An empty, fixed-shape KV cache for `batch` rows of up to `max_len` tokens.

  `k`/`v` are tuples with one array per layer, [B, K, slots, H] in `dtype` (one of
  KV_CACHE_DTYPES, None: the config's `kv_cache_dtype`), or under `scan_layers` one
  [n_unique_layers, B, K, slots, H] per pass over the stacked blocks; an int8 cache stores
  H + SCALE_BYTES lanes (see `quantize_kv`). Separate arrays per layer let each step read and
  update its layer's entries in place, where slices of one stacked array would be copied. Heads
  come before slots so that attention's batched dots (over batch and heads) read the cache as
  it lies: with slots first, XLA transposes every layer's whole cache at every step.
  `pos`/`seg` [B, slots] record what each slot holds (segment 0 = empty); `index` counts
  tokens written so far (slot = index mod slots).
  """
  length = cache_length(cfg, max_len)
  storage = cache_storage(cfg, dtype)
  width = cfg.head_dim + (SCALE_BYTES if storage == 'int8' else 0)
  shape = (batch, cfg.n_kv_heads, length, width)
  calls = cfg.n_layers
  if cfg.scan_layers:
    shape, calls = (cfg.n_unique_layers,) + shape, cfg.n_layers // cfg.n_unique_layers
  zeros = lambda: tuple(jnp.zeros(shape, storage) for _ in range(calls))
  return dict(k=zeros(), v=zeros(),
              pos=jnp.zeros((batch, length), jnp.int32), seg=jnp.zeros((batch, length), jnp.int32),
              index=jnp.zeros((), jnp.int32))


def cache_bytes(cache: dict) -> int:
  """Bytes held by the cache's arrays (arrays or shape structs), bookkeeping and scales included."""
  return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(cache))
