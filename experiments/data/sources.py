"""Where documents come from: the embedded plays or any TFDS dataset prepared as array_record."""

import os
import re
from typing import Optional

import tensorflow_datasets as tfds
from array_record.python import array_record_module

from experiments.errors import UserError

# Importing the module defines (and so registers with TFDS) the embedded corpus's builder.
from experiments.data import shakespeare

EMBEDDED = 'shakespeare'  # config name of the embedded corpus
# A teacher's generations (experiments/seqkd.py): their default name, and the record file in
# their dataset folder that tells them apart from datasets `tfds build` makes.
GENERATED_NAME = 'seqkd'
GENERATED_RECORD = 'seqkd.json'


def builder_name(name: str) -> str:
  """The TFDS name that `name` reads: the embedded corpus has its own builder."""
  return shakespeare.BUILDER_NAME if name == EMBEDDED else name


def data_dir(data_dir: Optional[str]) -> str:
  """The folder prepared data (and tokenizer caches) live in; None means the TFDS default."""
  return os.path.expanduser(data_dir or tfds.core.constants.DATA_DIR)


def _prepared_dir(name: str, root: str) -> Optional[str]:
  """The prepared version folder of `name` ('lm1b', 'c4/en', 'c4/en:3.1.0') under `root`."""
  base, _, version = name.partition(':')
  folder = os.path.join(root, *base.split('/'))
  if version:
    folder = os.path.join(folder, version)
  elif os.path.isdir(folder):
    versions = sorted((v for v in os.listdir(folder) if v[:1].isdigit()),
                      key=lambda v: tuple(int(x) for x in v.split('.') if x.isdigit()))
    folder = os.path.join(folder, versions[-1]) if versions else folder
  return folder if os.path.exists(os.path.join(folder, 'dataset_info.json')) else None


def is_known(name: str, root: Optional[str] = None) -> bool:
  """Whether `name` is the embedded corpus, a registered TFDS builder, or already prepared."""
  if name == EMBEDDED:
    return True
  # Text datasets such as c4 register on import of this module (cheap, no TensorFlow).
  import tensorflow_datasets.text  # noqa: F401 pylint: disable=g-import-not-at-top,unused-import
  try:
    tfds.builder_cls(name.split('/')[0].split(':')[0])
    return True
  except tfds.core.registered.DatasetNotFoundError:
    return _prepared_dir(name, data_dir(root)) is not None


def prepare(name: str, root: Optional[str] = None) -> None:
  """Builds the embedded corpus if missing; checks that any other dataset is ready to read."""
  root = data_dir(root)
  if name == EMBEDDED:
    builder = shakespeare.ShakespearePlays(data_dir=root, file_format='array_record')
    if not builder.is_prepared():
      tfds.disable_progress_bar()
      try:
        builder.download_and_prepare()
      except Exception:  # pylint: disable=broad-except
        # Hosts sharing a data_dir may race; losing is fine once the winner's data is there.
        fresh = shakespeare.ShakespearePlays(data_dir=root, file_format='array_record')
        if not fresh.is_prepared():
          raise
    return
  if _prepared_dir(name, root) is None:
    raise FileNotFoundError(
        f'dataset {name!r} is not prepared under {root}; on a machine with network access run '
        f'`tfds build {name} --file_format=array_record --data_dir={root}`')


def _split_names(split: str) -> list:
  """'train[:90%]+validation' -> ['train', 'validation']."""
  return [part.strip() for part in re.sub(r'\[[^\]]*\]', '', split).split('+')]


def check(name: str, root: Optional[str], splits: dict, text_key: str,
          text_field: str = 'text_key') -> None:
  """Raises UserError unless `name` can be read: prepared (or the embedded corpus, which is
  built on first use), with the `splits` ({config field: split}) non-empty, a `text_key`
  feature (the config field `text_field`), and whole shard files. Reads metadata and shard
  footers only.
  """
  root = data_dir(root)

  def rebuild(target: str) -> str:
    if name == EMBEDDED:
      return f'delete {target} and run again (the embedded corpus is rebuilt in seconds)'
    if os.path.exists(os.path.join(target, GENERATED_RECORD)):
      return (f'delete {target} and run the command that generated it again (a teacher\'s '
              f'generations: --mode=distill with a `seq` student rewrites them)')
    return (f'delete {target} and run `tfds build {name} --file_format=array_record '
            f'--data_dir={root}` on a machine with network access')
  if name == EMBEDDED:
    folder = os.path.join(root, shakespeare.BUILDER_NAME,
                          str(shakespeare.ShakespearePlays.VERSION))
    if not os.path.exists(folder):   # not built yet: check against what the builder will make
      for field, split in splits.items():
        _check_split_syntax(field, split, shakespeare.SPLITS)
      if text_key not in shakespeare.FEATURES:
        raise UserError(f'data config: {text_field}={text_key!r} is not a feature of {name!r} '
                        f'(features: {", ".join(shakespeare.FEATURES)})')
      return
  else:
    folder = _prepared_dir(name, root) or _unprepared_dir(name, root)
    if folder is None:
      raise UserError(f'data config: dataset {name!r} is not prepared under {root}; '
                      + (f'a teacher\'s generations are written there by --mode=distill with a '
                         f'`seq` student (or config.seqkd.data_dir)' if name == GENERATED_NAME
                         else f'on a machine with network access run `tfds build {name} '
                              f'--file_format=array_record --data_dir={root}`'))
  info_file = os.path.join(folder, 'dataset_info.json')
  if not os.path.exists(info_file):
    raise UserError(f'damaged data: {info_file} is missing; {rebuild(folder)}')
  try:
    builder = tfds.builder_from_directory(folder)
    features = list(builder.info.features.keys())
  except Exception as e:  # noqa: BLE001 - any failure to read the metadata is damage
    raise UserError(f'damaged data: the metadata in {folder} cannot be read '
                    f'({type(e).__name__}); {rebuild(folder)}') from None
  if text_key not in features:
    raise UserError(f'data config: {text_field}={text_key!r} is not a feature of {name!r} '
                    f'(features: {", ".join(features)})')
  for field, split in splits.items():
    try:
      info = builder.info.splits[split]
    except (ValueError, KeyError) as e:
      raise UserError(f'data config: {field}={split!r}: '
                      f'{str(e).strip().splitlines()[0]}') from None
    if info.num_examples == 0:
      raise UserError(f'data config: {field}={split!r} of {name!r} is empty')
    for instruction in info.file_instructions:
      _check_shard(instruction.filename, instruction.examples_in_shard, rebuild(folder))


def _check_split_syntax(field: str, split: str, known) -> None:
  try:
    tfds.core.ReadInstruction.from_spec(split)
  except (ValueError, AssertionError) as e:
    raise UserError(f'data config: {field}={split!r} is not a split expression '
                    f'({str(e).strip().splitlines()[0]})') from None
  unknown = [n for n in _split_names(split) if n not in known]
  if unknown:
    raise UserError(f'data config: {field}={split!r}: unknown split {unknown[0]!r}; known: '
                    f'{", ".join(known)}')


def _check_shard(path: str, expected: int, fix: str) -> None:
  """A shard file (on a local disk) exists and holds the records its metadata promises."""
  if '://' in path:   # object stores: opening every shard's footer would take minutes
    return
  if not os.path.exists(path):
    raise UserError(f'damaged data: {path} is missing; {fix}')
  try:
    found = array_record_module.ArrayRecordReader(path).num_records()
  except Exception as e:  # noqa: BLE001 - an unreadable footer is damage too
    found = f'an unreadable file ({type(e).__name__})'
  if found != expected:
    raise UserError(f'damaged data: {path} holds {found} records, its metadata says {expected}; '
                    f'{fix}')


def _unprepared_dir(name: str, root: str) -> Optional[str]:
  """A version folder of `name` that exists without its metadata (a damaged preparation)."""
  base, _, version = name.partition(':')
  folder = os.path.join(root, *base.split('/'))
  if not os.path.isdir(folder):
    return None
  versions = [v for v in os.listdir(folder) if v[:1].isdigit() and (not version or v == version)]
  return os.path.join(folder, sorted(versions)[-1]) if versions else None


def data_source(name: str, split: str, root: Optional[str] = None):
  """Random-access source of examples (dicts of numpy values, text as bytes) for a split."""
  return tfds.data_source(builder_name(name), split=split, data_dir=data_dir(root))


def as_text(value) -> str:
  """A text feature as str (TFDS data sources give bytes)."""
  return value.decode('utf-8') if isinstance(value, bytes) else str(value)
