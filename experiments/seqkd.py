"""Sequence-level knowledge distillation data (Kim and Rush, 2016): a teacher's continuations of
training prompts, written as a TFDS dataset (array_record) that a student trains on by name.

  info = seqkd.generate_dataset(model, params, tokenizer, config.data, 'data/kd',
                                num_prompts=20_000, prompt_tokens=64, new_tokens=192,
                                teacher=dict(workdir='runs/teacher', step=2000))
  # the student: --config.data.mix.name=seqkd --config.data.mix.data_dir=data/kd
  #              --config.data.mix.weight=1.0 (teacher text only) or 0.5 (half the rows)

Prompts: prompt i is a window of `prompt_tokens` tokens of one training document. Documents come
in an order shuffled by `seed`, reshuffled on every pass over the split, so any number of
prompts can come from a small corpus; the window starts at an offset drawn from (seed, i) among
those where it fits in [bos, document tokens...] (offset 0: the document's opening, with bos);
a shorter document is a whole prompt. Windows anywhere rather than openings only, so that the
student sees the teacher continue every kind of text, not just titles and headings.

Generation: batches of `batch_size` prompts through `models.decode.generate`, greedy at
temperature 0, else sampled with the key `batch_rng(seed, k)` for batch k; a row ends at the
tokenizer's eos (kept) or after `new_tokens` tokens. Example i holds `tokens` (int32: prompt +
generated, no padding) and `text` = tokenizer.decode(tokens) (which ends at the first eos).
One process generates; out_dir is a local folder, and nothing outside it is written:

  <out_dir>/<name>.partial/      settings.json and chunk_<k>.npz (batch k), each written
                                 atomically; a rerun generates only the missing chunks
  <out_dir>/<name>/1.0.0/        the dataset (dataset_info.json, array_record shards, and
                                 seqkd.json: the settings and counts), renamed into place whole

A complete dataset with the same settings is reused; other settings are refused in one line.
"""

import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import shutil
from typing import Callable, Optional, Sequence

import grain
import jax
import numpy as np
import tensorflow_datasets as tfds

from experiments import workdir as workdir_lib
from experiments.data import sources
from experiments.errors import UserError
from models import decode

VERSION = '1.0.0'
NAME = sources.GENERATED_NAME       # the dataset's default name
RECORD = sources.GENERATED_RECORD   # in the dataset folder: {'settings': ..., 'counts': ...}
STAGE_SETTINGS = 'settings.json'


class _Generations(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """One 'train' split of the given (key, example) pairs, in order; read back by name."""
  VERSION = tfds.core.Version(VERSION)

  def __init__(self, *, name: str, examples, **kwargs):
    self.name = name   # a builder without a registered class is named per instance
    self._examples = examples
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, description=__doc__, disable_shuffling=True,
        features=tfds.features.FeaturesDict({
            'text': tfds.features.Text(),   # the decoded prompt + continuation
            'tokens': tfds.features.Tensor(shape=(None,), dtype=np.int32),  # their exact ids
        }))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._generate_examples()}

  def _generate_examples(self):
    yield from self._examples


def prompts(data_config, tokenizer, indices: Sequence[int], *, prompt_tokens: int,
            seed: int) -> list[list[int]]:
  """The prompts numbered `indices`: windows of training documents (see the module docstring)."""
  source = sources.data_source(data_config.name, data_config.train_split, data_config.data_dir)
  docs = grain.MapDataset.source(source).shuffle(seed=seed).repeat()
  out = []
  for i in indices:
    ids = [tokenizer.bos_id, *tokenizer.encode(sources.as_text(docs[i][data_config.text_key]))]
    start = int(np.random.default_rng([seed, i]).integers(max(len(ids) - prompt_tokens, 0) + 1))
    out.append(ids[start:start + prompt_tokens])
  return out


def batch_rng(seed: int, k: int) -> jax.Array:
  """The sampling key of batch k (so a resumed run samples the same tokens)."""
  return jax.random.fold_in(jax.random.key(seed), k)


def params_digest(params) -> str:
  """sha256 of every parameter's path and bytes: which teacher generated the data."""
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    h.update(jax.tree_util.keystr(path).encode())
    h.update(np.asarray(jax.device_get(leaf)).tobytes())
  return h.hexdigest()


def generate_dataset(model, params, tokenizer, data_config, out_dir, *,
                     name: str = NAME, num_prompts: int, prompt_tokens: int, new_tokens: int,
                     temperature: float = 0.0, top_k: Optional[int] = None,
                     top_p: Optional[float] = None, seed: int = 0, batch_size: int = 64,
                     teacher: Optional[dict] = None,
                     on_chunk: Optional[Callable[[int], None]] = None) -> dict:
  """Writes (or reuses) the teacher's continuations as the TFDS dataset `name` under `out_dir`.

  Args:
    model, params: the teacher, a `models.Transformer` and its parameters.
    tokenizer: the teacher's tokenizer (eos ends a continuation).
    data_config: the teacher run's data config; prompts come from its train split.
    out_dir: the data_dir the dataset is read from (`data.mix.data_dir`).
    name: the TFDS name (snake_case).
    num_prompts, prompt_tokens, new_tokens: examples, tokens per prompt, most tokens generated.
    temperature, top_k, top_p: sampling (temperature 0: greedy).
    seed: prompt choice and sampling keys.
    batch_size: prompts per `generate` call and per saved chunk (sampled tokens depend on it).
    teacher: what names the teacher (e.g. its workdir and step), recorded with the settings.
    on_chunk: called with k after chunk k is saved (progress; tests interrupt here).

  Returns:
    name, data_dir, path, reused (True: an existing dataset with these settings),
    num_examples, generated_tokens, stopped_at_eos (rows that ended with eos), settings.
  """
  if not re.fullmatch(r'[a-z][a-z0-9_]*', name):
    raise UserError(f'seqkd: name={name!r} must be snake_case (a TFDS dataset name)')
  for field, value in dict(num_prompts=num_prompts, prompt_tokens=prompt_tokens,
                           new_tokens=new_tokens, batch_size=batch_size).items():
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise UserError(f'seqkd: {field}={value!r} must be a positive integer')
  d = data_config
  proto = getattr(tokenizer, 'model_proto', None)
  settings = json.loads(json.dumps(dict(
      teacher=dict(teacher or {}, params_sha256=params_digest(params),
                   model=dataclasses.asdict(model.config)),
      data=dict(name=d.name, train_split=d.train_split, text_key=d.text_key),
      tokenizer=dict(kind=type(tokenizer).__name__, vocab_size=tokenizer.vocab_size,
                     sha256=hashlib.sha256(proto).hexdigest() if proto else None),
      prompts=dict(num_prompts=num_prompts, prompt_tokens=prompt_tokens, seed=seed),
      sampling=dict(new_tokens=new_tokens, temperature=float(temperature), top_k=top_k,
                    top_p=top_p, batch_size=batch_size)), default=str))
  root = os.path.abspath(os.path.expanduser(str(out_dir)))
  final = os.path.join(root, name, VERSION)
  stage = os.path.join(root, f'{name}.partial')
  if os.path.isdir(final):
    return _reuse(final, settings, root, name)
  lock = workdir_lib.Lock(stage).acquire()   # one writer; a killed one's lock is free
  try:
    if os.path.isdir(final):   # another process finished it between our look and the lock
      shutil.rmtree(stage)
      return _reuse(final, settings, root, name)
    _check_stage(stage, settings)
    n_chunks = math.ceil(num_prompts / batch_size)
    for k in range(n_chunks):
      path = _chunk_path(stage, k)
      if os.path.exists(path):
        continue
      batch = prompts(d, tokenizer, range(k * batch_size, min((k + 1) * batch_size, num_prompts)),
                      prompt_tokens=prompt_tokens, seed=seed)
      out = decode.generate(model, params, batch, max_new_tokens=new_tokens,
                            rng=batch_rng(seed, k), temperature=temperature, top_k=top_k,
                            top_p=top_p, stop_tokens=(tokenizer.eos_id,), pad_id=tokenizer.pad_id)
      generated, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
      _save_chunk(path, [np.asarray([*p, *g[:n]], np.int32)
                         for p, g, n in zip(batch, generated, lengths)], [len(p) for p in batch])
      logging.info('seqkd: chunk %d of %d written', k + 1, n_chunks)
      if on_chunk is not None:
        on_chunk(k)
    counts = _assemble(stage, name, n_chunks, tokenizer, settings, final)
    shutil.rmtree(stage)
  finally:
    lock.release()
  logging.info('seqkd: wrote %d examples to %s', counts['num_examples'], final)
  return dict(name=name, data_dir=root, path=final, reused=False, **counts, settings=settings)


def _refuse(where: str, saved: dict, settings: dict, what: str) -> None:
  problems = workdir_lib.differences(saved, settings)
  if problems:
    more = f' (and {len(problems) - 3} more)' if len(problems) > 3 else ''
    raise UserError(f'seqkd: {where} holds {what} with other settings '
                    f'({"; ".join(problems[:3])}{more}); use another name or out_dir, or delete '
                    f'it to generate again')


def _reuse(final: str, settings: dict, root: str, name: str) -> dict:
  try:
    with open(os.path.join(final, RECORD)) as f:
      record = json.load(f)
  except (OSError, ValueError):
    raise UserError(f'seqkd: {final} has no readable {RECORD}, so what generated it is '
                    f'unknown; delete it to generate again') from None
  _refuse(final, record['settings'], settings, 'a dataset')
  return dict(name=name, data_dir=root, path=final, reused=True, **record['counts'],
              settings=settings)


def _check_stage(stage: str, settings: dict) -> None:
  """Records the settings of a new staging folder; refuses chunks made with other settings."""
  path = os.path.join(stage, STAGE_SETTINGS)
  if os.path.exists(path) and any(f.startswith('chunk_') for f in os.listdir(stage)):
    with open(path) as f:
      _refuse(stage, json.load(f), settings, 'a partial generation')
  # Without chunks, nothing is lost by recording the new settings (e.g. after a failed start).
  workdir_lib.write_json(path, settings)


def _chunk_path(stage: str, k: int) -> str:
  return os.path.join(stage, f'chunk_{k:05d}.npz')


def _save_chunk(path: str, rows: list, prompt_lengths: list) -> None:
  """Writes to a temporary name, flushed to disk, then renames: a chunk is whole or absent."""
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, 'wb') as f:
    np.savez(f, tokens=np.concatenate(rows), lengths=np.array([len(r) for r in rows], np.int32),
             prompt_lengths=np.array(prompt_lengths, np.int32))
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def _load_chunk(path: str):
  """[(tokens, prompt length)] of a saved chunk."""
  try:
    with np.load(path) as z:
      rows = np.split(z['tokens'], np.cumsum(z['lengths'])[:-1])
      return list(zip(rows, z['prompt_lengths'].tolist()))
  except (OSError, ValueError, KeyError) as e:   # zip errors are ValueErrors / OSErrors
    raise UserError(f'seqkd: {path} is damaged ({type(e).__name__}); delete it and run again '
                    f'(that chunk is generated again)') from None


def _assemble(stage: str, name: str, n_chunks: int, tokenizer, settings: dict,
              final: str) -> dict:
  """Writes the chunks as a TFDS dataset in the stage, then renames it to `final`."""
  build_dir = os.path.join(stage, 'tfds')
  shutil.rmtree(build_dir, ignore_errors=True)   # a build that a kill interrupted
  counts = dict(num_examples=0, generated_tokens=0, stopped_at_eos=0)

  def examples():
    for k in range(n_chunks):
      for tokens, prompt_length in _load_chunk(_chunk_path(stage, k)):
        counts['generated_tokens'] += len(tokens) - prompt_length
        counts['stopped_at_eos'] += int(len(tokens) > prompt_length
                                        and tokens[-1] == tokenizer.eos_id)
        yield counts['num_examples'], dict(text=tokenizer.decode(tokens), tokens=tokens)
        counts['num_examples'] += 1

  tfds.disable_progress_bar()
  _Generations(name=name, examples=examples(), data_dir=build_dir,
               file_format='array_record').download_and_prepare()
  built = os.path.join(build_dir, name, VERSION)
  workdir_lib.write_json(os.path.join(built, RECORD), dict(settings=settings, counts=counts))
  os.makedirs(os.path.dirname(final), exist_ok=True)
  os.rename(built, final)
  return counts
