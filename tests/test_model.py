"""Properties of `Transformer`: causality, GQA, RoPE, windows, sharing, scan, packing, decoding.

Models are tiny and float32. Parameters are drawn with NumPy (biases and norm scales included, at
a scale well above the initializer's) so that every parameter changes the logits measurably.
"""

import functools
import pickle
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from flax.core import meta

from models import ModelConfig, Transformer, gpt2_style, init_cache, stack_layers, unstack_layers
from models import axes
from models.attention import Attention, Geometry, rope

SIZES = dict(vocab_size=50, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_len=32)
LLAMA = ModelConfig(n_kv_heads=2, **SIZES)  # RoPE, RMSNorm, SwiGLU, GQA, untied head
GPT2 = gpt2_style(**SIZES)                  # learned positions, LayerNorm, GELU, biases, tied head
WINDOW = LLAMA.replace(sliding_window=4)
CONFIGS = dict(llama=LLAMA, gpt2=GPT2, window=WINDOW)


def boxed_shapes(cfg):
  init = lambda: Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  return jax.eval_shape(init)['params']


def random_params(shapes, seed):
  """Draws every leaf with NumPy: norm scales near 1, everything else (biases too) N(0, 0.2^2)."""
  rng = np.random.default_rng(seed)

  def draw(path, x):
    noise = rng.normal(size=x.shape).astype(np.float32)
    return jnp.asarray(1 + 0.1 * noise if path[-1].key == 'scale' else 0.2 * noise)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def make_params(cfg, seed=0):
  return random_params(meta.unbox(boxed_shapes(cfg)), seed)


def make_tokens(seed, shape, vocab=50):
  return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, shape), jnp.int32)


@functools.partial(jax.jit, static_argnums=0)
def forward(cfg, params, tokens, positions=None, segment_ids=None, cache=None):
  return Transformer(cfg).apply({'params': params}, tokens, positions, segment_ids, cache)


def assert_trees_close(a, b, tol):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=tol, rtol=tol)


def count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize('name', ['llama', 'gpt2', 'window'])
def test_changing_a_token_changes_only_its_own_and_later_logits(name):
  cfg, t_len = CONFIGS[name], 12
  base = make_tokens(0, (t_len,))
  changed = [0, 5, 11]
  rows = [base] + [base.at[t].set((base[t] + 1) % cfg.vocab_size) for t in changed]
  logits = np.asarray(forward(cfg, make_params(cfg), jnp.stack(rows)))
  for row, t in enumerate(changed, start=1):
    np.testing.assert_allclose(logits[row, :t], logits[0, :t], atol=1e-6, rtol=0)
    assert np.abs(logits[row, t] - logits[0, t]).max() > 1e-3


def test_gqa_with_one_kv_head_per_query_head_is_mha():
  mha = LLAMA.replace(n_kv_heads=None)
  assert mha.n_kv_heads == mha.n_heads
  assert mha == LLAMA.replace(n_kv_heads=LLAMA.n_heads)   # the same config, so the same model


@pytest.mark.parametrize('name', ['llama', 'gpt2'])
def test_gqa_equals_mha_with_kv_heads_repeated_per_group(name):
  gqa = CONFIGS[name].replace(n_kv_heads=2)
  mha = gqa.replace(n_kv_heads=None)
  group = gqa.n_heads // gqa.n_kv_heads
  params, tokens = make_params(gqa), make_tokens(2, (2, 10))

  def widen(spread):  # spread(x, axis): [.., K, ..] -> [.., N, ..]
    def leaf(path, x):
      names = [k.key for k in path]
      if names[-2] not in ('key', 'value'):
        return x
      return spread(x, 1 if names[-1] == 'kernel' else 0)
    return jax.tree_util.tree_map_with_path(leaf, params)

  repeated = widen(lambda x, axis: jnp.repeat(x, group, axis=axis))  # query head j -> j // group
  assert repeated['blocks_0']['attn']['key']['kernel'].shape == (mha.d_model, mha.n_heads,
                                                                  mha.head_dim)
  expected = forward(gqa, params, tokens)
  np.testing.assert_allclose(forward(mha, repeated, tokens), expected, atol=1e-5, rtol=1e-5)
  # The grouping matters: cycling kv heads over query heads (j -> j % n_kv_heads) is different.
  tiled = widen(lambda x, axis: jnp.concatenate([x] * group, axis=axis))
  assert np.abs(forward(mha, tiled, tokens) - expected).max() > 1e-3


def test_rope_scores_depend_only_on_relative_position():
  rng = np.random.default_rng(0)
  q, k = (jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32) for _ in range(2))
  at = lambda x, p: rope(x, jnp.full((1, 1), p, jnp.int32), 10_000.0)
  score = lambda m, n: float(jnp.sum(at(q, m) * at(k, n)))
  np.testing.assert_array_equal(at(q, 0), q)
  for offset in (-3, 0, 1, 5, 20):
    for shift in (1, 7, 100):
      np.testing.assert_allclose(score(offset + shift, shift), score(offset, 0), atol=1e-4)
  scores = [score(offset, 0) for offset in (0, 1, 2, 5)]
  assert min(abs(a - b) for i, a in enumerate(scores) for b in scores[i + 1:]) > 1e-3


@pytest.mark.parametrize('name', ['llama', 'window', 'gpt2'])
def test_logits_are_invariant_to_shifting_all_positions_with_rope_only(name):
  cfg = CONFIGS[name]
  params, tokens = make_params(cfg), make_tokens(3, (2, 10))
  positions = jnp.broadcast_to(jnp.arange(10, dtype=jnp.int32), (2, 10))
  logits = forward(cfg, params, tokens, positions=positions)
  shifted = forward(cfg, params, tokens, positions=positions + 7)
  if cfg.position == 'rope':
    np.testing.assert_allclose(shifted, logits, atol=1e-5, rtol=0)
  else:  # learned absolute positions see the shift
    assert np.abs(shifted - logits).max() > 1e-3


def test_sliding_window_sees_exactly_the_last_window_tokens():
  cfg, t_len = WINDOW.replace(n_layers=1), 12
  base = make_tokens(4, (t_len,))
  changed = [0, 3, 6]
  rows = [base] + [base.at[s].set((base[s] + 1) % cfg.vocab_size) for s in changed]
  logits = np.asarray(forward(cfg, make_params(cfg), jnp.stack(rows)))
  for row, s in enumerate(changed, start=1):
    diff = np.abs(logits[row] - logits[0]).max(axis=-1)
    for t in range(t_len):
      if 0 <= t - s < cfg.sliding_window:
        assert diff[t] > 1e-3, (s, t)
      else:
        assert diff[t] <= 1e-6, (s, t)


def np_rope(x_BxLxNxH, pos_BxL, theta):
  """Rotates pairs (i, i + H/2) by angle pos * theta^(-2i/H)."""
  half = x_BxLxNxH.shape[-1] // 2
  angle = pos_BxL[:, :, None, None] * theta ** (-2.0 * np.arange(half) / (2 * half))
  x1, x2 = x_BxLxNxH[..., :half], x_BxLxNxH[..., half:]
  return np.concatenate([x1 * np.cos(angle) - x2 * np.sin(angle),
                         x2 * np.cos(angle) + x1 * np.sin(angle)], axis=-1)


def np_attention(p, cfg, x_BxLxD, pos_BxL, seg_BxL):
  """Attention with explicit mask: same segment and 0 <= q - k < window (in float64)."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
  length, h = x_BxLxD.shape[1], cfg.head_dim

  def proj(name):
    y = np.einsum('bld,dnh->blnh', x_BxLxD, p[name]['kernel'])
    return y + p[name]['bias'] if cfg.qkv_bias else y

  q_BxLxNxH, k_BxSxKxH, v_BxSxKxH = proj('query'), proj('key'), proj('value')
  if cfg.position == 'rope':
    q_BxLxNxH = np_rope(q_BxLxNxH, pos_BxL, cfg.rope_theta)
    k_BxSxKxH = np_rope(k_BxSxKxH, pos_BxL, cfg.rope_theta)
  group = cfg.n_heads // cfg.n_kv_heads
  k_BxSxNxH, v_BxSxNxH = (np.repeat(x, group, axis=2) for x in (k_BxSxKxH, v_BxSxKxH))
  scores_BxNxLxS = np.einsum('blnh,bsnh->bnls', q_BxLxNxH, k_BxSxNxH) / np.sqrt(h)
  delta_LxS = np.arange(length)[:, None] - np.arange(length)[None, :]
  window = length if cfg.sliding_window is None else cfg.sliding_window
  mask_BxLxS = ((delta_LxS >= 0) & (delta_LxS < window)
                & (seg_BxL[:, :, None] == seg_BxL[:, None, :]))
  scores_BxNxLxS = np.where(mask_BxLxS[:, None], scores_BxNxLxS, -np.inf)
  weights = np.exp(scores_BxNxLxS - scores_BxNxLxS.max(axis=-1, keepdims=True))
  weights /= weights.sum(axis=-1, keepdims=True)
  out = np.einsum('bnls,bsnh,nhd->bld', weights, v_BxSxNxH, p['out']['kernel'])
  return out + p['out']['bias'] if cfg.out_bias else out


@pytest.mark.parametrize('name,window,packed', [
    ('llama', 3, False), ('llama', None, True), ('gpt2', 5, True), ('gpt2', None, False)])
def test_attention_matches_numpy_reference(name, window, packed):
  cfg = CONFIGS[name].replace(sliding_window=window)
  b, t = 2, 11
  rng = np.random.default_rng(5)
  x = rng.normal(size=(b, t, cfg.d_model)).astype(np.float32)
  seg = np.ones((b, t), np.int32)
  pos = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))
  if packed:  # row 0: two documents of 4 and 7 tokens; row 1: one document
    seg[0, 4:] = 2
    pos = np.stack([np.r_[np.arange(4), np.arange(7)], np.arange(t)]).astype(np.int32)
  geo = Geometry(jnp.asarray(pos), jnp.asarray(seg) if packed else None)
  module = Attention(cfg)
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.asarray(x), geo))['params']
  params = random_params(meta.unbox(shapes), 6)
  out, new_kv = jax.jit(module.apply)({'params': params}, jnp.asarray(x), geo)
  assert new_kv is None
  expected = np_attention(params, cfg, x.astype(np.float64), pos, seg)
  np.testing.assert_allclose(out, expected, atol=1e-5, rtol=1e-5)


def block_param_count(cfg):
  d, n, k, h, f = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff
  attn = 2 * d * n * h + 2 * d * k * h
  attn += (n * h + 2 * k * h) * cfg.qkv_bias + d * cfg.out_bias
  n_up = 2 if cfg.mlp == 'swiglu' else 1
  mlp = (n_up + 1) * d * f + (n_up * f + d) * cfg.mlp_bias
  norms = 2 * d * (2 if cfg.norm == 'layernorm' else 1)
  return attn + mlp + norms


def model_param_count(cfg):
  d = cfg.d_model
  total = cfg.vocab_size * d + cfg.n_unique_layers * block_param_count(cfg)
  total += d * (2 if cfg.norm == 'layernorm' else 1)  # final norm
  total += cfg.max_len * d * (cfg.position == 'learned')
  total += d * cfg.vocab_size * (not cfg.tie_embeddings)
  return total


@pytest.mark.parametrize('name', ['llama', 'gpt2'])
def test_parameter_count_with_shared_layers(name):
  counts = {}
  for unique in (1, 2, 4):
    cfg = CONFIGS[name].replace(n_layers=4, n_unique_layers=unique)
    params = meta.unbox(boxed_shapes(cfg))
    assert {k for k in params if k.startswith('blocks')} == {f'blocks_{i}' for i in range(unique)}
    counts[unique] = count(params)
    assert counts[unique] == model_param_count(cfg)
  assert counts[4] - counts[1] == 3 * block_param_count(CONFIGS[name])
  assert counts[2] - counts[1] == block_param_count(CONFIGS[name])


@pytest.mark.parametrize('name', ['llama', 'gpt2'])
def test_shared_blocks_equal_an_unshared_model_with_cyclic_copies(name):
  shared = CONFIGS[name].replace(n_layers=4, n_unique_layers=2)
  params, tokens = make_params(shared), make_tokens(7, (2, 9))
  copies = {k: v for k, v in params.items() if not k.startswith('blocks_')}
  copies.update({f'blocks_{l}': params[f'blocks_{l % 2}'] for l in range(4)})
  np.testing.assert_allclose(forward(shared.replace(n_unique_layers=None), copies, tokens),
                             forward(shared, params, tokens), atol=1e-5, rtol=1e-5)


SCAN_CASES = [('llama', 2, None, 'none'), ('gpt2', 2, None, 'full'), ('llama', 4, 2, 'dots'),
              ('gpt2', 4, 2, 'none'), ('window', 2, 1, 'full')]


@pytest.mark.parametrize('name,n_layers,unique,remat', SCAN_CASES)
def test_scan_layers_equals_unrolled(name, n_layers, unique, remat):
  cfg = CONFIGS[name].replace(n_layers=n_layers, n_unique_layers=unique)
  scan = cfg.replace(scan_layers=True, remat=remat)
  params, tokens = make_params(cfg), make_tokens(8, (2, 9))
  stacked = stack_layers(params, cfg)
  scan_shapes = meta.unbox(boxed_shapes(scan))
  assert jax.tree.map(np.shape, stacked) == jax.tree.map(np.shape, scan_shapes)
  assert_trees_close(unstack_layers(stacked, cfg), params, 0)
  np.testing.assert_allclose(forward(scan, stacked, tokens), forward(cfg, params, tokens),
                             atol=1e-5, rtol=1e-5)


@functools.partial(jax.jit, static_argnums=0)
def loss_grad(cfg, params, tokens_BxL):
  def loss(p):
    logp = jax.nn.log_softmax(Transformer(cfg).apply({'params': p}, tokens_BxL[:, :-1]))
    return -jnp.mean(jnp.take_along_axis(logp, tokens_BxL[:, 1:, None], axis=-1))
  return jax.grad(loss)(params)


@pytest.mark.parametrize('scan,remat', [(False, 'full'), (False, 'dots'), (True, 'full'),
                                        (True, 'dots')])
def test_remat_leaves_gradients_unchanged(scan, remat):
  cfg = GPT2.replace(n_layers=2, n_unique_layers=1, scan_layers=scan)  # one block used twice
  params, tokens = make_params(cfg), make_tokens(9, (2, 9))
  grads = loss_grad(cfg, params, tokens)
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads)) > 1e-2
  assert_trees_close(loss_grad(cfg.replace(remat=remat), params, tokens), grads, 1e-5)


@pytest.mark.parametrize('name', ['llama', 'gpt2', 'window'])
def test_packed_segments_equal_separate_rows(name):
  cfg = CONFIGS[name]
  params = make_params(cfg)
  a, b = make_tokens(10, (1, 5)), make_tokens(11, (1, 7))
  tokens = jnp.concatenate([jnp.concatenate([a, b], 1), jnp.concatenate([b, a], 1)])
  ramp = lambda n: jnp.arange(n, dtype=jnp.int32)
  positions = jnp.stack([jnp.concatenate([ramp(5), ramp(7)]), jnp.concatenate([ramp(7), ramp(5)])])
  segments = jnp.asarray([[1] * 5 + [2] * 7, [1] * 7 + [2] * 5], jnp.int32)
  logits = forward(cfg, params, tokens, positions=positions, segment_ids=segments)
  alone_a, alone_b = forward(cfg, params, a)[0], forward(cfg, params, b)[0]
  for got, want in ((logits[0, :5], alone_a), (logits[0, 5:], alone_b),
                    (logits[1, :7], alone_b), (logits[1, 7:], alone_a)):
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


DECODE_CONFIGS = dict(llama=LLAMA, gpt2=GPT2, window=WINDOW,
                      scan=LLAMA.replace(n_layers=3, scan_layers=True),
                      scan_shared_window=WINDOW.replace(n_layers=2, n_unique_layers=1,
                                                        scan_layers=True))


@pytest.mark.parametrize('name,chunk', [
    ('llama', 1), ('llama', 3), ('gpt2', 1), ('gpt2', 3), ('window', 1), ('window', 3),
    ('window', 5), ('scan', 1), ('scan', 3), ('scan_shared_window', 5)])
def test_cached_decoding_equals_full_forward(name, chunk):
  cfg, t_len = DECODE_CONFIGS[name], 11
  params, tokens = make_params(cfg), make_tokens(12, (2, t_len))
  cache = init_cache(cfg, 2, t_len)
  # One array per layer (per pass over the stacked blocks under scan), together all layers.
  per_call, calls = (2, cfg.n_kv_heads, min(t_len, cfg.sliding_window or t_len),
                     cfg.head_dim), cfg.n_layers
  if cfg.scan_layers:
    per_call, calls = (cfg.n_unique_layers,) + per_call, cfg.n_layers // cfg.n_unique_layers
  assert [x.shape for x in cache['k']] == [per_call] * calls
  pieces = []
  for start in range(0, t_len, chunk):
    logits, cache = forward(cfg, params, tokens[:, start:start + chunk], cache=cache)
    pieces.append(logits)
  assert int(cache['index']) == t_len
  np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), forward(cfg, params, tokens),
                             atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('cfg', [LLAMA, GPT2, LLAMA.replace(scan_layers=True),
                                 GPT2.replace(n_layers=4, n_unique_layers=2, scan_layers=True)],
                         ids=['llama', 'gpt2', 'llama_scan', 'gpt2_scan_shared'])
def test_every_parameter_carries_logical_axis_names(cfg):
  size_of = {axes.VOCAB: cfg.vocab_size, axes.EMBED: cfg.d_model, axes.HEADS: cfg.n_heads,
             axes.KV_HEADS: cfg.n_kv_heads, axes.HEAD_DIM: cfg.head_dim, axes.MLP: cfg.d_ff,
             axes.LAYERS: cfg.n_unique_layers, axes.POSITION: cfg.max_len}
  is_box = lambda x: isinstance(x, meta.AxisMetadata)
  flat = traverse_util.flatten_dict(boxed_shapes(cfg), is_leaf=lambda _, x: is_box(x))
  for path, leaf in flat.items():
    assert isinstance(leaf, nn.LogicallyPartitioned), path
    names, shape = leaf.names, leaf.value.shape
    assert len(names) == len(shape) and set(names) <= set(axes.ALL), (path, names)
    assert tuple(size_of[n] for n in names) == shape, (path, names, shape)
    assert (axes.LAYERS in names) == (cfg.scan_layers and path[0] == 'blocks'), path
    assert axes.LAYERS not in names[1:], path
  block = 'blocks' if cfg.scan_layers else 'blocks_0'
  lead = (axes.LAYERS,) if cfg.scan_layers else ()
  assert flat[(block, 'attn', 'key', 'kernel')].names == lead + (axes.EMBED, axes.KV_HEADS,
                                                                 axes.HEAD_DIM)
  assert flat[(block, 'attn', 'out', 'kernel')].names == lead + (axes.HEADS, axes.HEAD_DIM,
                                                                 axes.EMBED)


@pytest.mark.parametrize('name', ['llama', 'gpt2'])
def test_bfloat16_compute_with_float32_params(name):
  cfg = CONFIGS[name]
  half = cfg.replace(dtype='bfloat16')
  dtypes = {x.dtype for x in jax.tree.leaves(meta.unbox(boxed_shapes(half)))}
  assert dtypes == {jnp.dtype(jnp.float32)}
  params, tokens = make_params(cfg), make_tokens(13, (2, 10))
  want, got = forward(cfg, params, tokens), forward(half, params, tokens)
  assert got.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(got)))
  rel = float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
  assert 1e-5 < rel <= 5e-2  # really computed in bfloat16, and close


@pytest.mark.parametrize('changes,text', [
    (dict(n_kv_heads=3), 'n_kv_heads=3'),
    (dict(n_kv_heads=0), 'n_kv_heads=0'),
    (dict(d_model=30), 'd_model=30'),
    (dict(norm='batchnorm'), "norm='batchnorm'"),
    (dict(n_layers=4, n_unique_layers=3), 'n_unique_layers=3'),
    (dict(d_model=0), 'd_model=0'),
    (dict(n_layers=-1), 'n_layers=-1'),
    (dict(vocab_size=0), 'vocab_size=0'),
    (dict(d_ff=0), 'd_ff=0'),
    (dict(head_dim=7), 'head_dim=7'),
    (dict(sliding_window=0), 'sliding_window=0'),
    (dict(attention_impl='flash'), "attention_impl='flash'"),
    (dict(dtype='int8'), "dtype='int8'"),
])
def test_bad_config_values_raise(changes, text):
  with pytest.raises(ValueError, match=re.escape(text)):
    LLAMA.replace(**changes)


def test_derived_fields_resolve_to_ints_and_configs_compare_by_value():
  sizes = dict(d_model=128, n_heads=4, n_layers=4, d_ff=96)
  derived = ModelConfig(**sizes)
  assert (derived.head_dim, derived.n_kv_heads, derived.moe_d_ff, derived.n_unique_layers) == (
      32, 4, 96, 4)
  given = ModelConfig(head_dim=32, n_kv_heads=4, moe_d_ff=96, n_unique_layers=4, **sizes)
  assert given == derived and hash(given) == hash(derived) and repr(given) == repr(derived)
  assert ModelConfig(head_dim=None, n_kv_heads=None) == ModelConfig()
  assert ModelConfig(head_dim=16, **sizes) != derived
  for old in ('head_size', 'kv_heads', 'expert_d_ff', 'unique_layers'):   # one name per concept
    assert not hasattr(derived, old)
  traces = []

  @functools.partial(jax.jit, static_argnums=0)
  def width(cfg, x):
    traces.append(cfg)
    return x * cfg.head_dim

  assert float(width(derived, 1.0)) == float(width(given, 1.0)) == 32.0
  assert len(traces) == 1   # equal configs are one static argument


@pytest.mark.parametrize('field,base,change,rederived,given', [
    ('head_dim', dict(d_model=128, n_heads=4), dict(d_model=256), 64, 16),
    ('n_kv_heads', dict(n_heads=4), dict(n_heads=8), 8, 2),
    ('moe_d_ff', dict(d_ff=96), dict(d_ff=64), 64, 32),
    ('n_unique_layers', dict(n_layers=4), dict(n_layers=6), 6, 2),
])
def test_replace_derives_again_what_was_derived_and_keeps_what_was_given(field, base, change,
                                                                         rederived, given):
  derived = ModelConfig(**base)
  explicit = ModelConfig(**base, **{field: given})
  for cfg in (derived, derived.replace(init_std=0.01), pickle.loads(pickle.dumps(derived))):
    assert getattr(cfg.replace(**change), field) == rederived
  for cfg in (explicit, explicit.replace(init_std=0.01), pickle.loads(pickle.dumps(explicit))):
    assert getattr(cfg.replace(**change), field) == given
  assert getattr(explicit.replace(**change, **{field: None}), field) == rederived
