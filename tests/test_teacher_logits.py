"""Offline teacher logits (experiments/teacher_logits.py): the stored top k reproduce the online
top-k KD loss to float precision, a killed pass resumes to identical files, other settings and
other batches are refused, and a student trained from them matches the online one step by step."""

import pathlib

import jax
import numpy as np
import pytest

from compression import distill as distill_lib
from experiments import data, distill, steps, teacher_logits
from experiments import source as source_lib
from experiments.configs import distill as distill_configs
from experiments.errors import UserError
from tests.runs import losses, records, tree_digest


@pytest.fixture(scope='module')
def teacher(source):
  """(the run's training config, model, host params, tokenizer) of the tiny trained run."""
  config = distill_configs.get_config('half')
  config.source_workdir = str(source)
  src = source_lib.source_config(source)
  _, model, tokenizer, params = source_lib.load(config, src)
  return src, model, params, tokenizer


def _pass(teacher, folder, k=4, num_steps=3, chunk=2, **kw):
  config, model, params, tokenizer = teacher
  return teacher_logits.write(config, model, params, tokenizer, folder, k=k,
                              num_steps=num_steps, chunk=chunk, **kw)


def test_offline_top_k_reproduces_the_online_loss(teacher, tmp_path):
  train_config, model, params, tokenizer = teacher
  reader = teacher_logits.Reader(_pass(teacher, tmp_path, k=5, num_steps=3))
  spec = distill_lib.Spec(alpha=0.7, temperature=2.0, top_k=5)
  student = jax.tree.map(lambda x: x * 0.5, params)   # any student of the same vocabulary
  loss = distill_lib.loss(steps.lm_loss(model), model, spec)
  batches = data.train_iterator(train_config.data, tokenizer, batch_size=train_config.batch_size,
                                seed=train_config.seed)
  for step in range(3):
    batch = next(batches)
    extras = reader(step, batch)
    assert extras['teacher_ids'].shape == batch['inputs'].shape + (5,)
    online = loss(dict(student, **{distill_lib.TEACHER: params}), batch)
    offline = loss(student, dict(batch, **extras))
    assert float(offline[0]) == pytest.approx(float(online[0]), rel=1e-6)
    for key in ('kd', 'ce', 'agree', 'tokens'):
      assert float(offline[1][key]) == pytest.approx(float(online[1][key]), rel=1e-6, abs=1e-6)
    # The stored log-probabilities are the teacher's under its full softmax, sorted.
    assert np.all(np.diff(extras['teacher_logprobs'], axis=-1) <= 0)
    assert np.all(extras['teacher_logprobs'] <= 0)


def test_a_killed_pass_resumes_to_identical_files(teacher, tmp_path):
  whole = _pass(teacher, tmp_path / 'whole', num_steps=5)
  calls = []

  def interrupt(first):
    calls.append(first)
    if first == 2:
      raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    _pass(teacher, tmp_path / 'killed', num_steps=5, after_chunk=interrupt)
  assert sorted(p.name for p in (tmp_path / 'killed').glob('topk_*')) == [
      'topk_000000.array_record', 'topk_000002.array_record']
  with pytest.raises(UserError, match='incomplete'):
    teacher_logits.Reader(tmp_path / 'killed')
  done = tree_digest(tmp_path / 'killed' / 'topk_000000.array_record')
  _pass(teacher, tmp_path / 'killed', num_steps=5, after_chunk=calls.append)
  assert calls == [0, 2, 4]   # the resumed pass wrote only the missing chunk
  assert tree_digest(tmp_path / 'killed' / 'topk_000000.array_record') == done
  for name in sorted(p.name for p in pathlib.Path(whole).iterdir()):
    assert (tmp_path / 'killed' / name).read_bytes() == (pathlib.Path(whole) / name).read_bytes()


def test_other_settings_and_other_batches_are_refused(teacher, tmp_path):
  _pass(teacher, tmp_path, k=4)
  before = tree_digest(tmp_path)
  with pytest.raises(UserError, match=r'other settings \(k\)'):
    _pass(teacher, tmp_path, k=3)
  assert tree_digest(tmp_path) == before   # nothing written is touched
  with pytest.raises(UserError, match=r'k=999 must be in \[1, '):
    _pass(teacher, tmp_path / 'big', k=999)
  reader = teacher_logits.Reader(tmp_path)
  config = teacher[0]
  batch = next(data.train_iterator(config.data, teacher[3], batch_size=config.batch_size,
                                   seed=config.seed + 1))
  with pytest.raises(UserError, match='computed on other batches'):
    reader(0, batch)
  with pytest.raises(UserError, match='not step 3'):
    reader(3, batch)
  with pytest.raises(UserError, match='no offline teacher logits'):
    teacher_logits.Reader(tmp_path / 'none')


def test_a_student_trained_offline_matches_the_online_one_step_by_step(source, tmp_path):
  config = distill_configs.get_config('half')
  config.update(source_workdir=str(source), num_steps=3, warmup_steps=1,
                variants='scratch:kd:top6,scratch:kd:top6:offline')
  rows = distill.run(config, tmp_path)
  online = losses(tmp_path / 'students' / 'scratch-kd-top6')
  offline = losses(tmp_path / 'students' / 'scratch-kd-top6-offline')
  assert sorted(online) == sorted(offline) == [1, 2, 3]
  for step in online:
    assert offline[step] == pytest.approx(online[step], rel=1e-5)
  kd = lambda name: [r['kd_loss'] for r in records(tmp_path / 'students' / name)
                     if 'kd_loss' in r]
  np.testing.assert_allclose(kd('scratch-kd-top6-offline'), kd('scratch-kd-top6'), rtol=1e-5)
  assert rows[2]['nats_per_byte'] == pytest.approx(rows[1]['nats_per_byte'], rel=1e-5)
  folder = tmp_path / 'teacher_logits'
  assert [p.name for p in folder.iterdir()] == ['seed1-k6-steps3']


@pytest.mark.parametrize('variants,match', [
    ('scratch:kd:offline', r'offline stores the teacher\'s top k'),
    ('scratch:kd:feat:offline', 'feat and attn match .* drop offline'),
    ('scratch:ce:offline', 'apply to kd'),
    ('scratch:kd:top100000', 'exceeds the teacher'),
    ('scratch:kd:top2.5', 'needs a whole number'),
])
def test_bad_offline_variants_are_one_line(source, tmp_path, variants, match):
  config = distill_configs.get_config('half')
  config.update(source_workdir=str(source), num_steps=2, variants=variants)
  with pytest.raises(UserError, match=match) as e:
    distill.run(config, tmp_path)
  assert '\n' not in str(e.value)
  assert not (tmp_path / 'teacher_logits').exists()
