"""Structural pruning (compression/structural.py): units removed for real along their logical
axes equal the masked full model; importance by norms and by gradients; layers and experts."""

import jax
import numpy as np
import pytest

import compression
from compression import structural
from experiments import steps
from models import ModelConfig, Transformer
from tests.conftest import init_params, lm_batches

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48)
TOKENS = jax.random.randint(jax.random.key(1), (4, 16), 0, 64)


def init(cfg=CFG):
  return Transformer(cfg), init_params(cfg)


def loss_fn(p, model, b):
  return steps.lm_loss(model)(p, b)[0]


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
    assert (new_cfg.n_heads, new_cfg.n_kv_heads) == (2, 1)


def test_taylor_importance_uses_gradients():
  model, params = init()
  with pytest.raises(ValueError, match='taylor importance needs gradients'):
    structural.ffn_neurons(CFG, params, 0.5, 'taylor')
  grads = compression.calibration.gradients(model, params, lm_batches(64, 2, rows=4), loss_fn)
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
