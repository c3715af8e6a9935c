"""The distillation runner (experiments/distill.py) end to end on a tiny trained teacher: students
from scratch, from every other teacher layer and from the FFN-pruned teacher; KD metrics; the
teacher's files untouched; resumption after SIGTERM; one-line errors."""

import json
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from compression import structural
from experiments import distill
from experiments.configs import distill as distill_configs
from experiments.errors import UserError
from models import ModelConfig
from tests.conftest import init_params
from tests.runs import ROOT, cli_env, losses, records, tree_digest


def config_for(source, variants, **changes):
  config = distill_configs.get_config('half')
  config.update(dict(source_workdir=str(source), variants=variants, num_steps=2,
                     warmup_steps=1), **changes)
  return config


def test_students_train_through_the_loop_and_write_a_row_each(source, tmp_path):
  before = tree_digest(source)
  rows = distill.run(config_for(source, 'scratch:ce,scratch:kd:t2,every2:kd,ffn50:jsd,'
                                        'scratch:feat'), tmp_path)
  assert tree_digest(source) == before   # the teacher is only read
  assert [r['variant'] for r in rows] == ['teacher', 'scratch:ce', 'scratch:kd:t2', 'every2:kd',
                                          'ffn50:jsd', 'scratch:feat']
  teacher = rows[0]
  assert teacher['layers'] == 2
  assert [r['layers'] for r in rows[1:]] == [1, 1, 1, 2, 1]
  assert rows[5]['kd']['features'] == [[0, 1]]   # student layer 0 <- the teacher's last layer
  assert rows[4]['d_ff'] == teacher['d_ff'] // 2 and rows[4]['params'] < teacher['params']
  assert all(np.isfinite(r['nats_per_byte']) for r in rows)
  # Every row is measured: the smaller student decodes from fewer bytes than the teacher.
  assert all(r['decode_tokens_per_s'] > 0 for r in rows)
  assert sum(rows[4]['storage_bytes'].values()) < sum(teacher['storage_bytes'].values())
  assert rows[4]['decode_peak_bytes'] < teacher['decode_peak_bytes']
  assert rows[2]['kd']['temperature'] == 2.0 and rows[4]['kd']['divergence'] == 'jsd'
  for name, kd in (('scratch-ce', False), ('scratch-kd-t2', True), ('ffn50-jsd', True)):
    logged = [r for r in records(tmp_path / 'students' / name) if 'train_loss' in r]
    assert len(logged) == 2
    assert all(('kd_loss' in r and 'teacher_agreement' in r) == kd for r in logged)
    assert not any('feature_loss' in r for r in logged)
  logged = [r for r in records(tmp_path / 'students' / 'scratch-feat') if 'train_loss' in r]
  assert logged and all(r['feature_loss'] > 0 for r in logged)
  assert json.loads((tmp_path / 'results.json').read_text())['rows'] == rows
  assert '| every2:kd | 1 |' in (tmp_path / 'results.md').read_text()
  again = distill.run(config_for(source, 'scratch:kd:t2'), tmp_path)   # complete: not retrained
  assert again[1]['nats_per_byte'] == rows[2]['nats_per_byte']


def test_every_other_layer_and_pruned_students_start_from_the_teachers_weights():
  cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=5, n_heads=2, d_ff=64)
  params = init_params(cfg)
  v = distill.parse_variant('every2:kd')
  student = distill.student_config(v, cfg)
  start = distill.student_params(v, cfg, params)
  assert student.n_layers == 3 and sorted(k for k in start if k.startswith('blocks_')) == [
      'blocks_0', 'blocks_1', 'blocks_2']
  for i, j in ((0, 0), (1, 2), (2, 4)):
    assert start[f'blocks_{i}'] is params[f'blocks_{j}']
  assert start['embed'] is params['embed']
  assert sorted(params) != sorted(start)   # the teacher's tree is not changed
  pruned = distill.student_params(distill.parse_variant('ffn25'), cfg, params)
  assert pruned['blocks_0']['mlp']['up']['kernel'].shape == (32, 48)
  assert distill.student_config(distill.parse_variant('ffn25'), cfg).d_ff == 48
  with pytest.raises(ValueError, match=r'n=6 must be an integer in \[1, 5\]'):
    structural.every_nth_layer(cfg, params, 6)


def _cli(source, workdir, variants, steps):
  cmd = [sys.executable, '-m', 'experiments.main', '--mode=distill',
         '--config=experiments/configs/distill.py:half', f'--workdir={workdir}',
         f'--config.source_workdir={source}', f'--config.variants={variants}',
         f'--config.num_steps={steps}', '--config.warmup_steps=1']
  return subprocess.Popen(cmd, cwd=ROOT, env=cli_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def test_a_distillation_run_resumes_after_sigterm_to_the_same_losses(source, tmp_path):
  straight = _cli(source, tmp_path / 'straight', 'scratch:kd', 12)
  out, _ = straight.communicate(timeout=300)
  assert straight.returncode == 0, out[-3000:]
  want = losses(tmp_path / 'straight' / 'students' / 'scratch-kd')
  student = tmp_path / 'stopped' / 'students' / 'scratch-kd'
  proc = _cli(source, tmp_path / 'stopped', 'scratch:kd', 12)
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    if (student / 'metrics.jsonl').exists() and len(losses(student)) >= 5:
      proc.send_signal(signal.SIGTERM)
      break
    time.sleep(0.02)
  out, _ = proc.communicate(timeout=240)
  assert 'SIGTERM received: saving a checkpoint' in out, out[-3000:]
  assert max(losses(student)) < 12, 'the run finished before the signal arrived'
  resumed = _cli(source, tmp_path / 'stopped', 'scratch:kd', 12)
  out, _ = resumed.communicate(timeout=300)
  assert resumed.returncode == 0, out[-3000:]
  assert 'resumed from the checkpoint at step' in out
  assert losses(student) == want and len(want) == 12


@pytest.mark.parametrize('changes,match', [
    (dict(source_workdir='/nonexistent/teacher'), r"source_workdir='/nonexistent/teacher' has "
                                                  r'no config\.json'),
    (dict(variants='every9:kd'), r"variant 'every9:kd': every9: k must be in \[1, 2\]"),
    (dict(variants='scratch:a1.5'), r"variant 'scratch:a1.5': alpha=1\.5 must be in \[0, 1\]"),
    (dict(variants='scratch:t0'), r"variant 'scratch:t0': temperature=0\.0 must be > 0"),
    (dict(variants='scratch:kd', kd=dict(temperature=-1.0)), r'temperature=-1\.0 must be > 0'),
    (dict(variants='L2:fast'), r"unknown option 'fast'"),
    (dict(variants='ffn100:kd'), r'ffn100 must prune between 0 and 100%'),
    (dict(variants='scratch:ce:t2'), r'ce trains without the teacher'),
    (dict(variants=''), r'config\.variants is empty'),
    (dict(num_steps=0), r'config\.num_steps=0 must be an integer >= 1'),
    (dict(variants='scratch:feat', features='0:5'), r"the pair \(0, 5\) is outside the student's "
                                                    r"1 or the teacher's 2 layers"),
    (dict(variants='scratch:feat', features='0-1'), r"config\.features='0-1' must be student:"),
    (dict(variants='scratch:ce:feat'), r'ce trains without the teacher'),
    (dict(feature_weight=-1.0), r'config\.feature_weight=-1\.0 must be a number >= 0'),
    (dict(variants='scratch:attn', attention='1:0'), r"attention: the pair \(1, 0\) is outside"),
    (dict(variants='scratch:attn', attention='x'), r"config\.attention='x' must be student:"),
    (dict(attention_weight=-0.5), r'config\.attention_weight=-0\.5 must be a number >= 0'),
    (dict(variants='scratch:attn:top4:offline'), r'attn match the teacher.s hidden states and '
                                                 r'attention.*drop offline'),
])
def test_bad_input_is_one_line_before_any_work(source, tmp_path, changes, match):
  config = config_for(source, 'scratch:kd')
  for k, v in changes.items():
    config[k].update(v) if isinstance(v, dict) else config.update({k: v})
  with pytest.raises(UserError, match=match) as e:
    distill.check(config, tmp_path / 'out')
  assert '\n' not in str(e.value)
  assert not (tmp_path / 'out').exists()


def test_pruning_and_quantization_recover_by_distillation_from_the_dense_model(source, tmp_path):
  from experiments import prune, quantize
  from experiments.configs import prune as prune_configs
  from experiments.configs import quantize as quantize_configs
  config = prune_configs.get_config('structural')
  config.update(source_workdir=str(source), variants='ffn:0.5', finetune_steps=2,
                calibration_batches=1, calibration_rows=4, recover='distill')
  config.kd.temperature = 2.0
  rows = prune.run(config, tmp_path / 'prune')
  ran = json.loads((tmp_path / 'prune' / 'finetune' / 'ffn-0.5' / 'config.json').read_text())
  assert ran['origin']['recover'] == 'distill' and ran['origin']['kd']['temperature'] == 2.0
  logged = [r for r in records(tmp_path / 'prune' / 'finetune' / 'ffn-0.5') if 'train_loss' in r]
  assert logged and all('kd_loss' in r for r in logged)
  assert np.isfinite(rows[1]['finetuned_nats_per_byte'])
  config = quantize_configs.get_config('rtn_int8')
  config.update(source_workdir=str(source), variants='rtn:int4:g16:qat2', calibration_batches=1,
                calibration_rows=4, recover='distill')
  rows = quantize.run(config, tmp_path / 'quantize')
  sub = tmp_path / 'quantize' / 'finetune' / 'rtn-int4-g16-qat2'
  ran = json.loads((sub / 'config.json').read_text())
  assert ran['qat']['bits'] == 4 and ran['origin']['recover'] == 'distill'
  assert all('kd_loss' in r for r in records(sub) if 'train_loss' in r)
  # QAT wraps the KD loss: what it trained is what the converted integers serve.
  assert rows[1]['nats_per_byte'] == pytest.approx(rows[1]['qat_eval_nats_per_byte'], rel=1e-4)
  config.update(recover='teach')
  with pytest.raises(UserError, match=r"config\.recover='teach' is not one of finetune, "
                                      r"distill"):
    quantize.check(config, tmp_path / 'q2')
  config.update(recover='distill')
  config.kd.alpha = -0.5
  with pytest.raises(UserError, match=r'config\.kd: alpha=-0\.5 must be in \[0, 1\]'):
    quantize.check(config, tmp_path / 'q2')


def test_a_kd_schedule_runs_over_the_students_steps_unless_told(source):
  config = config_for(source, 'scratch:kd', num_steps=40)
  config.kd.update(alpha_end=0.9, temperature_end=1.0, temperature=2.0)
  v = distill.parse_variant('scratch:kd:t3')
  spec = distill.kd_spec(config, v)
  assert (spec.alpha_end, spec.temperature, spec.temperature_end, spec.schedule_steps) == (
      0.9, 3.0, 1.0, 40)
  config.kd.schedule_steps = 10
  assert distill.kd_spec(config, v).schedule_steps == 10
  config.kd.update(alpha_end=None, temperature_end=None, schedule_steps=0)
  assert distill.kd_spec(config, v).schedule_steps == 0   # constant


def test_attention_transfer_trains_the_student_towards_the_teachers_maps(source, tmp_path):
  config = config_for(source, 'scratch:attn', attention_weight=0.5)
  rows = distill.run(config, tmp_path)
  assert rows[1]['kd']['attention'] == [[0, 1]] and rows[1]['kd']['attention_weight'] == 0.5
  logged = [r for r in records(tmp_path / 'students' / 'scratch-attn') if 'train_loss' in r]
  assert len(logged) == 2 and all(r['attention_loss'] > 0 for r in logged)
  assert not any('feature_loss' in r for r in logged)


def test_sequence_kd_students_train_on_the_teachers_generations(source, tmp_path):
  config = config_for(source, 'scratch:ce:seq,scratch:kd:seq')
  config.seqkd.update(num_prompts=6, prompt_tokens=8, new_tokens=12, batch_size=4, weight=0.5)
  before = tree_digest(source)
  rows = distill.run(config, tmp_path)
  assert tree_digest(source) == before
  assert [r['variant'] for r in rows[1:]] == ['scratch:ce:seq', 'scratch:kd:seq']
  data_dir = tmp_path / 'generations' / 'seed0'
  record = json.loads((data_dir / 'seqkd' / '1.0.0' / 'seqkd.json').read_text())
  assert record['settings']['prompts']['num_prompts'] == 6
  for name in ('scratch-ce-seq', 'scratch-kd-seq'):   # one dataset, mixed into both students
    saved = json.loads((tmp_path / 'students' / name / 'config.json').read_text())
    assert saved['data']['mix'] == dict(name='seqkd', data_dir=str(data_dir), split='train',
                                        weight=0.5, text_key='text')
    signature = json.loads((tmp_path / 'students' / name / 'signature.json').read_text())
    assert signature['data']['mix']['weight'] == 0.5
  assert all(np.isfinite(r['nats_per_byte']) for r in rows)
  # Another student seed shares the generations: reused, not written again.
  before = tree_digest(data_dir)
  config.update(seed=1, variants='scratch:ce:seq')
  config.seqkd.data_dir = str(data_dir)
  distill.run(config, tmp_path / 'seed1')
  assert tree_digest(data_dir) == before and not (tmp_path / 'seed1' / 'generations').exists()
  saved = json.loads((tmp_path / 'seed1' / 'students' / 'scratch-ce-seq' / 'config.json')
                     .read_text())
  assert saved['data']['mix']['data_dir'] == str(data_dir) and saved['seed'] == 2
  config.seqkd.weight = 1.5
  with pytest.raises(UserError, match=r'config\.seqkd\.weight=1\.5 must be in \(0, 1\]'):
    distill.check(config, tmp_path / 'other')


def test_a_quantized_or_half_precision_teacher_is_what_the_students_learn_from(source, tmp_path):
  from compression import qtensor
  from experiments import quantize
  from experiments.configs import quantize as quantize_configs
  qconfig = quantize_configs.get_config('rtn_int8')
  qconfig.update(source_workdir=str(source), variants='rtn:int8', calibration_batches=1,
                 calibration_rows=4)
  qrows = quantize.run(qconfig, tmp_path / 'quantize')
  path = tmp_path / 'quantize' / 'params' / 'rtn-int8'
  config = config_for(source, 'scratch:kd,every2:kd', teacher_quantized=str(path))
  float_teacher = distill.source.load(config, distill.source.source_config(source))
  model, params = distill.teacher_form(config, float_teacher[1], float_teacher[3])
  leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, qtensor.QTensor))
  assert any(isinstance(x, qtensor.QTensor) for x in leaves)   # integers and scales
  rows = distill.run(config, tmp_path / 'q')
  # The teacher row is the saved int8 variant's own evaluation; students train from it.
  assert rows[0]['nats_per_byte'] == pytest.approx(qrows[1]['nats_per_byte'], rel=1e-6)
  assert rows[0]['quantized'] == str(path)
  ran = json.loads((tmp_path / 'q' / 'students' / 'scratch-kd' / 'config.json').read_text())
  assert ran['origin']['teacher'] == dict(dtype='', quantized=str(path))
  assert all(np.isfinite(r['nats_per_byte']) for r in rows)
  config = config_for(source, 'scratch:kd', teacher_dtype='bfloat16')
  model, params = distill.teacher_form(config, float_teacher[1], float_teacher[3])
  assert model.config.dtype == 'bfloat16'
  assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype(jax.numpy.bfloat16)}
  rows = distill.run(config, tmp_path / 'bf16')
  assert rows[0]['dtype'] == 'bfloat16' and np.isfinite(rows[1]['nats_per_byte'])
  for changes, match in (
      (dict(teacher_dtype='int8'), r"config\.teacher_dtype='int8' is not one of"),
      (dict(teacher_quantized=str(tmp_path / 'none')), r'nothing was saved at')):
    with pytest.raises(UserError, match=match):
      distill.check(config_for(source, 'scratch:kd', **changes), tmp_path / 'bad')


def test_a_hugging_face_checkpoint_teaches_on_the_runs_data_and_tokenizer(source, tmp_path):
  from experiments import runtime
  from models import hf
  _, model, _, params, _ = runtime.load_params(distill.source.source_config(source), source)
  hf.save_pretrained(model, params, tmp_path / 'hf')
  from_run = distill.run(config_for(source, 'scratch:ce'), tmp_path / 'run')
  rows = distill.run(config_for(source, 'scratch:kd,every2:kd', hf_path=str(tmp_path / 'hf')),
                     tmp_path / 'from_hf')
  assert rows[0]['nats_per_byte'] == pytest.approx(from_run[0]['nats_per_byte'], rel=1e-5)
  ran = json.loads((tmp_path / 'from_hf' / 'students' / 'every2-kd' / 'config.json').read_text())
  assert ran['origin']['hf_path'] == str(tmp_path / 'hf')
  assert all(np.isfinite(r['nats_per_byte']) for r in rows)
  (tmp_path / 'hf' / 'tokenizer.model').write_bytes(b'another tokenizer')
  with pytest.raises(UserError, match=r'is not the tokenizer of .* teacher and students need '
                                      r'one tokenizer') as e:
    distill.check(config_for(source, 'scratch:kd', hf_path=str(tmp_path / 'hf')),
                  tmp_path / 'bad')
  assert '\n' not in str(e.value) and not (tmp_path / 'bad').exists()
