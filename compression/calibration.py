"""Calibration statistics, observed at the compression seam: what every weight sees as input.

`input_statistics` runs the model on a few batches with each wanted weight replaced by an
`Observed` leaf. Its seam rule (`models.seam`) records the contraction's inputs and then runs
the plain contraction, so statistics exist for every weight the model multiplies by, wherever
it sits: per input feature the sum of squares (Wanda) and optionally the Gram matrix X^T X
(SparseGPT, GPTQ), the largest |x| (SmoothQuant, static activation scales) and the sum of |x|
(AWQ's mean |x|), over the non-padding tokens, and for MoE experts the same per expert, over
the tokens routed to it. `gradients` averages the loss gradient for saliency scores.

The model must be unrolled (`scan_layers=False`): under `nn.scan` one traced layer stands for
all of them. MoE layers are observed through the dropless dispatch, so each expert sees every
token routed to it (none dropped by a capacity limit).
"""

import contextlib
import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax

from models import seam

_HIGHEST = lax.Precision.HIGHEST


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Observed(seam.Leaf):
  """A weight whose contractions report their inputs to the active `recording`."""
  w: jax.Array
  path: str = dataclasses.field(metadata=dict(static=True))

  @property
  def shape(self):
    return tuple(self.w.shape)

  def logical_axes(self):
    raise TypeError('Observed weights exist only while calibrating')


def merge(a: dict, b: dict) -> dict:
  """The statistics of two sets of tokens: 'absmax' is a maximum, everything else a sum."""
  return {k: jnp.maximum(a[k], b[k]) if k == 'absmax' else a[k] + b[k] for k in a}


class _Recording:
  """Statistics of one traced forward pass: {path: {'sq', 'tokens', ...}} in execution order."""

  def __init__(self, real_M, gram: bool, absmax: bool = False, abssum: bool = False):
    self.real_M, self.gram, self.stats = real_M, gram, {}
    self.absmax, self.abssum = absmax, abssum

  def add(self, path: str, stats: dict) -> None:
    if path in self.stats:   # a weight used twice (a tied table, a reused block): both uses count
      stats = merge(self.stats[path], stats)
    self.stats[path] = stats


_active = []


@contextlib.contextmanager
def recording(real_M, gram: bool, absmax: bool = False, abssum: bool = False):
  """Observed contractions inside record into the returned `_Recording`.

  `real_M` weighs the model's tokens (batch rows x length, flattened): 1 real, 0 padding; None
  while only the execution order is wanted.
  """
  rec = _Recording(real_M, gram, absmax, abssum)
  _active.append(rec)
  try:
    yield rec
  finally:
    _active.pop()


def _moments(rows_MxI, weight_M, rec: _Recording) -> dict:
  rows = rows_MxI.astype(jnp.float32) * weight_M[:, None]
  out = dict(sq=jnp.sum(jnp.square(rows), axis=0), tokens=jnp.sum(weight_M))
  if rec.gram:
    out['gram'] = jnp.matmul(rows.T, rows, precision=_HIGHEST)
  if rec.absmax:   # a padding row is 0 here whatever it held (0 * inf would be nan)
    out['absmax'] = jnp.max(_real_abs(rows_MxI, weight_M), axis=0)
  if rec.abssum:
    out['abssum'] = jnp.sum(jnp.abs(rows), axis=0)
  return out


def _real_abs(x_MxI, weight_M):
  """|x| on the rows of positive weight, 0 on the others."""
  return jnp.where(weight_M[:, None] > 0, jnp.abs(x_MxI.astype(jnp.float32)), 0.0)


def _token_weights(rec: _Recording, m: int):
  """Padding weights of `m` rows: the recording's when they are the model's tokens, else 1."""
  return rec.real_M if rec.real_M.shape[0] == m else jnp.ones((m,), jnp.float32)


def _dot(x, o: Observed, x_dims, w_dims, dtype):
  rec = _active[-1]
  if rec.real_M is None:
    rec.add(o.path, {})
  elif w_dims == tuple(range(len(x_dims))):   # contracted on the weight's input side
    rows = x.reshape(-1, math.prod(x.shape[x.ndim - len(x_dims):]))
    rec.add(o.path, _moments(rows, _token_weights(rec, rows.shape[0]), rec))
  # (A table used transposed, as a tied head, is observed through its lookup.)
  return lax.dot_general(x.astype(dtype), o.w.astype(dtype), ((x_dims, w_dims), ((), ())))


def _ragged_dot(x_MxI, o: Observed, group_sizes_E, dtype, rows_M):
  rec = _active[-1]
  if rec.real_M is None:
    rec.add(o.path, {})
  else:
    e, m = group_sizes_E.shape[0], x_MxI.shape[0]
    # Row r belongs to expert searchsorted(cumsum(sizes), r); rows past the total to none.
    expert_M = jnp.searchsorted(jnp.cumsum(group_sizes_E), jnp.arange(m), side='right')
    weight_M = rec.real_M[rows_M] if rows_M is not None else jnp.ones((m,), jnp.float32)
    member_MxE = jax.nn.one_hot(expert_M, e, dtype=jnp.float32) * weight_M[:, None]
    x32 = x_MxI.astype(jnp.float32)
    stats = dict(sq=jnp.matmul(member_MxE.T, jnp.square(x32), precision=_HIGHEST),
                 tokens=jnp.sum(member_MxE, axis=0))
    if rec.gram:
      stats['gram'] = jnp.einsum('me,mi,mj->eij', member_MxE, x32, x32, precision=_HIGHEST)
    if rec.absmax:   # rows past the total form segment e, dropped; an empty expert's max is 0
      found = jax.ops.segment_max(_real_abs(x32, weight_M), expert_M, num_segments=e + 1)
      stats['absmax'] = jnp.maximum(found[:e], 0.0)
    if rec.abssum:
      stats['abssum'] = jnp.matmul(member_MxE.T, jnp.abs(x32), precision=_HIGHEST)
    rec.add(o.path, stats)
  return lax.ragged_dot(x_MxI.astype(dtype), o.w.astype(dtype), group_sizes_E)


def _expert_dot(x_ExMxI, o: Observed, dtype):
  raise ValueError(f'{o.path}: calibration observes experts through the dropless dispatch')


def _take(o: Observed, ids, dtype):
  """A lookup is the product one_hot(ids) x table: the input's squares are the id counts."""
  rec = _active[-1]
  if rec.real_M is None:
    rec.add(o.path, {})
  else:
    n = o.w.shape[0]
    weight = _token_weights(rec, ids.size)
    counts = jnp.zeros((n,), jnp.float32).at[ids.reshape(-1)].add(weight)
    stats = dict(sq=counts, tokens=jnp.sum(weight))
    if rec.gram:
      stats['gram'] = jnp.diag(counts)
    if rec.absmax:
      stats['absmax'] = (counts > 0).astype(jnp.float32)
    if rec.abssum:
      stats['abssum'] = counts
    rec.add(o.path, stats)
  return jnp.take(o.w, ids, axis=0).astype(dtype)


seam.register(Observed, seam.Rule(dense=lambda o, dtype: o.w, dot=_dot, expert_dot=_expert_dot,
                                  ragged_dot=_ragged_dot, take=_take))


def _calibration_model(model):
  """The model as calibration runs it: unrolled, MoE layers through the dropless dispatch."""
  cfg = model.config
  if cfg.scan_layers:
    raise ValueError('calibration needs the unrolled layout: use scan_layers=False '
                     '(models.unstack_layers converts the parameters)')
  if cfg.n_experts and cfg.moe_dispatch != 'dropless':
    return model.clone(config=cfg.replace(moe_dispatch='dropless'))
  return model


def _observed(params, paths_):
  """`params` with the weights at `paths_` wrapped in `Observed`."""
  wanted = set(paths_)

  def wrap(tree, prefix=''):
    return {k: wrap(v, f'{prefix}{k}/') if isinstance(v, dict) else
            Observed(v, prefix + k) if prefix + k in wanted else v for k, v in tree.items()}

  return wrap(params)


def _forward(model, params, batch):
  return model.apply({'params': params}, batch['inputs'], positions=batch['positions'],
                     segment_ids=batch['segment_ids'], mutable=['moe'])


def execution_order(model, params, batch, paths_) -> list:
  """`paths_` in the order the forward pass first multiplies by them (traced, not run)."""
  model = _calibration_model(model)
  with recording(None, False) as rec:
    jax.eval_shape(lambda p: _forward(model, p, batch), _observed(params, paths_))
  return list(rec.stats)


def blocks(model, params, batch, paths_) -> list:
  """`paths_` grouped by top-level module (a block), in the order the forward pass reaches them:
  what layer-by-layer methods (SparseGPT, GPTQ) visit, each block seeing the earlier ones done."""
  groups = {}
  for p in execution_order(model, params, batch, paths_):
    groups.setdefault(p.split('/')[0], []).append(p)
  return list(groups.values())


def input_statistics(model, params, batches, kernel_paths, gram: bool = False,
                     absmax: bool = False, abssum: bool = False) -> dict:
  """{path: {'sq': [stack..., in], 'tokens': [stack...], and if asked 'gram': [stack..., in, in],
  'absmax': [stack..., in], 'abssum': [stack..., in]}} over the non-padding tokens of all
  batches; the stack dims are the weight's experts (none for a plain kernel).

  'sq' and 'abssum' are sums of x^2 and |x| per input feature (abssum / tokens is the mean
  |x|), 'absmax' the largest |x| (a maximum over batches, not a sum). Batches are dicts with
  'inputs', 'positions', 'segment_ids' (0 marks padding).
  """
  model = _calibration_model(model)

  @jax.jit
  def one_batch(params, batch):
    real_M = (batch['segment_ids'] > 0).reshape(-1).astype(jnp.float32)
    with recording(real_M, gram, absmax, abssum) as rec:
      _forward(model, _observed(params, kernel_paths), batch)
    return rec.stats

  total = None
  for batch in batches:
    found = one_batch(params, {k: batch[k] for k in ('inputs', 'positions', 'segment_ids')})
    total = found if total is None else {p: merge(total[p], found[p]) for p in total}
  missing = sorted(set(kernel_paths) - set(total or {}))
  if missing:
    raise ValueError(f'no inputs were seen for {missing[:3]}: the forward pass never multiplies '
                     f'by them')
  return total


def gradients(model, params, batches, loss_fn) -> dict:
  """The mean over batches of d loss_fn(params, model, batch) / d params."""
  grad = jax.jit(jax.grad(lambda p, b: loss_fn(p, model, b)))
  total, n = None, 0
  for batch in batches:
    g = grad(params, batch)
    total = g if total is None else jax.tree.map(jnp.add, total, g)
    n += 1
  return jax.tree.map(lambda x: x / n, total)

