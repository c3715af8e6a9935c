"""Hand-written gradients and training-speed rewrites equal what autodiff of the plain math gives.

The weight contraction (`layers.dot`), RMS normalisation (`layers.rms_scale`), rotary embedding
and attention were rewritten for speed on CPU (experiments/compare.py measures it); these tests
hold them to the straightforward formulations, and check that remat policies still save every
weight contraction despite the custom gradient hiding it.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from models import ModelConfig, Transformer, attention, layers
from tests.conftest import init_params, lm_batches


def _grads(f, *args):
  return jax.grad(lambda *a: jnp.sum(jnp.sin(f(*a))), argnums=tuple(range(len(args))))(*args)


@pytest.mark.parametrize('x_shape,w_shape,n_contract,transpose_w', [
    ((2, 5, 8), (8, 24), 1, False),        # narrow input: x is transposed for the weight grad
    ((2, 5, 24), (24, 8), 1, False),       # wide input: the output gradient is
    ((2, 5, 8), (8, 3, 4), 1, False),      # into heads
    ((2, 5, 3, 4), (3, 4, 8), 2, False),   # out of heads
    ((2, 5, 8), (16, 8), 1, True),         # tied output head
])
def test_weight_dot_gradients_equal_autodiff(x_shape, w_shape, n_contract, transpose_w):
  x = jax.random.normal(jax.random.key(0), x_shape)
  w = jax.random.normal(jax.random.key(1), w_shape)
  x_dims = tuple(range(len(x_shape) - n_contract, len(x_shape)))
  w_dims = (tuple(range(len(w_shape) - n_contract, len(w_shape))) if transpose_w
            else tuple(range(n_contract)))
  ours = _grads(lambda x, w: layers.dot(x, w, n_contract, jnp.float32, transpose_w), x, w)
  plain = _grads(lambda x, w: lax.dot_general(x, w, ((x_dims, w_dims), ((), ()))), x, w)
  for a, b in zip(ours, plain):
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_weight_dot_gradient_keeps_input_dtypes():
  x = jnp.ones((2, 3, 4), jnp.bfloat16)
  w = jnp.ones((4, 5), jnp.float32)
  gx, gw = _grads(lambda x, w: layers.dot(x, w, 1, jnp.bfloat16), x, w)
  assert gx.dtype == jnp.bfloat16 and gw.dtype == jnp.float32


def test_rms_scale_gradients_equal_autodiff():
  x = 3 * jax.random.normal(jax.random.key(0), (2, 5, 16))
  scale = jax.random.normal(jax.random.key(1), (16,))
  plain = lambda x, s: x * lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6) * s[None, None]
  np.testing.assert_allclose(layers.rms_scale(x, scale, 1e-6), plain(x, scale), rtol=1e-6)
  for a, b in zip(_grads(lambda x, s: layers.rms_scale(x, s, 1e-6), x, scale),
                  _grads(plain, x, scale)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_rope_equals_rotate_half_reference():
  x = np.asarray(jax.random.normal(jax.random.key(0), (2, 7, 3, 8)))
  pos = np.asarray(jax.random.randint(jax.random.key(1), (2, 7), 0, 500))
  inv_freq = 1.0 / (1e4 ** (np.arange(0, 8, 2) / 8))
  angle = pos[..., None] * inv_freq                             # [B, L, 4]
  cos = np.concatenate([np.cos(angle)] * 2, -1)[:, :, None]
  sin = np.concatenate([np.sin(angle)] * 2, -1)[:, :, None]
  rotated = np.concatenate([-x[..., 4:], x[..., :4]], -1)
  np.testing.assert_allclose(attention.rope(jnp.asarray(x), jnp.asarray(pos), 1e4),
                             x * cos + rotated * sin, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('n_heads,n_kv_heads,window,packed,length', [
    (4, 4, None, False, 16), (4, 2, None, True, 16), (4, 1, 5, False, 15), (2, 2, 3, True, 9)])
def test_chunked_causal_attention_and_its_gradients_equal_one_full_softmax(
    n_heads, n_kv_heads, window, packed, length):
  keys = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(keys[0], (2, length, n_heads, 8))
  k = jax.random.normal(keys[1], (2, length, n_kv_heads, 8))
  v = jax.random.normal(keys[2], (2, length, n_kv_heads, 8))
  seg = None
  if packed:
    seg = jnp.asarray(np.repeat([[1, 2]], 2, 0).repeat([length // 2, length - length // 2], 1))
  mask = attention.chunk_mask(attention.Geometry(None, seg), length, window)
  reference = lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, mask=mask, is_causal=True, implementation='xla',
      local_window_size=None if window is None else (window - 1, 0))
  for chunks in (1, 2, 3):
    ours = lambda q, k, v: attention.attend_causal(q, k, v, mask, chunks)
    np.testing.assert_allclose(ours(q, k, v), reference(q, k, v), rtol=1e-5, atol=1e-5)
    for a, b in zip(_grads(ours, q, k, v), _grads(reference, q, k, v)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def _dots_in_train_step(remat: str) -> int:
  cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, d_ff=64, remat=remat)
  model = Transformer(cfg)
  params = init_params(cfg)
  batch = lm_batches(64, rows=2, length=8)[0]
  loss = lambda p: jnp.sum(model.apply({'params': p}, batch['inputs']))
  text = jax.jit(jax.value_and_grad(loss)).lower(params).as_text()
  return len(re.findall(r'stablehlo\.dot_general', text))


def test_remat_dots_policies_recompute_no_weight_contraction():
  plain = _dots_in_train_step('none')
  assert _dots_in_train_step('dots') == plain
  # Attention's dots have batch dims: 'dots_no_batch' recomputes those, and 'full' everything.
  no_batch = _dots_in_train_step('dots_no_batch')
  assert plain < no_batch < _dots_in_train_step('full')
