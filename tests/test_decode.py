"""Decoding: cached generation against a plain full-forward reference, padding, sampling, stops."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import ModelConfig, Transformer, gpt2_style
from models import decode

CONFIGS = {
    'llama_gqa_window': ModelConfig(vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                    d_ff=64, sliding_window=5, init_std=0.2),
    'gpt2': gpt2_style(vocab_size=61, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_len=64,
                       init_std=0.2),
}


def build(name):
  model = Transformer(CONFIGS[name])
  params = nn.meta.unbox(model.init(jax.random.key(1), jnp.zeros((1, 4), jnp.int32))['params'])
  return model, params


def greedy_reference(model, params, prompt, n):
  """Greedy continuation recomputing the full forward pass for every token (no cache).

  The row is right-padded to a fixed length (harmless: the model is causal) so that the forward
  pass compiles once.
  """
  forward = jax.jit(lambda tokens: model.apply({'params': params}, tokens))
  seq = list(prompt)
  for _ in range(n):
    row = np.zeros((1, 32), np.int32)
    row[0, :len(seq)] = seq
    seq.append(int(jnp.argmax(forward(row)[0, len(seq) - 1])))
  return seq[len(prompt):]


@pytest.mark.parametrize('name', sorted(CONFIGS))
def test_cached_greedy_equals_full_forward_and_padding_is_invisible(name):
  model, params = build(name)
  # The second prompt is longer than the sliding window, and 12 steps wrap the ring buffer.
  prompts = [[3, 1, 4], [1, 5, 9, 2, 6, 5, 3, 5, 8, 9], [2, 7]]
  batched = decode.generate(model, params, prompts, max_new_tokens=12)
  for i, prompt in enumerate(prompts):
    expected = greedy_reference(model, params, prompt, 12)
    np.testing.assert_array_equal(batched.tokens[i], expected)
    alone = decode.generate(model, params, [prompt], max_new_tokens=12)
    np.testing.assert_array_equal(alone.tokens[0], expected)
  np.testing.assert_array_equal(batched.lengths, [12, 12, 12])


@pytest.mark.parametrize('name', sorted(CONFIGS))
def test_padded_prefill_logits_equal_each_prompt_alone(name):
  model, params = build(name)
  prompts = [[3, 1, 4, 1, 5], [9, 2]]
  tokens, seg, pos = decode.pad_prompts(prompts)
  cache = decode.init_cache(model.config, len(prompts), tokens.shape[1] + 4)
  logits, _ = model.apply({'params': params}, tokens, positions=pos, segment_ids=seg, cache=cache)
  for i, prompt in enumerate(prompts):
    alone = model.apply({'params': params}, jnp.asarray([prompt]))
    np.testing.assert_allclose(logits[i, -len(prompt):], alone[0], atol=1e-5, rtol=0)


def test_stop_tokens_end_rows_and_pad_the_rest():
  model, params = build('llama_gqa_window')
  prompts = [[3, 1, 4], [1, 5, 9, 2, 6]]
  free = decode.generate(model, params, prompts, max_new_tokens=10)
  stop = int(free.tokens[0, 3])           # row 0 hits it at step 3 (or earlier if repeated)
  first = int(np.argmax(np.asarray(free.tokens[0]) == stop))
  out = decode.generate(model, params, prompts, max_new_tokens=10, stop_tokens=(stop,), pad_id=60)
  assert int(out.lengths[0]) == first + 1
  np.testing.assert_array_equal(out.tokens[0, :first + 1], free.tokens[0, :first + 1])
  assert np.all(np.asarray(out.tokens[0, first + 1:]) == 60)
  row1 = np.asarray(free.tokens[1])
  hits = np.flatnonzero(row1 == stop)
  n1 = hits[0] + 1 if hits.size else 10
  assert int(out.lengths[1]) == n1
  np.testing.assert_array_equal(out.tokens[1, :n1], row1[:n1])


def test_sampling_is_deterministic_per_seed_and_varies_across_seeds():
  model, params = build('gpt2')
  kwargs = dict(max_new_tokens=16, temperature=1.5)
  a = decode.generate(model, params, [[1, 2, 3]], rng=jax.random.key(7), **kwargs)
  b = decode.generate(model, params, [[1, 2, 3]], rng=jax.random.key(7), **kwargs)
  c = decode.generate(model, params, [[1, 2, 3]], rng=jax.random.key(8), **kwargs)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  assert not np.array_equal(a.tokens, c.tokens)


def test_decode_loop_compiles_once_per_prompt_bucket():
  model, params = build('llama_gqa_window')
  decode.generate(model, params, [[1, 2, 3]], max_new_tokens=6)
  size = decode._generate._cache_size()
  decode.generate(model, params, [[4, 5, 6, 7, 8]], max_new_tokens=6)   # same bucket (8)
  decode.generate(model, params, [[9]], max_new_tokens=6)
  assert decode._generate._cache_size() == size


def _draws(logits, n, **kw):
  keys = jax.random.split(jax.random.key(0), n)
  batch = jnp.broadcast_to(logits, (1,) + logits.shape)
  return np.asarray(jax.vmap(lambda k: decode.sample_logits(batch, k, **kw)[0])(keys))


def test_temperature_sampling_matches_softmax_frequencies():
  logits = jnp.asarray([2.0, 1.0, 0.5, 0.0, -1.0])
  n, temperature = 40_000, 0.7
  counts = np.bincount(_draws(logits, n, temperature=temperature), minlength=5) / n
  expected = np.exp(np.asarray(logits) / temperature)
  expected /= expected.sum()
  np.testing.assert_allclose(counts, expected, atol=0.01)


def test_top_k_and_top_p_sample_only_from_the_allowed_set():
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=50) * 2, jnp.float32)
  order = np.argsort(-np.asarray(logits))
  top5 = set(order[:5].tolist())
  assert set(_draws(logits, 2000, temperature=1.0, top_k=5).tolist()) <= top5
  assert len(set(_draws(logits, 2000, temperature=1.0, top_k=5).tolist())) > 1

  probs = np.exp(np.asarray(logits) - np.max(logits))
  probs /= probs.sum()
  mass_before = np.cumsum(probs[order]) - probs[order]
  nucleus = set(order[mass_before < 0.8].tolist())   # smallest prefix reaching 0.8
  drawn = set(_draws(logits, 4000, temperature=1.0, top_p=0.8).tolist())
  assert drawn <= nucleus and len(drawn) == len(nucleus)
  # A tiny nucleus keeps only the most likely token: sampling becomes greedy.
  assert set(_draws(logits, 200, temperature=1.0, top_p=1e-6).tolist()) == {int(order[0])}


@pytest.mark.parametrize('kwargs, match', [
    (dict(max_new_tokens=0), 'max_new_tokens=0'),
    (dict(max_new_tokens=4, temperature=-1.0), 'temperature=-1.0'),
    (dict(max_new_tokens=4, top_k=0), 'top_k=0'),
    (dict(max_new_tokens=4, top_p=1.5), 'top_p=1.5'),
    (dict(max_new_tokens=70), 'max_len=64'),
])
def test_bad_generation_arguments_raise_one_clear_error(kwargs, match):
  model, params = build('gpt2')
  with pytest.raises(ValueError, match=match):
    decode.generate(model, params, [[1, 2, 3]], **kwargs)
  with pytest.raises(ValueError, match='non-empty'):
    decode.generate(model, params, [[]], max_new_tokens=2)
