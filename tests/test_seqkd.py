"""Sequence-level KD data: the dataset holds the teacher's generations exactly, resumes to the
same bytes, is reused or refused by its settings, and trains a student through `data.mix`."""

import hashlib
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import data, seqkd
from experiments.data import sources
from experiments.errors import UserError
from models import ModelConfig, Transformer, decode

KNOBS = dict(num_prompts=10, prompt_tokens=12, new_tokens=8, batch_size=4, seed=3)
SAMPLED = dict(temperature=1.0, top_k=20)


@pytest.fixture(scope='module')
def teacher():
  model = Transformer(ModelConfig(vocab_size=259, d_model=32, n_layers=2, n_heads=4, d_ff=64,
                                  init_std=0.2))
  params = nn.meta.unbox(model.init(jax.random.key(1), jnp.zeros((1, 4), jnp.int32))['params'])
  return model, params


@pytest.fixture(scope='module')
def cfg(data_dir):
  c = data.default_config()
  c.data_dir = str(data_dir)
  return c


def generate(teacher, cfg, out, **changes):
  model, params = teacher
  return seqkd.generate_dataset(model, params, data.ByteTokenizer(), cfg, out,
                                **dict(KNOBS, **changes))


def read(out, name='seqkd'):
  return [(ex['text'].decode(), ex['tokens']) for ex in sources.data_source(name, 'train', out)]


def digests(folder) -> dict:
  return {f: hashlib.sha256(open(os.path.join(folder, f), 'rb').read()).hexdigest()
          for f in sorted(os.listdir(folder))}


class Interrupted(Exception):
  pass


def stop_at(n):
  """An `on_chunk` hook that interrupts the run once chunk n is saved."""
  def hook(k):
    if k == n:
      raise Interrupted
  return hook


@pytest.mark.parametrize('sampling', [{}, SAMPLED], ids=['greedy', 'sampled'])
def test_dataset_holds_the_teachers_generations(teacher, cfg, tmp_path, sampling):
  out = tmp_path / 'out'
  info = generate(teacher, cfg, out, **sampling)
  assert os.listdir(tmp_path) == ['out'] and sorted(os.listdir(out)) == ['seqkd']
  sources.check('seqkd', str(out), {'mix.split': 'train'}, 'text')
  examples = read(str(out))
  assert len(examples) == info['num_examples'] == 10 and not info['reused']
  tok = data.ByteTokenizer()
  model, params = teacher
  n, bs = KNOBS['num_prompts'], KNOBS['batch_size']
  all_prompts = []
  for k in range(3):   # batches of 4, 4, 2 prompts
    prompts = seqkd.prompts(cfg, tok, range(k * bs, min(n, (k + 1) * bs)),
                            prompt_tokens=KNOBS['prompt_tokens'], seed=KNOBS['seed'])
    direct = decode.generate(model, params, prompts, max_new_tokens=KNOBS['new_tokens'],
                             rng=jax.random.fold_in(jax.random.key(KNOBS['seed']), k),
                             stop_tokens=[tok.eos_id], **sampling)
    for i, prompt in enumerate(prompts):
      text, tokens = examples[k * bs + i]
      expected = [*prompt, *np.asarray(direct.tokens[i, :direct.lengths[i]])]
      np.testing.assert_array_equal(tokens, expected)
      assert tokens.dtype == np.int32 and text == tok.decode(tokens)
    all_prompts += prompts
  assert info['generated_tokens'] == sum(len(t) for _, t in examples) - 12 * 10
  # Prompts are windows of distinct training documents; one at offset 0 starts with bos.
  docs = [ex['text'] for ex in sources.data_source('shakespeare', 'train', str(cfg.data_dir))]
  for p in all_prompts:
    assert len(p) == KNOBS['prompt_tokens']
    body = bytes(t - tok.offset for t in p if t != tok.bos_id)
    assert any((d.startswith(body) if p[0] == tok.bos_id else body in d) for d in docs)
  assert len({tuple(p) for p in all_prompts}) == 10


def test_interrupted_run_resumes_to_the_identical_dataset(teacher, cfg, tmp_path):
  generate(teacher, cfg, tmp_path / 'whole', **SAMPLED)
  with pytest.raises(Interrupted):
    generate(teacher, cfg, tmp_path / 'cut', **SAMPLED, on_chunk=stop_at(1))
  stage = tmp_path / 'cut' / 'seqkd.partial'
  assert not (tmp_path / 'cut' / 'seqkd').exists()
  assert sorted(f for f in os.listdir(stage) if f.startswith('chunk')) == [
      'chunk_00000.npz', 'chunk_00001.npz']
  # As if killed while writing the second chunk: it never got its final name.
  os.rename(stage / 'chunk_00001.npz', stage / 'chunk_00001.npz.tmp123')
  done = []
  info = generate(teacher, cfg, tmp_path / 'cut', **SAMPLED, on_chunk=done.append)
  assert done == [1, 2] and not info['reused']
  assert os.listdir(tmp_path / 'cut') == ['seqkd']   # the staging folder is gone
  whole, cut = read(str(tmp_path / 'whole')), read(str(tmp_path / 'cut'))
  assert [t for t, _ in whole] == [t for t, _ in cut]
  for (_, a), (_, b) in zip(whole, cut):
    np.testing.assert_array_equal(a, b)
  assert (digests(tmp_path / 'whole' / 'seqkd' / '1.0.0')
          == digests(tmp_path / 'cut' / 'seqkd' / '1.0.0'))


def test_reused_when_settings_match_and_refused_in_one_line_otherwise(teacher, cfg, tmp_path):
  out = tmp_path / 'out'
  first = generate(teacher, cfg, out)
  before = digests(out / 'seqkd' / '1.0.0')
  calls = []
  again = generate(teacher, cfg, out, on_chunk=calls.append)
  assert again['reused'] and not calls
  assert {k: v for k, v in again.items() if k != 'reused'} == {
      k: v for k, v in first.items() if k != 'reused'}
  model, params = teacher
  other_teacher = jax.tree.map(lambda x: x * 1.01, params)
  for call, field in [
      (lambda: generate(teacher, cfg, out, prompt_tokens=16), 'prompts.prompt_tokens'),
      (lambda: generate(teacher, cfg, out, **SAMPLED), 'sampling.temperature'),
      (lambda: seqkd.generate_dataset(model, other_teacher, data.ByteTokenizer(), cfg, out,
                                      **KNOBS), 'teacher.params_sha256')]:
    with pytest.raises(UserError, match=field) as e:
      call()
    assert '\n' not in str(e.value) and 'holds a dataset with other settings' in str(e.value)
  assert digests(out / 'seqkd' / '1.0.0') == before
  # A partial generation with other settings is refused too, never mixed or overwritten.
  with pytest.raises(Interrupted):
    generate(teacher, cfg, tmp_path / 'cut', on_chunk=stop_at(0))
  with pytest.raises(UserError, match='partial generation with other settings') as e:
    generate(teacher, cfg, tmp_path / 'cut', new_tokens=4)
  assert '\n' not in str(e.value)
  with pytest.raises(UserError, match='num_prompts=0 must be a positive integer'):
    generate(teacher, cfg, tmp_path / 'x', num_prompts=0)


def test_student_trains_on_the_generations_by_name(teacher, cfg, tmp_path):
  out = tmp_path / 'kd'
  generate(teacher, cfg, out)
  tok = data.ByteTokenizer()
  texts = [bytes(t - tok.offset for t in tok.encode(text)) for text, _ in read(str(out))]
  c = cfg.copy_and_resolve_references()
  c.seq_len, c.shuffle_window = 16, 4
  c.mix.update(name='seqkd', data_dir=str(out), weight=1.0)
  data.check_config(c)
  data.check_available(c)
  it = data.train_iterator(c, tok, batch_size=4, seed=0)
  for _ in range(3):
    batch = next(it)
    for inputs, seg in zip(batch['inputs'], batch['segment_ids']):
      for s in set(seg[seg > 0].tolist()):
        piece = bytes(t - tok.offset for t in inputs[seg == s] if t >= tok.offset)
        assert any(piece in t for t in texts)


def test_damaged_or_missing_generations_name_the_command_that_writes_them(teacher, cfg, tmp_path):
  out = tmp_path / 'gen'
  generate(teacher, cfg, out)
  sources.check('seqkd', str(out), {'split': 'train'}, 'text')   # whole: no error
  with pytest.raises(UserError, match='is not prepared') as e:
    sources.check('seqkd', str(tmp_path / 'empty'), {'split': 'train'}, 'text')
  assert '--mode=distill' in str(e.value) and 'tfds build' not in str(e.value)
  os.remove(out / 'seqkd' / '1.0.0' / 'dataset_info.json')
  with pytest.raises(UserError, match='damaged data') as e:
    sources.check('seqkd', str(out), {'split': 'train'}, 'text')
  assert '--mode=distill' in str(e.value) and 'tfds build' not in str(e.value)
  assert '\n' not in str(e.value)
