"""Multi-process runs through JAX's own runtime (`jax.distributed`): start-up and small helpers.

One Python process per host (or per GPU) runs the same program; `initialize` joins them before any
JAX computation. After that `jax.devices()` lists every device of every process, a mesh spans
them all and jitted steps communicate across hosts by themselves.

    sharding.initialize()                                   # Cloud TPU, Slurm, Open MPI: automatic
    sharding.initialize('10.0.0.1:1234', num_processes=2, process_id=0)   # anywhere else
"""

import glob
import hashlib
import importlib.util
import logging
import os
import pathlib
from typing import Optional

import jax
import numpy as np
from jax.experimental import multihost_utils

MODES = ('auto', 'on', 'off')


def _on_cloud_tpu_vm() -> bool:
  """A TPU VM: libtpu installed and a Google accelerator (PCI vendor 0x1ae0) attached."""
  if importlib.util.find_spec('libtpu') is None:
    return False
  vendors = glob.glob('/sys/bus/pci/devices/*/vendor')
  return any(pathlib.Path(v).read_text().strip() == '0x1ae0' for v in vendors)


def _cluster_detected() -> bool:
  """True where `jax.distributed.initialize()` finds its arguments by itself and is needed."""
  env = os.environ
  if ',' in env.get('TPU_WORKER_HOSTNAMES', '') or env.get('MEGASCALE_COORDINATOR_ADDRESS'):
    return True   # a multi-host TPU slice (GKE), or several slices
  if _on_cloud_tpu_vm():
    return True   # the metadata server names the slice's workers (one host is fine too)
  for name in ('SLURM_NTASKS', 'OMPI_COMM_WORLD_SIZE'):
    if env.get(name, '1').isdigit() and int(env.get(name, '1')) > 1:
      return True
  return False


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None, mode: str = 'auto') -> bool:
  """Joins this process to a multi-process run; returns whether it did.

  mode 'auto' joins when an address is given or a launcher is detected (a Cloud TPU VM, a GKE
  TPU slice, Slurm or Open MPI with several tasks), 'on' always calls
  `jax.distributed.initialize` (its own detection fills in what is not given), 'off' never does.
  With an explicit address, `num_processes` and `process_id` are required.
  """
  if mode not in MODES:
    raise ValueError(f'distributed mode {mode!r} is not one of {", ".join(MODES)}')
  explicit = coordinator_address is not None
  if explicit:
    if mode == 'off':
      raise ValueError('a coordinator address was given with distributed mode off')
    if not isinstance(num_processes, int) or num_processes < 1:
      raise ValueError(f'num_processes={num_processes!r}: give the number of processes (>= 1) '
                       f'with a coordinator address')
    if not isinstance(process_id, int) or not 0 <= process_id < num_processes:
      raise ValueError(f'process_id={process_id!r} must be in [0, {num_processes}) with '
                       f'num_processes={num_processes}')
  elif num_processes is not None or process_id is not None:
    raise ValueError('num_processes/process_id need a coordinator address (host:port of '
                     'process 0)')
  if mode == 'off' or (mode == 'auto' and not explicit and not _cluster_detected()):
    return False
  jax.distributed.initialize(coordinator_address, num_processes, process_id)
  logging.info('process %d of %d, %d local / %d global devices', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  return True


def sync(name: str) -> None:
  """Waits until every process reaches the barrier `name` (a no-op in a single process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def allgather_bytes(data: bytes) -> list:
  """Every process's `data`, in process order (for small things: iterator states, digests)."""
  if jax.process_count() == 1:
    return [data]
  lengths = multihost_utils.process_allgather(np.array([len(data)], np.int32))
  longest = max(int(np.max(lengths)), 1)   # all-empty data still gathers one padding byte
  padded = np.zeros((longest,), np.uint8)
  padded[:len(data)] = np.frombuffer(data, np.uint8)
  rows = multihost_utils.process_allgather(padded)
  return [bytes(row[:int(n)]) for row, n in zip(np.asarray(rows).reshape(-1, longest),
                                               np.asarray(lengths).reshape(-1))]


def assert_same(what: str, data: bytes) -> None:
  """Raises, in one line, if `data` (e.g. a tokenizer) differs between processes."""
  digests = [d.hex()[:12] for d in allgather_bytes(hashlib.sha256(data).digest())]
  if len(set(digests)) > 1:
    raise ValueError(f'{what} differs between processes (sha256 prefixes by process: '
                     f'{", ".join(digests)}); give every host the same files, e.g. a shared '
                     f'data_dir')
