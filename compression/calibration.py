"""Calibration statistics gathered from the model itself: what each kernel sees as input.

`input_statistics` runs the model on a few batches with a flax method interceptor on every
`Linear`, and sums, per kernel, each input feature's square (Wanda) and optionally the Gram
matrix X^T X (SparseGPT) over the non-padding tokens. `gradients` averages the loss gradient for
saliency scores. The model must be unrolled (`scan_layers=False`): under `nn.scan` a layer's
inputs exist only inside the loop.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from models.layers import Linear


def _check_unrolled(model) -> None:
  if model.config.scan_layers:
    raise ValueError('calibration needs the unrolled layout: use scan_layers=False '
                     '(models.unstack_layers converts the parameters)')


def input_statistics(model, params, batches, kernel_paths, gram: bool = False) -> dict:
  """{kernel path: {'sq': [in], 'gram': [in, in] (if asked), 'tokens': n}} summed over batches.

  Batches are dicts with 'inputs', 'positions', 'segment_ids' (0 marks padding).
  """
  _check_unrolled(model)
  wanted = set(kernel_paths)

  @jax.jit
  def one_batch(params, batch):
    found = {}

    def interceptor(method, args, kwargs, context):
      module = context.module
      path = '/'.join(module.path) + '/kernel'
      if isinstance(module, Linear) and context.method_name == '__call__' and path in wanted:
        x = args[0]
        n_in = math.prod(module.in_features)
        rows = x.reshape(-1, n_in).astype(jnp.float32) * real[:, None]
        stats = dict(sq=jnp.sum(jnp.square(rows), axis=0))
        if gram:
          stats['gram'] = jnp.matmul(rows.T, rows, precision=jax.lax.Precision.HIGHEST)
        found[path] = stats
      return method(*args, **kwargs)

    real = (batch['segment_ids'] > 0).reshape(-1).astype(jnp.float32)
    with nn.intercept_methods(interceptor):
      model.apply({'params': params}, batch['inputs'], positions=batch['positions'],
                  segment_ids=batch['segment_ids'])
    return found, jnp.sum(real)

  total, tokens = None, 0.0
  for batch in batches:
    found, n = one_batch(params, {k: batch[k] for k in ('inputs', 'positions', 'segment_ids')})
    total = found if total is None else jax.tree.map(jnp.add, total, found)
    tokens += float(n)
  missing = sorted(wanted - set(total or {}))
  if missing:
    raise ValueError(f'no inputs were seen for {missing[:3]}: calibration covers Linear kernels '
                     f'of the unrolled model only')
  return {p: dict(s, tokens=tokens) for p, s in total.items()}


def gradients(model, params, batches, loss_fn) -> dict:
  """The mean over batches of d loss_fn(params, model, batch) / d params."""
  grad = jax.jit(jax.grad(lambda p, b: loss_fn(p, model, b)))
  total, n = None, 0
  for batch in batches:
    g = grad(params, batch)
    total = g if total is None else jax.tree.map(jnp.add, total, g)
    n += 1
  return jax.tree.map(lambda x: x / n, total)
