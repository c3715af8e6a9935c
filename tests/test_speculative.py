"""Speculative decoding: the target's greedy tokens exactly, and its distribution when sampled."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.engine import Engine
from experiments.requests import Request
from models import ModelConfig, Transformer, decode, gpt2_style
from models import speculative

MOST = 12
# The chi-square distribution's 99.9% points, by degrees of freedom.
CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32, 8: 26.12,
            9: 27.88, 10: 29.59, 11: 31.26, 12: 32.91, 13: 34.53, 14: 36.12, 15: 37.70,
            16: 39.25, 17: 40.79, 18: 42.31, 19: 43.82, 20: 45.31, 21: 46.80, 22: 48.27,
            23: 49.73, 24: 51.18}


def make(cfg, seed):
  model = Transformer(cfg)
  params = nn.meta.unbox(model.init(jax.random.key(seed), jnp.zeros((1, 4), jnp.int32))['params'])
  return model, params


def llama(n_layers=2, vocab=61, **kw):
  return ModelConfig(vocab_size=vocab, d_model=32, n_layers=n_layers, n_heads=4, n_kv_heads=2,
                     d_ff=64, init_std=0.2, max_len=256, **kw)


def chi2_ok(counts, want):
  """Pearson's test at 99.9%, cells of small expectation pooled into one."""
  n = counts.sum()
  big = want * n >= 5
  obs = np.append(counts[big], counts[~big].sum())
  exp = np.append(want[big] * n, want[~big].sum() * n)
  obs, exp = obs[exp > 0], exp[exp > 0]
  assert np.all(counts[want == 0] == 0), 'a token of probability 0 was drawn'
  chi2, dof = float(np.sum((obs - exp) ** 2 / exp)), len(obs) - 1
  return dof >= 1 and chi2 < CHI2_999[dof], (chi2, dof)


def test_the_rejection_rule_makes_each_token_follow_the_target():
  # Fixed target distributions p_0..p_k and draft distributions q_0..q_{k-1}, drafts drawn from
  # q: the first token made must follow p_0, and the second, where the first draft was kept,
  # p_1 (the target's next distribution). Zeros in p and q exercise filtered supports.
  rng = np.random.default_rng(0)
  v, k, n = 6, 3, 40000
  p = rng.dirichlet(np.ones(v), size=k + 1)
  p[0, 5] = 0.0
  p /= p.sum(-1, keepdims=True)
  q = rng.dirichlet(np.ones(v) * 0.5, size=k)
  q[0, 2] = 0.0
  q /= q.sum(-1, keepdims=True)
  keys = jax.random.split(jax.random.key(1), n)
  drafts = jax.vmap(lambda key: jax.vmap(jax.random.categorical)(
      jax.random.split(key, k), jnp.log(jnp.asarray(q, jnp.float32))))(
          jax.random.split(jax.random.key(2), n)).astype(jnp.int32)
  tile = lambda x: jnp.broadcast_to(jnp.asarray(x, jnp.float32), (n,) + x.shape)
  kept, nxt = jax.jit(speculative.accept)(tile(p), tile(q), drafts, keys)
  kept, nxt, drafts = np.asarray(kept), np.asarray(nxt), np.asarray(drafts)
  assert kept.min() >= 0 and kept.max() <= k and 0 < (kept == k).sum() < n
  first = np.where(kept >= 1, drafts[:, 0], nxt)
  ok, stat = chi2_ok(np.bincount(first, minlength=v), p[0])
  assert ok, stat
  second = np.where(kept >= 2, drafts[:, 1], nxt)[kept >= 1]
  ok, stat = chi2_ok(np.bincount(second, minlength=v), p[1])
  assert ok, stat
  # The acceptance probability of the first draft is sum_x min(p_0, q_0).
  want = np.minimum(p[0], q[0]).sum()
  assert abs(np.mean(kept >= 1) - want) < 4 * np.sqrt(want * (1 - want) / n)


def test_greedy_rows_keep_exactly_the_proposals_equal_to_the_argmax():
  v, k = 7, 4
  p = jax.nn.one_hot(jnp.asarray([[3, 1, 4, 1, 5]]), v)
  q = jax.nn.one_hot(jnp.asarray([[3, 1, 2, 1]]), v)
  kept, nxt = speculative.accept(p, q, jnp.asarray([[3, 1, 2, 1]]), jax.random.key(0)[None])
  assert int(kept[0]) == 2 and int(nxt[0]) == 4


def alone(model, params, prompt):
  out = decode.generate(model, params, [list(prompt)], max_new_tokens=MOST)
  return np.asarray(out.tokens[0]).tolist()


def requests(n, seed, vocab=61):
  rng = np.random.default_rng(seed)
  return [Request(prompt=rng.integers(1, vocab, rng.integers(1, 14)).tolist(),
                  max_new_tokens=int(rng.integers(1, MOST + 1)),
                  stop_tokens=(int(rng.integers(1, vocab)),), priority=int(rng.integers(0, 3)),
                  id=f'r{i}') for i in range(n)]


def cut(tokens, r):
  tokens = tokens[:r.max_new_tokens]
  for i, t in enumerate(tokens):
    if t in r.stop_tokens:
      return tokens[:i + 1]
  return tokens


@pytest.mark.parametrize('target_cfg,draft_cfg,k,slots', [
    (llama(), 'same', 3, 2),            # the draft is the target: everything is kept
    (llama(), llama(n_layers=1), 4, 3),  # a different draft: most proposals are rejected
    (gpt2_style(vocab_size=61, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_len=256,
                init_std=0.2, scan_layers=True),
     gpt2_style(vocab_size=61, d_model=32, n_layers=1, n_heads=4, d_ff=64, max_len=256,
                init_std=0.2), 2, 1),
])
def test_speculative_greedy_output_is_the_targets_whatever_the_batching(target_cfg, draft_cfg,
                                                                        k, slots):
  model, params = make(target_cfg, 1)
  draft = (model, params) if draft_cfg == 'same' else make(draft_cfg, 5)
  reqs = requests(7, seed=k)
  engine = Engine(model, params, slots=slots, max_len=256, draft=draft, draft_tokens=k)
  # Staggered arrivals with mixed priorities: slots fill, free and get preempted mid-request.
  arrivals = np.random.default_rng(k).integers(0, 6, len(reqs)).tolist()
  order, step = sorted(range(len(reqs)), key=lambda i: arrivals[i]), 0
  while order or engine.busy:
    while order and arrivals[order[0]] <= step:
      engine.submit(reqs[order.pop(0)])
    engine.step()
    step += 1
  for r in reqs:
    got = engine.results[r.id]
    assert got.finish_reason in ('stop', 'length'), got.error
    assert got.tokens == cut(alone(model, params, r.prompt), r), r.id
  rate = engine.acceptance_rate()
  if draft_cfg == 'same':
    assert rate > 0.95, rate
  else:
    assert rate < 0.9, rate
  assert engine.stats['passes'] < step


def test_speculative_sampling_follows_the_targets_joint_distribution():
  # Tiny vocabulary, one prompt, many seeds: the pair (token 1, token 2) the engine makes, token
  # 1 by the target's prefill and token 2 by a speculative pass, against the target's exact
  # joint p(t1) p(t2 | t1) from two forward passes.
  v = 5
  model, params = make(llama(vocab=v), 3)
  draft = make(llama(n_layers=1, vocab=v), 4)
  prompt, n = [1, 2, 3], 3000
  engine = Engine(model, params, slots=8, max_len=32, buckets=(4,), draft=draft, draft_tokens=3)
  results = engine.run([Request(prompt=prompt, max_new_tokens=2, temperature=1.0, seed=i)
                        for i in range(n)])
  pairs = np.array([r.tokens for r in results.values()])
  counts = np.bincount(pairs[:, 0] * v + pairs[:, 1], minlength=v * v)
  rows = jnp.asarray([prompt + [t] for t in range(v)])
  probs = np.asarray(jax.nn.softmax(model.apply({'params': params}, rows), -1), np.float64)
  joint = (probs[0, 2][:, None] * probs[:, 3]).reshape(-1)
  ok, stat = chi2_ok(counts, joint / joint.sum())
  assert ok, stat
  assert 0.05 < engine.acceptance_rate() < 0.99


def test_bad_draft_settings_and_requests_too_long_to_speculate_are_one_line():
  model, params = make(llama(), 1)
  bad = [
      (dict(draft=make(llama(vocab=60), 2)), 'vocab_size=60 differs from the target'),
      (dict(draft=make(llama(sliding_window=8), 2)), 'sliding_window=8'),
      (dict(draft=make(llama(n_layers=1), 2), draft_tokens=0), 'draft_tokens=0'),
      (dict(draft=model), 'a (model, params) pair'),
  ]
  for kwargs, message in bad:
    with pytest.raises(ValueError, match=message.replace('(', r'\(').replace(')', r'\)')):
      Engine(model, params, slots=2, max_len=64, **kwargs)
  engine = Engine(model, params, slots=2, max_len=64, draft=make(llama(n_layers=1), 2),
                  draft_tokens=3)
  # 8 (bucket) + 4 entries x 15 tokens > 64; the same request fits without a draft.
  long = engine.submit(Request(prompt=[1, 2, 3], max_new_tokens=15))
  fine = engine.submit(Request(prompt=[1, 2, 3], max_new_tokens=5))
  engine.run()
  assert 'x 4 entries each exceeds the 64 cache entries' in engine.results[long].error
  assert engine.results[fine].tokens == alone(model, params, [1, 2, 3])[:5]
  assert Engine(model, params, slots=2, max_len=64).run(
      [Request(prompt=[1, 2, 3], max_new_tokens=15, id='x')])['x'].finish_reason == 'length'
