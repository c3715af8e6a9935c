"""Pruning as parameter-tree transformations: masks, patterns, schedules, structure, runner."""

import hashlib
import json
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import compression
import sharding
from compression import paths, schedules, structural
from experiments import checkpoints, prune, runtime, steps, train
from experiments.configs import prune as prune_configs
from experiments.errors import UserError
from experiments.configs import shakespeare
from models import ModelConfig, Transformer, hf, stack_layers, unstack_layers

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48)
TOKENS = jax.random.randint(jax.random.key(1), (4, 16), 0, 64)


def init(cfg=CFG):
  model = Transformer(cfg)
  return model, nn.meta.unbox(model.init(jax.random.key(0), TOKENS[:1])['params'])


def batches(n=2):
  out = []
  for i in range(n):
    t = jax.random.randint(jax.random.key(10 + i), (4, 17), 0, 64)
    out.append(dict(inputs=t[:, :-1], targets=t[:, 1:], weights=jnp.ones((4, 16)),
                    positions=jnp.broadcast_to(jnp.arange(16), (4, 16)),
                    segment_ids=jnp.ones((4, 16), jnp.int32)))
  return out


def loss_fn(p, model, b):
  return steps.loss_sums(p, model, b, 0.0)[0]


def zeros(x):
  return int(np.sum(np.asarray(x) == 0))


def test_default_selection_skips_embeddings_head_and_routers():
  _, params = init(CFG.replace(tie_embeddings=False, n_experts=4, moe_d_ff=16))
  chosen = paths.select(params)
  assert 'blocks_0/attn/query/kernel' in chosen and 'blocks_1/mlp/up' in chosen
  assert not any(('embed' in p or 'lm_head' in p or 'router' in p) for p in chosen)
  assert paths.select(params, include=r'attn/(query|key)') == [
      'blocks_0/attn/key/kernel', 'blocks_0/attn/query/kernel', 'blocks_1/attn/key/kernel',
      'blocks_1/attn/query/kernel']


@pytest.mark.parametrize('sparsity', [0.3, 0.5, 0.7])
def test_magnitude_hits_the_exact_sparsity_per_layer_and_globally(sparsity):
  _, params = init()
  pruned, mask_tree = compression.prune(params, 'magnitude', sparsity)
  flat, mflat = paths.flatten(pruned), paths.flatten(mask_tree)
  for p in paths.select(params):
    assert zeros(flat[p]) == int(flat[p].size * sparsity) == np.sum(~np.asarray(mflat[p]))
  assert zeros(pruned['embed']['embedding']) == 0   # untouched
  pruned, _ = compression.prune(params, 'magnitude', sparsity, scope='global')
  flat = paths.flatten(pruned)
  total = sum(flat[p].size for p in paths.select(params))
  assert sum(zeros(flat[p]) for p in paths.select(params)) == int(total * sparsity)
  # Global ranking: every removed weight is no larger than every kept one.
  removed = np.concatenate([np.abs(np.asarray(paths.flatten(params)[p]))[np.asarray(flat[p]) == 0]
                            for p in paths.select(params)])
  kept = np.concatenate([np.abs(np.asarray(flat[p]))[np.asarray(flat[p]) != 0]
                         for p in paths.select(params)])
  assert removed.max() <= kept.min()


@pytest.mark.parametrize('nm', [(2, 4), (4, 8)])
@pytest.mark.parametrize('method', ['magnitude', 'random', 'wanda', 'sparsegpt'])
def test_every_nm_group_along_the_input_dim_holds_at_most_n(nm, method):
  model, params = init()
  pruned, _ = compression.prune(params, method, nm=nm, model=model, batches=batches())
  n, m = nm
  flat = paths.flatten(pruned)
  for p in paths.select(params):
    mats, _ = paths.as_matrices(p, flat[p])   # attn/out has 2 input dims: heads x head_dim
    b, i, o = mats.shape
    per_group = np.sum(np.asarray(mats).reshape(b, i // m, m, o) != 0, axis=2)
    assert per_group.max() <= n, p
    assert zeros(flat[p]) == flat[p].size * (m - n) // m


def test_nm_on_scanned_and_expert_weights_follows_their_input_dim():
  cfg = CFG.replace(n_experts=4, moe_d_ff=16, scan_layers=True)
  _, params = init(cfg)
  pruned, _ = compression.prune(params, 'magnitude', nm=(2, 4))
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
  magnitude = paths.flatten(compression.prune(params, 'magnitude', 0.5)[0])
  sparsegpt = paths.flatten(compression.prune(params, 'sparsegpt', 0.5, model=model,
                                              batches=calib)[0])
  assert err(sparsegpt['blocks_0/mlp/down/kernel']) < err(magnitude['blocks_0/mlp/down/kernel'])


def test_masked_weights_stay_zero_through_updates_and_checkpoints(tmp_path):
  model, params = init()
  pruned, mask_tree = compression.prune(params, 'magnitude', 0.5)
  tx = schedules.frozen(optax.adamw(1e-2, weight_decay=0.1), mask_tree)
  pruned = jax.device_get(pruned)   # the train step donates its input
  state = steps.TrainState.create(apply_fn=model.apply, params=jax.device_put(pruned), tx=tx)
  for b in batches(3):
    state, _ = steps.train_step(state, b, jnp.ones((64,)), model=model, accum_steps=1,
                                z_loss=0.0)
  flat, mflat = paths.flatten(state.params), paths.flatten(mask_tree)
  for p in paths.select(params):
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
  tx = schedules.gradual(optax.adamw(1e-2), 0.5, start=0, end=4, every=2)
  params = jax.device_get(params)   # the train step donates its input
  state = steps.TrainState.create(apply_fn=model.apply, params=jax.device_put(params), tx=tx)
  seen = []
  for b in batches(3) + batches(3):
    state, _ = steps.train_step(state, b, jnp.ones((64,)), model=model, accum_steps=1,
                                z_loss=0.0)
    q = state.params['blocks_0']['attn']['query']['kernel']
    seen.append(zeros(q))
  size = params['blocks_0']['attn']['query']['kernel'].size
  assert seen[-1] == int(size * 0.5) and seen == sorted(seen)   # monotone ramp to 50%
  masks_now = paths.flatten(state.opt_state.masks)
  for p in paths.select(params):
    assert np.all(np.asarray(paths.flatten(state.params)[p])[~np.asarray(masks_now[p])] == 0)


@pytest.mark.parametrize('kind, fraction', [('ffn', 0.25), ('ffn', 0.5), ('heads', 0.5)])
def test_structural_removal_equals_the_masked_full_model(kind, fraction):
  model, params = init()
  fn = structural.ffn_neurons if kind == 'ffn' else structural.attention_heads
  new_cfg, small, keep = fn(CFG, params, fraction)
  masked = structural.mask_of(kind, CFG, params, keep)
  want = model.apply({'params': masked}, TOKENS)
  got = Transformer(new_cfg).apply({'params': small}, TOKENS)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  n_small = sum(x.size for x in jax.tree.leaves(small))
  assert n_small < sum(x.size for x in jax.tree.leaves(params))
  if kind == 'ffn':
    assert new_cfg.d_ff == 48 - int(round(48 * fraction))
  else:   # GQA groups stay whole: 1 of 2 kv heads kept with its 2 query heads
    assert (new_cfg.n_heads, new_cfg.kv_heads) == (2, 1)


def test_taylor_importance_uses_gradients():
  model, params = init()
  with pytest.raises(ValueError, match='taylor importance needs gradients'):
    structural.ffn_neurons(CFG, params, 0.5, 'taylor')
  grads = compression.calibration.gradients(model, params, batches(), loss_fn)
  _, _, by_taylor = structural.ffn_neurons(CFG, params, 0.5, 'taylor', grads)
  # The kept neurons are those with the largest |sum(w * g)| over their weights.
  mlp, g = params['blocks_0']['mlp'], grads['blocks_0']['mlp']
  score = (np.abs(np.sum(np.asarray(mlp['up']['kernel']) * np.asarray(g['up']['kernel']), 0) +
                  np.sum(np.asarray(mlp['gate']['kernel']) * np.asarray(g['gate']['kernel']), 0)
                  + np.sum(np.asarray(mlp['down']['kernel']) * np.asarray(g['down']['kernel']), 1)))
  np.testing.assert_array_equal(by_taylor['blocks_0'], np.sort(np.argsort(-score)[:24]))


def test_structural_layers_and_experts_shrink_the_config():
  model, params = init(CFG.replace(n_layers=3))
  cfg, small, kept = structural.layers(model.config, params, 1)
  assert cfg.n_layers == 2 and len(kept) == 2 and 'blocks_2' not in small
  Transformer(cfg).apply({'params': small}, TOKENS)
  moe_cfg = CFG.replace(n_experts=4, moe_d_ff=16)
  _, params = init(moe_cfg)
  cfg, small, _ = structural.experts(moe_cfg, params, 0.5)
  assert cfg.n_experts == 2 and small['blocks_0']['mlp']['up'].shape[0] == 2
  assert small['blocks_0']['mlp']['router']['kernel'].shape == (32, 2)
  Transformer(cfg).apply({'params': small}, TOKENS)


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
    want, _ = compression.prune(params, **kwargs)
    got, mask_tree = compression.prune(sharded, **kwargs)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    q_mask = mask_tree['blocks_0']['attn']['query']['kernel']
    assert q_mask.sharding == sharded['blocks_0']['attn']['query']['kernel'].sharding


def test_sparsity_report_counts_zeros_flops_and_bytes():
  _, params = init()
  pruned, _ = compression.prune(params, 'magnitude', 0.5)
  rep = compression.report.sparsity_report(pruned, CFG, seq_len=16)
  t = rep['total']
  assert t['sparsity'] == pytest.approx(0.5, abs=1e-3)
  assert t['params'] - t['nonzero'] == t['selected_params'] - t['selected_nonzero']
  assert t['effective_flops_per_token'] == pytest.approx(
      t['dense_flops_per_token'] - 2 * (t['selected_params'] - t['selected_nonzero']))
  assert t['sparse_bytes'] < t['dense_bytes']
  assert '| **selected total** |' in compression.report.markdown(rep)


@pytest.mark.parametrize('call, match', [
    (lambda p: compression.prune(p, 'magnitude', 1.0), r'sparsity=1.0 must be in \[0, 1\)'),
    (lambda p: compression.prune(p, 'magnitude', -0.1), r'sparsity=-0.1 must be in \[0, 1\)'),
    (lambda p: compression.prune(p, 'magnitude', nm=(4, 4)), 'N:M pattern 4:4 needs'),
    (lambda p: compression.prune(p, 'magnitude', nm=(2, 5)), 'M=5 does not divide the 32 inputs'),
    (lambda p: compression.prune(p, 'obs', 0.5), "unknown pruning method 'obs'"),
    (lambda p: compression.prune(p, 'magnitude', 0.5, include='nothing_like_this'),
     "include='nothing_like_this' exclude=.* matches no weight"),
    (lambda p: compression.prune(p, 'wanda', 0.5), 'wanda needs the model and calibration'),
])
def test_bad_pruning_input_is_one_clear_error(call, match):
  _, params = init()
  with pytest.raises(ValueError, match=match):
    call(params)


@pytest.mark.parametrize('spec, match', [
    ('wanda:1.5', r'sparsity=1.5 must be in \[0, 1\)'), ('magnitud:0.5', "unknown method"),
    ('sparsegpt:4:2', 'N:M pattern 4:2'), ('ffn', 'give one amount')])
def test_bad_variant_specs_are_one_clear_error(spec, match):
  with pytest.raises(ValueError, match=match):
    prune.parse_variant(spec)


def _tree_digest(root: pathlib.Path) -> str:
  h = hashlib.sha256()
  for f in sorted(root.rglob('*')):
    if f.is_file():
      h.update(str(f.relative_to(root)).encode() + f.read_bytes())
  return h.hexdigest()


def test_prune_runner_end_to_end_leaves_the_source_untouched(tmp_path):
  config = shakespeare.get_config('tiny')
  config.data.data_dir = str(tmp_path / 'tfds')
  config.update(num_train_steps=6, sample=dict(num_prompts=0))
  source = tmp_path / 'source'
  source.mkdir()
  (source / 'config.json').write_text(config.to_json_best_effort())
  train.train_and_evaluate(config, source)
  before = _tree_digest(source)

  pc = prune_configs.get_config('sweep')
  pc.update(source_workdir=str(source), variants='magnitude:0.5,wanda:2:4,ffn:0.5',
            finetune_steps=2, calibration_batches=2, calibration_rows=4)
  rows = prune.run(pc, tmp_path / 'out')
  assert [r['variant'] for r in rows] == ['dense', 'magnitude:0.5', 'wanda:2:4', 'ffn:0.5']
  assert rows[3]['params'] < rows[0]['params'] == rows[1]['params']
  assert rows[1]['nonzero'] < rows[0]['nonzero']
  assert all(np.isfinite(r['nats_per_byte']) for r in rows)
  assert all('finetuned_nats_per_byte' in r for r in rows[1:])
  saved = json.loads((tmp_path / 'out' / 'results.json').read_text())
  assert saved['rows'] == json.loads(json.dumps(rows))
  assert (tmp_path / 'out' / 'results.md').read_text().startswith('| variant |')
  assert _tree_digest(source) == before

  assert rows[1]['sparsity'] == pytest.approx(0.5, abs=1e-3)
  assert rows[1]['effective_flops_per_token'] < rows[0]['effective_flops_per_token']
  assert rows[3]['dense_flops_per_token'] < rows[0]['dense_flops_per_token']   # smaller model

  dense = rows[0]['nats_per_byte']
  pc.update(variants='magnitude:0.5', rounds=2)   # iterative: 29% then 50%, fine-tuned between
  rows = prune.run(pc, tmp_path / 'iterative')
  assert rows[1]['sparsity'] == pytest.approx(0.5, abs=1e-3)
  assert _tree_digest(source) == before

  # The same weights as a Hugging Face checkpoint prune through the same path.
  _, model, _, params, _ = runtime.load_params(config, source)
  hf.save_pretrained(model, params, tmp_path / 'hf')
  pc.update(hf_path=str(tmp_path / 'hf'), rounds=1, finetune_steps=0)
  rows = prune.run(pc, tmp_path / 'from_hf')
  assert rows[0]['nats_per_byte'] == pytest.approx(dense, rel=1e-5)

  pc.source_workdir = str(tmp_path / 'missing')
  with pytest.raises(UserError, match='has no config.json'):
    prune.run(pc, tmp_path / 'out2')
  assert not (tmp_path / 'out2').exists()   # checked before anything was written


def test_gradual_pruning_in_the_training_config(tmp_path):
  config = shakespeare.get_config('tiny')
  config.data.data_dir = str(tmp_path / 'tfds')
  config.update(num_train_steps=8, sample=dict(num_prompts=0))
  config.pruning.update(final_sparsity=0.5, start_step=0, end_step=6, every=2)
  train.train_and_evaluate(config, tmp_path / 'run')
  _, _, _, params, _ = runtime.load_params(config, tmp_path / 'run')
  flat = paths.flatten(jax.device_get(params))
  for p in paths.select(params):
    assert zeros(flat[p]) == int(flat[p].size * 0.5), p


def test_stacked_params_prune_like_unrolled():
  _, unrolled = init(CFG)
  want, _ = compression.prune(unrolled, 'magnitude', 0.5)
  got, _ = compression.prune(stack_layers(unrolled, CFG), 'magnitude', 0.5)
  for a, b in zip(jax.tree.leaves(unstack_layers(got, CFG)), jax.tree.leaves(want)):
    np.testing.assert_array_equal(a, b)
