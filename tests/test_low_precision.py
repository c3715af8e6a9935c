"""Low-precision training matmuls: the int8 and fp8 dots against NumPy, their gradients, delayed
scaling's histories, selection, the training loop and config validation."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest

import sharding
from compression import low_precision as lp
from compression import paths
from experiments import steps, train, validate
from experiments.configs import shakespeare
from experiments.errors import UserError
from models import ModelConfig, Transformer, layers, layouts
from tests.conftest import init_params, lm_batches

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=64,
                  max_len=64)
LAYOUTS = layouts.of_config(CFG)
NAMES = ('embed', 'mlp')


def _data(seed, *shape):
  return np.array(jax.random.normal(jax.random.key(seed), shape), np.float32)


def _int8_np(x, axis):
  """NumPy: int8 values (as int64) and float32 scales per index of the other axes."""
  s = (np.max(np.abs(x), axis=axis, keepdims=True) / np.float32(127)).astype(np.float32)
  s = np.where(s > 0, s, np.float32(1))
  return np.clip(np.round(x / s), -127, 127).astype(np.int64), s


def _leaf(w, fmt, backward=True, hist=None):
  return lp.LowPrecision(w=jnp.asarray(w), names=NAMES, inputs=1, outputs=1, hist=hist,
                         format=fmt, backward=backward)


def test_int8_dot_equals_an_int64_numpy_reference_and_lowers_to_an_s8_dot():
  x, w = _data(0, 3, 5, 32), _data(1, 32, 16)
  y = layers.dot(jnp.asarray(x), _leaf(w, 'int8'), 1, jnp.float32)
  qx, sx = _int8_np(x, 2)
  qw, sw = _int8_np(w, 0)
  ints = np.einsum('bli,io->blo', qx, qw)   # exact in int64
  expected = ints.astype(np.float32) * sx * sw
  np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-6, atol=0)
  hlo = jax.jit(lambda a: layers.dot(a, _leaf(w, 'int8'), 1, jnp.float32)).lower(
      jnp.asarray(x)).as_text()
  assert any('dot_general' in line and 'xi8>' in line for line in hlo.splitlines())


def test_fp8_dot_equals_e4m3_values_summed_in_float64():
  x, w = _data(2, 4, 32), _data(3, 32, 8)
  x[0, 0] = 30.0   # one large entry sets the activation's per-tensor scale
  y = layers.dot(jnp.asarray(x), _leaf(w, 'fp8'), 1, jnp.float32)
  sx, sw = np.abs(x).max() / 448.0, np.abs(w).max() / 448.0
  xq = (x / np.float32(sx)).astype(ml_dtypes.float8_e4m3fn).astype(np.float64)
  wq = (w / np.float32(sw)).astype(ml_dtypes.float8_e4m3fn).astype(np.float64)
  np.testing.assert_allclose(np.asarray(y), xq @ wq * sx * sw, rtol=1e-5, atol=1e-6)
  grad = jax.jit(jax.grad(lambda a, t: jnp.sum(layers.dot(a, t, 1, jnp.float32) ** 2),
                          argnums=(0, 1)))
  hlo = grad.lower(jnp.asarray(x), _leaf(w, 'fp8')).as_text()
  dots = [line for line in hlo.splitlines() if 'dot_general' in line]
  assert any('f8E4M3FN' in line for line in dots) and any('f8E5M2' in line for line in dots)


@pytest.mark.parametrize('fmt', ['int8', 'fp8'])
def test_gradients_are_the_low_precision_products_of_the_output_gradient(fmt):
  """Straight-through: for sum(c * y), d/dx = c w^T and d/dw = x^T c as low-precision dots
  (int8: of the operands rounded per row/channel; fp8: c in e5m2); float32 with backward off."""
  x, w, c = _data(4, 6, 32), _data(5, 32, 16), _data(6, 6, 16)
  f = lambda a, t: jnp.sum(jnp.asarray(c) * layers.dot(a, t, 1, jnp.float32))
  d_x, d_t = jax.grad(f, argnums=(0, 1))(jnp.asarray(x), _leaf(w, fmt))
  if fmt == 'int8':
    qc, sc = _int8_np(c, 1)
    qw, sw = _int8_np(w, 1)
    want_x = (qc @ qw.T).astype(np.float32) * sc * sw.reshape(1, -1)
    qx, sx = _int8_np(x, 0)
    qc0, sc0 = _int8_np(c, 0)
    want_w = (qx.T @ qc0).astype(np.float32) * sx.reshape(-1, 1) * sc0
    rtol = 1e-6
  else:
    e5, e4 = ml_dtypes.float8_e5m2, ml_dtypes.float8_e4m3fn
    sc, sw, sx = np.abs(c).max() / 57344.0, np.abs(w).max() / 448.0, np.abs(x).max() / 448.0
    cq = (c / np.float32(sc)).astype(e5).astype(np.float64) * sc
    want_x = cq @ ((w / np.float32(sw)).astype(e4).astype(np.float64) * sw).T
    want_w = ((x / np.float32(sx)).astype(e4).astype(np.float64) * sx).T @ cq
    rtol = 1e-5
  np.testing.assert_allclose(np.asarray(d_x), want_x, rtol=rtol, atol=1e-6)
  np.testing.assert_allclose(np.asarray(d_t.w), want_w, rtol=rtol, atol=1e-6)
  d_x, d_t = jax.grad(f, argnums=(0, 1))(jnp.asarray(x), _leaf(w, fmt, backward=False))
  np.testing.assert_allclose(np.asarray(d_x), c @ w.T, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(d_t.w), x.T @ c, rtol=1e-5, atol=1e-6)


def test_delayed_scaling_uses_the_history_and_rolls_in_the_mean_observed_maxima():
  x, w, c = _data(7, 4, 32), _data(8, 32, 8), _data(9, 4, 8)
  hist = np.zeros((3, 2), np.float32)
  hist[1] = [4 * np.abs(x).max(), 0.0]   # a past activation max 4x this step's
  t = _leaf(w, 'fp8', hist=jnp.asarray(hist))
  y = layers.dot(jnp.asarray(x), t, 1, jnp.float32)
  sx, sw = hist[1, 0] / 448.0, np.abs(w).max() / 448.0
  xq = (x / np.float32(sx)).astype(ml_dtypes.float8_e4m3fn).astype(np.float64)
  wq = (w / np.float32(sw)).astype(ml_dtypes.float8_e4m3fn).astype(np.float64)
  np.testing.assert_allclose(np.asarray(y), xq @ wq * sx * sw, rtol=1e-5, atol=1e-6)
  # Two microbatches' "gradients", summed and divided by the tokens as train_step does.
  f = lambda h, a, g: jnp.sum(g * layers.dot(a, _leaf(w, 'fp8', hist=h), 1, jnp.float32))
  g1 = jax.grad(f)(jnp.asarray(hist), jnp.asarray(x), jnp.asarray(c))
  g2 = jax.grad(f)(jnp.asarray(hist), jnp.asarray(2 * x), jnp.asarray(3 * c))
  tokens = 8.0
  params = {lp.HISTORY: {'k': jnp.asarray(hist)}, 'w': jnp.zeros(2)}
  grads = {lp.HISTORY: {'k': (g1 + g2) / tokens}, 'w': jnp.ones(2)}
  tx = lp.split_optimizer(optax.sgd(1.0))
  updates, _ = tx.update(grads, tx.init(params), params)
  new = np.asarray(params[lp.HISTORY]['k'] + updates[lp.HISTORY]['k'])
  observed = [1.5 * np.abs(x).max(), 2.0 * np.abs(c).max()]   # means of the two microbatches
  np.testing.assert_allclose(new[0], observed, rtol=1e-6)
  np.testing.assert_array_equal(new[1:], hist[:-1])
  np.testing.assert_array_equal(np.asarray(updates['w']), -np.ones(2))   # the model's own tx


def test_only_the_selected_kernels_run_in_low_precision():
  params = init_params(CFG)
  spec = lp.Spec('int8', include='mlp')
  wrapped = paths.flatten(lp.wrap(params, spec, LAYOUTS, CFG))
  chosen = {p for p, v in wrapped.items() if isinstance(v, lp.LowPrecision)}
  assert chosen == {p for p in LAYOUTS if '/mlp/' in p}
  assert chosen and all(not isinstance(v, lp.LowPrecision) or v.hist is None
                        for v in wrapped.values())
  with pytest.raises(ValueError, match=r"selection include='nothing' exclude="):
    lp.check(params, lp.Spec('int8', include='nothing'), LAYOUTS)


def _tiny(data_dir, **low_precision):
  config = shakespeare.get_config('tiny')
  config.data.data_dir = str(data_dir)
  config.update(num_train_steps=3, checkpoint_every=3, eval_every=3)
  config.sample.num_prompts = 0
  config.optimizer.warmup_steps = 1
  config.low_precision.update(**low_precision)
  return config


def test_a_delayed_fp8_run_trains_checkpoints_its_histories_and_resumes(tmp_path, data_dir):
  config = _tiny(data_dir, format='fp8', scaling='delayed', history=4)
  first = train.train_and_evaluate(config, tmp_path)
  config.num_train_steps = 6
  final = train.train_and_evaluate(config, tmp_path)
  records = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in records if 'train_loss' in r] == [1, 2, 3, 4, 5, 6]
  assert np.isfinite(first['loss']) and final['loss'] < first['loss']
  saved = json.loads((tmp_path / 'config.json').read_text())
  assert saved['low_precision']['format'] == 'fp8'
  from experiments import runtime
  _, _, _, params, _ = runtime.load_params(config, tmp_path)
  hist = jax.tree.leaves(params[lp.HISTORY])
  assert hist and all(np.all(np.asarray(h)[..., :4, :] > 0) for h in hist)   # 6 steps seen
  assert runtime.evaluate(config, tmp_path)['loss'] == pytest.approx(final['loss'], rel=1e-6)


def test_an_int8_step_is_close_to_the_float_step():
  model = Transformer(CFG)
  params = init_params(CFG)
  batch = next(iter(lm_batches(CFG.vocab_size, 1, rows=4, length=16)))
  base = steps.lm_loss(model)
  grads = lambda loss: jax.jit(jax.grad(lambda p: loss(p, batch)[0]))(params)
  g_float, g_int8 = grads(base), grads(lp.loss(base, lp.Spec('int8')))
  for a, b in zip(jax.tree.leaves(g_int8), jax.tree.leaves(g_float)):
    assert np.linalg.norm(a - b) <= 0.05 * np.linalg.norm(b) + 1e-7


@pytest.mark.parametrize('field,value,match', [
    ('format', 'int4', r"config\.low_precision\.format='int4' is not one of '' \(off\), int8, "
                       r"fp8"),
    ('scaling', 'later', r"config\.low_precision\.scaling='later' is not one of current, "
                         r"delayed"),
    ('history', 0, r'config\.low_precision\.history=0 must be an integer >= 1'),
    ('include', 'nothing_matches', r'config\.low_precision: the selection include='),
    ('include', '(', r"config\.low_precision\.include='\(' is not a regular expression"),
])
def test_bad_low_precision_fields_are_one_line_errors(data_dir, field, value, match):
  config = _tiny(data_dir, format='fp8')
  config.low_precision[field] = value
  with pytest.raises(UserError, match=match) as e:
    validate.check_fields(config)
  assert '\n' not in str(e.value)


def test_delayed_int8_and_low_precision_with_qat_are_refused(data_dir):
  config = _tiny(data_dir, format='int8', scaling='delayed')
  with pytest.raises(UserError, match=r"config\.low_precision\.scaling='delayed' applies to "
                                      r"fp8"):
    validate.check_fields(config)
  config = _tiny(data_dir, format='int8')
  config.qat.bits = 8
  with pytest.raises(UserError, match=r'cannot be combined'):
    validate.check_fields(config)


@pytest.mark.parametrize('spec', [lp.Spec('int8'), lp.Spec('fp8', scaling='delayed')],
                         ids=['int8', 'fp8 delayed'])
def test_on_a_2x2x2_mesh_the_loss_and_gradients_equal_one_device(spec):
  cfg = ModelConfig(vocab_size=64, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128)
  model = Transformer(cfg)
  loss = lp.loss(steps.lm_loss(model), spec)
  init = lambda rng: loss.init_params(model.init(rng, jnp.zeros((1, 16), jnp.int32))['params'])
  total = lambda p, b: loss(p, b)[0]
  batch = lm_batches(cfg.vocab_size, 1, rows=8, length=16)[0]
  one = jax.jit(lambda r: nn.meta.unbox(init(r)))(jax.random.key(0))
  want_loss, want = jax.jit(jax.value_and_grad(total))(one, batch)
  mesh_config = sharding.default_mesh_config()
  mesh_config.update(data=2, fsdp=2, tensor=2)
  mesh, rules = sharding.make_mesh(mesh_config), sharding.rules_for('fsdp_tp')
  params = sharding.create_sharded(init, mesh, rules, jax.random.key(0))
  with sharding.activation_rules(mesh, rules):
    got_loss, got = jax.jit(jax.value_and_grad(total))(
        params, sharding.global_batch(batch, mesh, rules))
  assert float(got_loss) == pytest.approx(float(want_loss), rel=1e-5)
  # Sums in another order can move a value across a rounding boundary: one grid step on an
  # entry or two (an int8 step is 1/127 of a row's max, an e5m2 one up to 1/4 of the value),
  # not another product.
  tol = 1e-3 if spec.format == 'int8' else 1e-2
  for a, b in zip(jax.tree.leaves(jax.device_get(got)), jax.tree.leaves(want)):
    assert np.linalg.norm(a - b) <= tol * np.linalg.norm(b) + 1e-7


def test_capacity_dispatched_experts_run_low_precision_expert_dots():
  cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=32,
                    moe_d_ff=32, n_experts=4, experts_per_token=2, moe_dispatch='capacity',
                    capacity_factor=2.0)
  model = Transformer(cfg)
  params = init_params(cfg)
  spec = lp.Spec('int8', include=r'mlp/(up|gate|down)$')
  chosen = lp.check(params, spec, layouts.of_config(cfg), cfg)
  assert chosen and all(layouts.of_config(cfg)[p].stack for p in chosen)   # expert stacks
  batch = lm_batches(cfg.vocab_size, 1, rows=4, length=16)[0]
  base = steps.lm_loss(model)
  grad = lambda f: jax.jit(jax.value_and_grad(lambda p: f(p, batch)[0]))(params)
  (l_float, g_float), (l_int8, g_int8) = grad(base), grad(lp.loss(base, spec))
  assert float(l_int8) == pytest.approx(float(l_float), rel=1e-2) and l_int8 != l_float
  for p in chosen:
    a, b = paths.flatten(g_int8)[p], paths.flatten(g_float)[p]
    assert 0 < np.linalg.norm(a - b) <= 0.05 * np.linalg.norm(b)
  dropless = cfg.replace(moe_dispatch='dropless')
  with pytest.raises(ValueError, match=r'int8 training experts run with moe_dispatch=capacity'):
    lp.check(params, spec, layouts.of_config(dropless), dropless)
