"""Mixed-precision quantization (compression/mixed.py): the knapsack against brute force, real
stored bytes, measured sensitivity, and mixed against uniform widths on a tiny model."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compression import mixed, paths, qtensor, quantize
from models import ModelConfig, Transformer, layouts
from tests.conftest import init_params, lm_batches

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=48)
MODEL = Transformer(CFG)
DOWN = 'blocks_0/mlp/down/kernel'


# ---- the allocator on hand-made tables

def table(seed, n_layers=4):
  """Sensitivities falling with bits (noisy, one negative) and sizes with distinct steps."""
  rng = np.random.default_rng(seed)
  sens, sizes = {}, {}
  for i in range(n_layers):
    p = f'layer_{i}'
    base = rng.uniform(0.5, 5.0)
    sens[p] = {b: base * 2.0 ** -b + rng.uniform(-0.01, 0.01) for b in (2, 3, 4, 8)}
    unit = int(rng.integers(3, 40))
    sizes[p] = {2: 7 * unit + 5, 3: 9 * unit + 5, 4: 11 * unit + 5, 8: 19 * unit + 5}
  sens['layer_0'][8] = -0.002
  return sens, sizes


def brute_force(sens, sizes, budget):
  """(least summed sensitivity, its assignment) over every assignment within the budget."""
  names = sorted(sens)
  best = (np.inf, None)
  for combo in itertools.product(*(sorted(sens[p]) for p in names)):
    if sum(sizes[p][b] for p, b in zip(names, combo)) <= budget:
      loss = sum(sens[p][b] for p, b in zip(names, combo))
      if loss < best[0]:
        best = (loss, dict(zip(names, combo)))
  return best


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_allocate_equals_brute_force_and_more_budget_never_predicts_more_loss(seed):
  sens, sizes = table(seed)
  low, high = mixed.uniform_budget(sizes, 2), mixed.uniform_budget(sizes, 8)
  previous = np.inf
  for budget in np.linspace(low, high + 10, 12).astype(int):
    bits = mixed.allocate(sens, sizes, budget)
    want_loss, want = brute_force(sens, sizes, budget)
    assert mixed.total_bytes(sizes, bits) <= budget
    assert bits == want
    assert mixed.predicted_loss(sens, bits) == pytest.approx(want_loss, abs=1e-12)
    assert mixed.predicted_loss(sens, bits) <= previous + 1e-12
    previous = mixed.predicted_loss(sens, bits)


def test_allocate_on_a_coarse_grid_keeps_the_budget_and_stays_near_the_optimum():
  sens, sizes = table(3, n_layers=5)
  for budget in (mixed.uniform_budget(sizes, 4) + 37, mixed.uniform_budget(sizes, 4) + 400):
    exact_loss, _ = brute_force(sens, sizes, budget)
    bits = mixed.allocate(sens, sizes, budget, max_cells=8)
    assert mixed.total_bytes(sizes, bits) <= budget
    assert exact_loss - 1e-12 <= mixed.predicted_loss(sens, bits)
    # Optimal for sizes rounded up to the grid: never worse than with a budget one unit per
    # weight smaller (the unit here is at most the range / 8).
    span = sum(max(s.values()) - min(s.values()) for s in sizes.values())
    slack = 5 * -(-span // 8)
    assert mixed.predicted_loss(sens, bits) <= brute_force(sens, sizes, budget - slack)[0] + 1e-12


def test_allocate_rejects_a_budget_below_the_smallest_storage_and_foreign_widths():
  sens, sizes = table(0)
  low = sum(min(s.values()) for s in sizes.values())
  assert mixed.allocate(sens, sizes, low) == {p: 2 for p in sens}
  with pytest.raises(ValueError, match=f'budget_bytes={low - 1} is below {low}') as e:
    mixed.allocate(sens, sizes, low - 1)
  assert '\n' not in str(e.value)
  bad = {p: {**t, 5: 0.0} for p, t in sens.items()}
  with pytest.raises(ValueError, match=r'bits=5 is not one of 2, 3, 4, 8'):
    mixed.allocate(bad, sizes, 10 ** 6)
  with pytest.raises(ValueError, match='layer_0 has a sensitivity at bits=2 but no size'):
    mixed.allocate(sens, {p: {8: 1} for p in sizes}, 10 ** 6)


# ---- a tiny model

@jax.jit
def logits(params, batch):
  return MODEL.apply({'params': params}, batch['inputs'], positions=batch['positions'],
                     segment_ids=batch['segment_ids']).astype(jnp.float32)


def kl_loss(params, batch):
  """Mean KL(float model || params) per token: 0 for the float model, so every sensitivity is a
  quantization effect, not noise of a random model's cross-entropy. Written in the logit change
  d, KL = log E_p[e^d] - E_p[d], with expm1/log1p: no cancellation of two large log-probs."""
  d_BxLxV = logits(params, batch) - batch['teacher']
  p_BxLxV = jax.nn.softmax(batch['teacher'])
  per_token = (jnp.log1p(jnp.sum(p_BxLxV * jnp.expm1(d_BxLxV), axis=-1))
               - jnp.sum(p_BxLxV * d_BxLxV, axis=-1))
  return jnp.sum(per_token * batch['weights']) / jnp.sum(batch['weights'])


def calibration(params):
  out = []
  for b in lm_batches(CFG.vocab_size, 2, rows=4, length=16, seed=3):
    b = jax.tree.map(jnp.asarray, b)
    out.append(dict(b, teacher=logits(params, b)))
  return out


KL_LOSS = jax.jit(kl_loss)


def mean_loss(params, batches):
  return float(np.mean([float(KL_LOSS(params, b)) for b in batches]))


def scaled(params, path, factor):
  flat = paths.flatten(params)
  return paths.unflatten(dict(flat, **{path: flat[path] * factor}))


@pytest.fixture(scope='module')
def measured():
  """(params, batches, sensitivity, traces of the loss) for the tiny model."""
  params = init_params(CFG)
  batches = calibration(params)
  traces = []

  def counted(p, b):
    traces.append(1)
    return kl_loss(p, b)

  return params, batches, mixed.sensitivity(params, MODEL, batches, counted), len(traces)


def test_sensitivity_compiles_the_loss_once_and_falls_with_more_bits(measured):
  params, _, sens, traces = measured
  assert traces == 1   # one trace for 7 weights x 4 widths + the float model
  assert sorted(sens) == [f'blocks_0/{p}/kernel' for p in ('attn/key', 'attn/out', 'attn/query',
                                                             'attn/value', 'mlp/down', 'mlp/gate',
                                                             'mlp/up')]
  for p, s in sens.items():
    assert s[2] > s[3] > s[4] > s[8] > -1e-12, p
    assert s[8] < 1e-3 * s[2], p


def test_sensitivity_is_the_loss_of_the_model_with_only_that_weight_quantized(measured):
  params, batches, sens, _ = measured
  with qtensor.execution('accelerator'):   # the dequantized weight in a float dot, as measured
    one = mixed.quantize_mixed(params, {DOWN: 3}, model=MODEL)
    assert mean_loss(one, batches) - mean_loss(params, batches) == pytest.approx(
        sens[DOWN][3], rel=1e-3, abs=1e-8)


def test_sensitivity_through_quantize_with_searched_clipping(measured):
  # Options the direct RTN path does not take go through `quantize.quantize` for the one weight:
  # the clip searched for least output error on the calibration inputs (min/max among the
  # candidates) loses less than min/max rounding.
  params, batches, sens, _ = measured
  mse = mixed.sensitivity(params, MODEL, batches, kl_loss, (2,), include=DOWN, clip='mse')
  assert list(mse) == [DOWN] and 0 < mse[DOWN][2] < 0.9 * sens[DOWN][2]


def test_a_scaled_up_weight_dominates_the_sensitivity(measured):
  params, _, sens, _ = measured
  # The MLP output grows 16x against the attention's in the residual stream: its weights'
  # errors now matter more than the attention's, which mattered most before.
  loud = scaled(params, DOWN, 16.0)
  after = mixed.sensitivity(loud, MODEL, calibration(loud), kl_loss, (2, 8), include='blocks_0')
  attention = [p for p in sens if '/attn/' in p]
  assert sens[DOWN][2] < 0.1 * max(sens[p][2] for p in attention)
  assert after[DOWN][2] > 2 * max(after[p][2] for p in attention)
  assert after[DOWN][2] > 100 * sens[DOWN][2]
  assert after[DOWN][2] > 1000 * after[DOWN][8]


def test_allocated_bytes_are_the_stored_bytes_of_the_mixed_tree(measured):
  # Groups and zero points here; per-channel symmetric grids in the test below.
  params, group_size, symmetric = measured[0], 16, False
  chosen = paths.select(params, layouts.of_config(CFG), include='attn/(out|value)|mlp/(up|down)')
  bits = dict(zip(chosen, (2, 3, 4, 8)))
  sizes = mixed.layer_bytes(params, chosen, group_size=group_size, symmetric=symmetric,
                            model=MODEL)
  tree = mixed.quantize_mixed(params, bits, group_size=group_size, symmetric=symmetric,
                              model=MODEL)
  flat = paths.flatten(tree)
  for p, b in bits.items():
    assert isinstance(flat[p], qtensor.QTensor) and flat[p].bits == b
    assert flat[p].group_size == group_size and (flat[p].zero is None) == symmetric
    assert flat[p].nbytes() == sizes[p][b], p
  untouched = {p: v for p, v in flat.items() if p not in bits}
  assert not any(isinstance(v, qtensor.QTensor) for v in untouched.values())
  assert mixed.total_bytes(sizes, bits) == (quantize.weight_bytes(tree)
                                            - quantize.weight_bytes(untouched))
  assert sizes[chosen[0]][2] < sizes[chosen[0]][3] == sizes[chosen[0]][4] < sizes[chosen[0]][8]


def test_mixed_bits_beat_uniform_bits_at_the_same_bytes(measured):
  params, batches, sens, _ = measured
  sizes = mixed.layer_bytes(params, sens, model=MODEL)
  uniform3 = {p: 3 for p in sens}
  mixed3 = mixed.allocate(sens, sizes, mixed.uniform_budget(sizes, 3))
  assert mixed.total_bytes(sizes, mixed3) <= mixed.uniform_budget(sizes, 3)

  def real(bits):   # the quantized model's loss, through float dots of its dequantized weights
    tree = mixed.quantize_mixed(params, bits, model=MODEL)
    flat = paths.flatten(tree)
    assert all(flat[p].bits == b and flat[p].nbytes() == sizes[p][b] for p, b in bits.items())
    is_q = lambda x: isinstance(x, qtensor.QTensor)
    return mean_loss(jax.tree.map(lambda x: qtensor.dequantize(x) if is_q(x) else x, tree,
                                  is_leaf=is_q), batches)

  assert real(mixed3) <= real(uniform3)
  # Between uniform 4 and 8 bits the most sensitive weights get 8 bits (paid for by others at 2
  # bits, a quarter byte); the real loss follows the additive prediction.
  budget = (mixed.uniform_budget(sizes, 4) + mixed.uniform_budget(sizes, 8)) // 2
  middle = mixed.allocate(sens, sizes, budget)
  assert middle['blocks_0/attn/out/kernel'] == middle['blocks_0/attn/value/kernel'] == 8
  uniform4 = {p: 4 for p in sens}
  got = {name: real(bits) for name, bits in (('middle', middle), ('uniform4', uniform4))}
  assert got['middle'] < 0.2 * got['uniform4']
  assert got['middle'] == pytest.approx(mixed.predicted_loss(sens, middle), rel=0.2)
  assert got['uniform4'] == pytest.approx(mixed.predicted_loss(sens, uniform4), rel=0.2)


def test_bad_inputs_are_one_line_value_errors(measured):
  params, batches, _, _ = measured
  for call, match in [
      (lambda: mixed.sensitivity(params, MODEL, batches, kl_loss, (4, 5)),
       r'bits=5 is not one of 2, 3, 4, 8'),
      (lambda: mixed.sensitivity(params, MODEL, [], kl_loss), 'at least one calibration batch'),
      (lambda: mixed.layer_bytes(params, ['embed/nope'], model=MODEL), "'embed/nope' is not a"),
      (lambda: mixed.quantize_mixed(params, {DOWN: 6}, model=MODEL), 'bits=6 is not one of'),
      (lambda: mixed.layer_bytes(params, [DOWN], group_size=5, model=MODEL),
       'group_size=5 does not divide the 48 inputs'),
  ]:
    with pytest.raises(ValueError, match=match) as e:
      call()
    assert '\n' not in str(e.value)
