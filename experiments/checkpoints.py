"""Orbax checkpoints of the train state and the data iterator, kept safe against every fault.

- A checkpoint whose state tree or run signature differs from the run's is never touched: the
  restore stops with one line naming the difference (`CheckpointMismatch`).
- A checkpoint that fails to restore is moved to `checkpoints/damaged/<step>` (writers only)
  and the next older one is tried, so damage never blocks a run and nothing is deleted.
- Rotation happens before each save and after the last one, and removes only checkpoints older
  than the newest `keep` committed ones: a save in flight (or one that fails) never costs a
  good checkpoint.
- Readers (eval, sample, pruning sources) re-list the steps when a checkpoint disappears under
  them, so they can read a workdir a training run is rotating.
"""

import dataclasses
import logging
import os
import re
import sys
import traceback
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

import sharding
from experiments import workdir as workdir_lib
from experiments.errors import UserError

_READ_RETRIES = 5


class CheckpointMismatch(UserError):
  """A checkpoint of another model, tokenizer, data order or optimizer-state layout."""


@dataclasses.dataclass
class Restored:
  step: int
  state: Any
  data: dict   # {'iterators': [json per process], 'signature': {...}} (signature: newer runs)


def _tree_layout(tree) -> dict:
  """{'opt_state/1/0/mu/...': (shape, dtype)} for arrays, abstract arrays or Orbax metadata."""
  def key(entry):
    for attr in ('key', 'idx', 'name'):
      if hasattr(entry, attr):
        return str(getattr(entry, attr))
    return str(entry)
  def layout(leaf):   # Python scalars (e.g. an unjitted TrainState's step) match any scalar
    return (tuple(leaf.shape), np.dtype(leaf.dtype).name) if hasattr(leaf, 'shape') else None
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {'/'.join(key(k) for k in path): layout(leaf) for path, leaf in flat}


def layout_differences(saved, expected) -> list:
  """Human-readable differences between a checkpoint's tree and the tree a run expects."""
  a, b = _tree_layout(saved), _tree_layout(expected)
  out = []
  for paths, what in ((sorted(set(a) - set(b)), 'only in the checkpoint'),
                      (sorted(set(b) - set(a)), 'missing from the checkpoint')):
    if paths:
      out.append(f'{len(paths)} arrays {what} (e.g. {paths[0]})' if len(paths) > 1 else
                 f'{paths[0]} {what}')
  out += [f'{p}: {a[p][0]} {a[p][1]} there, {b[p][0]} {b[p][1]} here'
          for p in sorted(set(a) & set(b)) if None not in (a[p], b[p]) and a[p] != b[p]]
  return out


def _quiet_orbax_echoes() -> None:
  """Hides the echoes of a failed checkpoint read or write (installed once, process-wide).

  When one array of a checkpoint cannot be read or written, Orbax's other reads or writes of
  it finish later on a closed event loop, and each reports the same failure again as an
  'exception ignored' traceback or an 'exception was never retrieved' log line (dozens of
  screens). The failure itself always reaches the caller as an exception and is reported there
  in one line; these echoes are dropped.
  """
  if getattr(sys.unraisablehook, 'frugal_quiet', False):
    return
  previous = sys.unraisablehook

  def hook(unraisable):
    frames = traceback.extract_tb(unraisable.exc_traceback) if unraisable.exc_traceback else []
    text = f'{unraisable.exc_value!r} {unraisable.object!r}'
    if ('Event loop is closed' in text or any('/orbax/' in f.filename for f in frames)):
      return
    previous(unraisable)
  hook.frugal_quiet = True
  sys.unraisablehook = hook
  logging.getLogger('asyncio').addFilter(
      lambda record: 'exception was never retrieved' not in record.getMessage())


def _first_line(e: BaseException) -> str:
  """A short description of a storage error; TensorStore's OS errors by their name."""
  text = str(e).strip()
  code = re.search(r"os_error_code='(\d+)'", text)
  if code:
    return f'{os.strerror(int(code.group(1)))} [errno {code.group(1)}]'
  return f'{type(e).__name__}: {text.splitlines()[0][:200] if text else ""}'


class CheckpointWriteError(UserError):
  """A checkpoint could not be written (disk full, permissions): earlier ones are intact."""


def _retry_listing(list_steps, retry: bool):
  """Orbax lists steps by reading each one's metadata; for a reader beside a training run, a
  step rotated away between the directory listing and that read is not an error: list again."""
  for attempt in range(_READ_RETRIES if retry else 1):
    try:
      return list_steps()
    except FileNotFoundError:
      if attempt == (_READ_RETRIES if retry else 1) - 1:
        raise
  raise AssertionError('unreachable')


class Checkpoints:
  """The checkpoints of one workdir; `writer=False` opens them read-only."""

  def __init__(self, workdir, keep: int = 2, *, writer: bool = True, async_save: bool = True):
    directory = str(epath.Path(workdir) / 'checkpoints')
    if workdir_lib.is_local(directory):   # Orbax wants absolute paths
      directory = os.path.abspath(directory)
    self.directory = epath.Path(directory)
    self.keep, self.writer = keep, writer
    self._in_flight = None
    _quiet_orbax_echoes()
    absl_logger = logging.getLogger('absl')
    level = absl_logger.level
    if not writer:   # Orbax warns that a read-only manager will not save: that is the point
      absl_logger.setLevel(logging.ERROR)
    try:
      options = ocp.CheckpointManagerOptions(
          max_to_keep=None, create=writer, read_only=not writer, cleanup_tmp_directories=writer,
          enable_async_checkpointing=async_save and writer)
      self.mngr = _retry_listing(lambda: ocp.CheckpointManager(
          self.directory, options=options,
          item_handlers=dict(state=ocp.StandardCheckpointHandler(),
                             data=ocp.JsonCheckpointHandler())), retry=not writer)
    finally:
      absl_logger.setLevel(level)

  def steps(self) -> list:
    """Committed steps, read from disk now."""
    _retry_listing(self.mngr.reload, retry=not self.writer)
    return sorted(self.mngr.all_steps())

  def save(self, step: int, state, data: dict) -> None:
    """Starts an async save of the state and `data` (JSON). Collective: every process calls it.

    The previous save is finished first (an error in it is raised here), then rotation keeps
    the newest `keep` committed checkpoints; this one is counted once it has committed.
    """
    self._finish()
    existing = self._rotate()
    if step in existing:   # only a checkpoint the run did not resume from can be in the way
      self._set_aside(step, 'a checkpoint of this step from an earlier attempt is in the way')
      self.mngr.reload()
    self._in_flight = step
    try:
      self.mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                   data=ocp.args.JsonSave(data)), force=True)
    except Exception as e:  # noqa: BLE001 - the synchronous part of the write failed
      raise self._write_error(e) from e

  def wait(self, raise_errors: bool = True) -> None:
    """Waits for the save in flight, then rotates. A failed write raises
    `CheckpointWriteError`, or with `raise_errors=False` (an exception is already on its way)
    is logged."""
    try:
      self._finish()
      if self.writer:
        self._rotate()
    except CheckpointWriteError as e:
      if raise_errors:
        raise
      logging.error('%s', e)

  def _finish(self) -> None:
    try:
      self.mngr.wait_until_finished()
    except Exception as e:  # noqa: BLE001 - whatever the storage said
      raise self._write_error(e) from e
    finally:
      self._in_flight = None

  def _write_error(self, e: BaseException) -> CheckpointWriteError:
    committed = self.steps()
    kept = f'steps {", ".join(map(str, committed))}' if committed else 'none yet'
    return CheckpointWriteError(
        f'writing the checkpoint at step {self._in_flight} failed ({_first_line(e)}); the '
        f'checkpoints already written are intact ({kept}): free disk space (or fix the '
        f'storage) and run again to resume')

  def close(self) -> None:
    self.mngr.close()

  def _rotate(self) -> list:
    # Every process must list the same steps: deleting is collective in Orbax, and a process
    # that lists before process 0's latest commit is visible would skip it and hang the others.
    sharding.sync('checkpoint rotation')
    steps = self.steps()
    for step in steps[:-self.keep]:
      self.mngr.delete(step)
    return steps[-self.keep:]

  def _set_aside(self, step: int, reason: str) -> None:
    """Moves a step folder to checkpoints/damaged/ (process 0; every process waits for it)."""
    if jax.process_index() == 0:
      target = self.directory / 'damaged' / str(step)
      n = 1
      while target.exists():
        n += 1
        target = self.directory / 'damaged' / f'{step}.{n}'
      target.parent.mkdir(parents=True, exist_ok=True)
      (self.directory / str(step)).rename(target)
      logging.warning('checkpoint at step %d moved to %s: %s', step, target, reason)
    sharding.sync(f'checkpoint {step} set aside')

  def read_data(self, step: int) -> dict:
    """The JSON item (data positions, signature) of one checkpoint."""
    return self.mngr.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))['data']

  def restore_latest(self, abstract_state, signature: Optional[dict] = None,
                     params_only: bool = False):
    """The newest restorable checkpoint as `Restored`, or None if there is none.

    Raises `CheckpointMismatch` (touching nothing) when the newest readable checkpoint belongs
    to another configuration. Unreadable ones are set aside by writers and skipped by readers.
    With `params_only`, `abstract_state` is the parameter tree alone and only it is read (and
    compared, with the model and tokenizer of the signature): evaluation and sampling work
    whatever optimizer the run trained with.
    """
    if params_only and signature is not None:
      signature = {k: v for k, v in signature.items() if k in ('model', 'tokenizer')}
    for _ in range(_READ_RETRIES):
      restored, vanished = self._restore_newest(abstract_state, signature, params_only)
      if not vanished:
        return restored
    raise UserError(f'checkpoints in {self.directory} were rotated away faster than they could '
                    f'be read; raise keep_checkpoints in the training run')

  def _restore_newest(self, abstract_state, signature, params_only):
    for step in reversed(self.steps()):
      try:
        data = self.read_data(step)
        saved_tree = self.mngr.item_metadata(step)['state']
        saved_tree = saved_tree.tree if hasattr(saved_tree, 'tree') else saved_tree
        if params_only:
          saved_tree = saved_tree['params']
      except Exception as e:  # noqa: BLE001 - whatever the cause, this step cannot be read
        if self._unreadable(step, e):
          return None, True
        continue
      self._check_matches(step, data, saved_tree, abstract_state, signature)
      try:
        if params_only:
          state = restore_params(self.directory / str(step), abstract_state)
        else:
          state = self.mngr.restore(step, args=ocp.args.Composite(
              state=ocp.args.StandardRestore(abstract_state)))['state']
      except Exception as e:  # noqa: BLE001
        if self._unreadable(step, e):
          return None, True
        continue
      return Restored(step, state, data), False
    return None, False

  def _unreadable(self, step: int, e: BaseException) -> bool:
    """Handles a failed read; True when the step vanished (rotated by a writer) instead."""
    if not (self.directory / str(step)).exists():
      return True
    if self.writer:
      self._set_aside(step, f'it could not be restored ({_first_line(e)})')
    else:
      logging.warning('checkpoint at step %d is unreadable (%s); trying an older one', step,
                      _first_line(e))
    return False

  def _check_matches(self, step, data, saved_tree, abstract_state, signature) -> None:
    problems = []
    saved_signature = data.get('signature') if isinstance(data, dict) else None
    if signature is not None and isinstance(saved_signature, dict):
      saved_signature = {k: v for k, v in saved_signature.items() if k in signature}
      problems += workdir_lib.signature_mismatch(saved_signature, signature)
    if not problems:
      problems += layout_differences(saved_tree, abstract_state)
    if problems:
      more = f' (and {len(problems) - 3} more)' if len(problems) > 3 else ''
      raise CheckpointMismatch(
          f'the checkpoint at step {step} in {self.directory} belongs to another configuration: '
          f'{"; ".join(problems[:3])}{more}')


def data_state(iterator_json: str, signature: dict) -> dict:
  """Every process's data-iterator position (JSON) in process order, plus the run signature.

  Collective: all processes call it. Orbax writes JSON items from process 0 only, so the positions
  of the other hosts travel to it here.
  """
  texts = sharding.allgather_bytes(iterator_json.encode())
  return dict(iterators=[t.decode() for t in texts], signature=signature)


def iterator_json(saved: dict):
  """This process's iterator position from a restored data state, or None if there is none."""
  texts = saved.get('iterators', [])
  if len(texts) == jax.process_count():
    return texts[jax.process_index()]
  logging.warning('the checkpoint holds data positions for %d processes but this run has %d: '
                  'the data order restarts from the seed', len(texts), jax.process_count())
  return None


def restore_params(step_dir, abstract_params):
  """Only the parameters of the train state saved in `step_dir` (a checkpoints/<step> folder)."""
  path = epath.Path(step_dir) / 'state'
  restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_params)
  with ocp.PyTreeCheckpointer() as ckptr:
    out = ckptr.restore(path, args=ocp.args.PyTreeRestore(
        item={'params': abstract_params}, restore_args={'params': restore_args},
        partial_restore=True))
  return out['params']


def abstract(tree):
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
