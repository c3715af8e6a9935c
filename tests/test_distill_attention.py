"""Attention-map transfer: the maps (models/transformer.py `attention_maps`) against NumPy and
the model's own attention, and the loss (compression/distill.py) against a hand KL."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from compression import distill
from experiments import steps
from models import ModelConfig, Transformer
from models.attention import Attention
from models.layers import Linear
from models.transformer import (attention_maps, block_outputs, capture_attention, capture_blocks,
                                capture_filter)
from tests.conftest import init_params, lm_batches

# Larger weights than the default init: peaked maps, so that every test compares real structure.
GQA = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                  init_std=0.3)


def _packed(rows=2, length=10):
  """A batch of two packed documents per row (positions restart at each), the last row ending
  in padding (segment 0)."""
  b = lm_batches(64, rows=rows, length=length)[0]
  cut = length // 2 - 1
  seg = np.where(np.arange(length) < cut, 1, 2)[None].repeat(rows, 0).astype(np.int32)
  seg[-1, length - 2:] = 0
  pos = np.where(np.arange(length) < cut, np.arange(length), np.arange(length) - cut)
  b.update(segment_ids=seg, positions=np.tile(pos.astype(np.int32), (rows, 1)),
           weights=(seg > 0).astype(np.float32))
  return {k: jnp.asarray(v) for k, v in b.items()}


BATCH = _packed()


def _run(cfg, params, batch, capture):
  return Transformer(cfg).apply({'params': params}, batch['inputs'],
                                positions=batch['positions'], segment_ids=batch['segment_ids'],
                                capture_intermediates=capture, mutable=['intermediates'])


def _np_rope(x, pos, theta):   # the two halves of each head rotated (Llama / NeoX layout)
  h = x.shape[-1]
  angle = pos[..., None] * (1.0 / theta ** (np.arange(0, h, 2) / h))[None, None]
  cos, sin = np.cos(angle)[:, :, None], np.sin(angle)[:, :, None]
  x1, x2 = x[..., :h // 2], x[..., h // 2:]
  return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _np_maps(q, k, cfg, pos, seg):
  """softmax(q k^T / sqrt(H)) over the keys a query may see, in float64."""
  q, k, pos, seg = (np.asarray(a, np.float64) for a in (q, k, pos, seg))
  if cfg.position == 'rope':
    q, k = _np_rope(q, pos, cfg.rope_theta), _np_rope(k, pos, cfg.rope_theta)
  k = np.repeat(k, cfg.n_heads // cfg.n_kv_heads, axis=2)
  s = np.einsum('blnh,bsnh->bnls', q, k) / np.sqrt(cfg.head_dim)
  i, j = np.arange(q.shape[1])[:, None], np.arange(q.shape[1])[None]
  ok = (j <= i) & (i - j < (cfg.sliding_window or q.shape[1]))
  ok = ok[None] & (seg[:, :, None] == seg[:, None, :])
  s = np.where(ok[:, None], s, -np.inf)
  e = np.exp(s - s.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


CASES = {
    'rope_gqa': GQA,
    'window': GQA.replace(sliding_window=3),
    'learned_mha': GQA.replace(position='learned', n_kv_heads=4),
    'shared_blocks': GQA.replace(n_layers=4, n_unique_layers=2),
    'remat': GQA.replace(remat='full'),
}


@pytest.mark.parametrize('name', CASES)
def test_maps_equal_a_numpy_softmax_of_the_captured_queries_and_keys(name):
  cfg = CASES[name]
  _, state = _run(cfg, init_params(cfg, 1), BATCH, capture_attention)
  inter = state['intermediates']
  maps = attention_maps(inter, cfg, BATCH['positions'], BATCH['segment_ids'])
  assert len(maps) == cfg.n_layers
  u = cfg.n_unique_layers
  for i, p in enumerate(maps):
    assert p.shape == (2, cfg.n_heads, 10, 10) and p.dtype == jnp.float32
    attn = inter[f'blocks_{i % u}']['attn']
    q, k = (attn[n]['__call__'][i // u] for n in ('query', 'key'))
    want = _np_maps(q, k, cfg, BATCH['positions'], BATCH['segment_ids'])
    np.testing.assert_allclose(p, want, rtol=1e-5, atol=1e-6)
  assert np.max(np.abs(np.asarray(maps[0] - maps[1]))) > 1e-2   # layers (calls) differ


@pytest.mark.parametrize('name', ['rope_gqa', 'window'])
def test_maps_are_row_stochastic_causal_and_blind_across_segments(name):
  cfg = CASES[name]
  _, state = _run(cfg, init_params(cfg, 1), BATCH, capture_attention)
  seg = np.asarray(BATCH['segment_ids'])
  other = seg[:, None, :, None] != seg[:, None, None, :]
  for p in attention_maps(state['intermediates'], cfg, BATCH['positions'], seg):
    p = np.asarray(p)
    np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-6)
    assert np.all(np.triu(p, k=1) == 0.0)                       # no key after the query
    assert np.all(p[np.broadcast_to(other, p.shape)] == 0.0)    # no key of another document
    if cfg.sliding_window:
      assert np.all(np.tril(p, k=-cfg.sliding_window) == 0.0)   # none beyond the window


def test_maps_times_values_reproduce_the_attention_output():
  """p @ v through the output projection is what each `Attention` module returned."""
  cfg = GQA
  params = init_params(cfg, 1)
  every = lambda m, name: name == '__call__' and (isinstance(m, Attention) or (
      isinstance(m, Linear) and isinstance(m.parent, Attention)))
  _, state = _run(cfg, params, BATCH, every)
  inter = state['intermediates']
  for i, p in enumerate(attention_maps(inter, cfg, BATCH['positions'], BATCH['segment_ids'])):
    attn = inter[f'blocks_{i}']['attn']
    v = jnp.repeat(attn['value']['__call__'][0], cfg.n_heads // cfg.n_kv_heads, axis=2)
    o = jnp.einsum('bnls,bsnh->blnh', p, v)
    out = jnp.einsum('blnh,nhd->bld', o, params[f'blocks_{i}']['attn']['out']['kernel'])
    np.testing.assert_allclose(out, attn['__call__'][0][0], rtol=1e-5, atol=1e-6)


def test_one_apply_captures_blocks_and_attention_and_the_logits_are_unchanged():
  cfg = GQA
  params = init_params(cfg, 1)
  plain = Transformer(cfg).apply({'params': params}, BATCH['inputs'],
                                 positions=BATCH['positions'], segment_ids=BATCH['segment_ids'])
  logits, both = _run(cfg, params, BATCH, capture_filter(blocks=True, attention=True))
  _, blocks = _run(cfg, params, BATCH, capture_blocks)
  _, attn = _run(cfg, params, BATCH, capture_attention)
  np.testing.assert_array_equal(logits, plain)
  for a, b in zip(block_outputs(both['intermediates'], cfg),
                  block_outputs(blocks['intermediates'], cfg)):
    np.testing.assert_array_equal(a, b)
  args = (BATCH['positions'], BATCH['segment_ids'])
  for a, b in zip(attention_maps(both['intermediates'], cfg, *args),
                  attention_maps(attn['intermediates'], cfg, *args)):
    np.testing.assert_array_equal(a, b)
  assert capture_filter() is False


def test_lm_loss_forward_keeps_its_four_outputs_and_adds_maps_on_request():
  lm = steps.lm_loss(Transformer(GQA))
  params = init_params(GQA, 1)
  assert len(lm.forward(params, BATCH)) == 4
  out = lm.forward(params, BATCH, hidden=True)
  assert len(out) == 4 and len(out[3]) == GQA.n_layers
  logits, _, _, hidden, maps = lm.forward(params, BATCH, attention=True)
  assert hidden is None and len(maps) == GQA.n_layers
  np.testing.assert_array_equal(logits, out[0])


# ---- the loss on maps

def _rand_maps(rng, heads, b=2, length=4):
  """Random causal maps [B, N, L, L]: zeros above the diagonal, rows summing to 1."""
  x = np.tril(rng.uniform(0.1, 1.0, size=(b, heads, length, length)))
  return x / x.sum(-1, keepdims=True)


def _np_kl(t, s):   # over the keys, terms where t == 0 count 0
  with np.errstate(divide='ignore', invalid='ignore'):
    return np.sum(np.where(t > 0, t * np.log(t / s), 0.0), axis=-1)


def test_attention_loss_is_the_head_mean_kl_per_query_averaged_over_pairs():
  rng = np.random.default_rng(0)
  s = [_rand_maps(rng, 2) for _ in range(2)]
  t = [_rand_maps(rng, 2) for _ in range(3)]
  got = distill.attention_losses([jnp.asarray(x, jnp.float32) for x in s],
                                 [jnp.asarray(x, jnp.float32) for x in t], ((0, 2), (1, 0)))
  want = (_np_kl(t[2], s[0]).mean(1) + _np_kl(t[0], s[1]).mean(1)) / 2
  assert got.shape == (2, 4)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  same = distill.attention_losses([jnp.asarray(t[1])], [jnp.asarray(t[1])], ((0, 0),))
  np.testing.assert_array_equal(same, 0.0)


def test_different_head_counts_compare_head_averaged_maps():
  rng = np.random.default_rng(1)
  s, t = _rand_maps(rng, 2), _rand_maps(rng, 4)
  got = distill.attention_losses([jnp.asarray(s)], [jnp.asarray(t)], ((0, 0),))
  np.testing.assert_allclose(got, _np_kl(t.mean(1), s.mean(1)), rtol=1e-5, atol=1e-7)


def test_masked_keys_add_nothing_and_no_nan_reaches_the_gradient():
  rng = np.random.default_rng(2)
  s, t = (jnp.asarray(_rand_maps(rng, 2), jnp.float32) for _ in range(2))
  f = lambda x: jnp.sum(distill.attention_losses([x], [t], ((0, 0),)))
  g = jax.grad(f)(s)
  assert np.all(np.isfinite(np.asarray(g)))
  assert np.all(np.triu(np.asarray(g), k=1) == 0.0)   # masked entries: no gradient either
  # A student putting no mass on a key the teacher sees: large, but finite.
  zeroed = s.at[:, :, 1, 0].set(0.0)
  assert np.isfinite(float(f(zeroed))) and float(f(zeroed)) > float(f(s))


# ---- the loss of the training loop

STUDENT_CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, d_ff=64, init_std=0.3)
TEACHER_CFG = GQA.replace(d_model=48, d_ff=96)


def _pair(spec):
  return (distill.loss(steps.lm_loss(Transformer(STUDENT_CFG)), Transformer(TEACHER_CFG), spec),
          init_params(STUDENT_CFG, 1), init_params(TEACHER_CFG, 2))


def _maps(cfg, params):
  _, state = _run(cfg, params, BATCH, capture_attention)
  return attention_maps(state['intermediates'], cfg, BATCH['positions'], BATCH['segment_ids'])


def test_the_loss_adds_its_weighted_attention_term_and_only_the_student_learns():
  spec = distill.Spec(alpha=0.5, attention=((0, 1),), attention_weight=0.7)
  loss, sp, tp = _pair(spec)
  full = dict(sp, **{distill.TEACHER: tp})
  (total, sums), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(full, BATCH)
  att = distill.attention_losses(_maps(STUDENT_CFG, sp), _maps(TEACHER_CFG, tp), ((0, 1),))
  w = BATCH['weights']
  assert np.isfinite(float(sums['attention'])) and float(sums['attention']) > 0
  np.testing.assert_allclose(sums['attention'], jnp.sum(att * w), rtol=1e-5)
  plain, _ = _pair(distill.Spec(alpha=0.5))[0](full, BATCH)
  assert float(total) == pytest.approx(float(plain) + 0.7 * float(sums['attention']), rel=1e-5)
  assert float(optax.tree.norm(grads[distill.TEACHER])) == 0.0
  assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(grads))
  # The attention term alone moves the student's queries, never its head.
  g_att = jax.grad(lambda p: loss(p, BATCH)[1]['attention'])(full)
  assert float(jnp.max(jnp.abs(g_att['blocks_0']['attn']['query']['kernel']))) > 0
  assert float(jnp.max(jnp.abs(g_att['lm_head']['kernel']))) == 0.0


def test_features_and_attention_together_and_the_step_reports_attention_loss():
  spec = distill.Spec(alpha=0.5, features=((0, 1),), feature_weight=0.3,
                      attention=((0, 0), (0, 1)), attention_weight=0.5)
  loss, _, tp = _pair(spec)
  state = steps.init_state(Transformer(STUDENT_CFG), optax.sgd(0.0), 0, 10, loss)
  _, sums = loss(dict(state.params, **{distill.TEACHER: tp}), BATCH)
  assert float(sums['feature']) > 0 and float(sums['attention']) > 0
  _, metrics = steps.train_step(state, BATCH, jnp.ones((64,)), {distill.TEACHER: tp}, loss=loss,
                                accum_steps=1)
  assert float(metrics['attention_loss']) == pytest.approx(
      float(sums['attention'] / sums['tokens']), rel=1e-5)


def test_offline_batches_cannot_teach_attention():
  loss, sp, _ = _pair(distill.Spec(attention=((0, 0),), attention_weight=1.0))
  ids = jnp.zeros(BATCH['inputs'].shape + (4,), jnp.int32)
  batch = dict(BATCH, teacher_ids=ids, teacher_logprobs=jnp.zeros(ids.shape))
  with pytest.raises(ValueError, match='attention transfer needs the teacher model') as e:
    loss(sp, batch)
  assert '\n' not in str(e.value)


@pytest.mark.parametrize('field,value,match', [
    ('attention_weight', -0.5, r'attention_weight=-0\.5 must be >= 0'),
    ('attention_weight', True, r'attention_weight=True must be >= 0'),
    ('attention', ((0, -1),), r'attention=\(\(0, -1\),\) must be pairs \(student layer, '),
    ('attention', ((0, 1, 2),), r'attention=\(\(0, 1, 2\),\) must be pairs'),
    ('attention', [(0, 1)], r'attention=\[\(0, 1\)\] must be pairs'),
])
def test_bad_attention_fields_are_one_line_errors(field, value, match):
  with pytest.raises(ValueError, match=match) as e:
    distill.check(distill.Spec(**{field: value}))
  assert '\n' not in str(e.value)


@pytest.mark.parametrize('pair,match', [
    ((1, 0), r"attention: the pair \(1, 0\) is outside the student's 1 or the teacher's 2 "),
    ((0, 2), r"attention: the pair \(0, 2\) is outside the student's 1 or the teacher's 2 "),
])
def test_attention_pairs_outside_either_model_are_one_line_errors(pair, match):
  with pytest.raises(ValueError, match=match) as e:
    _pair(distill.Spec(attention=(pair,), attention_weight=1.0))
  assert '\n' not in str(e.value)
  with pytest.raises(ValueError, match=match):
    distill.check_layers(distill.Spec(attention=(pair,)), 1, 2)
