"""The serving engine: every request's output as if decoded alone, whatever the batching."""

import dataclasses
from unittest import mock

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compression import quantize
from experiments.engine import Engine, default_buckets
from experiments.requests import Request
from models import ModelConfig, Transformer, decode, gpt2_style
from models import attention
from models import slots as slots_lib

MOST = 12          # the longest continuation any test asks for
CONFIGS = {
    'llama_gqa': (ModelConfig(vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                              d_ff=64, init_std=0.2, max_len=64), None),
    'window_int8': (ModelConfig(vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                d_ff=64, init_std=0.2, max_len=64, sliding_window=6), 'int8'),
    'gpt2_scan': (gpt2_style(vocab_size=61, d_model=32, n_layers=2, n_heads=4, d_ff=64,
                             max_len=64, init_std=0.2, scan_layers=True), None),
}
_BUILT, _ALONE = {}, {}
# The chi-square distribution's 99.9% points for 1..11 degrees of freedom.
CHI2_999 = (10.83, 13.82, 16.27, 18.47, 20.52, 22.46, 24.32, 26.12, 27.88, 29.59, 31.26)


def build(name):
  if name not in _BUILT:
    model = Transformer(CONFIGS[name][0])
    params = nn.meta.unbox(model.init(jax.random.key(1), jnp.zeros((1, 4), jnp.int32))['params'])
    _BUILT[name] = model, params
  return _BUILT[name]


def alone(name, prompt, params=None):
  """The greedy continuation of `prompt` by `decode.generate`, the prompt alone in its batch."""
  key = (name, tuple(prompt), params is None)
  if key not in _ALONE:
    model, own = build(name)
    out = decode.generate(model, own if params is None else params, [list(prompt)],
                          max_new_tokens=MOST, kv_cache_dtype=CONFIGS[name][1])
    _ALONE[key] = np.asarray(out.tokens[0]).tolist()
  return _ALONE[key]


def expected(name, request, params=None):
  """`alone` cut at the request's token limit and after its first stop token."""
  tokens = alone(name, request.prompt, params)[:request.max_new_tokens]
  for i, t in enumerate(tokens):
    if t in request.stop_tokens:
      return tokens[:i + 1]
  return tokens


def random_requests(n, seed, priorities=(0,)):
  rng = np.random.default_rng(seed)
  return [Request(prompt=rng.integers(1, 61, rng.integers(1, 14)).tolist(),
                  max_new_tokens=int(rng.integers(1, MOST + 1)),
                  stop_tokens=(int(rng.integers(1, 61)),), priority=int(rng.choice(priorities)),
                  id=f'r{i}') for i in range(n)]


def serve(engine, requests, arrivals):
  """Submits request i before engine step arrivals[i]; steps until all are done."""
  order = sorted(range(len(requests)), key=lambda i: arrivals[i])
  step = 0
  while order or engine.busy:
    while order and arrivals[order[0]] <= step:
      engine.submit(requests[order.pop(0)])
    engine.step()
    step += 1
  return engine.results


@pytest.mark.parametrize('name', sorted(CONFIGS))
@pytest.mark.parametrize('slots', [1, 3])
@pytest.mark.parametrize('arrival', ['together', 'staggered'])
def test_greedy_output_equals_generate_on_the_request_alone(name, slots, arrival):
  model, params = build(name)
  requests = random_requests(8, seed=slots)
  rng = np.random.default_rng(7)
  arrivals = [0] * 8 if arrival == 'together' else rng.integers(0, 25, 8).tolist()
  engine = Engine(model, params, slots=slots, max_len=32, kv_cache_dtype=CONFIGS[name][1])
  results = serve(engine, requests, arrivals)
  for r in requests:
    got = results[r.id]
    assert got.tokens == expected(name, r), r.id
    assert got.finish_reason == ('stop' if got.tokens[-1] in r.stop_tokens else 'length')
    assert len(got.token_times) == len(got.tokens) and got.ttft >= 0


def test_preempted_requests_resume_with_their_tokens_unchanged():
  # Two slots held by low-priority requests; high-priority ones arrive while they run, each
  # taking a slot at once. Every output still equals its request decoded alone.
  name = 'window_int8'     # the cache ring (window 6) wraps while requests are swapped out
  model, params = build(name)
  low = [Request(prompt=[5, 9, 2 + i], max_new_tokens=MOST, id=f'low{i}') for i in range(3)]
  high = [Request(prompt=[7, 1 + i, 3, 3], max_new_tokens=5, priority=2, id=f'high{i}')
          for i in range(3)]
  engine = Engine(model, params, slots=2, max_len=32, kv_cache_dtype='int8')
  results = serve(engine, low + high, [0, 0, 0, 3, 4, 9])
  assert sum(results[r.id].preemptions for r in low) >= 2
  for r in low + high:
    assert results[r.id].tokens == expected(name, r), r.id
  # A high-priority request gets its first token in the step it arrives.
  step_time = lambda rid: results[rid].token_times[0] - results[rid].arrival
  assert max(step_time(r.id) for r in high) < min(step_time(r.id) for r in low[2:])


def test_the_ring_follows_the_live_spans_through_preemption():
  # One slot: a long request's ring grows; a high-priority short one swaps it out and the ring
  # shrinks under the short one; the long one comes back into a ring grown again, from entries
  # saved at another length. Both outputs equal their prompt decoded alone.
  model, params = build('llama_gqa')
  long = Request(prompt=[5, 9, 2], max_new_tokens=40, id='long')
  short = Request(prompt=[7, 1, 3], max_new_tokens=3, priority=1, id='short')
  engine = Engine(model, params, slots=1, max_len=64)
  rings, step = [], 0
  engine.submit(long)
  while engine.busy:
    if step == 30:
      engine.submit(short)
    engine.step()
    rings.append(engine.ring)
    live = [e.span for e in engine._running.values()]
    assert not live or engine.ring >= max(live)   # every live entry still held
    step += 1
  assert engine.results['long'].preemptions == 1
  before, under_short, after = rings[29], rings[30:33], rings[-1]
  assert before >= 32 and max(under_short) < before and after >= 40
  for r in (long, short):
    want = decode.generate(model, params, [r.prompt], max_new_tokens=r.max_new_tokens)
    assert engine.results[r.id].tokens == np.asarray(want.tokens[0]).tolist(), r.id


def test_resize_keeps_the_last_entries_written():
  cfg = CONFIGS['llama_gqa'][0]
  cache = attention.init_cache(cfg, 2, 16)
  index = 21                                   # the ring has wrapped: entries 5..20 are kept
  cache = dict(cache, index=jnp.asarray(index, jnp.int32),
               pos=jnp.tile(jnp.arange(16), (2, 1)), seg=jnp.ones((2, 16), jnp.int32))
  cache['pos'] = cache['pos'].at[:, (jnp.arange(16) + index) % 16].set(jnp.arange(5, 21))
  cache['k'] = tuple(x + cache['pos'][:, None, :, None] for x in cache['k'])
  for length in (8, 24, 32):
    new = slots_lib.resize(cache, length=length)
    seg, pos = np.asarray(new['seg']), np.asarray(new['pos'])
    kept = np.arange(max(5, index - length), index)           # positions written last
    assert sorted(pos[0][seg[0] == 1]) == kept.tolist()
    assert np.all(pos[0, kept % length] == kept)              # where the new ring expects them
    np.testing.assert_array_equal(np.asarray(new['k'][0])[0, 0, kept % length, 0], kept)
    host = slots_lib.fit(jax.device_get(slots_lib.extract(cache, np.int32(1))), length)
    np.testing.assert_array_equal(host['seg'], seg[1])
    np.testing.assert_array_equal(host['pos'][seg[1] == 1], pos[1][seg[1] == 1])


def test_requests_of_one_priority_start_in_arrival_order():
  model, params = build('llama_gqa')
  requests = [Request(prompt=[3 + i, 4], max_new_tokens=2, id=f'q{i}', priority=i % 2)
              for i in range(6)]
  engine = Engine(model, params, slots=1, max_len=32)
  results = engine.run(requests)
  first = lambda rid: results[rid].token_times[0]
  starts = sorted(results, key=first)
  assert starts == ['q1', 'q3', 'q5', 'q0', 'q2', 'q4']


def test_quantized_weights_serve_like_generate_on_them():
  model, params = build('llama_gqa')
  q = quantize.quantize(params, 'rtn', 8, model=model)
  requests = random_requests(5, seed=3)
  results = Engine(model, q, slots=3, max_len=32).run(requests)
  for r in requests:
    assert results[r.id].tokens == expected('llama_gqa', r, params=q)


def test_compiles_are_bounded_and_a_second_round_compiles_nothing():
  # A config no other test uses, so every program this engine runs is compiled here.
  cfg = ModelConfig(vocab_size=67, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                    init_std=0.2, max_len=64)
  model = Transformer(cfg)
  params = nn.meta.unbox(model.init(jax.random.key(2), jnp.zeros((1, 4), jnp.int32))['params'])
  engine = Engine(model, params, slots=4, max_len=32)
  before = engine.compiles()
  mixed = lambda seed: [Request(prompt=r.prompt, max_new_tokens=r.max_new_tokens,
                                temperature=0.7 * (i % 2), seed=i, priority=i % 3)
                        for i, r in enumerate(random_requests(12, seed))]
  engine.run(mixed(0))
  first = engine.compiles() - before
  # Per bucket and power-of-two batch (1, 2, 4): prefill, and first tokens sampled and greedy;
  # per ring length (16, 24 or 32 entries): insert per bucket, a greedy and a sampled step,
  # extract and restore; a resize per pair of ring lengths.
  buckets, rings = len(engine.buckets), 3
  assert 0 < first <= (buckets * 3 * (1 + 2) + rings * (buckets + 2 + 2)
                       + rings * (rings - 1))
  engine.run(mixed(1))
  engine.run(mixed(0))
  assert engine.compiles() - before <= first + 2 * buckets   # at most batch sizes not yet seen
  again = engine.compiles()
  engine.run(mixed(0))
  assert engine.compiles() == again


def test_bad_requests_get_one_error_each_while_the_others_are_served():
  model, params = build('llama_gqa')
  good = random_requests(3, seed=5)
  bad = {
      'empty': (dict(prompt=[]), 'prompt must be a non-empty'),
      'limit': (dict(prompt=[1, 2], max_new_tokens=0), 'max_new_tokens=0'),
      'long': (dict(prompt=list(range(1, 31)), max_new_tokens=8), 'exceeds the 32 cache'),
      'vocab': (dict(prompt=[1, 61]), 'prompt token 61'),
      'option': (dict(prompt=[1, 2], beam_width=4), "unknown request field 'beam_width'"),
      'top_p': (dict(prompt=[1, 2], top_p=0.0), 'top_p=0.0'),
      'temperature': (dict(prompt=[1, 2], temperature=-1.0), 'temperature=-1.0'),
  }
  engine = Engine(model, params, slots=2, max_len=32)
  mixed = good[:1] + [{'max_new_tokens': 4, **fields, 'id': rid}
                       for rid, (fields, _) in bad.items()] + good[1:]
  results = engine.run(mixed)
  for rid, (_, message) in bad.items():
    got = results[rid]
    assert got.finish_reason == 'error' and got.tokens == []
    assert message in got.error and '\n' not in got.error, (rid, got.error)
  for r in good:
    assert engine.results[r.id].tokens == expected('llama_gqa', r)
  with pytest.raises(ValueError, match='slots=0'):
    Engine(model, params, slots=0)
  with pytest.raises(ValueError, match='max_len=65'):
    Engine(model, params, max_len=65)


def test_a_duplicate_id_is_refused_under_a_name_of_its_own():
  model, params = build('llama_gqa')
  engine = Engine(model, params, slots=2, max_len=32)
  request = Request(prompt=[4, 5], max_new_tokens=3, id='same')
  assert engine.submit(request) == 'same'
  other = engine.submit(dict(prompt=[6], id='same'))
  assert other.startswith('same#') and engine.results[other].finish_reason == 'error'
  assert "id 'same' is already in use" in engine.results[other].error
  engine.run()
  assert engine.results['same'].tokens == expected('llama_gqa', request)


def test_sampled_tokens_depend_only_on_the_request_and_its_seed():
  model, params = build('llama_gqa')
  probe = Request(prompt=[3, 1, 4, 1], max_new_tokens=10, temperature=0.9, top_k=20,
                  top_p=0.9, seed=11, id='probe')
  alone_out = Engine(model, params, slots=1, max_len=32).run([probe])['probe'].tokens
  crowd = [Request(prompt=r.prompt, max_new_tokens=8, temperature=0.8, seed=i,
                   priority=0 if i == 0 else 2, id=r.id)
           for i, r in enumerate(random_requests(4, seed=9))]
  engine = Engine(model, params, slots=2, max_len=32)
  # The lowest priority: the probe is the one preempted when the priority-2 requests arrive.
  low = dataclasses.replace(probe, priority=-1)
  results = serve(engine, [low] + crowd, [0, 0, 2, 3, 5])
  assert results['probe'].preemptions >= 1
  assert results['probe'].tokens == alone_out
  other = Engine(model, params, slots=1, max_len=32).run(
      [Request(prompt=probe.prompt, max_new_tokens=10, temperature=0.9, top_k=20, top_p=0.9,
               seed=12)])
  assert list(other.values())[0].tokens != alone_out


def test_sample_rows_draws_from_each_rows_filtered_distribution():
  logits = jnp.asarray(np.random.default_rng(0).normal(size=(1, 12)) * 1.5, jnp.float32)
  n = 4000
  rows = jnp.repeat(logits, 3, axis=0)
  temperature = jnp.asarray([0.7, 1.0, 0.0])
  top_k, top_p = jnp.asarray([3, 0, 0]), jnp.asarray([1.0, 0.6, 1.0])
  draw = jax.jit(jax.vmap(lambda key: slots_lib.sample_rows(
      rows, jax.random.split(key, 3), temperature, top_k, top_p)))
  samples = np.asarray(draw(jax.random.split(jax.random.key(0), n)))     # [n, 3]
  z = np.asarray(logits[0], np.float64)
  order = np.argsort(-z)
  # Row 0: softmax(z / 0.7) over the top 3. Row 1: the smallest prefix of softmax(z) whose
  # mass reaches 0.6. Row 2: greedy.
  p0 = np.zeros(12)
  p0[order[:3]] = np.exp(z[order[:3]] / 0.7) / np.exp(z[order[:3]] / 0.7).sum()
  p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
  keep = order[:int(np.searchsorted(np.cumsum(p[order]), 0.6) + 1)]
  p1 = np.zeros(12)
  p1[keep] = p[keep] / p[keep].sum()
  for col, want in ((0, p0), (1, p1)):
    counts = np.bincount(samples[:, col], minlength=12)
    assert np.all(counts[want == 0] == 0)
    chi2 = float(np.sum((counts[want > 0] - n * want[want > 0]) ** 2 / (n * want[want > 0])))
    dof = int(np.sum(want > 0)) - 1
    assert dof >= 1 and chi2 < CHI2_999[dof - 1], (col, dof, chi2)
  assert np.all(samples[:, 2] == order[0])


def test_streamed_tokens_arrive_in_order_and_match_the_results():
  model, params = build('llama_gqa')
  requests = random_requests(5, seed=4)
  seen = {}
  results = Engine(model, params, slots=2, max_len=32).run(
      requests, on_token=lambda rid, t: seen.setdefault(rid, []).append(t))
  assert seen == {rid: r.tokens for rid, r in results.items()}


def test_cache_bytes_of_an_int8_engine():
  model, params = build('llama_gqa')
  cfg = model.config
  entries = 2 * cfg.n_layers * 4 * 32 * cfg.n_kv_heads * cfg.head_dim   # k, v: L B S K H
  bookkeeping = 2 * 4 * 32 * 4 + 4                                       # pos, seg, index
  f32 = Engine(model, params, slots=4, max_len=32).cache_bytes()
  int8 = Engine(model, params, slots=4, max_len=32, kv_cache_dtype='int8').cache_bytes()
  assert f32 == 4 * entries + bookkeeping
  assert int8 == entries + entries // cfg.head_dim * attention.SCALE_BYTES + bookkeeping
  assert default_buckets(32) == (8, 16, 32) and default_buckets(100) == (8, 16, 32, 64, 100)


@pytest.mark.parametrize('name', ['llama_gqa', 'gpt2_scan'])
def test_several_steps_per_call_make_the_same_tokens(name):
  # Greedy: each request as `generate` makes it alone. Sampled: the same draws as one step per
  # call, since a token's key is its request's seed and count wherever it is made.
  model, params = build(name)
  requests = random_requests(7, seed=11, priorities=(0, 1))
  arrivals = np.random.default_rng(3).integers(0, 10, len(requests)).tolist()
  engine = Engine(model, params, slots=3, max_len=40, steps_per_call=4)
  results = serve(engine, requests, arrivals)
  for r in requests:
    assert results[r.id].tokens == expected(name, r), r.id
  hot = [dataclasses.replace(r, temperature=0.9, top_k=10, seed=i, id=f'hot{i}')
         for i, r in enumerate(requests)]
  one = Engine(model, params, slots=3, max_len=40).run(hot)
  four = Engine(model, params, slots=3, max_len=40, steps_per_call=4).run(hot)
  assert {k: v.tokens for k, v in four.items()} == {k: v.tokens for k, v in one.items()}
  with pytest.raises(ValueError, match='steps_per_call=0 must be an integer >= 1'):
    Engine(model, params, slots=2, max_len=40, steps_per_call=0)


def test_a_call_of_several_steps_stops_at_the_first_token_limit():
  # Limits 3 and 9 with up to 8 steps per call: calls of 2 and 1 steps (the first request's 3
  # tokens, its first made by the prefill), then 4 and 2 for the second; nothing runs past a
  # limit, so a request filling the whole cache is served as with one step per call.
  model, params = build('llama_gqa')
  engine = Engine(model, params, slots=2, max_len=8 + MOST, buckets=(8,), steps_per_call=8)
  calls = []
  original = slots_lib.steps

  def counted(*args, n, **kwargs):
    calls.append(n)
    return original(*args, n=n, **kwargs)
  requests = [Request(prompt=[5, 6, 7], max_new_tokens=3, id='a'),
              Request(prompt=[8, 9], max_new_tokens=9, id='b'),
              Request(prompt=list(range(1, 9)), max_new_tokens=MOST, id='full')]
  with mock.patch.object(slots_lib, 'steps', counted):
    results = engine.run(requests[:2])
  assert calls == [2, 4, 2] and results['a'].tokens == expected('llama_gqa', requests[0])
  assert results['b'].tokens == expected('llama_gqa', requests[1])
  assert engine.run([requests[2]])['full'].tokens == expected('llama_gqa', requests[2])
