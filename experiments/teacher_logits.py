"""Offline teacher logits: the teacher's top-k next tokens over a run's training batches, computed
once and stored in array_record files, so a student distils without the teacher in memory.

`write(...)` runs the training iterator a student will see (same data, batch rows, seed) for
`num_steps` batches and stores, per batch, its inputs and the teacher's top-k (ids int32,
log-probabilities float32 under the full softmax at T = 1: `compression.distill.top_k`) as one
record; records are grouped in chunk files `topk_<first step>.array_record`, each written to a
temporary name and renamed when whole, so a killed pass resumes at its first missing chunk and
ends with the same files. `meta.json` records what the pass was made from; a pass of other
settings in the same folder is refused, never overwritten.

`Reader(folder)` is the training loop's `batch_extras`: for the step about to train it returns
the batch fields `teacher_ids` and `teacher_logprobs` (`compression.distill.OFFLINE`), after
checking that the stored inputs are the batch's own.
"""

import io
import logging
import os
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from array_record.python import array_record_module
from etils import epath

from compression import distill
from experiments import data
from experiments import workdir as workdir_lib
from experiments.errors import UserError

META = 'meta.json'
CHUNK = 50   # batches per file: a killed pass loses at most this many


def settings(config, k: int, num_steps: int, teacher: dict, chunk: int = CHUNK) -> dict:
  """What a pass over `config`'s training batches is made from (compared on resume)."""
  return dict(k=k, num_steps=num_steps, rows=config.batch_size // jax.process_count(),
              seq_len=config.data.seq_len, seed=config.seed, data=config.data.to_dict(),
              teacher=teacher, chunk=chunk)


def _own(folder) -> epath.Path:
  """This process's files: each host stores the teacher logits of its own rows."""
  folder = epath.Path(folder)
  return folder if jax.process_count() == 1 else folder / f'process_{jax.process_index()}'


def _chunk_path(folder, first: int):
  return epath.Path(folder) / f'topk_{first:06d}.array_record'


def write(config, model, params, tokenizer, folder, *, k: int, num_steps: int,
          teacher: Optional[dict] = None, chunk: int = CHUNK, after_chunk=None) -> epath.Path:
  """Stores the top-`k` of `model` (`params`) on the first `num_steps` training batches of
  `config` (a training config: data, batch_size, seed) in `folder`; resumes a partial pass.
  `teacher` describes the teacher (e.g. its workdir and step) for the record; `after_chunk(i)`
  is called after each chunk is written (tests interrupt there). Returns the folder."""
  if not 0 < k <= model.config.vocab_size:
    raise UserError(f'offline teacher logits: k={k} must be in [1, {model.config.vocab_size}] '
                    f'(the teacher\'s vocabulary)')
  out, folder = epath.Path(folder), _own(folder)
  folder.mkdir(parents=True, exist_ok=True)
  want = settings(config, k, num_steps, teacher or {}, chunk)
  meta = folder / META
  if meta.exists():
    have = workdir_lib.read_json(meta, 'the offline teacher logits\' settings')
    if have != want:
      changed = sorted(key for key in set(have) | set(want) if have.get(key) != want.get(key))
      raise UserError(f'{folder} holds teacher logits of other settings ({", ".join(changed)}); '
                      f'delete it or choose another folder')
  else:
    workdir_lib.write_json(meta, want)
  starts = list(range(0, num_steps, chunk))
  todo = [s for s in starts if not _chunk_path(folder, s).exists()]
  if not todo:
    return out
  logging.info('offline teacher logits: %d of %d chunks to write in %s', len(todo), len(starts),
               folder)
  rows = want['rows']
  batches = data.train_iterator(config.data, tokenizer, batch_size=rows, seed=config.seed,
                                process_index=jax.process_index(),
                                process_count=jax.process_count())
  scores = jax.jit(lambda p, b: distill.top_k(model.apply(
      {'params': p}, b['inputs'], positions=b['positions'], segment_ids=b['segment_ids']), k))
  for first in starts:
    last = min(first + chunk, num_steps)
    if first not in todo:   # skip the data of a finished chunk
      for _ in range(last - first):
        next(batches)
      continue
    path = _chunk_path(folder, first)
    tmp = path.parent / f'.{path.name}.tmp'
    writer = array_record_module.ArrayRecordWriter(os.fspath(tmp), 'group_size:1')
    for step in range(first, last):
      batch = next(batches)
      top = jax.device_get(scores(params, batch))
      writer.write(_pack(batch['inputs'], top.ids, top.logprobs))
    writer.close()
    tmp.replace(path)
    if after_chunk is not None:
      after_chunk(first)
  return out


def _pack(inputs, ids, logprobs) -> bytes:
  buf = io.BytesIO()
  np.savez(buf, inputs=np.asarray(inputs, np.int32), ids=np.asarray(ids, np.int32),
           logprobs=np.asarray(logprobs, np.float32))
  return buf.getvalue()


def _unpack(record: bytes) -> dict:
  with np.load(io.BytesIO(record)) as f:
    return {name: f[name] for name in f.files}


class Reader:
  """The stored top-k of each training step, as `train.train_and_evaluate`'s batch_extras."""

  def __init__(self, folder):
    self.folder = _own(folder)
    meta = self.folder / META
    if not meta.exists():
      raise UserError(f'{self.folder} holds no offline teacher logits ({META} is missing)')
    self.meta = workdir_lib.read_json(meta, 'the offline teacher logits\' settings')
    self.k, self.num_steps, self.chunk = (self.meta['k'], self.meta['num_steps'],
                                          self.meta['chunk'])
    missing = [s for s in range(0, self.num_steps, self.chunk)
               if not _chunk_path(self.folder, s).exists()]
    if missing:
      raise UserError(f'{self.folder}: the offline teacher logits are incomplete (chunk from '
                      f'step {missing[0]} is missing); run the pass again to finish it')
    self._open = {}

  def fields(self) -> dict:
    """Per-row shapes and dtypes of the fields added to each batch (after [rows, seq_len])."""
    return {distill.OFFLINE[0]: ((self.k,), jnp.int32),
            distill.OFFLINE[1]: ((self.k,), jnp.float32)}

  def __call__(self, step: int, batch) -> dict:
    """The fields of training step `step` (0-based), checked against `batch`'s inputs."""
    if not 0 <= step < self.num_steps:
      raise UserError(f'{self.folder} holds teacher logits for steps 0-{self.num_steps - 1}, '
                      f'not step {step}: run the offline pass with more steps')
    first = step - step % self.chunk
    if first not in self._open:
      self._open = {first: array_record_module.ArrayRecordReader(
          os.fspath(_chunk_path(self.folder, first)))}
    record = _unpack(self._open[first].read([step - first])[0])
    if not np.array_equal(record['inputs'], np.asarray(batch['inputs'])):
      raise UserError(f'{self.folder}: the teacher logits of step {step} were computed on other '
                      f'batches (the data, batch size or seed differ from this run\'s)')
    return {distill.OFFLINE[0]: record['ids'], distill.OFFLINE[1]: record['logprobs']}
