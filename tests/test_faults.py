"""Fault injection: every defect of the 'never lose a run' review (issue 10) reproduced and fixed.

Each test names the defect it covers. The bar: nothing already written is lost, a run that can
resume does so to the same per-step losses as an uninterrupted run, and one that cannot stops
with one line saying why.
"""

import json
import pathlib
import re
import shutil
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import checkpoints, data, runtime, steps, train, workdir as workdir_lib
from experiments.errors import UserError
from experiments.metrics import Diverged
from tests.runs import losses, records, run_main, snapshot, tiny_config

STEPS = dict(num_train_steps=10, checkpoint_every=5, eval_every=10)


def trained(data_dir, workdir, **changes):
  config = tiny_config(data_dir, **dict(STEPS, **changes))
  train.train_and_evaluate(config, workdir)
  return config


def damage(step_dir: pathlib.Path) -> None:
  """Truncates every data file of a checkpoint's state (what a full disk or a bad copy leaves)."""
  files = [p for p in step_dir.glob('state/**/d/*') if p.is_file()]
  assert files
  for path in files:
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


@pytest.fixture(scope='module')
def reference(tmp_path_factory, data_dir):
  """Per-step losses of an uninterrupted 10-step run."""
  workdir = tmp_path_factory.mktemp('reference')
  trained(data_dir, workdir)
  return losses(workdir)


# 1. A resume whose state tree or configuration differs is refused and touches nothing; the
#    explicit options archive the run instead of deleting it.
def test_mismatched_resume_is_refused_and_touches_nothing(tmp_path, data_dir):
  config = trained(data_dir, tmp_path)
  before = snapshot(tmp_path)
  pruned = tiny_config(data_dir, **dict(STEPS, num_train_steps=20))
  pruned.pruning.final_sparsity = 0.5
  with pytest.raises(UserError, match=r'another configuration .*gradual_pruning: False there'):
    train.train_and_evaluate(pruned, tmp_path)
  assert snapshot(tmp_path) == before
  # Without signature.json the checkpoint's own copy of the signature still refuses.
  (tmp_path / 'signature.json').unlink()
  before = snapshot(tmp_path)
  wider = tiny_config(data_dir, **STEPS)
  wider.model.d_model = 64
  with pytest.raises(checkpoints.CheckpointMismatch, match='model.d_model: 32 there, 64 here'):
    train.train_and_evaluate(wider, tmp_path)
  assert snapshot(tmp_path) == before

  # --resume=params: a new run (here with pruning, starting after its two steps) from the old
  # parameters, which a near-zero rate keeps; the old run archived whole.
  old_params = runtime.load_params(config, tmp_path)[3]
  pruned.optimizer.update(learning_rate=1e-12, weight_decay=0.0)
  pruned.pruning.update(start_step=2, end_step=2)
  pruned.num_train_steps = 2
  train.train_and_evaluate(pruned, tmp_path, resume='params')
  assert snapshot(tmp_path / 'archive' / '1') == before
  assert workdir_lib.checkpoint_steps(tmp_path) == [2]
  new_params = runtime.load_params(pruned, tmp_path)[3]
  for a, b in zip(jax.tree.leaves(old_params), jax.tree.leaves(new_params)):
    np.testing.assert_allclose(a, b, atol=1e-6)
  # --resume=new: archived again, a fresh run.
  train.train_and_evaluate(config, tmp_path, resume='new')
  assert workdir_lib.checkpoint_steps(tmp_path / 'archive' / '2') == [2]
  assert losses(tmp_path)[1] == pytest.approx(np.log(259), abs=0.3)   # from scratch


def test_layout_differences_name_what_differs():
  a = {'params': {'w': jnp.zeros((2, 3)), 'b': jnp.zeros(3)}, 'opt': [jnp.zeros(())]}
  b = {'params': {'w': jnp.zeros((2, 4)), 'b': jnp.zeros(3)}, 'mask': {'w': jnp.zeros(2)}}
  assert checkpoints.layout_differences(a, b) == [
      'opt/0 only in the checkpoint', 'mask/w missing from the checkpoint',
      'params/w: (2, 3) float32 there, (2, 4) float32 here']
  assert checkpoints.layout_differences(a, a) == []


# 1 (continued). Every checkpoint damaged: set aside (never deleted) and the run refuses to
#    start over quietly.
def test_all_checkpoints_damaged_are_kept_and_refused(tmp_path, data_dir):
  config = trained(data_dir, tmp_path)
  for step in (5, 10):
    damage(tmp_path / 'checkpoints' / str(step))
  with pytest.raises(UserError, match=r'every checkpoint .* is damaged .*damaged/: 10, 5.*'
                                      r'--resume=new'):
    train.train_and_evaluate(config, tmp_path)
  assert sorted(p.name for p in (tmp_path / 'checkpoints' / 'damaged').iterdir()) == ['10', '5']
  assert losses(tmp_path).keys() == set(range(1, 11))   # metrics untouched
  with pytest.raises(UserError, match='every checkpoint'):   # and again, from validation
    train.train_and_evaluate(config, tmp_path)
  train.train_and_evaluate(config, tmp_path, resume='new')
  assert (tmp_path / 'archive' / '1' / 'checkpoints' / 'damaged' / '10' / 'state').is_dir()


# 2. A damaged newest checkpoint: set aside, the run resumes from the previous one, saves the
#    same step again, and reproduces the uninterrupted losses.
def test_damaged_newest_checkpoint_is_set_aside_and_the_run_reproduces(tmp_path, data_dir,
                                                                        reference):
  config = trained(data_dir, tmp_path)
  damage(tmp_path / 'checkpoints' / '10')
  train.train_and_evaluate(config, tmp_path)
  assert (tmp_path / 'checkpoints' / 'damaged' / '10' / 'state').is_dir()
  assert workdir_lib.checkpoint_steps(tmp_path) == [5, 10]
  assert losses(tmp_path) == reference
  assert [r['step'] for r in records(tmp_path) if 'eval_loss' in r] == [10]


# 3. A torn last line of metrics.jsonl (a full disk, a kill mid-write) does not stop a resume.
def test_torn_metrics_line_is_dropped_on_resume(tmp_path, data_dir, reference):
  config = trained(data_dir, tmp_path)
  shutil.rmtree(tmp_path / 'checkpoints' / '10')   # as if killed before it committed
  with (tmp_path / 'metrics.jsonl').open('a') as f:
    f.write('{"step": 11, "train_lo')
  train.train_and_evaluate(config, tmp_path)
  assert losses(tmp_path) == reference   # every line parses, each step once


# 4. Non-finite steps are never applied, never checkpointed, and stop the run naming the step.
def test_a_nonfinite_step_leaves_the_state_as_it_was(data_dir):
  config = tiny_config(data_dir)
  tokenizer, model, tx = runtime.setup(config)
  state = steps.init_state(model, tx, 0, config.data.seq_len)
  batch = next(data.train_iterator(config.data, tokenizer, batch_size=8, seed=0))
  token_bytes = jnp.asarray(tokenizer.token_bytes, jnp.float32)
  before = jax.tree.map(np.asarray, state)
  poisoned = dict(batch, weights=np.where(batch['weights'] > 0, np.nan, 0).astype(np.float32))
  after, metrics = steps.train_step(state, poisoned, token_bytes, loss=steps.lm_loss(model),
                                    accum_steps=1)
  assert not bool(metrics['finite']) and int(after.step) == 1
  for a, b in zip(jax.tree.leaves(before.params) + jax.tree.leaves(before.opt_state),
                  jax.tree.leaves(after.params) + jax.tree.leaves(after.opt_state)):
    np.testing.assert_array_equal(a, b)
  after, metrics = steps.train_step(after, batch, token_bytes, loss=steps.lm_loss(model),
                                    accum_steps=1)
  assert bool(metrics['finite']) and int(after.step) == 2
  # A finite step is applied (Adam's moments move; the learning rate starts at 0 in warmup).
  assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before.opt_state),
                                                       jax.tree.leaves(after.opt_state)))


@pytest.mark.parametrize('policy', ['skip', 'stop'])
def test_divergence_stops_the_run_and_no_checkpoint_holds_it(tmp_path, data_dir, policy):
  config = tiny_config(data_dir, num_train_steps=40, checkpoint_every=2, log_every=10,
                       eval_every=100, nonfinite=policy, max_nonfinite_steps=4)
  config.optimizer.learning_rate = 1e6
  with pytest.raises(Diverged, match=r'training stopped at step (\d+): the loss or gradients '
                                     r'are not finite') as info:
    train.train_and_evaluate(config, tmp_path)
  stopped = int(re.search(r'at step (\d+):', str(info.value)).group(1))
  first_bad = stopped - (4 - 1 if policy == 'skip' else 0)
  saved = workdir_lib.checkpoint_steps(tmp_path)
  assert saved and max(saved) < first_bad, (saved, stopped)
  assert f'the newest checkpoint is step {max(saved)}' in str(info.value)
  abstract = runtime.Placement(config, *runtime.setup(config)[1:]).abstract.params
  for step in saved:
    params = checkpoints.restore_params(tmp_path / 'checkpoints' / str(step), abstract)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


def test_eval_of_nonfinite_parameters_is_one_line(tmp_path, data_dir):
  config = trained(data_dir, tmp_path, num_train_steps=2, checkpoint_every=2, eval_every=2)
  tokenizer, model, tx = runtime.setup(config, tmp_path)
  placement = runtime.Placement(config, model, tx)
  ckpts = checkpoints.Checkpoints(tmp_path, writer=True)
  state = ckpts.restore_latest(placement.abstract).state
  state = state.replace(params=jax.tree.map(lambda x: x * jnp.nan, state.params))
  ckpts.save(4, state, ckpts.read_data(2))
  ckpts.wait()
  with pytest.raises(UserError, match='step 4 .* evaluates to a non-finite loss'):
    runtime.evaluate(config, tmp_path)


# 5. An exception in the loop still finishes the checkpoint being written; Ctrl-C (SIGINT) saves
#    and stops like SIGTERM, and a kill -9 loses nothing either: each resumes to the same losses.
def test_an_exception_in_the_loop_finishes_the_checkpoint_in_flight(tmp_path, data_dir,
                                                                    monkeypatch):
  def boom(*args, **kwargs):
    raise RuntimeError('evaluation failed')
  monkeypatch.setattr(train, 'evaluate_params', boom)
  config = tiny_config(data_dir, num_train_steps=10, checkpoint_every=5, eval_every=5)
  with pytest.raises(RuntimeError, match='evaluation failed'):
    train.train_and_evaluate(config, tmp_path)
  assert workdir_lib.checkpoint_steps(tmp_path) == [5]
  assert not list((tmp_path / 'checkpoints').glob('*tmp*'))
  workdir_lib.Lock(tmp_path).acquire().release()   # the lock was released
  assert checkpoints.Checkpoints(tmp_path, writer=False).restore_latest(
      runtime.Placement(config, *runtime.setup(config)[1:]).abstract).step == 5


@pytest.fixture(scope='module')
def straight(tmp_path_factory, data_dir):
  workdir = tmp_path_factory.mktemp('straight')
  r = run_main(*SIGNAL_RUN, workdir=workdir, data_dir=data_dir)
  assert r.returncode == 0, r.stderr[-3000:]
  return losses(workdir)


SIGNAL_RUN = ['--config.num_train_steps=16', '--config.checkpoint_every=3',
              '--config.eval_every=1000', '--config.sample.num_prompts=0']


@pytest.mark.parametrize('sig', [signal.SIGINT, signal.SIGTERM, signal.SIGKILL],
                         ids=['SIGINT', 'SIGTERM', 'SIGKILL'])
def test_a_signal_at_any_moment_loses_nothing(tmp_path, data_dir, straight, sig):
  proc = run_main(*SIGNAL_RUN, workdir=tmp_path, data_dir=data_dir, wait=False)
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    if (tmp_path / 'metrics.jsonl').exists() and len(losses(tmp_path)) >= 7:
      proc.send_signal(sig)
      break
    time.sleep(0.02)
  out, _ = proc.communicate(timeout=240)
  assert 'Traceback' not in out, out[-3000:]
  stopped_at = max(losses(tmp_path))
  assert stopped_at < 16, 'the run finished before the signal arrived'
  if sig == signal.SIGKILL:
    assert proc.returncode == -9
  else:
    assert proc.returncode == 0, out[-3000:]
    assert f'{sig.name} received: saving a checkpoint' in out
    assert workdir_lib.checkpoint_steps(tmp_path)[-1] == stopped_at
  resumed = run_main(*SIGNAL_RUN, workdir=tmp_path, data_dir=data_dir)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert 'resumed from the checkpoint at step' in resumed.stderr
  assert losses(tmp_path) == straight
  assert not list((tmp_path / 'checkpoints').glob('*tmp*'))


# 6. Two trainings on one workdir: the second is refused in one line; a read-only evaluation
#    may run beside the training; a lock left by a killed run does not block the next one.
def test_a_busy_workdir_refuses_a_second_run_but_not_a_reader(tmp_path, data_dir):
  long_run = ['--config.num_train_steps=100000', '--config.checkpoint_every=2',
              '--config.eval_every=100000', '--config.sample.num_prompts=0']
  proc = run_main(*long_run, workdir=tmp_path, data_dir=data_dir, wait=False)
  try:
    deadline = time.time() + 240
    while time.time() < deadline and len(workdir_lib.checkpoint_steps(tmp_path)) < 2:
      time.sleep(0.1)
    second = run_main('--config.num_train_steps=100000', workdir=tmp_path, data_dir=data_dir)
    lines = second.stderr.strip().splitlines()
    assert second.returncode == 1 and len(lines) == 1, second.stderr[-2000:]
    assert f'is in use by another run (pid {proc.pid} on ' in lines[0]
    for _ in range(2):   # checkpoints rotate every few milliseconds here
      ev = run_main('--mode=eval', workdir=tmp_path, data_dir=data_dir)
      assert ev.returncode == 0, ev.stderr[-2000:]
      assert json.loads(ev.stdout)['step'] >= 2
  finally:
    proc.kill()
    proc.communicate()
  newest = workdir_lib.checkpoint_steps(tmp_path)[-1]
  r = run_main(f'--config.num_train_steps={newest + 2}', '--config.checkpoint_every=2',
               '--config.sample.num_prompts=0', workdir=tmp_path, data_dir=data_dir)
  assert r.returncode == 0, r.stderr[-3000:]
  assert 'took over the lock of a run that ended' in r.stderr
  steps_logged = [rec['step'] for rec in records(tmp_path) if 'train_loss' in rec]
  assert steps_logged == list(range(1, newest + 3))   # each step once


def test_a_stale_lock_on_object_storage_expires(tmp_path, monkeypatch):
  monkeypatch.setattr(workdir_lib, 'is_local', lambda path: False)
  (tmp_path / '.lock').write_text(json.dumps(dict(pid=1, host='elsewhere', since='then',
                                                  heartbeat=time.time())))
  with pytest.raises(UserError, match='in use by another run .*elsewhere'):
    workdir_lib.Lock(tmp_path).acquire()
  (tmp_path / '.lock').write_text(json.dumps(dict(pid=1, host='elsewhere', since='then',
                                                  heartbeat=time.time() - 3600)))
  lock = workdir_lib.Lock(tmp_path).acquire()
  assert json.loads((tmp_path / '.lock').read_text())['pid'] != 1
  lock.release()
  assert not (tmp_path / '.lock').exists()


# 10. A failed start does not bind the workdir to its config.
def test_a_failed_start_leaves_the_workdir_free(tmp_path, data_dir, monkeypatch):
  def fail(*args, **kwargs):
    raise RuntimeError('compile failed')
  with monkeypatch.context() as m:
    m.setattr(train, '_compile_and_report', fail)
    with pytest.raises(RuntimeError, match='compile failed'):
      train.train_and_evaluate(tiny_config(data_dir, **STEPS), tmp_path)
  assert not (tmp_path / 'signature.json').exists()
  other = tiny_config(data_dir, **dict(STEPS, num_train_steps=2))
  other.model.d_model = 64
  train.train_and_evaluate(other, tmp_path)
  assert workdir_lib.saved_signature(tmp_path)['model']['d_model'] == 64


# 11. Damaged data: named in one line (tests/test_bad_inputs.py runs those command lines); a
#     damaged cached tokenizer is trained again, and a run keeps its own tokenizer.
def test_a_damaged_tokenizer_cache_is_rebuilt_and_runs_keep_their_own(tmp_path, data_dir,
                                                                     caplog):
  root = tmp_path / 'tfds'
  shutil.copytree(data_dir, root)
  config = tiny_config(root, num_train_steps=2, checkpoint_every=2, eval_every=2)
  config.data.update(tokenizer='sentencepiece', vocab_size=384, train_split='train[:20%]')
  train.train_and_evaluate(config, tmp_path / 'run')
  cache = next((root / 'tokenizers').glob('*.model'))
  proto = cache.read_bytes()
  assert (tmp_path / 'run' / 'tokenizer.model').read_bytes() == proto
  cache.write_bytes(proto[:100])
  config.num_train_steps = 4   # resumes with its own copy: the damaged cache is not even read
  train.train_and_evaluate(config, tmp_path / 'run')
  assert cache.read_bytes() == proto[:100]
  with caplog.at_level('WARNING'):
    tokenizer = data.get_tokenizer(config.data)
  assert 'is damaged; training it again' in caplog.text
  assert tokenizer.model_proto == proto == cache.read_bytes()


# 12. Smaller ones: a complete run reports its last evaluation; a run killed during an
#     evaluation finds its checkpoint saved and evaluates first on resume.
def test_a_complete_run_reports_its_last_evaluation(tmp_path, data_dir):
  config = tiny_config(data_dir, **STEPS)
  first = train.train_and_evaluate(config, tmp_path)
  again = train.train_and_evaluate(config, tmp_path)
  assert again == pytest.approx(first) and again['nats_per_byte'] > 0


def test_a_kill_during_evaluation_keeps_the_checkpoint_and_evaluates_on_resume(
    tmp_path, data_dir, monkeypatch, reference):
  def killed(*args, **kwargs):
    raise KeyboardInterrupt
  config = tiny_config(data_dir, **STEPS)
  with monkeypatch.context() as m:
    m.setattr(train, 'evaluate_params', killed)
    with pytest.raises(KeyboardInterrupt):
      train.train_and_evaluate(config, tmp_path)
  assert workdir_lib.checkpoint_steps(tmp_path) == [5, 10]   # saved before the evaluation
  assert not [r for r in records(tmp_path) if 'eval_loss' in r]
  metrics = train.train_and_evaluate(config, tmp_path)
  assert [r['step'] for r in records(tmp_path) if 'eval_loss' in r] == [10]
  assert metrics['nats_per_byte'] > 0 and losses(tmp_path) == reference


# Disk full: a checkpoint write that fails stops the run in one line; the checkpoints already
# written stay intact and the next run resumes from them to the same losses.
def test_a_failed_checkpoint_write_keeps_the_earlier_ones(tmp_path, data_dir, reference):
  trained(data_dir, tmp_path, num_train_steps=10, checkpoint_every=5, eval_every=100)
  before = snapshot(tmp_path / 'checkpoints')

  # Files may not grow past 49 kB: such writes fail (EFBIG, ignoring the signal that would
  # kill the process) as writes to a full disk fail (ENOSPC).
  small_files = ('bash', '-c', 'trap "" XFSZ; ulimit -f 49; exec "$@"', 'limited')
  r = run_main('--config.num_train_steps=20', '--config.checkpoint_every=5',
               '--config.eval_every=100', '--config.sample.num_prompts=0', workdir=tmp_path,
               data_dir=data_dir, prefix=small_files)
  assert r.returncode == 1
  assert r.stderr.strip().splitlines()[-1].startswith(
      'error: writing the checkpoint at step 15 failed (File too large [errno 27]); the '
      'checkpoints already written are intact (steps 5, 10)')
  assert 'Traceback' not in r.stderr
  assert workdir_lib.checkpoint_steps(tmp_path) == [5, 10]
  after = snapshot(tmp_path / 'checkpoints')
  assert {k: v for k, v in after.items() if k.split('/')[0] in ('5', '10')} == before
  r = run_main('--config.num_train_steps=20', '--config.checkpoint_every=5',
               '--config.eval_every=100', '--config.sample.num_prompts=0', workdir=tmp_path,
               data_dir=data_dir)
  assert r.returncode == 0, r.stderr[-3000:]
  assert workdir_lib.checkpoint_steps(tmp_path) == [15, 20]
  assert not list((tmp_path / 'checkpoints').glob('*tmp*'))
