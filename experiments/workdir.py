"""A run directory's bookkeeping: the lock, atomic JSON files, the run signature, archiving.

What a training workdir holds (besides what this module writes, see `train.py`):

  .lock            who is writing here (pid, host, command); held while that run lives
  signature.json   what the checkpoints depend on: model, tokenizer, data order, state layout
  config.json      the config of the latest start (earlier differing ones: config.step<N>.json)
  tokenizer.model  the run's own SentencePiece model, so resuming never depends on a cache
  checkpoints/     Orbax steps; checkpoints/damaged/<step> holds any that failed to restore
  archive/<n>/     an earlier run set aside by `--resume=new` or `--resume=params`

Nothing here deletes a file of a run: mismatches are refused, damage and old runs are moved.
"""

import contextlib
import datetime
import fcntl
import json
import logging
import os
import socket
import sys
import threading
import time

import jax
from etils import epath

import sharding
from experiments.errors import UserError

SIGNATURE = 'signature.json'
LEGACY_SIGNATURE = 'model.json'   # what runs before signature.json recorded (the model alone)
TOKENIZER = 'tokenizer.model'
RUN_FILES = ('checkpoints', 'metrics.jsonl', 'tensorboard', 'config.json', SIGNATURE,
             LEGACY_SIGNATURE, TOKENIZER)
HEARTBEAT_S, STALE_S = 60, 300   # lock refresh and expiry where flock is unavailable (gs://)


def is_local(path) -> bool:
  return '://' not in str(path)


def write_text(path, text: str) -> None:
  """Writes text to a temporary name, flushed to disk, then renames it into place."""
  path = epath.Path(path)
  tmp = path.parent / f'.{path.name}.tmp{os.getpid()}'
  if is_local(path):
    with open(tmp, 'w') as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
  else:
    tmp.write_text(text)
  tmp.replace(path)


def write_json(path, obj) -> None:
  """Writes JSON atomically (see `write_text`)."""
  write_text(path, json.dumps(obj, indent=2))


def read_json(path, what: str):
  """The JSON in `path`; a damaged file is reported in one line naming it."""
  path = epath.Path(path)
  try:
    return json.loads(path.read_text())
  except (ValueError, UnicodeDecodeError) as e:
    raise UserError(f'{path} ({what}) is not valid JSON ({e}); restore it from a copy or '
                    f'start the run again with --resume=new (the run is archived, not deleted)'
                    ) from None


def signature(config, tokenizer_sha256=None) -> dict:
  """What a run's checkpoints depend on; a resume must match it exactly.

  Changing anything else (steps, learning rate, evaluation or sampling settings, the mesh) is
  allowed on resume. A run derived from another model records where its starting parameters
  came from in `config.origin`, which is part of its signature.
  """
  d = config.data
  spm = d.tokenizer == 'sentencepiece'
  out = dict(
      model={k: v for k, v in config.model.to_dict().items() if k not in _DECODING_ONLY},
      tokenizer=dict(kind=d.tokenizer, vocab_size=d.vocab_size if spm else None,
                     spm_model_type=d.get('spm_model_type', 'unigram') if spm else None,
                     sha256=tokenizer_sha256),
      data=dict(name=d.name, train_split=d.train_split, text_key=d.text_key, seq_len=d.seq_len,
                shuffle_window=d.shuffle_window, batch_size=config.batch_size, seed=config.seed),
      state=dict(optimizer='adamw', gradual_pruning=bool(config.pruning.final_sparsity > 0)))
  mix = d.get('mix')
  if mix is not None and mix.get('name'):   # rows from a second dataset (data.mix)
    out['data']['mix'] = dict(name=mix.name, split=mix.split, text_key=mix.text_key,
                              weight=mix.weight)
  if config.get('origin'):   # a run started from another model's parameters (finetune.py)
    out['origin'] = config.origin.to_dict()
  if config.get('qat') and config.qat.bits:   # what the weights were trained to be rounded to
    out['qat'] = config.qat.to_dict()
  if config.get('low_precision') and config.low_precision.format:   # how its dots were rounded
    out['low_precision'] = config.low_precision.to_dict()
  if config.get('early_exit') and config.early_exit.layers:   # what its exits were trained for
    out['early_exit'] = config.early_exit.to_dict()
  return out


# Model fields that change how a trained model decodes, not what its checkpoints hold.
_DECODING_ONLY = ('kv_cache_dtype',)


def differences(old: dict, new: dict, prefix: str = '') -> list:
  """['model.d_model: 32 there, 64 here', ...] for the fields whose values differ."""
  out = []
  for k in sorted(set(old) | set(new)):
    a, b = old.get(k), new.get(k)
    if isinstance(a, dict) and isinstance(b, dict):
      out += differences(a, b, f'{prefix}{k}.')
    elif a != b:
      out.append(f'{prefix}{k}: {a!r} there, {b!r} here')
  return out


def saved_signature(workdir):
  """The signature recorded in `workdir` (None if none); legacy runs recorded the model alone."""
  workdir = epath.Path(workdir)
  if (workdir / SIGNATURE).exists():
    return read_json(workdir / SIGNATURE, 'the run signature')
  if (workdir / LEGACY_SIGNATURE).exists():
    legacy = read_json(workdir / LEGACY_SIGNATURE, 'the run signature')
    if not isinstance(legacy, dict) or 'model' not in legacy:
      raise UserError(f'{workdir / LEGACY_SIGNATURE} does not hold a run signature')
    return dict(model=legacy['model'])
  return None


def signature_mismatch(saved: dict, current: dict, ignore_sha: bool = False) -> list:
  """Differences between a saved and the current signature, over the parts the saved one has."""
  if not isinstance(saved, dict):
    return [f'unreadable signature {saved!r}']
  current = json.loads(json.dumps(current))
  if ignore_sha or (saved.get('tokenizer') or {}).get('sha256') is None:
    for s in (saved, current):
      if isinstance(s.get('tokenizer'), dict):
        s['tokenizer'] = dict(s['tokenizer'], sha256=None)
  return differences(saved, {k: v for k, v in current.items() if k in saved})


def checkpoint_steps(workdir) -> list:
  """Committed checkpoint steps on disk (Orbax renames a step folder into place when done)."""
  folder = epath.Path(workdir) / 'checkpoints'
  if not folder.exists():
    return []
  return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())


def damaged_steps(workdir) -> list:
  folder = epath.Path(workdir) / 'checkpoints' / 'damaged'
  return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def all_damaged(workdir) -> UserError:
  """The refusal to start over quietly where every checkpoint was damaged and set aside."""
  return UserError(f'every checkpoint of the run in {workdir} is damaged (set aside in '
                   f'checkpoints/damaged/: {", ".join(damaged_steps(workdir))}); pass '
                   f'--resume=new to archive the run and start over')


def archive(workdir) -> epath.Path:
  """Moves the run's files into archive/<n>/ (n = 1, 2, ...) and returns that folder."""
  workdir = epath.Path(workdir)
  root = workdir / 'archive'
  numbers = [int(p.name) for p in root.iterdir() if p.name.isdigit()] if root.exists() else []
  dest = root / str(max(numbers, default=0) + 1)
  dest.mkdir(parents=True)
  names = list(RUN_FILES) + [p.name for p in workdir.glob('config.step*.json')]
  for name in names:
    if (workdir / name).exists():
      (workdir / name).rename(dest / name)
  logging.warning('the previous run in %s was moved to %s', workdir, dest)
  return dest


def record_config(workdir, config, step: int) -> None:
  """Writes config.json; a differing earlier one is kept as config.step<step>.json."""
  workdir = epath.Path(workdir)
  current = json.loads(config.to_json_best_effort())
  path = workdir / 'config.json'
  if path.exists():
    try:
      previous = json.loads(path.read_text())
    except ValueError:
      previous = None
    if step and previous != current:   # a resume with other settings: keep the old ones
      changed = differences(previous, current) if isinstance(previous, dict) else ['unreadable']
      logging.warning('resuming at step %d with changed settings: %s', step,
                      '; '.join(changed[:8]))
      path.rename(workdir / f'config.step{step}.json')
  write_json(path, current)


class Lock:
  """An exclusive claim on a workdir by one writing run, released when that process ends.

  Local folders use flock, which the kernel drops when the holder dies, so a lock left by a
  killed run is never in the way. Where flock is unavailable (object stores), the holder
  refreshes a timestamp every minute and a lock not refreshed for five minutes is stale.
  """

  def __init__(self, workdir):
    self.path = epath.Path(workdir) / '.lock'
    self._fd = None
    self._stop = threading.Event()
    self._thread = None

  def _owner(self) -> dict:
    return dict(pid=os.getpid(), host=socket.gethostname(), command=' '.join(sys.argv),
                since=datetime.datetime.now().isoformat(timespec='seconds'), heartbeat=time.time())

  def _busy(self, owner) -> UserError:
    who = (f'pid {owner.get("pid")} on {owner.get("host")} since {owner.get("since")}'
           if isinstance(owner, dict) else 'another process')
    return UserError(f'--workdir={self.path.parent} is in use by another run ({who}); wait for '
                     f'it to finish or stop it, or use another workdir')

  def acquire(self) -> 'Lock':
    self.path.parent.mkdir(parents=True, exist_ok=True)
    previous = self._read()
    if is_local(self.path):
      self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except OSError:
        os.close(self._fd)
        self._fd = None
        raise self._busy(self._read()) from None
      os.ftruncate(self._fd, 0)
      os.pwrite(self._fd, json.dumps(self._owner()).encode(), 0)
    else:
      if isinstance(previous, dict) and not self._stale(previous):
        raise self._busy(previous)
      write_json(self.path, self._owner())
      self._thread = threading.Thread(target=self._heartbeat, daemon=True)
      self._thread.start()
    if isinstance(previous, dict) and previous.get('pid') and previous != self._read():
      logging.info('took over the lock of a run that ended (pid %s on %s)', previous['pid'],
                   previous.get('host'))
    return self

  def _read(self):
    try:
      return json.loads(self.path.read_text() or 'null')
    except (OSError, ValueError):
      return None

  def _stale(self, owner: dict) -> bool:
    if owner.get('host') == socket.gethostname() and owner.get('pid'):
      try:
        os.kill(int(owner['pid']), 0)
      except ProcessLookupError:
        return True
      except OSError:
        pass
    return time.time() - float(owner.get('heartbeat', 0)) > STALE_S

  def _heartbeat(self):
    while not self._stop.wait(HEARTBEAT_S):
      with contextlib.suppress(OSError):
        write_json(self.path, dict(self._read() or self._owner(), heartbeat=time.time()))

  def release(self) -> None:
    if self._fd is not None:
      os.ftruncate(self._fd, 0)
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None
    if self._thread is not None:
      self._stop.set()
      self._thread.join()
      self._thread = None
      with contextlib.suppress(OSError):
        self.path.unlink()


@contextlib.contextmanager
def claim(workdir):
  """Holds the workdir's lock for a writing run (taken by process 0, refused on all processes)."""
  lock = Lock(workdir)
  error = ''
  if jax.process_index() == 0:
    try:
      lock.acquire()
    except UserError as e:
      error = str(e)
  if jax.process_count() > 1:
    error = sharding.allgather_bytes(error.encode())[0].decode()
  if error:
    raise UserError(error)
  try:
    yield lock
  finally:
    lock.release()

