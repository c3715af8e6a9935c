"""Bad input, across every mode and runner: one line, non-zero exit, no traceback, nothing written.

Each row is a real command line (`python -m experiments.main ...` or `experiments.benchmark`),
run by `tests/cli_cases.py` in a forked child so that 100+ rows take about a minute. Every
workdir, source run, data folder and file a row names is watched: none may change, and a
workdir that did not exist must still not exist.
"""

import json
import re
import shutil
import subprocess
import sys

import pytest

from experiments import runners, train
from experiments import workdir as workdir_lib
from tests.runs import ROOT, cli_env, tiny_config

MAIN, BENCH = 'experiments.main', 'experiments.benchmark'
TINY = ['--config=experiments/configs/shakespeare.py:tiny', '--config.data.data_dir={D}']
TRAIN = TINY + ['--workdir={W}']
PRUNE = ['--mode=prune', '--config=experiments/configs/prune.py:magnitude_50',
         '--workdir={W}', '--config.source_workdir={T}', '--config.calibration_batches=1']

DISTILL = ['--mode=distill', '--config=experiments/configs/distill.py:half', '--workdir={W}',
           '--config.source_workdir={T}']


def case(name, args, match, module=MAIN):
  return pytest.param(module, args, match, id=name)


CASES = [
    # Training config fields.
    *[case(f'train-{f}={v}', TRAIN + [f'--config.{f}={v}'], m) for f, v, m in [
        ('batch_size', 0, 'config.batch_size=0 must be a positive integer'),
        ('batch_size', -1, 'config.batch_size=-1'),
        ('num_train_steps', -5, 'config.num_train_steps=-5'),
        ('grad_accum_steps', 0, 'config.grad_accum_steps=0'),
        ('eval_batch_size', 0, 'config.eval_batch_size=0'),
        ('eval_batches', -1, 'config.eval_batches=-1'),
        ('log_every', 0, 'config.log_every=0'),
        ('eval_every', 0, 'config.eval_every=0'),
        ('checkpoint_every', 0, 'config.checkpoint_every=0'),
        ('keep_checkpoints', 0, 'config.keep_checkpoints=0'),
        ('seed', -1, 'config.seed=-1'),
        ('nonfinite', 'ignore', "config.nonfinite='ignore' is not one of skip, stop"),
        ('max_nonfinite_steps', 0, 'config.max_nonfinite_steps=0'),
        ('optimizer.learning_rate', 0, 'config.optimizer.learning_rate=0.0 must be a finite'),
        ('optimizer.learning_rate', 'nan', 'config.optimizer.learning_rate=nan'),
        ('optimizer.learning_rate', 'inf', 'config.optimizer.learning_rate=inf'),
        ('optimizer.weight_decay', -0.1, 'config.optimizer.weight_decay=-0.1'),
        ('optimizer.weight_decay', 'nan', 'config.optimizer.weight_decay=nan'),
        ('optimizer.grad_clip', -1, 'config.optimizer.grad_clip=-1.0'),
        ('optimizer.eps', -1e-8, 'config.optimizer.eps=-1e-08'),
        ('optimizer.b1', 1.5, 'config.optimizer.b1=1.5 must be in [0, 1)'),
        ('optimizer.b2', -0.1, 'config.optimizer.b2=-0.1'),
        ('optimizer.end_lr_factor', -0.5, 'config.optimizer.end_lr_factor=-0.5'),
        ('optimizer.warmup_steps', -10, 'config.optimizer.warmup_steps=-10'),
        ('optimizer.schedule', 'step', "config.optimizer.schedule='step'"),
        ('optimizer.z_loss', -1, 'config.optimizer.z_loss=-1.0'),
        ('data.seq_len', 300, "config.data.seq_len=300 exceeds the model's max_len=256"),
        ('data.seq_len', 0, 'seq_len=0 must be a positive integer'),
        ('data.tokenizer', 'wordpiece', "tokenizer='wordpiece' is not one of"),
        ('data.name', 'no_such_dataset', "unknown dataset name='no_such_dataset'"),
        ('data.name', 'lm1b', "dataset 'lm1b' is not prepared"),
        ('data.train_split', 'nosuch', "train_split='nosuch': Unknown split 'nosuch'"),
        ('data.eval_split', 'test', "eval_split='test': Unknown split 'test'"),
        ('data.eval_split', 'validation[:0]', "eval_split='validation[:0]' of 'shakespeare' is "
         'empty'),
        ('data.eval_split', 'validation[', "eval_split='validation['"),
        ('data.text_key', 'content', "text_key='content' is not a feature"),
        ('data.shuffle_window', 0, 'shuffle_window=0 must be a positive integer'),
        ('model.n_heads', 3, 'n_heads=3'),
        ('model.d_model', 33, 'd_model=33'),
        ('model.n_layers', 0, 'n_layers=0 must be positive'),
        ('model.remat', 'sometimes', "remat='sometimes'"),
        ('model.dtype', 'float17', "dtype='float17'"),
        ('model.no_such_field', 1, "unknown config field 'no_such_field' in --config.model"),
        ('sample.temperature', -1, 'config.sample.temperature=-1.0'),
        ('sample.top_p', 0, 'config.sample.top_p=0.0 must be in (0, 1]'),
        ('sample.top_p', 1.5, 'config.sample.top_p=1.5'),
        ('sample.top_k', -1, 'config.sample.top_k=-1'),
        ('sample.max_new_tokens', 0, 'config.sample.max_new_tokens=0'),
        ('sample.max_new_tokens', 300, "config.sample.max_new_tokens=300 must be below the"),
        ('sample.num_prompts', -1, 'config.sample.num_prompts=-1'),
        ('sample.prompt_chars', 0, 'config.sample.prompt_chars=0'),
        ('pruning.final_sparsity', 1.5, 'config.pruning.final_sparsity=1.5'),
        ('pruning.final_sparsity', -0.1, 'config.pruning.final_sparsity=-0.1'),
        ('pruning.start_step', -1, 'config.pruning.start_step=-1'),
        ('pruning.every', 0, 'config.pruning.every=0'),
        ('pruning.include', '[', "config.pruning.include='[' is not a regular expression"),
        ('mesh.data', 3, 'mesh'),
        ('sharding_rules', 'zz', 'zz'),
        ('num_train_steps', 'abc', 'num_train_steps'),
    ]],
    case('train-pruning-end-before-start', TRAIN + [
        '--config.pruning.final_sparsity=0.5', '--config.pruning.start_step=30',
        '--config.pruning.end_step=10'], 'config.pruning.start_step=30 is after pruning.end_step'),
    case('train-pruning-selects-nothing', TRAIN + [
        '--config.pruning.final_sparsity=0.5', '--config.pruning.include=nomatch'],
        "config.pruning.include='nomatch' selects nothing"),
    case('train-accumulation-does-not-divide', TRAIN + [
        '--config.batch_size=6', '--config.grad_accum_steps=4'], 'batch_size=6 must be divisible'),
    case('train-spm-vocab-too-small', TRAIN + [
        '--config.data.tokenizer=sentencepiece', '--config.data.vocab_size=100'],
        'vocab_size=100 is too small'),
    case('train-spm-model-type', TRAIN + [
        '--config.data.tokenizer=sentencepiece', '--config.data.spm_model_type=word'],
        "spm_model_type='word'"),
    # Flags, config files, modes.
    case('flag-mode', TRAIN + ['--mode=bogus'],
         f'--mode=bogus: value should be one of <{"|".join(runners.RUNNERS)}>'),
    case('flag-prompt-not-sample', TRAIN + ['--prompt=hi'],
         '--prompt=hi applies to --mode=sample only'),
    case('flag-steps-not-benchmark', TRAIN + ['--steps=3'],
         '--steps=3 applies to --mode=benchmark, --mode=compare, --mode=decode_benchmark, '
         '--mode=serve_benchmark, --mode=exit_benchmark and --mode=cascade_benchmark only'),
    case('flag-draft-not-serve', TRAIN + ['--draft_tokens=2,3'],
         '--draft_tokens=2,3 applies to --mode=serve, --mode=serve_benchmark and --mode=http '
         'only'),
    case('flag-no-workdir', TINY, 'workdir'),
    case('flag-extra-argument', TRAIN + ['extra'], "unexpected arguments ['extra']"),
    case('flag-resume', TRAIN + ['--resume=sometimes'], 'resume'),
    case('flag-resume-not-train', ['--mode=eval', '--workdir={T}', '--resume=new'] + TINY,
         '--resume=new applies to --mode=train only'),
    case('config-missing', ['--config=experiments/configs/nope.py', '--workdir={W}'],
         "no such file 'experiments/configs/nope.py'"),
    case('config-syntax', ['--config={C}/broken.py', '--workdir={W}'], 'broken.py:1'),
    case('config-empty', ['--config={C}/empty.py', '--workdir={W}'], 'defines no get_config'),
    case('config-no-get-config', ['--config={C}/noget.py', '--workdir={W}'],
         'defines no get_config'),
    case('config-not-configdict', ['--config={C}/notcd.py', '--workdir={W}'],
         'returned a int, not a ml_collections.ConfigDict'),
    case('config-raises', ['--config={C}/raises.py', '--workdir={W}'],
         'get_config raised RuntimeError: no config today'),
    case('config-variant', ['--config=experiments/configs/shakespeare.py:huge', '--workdir={W}'],
         "error: unknown variant 'huge' of shakespeare.py"),
    case('config-prune-for-train', ['--config=experiments/configs/prune.py', '--workdir={W}'],
         '--mode=train needs a training config'),
    # Workdirs.
    case('workdir-is-a-file', TINY + ['--workdir={F}'], 'is a file, not a directory'),
    case('workdir-under-a-file', TINY + ['--workdir={F}/run'], 'cannot be created'),
    case('workdir-busy', TINY + ['--workdir={B}'], 'is in use by another run'),
    case('resume-params-nothing', TRAIN + ['--resume=params'],
         '--resume=params needs a checkpoint'),
    case('resume-other-model', TINY + ['--workdir={T}', '--config.model.d_model=64'],
         'holds a run of another configuration (model.d_model: 32 there, 64 here)'),
    case('resume-other-seq-len', TINY + ['--workdir={T}', '--config.data.seq_len=32'],
         'data.seq_len: 64 there, 32 here'),
    case('resume-other-batch', TINY + ['--workdir={T}', '--config.batch_size=16'],
         'data.batch_size: 8 there, 16 here'),
    case('resume-pruning-on', TINY + ['--workdir={T}', '--config.pruning.final_sparsity=0.5'],
         'state.gradual_pruning: False there, True here'),
    case('resume-below-checkpoint', TINY + ['--workdir={T}', '--config.num_train_steps=2'],
         'config.num_train_steps=2 is below the step of the newest checkpoint'),
    case('resume-garbage-signature', TINY + ['--workdir={G}'],
         'signature.json (the run signature) is not valid JSON'),
    # Read-only modes.
    case('eval-no-workdir', ['--mode=eval'] + TRAIN, 'does not exist: train there first'),
    case('eval-empty-workdir', ['--mode=eval', '--workdir={E}'] + TINY,
         'holds no checkpoint: train there first'),
    case('eval-other-model', TINY + ['--mode=eval', '--workdir={T}', '--config.model.d_model=64'],
         'holds a run of another configuration (model.d_model: 32 there, 64 here)'),
    case('eval-other-tokenizer', TINY + ['--mode=eval', '--workdir={T}',
                                         '--config.data.tokenizer=sentencepiece'],
         "tokenizer.kind: 'byte' there, 'sentencepiece' here"),
    case('sample-other-model', TINY + ['--mode=sample', '--workdir={T}', '--prompt=A',
                                       '--config.model.n_layers=3'],
         'model.n_layers: 2 there, 3 here'),
    case('sample-prompt-too-long', ['--mode=sample', '--workdir={T}', '--prompt=' + 'x' * 300] +
         TINY, 'the prompt is 301 tokens'),
    case('eval-bad-field', TINY + ['--mode=eval', '--workdir={T}', '--config.eval_batch_size=0'],
         'config.eval_batch_size=0'),
    # The pruning runner.
    case('prune-training-config', ['--mode=prune', '--workdir={W}'] + TINY,
         '--mode=prune needs a pruning config'),
    case('prune-source-missing', PRUNE + ['--config.source_workdir={W}_missing'],
         'has no config.json: train there first'),
    case('prune-source-no-checkpoint', PRUNE + ['--config.source_workdir={E}'],
         'holds no checkpoint'),
    case('prune-source-garbage-config', PRUNE + ['--config.source_workdir={H}'],
         "config.json (the source run's config) is not valid JSON"),
    case('prune-variant-name', ['--mode=prune', '--config=experiments/configs/prune.py:zzz',
                                '--workdir={W}'], "unknown variant 'zzz'"),
    *[case(f'prune-{v}', PRUNE + [f'--config.variants={v}'], m) for v, m in [
        ('', 'config.variants is empty'),
        ('foo:0.5', "unknown method 'foo'"),
        ('magnitude:1.5', 'sparsity=1.5 must be in [0, 1)'),
        ('magnitude:3:2', 'N:M pattern 3:2'),
        ('magnitude:3:6', 'M=6 does not divide'),
        ('magnitude:0.5,heads:0.9', "variant 'heads:0.9': heads: fraction=0.9 would remove all"),
        ('layers:5', 'n_remove=5 must be an integer in [0, 2)'),
        ('layers:0.5', 'n_remove=0.5 must be an integer'),
        ('experts:0.5', 'the model has no experts'),
        ('ffn:1.0', 'fraction=1.0 must be in [0, 1)'),
        ('ffn', 'give one amount'),
        ('magnitude:abc', 'expected numbers after the method'),
    ]],
    *[case(f'prune-{f}={v}', PRUNE + [f'--config.{f}={v}'], m) for f, v, m in [
        ('calibration_batches', 0, 'config.calibration_batches=0 must be an integer >= 1'),
        ('calibration_rows', 0, 'config.calibration_rows=0'),
        ('rounds', 0, 'config.rounds=0'),
        ('finetune_steps', -1, 'config.finetune_steps=-1 must be an integer >= 0'),
        ('finetune_learning_rate', 0, 'config.finetune_learning_rate=0.0 must be a finite'),
        ('importance', 'l3', "config.importance='l3' is not one of l1, l2, taylor"),
        ('hf_path', '/nonexistent', "config.hf_path='/nonexistent'"),
    ]],
    case('prune-workdir-is-a-file', PRUNE + ['--workdir={F}'], 'is a file, not a directory'),
    case('prune-mesh', PRUNE + ['--config.mesh.fsdp=2'], 'mesh: '),
    case('prune-mesh-size', PRUNE + ['--config.mesh.data=0'], 'mesh: data=0 is not allowed'),
    case('prune-rules', PRUNE + ['--config.sharding_rules=zz'], 'zz'),
    case('prune-workdir-is-source', PRUNE + ['--workdir={T}'], 'is the source run'),
    # The distillation runner (and recovery by distillation in the pruning runner).
    case('distill-training-config', ['--mode=distill', '--workdir={W}'] + TINY,
         '--mode=distill needs a distillation config'),
    case('distill-teacher-missing', DISTILL + ['--config.source_workdir={W}_missing'],
         'has no config.json: train there first'),
    case('distill-layer-map', DISTILL + ['--config.variants=every3:kd'],
         "variant 'every3:kd': every3: k must be in [1, 2]"),
    case('distill-alpha', DISTILL + ['--config.kd.alpha=2.0'], 'alpha=2.0 must be in [0, 1]'),
    case('distill-temperature', DISTILL + ['--config.variants=scratch:kd:t0'],
         'temperature=0.0 must be > 0'),
    case('prune-recover', PRUNE + ['--config.recover=distil'],
         "config.recover='distil' is not one of finetune, distill"),
    # The benchmark.
    case('bench-steps', ['--config=experiments/configs/shakespeare.py:tiny', '--steps=0'],
         '--steps=0 must be a positive integer', BENCH),
    case('bench-vocab', ['--config=experiments/configs/shakespeare.py:tiny', '--vocab_size=-1'],
         '--vocab_size=-1 must be >= 0', BENCH),
    case('bench-remat', ['--config=experiments/configs/shakespeare.py:tiny', '--remat=bogus'],
         "--remat: 'bogus' is not one of", BENCH),
    case('bench-field', ['--config=experiments/configs/shakespeare.py:tiny',
                         '--config.batch_size=0'], 'config.batch_size=0', BENCH),
    case('bench-prune-config', ['--config=experiments/configs/prune.py'],
         'the benchmark needs a training config', BENCH),
    case('bench-main-workdir', ['--mode=benchmark'] + TRAIN,
         '--mode=benchmark takes no --workdir'),
    case('bench-main-steps', ['--mode=benchmark', '--steps=0',
                              '--config=experiments/configs/shakespeare.py:tiny'],
         '--steps=0 must be a positive integer'),
    case('bench-microbatches-text', ['--mode=benchmark', '--microbatches=4,many',
                                     '--config=experiments/configs/shakespeare.py:tiny'],
         '--microbatches=4,many must be integers'),
    case('bench-microbatches-zero', ['--mode=benchmark', '--microbatches=0',
                                     '--config=experiments/configs/shakespeare.py:tiny'],
         '--microbatches: 0 must be a positive integer'),
    case('flag-microbatches-not-benchmark', TRAIN + ['--microbatches=4'],
         '--microbatches=4 applies to --mode=benchmark only'),
    # Damaged data.
    case('data-truncated-shard', TINY[:1] + ['--workdir={W}', '--config.data.data_dir={X1}'],
         r'damaged data: .*shakespeare_plays-train.array_record-00000-of-00001 holds 0 records, '
         r'its metadata says 700; delete .* and run again'),
    case('data-no-dataset-info', TINY[:1] + ['--workdir={W}', '--config.data.data_dir={X2}'],
         'damaged data: .*dataset_info.json is missing'),
    case('data-garbage-dataset-info', TINY[:1] + ['--workdir={W}',
                                                  '--config.data.data_dir={X3}'],
         'damaged data: the metadata in .* cannot be read'),
]


@pytest.fixture(scope='module')
def places(tmp_path_factory, data_dir):
  """Every path a row may name, with the trained run and the damaged data they need."""
  root = tmp_path_factory.mktemp('bad_inputs')
  trained = root / 'trained'
  config = tiny_config(data_dir, num_train_steps=4, checkpoint_every=2, eval_every=4)
  train.train_and_evaluate(config, trained)
  garbage = root / 'garbage_signature'
  shutil.copytree(trained, garbage)
  (garbage / 'signature.json').write_text('{"model": ')
  empty = root / 'empty_run'
  empty.mkdir()
  (empty / 'config.json').write_text((trained / 'config.json').read_text())
  bad_source = root / 'bad_source'
  bad_source.mkdir()
  (bad_source / 'config.json').write_text('{"data": ')
  configs = root / 'configs'
  configs.mkdir()
  for name, text in [('broken', 'def get_config(:\n'), ('empty', ''), ('noget', 'x = 1\n'),
                     ('notcd', 'def get_config():\n  return 3\n'),
                     ('raises', 'def get_config():\n  raise RuntimeError("no config today")\n')]:
    (configs / f'{name}.py').write_text(text)
  a_file = root / 'a_file'
  a_file.write_text('not a directory')
  damaged = []
  for i in (1, 2, 3):
    copy = root / f'data{i}'
    shutil.copytree(data_dir, copy)
    damaged.append(copy)
  version = 'shakespeare_plays/1.0.0'
  shard = damaged[0] / version / 'shakespeare_plays-train.array_record-00000-of-00001'
  shard.write_bytes(shard.read_bytes()[:shard.stat().st_size // 2])
  (damaged[1] / version / 'dataset_info.json').unlink()
  (damaged[2] / version / 'dataset_info.json').write_text('{"name": ')
  return dict(D=data_dir, T=trained, G=garbage, E=empty, H=bad_source, C=configs, F=a_file,
              B=root / 'busy', X1=damaged[0], X2=damaged[1], X3=damaged[2], root=root)


@pytest.fixture(scope='module')
def results(places):
  """Runs every row once (in one helper process) while a lock on the busy workdir is held."""
  rows = []
  for i, param in enumerate(CASES):
    module, args, _ = param.values
    values = {k: str(v) for k, v in places.items()}
    values['W'] = str(places['root'] / f'fresh_{i}')
    watch = [values[k] for k in ('W', 'D', 'T', 'G', 'E', 'H', 'F', 'B', 'X1', 'X2', 'X3')]
    rows.append(dict(module=module, args=[a.format(**values) for a in args], watch=watch))
  lock = workdir_lib.Lock(places['B']).acquire()
  try:
    out = subprocess.run([sys.executable, '-m', 'tests.cli_cases'], input=json.dumps(rows),
                         capture_output=True, text=True, cwd=ROOT, env=cli_env(), timeout=900)
  finally:
    lock.release()
  assert out.returncode == 0, out.stderr[-3000:]
  return {param.id: r for param, r in zip(CASES, json.loads(out.stdout))}


def test_the_table_is_large_enough():
  assert len(CASES) >= 60
  modes = {('prune' if '--mode=prune' in c.values[1] else
            'eval/sample' if any(a in c.values[1] for a in ('--mode=eval', '--mode=sample')) else
            c.values[0]) for c in CASES}
  assert modes == {MAIN, BENCH, 'prune', 'eval/sample'}


@pytest.mark.parametrize('module, args, match', CASES)
def test_bad_input_fails_in_one_line_and_writes_nothing(results, request, module, args, match):
  r = results[request.node.callspec.id]
  output = r['stdout'] + r['stderr']
  assert r['rc'] == 1, output[-2000:]
  assert 'Traceback' not in output, output[-3000:]
  lines = [l for l in r['stderr'].splitlines() if l.strip()]
  # Only the error line: absl log lines (I/W/E + date) may not precede it either.
  assert len(lines) == 1 and lines[0].startswith('error: '), output[-2000:]
  assert re.search(match if match.startswith('damaged') else re.escape(match), lines[0]), lines[0]
  assert r['changed'] == [], f'{r["changed"]} changed: {lines[0]}'
