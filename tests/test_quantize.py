"""Quantized weights (compression.qtensor) and post-training quantization (compression.quantize):
grids, packing, the integer execution against int64 NumPy, the CPU and accelerator formulations,
sharded and checkpointed integer trees, and one-line errors."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import sharding
from compression import grid, qtensor, quantize
from models import ModelConfig, Transformer, layouts
from tests.conftest import init_params, lm_batches

DENSE = ModelConfig(vocab_size=64, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128)
MOE = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=64, n_experts=4,
                  experts_per_token=2, moe_d_ff=32, moe_dispatch='capacity',
                  capacity_factor=2.0)
TOKENS = jnp.asarray(lm_batches(64, rows=4, length=8)[0]['inputs'])
GRIDS = [(8, 0, True), (8, 16, False), (4, 32, True), (4, 0, False), (3, 16, True),
         (2, 32, False), (8, -1, True)]


def dense_of(tree):
  return jax.tree.map(lambda x: qtensor.dequantize(x) if isinstance(x, qtensor.QTensor) else x,
                      tree, is_leaf=lambda x: isinstance(x, qtensor.QTensor))


@pytest.mark.parametrize('bits,group,symmetric', GRIDS)
def test_round_to_nearest_is_within_half_a_step(bits, group, symmetric):
  w = jax.random.normal(jax.random.key(bits), (64, 24)) * jnp.linspace(0.1, 3.0, 24)[None]
  layout = layouts.Layout(('embed', 'mlp'), 0, 1)
  t = qtensor.quantize(w, layout, bits, group, symmetric)
  q, scale, zero = qtensor.codes(t)
  lo, hi = grid.qrange(bits)
  assert int(q.min()) >= lo and int(q.max()) <= hi
  k = 64 // scale.shape[1]
  step = np.repeat(np.asarray(scale[0]), k, axis=0)
  err = np.abs(np.asarray(qtensor.dequantize(t)) - np.asarray(w))
  assert np.all(err <= step / 2 * (1 + 1e-5) + 1e-7)
  if symmetric:
    assert t.zero is None


@pytest.mark.parametrize('bits', [2, 3, 4])
def test_low_bits_pack_into_bytes_and_unpack_exactly(bits):
  n = qtensor.per_byte(bits)
  lo, hi = grid.qrange(bits)
  q = jnp.asarray(np.random.default_rng(bits).integers(lo, hi + 1, (8, 12, 3)), jnp.int8)
  for axis in (0, 1):
    p = qtensor.pack(q, axis, n)
    assert p.dtype == jnp.uint8 and p.shape[axis] * n == q.shape[axis]
    np.testing.assert_array_equal(qtensor.unpack(p, axis, n), q)
  every = jnp.tile(jnp.arange(lo, hi + 1, dtype=jnp.int8), n).reshape(-1, 1)
  np.testing.assert_array_equal(qtensor.unpack(qtensor.pack(every, 0, n), 0, n), every)


def test_integer_dot_equals_int64_numpy_and_lowers_to_an_s8_dot():
  rng = np.random.default_rng(1)
  a = rng.integers(-128, 128, (5, 512)).astype(np.int8)
  q = rng.integers(-128, 128, (7, 512)).astype(np.int8)   # stored [out, in]
  a[0], q[0] = -128, -128   # the largest products: 512 * 2^14 overflows int16, not int32
  for groups in (1, 4):
    k = 512 // groups
    want = np.stack([a[:, g * k:(g + 1) * k].astype(np.int64)
                     @ q[:, g * k:(g + 1) * k].T.astype(np.int64) for g in range(groups)])
    for backend in ('cpu', 'accelerator'):
      got = jax.jit(qtensor.integer_dot, static_argnums=(2, 3))(a, q, groups, backend)
      assert got.dtype == jnp.int32
      np.testing.assert_array_equal(np.asarray(got, np.int64), want)
  # A W8A8 layer runs its contraction as s8 x s8 -> s32 in the compiled program.
  w = jax.random.normal(jax.random.key(0), (512, 7))
  t = qtensor.quantize(w, layouts.Layout(('embed', 'mlp'), 0, 1), 8, act='dynamic')
  hlo = jax.jit(lambda x, t: qtensor.matmul(x, t, *[c[0] for c in qtensor.codes(t)], 'cpu')
                ).lower(jnp.ones((3, 512)), t).compile().as_text()
  assert s8_dots(hlo), 'no s8 x s8 -> s32 dot in the compiled program'


@pytest.mark.parametrize('symmetric', [True, False])
def test_int8_activations_times_grouped_int4_equal_an_int64_reference(symmetric):
  # W4A8 (torchao's 8da4w): per-token int8 activations, int4 weights with a scale (and zero
  # point) per group of 16 inputs; each group's product is exact in integers, then rescaled.
  w = jax.random.normal(jax.random.key(3), (64, 24))
  t = qtensor.quantize(w, layouts.Layout(('embed', 'mlp'), 0, 1), 4, 16, symmetric,
                       act='dynamic')
  q, scale, zero = (np.asarray(c[0]) for c in qtensor.codes(t))   # [O, I], [G, O], [G, O]
  zero = np.zeros_like(scale) if t.zero is None else zero.astype(np.float64)
  for m in (1, 5):
    x = np.asarray(jax.random.normal(jax.random.key(m), (m, 64)))
    s = np.abs(x).max(axis=1, keepdims=True).astype(np.float64) / 127.0
    a = np.clip(np.round(x / s), -127, 127).astype(np.int64)
    want = np.zeros((m, 24))
    for g in range(4):
      cols = slice(16 * g, 16 * (g + 1))
      acc = a[:, cols] @ q[:, cols].T.astype(np.int64)   # exact
      want += (acc - a[:, cols].sum(1, keepdims=True) * zero[g]) * scale[g] * s
    for backend in ('cpu', 'accelerator'):
      got = jax.jit(lambda x, t: qtensor.matmul(x, t, *[c[0] for c in qtensor.codes(t)],
                                                backend))(jnp.asarray(x), t)
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
  hlo = jax.jit(lambda x, t: qtensor.matmul(x, t, *[c[0] for c in qtensor.codes(t)], 'cpu')
                ).lower(jnp.ones((3, 64)), t).compile().as_text()
  assert s8_dots(hlo), 'no s8 x s8 -> s32 dot in the compiled W4A8 program'


def s8_dots(hlo: str) -> list:
  """The dots of a compiled HLO module whose result is s32 and whose operands are both s8."""
  types = dict(re.findall(r'(%[\w.-]+) = (\w+)\[', hlo))
  found = []
  for out, a, b in re.findall(r'(%[\w.-]+) = s32\[[^=]*? dot\((%[\w.-]+), (%[\w.-]+)\)', hlo):
    if types.get(a) == 's8' and types.get(b) == 's8':
      found.append(out)
  return found


@pytest.mark.parametrize('bits,group,symmetric,act', [g + (a,) for g in GRIDS
                                                       for a in ('none', 'dynamic')])
def test_cpu_and_accelerator_formulations_agree(bits, group, symmetric, act):
  w = jax.random.normal(jax.random.key(2), (64, 40))
  t = qtensor.quantize(w, layouts.Layout(('embed', 'mlp'), 0, 1), bits, group, symmetric,
                       act=act)
  codes = [c[0] for c in qtensor.codes(t)]
  for m in (1, 3, 40):   # decode rows (integer limbs on the CPU), and prefill rows
    x = jax.random.normal(jax.random.key(m), (m, 64))
    cpu = qtensor.matmul(x, t, *codes, 'cpu')
    acc = qtensor.matmul(x, t, *codes, 'accelerator')
    np.testing.assert_allclose(cpu, acc, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(acc))))
    if act == 'none':   # weight-only: the float product with the dequantized weight
      np.testing.assert_allclose(cpu, x @ qtensor.dequantize(t), rtol=1e-4,
                                 atol=1e-4 * float(jnp.max(jnp.abs(acc))))


@pytest.mark.parametrize('cfg', [DENSE, DENSE.replace(scan_layers=True), MOE],
                         ids=['dense', 'scanned', 'moe'])
def test_a_quantized_model_runs_as_its_dequantized_weights(cfg):
  model = Transformer(cfg)
  params = init_params(cfg)
  q = quantize.quantize(params, 'rtn', 4, group_size=16, symmetric=False, model=model)
  assert q['embed']['embedding'] is params['embed']['embedding']   # tables left out by default
  stacked = 'blocks' in q
  up = q['blocks' if stacked else 'blocks_0']['mlp']['up']
  up = up if isinstance(up, qtensor.QTensor) else up['kernel']
  assert isinstance(up, qtensor.QTensor) and up.values.dtype == jnp.uint8 and up.per_byte == 2
  apply = lambda p, t: model.apply({'params': p}, t)
  dense = jax.jit(apply)
  # Decode-sized rows run as integer limbs on the CPU, prefill-sized ones dequantize. (A new
  # jitted function per case: the formulation is chosen when tracing.)
  for kind, tokens in (('cpu', TOKENS[:1, :4]), ('cpu', TOKENS), ('accelerator', TOKENS[:1, :4])):
    with qtensor.execution(kind):
      got = jax.jit(apply)(q, tokens)
    np.testing.assert_allclose(got, dense(dense_of(q), tokens), rtol=2e-4, atol=2e-4)


def test_int8_is_close_to_float_and_a_quarter_of_its_bytes():
  model = Transformer(DENSE)
  params = init_params(DENSE)
  q = quantize.quantize(params, 'rtn', 8, model=model)
  ref = model.apply({'params': params}, TOKENS)
  got = model.apply({'params': q}, TOKENS)
  assert float(jnp.max(jnp.abs(got - ref))) < 0.02 * float(jnp.max(jnp.abs(ref)))
  kernels = [p for p, x in quantize.paths.flatten(q).items() if isinstance(x, qtensor.QTensor)]
  flat = quantize.paths.flatten(params)
  before = sum(flat[p].nbytes for p in kernels)
  after = sum(quantize.paths.flatten(q)[p].nbytes() for p in kernels)
  assert 0.25 < after / before < 0.27   # int8 plus one float scale per output channel
  q4 = quantize.quantize(params, 'rtn', 4, group_size=32, model=model)
  after4 = sum(quantize.paths.flatten(q4)[p].nbytes() for p in kernels)
  assert 0.125 < after4 / before < 0.16   # packed nibbles plus a scale per 32 inputs


def test_gptq_through_the_model_beats_round_to_nearest_on_calibration_loss():
  cfg = DENSE
  model = Transformer(cfg)
  params = init_params(cfg)
  batches = [jax.tree.map(jnp.asarray, b) for b in lm_batches(64, n=2, rows=8, length=16)]
  ref = [model.apply({'params': params}, b['inputs']) for b in batches]

  def error(tree):
    return sum(float(jnp.mean(jnp.square(model.apply({'params': tree}, b['inputs']) - r)))
               for b, r in zip(batches, ref))

  rtn = quantize.quantize(params, 'rtn', 3, group_size=16, model=model)
  gptq = quantize.quantize(params, 'gptq', 3, group_size=16, model=model, batches=batches)
  assert error(gptq) < 0.8 * error(rtn)
  assert jax.tree.structure(gptq) == jax.tree.structure(rtn)


def test_static_w8a8_calibrates_one_activation_scale_per_layer():
  model = Transformer(DENSE)
  params = init_params(DENSE)
  batches = [jax.tree.map(jnp.asarray, b) for b in lm_batches(64, n=1)]
  q = quantize.quantize(params, 'rtn', 8, act='static', model=model, batches=batches)
  leaf = q['blocks_0']['mlp']['down']['kernel']
  assert leaf.act == 'static' and leaf.act_scale.shape == () and float(leaf.act_scale) > 0
  ref = model.apply({'params': params}, TOKENS)
  got = model.apply({'params': q}, TOKENS)
  assert float(jnp.max(jnp.abs(got - ref))) < 0.05 * float(jnp.max(jnp.abs(ref)))


def test_quantized_trees_shard_on_eight_devices_and_restore_onto_another_mesh(tmp_path):
  cfg = DENSE
  model = Transformer(cfg)
  params = init_params(cfg)
  fn = lambda p: quantize.quantize(p, 'rtn', 4, group_size=16, symmetric=False, model=model)
  abstract = jax.eval_shape(fn, params)
  names = layouts.logical_names(model)
  one = jax.jit(lambda p: model.apply({'params': p}, TOKENS[:, :4]))(fn(params))
  mesh_a = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
  saved = jax.jit(fn, out_shardings=sharding.tree_shardings(abstract, mesh_a, 'fsdp_tp',
                                                             names))(params)
  with sharding.activation_rules(mesh_a, 'fsdp_tp'):
    many = jax.jit(lambda p, t: model.apply({'params': p}, t))(
        saved, sharding.global_batch(TOKENS[:, :4], mesh_a, 'fsdp_tp'))
  np.testing.assert_allclose(many, one, rtol=2e-5, atol=2e-5)
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(tmp_path / 'q', saved)
  mesh_b = sharding.make_mesh(dict(fsdp=8))
  target_sh = sharding.tree_shardings(abstract, mesh_b, 'fsdp', names)
  target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        abstract, target_sh)
  with ocp.StandardCheckpointer() as ckpt:
    restored = ckpt.restore(tmp_path / 'q', target)
  for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(restored)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with ocp.StandardCheckpointer() as ckpt:   # integers on disk, not upcast
    stored = ckpt.metadata(tmp_path / 'q')
  stored = getattr(stored, 'item_metadata', stored)
  up = stored['blocks_0']['mlp']['up']['kernel']
  assert str(up['values'].dtype) == 'uint8' and str(up['zero'].dtype) == 'int8'


@pytest.mark.parametrize('kwargs,message', [
    (dict(bits=5), 'bits=5 is not one of 2, 3, 4, 8'),
    (dict(bits=4, group_size=48), 'group_size=48 does not divide the 64 inputs'),
    (dict(method='hqq'), "unknown quantization method 'hqq'"),
    (dict(include='nothing_here'), "include='nothing_here'.*matches no weight"),
    (dict(act='sometimes'), "act='sometimes' is not one of"),
    (dict(clip='p99'), "clip='p99' is not one of"),
    (dict(include='embed', exclude=None, act='dynamic'), 'W8A8 cannot run an embedding'),
    (dict(method='gptq'), 'needs the model and calibration batches'),
])
def test_bad_input_is_one_clear_line(kwargs, message):
  params = init_params(DENSE)
  kwargs = dict(dict(method='rtn', bits=8), **kwargs)
  with pytest.raises(ValueError, match=message) as e:
    quantize.quantize(params, kwargs.pop('method'), kwargs.pop('bits'),
                      model=Transformer(DENSE), **kwargs)
  assert '\n' not in str(e.value)


def test_w8a8_refuses_dropless_experts():
  cfg = MOE.replace(moe_dispatch='dropless')
  with pytest.raises(ValueError, match="W8A8 experts run with moe_dispatch=capacity"):
    quantize.quantize(init_params(cfg), 'rtn', 8, act='dynamic', model=Transformer(cfg))
