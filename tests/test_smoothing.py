"""Scale transforms (compression/smoothing.py) and the absmax/abssum calibration statistics.

Every transform must leave the float function unchanged (logits to float rounding) on a
Llama-style model, GPT-2 (LayerNorm and biases, randomised so that a bias left unscaled shows)
and a GQA model whose second block is MoE with a shared expert. SmoothQuant's scales and AWQ's
search are held to NumPy computations of the published formulas from the calibration data.
"""

import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compression import calibration, grid, paths, smoothing
from models import ModelConfig, Transformer, gpt2_style
from tests.conftest import lm_batches

SIZES = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_len=32)
CONFIGS = {
    'llama': ModelConfig(**SIZES, mlp_bias=True),   # a SwiGLU up bias for the up site to scale
    'gpt2': gpt2_style(**SIZES),
    'moe_gqa': ModelConfig(**SIZES, n_kv_heads=2, n_experts=4, moe_d_ff=16, moe_every=2,
                           n_shared_experts=1),
}
N_OUTLIERS, FACTOR = 3, 50.0
BITS, GROUP = 4, 8
SPIKE = 0   # padding tokens read this embedding row: one huge channel after the norm


def quantize(w_IxO):
  return grid.fake_quant(w_IxO, BITS, GROUP, True)


def np_quantize(w_IxO):
  """Symmetric 4-bit round-to-nearest, one scale per group of GROUP inputs and output."""
  g = w_IxO.reshape(-1, GROUP, w_IxO.shape[1])
  scale = np.abs(g).max(axis=1, keepdims=True) / 7.0
  scale = np.where(scale > 0, scale, 1.0)
  return (np.clip(np.round(g / scale), -8, 7) * scale).reshape(w_IxO.shape)


def calib_batches():
  """Two batches, the second with padding rows whose tokens are SPIKE (never a real token)."""
  out = lm_batches(SIZES['vocab_size'], n=2, rows=4, length=16, seed=3, padded_rows=2)
  out[1]['inputs'] = np.where(out[1]['segment_ids'] > 0, out[1]['inputs'], SPIKE)
  return out


def random_params(model):
  """Random parameters from NumPy (compiling flax's init takes seconds): weights N(0, 0.02),
  norm scales near 1, biases nonzero (a bias left unscaled shows), SPIKE's embedding one spike."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
  rng = np.random.default_rng(1)
  flat = {}
  for p, x in paths.flatten(nn.meta.unbox(shapes)['params']).items():
    if p.endswith('norm/scale'):
      v = 1 + 0.2 * rng.standard_normal(x.shape)
    else:
      v = (0.1 if p.endswith('bias') else 0.02) * rng.standard_normal(x.shape)
    flat[p] = v.astype(np.float32)
  flat['embed/embedding'][SPIKE] = np.eye(SIZES['d_model'])[5]
  return paths.unflatten({p: jnp.asarray(v) for p, v in flat.items()})


_BEDS = {}


def bed_of(name):
  """The model, its randomised parameters, the planted outlier testbed and its statistics."""
  if name not in _BEDS:
    cfg = CONFIGS[name]
    model = Transformer(cfg)
    params = random_params(model)
    batches = calib_batches()
    apply = jax.jit(lambda p: model.apply({'params': p}, batches[0]['inputs'],
                                         mutable=['moe'])[0])
    planted = smoothing.plant_outliers(params, cfg, N_OUTLIERS, FACTOR)
    stats = smoothing.calibrate(model, planted, batches, gram=True)
    _BEDS[name] = types.SimpleNamespace(cfg=cfg, model=model, params=params, batches=batches,
                                        logits=lambda p: np.asarray(apply(p)), planted=planted,
                                        stats=stats)
  return _BEDS[name]


def assert_same_function(bed, new_params):
  np.testing.assert_allclose(bed.logits(new_params), bed.logits(bed.params), rtol=1e-4,
                             atol=2e-6)


def np_flat(params):
  return {p: np.asarray(v, np.float64) for p, v in paths.flatten(params).items()}


@pytest.mark.parametrize('name', list(CONFIGS))
def test_planted_outliers_keep_the_function_and_stand_out_factor_times(name):
  bed = bed_of(name)
  assert_same_function(bed, bed.planted)
  chosen = smoothing.outlier_channels(bed.cfg, N_OUTLIERS)
  before, after = np_flat(bed.params), np_flat(bed.planted)
  for i in range(bed.cfg.n_layers):
    site = f'blocks_{i}/attn_norm'
    ch = chosen[site]
    assert len(ch) == N_OUTLIERS and len(set(ch)) == N_OUTLIERS
    np.testing.assert_allclose(after[f'{site}/scale'][ch] / before[f'{site}/scale'][ch], FACTOR,
                               rtol=1e-6)
    absmax = {k: np.asarray(bed.stats[f'blocks_{i}/attn/{k}/kernel']['absmax'])
              for k in ('query', 'key', 'value')}
    np.testing.assert_array_equal(absmax['query'], absmax['key'])
    np.testing.assert_array_equal(absmax['query'], absmax['value'])
    rest = np.delete(absmax['query'], ch)
    ratio = absmax['query'][ch] / np.median(rest)
    assert np.all((ratio > FACTOR / 4) & (ratio < FACTOR * 4)), (site, ratio)
    assert absmax['query'][ch].min() > 5 * rest.max()   # the planted channels are the outliers


def test_sites_of_an_moe_block_with_gqa_and_shared_experts():
  cfg = CONFIGS['moe_gqa']
  found = {s.name: s for s in smoothing.sites(cfg)}
  mlp_norm = found['blocks_1/mlp_norm']
  expected = {('blocks_1/mlp/router/kernel', ()), ('blocks_1/mlp/shared/gate/kernel', ()),
              ('blocks_1/mlp/shared/up/kernel', ())}
  expected |= {(f'blocks_1/mlp/{k}', (e,)) for k in ('gate', 'up') for e in range(4)}
  assert {(e.path, e.index) for e in mlp_norm.consumers} == expected
  assert found['blocks_0/attn/value'].consumers[0].repeat == 2   # 4 query heads on 2 kv heads
  assert found['blocks_0/attn/value'].channels == (2, 8)
  ups = [n for n in found if '/up' in n]
  assert ups == ['blocks_0/mlp/up'] + [f'blocks_1/mlp/up[{e}]' for e in range(4)] + [
      'blocks_1/mlp/shared/up']
  assert not any(s.kind == 'up' for s in smoothing.sites(CONFIGS['gpt2']))   # GELU: not linear


def test_absmax_and_abssum_over_real_tokens_match_numpy():
  bed = bed_of('llama')
  flat = np_flat(bed.planted)
  rows, real = [], []
  for b in bed.batches:
    x = flat['embed/embedding'][b['inputs']].reshape(-1, SIZES['d_model'])
    x = x / np.sqrt(np.mean(x ** 2, axis=-1, keepdims=True) + bed.cfg.norm_eps)
    rows.append(x * flat['blocks_0/attn_norm/scale'])
    real.append(b['segment_ids'].reshape(-1) > 0)
  x, real = np.concatenate(rows), np.concatenate(real)
  got = bed.stats['blocks_0/attn/query/kernel']
  np.testing.assert_allclose(got['absmax'], np.abs(x[real]).max(axis=0), rtol=1e-5)
  np.testing.assert_allclose(got['abssum'], np.abs(x[real]).sum(axis=0), rtol=1e-5)
  np.testing.assert_allclose(got['sq'], np.square(x[real]).sum(axis=0), rtol=1e-5)
  assert float(got['tokens']) == real.sum()
  # The padding's spike would have been the largest value of channel 5 by far.
  assert np.abs(x[~real]).max(axis=0)[5] > 2 * float(got['absmax'][5])


def test_lookup_statistics_are_the_real_token_counts():
  bed = bed_of('llama')
  got = calibration.input_statistics(bed.model, bed.params, bed.batches, ['embed/embedding'],
                                     absmax=True, abssum=True)['embed/embedding']
  ids = np.concatenate([b['inputs'][b['segment_ids'] > 0] for b in bed.batches])
  counts = np.bincount(ids, minlength=SIZES['vocab_size'])   # one-hot rows: |x| sums are counts
  np.testing.assert_array_equal(got['abssum'], counts)
  np.testing.assert_array_equal(got['absmax'], counts > 0)
  assert counts[SPIKE] == 0


def test_expert_statistics_add_up_to_the_router_s():
  bed = bed_of('moe_gqa')
  router = bed.stats['blocks_1/mlp/router/kernel']
  for k in ('gate', 'up'):
    experts = bed.stats[f'blocks_1/mlp/{k}']
    np.testing.assert_array_equal(np.max(experts['absmax'], axis=0), router['absmax'])
    k_per_token = bed.cfg.experts_per_token
    np.testing.assert_allclose(np.sum(experts['abssum'], axis=0),
                               k_per_token * np.asarray(router['abssum']), rtol=1e-5)
    assert float(np.sum(experts['tokens'])) == k_per_token * float(router['tokens'])


def test_smoothquant_scales_follow_the_formula_and_keep_the_function():
  bed, alpha = bed_of('moe_gqa'), 0.6
  smoothed = smoothing.smoothquant(bed.planted, bed.cfg, bed.stats, alpha, kinds=smoothing.KINDS)
  assert_same_function(bed, smoothed)
  old, new = np_flat(bed.planted), np_flat(smoothed)
  after = smoothing.calibrate(bed.model, smoothed, bed.batches, gram=True)
  g, h = bed.cfg.n_heads // bed.cfg.n_kv_heads, bed.cfg.head_dim

  def check(consumers, x_path, x_index=(), group=1):
    """s from the formula: activation absmax at x_path, weight absmax over the consumers; rows
    of one kv head's `group` query heads share a channel (GQA)."""
    per_channel = lambda rows: rows.reshape(-1, group, h).max(axis=1).reshape(-1)
    x_rows = np.asarray(bed.stats[x_path]['absmax'], np.float64)[x_index]
    w_rows = np.max([np.abs(old[p][i].reshape(len(x_rows), -1)).max(axis=1)
                     for p, i in consumers], axis=0)
    s = per_channel(x_rows) ** alpha / per_channel(w_rows) ** (1 - alpha)
    s_rows = np.repeat(s.reshape(-1, h), group, axis=0).reshape(-1)
    p, i = consumers[0]   # no other site scales its rows or columns (value's, up's columns are)
    ratio = new[p][i].reshape(len(s_rows), -1) / old[p][i].reshape(len(s_rows), -1)
    np.testing.assert_allclose(ratio, np.broadcast_to(s_rows[:, None], ratio.shape), rtol=1e-4)
    np.testing.assert_allclose(after[x_path]['absmax'][x_index], x_rows / s_rows, rtol=1e-4)

  check([(f'blocks_0/attn/{k}/kernel', ()) for k in ('query', 'key', 'value')],
        'blocks_0/attn/query/kernel')
  check([('blocks_0/attn/out/kernel', ())], 'blocks_0/attn/out/kernel', group=g)
  check([(f'blocks_0/mlp/{k}/kernel', ()) for k in ('gate', 'up')], 'blocks_0/mlp/up/kernel')
  check([('blocks_0/mlp/down/kernel', ())], 'blocks_0/mlp/down/kernel')
  moe_in = [(f'blocks_1/mlp/{k}', (e,)) for k in ('gate', 'up') for e in range(4)]
  moe_in += [(f'blocks_1/mlp/shared/{k}/kernel', ()) for k in ('gate', 'up')]
  check(moe_in, 'blocks_1/mlp/router/kernel')   # the router is rescaled but not in max|W|
  for e in range(4):
    check([('blocks_1/mlp/down', (e,))], 'blocks_1/mlp/down', (e,))
  check([('blocks_1/mlp/shared/down/kernel', ())], 'blocks_1/mlp/shared/down/kernel')


def np_output_error(w_IxO, h_IxI, s_I):
  d = np_quantize(w_IxO * s_I[:, None]) / s_I[:, None] - w_IxO
  return float(np.sum(d * (h_IxI @ d)))


def test_awq_search_matches_numpy_and_beats_round_to_nearest_on_outliers():
  bed = bed_of('llama')
  awq, alphas = smoothing.awq(bed.planted, bed.cfg, bed.stats, quantize)
  assert_same_function(bed, awq)
  old, new = np_flat(bed.planted), np_flat(awq)
  stat = lambda p, k: np.asarray(bed.stats[p][k], np.float64)
  for i in range(bed.cfg.n_layers):
    b = f'blocks_{i}'
    # (site, its consumers (the first one's input is the activation), outliers planted there?)
    for site, consumers, planted in (
        (f'{b}/attn_norm', [f'{b}/attn/{k}/kernel' for k in ('query', 'key', 'value')], True),
        (f'{b}/attn/value', [f'{b}/attn/out/kernel'], False),
        (f'{b}/mlp_norm', [f'{b}/mlp/{k}/kernel' for k in ('gate', 'up')], True),
        (f'{b}/mlp/up', [f'{b}/mlp/down/kernel'], False)):
      mean = stat(consumers[0], 'abssum') / stat(consumers[0], 'tokens')   # mean |x|
      mats = [old[p].reshape(len(mean), -1) for p in consumers]   # as [in, out]
      grams = [stat(p, 'gram') for p in consumers]
      scale = lambda a: mean ** a / np.sqrt(mean.max() ** a * mean.min() ** a)
      errors = [sum(np_output_error(w, h, scale(a)) for w, h in zip(mats, grams))
                for a in smoothing.ALPHAS]
      c = consumers[0]   # no other site scales its rows or columns
      s_got = (new[c].reshape(len(mean), -1) / old[c].reshape(len(mean), -1))[:, 0]
      np.testing.assert_allclose(s_got, scale(alphas[site]), rtol=1e-4)
      chosen = errors[smoothing.ALPHAS.index(alphas[site])]
      assert chosen <= min(errors) * (1 + 1e-3), (site, alphas[site], errors)
      if planted:   # errors[0]: alpha = 0, round-to-nearest
        assert chosen < 0.5 * errors[0], (site, chosen, errors[0])


@pytest.mark.parametrize('name', list(CONFIGS))
def test_smoothquant_and_awq_at_every_site_keep_the_function(name):
  bed = bed_of(name)
  assert_same_function(bed, smoothing.smoothquant(bed.planted, bed.cfg, bed.stats, 0.5,
                                                  kinds=smoothing.KINDS))
  awq, alphas = smoothing.awq(bed.planted, bed.cfg, bed.stats, quantize, alphas=(0.0, 0.5, 1.0))
  assert_same_function(bed, awq)
  assert set(alphas) == {s.name for s in smoothing.sites(bed.cfg)}
  assert alphas['blocks_1/mlp_norm'] > 0   # the planted outliers are worth scaling


def test_bad_input_fails_in_one_line():
  cfg, params = CONFIGS['llama'], bed_of('llama').params
  cases = [
      (lambda: smoothing.plant_outliers(params, cfg, 33, FACTOR), r'n_channels=33 .*\[0, 32\]'),
      (lambda: smoothing.plant_outliers(params, cfg, 2, 0.0), r'factor=0.0 must be'),
      (lambda: smoothing.plant_outliers(params, cfg, 2, -3), r'factor=-3 must be'),
      (lambda: smoothing.smoothquant(params, cfg, {}, alpha=1.5), r'alpha=1.5 .*\[0, 1\]'),
      (lambda: smoothing.awq(params, cfg, {}, quantize, alphas=(0.0, -0.1)),
       r'alphas=\(0.0, -0.1\): give one or more numbers in \[0, 1\]'),
      (lambda: smoothing.smoothquant(params, cfg, {}), r"statistics have no '\w+' for blocks_0/"),
      (lambda: smoothing.sites(cfg, ('norm', 'gate')), r"kind 'gate' is not one of"),
      (lambda: smoothing.sites(cfg.replace(scan_layers=True)), r'scan_layers=False'),
  ]
  for fn, match in cases:
    with pytest.raises(ValueError, match=match) as err:
      fn()
    assert '\n' not in str(err.value)
