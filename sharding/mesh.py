"""Device meshes from config: five named axes, `data`, `stage`, `fsdp`, `expert` and `tensor`.

Every mesh has all five axes (unused ones have size 1), so one rule table works on any mesh and
changing the parallelism of a run is a change of sizes only.
"""

import math
from typing import Optional, Sequence

import jax
import ml_collections
import numpy as np
from jax.experimental import mesh_utils

DATA, STAGE, FSDP, EXPERT, TENSOR = 'data', 'stage', 'fsdp', 'expert', 'tensor'
# Ordered by how often an axis communicates, least first: `create_device_mesh` gives the last axes
# the fastest links (data parallelism talks once per step, pipeline stages once per microbatch
# and stage, tensor parallelism in every matmul).
AXES = (DATA, STAGE, FSDP, EXPERT, TENSOR)
_ALLOWED = 'sizes are positive integers or -1 (the rest of the devices)'


def default_mesh_config() -> ml_collections.ConfigDict:
  """Pure data parallelism over every device; see each field for what a larger size buys."""
  mesh = ml_collections.ConfigDict()
  mesh.data = -1     # batch replicas: gradients are all-reduced once per step (-1: the rest)
  mesh.stage = 1     # pipeline stages: each holds a contiguous slice of the scanned layers
  mesh.fsdp = 1      # parameter and optimizer-state shards (ZeRO-3); the batch splits here too
  mesh.expert = 1    # MoE expert shards; outside expert layers the batch splits here too
  mesh.tensor = 1    # attention-head / MLP-hidden / vocabulary shards (Megatron-style)
  # Multi-slice (TPU slices over DCN, or hosts elsewhere): how many slices each axis spans. The
  # sizes above are then per slice, and a mesh axis has (size x dcn size) devices.
  mesh.dcn = ml_collections.ConfigDict()
  mesh.dcn.data = 1     # slices holding separate batch replicas (the usual multi-slice choice)
  mesh.dcn.stage = 1    # slices holding different pipeline stages (activations cross DCN)
  mesh.dcn.fsdp = 1     # slices sharing one set of parameter shards (all-gathers cross DCN)
  mesh.dcn.expert = 1   # slices holding different experts
  mesh.dcn.tensor = 1   # slices splitting each matmul (rarely worth it: DCN is slow)
  return mesh


def _fail(msg: str):
  raise ValueError(f'mesh: {msg}')


def _as_dict(config) -> dict:
  if config is None:
    return {}
  return dict(config.to_dict() if hasattr(config, 'to_dict') else config)


def _check_size(name: str, value, allow_rest: bool):
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    _fail(f'{name}={value!r} is not an integer; {_ALLOWED}')
  if value == 0 or value < -1 or (value == -1 and not allow_rest):
    allowed = _ALLOWED if allow_rest else 'dcn sizes are positive integers (slices per axis)'
    _fail(f'{name}={value} is not allowed; {allowed}')


def _parse(config) -> tuple:
  """(per-slice sizes, dcn sizes) as dicts over AXES, validated; missing axes have size 1."""
  raw = _as_dict(default_mesh_config() if config is None else config)
  dcn_raw = _as_dict(raw.pop('dcn', None))
  for prefix, sizes in (('', raw), ('dcn.', dcn_raw)):
    for name in sizes:
      if name not in AXES:
        _fail(f'unknown axis {prefix + str(name)!r}; axes are {", ".join(AXES)}'
              + ('' if prefix else ' (and dcn for multi-slice)'))
  ici = {a: raw.get(a, 1) for a in AXES}
  dcn = {a: dcn_raw.get(a, 1) for a in AXES}
  for a in AXES:
    _check_size(a, ici[a], allow_rest=True)
    _check_size(f'dcn.{a}', dcn[a], allow_rest=False)
  rest = [a for a in AXES if ici[a] == -1]
  if len(rest) > 1:
    _fail(f'{" and ".join(f"{a}=-1" for a in rest)}: at most one axis may be -1 (the rest)')
  return ici, dcn


def _resolve(ici: dict, n: int, what: str) -> dict:
  """Replaces a -1 size with whatever makes the sizes multiply to `n`."""
  known = math.prod(v for v in ici.values() if v != -1)
  listing = ' x '.join(f'{a}={v}' for a, v in ici.items())
  rest = [a for a, v in ici.items() if v == -1]
  if rest:
    if n % known:
      _fail(f'{rest[0]}=-1 cannot take the rest: {n} {what} do not divide by the other axes '
            f'({listing}, product {known})')
    return dict(ici, **{rest[0]: n // known})
  if known != n:
    _fail(f'{listing} needs {known} {what} but there are {n}; make the sizes multiply to {n} '
          f'or set one of them to -1')
  return ici


def mesh_shape(config, num_devices: int) -> dict:
  """Axis sizes of the mesh `config` describes on `num_devices` devices (dcn folded in)."""
  ici, dcn = _parse(config)
  slices = math.prod(dcn.values())
  if num_devices % slices:
    _fail(f'dcn sizes ask for {slices} slices but {num_devices} devices do not split evenly')
  ici = _resolve(ici, num_devices // slices, 'devices' if slices == 1 else 'devices per slice')
  return {a: ici[a] * dcn[a] for a in AXES}


def make_mesh(config=None, devices: Optional[Sequence[jax.Device]] = None) -> jax.sharding.Mesh:
  """A `jax.sharding.Mesh` with axes AXES, laid out by the topology-aware `mesh_utils` helpers.

  Args:
    config: a ConfigDict (or dict) like `default_mesh_config()`; None means the default.
    devices: the devices to use; all of them by default.

  Raises:
    ValueError: in one line, for an unknown axis, a bad size, or sizes that do not fit the devices.
  """
  devices = list(jax.devices() if devices is None else devices)
  ici, dcn = _parse(config)
  slices = math.prod(dcn.values())
  if slices == 1:
    shape = _resolve(ici, len(devices), 'devices')
    grid = mesh_utils.create_device_mesh([shape[a] for a in AXES], devices)
  else:
    # TPU devices know their slice; elsewhere each process (host) stands for a slice.
    by_process = devices[0].platform != 'tpu'
    attr = 'process_index' if by_process else 'slice_index'
    found = len({getattr(d, attr) for d in devices})
    if found != slices:
      _fail(f'dcn sizes ask for {slices} slices but the devices form {found} '
            f'({"processes" if by_process else "TPU slices"})')
    shape = _resolve(ici, len(devices) // slices, 'devices per slice')
    grid = mesh_utils.create_hybrid_device_mesh([shape[a] for a in AXES], [dcn[a] for a in AXES],
                                                devices, process_is_granule=by_process)
  return jax.sharding.Mesh(grid, AXES)
