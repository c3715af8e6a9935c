"""Distillation losses (compression/distill.py) against hand computations in NumPy."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sharding
from compression import distill, qat
from experiments import steps
from models import ModelConfig, Transformer, layouts
from tests.conftest import init_params, lm_batches

RNG = np.random.default_rng(0)
STUDENT = RNG.normal(size=(2, 3, 6)) * 2.0   # [B, L, V] logits
TEACHER = RNG.normal(size=(2, 3, 6)) * 2.0
TARGETS = RNG.integers(0, 6, size=(2, 3))


def softmax(x, axis=-1):
  e = np.exp(x - x.max(axis=axis, keepdims=True))
  return e / e.sum(axis=axis, keepdims=True)


def kl(a, b):   # sum a log(a / b) over the last axis
  return np.sum(a * np.log(a / b), axis=-1)


def hand(student, teacher, kind, t, beta=0.5):
  p, q = softmax(teacher / t), softmax(student / t)
  if kind == 'forward_kl':
    return kl(p, q)
  if kind == 'reverse_kl':
    return kl(q, p)
  m = beta * p + (1 - beta) * q
  return beta * kl(p, m) + (1 - beta) * kl(q, m)


@pytest.mark.parametrize('kind', distill.DIVERGENCES)
@pytest.mark.parametrize('t', [1.0, 2.5])
def test_divergences_equal_a_hand_computation(kind, t):
  got = distill.divergence(jnp.asarray(STUDENT), jnp.asarray(TEACHER), kind, t, beta=0.3)
  np.testing.assert_allclose(got, hand(STUDENT, TEACHER, kind, t, beta=0.3), rtol=1e-5,
                             atol=1e-6)
  same = distill.divergence(jnp.asarray(TEACHER), jnp.asarray(TEACHER), kind, t)
  np.testing.assert_allclose(same, 0.0, atol=1e-6)   # zero exactly when they agree
  assert np.all(np.asarray(got) > 0)


def test_forward_and_reverse_kl_differ_and_jsd_swaps_with_beta():
  fwd = distill.divergence(jnp.asarray(STUDENT), jnp.asarray(TEACHER), 'forward_kl')
  rev = distill.divergence(jnp.asarray(STUDENT), jnp.asarray(TEACHER), 'reverse_kl')
  assert np.max(np.abs(np.asarray(fwd) - np.asarray(rev))) > 1e-2   # KL is not symmetric
  np.testing.assert_allclose(   # JSD_beta(p, q) = JSD_(1 - beta)(q, p)
      distill.divergence(jnp.asarray(STUDENT), jnp.asarray(TEACHER), 'jsd', 1.0, 0.2),
      distill.divergence(jnp.asarray(TEACHER), jnp.asarray(STUDENT), 'jsd', 1.0, 0.8),
      rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize('alpha,t', [(0.0, 1.0), (0.7, 2.0), (1.0, 4.0)])
def test_kd_loss_mixes_t_squared_divergence_with_cross_entropy(alpha, t):
  spec = distill.Spec(alpha=alpha, temperature=t)
  total, kd, ce, agree = distill.token_losses(jnp.asarray(STUDENT), jnp.asarray(TEACHER),
                                              jnp.asarray(TARGETS), spec)
  want_ce = -np.log(np.take_along_axis(softmax(STUDENT), TARGETS[..., None], -1)[..., 0])
  want_kd = hand(STUDENT, TEACHER, 'forward_kl', t)
  np.testing.assert_allclose(ce, want_ce, rtol=1e-5)
  np.testing.assert_allclose(kd, want_kd, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(total, alpha * t * t * want_kd + (1 - alpha) * want_ce, rtol=1e-5)
  np.testing.assert_array_equal(agree, STUDENT.argmax(-1) == TEACHER.argmax(-1))


@pytest.mark.parametrize('kind', distill.DIVERGENCES)
def test_top_k_renormalises_both_distributions_over_the_teachers_k_ids(kind):
  k, t = 3, 1.5
  top = distill.top_k(jnp.asarray(TEACHER), k)
  ids = np.argsort(-TEACHER, axis=-1)[..., :k]
  np.testing.assert_array_equal(top.ids, ids)
  logp_full = TEACHER - np.log(np.exp(TEACHER).sum(-1, keepdims=True))
  np.testing.assert_allclose(top.logprobs, np.take_along_axis(logp_full, ids, -1), rtol=1e-5)
  # The k log-probabilities at T, renormalised, against the student's logits at those ids.
  restricted_teacher = np.take_along_axis(logp_full, ids, -1)
  restricted_student = np.take_along_axis(STUDENT, ids, -1)
  got = distill.divergence(jnp.asarray(STUDENT), top, kind, t)
  np.testing.assert_allclose(got, hand(restricted_student, restricted_teacher, kind, t),
                             rtol=1e-5, atol=1e-7)
  # With k = V it is the full divergence.
  np.testing.assert_allclose(distill.divergence(jnp.asarray(STUDENT), distill.top_k(
      jnp.asarray(TEACHER), 6), kind, t), hand(STUDENT, TEACHER, kind, t), rtol=1e-5, atol=1e-7)


def test_student_gradient_is_alpha_t_times_the_probability_gap_plus_ce_s():
  spec = distill.Spec(alpha=0.5, temperature=2.0)
  f = lambda s, t: jnp.sum(distill.token_losses(s, t, jnp.asarray(TARGETS), spec)[0])
  g_student = jax.grad(f)(jnp.asarray(STUDENT), jnp.asarray(TEACHER))
  # d/ds [alpha T^2 KL(p_T || q_T) + (1 - alpha) CE] = alpha T (q_T - p_T) + (1 - alpha)(q - y)
  y = np.eye(6)[TARGETS]
  want = (0.5 * 2.0 * (softmax(STUDENT / 2) - softmax(TEACHER / 2))
          + 0.5 * (softmax(STUDENT) - y))
  np.testing.assert_allclose(g_student, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('field,value,match', [
    ('alpha', 1.5, r'alpha=1\.5 must be in \[0, 1\]'),
    ('temperature', 0.0, r'temperature=0\.0 must be > 0'),
    ('temperature', -1, r'temperature=-1 must be > 0'),
    ('divergence', 'kl', r"divergence='kl' is not one of forward_kl, reverse_kl, jsd"),
    ('beta', 1.0, r'beta=1\.0 must be in \(0, 1\)'),
    ('top_k', -2, r'top_k=-2 must be an integer >= 0'),
    ('alpha_end', 2.0, r'alpha_end=2\.0 must be in \[0, 1\]'),
    ('temperature_end', 2.0, r'schedule_steps=0 must be an integer > 0 where alpha_end or '),
    ('feature_weight', -1.0, r'feature_weight=-1\.0 must be >= 0'),
    ('features', ((0, -1),), r'features=\(\(0, -1\),\) must be pairs'),
])
def test_bad_fields_are_one_line_errors(field, value, match):
  with pytest.raises(ValueError, match=match) as e:
    distill.check(distill.Spec(**{field: value}))
  assert '\n' not in str(e.value)


# ---- the loss of the training loop: a student and a frozen teacher

STUDENT_CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, d_ff=64)
TEACHER_CFG = ModelConfig(vocab_size=64, d_model=48, n_layers=2, n_heads=4, n_kv_heads=2,
                          d_ff=96)
BATCH = {k: jnp.asarray(v) for k, v in lm_batches(64, rows=4, length=12, padded_rows=1)[0].items()}


def _pair(spec, student_cfg=STUDENT_CFG):
  student, teacher = Transformer(student_cfg), Transformer(TEACHER_CFG)
  return (distill.loss(steps.lm_loss(student), teacher, spec), init_params(student_cfg, 1),
          init_params(TEACHER_CFG, 2))


def _apply(cfg, params):
  return Transformer(cfg).apply({'params': params}, BATCH['inputs'], positions=BATCH['positions'],
                                segment_ids=BATCH['segment_ids'])


@pytest.mark.parametrize('spec', [distill.Spec(alpha=0.7, temperature=2.0),
                                  distill.Spec(alpha=1.0, divergence='reverse_kl', top_k=5)])
def test_the_loss_is_the_token_losses_of_the_two_models_logits(spec):
  loss, sp, tp = _pair(spec)
  total, sums = loss(dict(sp, **{distill.TEACHER: tp}), BATCH)
  teacher = _apply(TEACHER_CFG, tp)
  teacher = distill.top_k(teacher, spec.top_k) if spec.top_k else teacher
  want, kd, ce, agree = distill.token_losses(_apply(STUDENT_CFG, sp), teacher, BATCH['targets'],
                                             spec)
  w = BATCH['weights']
  assert float(jnp.sum(w)) < w.size   # the padding's weight-0 tokens count nowhere
  np.testing.assert_allclose(total, jnp.sum(want * w), rtol=1e-5)
  for name, value in (('kd', kd), ('ce', ce), ('agree', agree)):
    np.testing.assert_allclose(sums[name], jnp.sum(value * w), rtol=1e-5)
  assert float(sums['tokens']) == float(jnp.sum(w))


def test_no_gradient_reaches_the_teacher_and_alpha_zero_is_the_lm_loss():
  loss, sp, tp = _pair(distill.Spec(alpha=0.0))
  grads = jax.grad(lambda p: loss(p, BATCH)[0])(dict(sp, **{distill.TEACHER: tp}))
  assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree.leaves(grads[distill.TEACHER]))
  lm = steps.lm_loss(Transformer(STUDENT_CFG))
  want = jax.grad(lambda p: lm(p, BATCH)[0])(sp)
  for a, b in zip(jax.tree.leaves({k: v for k, v in grads.items() if k != distill.TEACHER}),
                  jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)
  kd, _, _ = _pair(distill.Spec(alpha=0.5))
  g_kd = jax.grad(lambda p: kd(p, BATCH)[0])(dict(sp, **{distill.TEACHER: tp}))
  assert float(optax.tree.norm({k: v for k, v in g_kd.items() if k != distill.TEACHER})) > 0
  assert float(optax.tree.norm(g_kd[distill.TEACHER])) == 0.0


def test_offline_top_k_in_the_batch_reproduces_the_online_loss():
  spec = distill.Spec(alpha=0.6, temperature=1.5, divergence='jsd', top_k=8)
  loss, sp, tp = _pair(spec)
  online = loss(dict(sp, **{distill.TEACHER: tp}), BATCH)
  top = distill.top_k(_apply(TEACHER_CFG, tp), 8)
  offline = loss(sp, dict(BATCH, teacher_ids=top.ids, teacher_logprobs=top.logprobs))
  for a, b in zip(jax.tree.leaves(online), jax.tree.leaves(offline)):
    np.testing.assert_allclose(a, b, rtol=1e-6)
  with pytest.raises(ValueError, match='no teacher') as e:
    loss(sp, BATCH)
  assert '\n' not in str(e.value)


def test_a_vocabulary_mismatch_is_one_line():
  loss, sp, tp = _pair(distill.Spec(), STUDENT_CFG.replace(vocab_size=72))
  with pytest.raises(ValueError, match='the teacher scores 64 tokens and the student 72') as e:
    loss(dict(sp, **{distill.TEACHER: tp}), BATCH)
  assert '\n' not in str(e.value)


def test_quantization_aware_training_wraps_the_student_only():
  spec = qat.Spec(bits=4, group_size=16)
  kd, sp, tp = _pair(distill.Spec(alpha=0.5))
  both = qat.loss(kd, spec)
  got = both(dict(sp, **{distill.TEACHER: tp}), BATCH)
  fake = qat.fake_quantize(sp, spec, layouts.of_config(STUDENT_CFG))
  want = kd(dict(fake, **{distill.TEACHER: tp}), BATCH)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_the_distillation_step_on_a_2x2x2_mesh_equals_one_device():
  student_cfg = STUDENT_CFG.replace(n_heads=4, n_kv_heads=2)
  loss, _, tp = _pair(distill.Spec(alpha=0.5, temperature=2.0), student_cfg)
  model, tx = Transformer(student_cfg), optax.adamw(1e-3)
  init = steps.state_init_fn(model, tx, 12)
  batch = lm_batches(64, rows=8, length=12)[0]
  step = lambda state, b, frozen: steps.train_step(state, b, jnp.ones((64,)), frozen,
                                                   loss=loss, accum_steps=2)
  one = nn.meta.unbox(init(jax.random.key(0)))
  want_state, want = step(one, batch, {distill.TEACHER: tp})
  mesh_config = sharding.default_mesh_config()
  mesh_config.update(data=2, fsdp=2, tensor=2)
  mesh, rules = sharding.make_mesh(mesh_config), sharding.rules_for('fsdp_tp')
  state = sharding.create_sharded(init, mesh, rules, jax.random.key(0))
  names = layouts.logical_names(Transformer(TEACHER_CFG))
  teacher = jax.device_put(tp, sharding.tree_shardings(tp, mesh, rules, names))
  assert any(not x.sharding.is_fully_replicated for x in jax.tree.leaves(teacher))
  with sharding.activation_rules(mesh, rules):
    got_state, got = step(state, sharding.global_batch(batch, mesh, rules),
                          {distill.TEACHER: teacher})
  for k in ('loss', 'kd_loss', 'teacher_agreement', 'grad_norm'):
    assert float(got[k]) == pytest.approx(float(want[k]), rel=1e-5), k
  for a, b in zip(jax.tree.leaves(jax.device_get(got_state.params)),
                  jax.tree.leaves(want_state.params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_a_quantized_teacher_teaches_as_its_integers_dequantized_and_shards_by_its_names():
  from compression import qtensor, quantize
  from experiments import runtime
  loss, sp, tp = _pair(distill.Spec(alpha=0.5, temperature=2.0))
  teacher_model = Transformer(TEACHER_CFG)
  q = quantize.quantize(tp, 'rtn', 4, group_size=16, model=teacher_model)
  dense = jax.tree.map(lambda x: qtensor.dequantize(x) if isinstance(x, qtensor.QTensor) else x,
                       q, is_leaf=lambda x: isinstance(x, qtensor.QTensor))
  with qtensor.execution('accelerator'):   # the integers dequantized into the dot's operand
    got = loss(dict(sp, **{distill.TEACHER: q}), BATCH)[0]
  want = loss(dict(sp, **{distill.TEACHER: dense}), BATCH)[0]
  assert float(got) == pytest.approx(float(want), rel=1e-5)
  mesh_config = sharding.default_mesh_config()
  mesh_config.update(data=2, fsdp=2, tensor=2)
  mesh, rules = sharding.make_mesh(mesh_config), sharding.rules_for('fsdp_tp')
  placed = runtime.Placement._place(q, sharding.tree_shardings(
      q, mesh, rules, layouts.logical_names(teacher_model)))
  leaf = placed['blocks_0']['mlp']['up']['kernel']
  assert isinstance(leaf, qtensor.QTensor) and not leaf.values.sharding.is_fully_replicated
  with qtensor.execution('accelerator'), sharding.activation_rules(mesh, rules):
    on_mesh = jax.jit(lambda p, b: loss(p, b)[0])(dict(sp, **{distill.TEACHER: placed}),
                                                 sharding.global_batch(
                                                     jax.device_get(BATCH), mesh, rules))
  assert float(on_mesh) == pytest.approx(float(got), rel=1e-5)


# ---- hidden-state transfer

@pytest.mark.parametrize('remat', ['none', 'full'])
def test_block_outputs_are_the_residual_stream_the_head_reads(remat):
  from models.transformer import block_outputs, capture_blocks
  cfg = TEACHER_CFG.replace(remat=remat)
  params = init_params(cfg, 2)
  model = Transformer(cfg)
  logits, state = model.apply({'params': params}, BATCH['inputs'], positions=BATCH['positions'],
                              segment_ids=BATCH['segment_ids'], mutable=['intermediates'],
                              capture_intermediates=capture_blocks)
  hidden = block_outputs(state['intermediates'], cfg)
  assert len(hidden) == cfg.n_layers and hidden[0].shape == (4, 12, cfg.d_model)
  # The last layer's output, normalised and read by the tied head, is the model's logits.
  h, norm = np.asarray(hidden[-1], np.float64), np.asarray(params['final_norm']['scale'])
  x = h / np.sqrt(np.mean(h * h, -1, keepdims=True) + cfg.norm_eps) * norm[None, None]
  head = np.asarray(params['lm_head']['kernel'])   # untied by default
  np.testing.assert_allclose(x @ head, logits, rtol=2e-4, atol=2e-4)
  assert np.max(np.abs(np.asarray(hidden[0] - hidden[1]))) > 1e-3   # layers differ


def test_feature_losses_are_relative_squared_errors_through_the_projection():
  rng = np.random.default_rng(3)
  s = [jnp.asarray(rng.normal(size=(2, 3, 4))) for _ in range(2)]
  t = [jnp.asarray(rng.normal(size=(2, 3, 6))) for _ in range(3)]
  p = {'0_2': {'w': jnp.asarray(rng.normal(size=(4, 6)))},
       '1_0': {'w': jnp.asarray(rng.normal(size=(4, 6)))}}
  got = distill.feature_losses(s, t, ((0, 2), (1, 0)), p)
  rel = lambda a, b: np.sum((a - b) ** 2, -1) / np.sum(b ** 2, -1)
  want = (rel(np.asarray(s[0]) @ np.asarray(p['0_2']['w']), np.asarray(t[2]))
          + rel(np.asarray(s[1]) @ np.asarray(p['1_0']['w']), np.asarray(t[0]))) / 2
  np.testing.assert_allclose(got, want, rtol=1e-5)
  same = distill.feature_losses(t, t, ((1, 1),))   # equal widths: no projection, zero at equality
  np.testing.assert_allclose(same, 0.0, atol=1e-7)


def test_feature_transfer_adds_its_weighted_term_and_trains_the_projections():
  spec = distill.Spec(alpha=0.5, features=((0, 1),), feature_weight=0.3)
  loss, sp, tp = _pair(spec)
  params = loss.init_params(sp)
  assert params[distill.PROJECTIONS]['0_1']['w'].shape == (32, 48)
  assert sorted(loss.model_params(dict(params, **{distill.TEACHER: tp}))) == sorted(sp)
  full = dict(params, **{distill.TEACHER: tp})
  total, sums = loss(full, BATCH)
  plain, _ = _pair(distill.Spec(alpha=0.5))[0](dict(sp, **{distill.TEACHER: tp}), BATCH)
  assert float(sums['feature']) > 0
  assert float(total) == pytest.approx(float(plain) + 0.3 * float(sums['feature']), rel=1e-5)
  grads = jax.grad(lambda p: loss(p, BATCH)[0])(full)
  assert float(optax.tree.norm(grads[distill.PROJECTIONS])) > 0
  assert float(optax.tree.norm(grads[distill.TEACHER])) == 0.0
  with pytest.raises(ValueError, match=r"the pair \(1, 1\) is outside the student's 1 or the "
                                       r"teacher's 2 layers"):
    distill.loss(steps.lm_loss(Transformer(STUDENT_CFG)), Transformer(TEACHER_CFG),
                 distill.Spec(features=((1, 1),)))


# ---- schedules of alpha and T

def test_alpha_and_temperature_move_linearly_to_their_end_values():
  spec = distill.Spec(alpha=0.2, temperature=4.0, alpha_end=0.8, temperature_end=1.0,
                      schedule_steps=10)
  for step, (a, t) in ((0, (0.2, 4.0)), (5, (0.5, 2.5)), (10, (0.8, 1.0)), (25, (0.8, 1.0))):
    got = distill.scheduled(spec, jnp.asarray(step))
    np.testing.assert_allclose([float(got[0]), float(got[1])], [a, t], rtol=1e-6)
  # The loss at step 5 is the loss of the constant spec with the values of step 5.
  fixed = distill.Spec(alpha=0.5, temperature=2.5)
  args = (jnp.asarray(STUDENT), jnp.asarray(TEACHER), jnp.asarray(TARGETS))
  np.testing.assert_allclose(distill.token_losses(*args, spec, jnp.asarray(5))[0],
                             distill.token_losses(*args, fixed)[0], rtol=1e-5)


def test_the_train_step_hands_the_loss_its_step_and_logs_the_schedule():
  spec = distill.Spec(alpha=0.0, temperature=1.0, alpha_end=1.0, temperature_end=3.0,
                      schedule_steps=4)
  loss, _, tp = _pair(spec)
  model = Transformer(STUDENT_CFG)
  state = steps.init_state(model, optax.sgd(0.0), 0, 12)
  seen = []
  for _ in range(3):
    state, metrics = steps.train_step(state, BATCH, jnp.ones((64,)), {distill.TEACHER: tp},
                                      loss=loss, accum_steps=1)
    seen.append((float(metrics['kd_alpha']), float(metrics['kd_temperature'])))
  np.testing.assert_allclose(seen, [(0.0, 1.0), (0.25, 1.5), (0.5, 2.0)], rtol=1e-6)
