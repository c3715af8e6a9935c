"""Two processes on localhost through `jax.distributed` (4 CPU devices each) against one process."""

import json
import os
import pathlib
import socket
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
import pytest

import sharding
from experiments import checkpoints
from tests import multihost_worker

ROOT = pathlib.Path(__file__).resolve().parents[1]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def launch(make_cmd, timeout=240):
  """Starts `make_cmd(process_id)` for processes 0 and 1 and returns their (rc, output)."""
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS='--xla_force_host_platform_device_count=4')
  logs = [tempfile.TemporaryFile('w+') for _ in range(2)]
  procs = [subprocess.Popen(make_cmd(i), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            text=True) for i, log in enumerate(logs)]
  deadline = time.time() + timeout
  while time.time() < deadline and any(p.poll() is None for p in procs):
    time.sleep(0.2)
  for p in procs:   # a process that outlived the deadline is killed; its output still shows
    if p.poll() is None:
      p.kill()
      p.wait()
  outs = []
  for log in logs:
    log.seek(0)
    outs.append(log.read())
    log.close()
  return [(p.returncode, out) for p, out in zip(procs, outs)]


def assert_ok(results):
  for i, (rc, out) in enumerate(results):
    assert rc == 0, f'process {i} failed:\n{out[-3000:]}'


def test_two_processes_train_like_one_and_their_checkpoint_restores_in_one(tmp_path):
  address = f'127.0.0.1:{free_port()}'
  assert_ok(launch(lambda i: [sys.executable, '-m', 'tests.multihost_worker', address, str(i),
                              str(tmp_path)]))
  written = json.loads((tmp_path / 'losses.json').read_text())
  assert written['process_count'] == 2 and written['devices'] == 8

  assert jax.device_count() == 8 and jax.process_count() == 1
  config = multihost_worker.config()
  losses, state, placement = multihost_worker.run_steps(config)
  np.testing.assert_allclose(written['losses'], losses, rtol=1e-5)
  assert len(set(losses)) == len(losses)   # the steps did update the model

  ckpts = checkpoints.Checkpoints(tmp_path, writer=False)
  r = ckpts.restore_latest(placement.abstract)
  step, restored, data_state = r.step, r.state, r.data
  assert step == multihost_worker.N_STEPS
  assert [json.loads(s)['pid'] for s in data_state['iterators']] == [0, 1]
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  on_one = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one),
                        placement.abstract)
  single = ckpts.restore_latest(on_one).state
  for tree in (restored, single):
    for got, want in zip(jax.tree.leaves(tree), jax.tree.leaves(state)):
      np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-7)
  assert all(x.sharding == one for x in jax.tree.leaves(single))


def metrics_lines(workdir):
  return [json.loads(l) for l in (workdir / 'metrics.jsonl').read_text().splitlines()]


def test_cli_two_processes_train_resume_then_evaluate_in_one(tmp_path):
  workdir, data_dir = tmp_path / 'run', tmp_path / 'tfds'
  address = f'127.0.0.1:{free_port()}'

  def main_cmd(steps):
    return lambda i: [
        sys.executable, '-m', 'experiments.main',
        '--config=experiments/configs/shakespeare.py:tiny', f'--workdir={workdir}',
        f'--config.data.data_dir={data_dir}', f'--config.num_train_steps={steps}',
        '--config.checkpoint_every=2', '--config.eval_every=100', '--config.sample.num_prompts=0',
        '--config.mesh.fsdp=2', '--config.sharding_rules=fsdp',
        f'--coordinator_address={address}', '--num_processes=2', f'--process_id={i}']

  assert_ok(launch(main_cmd(4)))
  assert [r['step'] for r in metrics_lines(workdir) if 'train_loss' in r] == [1, 2, 3, 4]
  results = launch(main_cmd(6))
  assert_ok(results)
  assert 'resumed from the checkpoint at step 4' in results[0][1]
  lines = metrics_lines(workdir)   # written by process 0 alone: every step exactly once
  assert [r['step'] for r in lines if 'train_loss' in r] == [1, 2, 3, 4, 5, 6]
  two_process_eval = [r for r in lines if 'eval_loss' in r]
  assert [r['step'] for r in two_process_eval] == [4, 6]
  data_state = checkpoints.Checkpoints(workdir, writer=False).read_data(6)
  assert len(data_state['iterators']) == 2   # each host's own data position

  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)
  r = subprocess.run([sys.executable, '-m', 'experiments.main', '--mode=eval',
                      '--config=experiments/configs/shakespeare.py:tiny', f'--workdir={workdir}',
                      f'--config.data.data_dir={data_dir}'], cwd=ROOT, env=env,
                     capture_output=True, text=True, timeout=240)
  assert r.returncode == 0, r.stderr[-3000:]
  one_process = json.loads(r.stdout)
  assert one_process['step'] == 6
  np.testing.assert_allclose(one_process['loss'], two_process_eval[-1]['eval_loss'], rtol=1e-5)


@pytest.mark.parametrize('kwargs, match', [
    (dict(coordinator_address='127.0.0.1:1', num_processes=2), 'process_id=None must be in'),
    (dict(coordinator_address='127.0.0.1:1', process_id=0), 'num_processes=None'),
    (dict(num_processes=2, process_id=1), 'need a coordinator address'),
    (dict(coordinator_address='127.0.0.1:1', num_processes=2, process_id=2),
     r'process_id=2 must be in \[0, 2\)'),
    (dict(mode='sometimes'), "mode 'sometimes' is not one of auto, on, off"),
])
def test_bad_distributed_arguments_are_one_line_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    sharding.initialize(**kwargs)


def test_single_process_needs_no_distributed_runtime():
  assert sharding.initialize() is False   # no launcher detected: nothing to join
  assert sharding.allgather_bytes(b'abc') == [b'abc']
  sharding.assert_same('a table', b'abc')


@pytest.mark.parametrize('env, joins', [
    (dict(SLURM_NTASKS='4'), True), (dict(SLURM_NTASKS='1'), False),
    (dict(OMPI_COMM_WORLD_SIZE='2'), True), (dict(TPU_WORKER_HOSTNAMES='w0,w1'), True),
    (dict(TPU_WORKER_HOSTNAMES='w0'), False), ({}, False),
])
def test_auto_mode_joins_only_under_a_multi_process_launcher(monkeypatch, env, joins):
  for name in ('SLURM_NTASKS', 'OMPI_COMM_WORLD_SIZE', 'TPU_WORKER_HOSTNAMES',
               'MEGASCALE_COORDINATOR_ADDRESS'):
    monkeypatch.delenv(name, raising=False)
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  assert sharding.distributed._cluster_detected() is joins
