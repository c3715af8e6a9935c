"""Where documents come from: the embedded plays or any TFDS dataset prepared as array_record."""

import os
from typing import Optional

import tensorflow_datasets as tfds

# Importing the module defines (and so registers with TFDS) the embedded corpus's builder.
from experiments.data import shakespeare

EMBEDDED = 'shakespeare'  # config name of the embedded corpus


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


def data_source(name: str, split: str, root: Optional[str] = None):
  """Random-access source of examples (dicts of numpy values, text as bytes) for a split."""
  return tfds.data_source(builder_name(name), split=split, data_dir=data_dir(root))


def as_text(value) -> str:
  """A text feature as str (TFDS data sources give bytes)."""
  return value.decode('utf-8') if isinstance(value, bytes) else str(value)
