"""Distillation losses (compression/distill.py) against hand computations in NumPy."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from compression import distill

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
])
def test_bad_fields_are_one_line_errors(field, value, match):
  with pytest.raises(ValueError, match=match) as e:
    distill.check(distill.Spec(**{field: value}))
  assert '\n' not in str(e.value)
