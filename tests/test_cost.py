"""The cost model against shape arithmetic and an independent count of zeros."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compression import cost, paths, qtensor, quantize
from models import ModelConfig, Transformer, flops

DENSE = ModelConfig(vocab_size=64, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=64,
                    max_len=32)
MOE = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                  max_len=32, n_experts=4, experts_per_token=2, moe_d_ff=16)


def init(cfg):
  model = Transformer(cfg)
  return nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))['params'])


def test_bytes_by_storage_type_of_float_quantized_and_masked_trees():
  params = init(DENSE)
  n = sum(x.size for x in jax.tree.leaves(params))
  assert cost.storage_bytes(params) == {'float32': 4 * n}
  half = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  assert cost.storage_bytes(half) == {'bfloat16': 2 * n}

  for bits, kind, per_byte in ((8, 'int8', 1), (4, 'int4', 2), (3, 'int3', 2), (2, 'int2', 4)):
    q = quantize.quantize(params, 'rtn', bits, group_size=16, model=Transformer(DENSE))
    quantized = {p: x for p, x in paths.flatten(q).items() if isinstance(x, qtensor.QTensor)}
    assert quantized
    ints = sum(cost.size(x) // per_byte for x in quantized.values())
    # One float32 scale per group of 16 inputs and per output (symmetric: no zero points).
    scales = sum(4 * cost.size(x) // 16 for x in quantized.values())
    rest = sum(x.size for p, x in paths.flatten(q).items() if p not in quantized)
    assert cost.storage_bytes(q) == {'float32': 4 * rest, kind: ints, 'scales': scales}

  masks = {'a': np.ones((4, 5), bool), 'b': np.zeros((9,), bool)}
  assert cost.storage_bytes(params, masks)['mask'] == 3 + 2     # 20 and 9 bits, in bytes


def test_an_integer_parameter_is_one_clear_error():
  with pytest.raises(ValueError, match='dtype int32 has no storage type'):
    cost.storage_bytes({'w': np.zeros((2, 2), np.int32)})


def test_zeros_are_counted_in_float_and_quantized_weights():
  params = init(DENSE)
  flat = paths.flatten(params)
  path = 'blocks_1/mlp/up/kernel'
  w = np.asarray(flat[path]).copy()
  w.reshape(-1)[::3] = 0                                     # a third of the weight pruned
  flat[path] = jnp.asarray(w)
  pruned = paths.unflatten(flat)
  n = sum(x.size for x in jax.tree.leaves(params))
  assert cost.counts(pruned) == dict(params=n, nonzero=n - w.size // 3 - (w.size % 3 > 0))
  for symmetric in (True, False):
    q = quantize.quantize(pruned, 'rtn', 4, group_size=16, symmetric=symmetric,
                          model=Transformer(DENSE))
    for x in paths.flatten(q).values():
      if isinstance(x, qtensor.QTensor):
        # Independent oracle: entries whose dequantized value is exactly zero.
        assert cost.zeros(x) == int(np.sum(np.asarray(qtensor.dequantize(x)) == 0))
    assert cost.counts(q)['params'] == n


def test_flops_dense_active_effective_and_expected():
  seq = 16
  f = cost.flops_per_token(DENSE, seq_len=seq)
  assert f['dense'] == f['active'] == flops.train_flops_per_token(DENSE, seq) / 3

  params = init(DENSE)
  flat = paths.flatten(params)
  flat['blocks_0/attn/query/kernel'] = jnp.zeros_like(flat['blocks_0/attn/query/kernel'])
  zeroed = flat['blocks_0/attn/query/kernel'].size
  f = cost.flops_per_token(DENSE, paths.unflatten(flat), seq_len=seq)
  assert f['effective'] == f['active'] - 2 * zeroed

  # Early exit: every layer used is the full model; one layer is its share plus the head.
  head = 2 * DENSE.d_model * DENSE.vocab_size
  full = cost.flops_per_token(DENSE, seq_len=seq, mean_layers=3)
  assert full['expected'] == pytest.approx(full['active'])
  one = cost.flops_per_token(DENSE, seq_len=seq, mean_layers=1)
  assert one['expected'] == pytest.approx(head + (one['active'] - head) / 3)
  with pytest.raises(ValueError, match='mean_layers=4 must be in'):
    cost.flops_per_token(DENSE, mean_layers=4)


def test_moe_flops_count_all_experts_as_dense_and_k_as_active():
  f = cost.flops_per_token(MOE, seq_len=16)
  per_expert = 3 * MOE.d_model * MOE.moe_d_ff                     # swiglu: gate, up, down
  idle = MOE.n_experts - MOE.experts_per_token
  assert f['dense'] - f['active'] == 2 * idle * per_expert * MOE.n_layers
  # A zero expert weight saves its FLOPs at the share of tokens that reach an expert.
  params = init(MOE)
  flat = paths.flatten(params)
  experts = [p for p in flat if p.endswith('mlp/up') or p.endswith('mlp/up/kernel')]
  assert experts, sorted(flat)
  flat[experts[0]] = jnp.zeros_like(flat[experts[0]])
  f = cost.flops_per_token(MOE, paths.unflatten(flat), seq_len=16)
  share = MOE.experts_per_token / MOE.n_experts
  assert f['effective'] == pytest.approx(f['active'] - 2 * share * flat[experts[0]].size)


def test_price_per_million_tokens():
  m = cost.Measured(device='cpu', decode_tokens_per_s=1000.0)
  assert m.price_per_million_tokens(3.6) == pytest.approx(1.0)   # $3.6/h, 1000 tokens/s
  with pytest.raises(ValueError, match='no forward tokens/s measured on cpu'):
    m.price_per_million_tokens(3.6, decode=False)


def test_pareto_front_of_a_hand_example():
  points = [dict(name='dense', bytes=100, loss=1.0), dict(name='int8', bytes=25, loss=1.01),
            dict(name='int4', bytes=13, loss=1.10), dict(name='bad', bytes=30, loss=1.2),
            dict(name='pruned', bytes=60, loss=1.05), dict(name='int2', bytes=7, loss=2.0)]
  front = cost.pareto_front(points, 'bytes', 'loss')
  assert [p['name'] for p in front] == ['int2', 'int4', 'int8', 'dense']
