"""Mixing a second training dataset by rows: its share of rows, exact resume, config checks, and
data configs saved before `mix` existed."""

import json

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

import experiments.data as data
from experiments import validate
from experiments.errors import UserError
from tests.runs import tiny_config


class MixLetters(tfds.core.GeneratorBasedBuilder):
  """Documents of nothing but the letter Q, so a row from this dataset is easy to spot."""
  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
        {'text': tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples()}

  def _generate_examples(self):
    for i in range(30):
      yield str(i), {'text': 'Q' * (10 + i)}


@pytest.fixture(scope='module')
def mix_dir(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('mix'))
  MixLetters(data_dir=root, file_format='array_record').download_and_prepare()
  return root


def config(data_dir, mix_dir=None, **mix):
  c = data.default_config()
  c.data_dir = str(data_dir)
  c.train_split = 'validation'   # the smaller split: quicker to shuffle and read
  c.seq_len, c.shuffle_window = 32, 16
  if mix_dir is not None:
    c.mix.update({'name': 'mix_letters', 'data_dir': mix_dir, **mix})
  return c


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def q_rows(batch) -> np.ndarray:
  """Which rows come from `MixLetters`: every real token is Q, bos or eos."""
  q = data.ByteTokenizer().encode('Q')[0]
  real = batch['segment_ids'] > 0
  return np.all(~real | np.isin(batch['inputs'], [q, 1, 2]), axis=1)


def test_weight_one_gives_only_mix_rows(data_dir, mix_dir):
  c = config(data_dir, mix_dir, weight=1.0)
  data.check_config(c)
  data.check_available(c)
  data.prepare(c)   # both ready: nothing to do
  for batch in take(data.train_iterator(c, data.ByteTokenizer(), batch_size=8, seed=0), 5):
    assert q_rows(batch).all()


@pytest.mark.parametrize('weight', [0.25, 0.5])
def test_weight_is_the_fraction_of_mix_rows(data_dir, mix_dir, weight):
  c = config(data_dir, mix_dir, weight=weight)
  batches = take(data.train_iterator(c, data.ByteTokenizer(), batch_size=8, seed=1), 40)
  share = np.mean(np.concatenate([q_rows(b) for b in batches]))
  # Rows interleave in fixed proportions; the window shuffle moves them by < 16 of 320 rows.
  assert abs(share - weight) <= 0.05
  without = take(data.train_iterator(config(data_dir), data.ByteTokenizer(), batch_size=8,
                                     seed=1), 10)
  assert not np.concatenate([q_rows(b) for b in without]).any()


@pytest.mark.parametrize('k', [0, 7])
def test_mixed_iterator_restores_exact_position(data_dir, mix_dir, k):
  c = config(data_dir, mix_dir, weight=0.3)
  tok = data.ByteTokenizer()
  it = data.train_iterator(c, tok, batch_size=4, seed=5)
  take(it, k)
  saved = data.iterator_state_to_json(it.get_state())
  expected = take(it, 6)
  fresh = data.train_iterator(c, tok, batch_size=4, seed=5)
  fresh.set_state(data.iterator_state_from_json(saved))
  for a, b in zip(take(fresh, 6), expected):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_configs_saved_without_mix_work_as_before(data_dir):
  c = config(data_dir)
  old = ml_collections.ConfigDict({k: v for k, v in c.to_dict().items() if k != 'mix'})
  assert 'mix' not in old and data.mix_config(old) is None
  data.check_config(old)
  data.check_available(old)
  tok = data.ByteTokenizer()
  it_old, it_new = (data.train_iterator(x, tok, batch_size=4, seed=2) for x in (old, c))
  for a, b in zip(take(it_old, 3), take(it_new, 3)):
    np.testing.assert_array_equal(a['inputs'], b['inputs'])
  # The iterator state (saved in checkpoints) keeps its layout, so old checkpoints resume.
  assert (data.iterator_state_to_json(it_old.get_state())
          == data.iterator_state_to_json(it_new.get_state()))
  # A whole run config as an older run's config.json holds it passes the start-up checks.
  run = json.loads(tiny_config(data_dir).to_json_best_effort())
  del run['data']['mix']
  validate.check_fields(ml_collections.ConfigDict(run))


@pytest.mark.parametrize('mix, message', [
    (dict(weight=0.0), r'mix.weight=0.0 must be in \(0, 1\]'),
    (dict(weight=1.5), r'mix.weight=1.5 must be in \(0, 1\]'),
    (dict(weight=float('nan')), r'mix.weight=nan must be in \(0, 1\]'),
    (dict(split=''), "mix.split='' must be a non-empty string"),
    (dict(name='no_such_mix'), "mix.name='no_such_mix' is not prepared under"),
])
def test_bad_mix_configs_fail_with_one_clear_line(data_dir, mix_dir, mix, message):
  with pytest.raises(ValueError, match=message) as info:
    data.check_config(config(data_dir, mix_dir, **mix))
  assert '\n' not in str(info.value)


@pytest.mark.parametrize('mix, message', [
    (dict(split='validation'), "mix.split='validation'"),
    (dict(text_key='body'), "mix.text_key='body' is not a feature of 'mix_letters'"),
])
def test_check_available_reads_the_mix_split_and_text_key(data_dir, mix_dir, mix, message):
  c = config(data_dir, mix_dir, **mix)
  data.check_config(c)
  with pytest.raises(UserError, match=message) as info:
    data.check_available(c)
  assert '\n' not in str(info.value)
