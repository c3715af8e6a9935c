"""Quantization-aware training: the straight-through round trip, its grid against `qtensor`'s,
convert (what you train is what you serve), learned scales, frozen masks, the training loop and
config validation."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sharding
from compression import grid, paths, qat, qtensor, schedules
from experiments import steps, train, validate
from experiments import workdir as workdir_lib
from experiments.configs import shakespeare
from experiments.errors import UserError
from models import ModelConfig, Transformer, layouts
from tests.conftest import lm_batches
from tests.conftest import init_params as _init_params

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64,
                  max_len=64)
LAYOUTS = layouts.of_config(CFG)


@functools.lru_cache
def init_params(cfg, seed=0):
  """The model's parameters, initialised once per test session (callers copy, never mutate)."""
  return jax.jit(lambda: _init_params(cfg, seed))()


def _opt(learning_rate=1e-2, weight_decay=0.1):
  opt = shakespeare.get_config('tiny').optimizer
  opt.update(learning_rate=learning_rate, warmup_steps=0, weight_decay=weight_decay)
  return opt


LEARNED = qat.Spec(bits=4, group_size=8, symmetric=False, ranges='learned')


@pytest.fixture(scope='module')
def pruned_run():
  """(masks, params before, params after, loss) of 3 QAT steps with learned scales on a model
  whose kernels are half pruned (frozen masks), on random tokens."""
  params = init_params(CFG)
  flat = paths.flatten(params)
  masks = {p: np.ones(np.shape(v), bool) for p, v in flat.items()}
  for p in paths.select(params, LAYOUTS):
    masks[p] = np.abs(flat[p]) > np.median(np.abs(flat[p]))
  masks = paths.unflatten(masks)
  model = Transformer(CFG)
  loss = qat.loss(steps.lm_loss(model), LEARNED)
  tx = steps.make_optimizer(_opt(), 10)
  tx = qat.split_optimizer(schedules.frozen(tx, masks), tx)
  params = jax.tree.map(lambda p, m: np.where(m, p, 0.0), params, masks)
  # Scales from the pruned weights (init_state would fit them to the unpruned ones).
  state = jax.jit(lambda p: steps.TrainState.create(apply_fn=model.apply, params=p, tx=tx))(
      jax.jit(loss.init_params)(params))
  start = jax.tree.map(np.asarray, state.params)
  token_bytes = jnp.ones((CFG.vocab_size,), jnp.float32)
  for batch in lm_batches(CFG.vocab_size, 3, rows=4, length=16):
    state, metrics = steps.train_step(state, batch, token_bytes, loss=loss, accum_steps=1)
    assert bool(metrics['finite'])
  return masks, start, state.params, loss


# ---- the round trip and its gradients

def _reference_grads(w, scale, zero, bits, c, grad_scale):
  """NumPy: d/dw and d/dscale of sum(c * fake_quant(w)) under the clipped STE and LSQ."""
  lo, hi = grid.qrange(bits)
  v = w / scale
  r = np.round(v) + zero
  inside = (r >= lo) & (r <= hi)
  d_w = np.where(inside, c, 0.0)
  d_s = c * np.where(inside, np.round(v) - v, np.clip(r, lo, hi) - zero) * grad_scale
  return d_w, d_s.sum(axis=0, keepdims=True)


@pytest.mark.parametrize('symmetric', [True, False])
def test_straight_through_gradient_is_c_inside_the_range_and_zero_outside(symmetric):
  bits, scale = 4, np.float32(0.1)
  zero = np.float32(0 if symmetric else -3)   # integers [-8, 7]; inside: w in [-0.55, 0.75)
  inside = np.array([-0.42, -0.26, -0.04, 0.0, 0.13, 0.33, 0.49, 0.61], np.float32)
  outside = np.array([-2.0, -0.91, -1.3, 1.1, 1.5, 3.0, -0.95, 1.2], np.float32)
  w = np.stack([inside, outside, inside * 1.7, outside * 0.6])   # one scale per column
  c = np.random.default_rng(0).normal(size=w.shape).astype(np.float32)
  f = lambda w, s: jnp.sum(qat.round_trip(w, s, jnp.full((1, 8), zero), bits, 0.5) * c)
  d_w, d_s = jax.grad(f, argnums=(0, 1))(jnp.asarray(w), jnp.full((1, 8), scale))
  ref_w, ref_s = _reference_grads(w, scale, zero, bits, c, 0.5)
  lo, hi = grid.qrange(bits)
  r = np.round(w / scale) + zero
  assert np.all((r[0] >= lo) & (r[0] <= hi)) and np.all((r[1] < lo) | (r[1] > hi))
  np.testing.assert_array_equal(d_w[0], c[0])   # inside: the gradient passes unchanged
  np.testing.assert_array_equal(d_w[1], 0.0)    # outside: none
  np.testing.assert_array_equal(d_w, ref_w)
  np.testing.assert_allclose(d_s, ref_s, rtol=1e-5, atol=1e-6)


def test_minmax_clip_zeroes_the_gradient_of_the_clipped_outliers_only():
  layout = LAYOUTS['blocks_0/mlp/up/kernel']
  w = np.random.default_rng(1).normal(size=(32, 64)).astype(np.float32)
  spec = qat.Spec(bits=4, clip=0.6)
  d_w = jax.grad(lambda w: jnp.sum(qat.fake_quant(w, layout, spec)))(jnp.asarray(w))
  scale = 0.6 * np.abs(w).max(axis=0) / 7   # per output channel, symmetric
  q = np.round(w / scale)
  outside = (q < -8) | (q > 7)
  assert 0 < outside.sum() < w.size // 4
  np.testing.assert_array_equal(np.asarray(d_w), np.where(outside, 0.0, 1.0))


def test_learned_scale_gradient_is_lsq_scaled_by_one_over_sqrt_weights_times_steps():
  layout = LAYOUTS['blocks_0/mlp/up/kernel']   # [32 inputs, 64 outputs], groups of 8
  rng = np.random.default_rng(2)
  w = rng.normal(size=(32, 64)).astype(np.float32)
  c = rng.normal(size=(32, 64)).astype(np.float32)
  absmax = np.abs(w.reshape(4, 8, 64)).max(axis=1)
  scale = (absmax / 7 * rng.uniform(0.6, 1.1, size=absmax.shape)).astype(np.float32)
  spec = qat.Spec(bits=4, group_size=8, ranges='learned')
  d_w, d_s = jax.grad(lambda w, s: jnp.sum(qat.fake_quant(w, layout, spec, s) * c),
                      argnums=(0, 1))(jnp.asarray(w), jnp.asarray(scale))
  ref_w, ref_s = zip(*(_reference_grads(w[8 * g:8 * g + 8], scale[g], 0.0, 4, c[8 * g:8 * g + 8],
                                        1 / np.sqrt(8 * 7)) for g in range(4)))
  np.testing.assert_array_equal(d_w, np.concatenate(ref_w))
  assert 0 < np.count_nonzero(np.concatenate(ref_w) == 0) < w.size // 4   # some clipped
  np.testing.assert_allclose(d_s, np.concatenate(ref_s), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize('path,bits,group_size,symmetric', [
    ('blocks_0/attn/out/kernel', 4, 0, True), ('blocks_0/attn/out/kernel', 4, 0, False),
    ('blocks_0/attn/out/kernel', 3, 16, True), ('blocks_0/attn/out/kernel', 8, 8, False),
    ('blocks_0/mlp/down/kernel', 4, 16, False), ('blocks_0/mlp/down/kernel', 2, -1, False),
    ('blocks_0/mlp/down/kernel', 3, -1, True)])
def test_fake_quant_equals_qtensor_round_trip_bit_for_bit(path, bits, group_size, symmetric):
  w = paths.flatten(init_params(CFG, seed=3))[path]
  spec = qat.Spec(bits, group_size, symmetric)
  expected = qtensor.dequantize(qtensor.quantize(w, LAYOUTS[path], bits, group_size, symmetric))
  np.testing.assert_array_equal(qat.fake_quant(w, LAYOUTS[path], spec), expected)


# ---- convert: what you train is what you serve

SCANNED = CFG.replace(scan_layers=True)   # one layer: a stack of 1
SERVED = {   # name: (spec, model config)
    'minmax': (qat.Spec(bits=4, group_size=16, symmetric=True), CFG),
    'learned_per_tensor': (qat.Spec(bits=8, group_size=-1, ranges='learned', clip=0.9), CFG),
    'w8a8_scanned': (qat.Spec(bits=8, group_size=8, ranges='learned', act_bits=8), SCANNED),
    'w4a8_asym': (qat.Spec(bits=4, group_size=16, symmetric=False, act_bits=8), CFG),
}


def _assert_serves(spec, params, loss, cfg=CFG):
  """convert's integers dequantize to the fake-quantized weights exactly, and run the model to
  the same logits."""
  fake = jax.jit(loss.model_params)(params)
  served = jax.jit(lambda p: qat.convert(p, spec, layouts.of_config(cfg)))(params)
  flat_fake, flat_served = paths.flatten(fake), paths.flatten(served)
  selected = paths.select(fake, layouts.of_config(cfg))
  assert qat.SCALES not in served and qat.SCALES not in fake
  for p in selected:
    assert isinstance(flat_served[p], qtensor.QTensor)
    w = flat_fake[p].w if spec.act_bits else flat_fake[p]
    np.testing.assert_array_equal(qtensor.dequantize(flat_served[p]), w)
  model = Transformer(cfg)
  tokens = lm_batches(cfg.vocab_size, rows=2, length=16, seed=5)[0]['inputs']
  want = np.asarray(jax.jit(lambda p, x: model.apply({'params': p}, x))(fake, tokens))
  assert np.abs(want).max() > 0.1   # logits large enough for the tolerance to mean something
  # Weight-only, dequantized into the operand: float rounding of the matmul's order only; on
  # CPU the activations go through two int8 limbs (15 bits). W8A8 runs s8 x s8 dots on both.
  executions = (('cpu', 2e-5),) if spec.act_bits else (('accelerator', 2e-5), ('cpu', 2e-4))
  for execution, atol in executions:
    with qtensor.execution(execution):
      got = np.asarray(jax.jit(lambda p, x: model.apply({'params': p}, x))(served, tokens))
    np.testing.assert_allclose(got, want, atol=atol, rtol=0)


@pytest.mark.parametrize('name', list(SERVED))
def test_converted_integers_serve_the_fake_quantized_model(name):
  spec, cfg = SERVED[name]
  loss = qat.loss(steps.lm_loss(Transformer(cfg)), spec)
  params = jax.jit(loss.init_params)(init_params(cfg, seed=4))
  if spec.ranges == 'learned':   # scales away from min-max, some clipping more, some less
    factors = np.random.default_rng(0).uniform(0.7, 1.2, size=(4,))
    params[qat.SCALES] = paths.unflatten({p: s * factors[i % 4] for i, (p, s) in enumerate(
        sorted(paths.flatten(params[qat.SCALES]).items()))})
  _assert_serves(spec, params, loss, cfg)


def test_converted_integers_serve_the_model_after_learned_scales_trained(pruned_run):
  _, start, trained, loss = pruned_run
  moved = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - b))),
                       trained[qat.SCALES], start[qat.SCALES])
  assert min(jax.tree.leaves(moved)) > 0
  _assert_serves(LEARNED, trained, loss)


# ---- learned scales and frozen masks

def test_learned_scales_are_parameters_trained_without_weight_decay(pruned_run):
  masks, start, trained, _ = pruned_run
  scales = paths.flatten(start[qat.SCALES])
  assert sorted(scales) == paths.select(init_params(CFG), LAYOUTS)
  assert scales['blocks_0/attn/query/kernel'].shape == (4, 2, 16)   # [groups, heads, head_dim]
  for p, s in paths.flatten(trained[qat.SCALES]).items():   # moved by Adam: nonzero gradients
    assert np.count_nonzero(np.asarray(s) != scales[p]) > s.size // 2, p
  # The train state's init adds them, named like a QTensor's scales: laid out like the kernels'
  # outputs (here split over `tensor` along heads/mlp, over `fsdp` along embed), with their own
  # optimizer state beside the frozen masks'.
  model = Transformer(CFG)
  tx = steps.make_optimizer(_opt(), 10)
  init = steps.state_init_fn(model, qat.split_optimizer(schedules.frozen(tx, masks), tx), 16,
                             qat.loss(steps.lm_loss(model), LEARNED))
  abstract = sharding.sharded_abstract(init, sharding.make_mesh(dict(fsdp=2, tensor=2, data=2)),
                                       sharding.rules_for('fsdp_tp'), jax.random.key(0))
  for p in ('blocks_0/attn/query/kernel', 'blocks_0/mlp/down/kernel'):
    kernel = paths.flatten(abstract.params)[p]
    scale = paths.flatten(abstract.params[qat.SCALES])[p]
    assert scale.shape == scales[p].shape
    outputs = kernel.sharding.spec[LAYOUTS[p].inputs:]
    assert tuple(scale.sharding.spec) == (None,) + tuple(outputs) and any(outputs), p
  # Zero gradients and heavy decay: kernels shrink, scales do not move.
  params = jax.tree.map(jnp.asarray, start)
  tx = steps.make_optimizer(_opt(learning_rate=0.1, weight_decay=0.5), 10)
  zeros = jax.tree.map(jnp.zeros_like, params)

  @jax.jit
  def second_update(params):   # the first step's learning rate is 0 (warmup)
    _, opt_state = tx.update(zeros, tx.init(params), params)
    return tx.update(zeros, opt_state, params)[0]
  updates = second_update(params)
  for p, u in paths.flatten(updates).items():
    moved = bool(np.any(np.asarray(u) != 0))
    assert moved == (p.endswith('kernel') and not p.startswith(qat.SCALES)), p


def test_frozen_masks_keep_zeros_through_qat_steps_and_convert(pruned_run):
  masks, start, trained, loss = pruned_run
  fake = paths.flatten(jax.jit(loss.model_params)(trained))
  served = paths.flatten(jax.jit(lambda p: qat.convert(p, LEARNED, LAYOUTS))(trained))
  flat_start, flat_trained, flat_masks = (paths.flatten(t) for t in (start, trained, masks))
  for p in paths.select(init_params(CFG), LAYOUTS):
    off = ~flat_masks[p]
    assert 0 < off.sum() < off.size
    assert np.all(np.asarray(flat_trained[p])[off] == 0.0)
    assert np.all(np.asarray(fake[p])[off] == 0.0)   # asymmetric: (zero - zero) * scale
    assert np.all(np.asarray(qtensor.dequantize(served[p]))[off] == 0.0)
    assert np.any(np.asarray(flat_trained[p])[~off] != flat_start[p][~off])
  moved = [np.any(np.asarray(a) != b) for a, b in zip(jax.tree.leaves(trained[qat.SCALES]),
                                                      jax.tree.leaves(start[qat.SCALES]))]
  assert all(moved)   # the scales train beside the frozen-mask optimizer


# ---- the training loop and its config

def _tiny(data_dir):
  config = shakespeare.get_config('tiny')
  config.data.data_dir = str(data_dir)
  config.update(num_train_steps=3, checkpoint_every=3, eval_every=3)
  config.sample.num_prompts = 0
  config.optimizer.warmup_steps = 1
  config.qat.update(bits=8, group_size=16, act_bits=8)
  return config


def test_a_qat_run_trains_checkpoints_and_resumes_through_the_one_loop(tmp_path, data_dir):
  config = _tiny(data_dir)
  first = train.train_and_evaluate(config, tmp_path)
  config.num_train_steps = 6
  final = train.train_and_evaluate(config, tmp_path)
  records = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in records if 'train_loss' in r] == [1, 2, 3, 4, 5, 6]
  assert [r['step'] for r in records if 'eval_loss' in r] == [3, 6]
  assert workdir_lib.checkpoint_steps(tmp_path) == [3, 6]
  assert np.isfinite(first['loss']) and final['loss'] < first['loss']
  assert json.loads((tmp_path / 'config.json').read_text())['qat']['bits'] == 8


@pytest.mark.parametrize('field,value,match', [
    ('bits', 5, r'config\.qat\.bits=5 is not one of 0 \(off\), 2, 3, 4, 8'),
    ('group_size', 5, r'config\.qat\.group_size=5 does not divide the 32 inputs of blocks_0'),
    ('ranges', 'lsq', r"config\.qat\.ranges='lsq' is not one of minmax, learned"),
    ('act_bits', 4, r'config\.qat\.act_bits=4 is not one of 0 \(off\), 8'),
    ('clip', 0.0, r'config\.qat\.clip=0\.0 must be in \(0, 1\]'),
    ('include', 'nothing_matches', r'config\.qat: the selection include=.nothing_matches'),
])
def test_bad_qat_fields_are_one_line_errors(data_dir, field, value, match):
  config = _tiny(data_dir)
  config.qat[field] = value
  with pytest.raises(UserError, match=match) as e:
    validate.check_fields(config)
  assert '\n' not in str(e.value)


def test_int8_activations_go_with_any_weight_grid_and_an_off_qat_is_not_checked(data_dir):
  config = _tiny(data_dir)
  config.qat.update(bits=4, group_size=16, symmetric=False, act_bits=8)   # W4A8, asymmetric
  validate.check_fields(config)
  config.qat.update(bits=0, act_bits=4)   # off: nothing else is looked at
  validate.check_fields(config)
