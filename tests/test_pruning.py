"""Pruning as parameter-tree transformations (compression/pruning.py, masks.py, paths.py,
calibration.py, schedules.py, report.py): exact sparsity, N:M patterns, layouts, schedules."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import compression
import sharding
from compression import paths, schedules
from experiments import checkpoints, runtime, steps, train
from experiments.configs import shakespeare
from models import ModelConfig, Transformer, layouts, stack_layers, unstack_layers
from tests.conftest import init_params, lm_batches

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48)
MODEL = Transformer(CFG)
TOKENS = jax.random.randint(jax.random.key(1), (4, 16), 0, 64)


def init(cfg=CFG):
  return Transformer(cfg), init_params(cfg)


def batches(n=2):
  return lm_batches(CFG.vocab_size, n, rows=4, length=16, seed=10, padded_rows=1)


def loss_fn(p, model, b):
  return steps.lm_loss(model)(p, b)[0]


def select(params, cfg=CFG, **kwargs):
  return paths.select(params, layouts.of_config(cfg), **kwargs)


def zeros(x):
  return int(np.sum(np.asarray(x) == 0))


def test_default_selection_skips_embeddings_head_and_routers():
  cfg = CFG.replace(tie_embeddings=False, n_experts=4, moe_d_ff=16)
  _, params = init(cfg)
  chosen = select(params, cfg)
  assert 'blocks_0/attn/query/kernel' in chosen and 'blocks_1/mlp/up' in chosen
  assert not any(('embed' in p or 'lm_head' in p or 'router' in p) for p in chosen)
  assert select(params, cfg, include=r'attn/(query|key)') == [
      'blocks_0/attn/key/kernel', 'blocks_0/attn/query/kernel', 'blocks_1/attn/key/kernel',
      'blocks_1/attn/query/kernel']


@pytest.mark.parametrize('sparsity', [0.3, 0.5, 0.7])
def test_magnitude_hits_the_exact_sparsity_per_layer_and_globally(sparsity):
  _, params = init()
  pruned, mask_tree = compression.prune(params, 'magnitude', sparsity, model=MODEL)
  flat, mflat = paths.flatten(pruned), paths.flatten(mask_tree)
  for p in select(params):
    assert zeros(flat[p]) == int(flat[p].size * sparsity) == np.sum(~np.asarray(mflat[p]))
  assert zeros(pruned['embed']['embedding']) == 0   # untouched
  pruned, _ = compression.prune(params, 'magnitude', sparsity, scope='global', model=MODEL)
  flat = paths.flatten(pruned)
  total = sum(flat[p].size for p in select(params))
  assert sum(zeros(flat[p]) for p in select(params)) == int(total * sparsity)
  # Global ranking: every removed weight is no larger than every kept one.
  removed = np.concatenate([np.abs(np.asarray(paths.flatten(params)[p]))[np.asarray(flat[p]) == 0]
                            for p in select(params)])
  kept = np.concatenate([np.abs(np.asarray(flat[p]))[np.asarray(flat[p]) != 0]
                         for p in select(params)])
  assert removed.max() <= kept.min()


@pytest.mark.parametrize('nm', [(2, 4), (4, 8)])
@pytest.mark.parametrize('method', ['magnitude', 'random', 'wanda', 'sparsegpt'])
def test_every_nm_group_along_the_input_dim_holds_at_most_n(nm, method):
  model, params = init()
  pruned, _ = compression.prune(params, method, nm=nm, model=model, batches=batches())
  n, m = nm
  flat = paths.flatten(pruned)
  for p in select(params):
    mats, _ = paths.as_matrices(flat[p], layouts.of_config(CFG)[p])   # attn/out: 2 input dims
    b, i, o = mats.shape
    per_group = np.sum(np.asarray(mats).reshape(b, i // m, m, o) != 0, axis=2)
    assert per_group.max() <= n, p
    assert zeros(flat[p]) == flat[p].size * (m - n) // m


def test_nm_on_scanned_and_expert_weights_follows_their_input_dim():
  cfg = CFG.replace(n_experts=4, moe_d_ff=16, scan_layers=True)
  _, params = init(cfg)
  pruned, _ = compression.prune(params, 'magnitude', nm=(2, 4), model=Transformer(cfg))
  up = np.asarray(pruned['blocks']['mlp']['up'])           # [layers, experts, in=32, out=16]
  assert up.shape == (2, 4, 32, 16)
  assert np.all(np.sum(up.reshape(2, 4, 8, 4, 16) != 0, axis=3) == 2)
  down = np.asarray(pruned['blocks']['mlp']['down'])       # [layers, experts, in=16, out=32]
  assert np.all(np.sum(down.reshape(2, 4, 4, 4, 32) != 0, axis=3) == 2)


def test_calibrated_methods_beat_magnitude_on_layer_reconstruction():
  model, params = init()
  calib = batches(4)
  stats = compression.calibration.input_statistics(
      model, params, calib, ['blocks_0/mlp/down/kernel'], gram=True)['blocks_0/mlp/down/kernel']
  w = params['blocks_0']['mlp']['down']['kernel']
  err = lambda new: float(jnp.trace((w - new).T @ stats['gram'] @ (w - new)))
  magnitude = paths.flatten(compression.prune(params, 'magnitude', 0.5, model=MODEL)[0])
  sparsegpt = paths.flatten(compression.prune(params, 'sparsegpt', 0.5, model=model,
                                              batches=calib)[0])
  assert err(sparsegpt['blocks_0/mlp/down/kernel']) < err(magnitude['blocks_0/mlp/down/kernel'])


def test_masked_weights_stay_zero_through_updates_and_checkpoints(tmp_path):
  model, params = init()
  pruned, mask_tree = compression.prune(params, 'magnitude', 0.5, model=MODEL)
  tx = schedules.frozen(optax.adamw(1e-2, weight_decay=0.1), mask_tree)
  pruned = jax.device_get(pruned)   # the train step donates its input
  state = steps.TrainState.create(apply_fn=model.apply, params=jax.device_put(pruned), tx=tx)
  for b in batches(3):
    state, _ = steps.train_step(state, b, jnp.ones((64,)), loss=steps.lm_loss(model),
                                accum_steps=1)
  flat, mflat = paths.flatten(state.params), paths.flatten(mask_tree)
  for p in select(params):
    assert np.all(np.asarray(flat[p])[~np.asarray(mflat[p])] == 0), p
    assert np.any(np.asarray(flat[p]) != np.asarray(paths.flatten(pruned)[p]))   # it trained
  ckpts = checkpoints.Checkpoints(tmp_path, keep=1, async_save=False)
  ckpts.save(3, state, checkpoints.data_state('{}', {}))
  ckpts.wait()
  restored = ckpts.restore_latest(checkpoints.abstract(state)).state
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    np.testing.assert_array_equal(a, b)


def test_gradual_pruning_ramps_cubically_and_keeps_zeros_exact():
  assert float(schedules.polynomial_sparsity(0, 0.8, 0, 100)) == 0.0
  assert float(schedules.polynomial_sparsity(50, 0.8, 0, 100)) == pytest.approx(0.8 * (1 - 0.125))
  assert float(schedules.polynomial_sparsity(100, 0.8, 0, 100)) == pytest.approx(0.8)
  model, params = init()
  tx = schedules.gradual(optax.adamw(1e-2), 0.5, start=0, end=4, every=2,
                         layouts=layouts.of_config(CFG))
  params = jax.device_get(params)   # the train step donates its input
  state = steps.TrainState.create(apply_fn=model.apply, params=jax.device_put(params), tx=tx)
  seen = []
  for b in batches(3) + batches(3):
    state, _ = steps.train_step(state, b, jnp.ones((64,)), loss=steps.lm_loss(model),
                                accum_steps=1)
    q = state.params['blocks_0']['attn']['query']['kernel']
    seen.append(zeros(q))
  size = params['blocks_0']['attn']['query']['kernel'].size
  assert seen[-1] == int(size * 0.5) and seen == sorted(seen)   # monotone ramp to 50%
  masks_now = paths.flatten(state.opt_state.masks)
  for p in select(params):
    assert np.all(np.asarray(paths.flatten(state.params)[p])[~np.asarray(masks_now[p])] == 0)


def test_pruning_sharded_parameters_gives_the_same_result():
  assert jax.device_count() == 8
  model, params = init()
  config = sharding.default_mesh_config()
  config.update(data=2, fsdp=4)
  mesh = sharding.make_mesh(config)
  layout = sharding.init_shardings(lambda rng: model.init(rng, TOKENS[:1])['params'], mesh,
                                   'fsdp', jax.random.key(0))
  sharded = jax.device_put(params, layout)
  assert sharded['blocks_0']['attn']['query']['kernel'].sharding.spec[0] == 'fsdp'
  for kwargs in (dict(method='magnitude', sparsity=0.5), dict(method='magnitude', nm=(2, 4)),
                 dict(method='magnitude', sparsity=0.6, scope='global')):
    want, _ = compression.prune(params, model=model, **kwargs)
    got, mask_tree = compression.prune(sharded, model=model, **kwargs)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    q_mask = mask_tree['blocks_0']['attn']['query']['kernel']
    assert q_mask.sharding == sharded['blocks_0']['attn']['query']['kernel'].sharding


def test_sparsity_report_counts_zeros_flops_and_bytes():
  _, params = init()
  pruned, _ = compression.prune(params, 'magnitude', 0.5, model=MODEL)
  rep = compression.report.sparsity_report(pruned, CFG, seq_len=16)
  t = rep['total']
  assert t['sparsity'] == pytest.approx(0.5, abs=1e-3)
  assert t['params'] - t['nonzero'] == t['selected_params'] - t['selected_nonzero']
  assert t['effective_flops_per_token'] == pytest.approx(
      t['dense_flops_per_token'] - 2 * (t['selected_params'] - t['selected_nonzero']))
  assert t['sparse_bytes'] < t['dense_bytes']
  assert '| **selected total** |' in compression.report.markdown(rep)


@pytest.mark.parametrize('call, match', [
    (lambda p: compression.prune(p, 'magnitude', 1.0, model=MODEL),
     r'sparsity=1.0 must be in \[0, 1\)'),
    (lambda p: compression.prune(p, 'magnitude', -0.1, model=MODEL),
     r'sparsity=-0.1 must be in \[0, 1\)'),
    (lambda p: compression.prune(p, 'magnitude', nm=(4, 4), model=MODEL), 'N:M pattern 4:4 needs'),
    (lambda p: compression.prune(p, 'magnitude', nm=(2, 5), model=MODEL),
     'M=5 does not divide the 32 inputs'),
    (lambda p: compression.prune(p, 'obs', 0.5, model=MODEL), "unknown pruning method 'obs'"),
    (lambda p: compression.prune(p, 'magnitude', 0.5), 'pass the model'),
    (lambda p: compression.prune(p, 'magnitude', 0.5, include='nothing_like_this', model=MODEL),
     "include='nothing_like_this' exclude=.* matches no weight"),
    (lambda p: compression.prune(p, 'wanda', 0.5, model=MODEL),
     'wanda needs the model and calibration'),
])
def test_bad_pruning_input_is_one_clear_error(call, match):
  _, params = init()
  with pytest.raises(ValueError, match=match):
    call(params)


def test_gradual_pruning_in_the_training_config(tmp_path):
  config = shakespeare.get_config('tiny')
  config.data.data_dir = str(tmp_path / 'tfds')
  config.update(num_train_steps=8, sample=dict(num_prompts=0))
  config.pruning.update(final_sparsity=0.5, start_step=0, end_step=6, every=2)
  train.train_and_evaluate(config, tmp_path / 'run')
  _, model, _, params, _ = runtime.load_params(config, tmp_path / 'run')
  flat = paths.flatten(jax.device_get(params))
  for p in select(params, model.config):
    assert zeros(flat[p]) == int(flat[p].size * 0.5), p


def test_stacked_params_prune_like_unrolled():
  _, unrolled = init(CFG)
  want, _ = compression.prune(unrolled, 'magnitude', 0.5, model=MODEL)
  got, _ = compression.prune(stack_layers(unrolled, CFG), 'magnitude', 0.5,
                             model=Transformer(CFG.replace(scan_layers=True)))
  for a, b in zip(jax.tree.leaves(unstack_layers(got, CFG)), jax.tree.leaves(want)):
    np.testing.assert_array_equal(a, b)

