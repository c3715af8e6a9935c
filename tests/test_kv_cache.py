"""KV cache storage: int8 entries with a float32 scale per row, slot and head, and bf16 caches,
against the float32 cache and the no-cache forward pass."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import ModelConfig, Transformer, attention, decode

CONFIGS = {
    # GQA with a window shorter than prompt + steps: the ring buffer wraps.
    'gqa_window': ModelConfig(vocab_size=61, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                              d_ff=64, sliding_window=6, init_std=0.2),
    'mqa_scan': ModelConfig(vocab_size=61, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1,
                            d_ff=64, init_std=0.2, scan_layers=True),
}
PROMPTS = [[3, 1, 4, 1, 5], [9, 2]]
STEPS = 8


@functools.lru_cache(maxsize=None)
def build(name):
  model = Transformer(CONFIGS[name])
  params = nn.meta.unbox(model.init(jax.random.key(1), jnp.zeros((1, 4), jnp.int32))['params'])
  step = jax.jit(lambda tokens, pos, seg, cache: model.apply(
      {'params': params}, tokens, positions=pos, segment_ids=seg, cache=cache))
  return model, params, step


def forced_tokens():
  return np.random.default_rng(0).integers(1, 61, (len(PROMPTS), STEPS)).astype(np.int32)


@functools.lru_cache(maxsize=None)
def teacher_forced(name, storage):
  """Logits of a padded prefill, then of STEPS one-token steps on fixed tokens, and the caches
  after the prefill and at the end."""
  model, _, step = build(name)
  tokens, seg, pos = decode.pad_prompts(PROMPTS)
  cache = attention.init_cache(model.config, len(PROMPTS), tokens.shape[1] + STEPS, storage)
  logits, cache = step(tokens, pos, seg, cache)
  out, after_prefill = [logits], cache
  pos_Bx1, one_Bx1 = pos[:, -1:] + 1, np.ones((len(PROMPTS), 1), np.int32)
  forced = forced_tokens()
  for t in range(STEPS):
    logits, cache = step(forced[:, t:t + 1], pos_Bx1 + t, one_Bx1, cache)
    out.append(logits)
  return [np.asarray(x) for x in out], after_prefill, cache


def test_quantize_dequantize_error_is_at_most_half_a_step_and_zeros_stay_zero():
  rng = np.random.default_rng(0)
  x = (rng.normal(size=(2, 3, 2, 16)) * rng.uniform(0.01, 30, size=(2, 3, 2, 1))).astype(np.float32)
  x[0, 1, 0] = 0.0                                 # an all-zero head
  x[1, 2, 1, ::3] = 0.0                            # scattered exact zeros
  packed = attention.quantize_kv(jnp.asarray(x))
  assert packed.dtype == jnp.int8 and packed.shape == (2, 3, 2, 16 + attention.SCALE_BYTES)

  absmax = np.abs(x).max(axis=-1)
  scale = np.where(absmax > 0, absmax / np.float32(127), np.float32(1)).astype(np.float32)
  np.testing.assert_allclose(attention.kv_scale(packed), scale, rtol=1e-7)
  np.testing.assert_array_equal(packed[..., :16], np.round(x / scale[..., None]))
  deq = np.asarray(attention.dequantize_kv(packed))
  assert np.all(np.abs(x - deq) <= scale[..., None] * (0.5 + 1e-6))
  assert np.all(deq[x == 0] == 0) and np.all(deq[0, 1, 0] == 0)
  assert float(attention.kv_scale(packed)[0, 1, 0]) == 1.0
  # The largest element of each nonzero head lands on the grid's end, +-127.
  assert np.all(np.abs(packed[..., :16]).max(axis=-1)[absmax > 0] == 127)


def layers(arrays):
  """The per-layer (or per-pass stacked) cache arrays as one [n_layers, B, K, S, W] array."""
  return np.concatenate([np.asarray(x).reshape((-1,) + x.shape[-4:]) for x in arrays])


@pytest.mark.parametrize('name', sorted(CONFIGS))
def test_int8_step_equals_a_float_step_on_the_dequantized_cache(name):
  # The int8 path is exactly the float path reading a cache that holds the dequantized entries,
  # and it writes exactly the quantized new entries.
  model, _, step = build(name)
  _, int8_cache, _ = teacher_forced(name, 'int8')
  float_cache = dict(int8_cache)
  for key in ('k', 'v'):
    float_cache[key] = tuple(jax.vmap(attention.dequantize_kv)(x) for x in int8_cache[key])
    assert all(x.shape[-1] == model.config.head_dim + attention.SCALE_BYTES
               for x in int8_cache[key])
  token, pos = forced_tokens()[:, :1], decode.pad_prompts(PROMPTS)[2][:, -1:] + 1
  one = np.ones_like(token)
  logits_q, new_q = step(token, pos, one, int8_cache)
  logits_f, new_f = step(token, pos, one, float_cache)
  np.testing.assert_allclose(logits_q, logits_f, atol=1e-5, rtol=0)
  slot = int(int8_cache['index']) % int8_cache['pos'].shape[1]
  new_q, new_f, int8_cache = (dict(c, k=layers(c['k']), v=layers(c['v']))
                              for c in (new_q, new_f, int8_cache))
  for key in ('k', 'v'):
    # The written entry is the float path's entry on its grid (up to float rounding: the
    # layers after the first see inputs that differ in the last bits).
    written, want = new_q[key][:, :, :, slot], np.asarray(new_f[key][:, :, :, slot])
    scale = np.asarray(attention.kv_scale(written))
    np.testing.assert_allclose(scale, np.abs(want).max(axis=-1) / 127, rtol=1e-5)
    err = np.abs(np.asarray(attention.dequantize_kv(written)) - want)
    assert np.all(err <= scale[..., None] * 0.5001 + 1e-6)
    others = np.arange(int8_cache['pos'].shape[1]) != slot
    np.testing.assert_array_equal(new_q[key][:, :, :, others], int8_cache[key][:, :, :, others])


@pytest.mark.parametrize('name', sorted(CONFIGS))
def test_prefill_is_exact_and_decode_logits_track_the_float32_cache(name):
  model, params, _ = build(name)
  ref = teacher_forced(name, 'auto')[0]
  # 'auto' (float32 here): prefill and every step equal the no-cache forward pass. Rows are
  # right-padded to one length (harmless: the model is causal).
  forced = forced_tokens()
  rows = np.zeros((len(PROMPTS), 32), np.int32)
  for i, p in enumerate(PROMPTS):
    rows[i, :len(p) + STEPS] = list(p) + forced[i].tolist()
  full = np.asarray(model.apply({'params': params}, rows))
  for i, p in enumerate(PROMPTS):
    np.testing.assert_allclose(ref[0][i, -len(p):], full[i, :len(p)], atol=1e-5, rtol=0)
    got = np.stack([logits[i, 0] for logits in ref[1:]])
    np.testing.assert_allclose(got, full[i, len(p):len(p) + STEPS], atol=1e-5, rtol=0)

  spread = float(np.std(np.stack(ref[1:])))
  for storage, tolerance in (('bfloat16', 0.05), ('int8', 0.1)):
    logits = teacher_forced(name, storage)[0]
    # The prefill attends to its fresh keys and values in float; the empty cache reads as
    # masked zeros, so the prefill is bit-identical to the float32 cache's.
    np.testing.assert_array_equal(logits[0], ref[0])
    err = max(float(np.max(np.abs(a - b))) for a, b in zip(logits[1:], ref[1:]))
    assert 0 < err <= tolerance * spread, (storage, err, spread)


def test_generate_with_bf16_and_int8_caches_gives_the_float32_greedy_tokens():
  # The tiny random model's top-2 logit margins along these continuations exceed the caches'
  # logit errors measured above (about 0.05 of the logits' spread).
  model, params, _ = build('mqa_scan')
  prompts = [[3, 1, 4], [1, 5, 9, 2, 6, 5, 3, 5, 8, 9]]
  want = decode.generate(model, params, prompts, max_new_tokens=STEPS)
  for storage in ('bfloat16', 'int8'):
    got = decode.generate(model, params, prompts, max_new_tokens=STEPS, kv_cache_dtype=storage)
    np.testing.assert_array_equal(got.tokens, want.tokens)


def test_cache_bytes_and_the_config_default():
  cfg = ModelConfig(vocab_size=61, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32)
  b, slots, kv_elems = 3, 40, 2 * 2 * 3 * 40 * 2 * 32          # k and v: L * B * S * K * H
  bookkeeping = 2 * b * slots * 4 + 4                            # pos, seg, index
  f32 = attention.cache_bytes(attention.init_cache(cfg, b, slots))
  bf16 = attention.cache_bytes(attention.init_cache(cfg, b, slots, 'bfloat16'))
  int8 = attention.cache_bytes(attention.init_cache(cfg, b, slots, 'int8'))
  assert f32 == 4 * kv_elems + bookkeeping and bf16 == 2 * kv_elems + bookkeeping
  assert int8 == kv_elems + kv_elems // 32 * attention.SCALE_BYTES + bookkeeping
  assert int8 <= 0.3 * f32
  # Shape structs count the same: a serving engine can size caches without allocating them.
  assert attention.cache_bytes(jax.eval_shape(
      lambda: attention.init_cache(cfg, b, slots, 'int8'))) == int8

  quant = cfg.replace(kv_cache_dtype='int8')
  assert attention.init_cache(quant, b, slots)['k'][0].dtype == jnp.int8
  assert attention.init_cache(quant, b, slots, 'auto')['k'][0].dtype == jnp.float32
  assert attention.cache_storage(cfg.replace(dtype='bfloat16')) == 'bfloat16'
  # The cache's storage changes no parameter.
  shapes = lambda c: jax.tree.map(lambda x: (x.shape, x.dtype), nn.meta.unbox(jax.eval_shape(
      Transformer(c).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))))
  assert shapes(quant) == shapes(cfg)


def test_a_bad_kv_cache_dtype_is_one_clear_error():
  allowed = 'is not one of auto, float32, bfloat16, float16, int8'
  model, params, _ = build('gqa_window')
  calls = [lambda: ModelConfig(kv_cache_dtype='int4'),
           lambda: attention.init_cache(model.config, 1, 8, 'int4'),
           lambda: decode.generate(model, params, [[1, 2]], max_new_tokens=2,
                                   kv_cache_dtype='int4')]
  for call in calls:
    with pytest.raises(ValueError, match=f"kv_cache_dtype='int4' {allowed}") as e:
      call()
    assert '\n' not in str(e.value)


@pytest.mark.parametrize('chunk', [1, 3])
def test_a_cache_window_covering_what_is_live_reads_the_same(chunk):
  # Tokens written at the ring's index 40..51 of 64 entries (older entries empty), read through
  # a 16-entry window or the whole cache: the same logits. A window of 4 misses live entries.
  model = Transformer(CONFIGS['mqa_scan'])
  params = nn.meta.unbox(model.init(jax.random.key(1), jnp.zeros((1, 4), jnp.int32))['params'])
  # Positions default to the cache index: 40 onwards.
  run = jax.jit(lambda tokens, cache, window: model.apply(
      {'params': params}, tokens, cache=cache, cache_window=window), static_argnums=2)
  tokens = jnp.asarray(np.random.default_rng(0).integers(1, 61, (2, 12)), jnp.int32)
  out = {}
  for window in (None, 16, 4):
    cache = dict(attention.init_cache(model.config, 2, 64), index=jnp.asarray(40, jnp.int32))
    pieces = []
    for start in range(0, 12, chunk):
      logits, cache = run(tokens[:, start:start + chunk], cache, window)
      pieces.append(logits)
    out[window] = np.asarray(jnp.concatenate(pieces, axis=1))
  np.testing.assert_allclose(out[16], out[None], atol=1e-5, rtol=1e-5)
  assert np.abs(out[4] - out[None]).max() > 1e-2
