"""Shardings from logical names: parameters, whole train states, batches and activations.

Parameters carry their logical names in flax boxes (`nn.with_logical_partitioning`) until they are
created; everything here reads those names from a `jax.eval_shape` of the init function, so no
array is ever materialised whole on one device.
"""

import contextlib
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from models import axes, seam
from sharding.rules import mesh_axes_used, rules_for


def _fail(msg: str):
  raise ValueError(f'sharding: {msg}')


def _is_box(x) -> bool:
  return isinstance(x, nn.meta.AxisMetadata)


def unbox(tree):
  """Strips flax boxes without adding sharding constraints (safe outside jit, under any mesh)."""
  strip = lambda x: x.unbox(apply_constraint=False) if isinstance(x, nn.Partitioned) else x.unbox()
  return jax.tree.map(lambda x: unbox(strip(x)) if _is_box(x) else x, tree, is_leaf=_is_box)


def _check_mesh(mesh: jax.sharding.Mesh, rules) -> None:
  for name in mesh_axes_used(rules):
    if name not in mesh.axis_names:
      _fail(f'the rules split over mesh axis {name!r} but the mesh has axes {mesh.axis_names}; '
            f'build the mesh with sharding.make_mesh')


def _axes_size(mesh, entry) -> int:
  names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
  return math.prod(mesh.shape[n] for n in names)


def _check_divisible(shapes, logical, shardings) -> None:
  """One error naming the first leaf whose dim does not split evenly over its mesh axes."""
  is_spec = lambda x: isinstance(x, PartitionSpec)
  paths_shapes = jax.tree_util.tree_flatten_with_path(shapes)[0]
  names = jax.tree.leaves(logical, is_leaf=is_spec)
  for (path, leaf), logical_spec, sharding in zip(paths_shapes, names,
                                                  jax.tree.leaves(shardings)):
    for dim, entry in enumerate(sharding.spec):
      size = _axes_size(sharding.mesh, entry)
      if size > 1 and leaf.shape[dim] % size:
        name = logical_spec[dim] if dim < len(logical_spec) else None
        _fail(f'{jax.tree_util.keystr(path, simple=True, separator="/")} has shape '
              f'{tuple(leaf.shape)}: dim {dim} ({name}, size {leaf.shape[dim]}) does not divide '
              f'over mesh axes {entry} of size {size}; change the rules or the mesh')


def param_shardings(abstract, mesh: jax.sharding.Mesh, rules) -> Any:
  """NamedShardings for a tree holding flax boxes, e.g. `jax.eval_shape(model.init, ...)`.

  Works on any tree: boxed leaves follow `rules`, other array leaves (step counters, optax counts)
  are replicated. The result has the structure of the unboxed tree.

  Args:
    abstract: the boxed tree, usually of `jax.ShapeDtypeStruct`s.
    mesh: the mesh (from `make_mesh`).
    rules: a preset name or rule list (see `rules_for`).

  Raises:
    ValueError: in one line, naming the parameter path, dim, size and mesh axes, when a split
      dimension does not divide evenly.
  """
  rules = rules_for(rules)
  _check_mesh(mesh, rules)
  logical = nn.get_partition_spec(abstract)
  shardings = nn.logical_to_mesh_sharding(logical, mesh, rules)
  _check_divisible(unbox(abstract), logical, shardings)
  return shardings


def _boxed_abstract(init_fn: Callable, args) -> Any:
  abstract = jax.eval_shape(init_fn, *args)
  if not any(_is_box(x) for x in jax.tree.leaves(abstract, is_leaf=_is_box)):
    _fail('init_fn returned no logically named leaves; return model.init\'s boxed parameters '
          '(or a TrainState built from them) without nn.meta.unbox')
  return abstract


def init_shardings(init_fn: Callable, mesh: jax.sharding.Mesh, rules, *args) -> Any:
  """The shardings `create_sharded(init_fn, mesh, rules, *args)` lays its output out with."""
  return param_shardings(_boxed_abstract(init_fn, args), mesh, rules)


def sharded_abstract(init_fn: Callable, mesh: jax.sharding.Mesh, rules, *args) -> Any:
  """`jax.ShapeDtypeStruct`s with shardings for `init_fn`'s unboxed output (an Orbax target)."""
  abstract = _boxed_abstract(init_fn, args)
  shardings = param_shardings(abstract, mesh, rules)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      unbox(abstract), shardings)


def create_sharded(init_fn: Callable, mesh: jax.sharding.Mesh, rules, *args) -> Any:
  """Runs `init_fn(*args)` with every output leaf created directly in its sharded layout.

  `init_fn` returns parameters with their flax boxes (as `model.init` does) or a TrainState built
  from them: optax builds its state by mapping over the parameter tree, so the Adam moments keep
  the boxes and shard like the parameters, while counters are replicated. Pass RNG keys as `args`
  and close over modules and optimizers.

  Returns:
    The unboxed output, each leaf a `jax.Array` laid out as `init_shardings` says.
  """
  shardings = init_shardings(init_fn, mesh, rules, *args)
  return jax.jit(lambda *a: unbox(init_fn(*a)), out_shardings=shardings)(*args)


def tree_shardings(tree, mesh: jax.sharding.Mesh, rules, names=None) -> Any:
  """NamedShardings for a parameter tree whose leaves may be seam leaf types (`models.seam.Leaf`).

  A leaf type gives the logical names of its own arrays (`logical_axes()`); a plain array takes
  its names from `names` ({'/'-joined path: names}, e.g. `models.layouts.logical_names(model)`)
  or, when absent there, is replicated. Works on abstract trees (`jax.eval_shape`), so a
  compression transform can create its output directly sharded:
  `jax.jit(fn, out_shardings=tree_shardings(jax.eval_shape(fn, params), mesh, rules, names))`.
  """
  rules = rules_for(rules)
  _check_mesh(mesh, rules)
  names = names or {}
  to_sharding = lambda n: NamedSharding(mesh, nn.logical_to_mesh_axes(tuple(n), rules))
  is_leaf = lambda x: isinstance(x, seam.Leaf)

  def one(path, x):
    if isinstance(x, seam.Leaf):
      return jax.tree.map(to_sharding, x.logical_axes(), is_leaf=lambda n: isinstance(n, tuple))
    key = '/'.join(str(getattr(k, 'key', k)) for k in path)
    return to_sharding(names[key]) if key in names else NamedSharding(mesh, PartitionSpec())

  return jax.tree_util.tree_map_with_path(one, tree, is_leaf=is_leaf)


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Whole on every device: metrics, scalars, small lookup tables."""
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: jax.sharding.Mesh, rules) -> NamedSharding:
  """Splits the leading (batch) dim of every batch array over the rules' `batch` mesh axes."""
  rules = rules_for(rules)
  _check_mesh(mesh, rules)
  return NamedSharding(mesh, nn.logical_to_mesh_axes((axes.BATCH,), rules))


def global_batch(local_batch, mesh: jax.sharding.Mesh, rules) -> Any:
  """The global batch from this process's rows, via `jax.make_array_from_process_local_data`.

  Each process passes different rows (the batch mesh axes span the processes, as in data and FSDP
  layouts); the global batch is their concatenation in process order.
  """
  sharding = batch_sharding(mesh, rules)
  entry = sharding.spec[0]
  shards = _axes_size(mesh, entry)

  def put(x):
    x = np.asarray(x)
    rows = x.shape[0] * jax.process_count()
    if rows % shards:
      _fail(f'a global batch of {rows} rows does not divide over mesh axes {entry} of size '
            f'{shards}; use a multiple of {shards}')
    return jax.make_array_from_process_local_data(sharding, x)

  return jax.tree.map(put, local_batch)


@contextlib.contextmanager
def activation_rules(mesh: jax.sharding.Mesh, rules):
  """Makes the model's `nn.with_logical_constraint` calls take effect while a step is traced.

  Flax applies them only when rules are set (`nn.logical_axis_rules`) and an abstract mesh is in
  context, which `jax.set_mesh` provides; the deprecated `with mesh:` does not, so constraints are
  silently dropped under it. Enter this outside `jax.jit`, around every call of the step: the rules
  are not part of jit's cache key, so a step first traced without them never gets them.
  """
  rules = rules_for(rules)
  _check_mesh(mesh, rules)
  with jax.sharding.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield
