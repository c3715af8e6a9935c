"""Data pipeline: markdown stripping, the embedded corpus, tokenizers, packing, sharding, state."""

import collections
import os

import grain
import numpy as np
import pytest
import tensorflow_datasets as tfds

import experiments.data as data
from experiments.data import pipeline, shakespeare, sources, tokenizers

SEQ_LEN = 64


class TinyLmCorpus(tfds.core.GeneratorBasedBuilder):
  """A stand-in for lm1b / c4: a registered TFDS text dataset read by name."""
  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
        {'text': tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples(40), 'validation': self._generate_examples(5)}

  def _generate_examples(self, n):
    for i in range(n):
      yield str(i), {'text': f'Sentence number {i} of the tiny corpus, café {"ab" * i}.'}


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('tfds'))
  data.prepare(config(root))
  TinyLmCorpus(data_dir=root, file_format='array_record').download_and_prepare()
  return root


def config(root, **overrides):
  c = data.default_config()
  c.data_dir = root
  c.seq_len = SEQ_LEN
  c.shuffle_window = 16
  c.update(overrides)
  return c


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_strip_markdown():
  md = ('# Macbeth\n\n## ACT I\n\n## SCENE I. A desert place.\n\n'
        '_Thunder and lightning. Enter three Witches_\n\n'
        '**First Witch**  \nWhen shall we three meet again  \nIn thunder?\n\n'
        '### SCENE II. A camp near Forres.\n\n'
        '*Enter DUNCAN, with\nAttendants*\n\n'
        '**DUNCAN**  \n__\\[Aside]_ What bloody man\\-is that?  \n\n\n')
  assert shakespeare.split_scenes(md) == [
      'Macbeth\n\nACT I\n\nSCENE I. A desert place.\n\n'
      'Thunder and lightning. Enter three Witches\n\n'
      'FIRST WITCH:\nWhen shall we three meet again\nIn thunder?\n',
      'SCENE II. A camp near Forres.\n\nEnter DUNCAN, with\nAttendants\n\n'
      'DUNCAN:\n[Aside] What bloody man-is that?\n']
  assert shakespeare.strip_markdown(md) == '\n'.join(shakespeare.split_scenes(md))


def test_embedded_corpus_splits_by_play(data_dir, tmp_path):
  def read(root, split):
    return [(ex['genre'].decode(), ex['play'].decode(), int(ex['scene']), ex['text'].decode())
            for ex in sources.data_source('shakespeare', split, root)]
  train, valid = read(data_dir, 'train'), read(data_dir, 'validation')
  held_out = {f'{g}/{p}' for g, p, _, _ in valid}
  assert held_out == set(shakespeare.HELD_OUT_PLAYS)
  assert not held_out & {f'{g}/{p}' for g, p, _, _ in train}
  assert len(held_out | {f'{g}/{p}' for g, p, _, _ in train}) == 38
  # Scenes of each play are numbered 0..n-1; about a tenth of the text is held out.
  scenes = collections.defaultdict(set)
  for g, p, s, _ in train + valid:
    scenes[p].add(s)
  assert all(s == set(range(len(s))) for s in scenes.values())
  n_valid, n_train = (sum(len(t) for *_, t in x) for x in (valid, train))
  assert 0.08 < n_valid / (n_valid + n_train) < 0.12
  assert not any(c in t for *_, t in train for c in '#*_\\')
  # Preparing again is a no-op; preparing elsewhere gives the same records in the same order.
  data.prepare(config(data_dir))
  data.prepare(config(str(tmp_path)))
  assert read(str(tmp_path), 'validation') == valid


def test_byte_tokenizer():
  tok = data.get_tokenizer(data.default_config())
  text = 'Fair is foul — ça va? 日本 😀\n'
  ids = tok.encode(text)
  assert tok.vocab_size == 259 and max(ids) < 259 and min(ids) >= 3
  assert len(ids) == len(text.encode()) == tok.token_bytes[ids].sum()
  assert tok.decode(ids) == text
  assert tok.decode([tok.bos_id] + ids + [tok.eos_id] + tok.encode('after')) == text
  assert tok.decode(np.array(ids + [tok.pad_id, 50])) == text
  assert list(tok.token_bytes[:3]) == [0, 0, 0]


@pytest.mark.parametrize('model_type', ['unigram', 'bpe'])
def test_sentencepiece_trains_round_trips_and_caches(data_dir, model_type, monkeypatch):
  c = config(data_dir, tokenizer='sentencepiece', vocab_size=384, spm_model_type=model_type,
             train_split='validation')  # the small split keeps training fast
  tok = data.get_tokenizer(c)
  assert tok.vocab_size == 384 and (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
  text = 'MACBETH:\nSo foul and fair a day  I have not seen — ça 日本 😀\n\n'
  ids = tok.encode(text)
  assert tok.decode(ids) == text
  assert tok.token_bytes[ids].sum() == len(text.encode())
  assert tok.decode([tok.bos_id] + ids + [tok.eos_id, 7]) == text
  assert len(ids) < len(text.encode()) * 0.8  # it does merge common pieces
  # The cached model is loaded, never retrained.
  path = tokenizers.cache_path(data_dir, 'shakespeare', 'validation', model_type, 384)
  mtime = os.path.getmtime(path)
  monkeypatch.setattr(tokenizers, 'train_sentencepiece', lambda *a, **k: pytest.fail('retrained'))
  again = data.get_tokenizer(c)
  assert again.encode(text) == ids and os.path.getmtime(path) == mtime
  keys = {tokenizers.cache_path('d', n, s, t, v) for n, s, t, v in [
      ('lm1b', 'train', 'bpe', 384), ('c4/en', 'train', 'bpe', 384),
      ('lm1b', 'train[:5%]', 'bpe', 384), ('lm1b', 'train', 'unigram', 384),
      ('lm1b', 'train', 'bpe', 512)]}
  assert len(keys) == 5


def test_packing_hand_example():
  docs = [[1, 5, 6, 2], [1, 7, 2], [1, 8, 9, 10, 11, 2]]
  ds = grain.MapDataset.source([{'tokens': np.array(d, np.int32)} for d in docs])
  rows = list(pipeline.pack(ds.to_iter_dataset(), seq_len=4))
  batch = pipeline.to_batch({k: np.stack([r[k] for r in rows]) for k in rows[0]})
  np.testing.assert_array_equal(batch['inputs'], [[1, 5, 6, 2], [7, 2, 1, 8], [10, 11, 2, 0]])
  np.testing.assert_array_equal(batch['targets'], [[5, 6, 2, 1], [2, 1, 8, 9], [11, 2, 0, 0]])
  np.testing.assert_array_equal(batch['segment_ids'], [[1, 1, 1, 1], [1, 1, 2, 2], [1, 1, 1, 0]])
  np.testing.assert_array_equal(batch['positions'], [[0, 1, 2, 3], [0, 1, 0, 1], [0, 1, 2, 0]])
  np.testing.assert_array_equal(batch['weights'], [[1, 1, 1, 0], [1, 0, 1, 1], [1, 1, 0, 0]])
  assert {k: v.dtype for k, v in batch.items()} == dict(
      inputs=np.int32, targets=np.int32, segment_ids=np.int32, positions=np.int32,
      weights=np.float32)


def check_row_invariants(batch):
  seg, pos, w = batch['segment_ids'], batch['positions'], batch['weights']
  starts = np.concatenate([np.ones_like(seg[:, :1], bool), seg[:, 1:] != seg[:, :-1]], axis=1)
  assert (np.diff(seg, axis=1)[seg[:, 1:] > 0] >= 0).all()  # pieces in order, padding at the end
  assert ((seg[:, 0] == 1) | (seg == 0).all(1)).all() and (pos[starts] == 0).all()
  inner = ~starts[:, 1:] & (seg[:, 1:] > 0)
  assert (pos[:, 1:][inner] == pos[:, :-1][inner] + 1).all()
  np.testing.assert_array_equal(w[:, :-1], (seg[:, 1:] == seg[:, :-1]) & (seg[:, :-1] > 0))
  assert not (batch['targets'][w > 0] == tokenizers.BOS_ID).any()  # never across documents
  assert (batch['inputs'][seg == 0] == 0).all() and (w[seg == 0] == 0).all()


def test_eval_batches_conserve_every_token_in_order(data_dir):
  c = config(data_dir)
  tok = data.get_tokenizer(c)
  batches = data.eval_batches(c, tok, batch_size=8)
  assert batches[-1]['weights'][-1].sum() == 0  # the last batch is padded, not dropped
  for b in batches:
    check_row_invariants(b)
  rows = np.concatenate([np.concatenate([b['inputs'], b['targets'][:, -1:]], 1) for b in batches])
  stream = np.trim_zeros(rows.reshape(-1), 'b')
  docs = sources.data_source('shakespeare', 'validation', data_dir)
  expected = [t for ex in docs for t in [1, *tok.encode(ex['text'].decode()), 2]]
  np.testing.assert_array_equal(stream, expected)
  assert_batches_equal(batches, data.eval_batches(c, tok, batch_size=8))
  assert_batches_equal(batches[:3], data.eval_batches(c, tok, batch_size=8, max_batches=3))


def test_train_epoch_holds_every_document_once(data_dir):
  c = config(data_dir, train_split='validation', shuffle_window=1)
  tok = data.get_tokenizer(c)
  docs = [tok.encode(ex['text'].decode())
          for ex in sources.data_source('shakespeare', 'validation', data_dir)]
  n_tokens = sum(len(d) + 2 for d in docs)
  it = data.train_iterator(c, tok, batch_size=16, seed=3)
  stream = []
  while len(stream) < n_tokens:
    b = next(it)
    check_row_invariants(b)
    stream.extend(np.concatenate([b['inputs'], b['targets'][:, -1:]], 1).reshape(-1))
  starts = [i for i, t in enumerate(stream[:n_tokens]) if t == tokenizers.BOS_ID] + [n_tokens]
  pieces = [tuple(stream[a + 1:b]) for a, b in zip(starts, starts[1:])]
  assert starts[0] == 0 and len(pieces) == len(docs)
  assert sorted(pieces) == sorted(tuple(d + [tokenizers.EOS_ID]) for d in docs)
  assert pieces != [tuple(d + [tokenizers.EOS_ID]) for d in docs]  # and they were shuffled


def test_seeds_shuffle_documents_and_rows(data_dir):
  c = config(data_dir, train_split='validation')
  tok = data.get_tokenizer(c)
  first = take(data.train_iterator(c, tok, batch_size=8, seed=0), 4)
  assert_batches_equal(first, take(data.train_iterator(c, tok, batch_size=8, seed=0), 4))
  other = take(data.train_iterator(c, tok, batch_size=8, seed=1), 4)
  assert not all((a['inputs'] == b['inputs']).all() for a, b in zip(first, other))


def test_hosts_read_disjoint_shards_that_cover_the_data(data_dir):
  c = config(data_dir)
  source = sources.data_source('shakespeare', 'validation', data_dir)
  shards = [list(pipeline.documents(source, 'text', i, 3)) for i in range(3)]
  assert sorted(sum(shards, [])) == sorted(ex['text'].decode() for ex in source)
  assert all(len(s) >= len(source) // 3 for s in shards)
  tok = data.get_tokenizer(c)
  its = [data.train_iterator(c, tok, batch_size=4, seed=0, process_index=i, process_count=3)
         for i in range(3)]
  assert len({next(it)['inputs'].tobytes() for it in its}) == 3
  # Eval: same number of batches on every host, rows dealt out in turn.
  single = data.eval_batches(c, tok, batch_size=8, max_batches=4)
  hosts = [data.eval_batches(c, tok, batch_size=4, process_index=i, process_count=2,
                             max_batches=4) for i in range(2)]
  assert len(hosts[0]) == len(hosts[1]) == 4
  rows = np.concatenate([b['inputs'] for b in single])
  np.testing.assert_array_equal(rows[0::2], np.concatenate([b['inputs'] for b in hosts[0]]))
  np.testing.assert_array_equal(rows[1::2], np.concatenate([b['inputs'] for b in hosts[1]]))


@pytest.mark.parametrize('k', [0, 3, 11])
def test_iterator_state_restores_exact_position(data_dir, k):
  c = config(data_dir, train_split='validation', shuffle_window=8)
  tok = data.get_tokenizer(c)
  it = data.train_iterator(c, tok, batch_size=4, seed=5)
  take(it, k)
  saved = data.iterator_state_to_json(it.get_state())
  expected = take(it, 5)
  fresh = data.train_iterator(c, tok, batch_size=4, seed=5)
  fresh.set_state(data.iterator_state_from_json(saved))
  assert_batches_equal(take(fresh, 5), expected)


def test_dataset_by_name_reads_like_lm1b(data_dir):
  c = config(data_dir, name='tiny_lm_corpus', seq_len=16, shuffle_window=4)
  data.check_config(c)
  data.prepare(c)  # already prepared: nothing to do
  tok = data.get_tokenizer(c)
  batch = next(data.train_iterator(c, tok, batch_size=4, seed=0))
  assert batch['inputs'].shape == (4, 16)
  check_row_invariants(batch)
  evals = data.eval_batches(c, tok, batch_size=4)
  stream = np.trim_zeros(np.concatenate(
      [np.concatenate([b['inputs'], b['targets'][:, -1:]], 1) for b in evals]).reshape(-1), 'b')
  by_name = tfds.data_source('tiny_lm_corpus', split='validation', data_dir=data_dir)
  expected = [t for ex in by_name for t in [1, *tok.encode(ex['text'].decode()), 2]]
  np.testing.assert_array_equal(stream, expected)
  assert data.eval_texts(c, 2)[0].startswith('Sentence number')
  # Registered datasets pass the check; one not prepared says how to prepare it.
  data.check_config(config(data_dir, name='lm1b'))
  data.check_config(config(data_dir, name='c4/en'))
  with pytest.raises(FileNotFoundError, match='tfds build lm1b --file_format=array_record'):
    data.prepare(config(data_dir, name='lm1b'))


@pytest.mark.parametrize('overrides, message', [
    (dict(name='shakespear'), "unknown dataset name='shakespear'"),
    (dict(tokenizer='wordpiece'), "tokenizer='wordpiece' is not one of byte, sentencepiece"),
    (dict(seq_len=0), 'seq_len=0 must be a positive integer'),
    (dict(shuffle_window=-4), 'shuffle_window=-4 must be a positive integer'),
    (dict(tokenizer='sentencepiece', vocab_size=100), 'vocab_size=100 is too small'),
    (dict(tokenizer='sentencepiece', spm_model_type='char'), "spm_model_type='char'"),
    (dict(text_key=''), "text_key='' must be a non-empty string"),
])
def test_bad_configs_fail_with_one_clear_line(overrides, message, tmp_path):
  with pytest.raises(ValueError, match=message) as info:
    data.check_config(config(str(tmp_path), **overrides))
  assert '\n' not in str(info.value)
