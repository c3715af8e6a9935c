"""Which weights a compression method touches, and how each one is a stack of matrices.

A path is the '/'-joined key of a leaf, e.g. 'blocks_0/attn/query/kernel' (unrolled) or
'blocks/mlp/up' (scanned MoE experts). What a weight's dimensions mean comes from the model
(`models.layouts`: {path: Layout}, read from the logical axis names every parameter carries),
never from the path's spelling: a weight is a stack of matrices [stack..., in..., out...] whose
leading dims are scanned layers and experts, `in` the reduction (input) side of the matmul and
`out` the output side. `as_matrices` views it as [stack, in, out].
"""

import re
from typing import Dict, Optional

import flax

from models import axes
from models.layouts import Layout

Layouts = Dict[str, Layout]

# The default selection leaves out embedding tables and output heads (a vocabulary or position
# axis: small, sensitive, and the tied head is shared with the embedding) and MoE routers (the
# expert axis on their output side). `exclude=None` leaves nothing out; a regex leaves out the
# paths it matches.
DEFAULT = 'default'


def flatten(params) -> dict:
  return {'/'.join(k): v for k, v in flax.traverse_util.flatten_dict(params).items()}


def unflatten(flat: dict):
  return flax.traverse_util.unflatten_dict({tuple(k.split('/')): v for k, v in flat.items()})


def default_excluded(layout: Layout) -> bool:
  """Embedding tables, output heads and routers (see DEFAULT)."""
  outputs = layout.names[layout.stack + layout.inputs:]
  return (axes.VOCAB in layout.names or axes.POSITION in layout.names
          or axes.EXPERT in outputs)


def select(params, layouts: Layouts, include: Optional[str] = None,
           exclude: Optional[str] = DEFAULT):
  """Sorted paths of the matmul weights of `params` matching `include` (a regex searched in the
  path; None: all) and not `exclude` (DEFAULT, None or a regex).

  Raises:
    ValueError: in one line, when nothing matches.
  """
  flat = flatten(params)
  weights = sorted(p for p in flat if p in layouts)
  chosen = [p for p in weights
            if (include is None or re.search(include, p))
            and not (exclude == DEFAULT and default_excluded(layouts[p]))
            and not (exclude not in (None, DEFAULT) and re.search(exclude, p))]
  if not chosen:
    example = weights[0] if weights else '(none)'
    raise ValueError(f'the selection include={include!r} exclude={exclude!r} matches no weight; '
                     f'weight paths look like {example!r}')
  return chosen


def as_matrices(w, layout: Layout):
  """w -> [stack, in, out] (stack 1 for a plain kernel) and the function that undoes it."""
  shape = w.shape
  return w.reshape(layout.matrix_shape(shape)), lambda m: m.reshape(shape)


def check_runnable(path: str, layout: Layout, model_config, what: str) -> None:
  """One-line ValueErrors where `what` (e.g. 'W8A8') cannot run weight `path`: an embedding
  table is a lookup, not a matmul, and experts run their own dots only with capacity dispatch."""
  if axes.VOCAB in layout.names or axes.POSITION in layout.names:
    raise ValueError(f'{path}: {what} cannot run an embedding lookup; leave tables out of the '
                     f'selection')
  if (axes.EXPERT in layout.stacked_names and model_config is not None
      and model_config.moe_dispatch != 'capacity'):
    raise ValueError(f'{path}: {what} experts run with moe_dispatch=capacity, not '
                     f'{model_config.moe_dispatch!r}')
