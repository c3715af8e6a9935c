"""The cost model: what a model's parameter tree costs to hold and to run, and what was measured.

One place for the figures every compression stage is judged by:
  - parameters and non-zero parameters (a weight counts as zero when it is exactly zero, or a
    quantized code equal to its zero point);
  - bytes by storage type, as the arrays hold them: float32 / bfloat16 / float16 leaves, int8
    and packed int4 / int3 / int2 integers of `QTensor` leaves (`int3` shares int4's nibbles),
    their scales and zero points (`scales`), and 1-bit pruning masks (`mask`) when given;
  - forward FLOPs per token: `dense` (every weight multiplied, all experts of MoE layers),
    `active` (what a token runs: its k experts; `models.flops`), `effective` (active minus two
    per zero weight a token multiplies: what sparse kernels could save), and `expected` under
    early exit (the layers a token uses on average, plus the head);
  - measured figures (tokens/s, peak memory, ...) with the device they were measured on, and
    from them a price per million tokens at a given device price per hour.
"""

import dataclasses
import math
from typing import Optional

import jax
import numpy as np

from compression import paths, qtensor
from models import axes, flops
from models import layouts as layouts_lib

FLOAT_TYPES = ('float32', 'bfloat16', 'float16')
STORAGE = FLOAT_TYPES + ('int8', 'int4', 'int3', 'int2', 'scales', 'mask')


def storage_bytes(params, masks=None) -> dict:
  """{storage type: bytes} of the arrays in `params` (and 1 bit per entry of `masks`, a tree
  of boolean arrays, packed 8 to a byte), types with no bytes left out."""
  out = dict.fromkeys(STORAGE, 0)
  for leaf in paths.flatten(params).values():
    if isinstance(leaf, qtensor.QTensor):
      kind = 'int8' if leaf.per_byte == 1 else f'int{leaf.bits}'
      out[kind] += _nbytes(leaf.values)
      out['scales'] += sum(_nbytes(x) for x in (leaf.scale, leaf.zero, leaf.act_scale)
                           if x is not None)
    else:
      name = np.dtype(leaf.dtype).name
      if name not in FLOAT_TYPES:
        raise ValueError(f'a parameter of dtype {name} has no storage type; allowed: '
                         f'{", ".join(FLOAT_TYPES)} arrays and QTensor leaves')
      out[name] += _nbytes(leaf)
  if masks is not None:
    out['mask'] = sum(math.ceil(m.size / 8) for m in jax.tree.leaves(masks))
  return {k: v for k, v in out.items() if v}


def _nbytes(x) -> int:
  return int(x.size) * np.dtype(x.dtype).itemsize


def zeros(leaf) -> int:
  """Entries of a weight that are exactly zero (a `QTensor`: codes equal to their zero point)."""
  if isinstance(leaf, qtensor.QTensor):
    q, _, zero = qtensor.codes(leaf)
    g = zero.shape[1]
    q = np.asarray(q, np.float32).reshape(q.shape[0], q.shape[1], g, -1)
    zero = np.moveaxis(np.asarray(zero), 1, 2)[..., None]   # [S, O, G, 1]
    return int(np.sum(q == zero))
  return int(np.size(leaf) - np.count_nonzero(np.asarray(leaf)))


def size(leaf) -> int:
  """Entries the weight stands for (a `QTensor`: its float kernel's)."""
  return math.prod(leaf.shape)


def counts(params) -> dict:
  """Parameters and non-zero parameters of the whole tree."""
  leaves = list(paths.flatten(params).values())
  n = sum(size(x) for x in leaves)
  return dict(params=n, nonzero=n - sum(zeros(x) for x in leaves))


def flops_per_token(cfg, params=None, seq_len: Optional[int] = None,
                    mean_layers: Optional[float] = None) -> dict:
  """Forward FLOPs per token at `seq_len` attended tokens (None: the config's max_len).

  `params` gives `effective` (active minus 2 per zero weight of the matmul kernels, an expert's
  at its share k / n_experts); `mean_layers`, the layers a token uses under early exit on
  average, gives `expected` (active, with the blocks' share scaled by mean_layers / n_layers).
  """
  seq_len = cfg.max_len if seq_len is None else seq_len
  active = flops.train_flops_per_token(cfg, seq_len) / 3
  # Every expert multiplied: the same model with each MoE layer running all its experts.
  everything = dataclasses.replace(cfg, experts_per_token=cfg.n_experts) if cfg.n_experts else cfg
  out = dict(dense=flops.train_flops_per_token(everything, seq_len) / 3, active=active)
  if params is not None:
    layouts = layouts_lib.of_config(cfg)
    flat = paths.flatten(params)
    zero = 0.0
    for p in paths.select(params, layouts, exclude=None):
      share = 1.0
      if axes.EXPERT in layouts[p].stacked_names:
        share = cfg.experts_per_token / cfg.n_experts
      zero += share * zeros(flat[p])
    out['effective'] = active - 2 * zero
  if mean_layers is not None:
    if not 0 < mean_layers <= cfg.n_layers:
      raise ValueError(f'mean_layers={mean_layers} must be in (0, n_layers={cfg.n_layers}]')
    head = 2 * cfg.d_model * cfg.vocab_size
    out['expected'] = head + (active - head) * mean_layers / cfg.n_layers
  return out


@dataclasses.dataclass(frozen=True)
class Measured:
  """Figures measured on one device: tokens/s forward and decoding, peak memory in bytes."""
  device: str
  forward_tokens_per_s: Optional[float] = None
  decode_tokens_per_s: Optional[float] = None
  peak_bytes: Optional[int] = None

  def price_per_million_tokens(self, price_per_hour: float, decode: bool = True) -> float:
    """What a million tokens cost at `price_per_hour` for the device (decoding, or forward)."""
    rate = self.decode_tokens_per_s if decode else self.forward_tokens_per_s
    if not rate or rate <= 0:
      raise ValueError(f'no {"decode" if decode else "forward"} tokens/s measured on '
                       f'{self.device} to price')
    if price_per_hour < 0:
      raise ValueError(f'price_per_hour={price_per_hour} must be >= 0')
    return price_per_hour / 3600 / rate * 1e6


def pareto_front(points: list, cost: str, quality: str) -> list:
  """The points (dicts) no other point beats: none has lower-or-equal `cost` and
  lower-or-equal `quality` (a loss: lower is better) with one of them strictly lower. In
  order of increasing cost."""
  front = []
  for p in sorted(points, key=lambda p: (p[cost], p[quality])):
    if not front or p[quality] < front[-1][quality]:
      front.append(p)
  return front
