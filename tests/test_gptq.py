"""GPTQ (`compression.gptq`) against the float64 NumPy reference of the published algorithm.

The reference (`tests/gptq_reference.py`) quantizes one input at a time with explicit inverse
Hessian updates and no blocks; the library uses the Cholesky factor of H^-1 and lazy block
updates, so agreement also shows that the lazy updates are exact. Integers must be identical:
the reference adopts the library's integer only at values within 1e-4 steps of a rounding tie
(and counts them), where float32 may round either way.

Shapes are fixed so that each configuration compiles once for the whole file.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compression import gptq, grid
from tests import gptq_reference as ref

N_IN, N_OUT = 96, 24
SEED = 0
# (bits, group_size, symmetric, act_order, block_size): blocks smaller than the kernel, so later
# blocks depend on the lazy updates; groups fitted at block starts and mid-block; static groups.
CASES = [
    (4, 0, True, False, 32),
    (3, 0, False, True, 32),
    (4, 32, False, False, 64),
    (3, 32, True, True, 32),
    (4, -1, False, False, 32),
    (3, 16, True, False, 40),   # the block is rounded down to whole groups (32)
]


def calibration(n_in=N_IN, seed=SEED, n_tokens=256, n_outliers=4, outlier_scale=10.0):
  """Correlated Gaussian inputs (tokens, in) with a few large-norm input channels, as in LLMs."""
  rng = np.random.default_rng(seed)
  mix = np.eye(n_in) + 0.5 * rng.standard_normal((n_in, n_in)) / np.sqrt(n_in)
  x = rng.standard_normal((n_tokens, n_in)) @ mix
  x[:, rng.choice(n_in, n_outliers, replace=False)] *= outlier_scale
  return x


def kernel(seed=SEED):
  return np.random.default_rng(seed + 1).standard_normal((N_IN, N_OUT)).astype(np.float32)


def gram(x):
  """X^T X accumulated in float64 and rounded once: both sides then see the same float32 H."""
  return (np.asarray(x, np.float64).T @ x).astype(np.float32)


def run(w, h, bits, group_size, symmetric, act_order, block_size, clip=None):
  q, scale, zero = gptq.gptq(jnp.asarray(w), jnp.asarray(h), bits, group_size, symmetric,
                             act_order, block_size, clip=clip)
  return np.asarray(q), np.asarray(scale), np.asarray(zero)


# Jitted like GPTQ: XLA turns the grid's division by a constant into a multiplication by its
# reciprocal, which can move a scale by one ulp from the op-by-op result.
_fake_quant = jax.jit(grid.fake_quant, static_argnums=(1, 2, 3))
_fit = jax.jit(grid.fit, static_argnums=(1, 2), static_argnames='per_tensor')


def rtn(w, bits, group_size, symmetric):
  return np.asarray(_fake_quant(jnp.asarray(w), bits, group_size, symmetric))


def assert_matches_reference(w, h, bits, group_size, symmetric, act_order, block_size,
                             clip=None):
  q, scale, zero = run(w, h, bits, group_size, symmetric, act_order, block_size, clip)
  n_groups = grid.n_groups(N_IN, group_size)
  assert q.dtype == np.int8 and q.shape == (N_IN, N_OUT)
  assert scale.shape == zero.shape == (n_groups, N_OUT)
  lo, hi = grid.qrange(bits)
  assert lo <= q.min() and q.max() <= hi
  want_q, want_scale, want_zero, adopted = ref.gptq(
      w, h, bits, group_size, symmetric, act_order, clip=clip, adopt=(q, zero))
  assert adopted <= 2, f'{adopted} near-ties: too close to call, change SEED'
  np.testing.assert_array_equal(q, want_q)
  np.testing.assert_array_equal(zero, want_zero)
  np.testing.assert_allclose(scale, want_scale, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(gptq.dequantize(q, scale, zero)),
                             ref.dequantize(want_q, want_scale, want_zero), rtol=1e-5, atol=1e-6)
  return q, scale, zero


# ---- The reference on its own. ----


@pytest.mark.parametrize('act_order', [False, True])
def test_reference_rounds_each_input_from_the_least_squares_optimum(act_order):
  # Sequential OBQ updates keep the inputs not yet visited at the minimum of
  # (v - w)^T H (v - w) given the values already fixed: the row about to be rounded must be that
  # optimum's, for every step of the visit.
  w, h = kernel().astype(np.float64), gram(calibration()).astype(np.float64)
  q, scale, zero, _, h_damp, visits = ref.gptq(w, h, 3, 0, True, act_order, return_visits=True)
  fixed_w = ref.dequantize(q, scale, zero)
  order = np.argsort(-np.diag(h), kind='stable') if act_order else np.arange(N_IN)
  for t in range(0, N_IN, 7):
    done, rest = order[:t], order[t:]
    shift = np.linalg.solve(h_damp[np.ix_(rest, rest)],
                            h_damp[np.ix_(rest, done)] @ (fixed_w[done] - w[done]))
    np.testing.assert_allclose(visits[rest[0]], (w[rest] - shift)[0], rtol=1e-7, atol=1e-9)
  assert np.abs(visits - w).max() > 0.1   # the updates did something


@pytest.mark.parametrize('group_size,symmetric', [(0, True), (32, False), (-1, False)])
def test_reference_with_diagonal_hessian_is_round_to_nearest(group_size, symmetric):
  w = kernel()
  h = np.diag(np.random.default_rng(3).uniform(1, 10, N_IN))   # no correlations
  q, scale, zero, _ = ref.gptq(w, h, 3, group_size, symmetric, act_order=True)
  want_q, want_scale, want_zero = ref.rtn(w, 3, group_size, symmetric)
  np.testing.assert_array_equal(q, want_q)
  np.testing.assert_array_equal(scale, want_scale)
  np.testing.assert_array_equal(zero, want_zero)


def test_reference_adopts_the_other_integer_only_at_ties():
  w, h = np.array([[7.0], [2.5]]), np.eye(2)   # scale 1: the second weight is a tie
  assert ref.gptq(w, h, 4)[0][1, 0] == 2   # half to even, like jnp.round
  q, _, _, adopted = ref.gptq(w, h, 4, adopt=(np.array([[7], [3]]), np.zeros((1, 1))))
  assert q[1, 0] == 3 and adopted == 1
  q, _, _, adopted = ref.gptq(w, h, 4, adopt=(np.array([[7], [4]]), np.zeros((1, 1))))
  assert q[1, 0] == 2 and adopted == 0   # not a neighbour of the tie: our own rounding stands
  q, _, _, adopted = ref.gptq(w + 0.01, h, 4, adopt=(np.array([[7], [2]]), np.zeros((1, 1))))
  assert q[1, 0] == 3 and adopted == 0   # not near a tie


# ---- compression.gptq against the reference. ----


@pytest.mark.parametrize('bits,group_size,symmetric,act_order,block_size', CASES)
def test_gptq_matches_reference(bits, group_size, symmetric, act_order, block_size):
  assert_matches_reference(kernel(), gram(calibration()), bits, group_size, symmetric, act_order,
                           block_size)


def test_gptq_with_clip_factors_matches_reference():
  w, h = kernel(), gram(calibration())
  clip = np.asarray(grid.search_clip(jnp.asarray(w), 3, 32, True, jnp.asarray(h)))
  assert (clip < 1).any()
  assert_matches_reference(w, h, 3, 32, True, False, 32, clip=clip)


def test_gptq_zeroes_dead_inputs():
  w, x = kernel(), calibration()
  x[:, [3, 40]] = 0
  q, scale, zero = assert_matches_reference(w, gram(x), 3, 0, False, True, 32)
  deq = np.asarray(gptq.dequantize(q, scale, zero))
  assert np.isfinite(deq).all()
  assert (deq[[3, 40]] == 0).all() and (deq[[2, 41]] != 0).any()


@pytest.mark.parametrize('bits,group_size,symmetric,act_order,block_size',
                         CASES[:4] + CASES[5:])
def test_gptq_beats_round_to_nearest_on_the_output_error(bits, group_size, symmetric, act_order,
                                                         block_size):
  w, h = kernel(), gram(calibration())
  q, scale, zero = run(w, h, bits, group_size, symmetric, act_order, block_size)
  error = ref.output_error(w, np.asarray(gptq.dequantize(q, scale, zero)), h)
  rtn_error = ref.output_error(w, rtn(w, bits, group_size, symmetric), h)
  assert error < 0.9 * rtn_error, (error, rtn_error)


@pytest.mark.parametrize('bits,group_size,symmetric,act_order,block_size', CASES)
def test_gptq_with_diagonal_hessian_is_round_to_nearest(bits, group_size, symmetric, act_order,
                                                        block_size):
  # No correlations: U is diagonal, no error reaches another input and every grid is fitted to
  # the original weights, so GPTQ is exactly round to nearest (act_order just permutes the visit).
  w = kernel()
  h = np.diag(np.random.default_rng(3).uniform(1, 10, N_IN)).astype(np.float32)
  q, scale, zero = run(w, h, bits, group_size, symmetric, act_order, block_size)
  g = grid.grouped(jnp.asarray(w), group_size)
  want_scale, want_zero = _fit(g, bits, symmetric, per_tensor=group_size == -1)
  want_q = grid.quantize(g, want_scale[:, None], want_zero[:, None], bits).reshape(w.shape)
  np.testing.assert_array_equal(q, np.asarray(want_q))
  np.testing.assert_array_equal(scale, np.asarray(want_scale))
  np.testing.assert_array_equal(zero, np.asarray(want_zero))
  np.testing.assert_array_equal(np.asarray(gptq.dequantize(q, scale, zero)),
                                rtn(w, bits, group_size, symmetric))


@pytest.mark.parametrize('kwargs,match', [
    (dict(bits=5), 'bits=5 is not one of 2, 3, 4, 8'),
    (dict(bits=4, group_size=40), 'group_size=40 does not divide the 96 inputs'),
    (dict(bits=4, group_size=-2), 'group_size=-2 must be'),
    (dict(bits=4, block_size=0), 'block_size=0 must be a positive integer'),
    (dict(bits=4, group_size=32, clip=np.ones((2, N_OUT))), r'clip shape \(2, 24\) must be'),
])
def test_bad_input_is_one_clear_line(kwargs, match):
  with pytest.raises(ValueError, match=match) as info:
    gptq.gptq(jnp.asarray(kernel()), jnp.eye(N_IN), **kwargs)
  assert '\n' not in str(info.value)


def test_hessian_of_the_wrong_size_is_one_clear_line():
  with pytest.raises(ValueError, match=r'hessian shape \(64, 64\) does not match'):
    gptq.gptq(jnp.asarray(kernel()), jnp.eye(64), 4)
