"""Reading and writing Hugging Face checkpoint directories: config.json and weight files.

Safetensors files are read and written with NumPy (bfloat16 through `ml_dtypes`), so neither
needs PyTorch; only the legacy `pytorch_model.bin` format imports torch, and only when present.
"""

import json
import pathlib
import re
from typing import Optional

import ml_dtypes  # noqa: F401 (registers bfloat16 with NumPy, which safetensors needs for BF16)
import numpy as np
from safetensors import numpy as st_numpy
from safetensors import safe_open

SAFETENSORS = 'model.safetensors'
SAFETENSORS_INDEX = 'model.safetensors.index.json'
TORCH_BIN = 'pytorch_model.bin'
TORCH_BIN_INDEX = 'pytorch_model.bin.index.json'


def read_config(path: pathlib.Path) -> dict:
  """The parsed config.json of a checkpoint directory."""
  file = path / 'config.json'
  if not file.is_file():
    raise FileNotFoundError(f'{path}: no config.json (not a Hugging Face checkpoint directory?)')
  return json.loads(file.read_text())


def write_config(path: pathlib.Path, config: dict) -> None:
  (path / 'config.json').write_text(json.dumps(config, indent=2, sort_keys=True) + '\n')


class Checkpoint:
  """The tensors of a checkpoint directory, by name; safetensors are read lazily (memory-mapped)."""

  def __init__(self, path: pathlib.Path):
    self.path = path
    self._files = {}    # tensor name -> open safetensors file
    self._arrays = {}   # tensor name -> array (pytorch_model.bin, read whole)
    if (path / SAFETENSORS_INDEX).is_file():
      self._open_safetensors(self._shards(path / SAFETENSORS_INDEX))
    elif (path / SAFETENSORS).is_file():
      self._open_safetensors([path / SAFETENSORS])
    elif (path / TORCH_BIN_INDEX).is_file():
      for file in self._shards(path / TORCH_BIN_INDEX):
        self._arrays.update(_read_torch_bin(file))
    elif (path / TORCH_BIN).is_file():
      self._arrays.update(_read_torch_bin(path / TORCH_BIN))
    else:
      raise FileNotFoundError(f'{path}: no weight files (looked for {SAFETENSORS}, '
                              f'{SAFETENSORS_INDEX}, {TORCH_BIN}, {TORCH_BIN_INDEX})')

  def _shards(self, index: pathlib.Path) -> list:
    names = sorted(set(json.loads(index.read_text())['weight_map'].values()))
    missing = [n for n in names if not (self.path / n).is_file()]
    if missing:
      raise FileNotFoundError(f'{self.path}: {index.name} lists missing weight files: '
                              f'{", ".join(missing)}')
    return [self.path / n for n in names]

  def _open_safetensors(self, files) -> None:
    for file in files:
      handle = safe_open(str(file), framework='numpy')
      for name in handle.keys():
        self._files[name] = handle

  def names(self) -> set:
    return set(self._files) | set(self._arrays)

  def shape(self, name: str) -> tuple:
    if name in self._arrays:
      return tuple(self._arrays[name].shape)
    return tuple(self._files[name].get_slice(name).get_shape())

  def get(self, name: str) -> np.ndarray:
    if name in self._arrays:
      return self._arrays[name]
    return self._files[name].get_tensor(name)


def _read_torch_bin(file: pathlib.Path) -> dict:
  try:
    import torch  # only this legacy format needs it
  except ImportError:
    raise ImportError(f'{file}: reading pytorch_model.bin needs PyTorch (pip install torch); '
                      'safetensors checkpoints do not') from None
  state = torch.load(file, map_location='cpu', weights_only=True, mmap=True)
  out = {}
  for name, t in state.items():
    t = t.detach().contiguous()
    # NumPy has no bfloat16: reinterpret the bits, which is exact.
    out[name] = (t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
                 if t.dtype == torch.bfloat16 else t.numpy())
  return out


def write_safetensors(path: pathlib.Path, tensors: dict,
                      max_shard_bytes: Optional[int] = None) -> None:
  """Writes `model.safetensors`, or numbered shards plus an index when over `max_shard_bytes`."""
  # Earlier weights left in the directory would shadow or mix with the new ones when loading.
  for old in path.glob('model*.safetensors*'):
    if re.fullmatch(r'model(-\d+-of-\d+)?\.safetensors(\.index\.json)?', old.name):
      old.unlink()
  tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
  metadata = {'format': 'pt'}   # transformers refuses safetensors files without a known format
  total = sum(v.nbytes for v in tensors.values())
  if max_shard_bytes is None or total <= max_shard_bytes:
    st_numpy.save_file(tensors, str(path / SAFETENSORS), metadata=metadata)
    return
  shards, size = [[]], 0
  for name, value in tensors.items():
    if shards[-1] and size + value.nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(name)
    size += value.nbytes
  weight_map = {}
  for i, names in enumerate(shards):
    file = f'model-{i + 1:05d}-of-{len(shards):05d}.safetensors'
    st_numpy.save_file({n: tensors[n] for n in names}, str(path / file), metadata=metadata)
    weight_map.update({n: file for n in names})
  index = {'metadata': {'total_size': total}, 'weight_map': weight_map}
  (path / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + '\n')
