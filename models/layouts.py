"""What each parameter's dimensions mean, read from the logical axis names it carries.

Every matmul weight is a stack of matrices: leading dimensions named in `axes.STACKED` (scanned
layers, experts) index separate matrices; the rest split into the input (contracted) and the
output side. Every weight of a decoder reads from or writes to the residual stream, so the split
follows from where `embed` sits: first after the stack dims, it is the input (query/key/value,
MLP up and gate, router, untied head); last, it is the output and everything before it the input
(attention output [heads, head_dim, embed], MLP down, embedding tables [vocab, embed], whose
lookup is the product one_hot(ids) x table). Compression reads these layouts instead of
recognising parameter paths, so a new block type needs no change there.
"""

import functools
import math
from typing import Dict, NamedTuple, Tuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from models import axes
from models.config import ModelConfig


class Layout(NamedTuple):
  """One parameter: its logical names and how many leading dims are stacks and inputs."""
  names: Tuple[str, ...]
  stack: int    # leading dims indexing separate matrices (0 for a plain kernel)
  inputs: int   # dims after the stack contracted with the activations
  # the remaining dims are outputs

  @property
  def outputs(self) -> int:
    return len(self.names) - self.stack - self.inputs

  @property
  def stacked_names(self) -> Tuple[str, ...]:
    return self.names[:self.stack]

  def matrix_shape(self, shape) -> Tuple[int, int, int]:
    """(matrices, inputs, outputs) of a weight of this layout and `shape`."""
    s, i = self.stack, self.inputs
    return math.prod(shape[:s]), math.prod(shape[s:s + i]), math.prod(shape[s + i:])


def _stacked(names: Tuple[str, ...]) -> int:
  n = 0
  while n < len(names) and names[n] in axes.STACKED:
    n += 1
  return n


def is_weight(names: Tuple[str, ...]) -> bool:
  """Matmul weights: at least two dims besides the stacked ones (not norms, biases, counters)."""
  return len(names) - _stacked(names) >= 2


def of_names(names: Tuple[str, ...], where: str = 'a parameter') -> Layout:
  """The layout of a matmul weight named `names` (see the module docstring for the rule)."""
  names = tuple(names)
  stack = _stacked(names)
  rest = names[stack:]
  if len(rest) < 2:
    raise ValueError(f'{where} with axes {names} is not a matmul weight')
  if rest[0] == axes.EMBED:
    return Layout(names, stack, 1)
  if rest[-1] == axes.EMBED:
    return Layout(names, stack, len(rest) - 1)
  raise ValueError(f'{where} with axes {names} neither reads nor writes the {axes.EMBED!r} '
                   f'axis: say in models/layouts.py which of its dims are inputs')


def logical_names(model: nn.Module, length: int = 1) -> Dict[str, Tuple[str, ...]]:
  """{'/'-joined parameter path: logical axis names} of every parameter of `model`."""
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, length), jnp.int32)))
  flat = flax.traverse_util.flatten_dict(boxed['params'],
                                         is_leaf=lambda _, x: isinstance(x, nn.Partitioned))
  return {'/'.join(k): tuple(v.names) for k, v in flat.items()}


@functools.lru_cache(maxsize=64)
def names_of_config(cfg: ModelConfig) -> Dict[str, Tuple[str, ...]]:
  """`logical_names(Transformer(cfg))`, cached (configs are hashable)."""
  from models.transformer import Transformer   # the transformer module imports nothing from here
  return logical_names(Transformer(cfg))


@functools.lru_cache(maxsize=64)
def of_config(cfg: ModelConfig) -> Dict[str, Layout]:
  """{path: Layout} for every matmul weight of `Transformer(cfg)` (cached: configs are hashable)."""
  # Biases of multi-dimensional outputs ([heads, head_dim]) have two dims but multiply nothing.
  return {p: of_names(n, p) for p, n in names_of_config(cfg).items()
          if is_weight(n) and p.rsplit('/', 1)[-1] != 'bias'}


def of_model(model) -> Dict[str, Layout]:
  """{path: Layout} for every matmul weight of a `Transformer`."""
  return of_config(model.config)
