"""Parameter paths: which leaves a compression method touches, and how each is a matrix.

A path is the '/'-joined key of a leaf, e.g. 'blocks_0/attn/query/kernel' (unrolled) or
'blocks/mlp/up' (scanned MoE experts). Every weight is viewed as a stack of matrices
[batch..., in, out]: leading batch dims are the stacked layers of `scan_layers` and the experts of
an MoE layer; `in` is the reduction (input) side of the matmul, `out` the output side.
"""

import math
import re
from typing import Optional

import flax

# Embedding tables, the output head and MoE routers are left alone by default: they are small,
# sensitive, or (the tied head) shared with the embedding.
DEFAULT_EXCLUDE = r'(^|/)(embed|pos_embed|lm_head|router)(/|$)'
_EXPERT_LEAF = re.compile(r'(^|/)mlp/(up|gate|down)$')


def flatten(params) -> dict:
  return {'/'.join(k): v for k, v in flax.traverse_util.flatten_dict(params).items()}


def unflatten(flat: dict):
  return flax.traverse_util.unflatten_dict({tuple(k.split('/')): v for k, v in flat.items()})


def is_weight(path: str, ndim: int) -> bool:
  """Matmul weights: Linear kernels and stacked expert kernels (2-D or more)."""
  return ndim >= 2 and (path.endswith('/kernel') or bool(_EXPERT_LEAF.search(path)))


def select(params, include: Optional[str] = None, exclude: Optional[str] = DEFAULT_EXCLUDE):
  """Sorted paths of the weights matching `include` (a regex searched in the path; None: all
  matmul weights) and not `exclude`.

  Raises:
    ValueError: in one line, when nothing matches.
  """
  flat = flatten(params)
  chosen = sorted(p for p, v in flat.items() if is_weight(p, v.ndim)
                  and (include is None or re.search(include, p))
                  and (exclude is None or not re.search(exclude, p)))
  if not chosen:
    example = next((p for p, v in sorted(flat.items()) if is_weight(p, v.ndim)), '(none)')
    raise ValueError(f'the selection include={include!r} exclude={exclude!r} matches no weight; '
                     f'weight paths look like {example!r}')
  return chosen


def batch_dims(path: str, ndim: int) -> int:
  """Leading dims that index separate matrices: scanned layers, then experts."""
  scanned = 1 if path.split('/')[0] == 'blocks' else 0
  expert = 1 if _EXPERT_LEAF.search(path) else 0
  return scanned + expert


def in_dims(path: str) -> int:
  """Input dims after the batch dims: the attention output kernel takes [heads, head_dim]."""
  return 2 if path.endswith('attn/out/kernel') else 1


def matrix_shape(path: str, shape) -> tuple:
  """(stack, in, out): how `as_matrices` views a weight of this path and shape."""
  nb, ni = batch_dims(path, len(shape)), in_dims(path)
  return (math.prod(shape[:nb]), math.prod(shape[nb:nb + ni]),
          math.prod(shape[nb + ni:]))


def as_matrices(path: str, w):
  """w -> [batch, in, out] (batch 1 for a plain kernel) and the function that undoes it."""
  shape = w.shape
  return w.reshape(matrix_shape(path, shape)), lambda m: m.reshape(shape)
