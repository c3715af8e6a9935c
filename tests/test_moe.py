"""Mixture-of-Experts: routing, both dispatch paths against NumPy, losses, expert parallelism."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sharding
from models import ModelConfig, Transformer, moe

E, K, D, F = 4, 2, 16, 24


def moe_config(**kw) -> ModelConfig:
  base = dict(vocab_size=64, d_model=D, n_layers=2, n_heads=2, d_ff=32, moe_d_ff=F, n_experts=E,
              experts_per_token=K, router_aux_weight=0.0, router_z_weight=0.0)
  base.update(kw)
  return ModelConfig(**base)


def init_moe(cfg, x):
  layer = moe.MoeMlp(cfg)
  params = nn.meta.unbox(layer.init(jax.random.key(0), x)['params'])
  # A router this sharp makes the top-k choice robust to float rounding between paths.
  params['router']['kernel'] = params['router']['kernel'] * 40
  return layer, params


def apply(layer, params, x):
  out, state = layer.apply({'params': params}, x, mutable=['moe'])
  return out, moe.summarize(state['moe'])


def numpy_reference(params, x, cfg):
  """Loops over tokens and their chosen experts in float64."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  x = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
  silu = lambda v: v / (1 + np.exp(-v))
  out = np.zeros_like(x)
  for n, token in enumerate(x):
    logits = token @ p['router']['kernel']
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    chosen = np.argsort(-probs, kind='stable')[:cfg.experts_per_token]
    weights = probs[chosen] / (probs[chosen].sum() if cfg.experts_per_token > 1 else 1.0)
    for e, w in zip(chosen, weights):
      h = silu(token @ p['gate'][e]) * (token @ p['up'][e])
      out[n] += w * (h @ p['down'][e])
  return out


@pytest.mark.parametrize('k', [1, 2])
def test_dropless_equals_a_per_token_numpy_loop(k):
  cfg = moe_config(experts_per_token=k)
  x = jax.random.normal(jax.random.key(1), (3, 10, D))
  layer, params = init_moe(cfg, x)
  out, stats = apply(layer, params, x)
  want = numpy_reference(params, x, cfg)
  np.testing.assert_allclose(np.asarray(out).reshape(-1, D), want, rtol=1e-4, atol=1e-5)
  assert float(stats['dropped']) == 0.0


def test_capacity_path_with_room_for_every_token_equals_dropless():
  x = jax.random.normal(jax.random.key(2), (2, 12, D))
  dropless = moe_config()
  layer, params = init_moe(dropless, x)
  want, _ = apply(layer, params, x)
  roomy = moe_config(moe_dispatch='capacity', capacity_factor=E / K)   # capacity = all tokens
  got, stats = apply(moe.MoeMlp(roomy), params, x)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert float(stats['dropped']) == 0.0


def test_small_capacity_drops_exactly_the_hand_counted_assignments():
  # One row of 6 tokens, k = 1, 2 experts with 2 slots each: expert 0 is chosen by tokens
  # 0, 1, 2, 4 (2 and 4 overflow), expert 1 by tokens 3 and 5 (both fit).
  experts = jnp.array([[[0], [0], [0], [1], [0], [1]]])
  weights = jnp.ones((1, 6, 1))
  dispatch, combine, kept = moe.capacity_masks(experts, weights, 2, 2)
  np.testing.assert_array_equal(kept[0, :, 0], [True, True, False, True, False, True])
  assert dispatch.sum() == 4 and dispatch.shape == (1, 6, 2, 2)
  np.testing.assert_array_equal(dispatch[0, 0, 0], [1, 0])   # token 0: expert 0, slot 0
  np.testing.assert_array_equal(dispatch[0, 5, 1], [0, 1])   # token 5: expert 1, slot 1
  # k = 2: all first choices are served before any second choice.
  experts = jnp.array([[[0, 1], [1, 0], [0, 1]]])
  _, _, kept = moe.capacity_masks(experts, jnp.ones((1, 3, 2)), 2, 2)
  # slots of expert 0: token 0 (1st), token 2 (1st) -> token 1's 2nd choice overflows;
  # slots of expert 1: token 1 (1st), token 0 (2nd) -> token 2's 2nd choice overflows.
  np.testing.assert_array_equal(kept[0], [[True, True], [True, False], [True, False]])


def test_dropped_fraction_is_reported_and_dropped_tokens_get_zero_output():
  cfg = moe_config(moe_dispatch='capacity', capacity_factor=0.25, experts_per_token=1)
  x = jax.random.normal(jax.random.key(3), (2, 16, D))
  layer, params = init_moe(cfg, x)
  out, stats = apply(layer, params, x)
  r = moe.route(x.reshape(-1, D) @ params['router']['kernel'], 1)
  cap = moe.capacity(16, 1, E, 0.25)
  _, _, kept = moe.capacity_masks(r.experts.reshape(2, 16, 1), r.weights.reshape(2, 16, 1), E,
                                  cap)
  assert float(stats['dropped']) == pytest.approx(1 - float(kept.mean()))
  assert float(stats['dropped']) >= 1 - E * cap / 16   # at most E * cap of 16 tokens fit a row
  zero_rows = np.all(np.asarray(out) == 0, axis=-1)
  np.testing.assert_array_equal(zero_rows, ~np.asarray(kept[..., 0]))


def test_k2_weights_sum_to_one_and_k1_keeps_the_raw_probability():
  logits = jax.random.normal(jax.random.key(4), (50, 8))
  r2 = moe.route(logits, 2)
  np.testing.assert_allclose(r2.weights.sum(-1), 1.0, rtol=1e-6)
  assert np.all(r2.weights[:, 0] >= r2.weights[:, 1])
  r1 = moe.route(logits, 1)
  np.testing.assert_allclose(r1.weights[:, 0], jax.nn.softmax(logits).max(-1), rtol=1e-6)


def test_aux_loss_by_hand_and_minimal_when_routing_is_uniform():
  # Two tokens, two experts, k = 1: probs (0.75, 0.25) and (0.25, 0.75) -> each expert gets one
  # token (load 0.5, 0.5), mean probs (0.5, 0.5): aux = 2 * (0.5*0.5 + 0.5*0.5) = 1.0.
  logits = jnp.log(jnp.array([[0.75, 0.25], [0.25, 0.75]]))
  stats = moe.router_stats(moe.route(logits, 1), 2)
  assert float(stats['aux_loss']) == pytest.approx(1.0)
  # Both tokens on expert 0 with probs (0.75, 0.25): aux = 2 * (1 * 0.75) = 1.5.
  logits = jnp.log(jnp.array([[0.75, 0.25], [0.75, 0.25]]))
  stats = moe.router_stats(moe.route(logits, 1), 2)
  assert float(stats['aux_loss']) == pytest.approx(1.5)
  lse = float(jax.nn.logsumexp(logits[0]))
  assert float(stats['z_loss']) == pytest.approx(lse ** 2)
  np.testing.assert_allclose(stats['load'], [1.0, 0.0])
  # A uniform router scores exactly 1.0; skewed routers of 8 experts score more.
  uniform = moe.router_stats(moe.route(jnp.zeros((64, 8)), 2), 8)
  assert float(uniform['aux_loss']) == pytest.approx(1.0)
  for seed in range(5):
    skewed = jax.random.normal(jax.random.key(seed), (64, 8)) * 3
    assert float(moe.router_stats(moe.route(skewed, 2), 8)['aux_loss']) > 1.0


MESH_CASES = {'expert 4': dict(data=2, expert=4), 'expert 8': dict(data=1, expert=8),
              'fsdp 2 x expert 4': dict(data=1, fsdp=2, expert=4)}


@pytest.mark.parametrize('name, dispatch', [
    ('expert 4', 'dropless'), ('expert 4', 'capacity'), ('expert 8', 'dropless'),
    ('fsdp 2 x expert 4', 'capacity')])
def test_expert_parallel_equals_one_device(name, dispatch):
  sizes, preset = MESH_CASES[name], 'ep'
  cfg = moe_config(n_experts=8, moe_dispatch=dispatch, capacity_factor=1.0,
                   n_shared_experts=1, router_aux_weight=0.01)
  model = Transformer(cfg)
  tokens = jax.random.randint(jax.random.key(5), (8, 12), 0, 64)
  init = lambda rng: model.init(rng, tokens[:1])['params']
  params = nn.meta.unbox(init(jax.random.key(0)))

  def loss(p, t):
    logits, state = model.apply({'params': p}, t, mutable=['moe'])
    stats = moe.summarize(state['moe'])
    return jnp.mean(logits ** 2) + stats['aux_loss'], (logits, stats)

  grad_fn = jax.value_and_grad(loss, has_aux=True)
  (want_loss, (want_logits, want_stats)), want_grads = grad_fn(params, tokens)

  config = sharding.default_mesh_config()
  config.update(sizes)
  mesh = sharding.make_mesh(config)
  rules = sharding.rules_for(preset)
  sharded = sharding.create_sharded(init, mesh, rules, jax.random.key(0))
  up = sharded['blocks_0']['mlp']['up']
  assert up.sharding.spec[0] == 'expert'
  assert up.addressable_shards[0].data.shape[0] == 8 // mesh.shape['expert']
  with sharding.activation_rules(mesh, rules):
    batch = sharding.global_batch(np.asarray(tokens), mesh, rules)
    (got_loss, (got_logits, got_stats)), got_grads = jax.jit(grad_fn)(sharded, batch)
  np.testing.assert_allclose(got_logits, want_logits, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
  np.testing.assert_allclose(got_stats['dropped'], want_stats['dropped'], atol=1e-7)
  if dispatch == 'capacity':
    assert float(want_stats['dropped']) > 0   # capacity per row: the same drops on any mesh
  for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize('kw, match', [
    (dict(experts_per_token=5), 'experts_per_token=5 must be between 1 and n_experts=4'),
    (dict(capacity_factor=0.0), 'capacity_factor=0.0 must be > 0'),
    (dict(moe_dispatch='sorted'), "moe_dispatch='sorted' is not one of dropless, capacity"),
    (dict(moe_every=2, scan_layers=True), 'scan_layers needs every layer alike'),
    (dict(n_experts=-1), 'n_experts=-1 must be >= 0'),
])
def test_bad_moe_configs_are_one_line_errors(kw, match):
  with pytest.raises(ValueError, match=match):
    moe_config(**kw)


def test_experts_not_dividing_the_expert_axis_is_one_error():
  cfg = moe_config(n_experts=6)
  model = Transformer(cfg)
  config = sharding.default_mesh_config()
  config.update(data=2, expert=4)
  init = lambda rng: model.init(rng, jnp.zeros((1, 4), jnp.int32))['params']
  with pytest.raises(ValueError, match=r'dim 0 \(expert, size 6\) does not divide over mesh '
                                       r'axes expert of size 4'):
    sharding.create_sharded(init, sharding.make_mesh(config), 'ep', jax.random.key(0))



def test_scanned_and_rematerialised_moe_equals_unrolled():
  cfg = moe_config(moe_dispatch='capacity', capacity_factor=1.0)
  tokens = jax.random.randint(jax.random.key(6), (2, 10), 0, 64)
  unrolled = Transformer(cfg)
  params = nn.meta.unbox(unrolled.init(jax.random.key(0), tokens)['params'])
  want, state = unrolled.apply({'params': params}, tokens, mutable=['moe'])
  scanned = Transformer(cfg.replace(scan_layers=True, remat='full'))
  from models.transformer import stack_layers
  got, got_state = scanned.apply({'params': stack_layers(params, cfg)}, tokens, mutable=['moe'])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  a, b = moe.summarize(state['moe']), moe.summarize(got_state['moe'])
  np.testing.assert_allclose(a['load_per_layer'], b['load_per_layer'], atol=1e-7)
  assert a['load_per_layer'].shape == (2, E)


def test_moe_every_second_layer_and_shared_experts():
  cfg = moe_config(n_layers=4, moe_every=2, n_shared_experts=1)
  model = Transformer(cfg)
  tokens = jnp.zeros((1, 4), jnp.int32)
  params = nn.meta.unbox(model.init(jax.random.key(0), tokens)['params'])
  assert 'router' not in params['blocks_0']['mlp'] and 'router' in params['blocks_1']['mlp']
  assert params['blocks_3']['mlp']['shared']['up']['kernel'].shape == (D, F)
  _, state = model.apply({'params': params}, tokens, mutable=['moe'])
  assert moe.summarize(state['moe'])['load_per_layer'].shape == (2, E)


def test_router_jitter_only_with_a_jitter_rng_and_aux_loss_trains_the_router():
  cfg = moe_config(router_jitter=0.5)
  x = jax.random.normal(jax.random.key(7), (2, 8, D))
  layer, params = init_moe(cfg, x)
  plain, _ = apply(layer, params, x)
  np.testing.assert_array_equal(plain, apply(moe.MoeMlp(cfg.replace(router_jitter=0.0)),
                                             params, x)[0])
  noisy = layer.apply({'params': params}, x, mutable=['moe'], rngs={'jitter': jax.random.key(1)})
  assert not np.allclose(noisy[0], plain)

  def aux(p):
    _, state = layer.apply({'params': p}, x, mutable=['moe'])
    return moe.summarize(state['moe'])['aux_loss']
  assert float(jnp.abs(jax.grad(aux)(params)['router']['kernel']).sum()) > 0


def test_flops_count_only_the_active_experts():
  from models import flops
  sparse = moe_config(n_experts=8, experts_per_token=2, moe_d_ff=F)
  dense = sparse.replace(n_experts=0, d_ff=2 * F)
  assert flops.matmul_params(sparse) == flops.matmul_params(dense) + 2 * D * 8
  model = Transformer(sparse)
  params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))['params']
  assert flops.param_count(nn.meta.unbox(params)) > flops.matmul_params(sparse) + 4 * D * F


def test_moe_training_logs_router_metrics_and_learns(tmp_path):
  import json

  from experiments import train
  from experiments.configs import shakespeare
  config = shakespeare.get_config('moe_tiny')
  config.data.data_dir = str(tmp_path / 'tfds')
  config.num_train_steps = 12
  config.sample.num_prompts = 0
  train.train_and_evaluate(config, tmp_path / 'run')
  lines = [json.loads(l) for l in (tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines()]
  steps = [r for r in lines if 'train_loss' in r]
  assert steps[-1]['train_loss'] < steps[0]['train_loss']
  last = steps[-1]
  load = [last[f'expert_load/{e}'] for e in range(4)]
  assert sum(load) == pytest.approx(1.0, abs=1e-5)
  assert last['dropped_fraction'] == 0.0 and 0 < last['moe_aux_loss'] < 4
  assert 0 < last['router_entropy'] <= np.log(4) + 1e-5
