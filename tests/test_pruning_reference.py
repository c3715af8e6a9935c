"""Calibrated pruning (Wanda, SparseGPT) in JAX against the float64 NumPy references.

`test_reference_*` check the references themselves (brute-force loops, a transcription in
PyTorch's layout, closed-form special cases); the other tests hold the library to them, MoE
experts included (each expert against the reference given the tokens routed to it).

Exact mask equality between float32 (JAX) and float64 (NumPy) is only meaningful away from ties:
a score within float32 rounding of the threshold may land on either side, and in SparseGPT one
flip also changes every later update. So the comparison data is fixed-seed random data whose
selection margin (the smallest relative gap between a kept and a pruned score, reported by the
references) is asserted to be far above float32 rounding (~1e-7 for Wanda's scores, ~1e-6 for
SparseGPT's updated weights); on such data the masks must agree on every entry.
"""

import types

import jax.numpy as jnp
import numpy as np
import pytest

from tests import pruning_reference as ref
from tests.conftest import init_params, lm_batches

N_TOKENS = 512
SEED = 4  # Chosen so that every configuration below is well clear of ties (margins asserted).
# Smallest selection margins accepted before demanding bit-equal masks from float32 code.
WANDA_MARGIN = 1e-4
SPARSEGPT_MARGIN = 5e-4
WANDA_CASES = [(0.3, None), (0.5, None), (0.7, None), (0.5, (2, 4)), (0.5, (4, 8))]
SPARSEGPT_CASES = [(0.5, None), (0.5, (2, 4))]


def calibrated():
  """The library's per-matrix Wanda (the registry's score, compared per output) and SparseGPT."""
  from compression import masks, pruning, sparsegpt

  def wanda_mask(w, sq, sparsity, nm=None):
    scores = pruning.wanda(w[None], pruning.Context(sq=jnp.asarray(sq)[None]))
    return masks.from_matrices(scores, sparsity, masks.NM.of(nm), 'output')[0]

  return types.SimpleNamespace(wanda_mask=wanda_mask, sparsegpt=sparsegpt.sparsegpt)


def calibration(n_in, seed=SEED, n_tokens=N_TOKENS, n_outliers=4, outlier_scale=10.0):
  """Correlated Gaussian inputs (tokens, in) with a few large-norm outlier features, as in LLMs.

  The outliers make Wanda differ from magnitude pruning; the correlations give SparseGPT's
  updates something to compensate.
  """
  rng = np.random.default_rng(seed)
  mix = np.eye(n_in) + 0.5 * rng.standard_normal((n_in, n_in)) / np.sqrt(n_in)
  x = rng.standard_normal((n_tokens, n_in)) @ mix
  x[:, rng.choice(n_in, n_outliers, replace=False)] *= outlier_scale
  return x.astype(np.float32)  # Both sides then see exactly the same values.


def kernel(n_in, n_out, seed=SEED):
  return np.random.default_rng(seed + 1000).standard_normal((n_in, n_out)).astype(np.float32)


def hessian(x):
  """X^T X for the JAX API, accumulated in float64 so that only the final rounding differs.

  The reference uses H = 2 X^T X as published. The factor does not change the result: it scales
  inv(H)'s Cholesky factor U uniformly, so the scores w^2 / diag(U)^2 keep their order and the
  updates U[i, i:] / U[i, i] are unchanged, and the dampening is relative to the mean diagonal.
  (Only with dead inputs, whose diagonal is set to 1, does the scale shift that mean slightly.)
  """
  x = np.asarray(x, np.float64)
  return jnp.asarray((x.T @ x).astype(np.float32))


def sq_sums(x):
  """Per-input sum over tokens of x^2 for the JAX Wanda API (its sqrt is Wanda's norm)."""
  return jnp.asarray(np.sum(np.asarray(x, np.float64) ** 2, axis=0).astype(np.float32))


def nm_group_counts(a, m):
  """Nonzeros (or Trues) per group of m consecutive inputs, per output: (in // m, out)."""
  a = np.asarray(a)
  return (a != 0).reshape(a.shape[0] // m, m, a.shape[1]).sum(axis=1)


def orthogonal_inputs(n_in, seed=0):
  """Inputs whose columns are orthogonal with equal norms: X^T X = tokens * I."""
  q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((N_TOKENS, n_in)))
  return q * np.sqrt(N_TOKENS)


# ---- The references on their own. ----


def wanda_loop(w, x, sparsity, nm):
  """Wanda one output and one group at a time, ranking with an explicit (score, index) key."""
  n_in, n_out = w.shape
  norms = [np.sqrt(np.sum(np.asarray(x[:, j], np.float64) ** 2)) for j in range(n_in)]
  keep = np.ones((n_in, n_out), bool)
  if nm is None:
    groups, drop = [range(n_in)], int(n_in * sparsity)
  else:
    groups, drop = [range(g, g + nm[1]) for g in range(0, n_in, nm[1])], nm[1] - nm[0]
  for o in range(n_out):
    for group in groups:
      ranked = sorted(group, key=lambda j: (abs(float(w[j, o])) * norms[j], j))
      keep[ranked[:drop], o] = False
  return keep


@pytest.mark.parametrize('sparsity,nm', WANDA_CASES)
def test_reference_wanda_matches_a_per_output_loop(sparsity, nm):
  w, x = kernel(64, 16), calibration(64)
  keep = ref.wanda_mask(w, x, sparsity, nm)
  np.testing.assert_array_equal(keep, wanda_loop(w, x, sparsity, nm))
  want = 64 - int(64 * sparsity) if nm is None else 64 // nm[1] * nm[0]
  np.testing.assert_array_equal(keep.sum(axis=0), want)
  # Wanda is not magnitude pruning here: the outlier inputs reorder the scores.
  assert (keep != ref.magnitude_mask(w, sparsity, nm)).any()


def test_reference_wanda_ties_prune_the_lower_index_first():
  w = np.ones((8, 2))
  x = np.ones((4, 8))
  np.testing.assert_array_equal(ref.wanda_mask(w, x, 0.5)[:, 0], [0, 0, 0, 0, 1, 1, 1, 1])
  np.testing.assert_array_equal(ref.wanda_mask(w, x, 0.5, (1, 4))[:, 1], [0, 0, 0, 1, 0, 0, 0, 1])


def test_reference_wanda_keeps_everything_at_sparsity_zero():
  assert ref.wanda_mask(kernel(64, 16), calibration(64), 0.0).all()


def torch_layout_sparsegpt(weight, h, sparsity, nm, block_size, dampening):
  """A line-by-line transcription of the published algorithm in PyTorch's (out, in) layout.

  Independent of the reference's transposition; selects the unstructured mask with the published
  threshold rule instead (scores <= the k-th smallest, which is the same set when nothing ties).
  """
  weight, h = np.array(weight, np.float64), np.array(h, np.float64)
  rows, columns = weight.shape
  dead = np.diag(h) == 0
  h[dead, dead] = 1
  weight[:, dead] = 0
  h += dampening * np.mean(np.diag(h)) * np.eye(columns)
  hinv = np.linalg.cholesky(np.linalg.inv(h)).T
  pruned = np.zeros(weight.shape, bool)
  for i1 in range(0, columns, block_size):
    i2 = min(i1 + block_size, columns)
    w1 = weight[:, i1:i2].copy()
    q1, err1 = np.zeros_like(w1), np.zeros_like(w1)
    hinv1 = hinv[i1:i2, i1:i2]
    mask1 = np.zeros(w1.shape, bool)
    if nm is None:
      tmp = w1 ** 2 / np.diag(hinv1)[None, :] ** 2
      k = int(tmp.size * sparsity)
      if k:
        mask1 = tmp <= np.sort(tmp.ravel())[k - 1]
    for i in range(i2 - i1):
      w, d = w1[:, i], hinv1[i, i]
      if nm is not None and i % nm[1] == 0:
        tmp = w1[:, i:i + nm[1]] ** 2 / np.diag(hinv1)[None, i:i + nm[1]] ** 2
        lowest = np.argsort(tmp, axis=1)[:, :nm[1] - nm[0]]
        np.put_along_axis(mask1[:, i:i + nm[1]], lowest, True, axis=1)
      q = w.copy()
      q[mask1[:, i]] = 0
      q1[:, i] = q
      err = (w - q) / d
      w1[:, i:] -= np.outer(err, hinv1[i, i:])
      err1[:, i] = err
    weight[:, i1:i2] = q1
    weight[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    pruned[:, i1:i2] = mask1
  return weight, ~pruned


@pytest.mark.parametrize('sparsity,nm', SPARSEGPT_CASES + [(0.7, None), (0.5, (4, 8))])
@pytest.mark.parametrize('n_in,block_size', [(128, 32), (100, 32), (64, 64)])
def test_reference_sparsegpt_matches_the_pytorch_layout_transcription(sparsity, nm, n_in,
                                                                      block_size):
  if nm is not None and n_in % nm[1]:
    nm = (nm[0], 4)  # 100 inputs: N:M needs m | in, so 4:8 becomes 4:4 (nothing pruned).
  w, x = kernel(n_in, 24), calibration(n_in)
  new_w, keep = ref.sparsegpt(w, x, sparsity, nm, block_size)
  want_w, want_keep = torch_layout_sparsegpt(w.T, 2 * x.T.astype(np.float64) @ x, sparsity, nm,
                                             block_size, 0.01)
  np.testing.assert_array_equal(keep, want_keep.T)
  np.testing.assert_allclose(new_w, want_w.T, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize('nm', [None, (4, 4)])
def test_reference_sparsegpt_is_the_identity_at_sparsity_zero(nm):
  w, x = kernel(96, 16), calibration(96)
  new_w, keep = ref.sparsegpt(w, x, 0.0, nm, block_size=32)
  assert keep.all()
  np.testing.assert_allclose(new_w, w, rtol=0, atol=1e-12)


@pytest.mark.parametrize('n_in', [128, 100])  # 100: the last block holds only 4 inputs.
def test_reference_sparsegpt_prunes_exact_counts_per_block(n_in):
  w, x = kernel(n_in, 24), calibration(n_in)
  new_w, keep = ref.sparsegpt(w, x, 0.6, block_size=32)
  for start in range(0, n_in, 32):
    block = keep[start:start + 32]
    assert (~block).sum() == int(block.size * 0.6)
  # Pruned weights are exactly zero, kept ones (generic data) are not.
  np.testing.assert_array_equal(new_w != 0, keep)


@pytest.mark.parametrize('nm', [(2, 4), (4, 8), (1, 4)])
def test_reference_sparsegpt_nm_prunes_exact_counts_per_group(nm):
  new_w, keep = ref.sparsegpt(kernel(128, 24), calibration(128), 0.5, nm, block_size=32)
  np.testing.assert_array_equal(nm_group_counts(keep, nm[1]), nm[0])
  np.testing.assert_array_equal(nm_group_counts(new_w, nm[1]), nm[0])


@pytest.mark.parametrize('block_size', [16, 64])
def test_reference_sparsegpt_on_orthogonal_inputs_is_blockwise_magnitude_pruning(block_size):
  # H is a multiple of I: every diag(U) is equal, so the score is w^2 up to a constant, and U has
  # no off-diagonal terms, so nothing is compensated.
  w, x = kernel(64, 16), orthogonal_inputs(64)
  new_w, keep = ref.sparsegpt(w, x, 0.5, block_size=block_size)
  for start in range(0, 64, block_size):
    block = np.abs(w[start:start + block_size]).astype(np.float64)
    want = block > np.sort(block.ravel())[int(block.size * 0.5) - 1]
    np.testing.assert_array_equal(keep[start:start + block_size], want)
  np.testing.assert_allclose(new_w, w * keep, rtol=0, atol=1e-12)

  new_w, keep = ref.sparsegpt(w, x, 0.5, (2, 4), block_size=block_size)
  np.testing.assert_array_equal(keep, ref.magnitude_mask(w, 0.5, (2, 4)))
  np.testing.assert_allclose(new_w, w * keep, rtol=0, atol=1e-12)


def test_reference_sparsegpt_nm_does_not_depend_on_the_block_size():
  # N:M groups are chosen one at a time on weights that hold every earlier update, whether these
  # arrived eagerly (same block) or lazily (earlier blocks): the lazy update must be exact.
  w, x = kernel(128, 24), calibration(128)
  want_w, want_keep = ref.sparsegpt(w, x, 0.5, (2, 4), block_size=128)
  for block_size in [8, 32]:
    new_w, keep = ref.sparsegpt(w, x, 0.5, (2, 4), block_size=block_size)
    np.testing.assert_array_equal(keep, want_keep)
    np.testing.assert_allclose(new_w, want_w, rtol=1e-10, atol=1e-12)


def test_reference_sparsegpt_pruning_a_prefix_is_the_least_squares_optimum():
  # When exactly the first p inputs are pruned, sequential OBS updates must land on the minimum
  # of (v - w)^T H (v - w) subject to v[:p] = 0 (H dampened), for every output.
  p, n_in = 8, 64
  w, x = kernel(n_in, 16).astype(np.float64), calibration(n_in).astype(np.float64)
  w = np.sign(w) * (0.5 + np.abs(w))
  w[:p] *= 1e-4  # Tiny: the only candidates at this sparsity.
  new_w, keep = ref.sparsegpt(w, x, p / n_in, block_size=n_in)
  assert not keep[:p].any() and keep[p:].all()
  h = 2 * x.T @ x
  h += 0.01 * np.mean(np.diag(h)) * np.eye(n_in)
  want = w[p:] + np.linalg.solve(h[p:, p:], h[p:, :p] @ w[:p])
  np.testing.assert_allclose(new_w[p:], want, rtol=1e-8, atol=1e-10)
  assert (new_w[:p] == 0).all()


def test_reference_sparsegpt_ignores_the_scale_of_the_hessian():
  w, x = kernel(64, 16), calibration(64).astype(np.float64)
  want_w, want_keep = ref.sparsegpt(w, x, 0.5, block_size=16)
  new_w, keep = ref.sparsegpt(w, x * np.sqrt(0.5), 0.5, block_size=16)  # H = X^T X, no factor 2.
  np.testing.assert_array_equal(keep, want_keep)
  np.testing.assert_allclose(new_w, want_w, rtol=1e-10, atol=1e-12)


def test_reference_sparsegpt_zeroes_dead_inputs():
  w, x = kernel(64, 16), calibration(64)
  x[:, [3, 40]] = 0
  new_w, keep = ref.sparsegpt(w, x, 0.5, block_size=32)
  assert np.isfinite(new_w).all()
  assert (new_w[[3, 40]] == 0).all() and not keep[[3, 40]].any()  # Score 0: pruned first.


@pytest.mark.parametrize('sparsity,nm', SPARSEGPT_CASES)
def test_reference_sparsegpt_reconstructs_better_than_magnitude_and_wanda(sparsity, nm):
  w, x = kernel(128, 32), calibration(128)
  new_w, _ = ref.sparsegpt(w, x, sparsity, nm, block_size=32)
  error = ref.reconstruction_error(w, new_w, x)
  assert error < ref.reconstruction_error(w, w * ref.wanda_mask(w, x, sparsity, nm), x)
  assert error < ref.reconstruction_error(w, w * ref.magnitude_mask(w, sparsity, nm), x)


def test_reference_reconstruction_error_is_the_squared_frobenius_norm():
  x, w = np.arange(6.0).reshape(3, 2), np.array([[1.0, 2.0], [3.0, 4.0]])
  v = np.array([[1.0, 0.0], [0.0, 4.0]])
  assert ref.reconstruction_error(w, v, x) == np.sum((x @ w - x @ v) ** 2)


# ---- compression.pruning / compression.sparsegpt against the references. ----


@pytest.mark.parametrize('sparsity,nm', WANDA_CASES)
def test_wanda_matches_reference(sparsity, nm):
  n_in, n_out = 128, 48
  w, x = kernel(n_in, n_out), calibration(n_in)
  want, margin = ref.wanda_mask(w, x, sparsity, nm, return_margin=True)
  assert margin > WANDA_MARGIN, f'test data too close to a tie ({margin:.1e}): change SEED'
  keep = np.asarray(calibrated().wanda_mask(jnp.asarray(w), sq_sums(x), sparsity, nm=nm))
  assert keep.shape == (n_in, n_out) and keep.dtype == bool
  np.testing.assert_array_equal(keep, want)
  kept = n_in - int(n_in * sparsity) if nm is None else n_in // nm[1] * nm[0]
  np.testing.assert_array_equal(keep.sum(axis=0), kept)


@pytest.mark.parametrize('sparsity,nm', SPARSEGPT_CASES)
def test_sparsegpt_matches_reference(sparsity, nm):
  # block_size < in: three of the four blocks receive lazy updates from earlier blocks.
  n_in, n_out, block_size = 128, 32, 32
  w, x = kernel(n_in, n_out), calibration(n_in)
  want_w, want_keep, margin = ref.sparsegpt(w, x, sparsity, nm, block_size, return_margin=True)
  assert margin > SPARSEGPT_MARGIN, f'test data too close to a tie ({margin:.1e}): change SEED'
  new_w, keep = calibrated().sparsegpt(jnp.asarray(w), hessian(x), sparsity, nm=nm,
                                       block_size=block_size, dampening=0.01)
  new_w, keep = np.asarray(new_w), np.asarray(keep)
  assert new_w.shape == keep.shape == (n_in, n_out) and keep.dtype == bool
  np.testing.assert_array_equal(keep, want_keep)
  np.testing.assert_allclose(new_w, want_w, rtol=1e-4, atol=1e-5)
  assert (new_w[~keep] == 0).all()


@pytest.mark.parametrize('sparsity,nm', SPARSEGPT_CASES)
def test_sparsegpt_reconstructs_better_than_magnitude_and_wanda(sparsity, nm):
  n_in, n_out = 128, 32
  w, x = kernel(n_in, n_out), calibration(n_in)
  lib = calibrated()
  new_w, _ = lib.sparsegpt(jnp.asarray(w), hessian(x), sparsity, nm=nm, block_size=32)
  wanda = np.asarray(lib.wanda_mask(jnp.asarray(w), sq_sums(x), sparsity, nm=nm))
  error = ref.reconstruction_error(w, np.asarray(new_w), x)
  assert error <= ref.reconstruction_error(w, w * wanda, x)
  assert error <= ref.reconstruction_error(w, w * ref.magnitude_mask(w, sparsity, nm), x)


@pytest.mark.parametrize('nm', [(2, 4), (4, 8)])
def test_nm_groups_along_inputs_hold_at_most_n_nonzeros(nm):
  n, m = nm
  w, x = kernel(128, 32), calibration(128)
  lib = calibrated()
  keep = np.asarray(lib.wanda_mask(jnp.asarray(w), sq_sums(x), 1 - n / m, nm=nm))
  assert (nm_group_counts(keep, m) <= n).all()
  new_w, sparse_keep = lib.sparsegpt(jnp.asarray(w), hessian(x), 1 - n / m, nm=nm, block_size=32)
  assert (nm_group_counts(new_w, m) <= n).all()
  assert (nm_group_counts(sparse_keep, m) <= n).all()


def test_sparsegpt_zeroes_dead_inputs():
  w, x = kernel(64, 16), calibration(64)
  x[:, [3, 40]] = 0
  new_w, _ = calibrated().sparsegpt(jnp.asarray(w), hessian(x), 0.5, block_size=32)
  new_w = np.asarray(new_w)
  assert np.isfinite(new_w).all()
  assert (new_w[[3, 40]] == 0).all()


# ---- MoE experts: each expert pruned from the tokens routed to it. ----

def moe_inputs(cfg, params, batches):
  """Per batch: the MoE layer's input [tokens, D] (float64) and the real-token flags."""
  import flax.linen as nn
  from models import Transformer, moe

  seen = []

  def capture(method, args, kwargs, context):
    if isinstance(context.module, moe.MoeMlp) and context.method_name == '__call__':
      seen.append(np.asarray(args[0], np.float64).reshape(-1, cfg.d_model))
    return method(*args, **kwargs)

  with nn.intercept_methods(capture):
    for b in batches:
      Transformer(cfg).apply({'params': params}, b['inputs'], positions=b['positions'],
                             segment_ids=b['segment_ids'])
  return np.concatenate(seen), np.concatenate([b['segment_ids'].reshape(-1) > 0 for b in batches])


@pytest.mark.parametrize('method', ['wanda', 'sparsegpt'])
def test_wanda_and_sparsegpt_prune_every_expert_from_its_routed_tokens(method):
  import jax
  import compression
  from models import ModelConfig, Transformer

  # Capacity dispatch with a tight capacity: calibration still sees every routed token.
  cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, d_ff=64, n_experts=4,
                    experts_per_token=2, moe_d_ff=48, moe_dispatch='capacity',
                    capacity_factor=1.0)
  params = init_params(cfg, seed=3)
  batches = lm_batches(64, 2, rows=4, length=24, padded_rows=1)   # padding is never counted
  _, mask_tree = compression.prune(params, method, 0.5, include=r'mlp/(up|gate|down)$',
                                   model=Transformer(cfg), batches=batches)
  pruned, _ = compression.prune(params, method, 0.5, include=r'mlp/(up|gate|down)$',
                                model=Transformer(cfg), batches=batches)

  x, real = moe_inputs(cfg, params, batches)
  mlp = jax.tree.map(lambda a: np.asarray(a, np.float64), params['blocks_0']['mlp'])
  logits = x @ mlp['router']['kernel']
  chosen = np.argsort(-logits, axis=1, kind='stable')[:, :cfg.experts_per_token]
  for e in range(cfg.n_experts):
    rows = x[(chosen == e).any(axis=1) & real]
    assert len(rows) > 20
    silu = lambda z: z / (1 + np.exp(-z))
    hidden = silu(rows @ mlp['gate'][e]) * (rows @ mlp['up'][e])
    for name, inputs in (('up', rows), ('gate', rows), ('down', hidden)):
      w = mlp[name][e]
      keep = np.asarray(mask_tree['blocks_0']['mlp'][name][e])
      if method == 'wanda':
        np.testing.assert_array_equal(keep, ref.wanda_mask(w, inputs, 0.5), err_msg=name)
      else:
        want_w, want_keep = ref.sparsegpt(w, inputs, 0.5)
        np.testing.assert_array_equal(keep, want_keep, err_msg=name)
        np.testing.assert_allclose(np.asarray(pruned['blocks_0']['mlp'][name][e]), want_w,
                                   rtol=1e-3, atol=1e-4, err_msg=name)
