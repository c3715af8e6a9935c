"""Logical-axis rules: which mesh axes each name in `models.axes` is split over.

A rule table is an ordered list of (logical axis, mesh axes) pairs, read by flax's
`nn.logical_to_mesh_axes`: within one array, earlier rules win and a mesh axis is used at most
once. That is why `batch` comes first in every table: activations [batch, length, embed] put the
batch on `fsdp` and keep `embed` whole, while parameters (no batch dim) split `embed` over `fsdp`.
"""

from typing import Sequence, Tuple, Union

from models import axes
from sharding.mesh import AXES as MESH_AXES
from sharding.mesh import DATA, EXPERT, FSDP, STAGE, TENSOR

MeshAxes = Union[None, str, Tuple[str, ...]]
Rules = Tuple[Tuple[str, MeshAxes], ...]

# Every mesh axis that does not split a matmul splits the batch, so no device repeats another's
# work: `expert` is extra data parallelism outside the MoE layers. (`tensor` shards see the same
# rows and split the weights instead.)
BATCH_AXES = (DATA, FSDP, EXPERT)

_ACTIVATIONS = (
    (axes.BATCH, BATCH_AXES),
    (axes.LENGTH, None),       # no sequence parallelism
    (axes.KV_LENGTH, None),
)


def _table(**split) -> Rules:
  """A full rule table: the activation rules first, then every other logical axis in
  `models.axes.ALL` order, split as given in `split` and unsplit otherwise. Stacked layers
  always split over `stage` (a no-op on meshes without pipeline stages), so every preset
  pipelines."""
  first = {name for name, _ in _ACTIVATIONS}
  split = dict(dict(layers=STAGE), **split)
  return _ACTIVATIONS + tuple((name, split.get(name)) for name in axes.ALL if name not in first)


# Each preset names only what it splits.
PRESETS = {
    # Pure data parallelism: every device holds every parameter.
    'dp': _table(),
    # ZeRO-3: parameters, gradients and optimizer state split over `fsdp` along `embed`, which
    # every weight has (embeddings, projections, norms); XLA all-gathers each weight where used.
    'fsdp': _table(embed=FSDP),
    # Megatron-style tensor parallelism: query heads, the MLP hidden width and the vocabulary
    # over `tensor`. Key/value heads stay whole: grouped-query models often have fewer of them
    # than `tensor` shards, and they are small (list ('kv_heads', 'tensor') for MHA models).
    'tp': _table(vocab=TENSOR, heads=TENSOR, mlp=TENSOR),
    # Both: each weight split over `fsdp` along `embed` and over `tensor` along heads/mlp/vocab.
    'fsdp_tp': _table(vocab=TENSOR, embed=FSDP, heads=TENSOR, mlp=TENSOR),
    # Expert parallelism: MoE experts over `expert`, every weight also split like FSDP.
    'ep': _table(embed=FSDP, expert=EXPERT),
}



def _fail(msg: str):
  raise ValueError(f'sharding rules: {msg}')


def _mesh_axes(value, rule) -> MeshAxes:
  """None, one mesh axis name, or a tuple of distinct names (lists from configs become tuples)."""
  if value is None or (isinstance(value, (tuple, list)) and not value):
    return None
  names = (value,) if isinstance(value, str) else value
  if not isinstance(names, (tuple, list)):
    _fail(f'mesh axes {value!r} in rule {rule!r} are not a name or a tuple of names')
  for name in names:
    if name not in MESH_AXES:
      _fail(f'unknown mesh axis {name!r} in rule {rule!r}; mesh axes are {", ".join(MESH_AXES)}')
  if len(set(names)) != len(names):
    _fail(f'rule {rule!r} repeats a mesh axis')
  return names[0] if len(names) == 1 else tuple(names)


def rules_for(spec: Union[str, Sequence, None]) -> Rules:
  """The rule table named by `spec`: a preset name or an explicit list of (logical, mesh) pairs.

  Mesh axes in a pair are None (unsplit), one mesh axis name, or a tuple of them. Logical names
  absent from an explicit list stay unsplit.

  Raises:
    ValueError: in one line, for an unknown preset, logical axis or mesh axis.
  """
  if isinstance(spec, str):
    if spec not in PRESETS:
      _fail(f'unknown preset {spec!r}; presets are {", ".join(PRESETS)} '
            f'(or give a list of (logical axis, mesh axes) pairs)')
    return PRESETS[spec]
  if spec is None or not isinstance(spec, (tuple, list)):
    _fail(f'{spec!r} is neither a preset name ({", ".join(PRESETS)}) nor a list of rules')
  rules = []
  for rule in spec:
    if not isinstance(rule, (tuple, list)) or len(rule) != 2:
      _fail(f'rule {rule!r} is not a (logical axis, mesh axes) pair')
    logical, mesh_axes = rule
    if logical not in axes.ALL:
      _fail(f'unknown logical axis {logical!r} in rule {tuple(rule)!r}; logical axes are '
            f'{", ".join(axes.ALL)}')
    rules.append((logical, _mesh_axes(mesh_axes, tuple(rule))))
  return tuple(rules)


def mesh_axes_used(rules: Rules) -> Tuple[str, ...]:
  """Every mesh axis some rule splits over, in first-use order."""
  used = []
  for _, value in rules:
    for name in (() if value is None else (value,) if isinstance(value, str) else value):
      if name not in used:
        used.append(name)
  return tuple(used)



def mesh_axes_of(rules: Rules, logical: str) -> Tuple[str, ...]:
  """The mesh axes the first rule for `logical` splits it over (() when unsplit)."""
  for name, value in rules:
    if name == logical:
      return () if value is None else (value,) if isinstance(value, str) else tuple(value)
  return ()
