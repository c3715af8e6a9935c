"""Variants the quantization runner saved, read back like any run.

`save(path, params, info)` writes a parameter tree (plain arrays and `QTensor`s) with Orbax under
`path/`, then `path.json` (`<workdir>/params/<variant>.json`): every leaf's shape and dtype (a
QTensor's static fields and its children's) and `info` (the variant, its source run). The JSON is
written last and renamed into place, so a directory without one is an interrupted save.
`load(path, shardings)` restores the tree the JSON describes; integers stay integers.

`evaluate` and `sample` are `--mode=eval` and `--mode=sample` with `--variant=SPEC` on a
quantization workdir: the source run's model, unrolled as the runner quantized it (outlier
planting and rescaling are already in the saved tree), with the saved parameters.
"""

import dataclasses
import os
import shutil
from typing import NamedTuple

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath

import sharding
from compression import paths, qtensor, quantize as quantize_lib
from experiments import data, runtime, source, steps, validate
from experiments import workdir as workdir_lib
from experiments.errors import UserError
from models import Transformer, hf, layouts

FORMAT = 1
_STATIC = tuple(f.name for f in dataclasses.fields(qtensor.QTensor) if f.metadata.get('static'))
_CHILDREN = tuple(f.name for f in dataclasses.fields(qtensor.QTensor)
                  if not f.metadata.get('static'))


def json_path(path) -> epath.Path:
  """Where the description of the tree saved at `path` lives: next to it, `<path>.json`."""
  path = epath.Path(path)
  return path.parent / f'{path.name}.json'


def save(path, params, info: dict) -> int:
  """Saves `params` at `path` (replacing an earlier save), then its description; returns the
  bytes of the Orbax directory."""
  path = epath.Path(path)
  json_path(path).unlink(missing_ok=True)   # first: a stale description must not outlive a save
  if path.exists():
    shutil.rmtree(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.abspath(str(path)), params)
  # Closing the checkpointer waited for the save, so the description never names a partial one.
  workdir_lib.write_json(json_path(path), describe(params, info))
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(str(path))
             for f in files)


def describe(params, info: dict) -> dict:
  """{format, info, leaves: {path: {shape, dtype} or {qtensor: static fields, children: {name:
  {shape, dtype} or None}}}} of a parameter tree."""
  leaves = {}
  for key, x in paths.flatten(params).items():
    if isinstance(x, qtensor.QTensor):
      leaves[key] = dict(qtensor={f: getattr(x, f) for f in _STATIC},
                         children={f: _array(getattr(x, f)) for f in _CHILDREN})
    elif hasattr(x, 'shape') and hasattr(x, 'dtype'):
      leaves[key] = _array(x)
    else:
      raise ValueError(f'{key}: a {type(x).__name__} leaf cannot be described (arrays and '
                       f'QTensors can)')
  return dict(format=FORMAT, info=info, leaves=leaves)


def _array(x):
  return None if x is None else dict(shape=list(x.shape), dtype=jnp.dtype(x.dtype).name)


def _struct(d):
  return None if d is None else jax.ShapeDtypeStruct(tuple(d['shape']), jnp.dtype(d['dtype']))


def _tuples(x):
  return tuple(map(_tuples, x)) if isinstance(x, list) else x   # JSON has lists only


def abstract(description: dict):
  """The tree of `jax.ShapeDtypeStruct`s (in QTensors rebuilt with their static fields) that
  `describe` described."""
  def one(d):
    if 'qtensor' not in d:
      return _struct(d)
    return qtensor.QTensor(**{f: _struct(c) for f, c in d['children'].items()},
                           **{f: _tuples(v) for f, v in d['qtensor'].items()})
  return paths.unflatten({k: one(d) for k, d in description['leaves'].items()})


def read(path) -> dict:
  """The description of the tree saved at `path` (one line if there is none)."""
  path = epath.Path(path)
  if not json_path(path).exists():
    if path.exists():
      raise UserError(f'{path} has no {json_path(path).name}: its save was interrupted; rerun '
                      f'--mode=quantize to save it again')
    raise UserError(f'nothing was saved at {path}')
  return workdir_lib.read_json(json_path(path), 'a saved variant\'s description')


def restore(path, abstract_params):
  """Parameters saved at `path`, laid out as `abstract_params` says (shardings for any mesh)."""
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(os.path.abspath(str(path)), abstract_params)


def load(path, shardings=None):
  """The tree saved at `path`, as its description says; with `shardings` (a tree of
  `jax.sharding.Sharding`s like it, e.g. `sharding.tree_shardings`) placed on their mesh."""
  tree = abstract(read(path))
  if shardings is not None:
    tree = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree,
                        shardings)
  return restore(path, tree)


# ---- --mode=eval and --mode=sample with --variant

class Variant(NamedTuple):
  info: dict        # what the runner recorded: variant, source_workdir, source_step, ...
  src: object       # the source run's config on this config's mesh
  model: object     # the source model, unrolled
  tokenizer: object
  params: object    # the saved tree, laid out on the mesh
  placement: runtime.Placement


def check(config, workdir, variant: str):
  """(path, description) of `variant` saved in `workdir`, after checking the config, the saved
  files and the source run (one line each, before any work)."""
  if 'model' in config and 'optimizer' in config:
    raise UserError(f'--variant={variant} reads a variant saved by --mode=quantize: give that '
                    f'run\'s quantization config (experiments/configs/quantize.py), not a '
                    f'training config')
  if 'variants' not in config or 'kv_cache' not in config:
    what = 'a pruning config' if 'variants' in config else 'a config without variants'
    raise UserError(f'--variant={variant} reads variants saved by --mode=quantize; it needs a '
                    f'quantization config (experiments/configs/quantize.py), this is {what}')
  root = epath.Path(workdir) / 'params'
  path = root / (source.slug(variant) or '-')   # '-': no slug, so never a saved folder
  if not path.exists():
    listed = sorted(workdir_lib.read_json(j, 'a saved variant\'s description')['info']
                    ['variant']['spec'] for j in (root.glob('*.json') if root.is_dir() else ()))
    raise UserError(f'--variant={variant} was not saved in {root}; saved: '
                    f'{", ".join(listed) or "none (run --mode=quantize there first)"}')
  description = read(path)
  info = description['info']
  here = os.path.abspath(str(config.source_workdir))
  if here != info['source_workdir']:
    raise UserError(f'--variant={variant} was quantized from {info["source_workdir"]}; '
                    f'config.source_workdir is {here}: pass '
                    f'--config.source_workdir={info["source_workdir"]}')
  if (config.get('hf_path') or '') != info['hf_path']:
    raise UserError(f'--variant={variant} was quantized from hf_path={info["hf_path"]!r}; '
                    f'config.hf_path is {config.get("hf_path")!r}')
  src = source.source_config(config.source_workdir)
  validate.check_kind(src, 'train')
  validate.check_fields(src)
  validate.check_mesh(source.on_mesh(config, src))
  data.check_available(src.data)
  return path, description


def open_variant(config, workdir, variant: str) -> Variant:
  """The saved `variant` of quantization workdir `workdir`, with its source's model and data,
  restored onto the mesh of `config` (unset sizes: the source run's)."""
  path, description = check(config, workdir, variant)
  src = source.on_mesh(config, source.source_config(config.source_workdir))
  tokenizer, model, _ = runtime.setup(src, config.source_workdir)
  cfg = hf.config_from_pretrained(config.hf_path) if config.get('hf_path') else model.config
  model = Transformer(cfg.replace(scan_layers=False))
  placement = runtime.Placement(src, model, steps.make_optimizer(src.optimizer, 1))
  tree = abstract(description)
  _check_fits(variant, tree, placement.abstract.params)
  shardings = sharding.tree_shardings(tree, placement.mesh, placement.rules,
                                      layouts.logical_names(model))
  return Variant(description['info'], src, model, tokenizer, load(path, shardings), placement)


def _check_fits(variant: str, tree, float_tree) -> None:
  saved, wanted = paths.flatten(tree), paths.flatten(float_tree)
  for key in sorted(set(saved) | set(wanted)):
    there = tuple(saved[key].shape) if key in saved else None
    here = tuple(wanted[key].shape) if key in wanted else None
    if there != here:
      raise UserError(f'--variant={variant} does not fit the source run\'s model ({key}: {there} '
                      f'saved, {here} in the model): the source run has changed since')


def evaluate(config, workdir, variant: str) -> dict:
  """Loss of the saved `variant` on the source run's eval split (read-only): the numbers of its
  row in results.json."""
  v = open_variant(config, workdir, variant)
  metrics = runtime.evaluate_params(v.src, v.params, v.model, v.tokenizer, v.placement)
  return dict(step=v.info['source_step'], variant=v.info['variant']['spec'],
              weight_bytes=quantize_lib.weight_bytes(v.params), **metrics)


def sample(config, workdir, variant: str, prompt: str, seed: int = 0) -> str:
  """Continues `prompt` with the saved `variant` (read-only; the source run's sample settings)."""
  v = open_variant(config, workdir, variant)
  return runtime.sample_texts(v.src, v.params, v.model, v.tokenizer, [prompt], seed,
                              strict=True)[0]
