"""Hugging Face checkpoints in and out: `from_pretrained` and `save_pretrained`.

    model, params = hf.from_pretrained('/path/to/llama', dtype='bfloat16', scan_layers=True)
    logits = model.apply({'params': params}, tokens)
    hf.save_pretrained(model, params, '/path/to/out')   # transformers can load this directory

Supported classes are listed in `models.hf_architectures.ARCHITECTURES`. Safetensors checkpoints
(single or sharded) load without PyTorch; `pytorch_model.bin` needs it.
"""

import math
import pathlib
import re
from typing import Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np

from models import hf_files
from models.config import ModelConfig
from models.hf_architectures import ARCHITECTURES, Architecture, Tensor, default_architecture
from models.transformer import Transformer, stack_layers, unstack_layers


def from_pretrained(path, **overrides):
  """Loads a Hugging Face checkpoint directory as `(Transformer, params)`.

  Args:
    path: directory with config.json and model.safetensors (or shards with their index, or
      pytorch_model.bin).
    **overrides: `ModelConfig` fields to change, e.g. dtype='bfloat16', scan_layers=True,
      remat='full'. Parameters are returned in `param_dtype` (float32 unless overridden), in the
      stacked layout when `scan_layers` is set.

  Returns:
    The model and its parameters as plain jnp arrays.
  """
  path = pathlib.Path(path)
  arch = _architecture(hf_files.read_config(path), path)
  cfg = config_from_pretrained(path, **overrides)
  if cfg.n_unique_layers != cfg.n_layers:
    raise ValueError(f'n_unique_layers={cfg.n_unique_layers}: a checkpoint holds every layer, '
                     'so loaded layers cannot be shared')
  params = _load_params(path, arch, cfg.replace(scan_layers=False))
  if cfg.scan_layers:
    params = stack_layers(params, cfg)
  return Transformer(cfg), params


def config_from_pretrained(path, **overrides) -> ModelConfig:
  """The `ModelConfig` of a Hugging Face checkpoint directory, reading only its config.json."""
  path = pathlib.Path(path)
  hf_config = hf_files.read_config(path)
  return _architecture(hf_config, path).config_from_hf(hf_config).replace(**overrides)


def _load_params(path: pathlib.Path, arch: Architecture, cfg: ModelConfig) -> dict:
  """Reads, checks and converts the checkpoint's tensors into an unrolled parameter tree."""
  shapes = _param_shapes(cfg)
  ckpt = hf_files.Checkpoint(path)
  names = _checkpoint_names(ckpt, arch)
  for layout in (arch.tensors,) + arch.other_layouts:   # the first one the checkpoint has
    tensors = _checked_tensors(arch, cfg, shapes, layout)
    expected = {t.name: _hf_shape(t, shapes) for t in tensors}
    if not set(expected) - set(names):
      break
  else:
    tensors = _checked_tensors(arch, cfg, shapes)
    expected = {t.name: _hf_shape(t, shapes) for t in tensors}
  missing = sorted(set(expected) - set(names))
  if missing:
    raise ValueError(f'{path}: checkpoint lacks {len(missing)} tensor(s) that config.json implies: '
                     f'{_list(missing)}')
  # A tied head may also be stored as its own copy of the embedding; that copy is not read.
  buffers = re.compile(arch.buffers + (r'|lm_head\.weight' if cfg.tie_embeddings else ''))
  unexpected = sorted(n for n in set(names) - set(expected) if not buffers.fullmatch(n))
  if unexpected:
    raise ValueError(f'{path}: checkpoint has {len(unexpected)} unexpected tensor(s) for '
                     f'{arch.name}: {_list(unexpected)}')
  dtype = jnp.dtype(cfg.param_dtype)
  flat, expert_slices = {}, {}
  for t in tensors:
    found = ckpt.shape(names[t.name])
    if found != expected[t.name]:
      raise ValueError(f'{path}: tensor {t.name!r} has shape {found}, expected '
                       f'{expected[t.name]} from config.json')
    array = np.asarray(ckpt.get(names[t.name])).astype(dtype, copy=False)
    for leaf, part in zip(t.leaves, _from_hf(t, array, shapes)):
      if t.expert is None:
        flat[tuple(leaf.split('/'))] = jnp.asarray(part)
      else:
        expert_slices.setdefault(leaf, {})[t.expert] = part
  for leaf, parts in expert_slices.items():
    flat[tuple(leaf.split('/'))] = jnp.asarray(np.stack([parts[e] for e in sorted(parts)]))
  return flax.traverse_util.unflatten_dict(flat)


def save_pretrained(model: Transformer, params, path, architecture: Optional[str] = None,
                    max_shard_bytes: Optional[int] = None) -> None:
  """Writes a directory that `transformers.AutoModelForCausalLM.from_pretrained` loads.

  Args:
    model: the `Transformer` whose config describes `params`.
    params: its parameters, unrolled or stacked (`scan_layers`), plain or boxed.
    path: output directory, created if needed.
    architecture: HF class to write, e.g. 'MistralForCausalLM'; by default the one that fits
      the config (learned positions: GPT-2; a sliding window: Mistral; q/k/v-only biases:
      Qwen2; otherwise Llama).
    max_shard_bytes: split the weights into shards of at most this size (with an index).
  """
  cfg = model.config
  if cfg.n_unique_layers != cfg.n_layers:
    raise ValueError(f'n_unique_layers={cfg.n_unique_layers} != n_layers={cfg.n_layers}: '
                     'Hugging Face checkpoints cannot share layers')
  if architecture is None:
    arch = default_architecture(cfg)
  elif architecture in ARCHITECTURES:
    arch = ARCHITECTURES[architecture]
  else:
    raise ValueError(f'unsupported architecture {architecture!r}; supported: {_supported()}')
  problems = arch.problems(cfg)
  if problems:
    raise ValueError(f'config cannot be written as {arch.name}: {"; ".join(problems)}')
  params = flax.core.meta.unbox(params)
  if cfg.scan_layers:
    params = unstack_layers(params, cfg)
  unrolled = cfg.replace(scan_layers=False)
  shapes = _param_shapes(unrolled)
  flat = {'/'.join(k): v for k, v in flax.traverse_util.flatten_dict(params).items()}
  wrong = sorted(k for k in shapes if k not in flat or tuple(flat[k].shape) != shapes[k])
  wrong += sorted(set(flat) - set(shapes))
  if wrong:
    raise ValueError(f'params do not match the model config at: {_list(wrong)}')
  dtype = jnp.dtype(cfg.param_dtype)   # the dtype config.json declares
  tensors = {}
  for t in _checked_tensors(arch, unrolled, shapes):
    arrays = [np.asarray(jax.device_get(flat[leaf])).astype(dtype, copy=False) for leaf in t.leaves]
    if t.expert is not None:
      arrays = [a[t.expert] for a in arrays]
    tensors[t.name] = _to_hf(t, arrays)
  path = pathlib.Path(path)
  path.mkdir(parents=True, exist_ok=True)
  # `torch_dtype` is the key transformers used before v5.
  hf_files.write_config(path, dict(arch.config_to_hf(cfg), architectures=[arch.name],
                                   model_type=arch.model_type, dtype=cfg.param_dtype,
                                   torch_dtype=cfg.param_dtype))
  hf_files.write_safetensors(path, tensors, max_shard_bytes)


def _supported() -> str:
  return ', '.join(sorted(ARCHITECTURES))


def _list(names, limit: int = 6) -> str:
  more = f' (and {len(names) - limit} more)' if len(names) > limit else ''
  return ', '.join(names[:limit]) + more


def _architecture(hf_config: dict, path: pathlib.Path) -> Architecture:
  names = hf_config.get('architectures') or []
  by_type = [a.name for a in ARCHITECTURES.values() if a.model_type == hf_config.get('model_type')]
  name = names[0] if names else (by_type[0] if by_type else hf_config.get('model_type'))
  if name not in ARCHITECTURES:
    raise ValueError(f'{path}: unsupported architecture {name!r}; supported: {_supported()}')
  return ARCHITECTURES[name]


def _checkpoint_names(ckpt: hf_files.Checkpoint, arch: Architecture) -> dict:
  """Our tensor names -> the checkpoint's, which may lack the base-model prefix."""
  names = ckpt.names()
  if any(n.startswith(arch.prefix) for n in names):
    return {n: n for n in names}
  return {(n if n.startswith('lm_head.') else arch.prefix + n): n for n in names}


def _param_shapes(cfg: ModelConfig) -> dict:
  """'blocks_0/attn/query/kernel' -> shape, for every parameter of the unrolled model."""
  tokens = jnp.zeros((1, 1), jnp.int32)
  boxed = jax.eval_shape(lambda: Transformer(cfg).init(jax.random.key(0), tokens))
  flat = flax.traverse_util.flatten_dict(flax.core.meta.unbox(boxed['params']))
  return {'/'.join(k): tuple(v.shape) for k, v in flat.items()}


def _checked_tensors(arch: Architecture, cfg: ModelConfig, shapes: dict, layout=None):
  """The architecture's tensor map, checked to cover every parameter exactly once."""
  tensors = (layout or arch.tensors)(cfg)
  leaves = sorted({leaf for t in tensors for leaf in t.leaves})   # expert slices share a leaf
  if leaves != sorted(shapes):
    odd = sorted(set(leaves) ^ set(shapes))
    raise ValueError(f'{arch.name} tensor map does not match the model parameters: {_list(odd)}')
  return tensors


def _slice_shapes(t: Tensor, shapes: dict) -> dict:
  """Leaf shapes as this tensor sees them: one expert's slice where it holds one."""
  return shapes if t.expert is None else {leaf: shapes[leaf][1:] for leaf in t.leaves}


def _hf_shape(t: Tensor, shapes: dict) -> tuple:
  shapes = _slice_shapes(t, shapes)
  if t.layout == 'experts':   # [experts, out, in] from leaves [experts, in, out]
    e, n_in = shapes[t.leaves[0]][:2]
    return (e, sum(shapes[leaf][2] for leaf in t.leaves), n_in)
  if t.layout == 'vector':
    return (sum(math.prod(shapes[leaf]) for leaf in t.leaves),)
  n_in = math.prod(shapes[t.leaves[0]][:t.n_in])
  n_out = sum(math.prod(shapes[leaf][t.n_in:]) for leaf in t.leaves)
  return (n_out, n_in) if t.layout == 'linear' else (n_in, n_out)


def _to_hf(t: Tensor, arrays) -> np.ndarray:
  if t.layout == 'experts':
    return np.ascontiguousarray(np.concatenate(arrays, axis=2).transpose(0, 2, 1))
  if t.layout == 'vector':
    return np.concatenate([a.reshape(-1) for a in arrays])
  m = np.concatenate([a.reshape(math.prod(a.shape[:t.n_in]), -1) for a in arrays], axis=1)
  return m.T if t.layout == 'linear' else m


def _from_hf(t: Tensor, array: np.ndarray, shapes: dict):
  shapes = _slice_shapes(t, shapes)
  if t.layout == 'experts':
    sizes = [shapes[leaf][2] for leaf in t.leaves]
    parts = np.split(array.transpose(0, 2, 1), np.cumsum(sizes)[:-1], axis=2)
    return [np.ascontiguousarray(part) for part in parts]
  if t.layout == 'linear':
    array = array.T
  sizes = [math.prod(shapes[leaf] if t.layout == 'vector' else shapes[leaf][t.n_in:])
           for leaf in t.leaves]
  parts = np.split(array, np.cumsum(sizes)[:-1], axis=-1)
  return [np.ascontiguousarray(p).reshape(shapes[leaf]) for p, leaf in zip(parts, t.leaves)]
