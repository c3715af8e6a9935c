"""Test-wide JAX settings: 8 fake CPU devices, float32 matmuls, strict rank promotion."""

import faulthandler
import os
import signal
import subprocess
import sys
import threading
import time

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
# No persistent compilation cache: it saved about a third of the suite's time, but writing an
# entry calls jaxlib 0.10's CPU executable serializer, which segfaulted an xdist worker in two CI
# runs (never in a local full run). Every process compiles its own programs.

import jax  # noqa: E402

jax.config.update('jax_platforms', 'cpu')
jax.config.update('jax_numpy_rank_promotion', 'raise')
jax.config.update('jax_default_matmul_precision', 'highest')

import pytest  # noqa: E402

from experiments import data  # noqa: E402


_CONFIG = {}
# Seconds a test (setup and teardown included) may run before its process prints every thread's
# stack and exits: a hang then fails that test, under xdist through the crash rerun below,
# instead of stalling the suite. Native code cannot block this (faulthandler's own thread).
TEST_TIME_LIMIT = int(os.environ.get('FRUGAL_TEST_TIME_LIMIT', '900'))
# Seconds the xdist controller may go without a test report before it ends the stall itself
# (`_watch`): more than a test's limit, or a crash rerun's (a crash counts as a report).
STALL_LIMIT = int(os.environ.get('FRUGAL_STALL_LIMIT', str(TEST_TIME_LIMIT + 300)))
_PROGRESS = dict(last=time.monotonic(), collected=set(), reported=set(), failed=False)


def pytest_configure(config):
  _CONFIG['config'] = config
  # The terminal's stderr, taken before output capture can redirect it (as pytest's faulthandler
  # plugin does); under xdist a worker's sys.stderr is not a file.
  stream = sys.stderr if hasattr(sys.stderr, 'fileno') else sys.__stderr__
  try:
    _CONFIG['stderr'] = os.dup(stream.fileno())
  except (AttributeError, ValueError, OSError):
    _CONFIG['stderr'] = os.dup(sys.__stderr__.fileno())


def pytest_sessionstart(session):
  config = session.config
  if not hasattr(config, 'workerinput') and getattr(config.option, 'numprocesses', None):
    threading.Thread(target=_watch, daemon=True).start()


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_node_collection_finished(node, ids):
  _PROGRESS['collected'].update(ids)


def pytest_runtest_logreport(report):
  _PROGRESS['last'] = time.monotonic()
  if report.when != 'setup' or not report.passed:   # a test that only started is not done
    _PROGRESS['reported'].add(report.nodeid)
  _PROGRESS['failed'] |= report.failed


def _watch():
  """Ends an xdist run that has stalled: no test reported for STALL_LIMIT seconds.

  After a worker crash, xdist's file scheduling twice left both workers idle, each holding its
  last test, and the controller waiting on them until CI's limit. Here the tests never reported
  run in one fresh serial process, then the workers are stopped (stopped first, xdist would take
  them for crashed and start others), and the run exits with the verdict of everything (failed
  if anything failed before or there)."""
  while time.monotonic() - _PROGRESS['last'] < STALL_LIMIT:
    time.sleep(min(30, STALL_LIMIT / 4))
  missing = sorted(_PROGRESS['collected'] - _PROGRESS['reported'])
  write = lambda line: os.write(_CONFIG['stderr'], (line + '\n').encode())
  write(f'\nno test reported for {STALL_LIMIT} s: {len(missing)} tests never reported run '
        f'again in one fresh process, then the workers are stopped')
  rc = 0
  if missing:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider',
                          *missing], cwd=root, capture_output=True, text=True)
    write(run.stdout[-20000:] + run.stderr[-5000:])
    rc = run.returncode
  verdict = 1 if _PROGRESS['failed'] or rc else 0
  write(f'the stalled run ends with exit {verdict}')
  for pid in _children():
    try:
      os.kill(pid, signal.SIGKILL)
    except OSError:
      pass
  os._exit(verdict)


def _children():
  """The pids of this process's children (the xdist workers)."""
  pids = []
  for entry in os.listdir('/proc'):
    try:
      with open(f'/proc/{entry}/stat') as f:
        if int(f.read().rsplit(')', 1)[1].split()[1]) == os.getpid():
          pids.append(int(entry))
    except (OSError, ValueError, IndexError):
      pass
  return pids


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
  faulthandler.dump_traceback_later(TEST_TIME_LIMIT, exit=True, file=_CONFIG['stderr'])
  try:
    return (yield)
  finally:
    faulthandler.cancel_dump_traceback_later()


@pytest.hookimpl(optionalhook=True)
def pytest_handlecrashitem(crashitem, report, sched):
  """A test whose xdist worker died in native code runs once more, alone, in a fresh process.

  A crash in native code (jaxlib's executable serializer did it in CI) or a hang past
  TEST_TIME_LIMIT says nothing certain about the test, so the test is judged by the fresh run,
  under the same limit, and the crash is printed; a test that fails there, crashes again or
  hangs again still fails."""
  del sched   # `--dist loadfile` cannot reschedule a single test
  _PROGRESS['last'] = time.monotonic()
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  limit = TEST_TIME_LIMIT
  cmd = [sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', crashitem]
  try:
    run = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=limit + 60)
    verdict = 'passed' if run.returncode == 0 else f'failed (exit {run.returncode})'
  except subprocess.TimeoutExpired as e:
    run = subprocess.CompletedProcess(cmd, -1, (e.stdout or b'').decode(errors='replace'), '')
    verdict = f'failed (still running after {limit + 60} s)'
  terminal = _CONFIG['config'].pluginmanager.get_plugin('terminalreporter')
  terminal.write_line(f'{report.longrepr}; run again alone in a fresh process: {verdict}',
                      yellow=True)
  if run.returncode == 0:
    report.outcome, report.when, report.longrepr = 'passed', 'call', None
  else:
    report.longrepr = f'{report.longrepr}\n--- run again alone ---\n{run.stdout[-20000:]}'
  return True


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
  """A data_dir with the embedded corpus prepared once for the whole session."""
  root = tmp_path_factory.mktemp('tfds')
  config = data.default_config()
  config.data_dir = str(root)
  data.prepare(config)
  return root


# Shared tiny-model helpers for every test module (`from tests.conftest import init_params`).

@pytest.fixture(scope='module')
def source(tmp_path_factory, data_dir):
  """A tiny trained run (4 steps, one checkpoint) for the compression runners to read."""
  from experiments import train
  from tests.runs import tiny_config
  workdir = tmp_path_factory.mktemp('source')
  train.train_and_evaluate(tiny_config(data_dir, num_train_steps=4, checkpoint_every=4,
                                       eval_every=4), workdir)
  return workdir


def init_params(cfg, seed: int = 0):
  """Unboxed parameters of `Transformer(cfg)` (unrolled or scanned, as `cfg` says)."""
  import flax.linen as nn
  import jax.numpy as jnp
  from models import Transformer
  boxed = Transformer(cfg).init(jax.random.key(seed), jnp.zeros((1, 8), jnp.int32))
  return nn.meta.unbox(boxed)['params']


def lm_batches(vocab: int, n: int = 1, rows: int = 8, length: int = 16, seed: int = 0,
               padded_rows: int = 0):
  """`n` language-model batches of random tokens (NumPy): inputs, targets, positions,
  segment_ids, weights; the last `padded_rows` rows end in padding (segment 0, weight 0)."""
  import numpy as np
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    tokens = rng.integers(1, vocab, (rows, length + 1)).astype(np.int32)
    seg = np.ones((rows, length), np.int32)
    if padded_rows:
      seg[rows - padded_rows:, length // 2:] = 0
    out.append(dict(inputs=tokens[:, :-1], targets=tokens[:, 1:], segment_ids=seg,
                    positions=np.tile(np.arange(length, dtype=np.int32), (rows, 1)),
                    weights=(seg > 0).astype(np.float32)))
  return out
