"""The compression seam: every weight contraction dispatches on the type of its weight leaf.

The model multiplies by its weights only through the four contractions of `models.layers`
(`dot`, `expert_dot`, `ragged_dot`, `take`). Each looks up the rule registered for the weight
leaf's type: plain arrays use the built-in rule (XLA's dot, `lax.ragged_dot`, a row gather);
other leaf types (integer values with scales, factored kernels, observed weights during
calibration) are registered from `compression/` with `register`, so the model never changes
and imports still point downward.

A leaf type is a pytree node whose children are arrays (values, scales, factors, ...) and which
subclasses `Leaf`: it says the shape of the dense weight it stands for and the logical axis
names of each child, so `sharding/` lays it out and Orbax saves and restores it like any
parameter. A rule must give `dense` (the leaf as a plain array, the fallback for every
contraction it does not implement) and may give faster forms of each contraction.
"""

import abc
import dataclasses
from typing import Any, Callable, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np


class Leaf(abc.ABC):
  """Base of weight leaf types; subclasses are pytree nodes (`jax.tree_util.register_dataclass`).

  `shape` is the shape of the dense weight the leaf stands for (what the model asks for);
  `logical_axes()` returns a tree shaped like the leaf's children holding a tuple of logical
  axis names per child array (see `models.axes`).
  """

  @property
  @abc.abstractmethod
  def shape(self) -> Tuple[int, ...]:
    """The shape of the dense weight this leaf stands for."""

  @abc.abstractmethod
  def logical_axes(self) -> Any:
    """A tree like the leaf's children: a tuple of logical axis names per child array."""


@dataclasses.dataclass(frozen=True)
class Wrapped(Leaf):
  """Base of leaves that hold a float kernel `w` and change only how it executes (fake
  quantization's int8 inputs, low-precision training dots). Subclasses add their fields and
  are registered with `jax.tree_util.register_dataclass`."""
  w: Any
  names: Tuple = dataclasses.field(metadata=dict(static=True))   # the kernel's logical names
  inputs: int = dataclasses.field(metadata=dict(static=True))
  outputs: int = dataclasses.field(metadata=dict(static=True))

  @property
  def shape(self):
    return self.w.shape

  @property
  def stack(self) -> int:   # under nn.scan the layer slice has one stack dim fewer
    return self.w.ndim - self.inputs - self.outputs

  def logical_axes(self):
    return dataclasses.replace(self, w=self.names[len(self.names) - self.w.ndim:])


@dataclasses.dataclass(frozen=True)
class Rule:
  """How one leaf type executes. Each contraction is optional; `dense` is the fallback.

    dense(w, dtype) -> array of w.shape
    dot(x, w, x_dims, w_dims, dtype) -> lax.dot_general(x, dense(w), ((x_dims, w_dims), ((), ())))
    expert_dot(x_ExMxI, w_ExIxO, dtype) -> [E, M, O]
    ragged_dot(x_MxI, w_ExIxO, group_sizes_E, dtype, rows_M) -> [M, O]
    take(w_VxD, ids, dtype) -> [*ids.shape, D]
  `rows_M` (or None) names the token each row of a ragged contraction came from.
  """
  dense: Callable
  dot: Optional[Callable] = None
  expert_dot: Optional[Callable] = None
  ragged_dot: Optional[Callable] = None
  take: Optional[Callable] = None


_ARRAY_TYPES = (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct)
_RULES = {}


def register(leaf_type: type, rule: Rule) -> None:
  """Makes every contraction with a `leaf_type` weight execute through `rule`."""
  if not isinstance(leaf_type, type) or not issubclass(leaf_type, Leaf):
    raise TypeError(f'{leaf_type!r} is not a subclass of models.seam.Leaf')
  _RULES[leaf_type] = rule


def rule_for(w) -> Optional[Rule]:
  """The rule of `w`'s leaf type; None for plain arrays (the built-in rule)."""
  if isinstance(w, _ARRAY_TYPES):
    return None
  for cls in type(w).__mro__:
    if cls in _RULES:
      return _RULES[cls]
  raise TypeError(f'no seam rule for a weight of type {type(w).__name__}; register one with '
                  f'models.seam.register')


def dense(w, dtype) -> jax.Array:
  """The weight as a plain array of `dtype`, whatever its leaf type."""
  rule = rule_for(w)
  return (jnp.asarray(w) if rule is None else rule.dense(w, dtype)).astype(dtype)
