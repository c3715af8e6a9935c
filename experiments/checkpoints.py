"""Orbax checkpoints of the train state and the data iterator, with fallback past damaged steps."""

import logging
import os

import jax
import orbax.checkpoint as ocp
from etils import epath

import sharding


def manager(workdir, keep: int, async_save: bool = True,
            read_only: bool = False) -> ocp.CheckpointManager:
  """The workdir's checkpoint manager; `read_only` for sources that must never change."""
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only,
                                         enable_async_checkpointing=async_save,
                                         read_only=read_only)
  directory = str(epath.Path(workdir) / 'checkpoints')
  if '://' not in directory:   # Orbax wants absolute paths; cloud URIs (gs://...) already are
    directory = os.path.abspath(directory)
  return ocp.CheckpointManager(epath.Path(directory), options=options,
                               item_names=('state', 'data'))


def data_state(iterator_json: str) -> dict:
  """Every process's data-iterator position (JSON) in process order, for `save`.

  Collective: all processes call it. Orbax writes JSON items from process 0 only, so the positions
  of the other hosts travel to it here.
  """
  texts = sharding.allgather_bytes(iterator_json.encode())
  return dict(iterators=[t.decode() for t in texts])


def iterator_json(saved: dict):
  """This process's iterator position from a restored data state, or None if there is none."""
  texts = saved.get('iterators', [])
  if len(texts) == jax.process_count():
    return texts[jax.process_index()]
  logging.warning('the checkpoint holds data positions for %d processes but this run has %d: '
                  'the data order restarts from the seed', len(texts), jax.process_count())
  return None


def save(mngr: ocp.CheckpointManager, step: int, state, data_state) -> None:
  """Starts an (async) save of the train state and the data state from `data_state(...)`.

  Collective: every process calls it with its own shards; Orbax writes them all.
  """
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          data=ocp.args.JsonSave(data_state)), force=True)


def restore_latest(mngr: ocp.CheckpointManager, abstract_state):
  """Restores the newest readable checkpoint as (step, state, data_state), or None if none.

  A checkpoint that fails to restore (damaged or incomplete files) is reported in one line and
  the next older one is tried, so a crash during a save never loses the run.
  """
  for step in sorted(mngr.all_steps(), reverse=True):
    try:
      restored = mngr.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
      return step, restored['state'], restored['data']
    except Exception as e:  # noqa: BLE001 - any unreadable checkpoint means "try the previous one"
      first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      logging.warning('checkpoint at step %d is unreadable (%s: %s); trying an older one',
                      step, type(e).__name__, first_line[:200])
  return None


def abstract(tree):
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)

