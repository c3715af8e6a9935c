"""Grain pipeline: documents -> tokens -> packed rows -> shuffled rows -> model batches.

Every document becomes [bos, tokens..., eos]. Documents are concatenated and cut into rows of
seq_len + 1 tokens; a long document simply continues in the next row. Within a row, segment ids
number the pieces 1..k (0 = padding) and positions restart at 0 in each piece. A batch holds
inputs = row[:-1] and targets = row[1:], weighted 1 only where the target is in the same piece
as its input token, so nothing is ever predicted across documents or into padding.
A second dataset can be mixed in by rows (`train_dataset(mix=...)`).

Everything runs in the calling process (no worker processes), and the train iterator's state
(a small dict of counters) restores its exact position.
"""

import itertools
import json
import math
from typing import Any, Callable, Optional

import grain
import numpy as np

from experiments.data import sources

Batch = dict[str, np.ndarray]
# Documents are read and tokenized ahead in a few threads; packing runs on `next`.
_READ = grain.ReadOptions(num_threads=2, prefetch_buffer_size=64)


def documents(source, text_key: str = 'text', process_index: int = 0,
              process_count: int = 1) -> grain.MapDataset:
  """The texts of this host's share of `source`: every process_count-th example."""
  ds = grain.MapDataset.source(source)
  if process_count > 1:
    ds = ds[process_index::process_count]
  return ds.map(lambda example: sources.as_text(example[text_key]))


def tokenize_fn(tokenizer) -> Callable[[str], dict[str, np.ndarray]]:
  """Text -> {'tokens': int32 [bos, ..., eos]}."""
  def tokenize(text: str) -> dict[str, np.ndarray]:
    ids = [tokenizer.bos_id, *tokenizer.encode(text), tokenizer.eos_id]
    return {'tokens': np.asarray(ids, np.int32)}
  return tokenize


def pack(docs: grain.IterDataset, seq_len: int) -> grain.IterDataset:
  """Concatenates tokenized documents and cuts rows of seq_len + 1 tokens, zero-padded at the end.

  Rows are dicts with int32 `tokens`, `tokens_segment_ids` and `tokens_positions`.
  """
  return grain.experimental.ConcatThenSplitIterDataset(docs, length_struct={'tokens': seq_len + 1})


def to_batch(rows: dict[str, np.ndarray]) -> Batch:
  """Packed rows [b, L + 1] -> inputs, targets, segment_ids, positions, weights [b, L]."""
  tokens = np.asarray(rows['tokens'], np.int32)
  seg = np.asarray(rows['tokens_segment_ids'], np.int32)
  same_piece = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] != 0)
  return dict(inputs=tokens[:, :-1], targets=tokens[:, 1:], segment_ids=seg[:, :-1],
              positions=np.asarray(rows['tokens_positions'], np.int32)[:, :-1],
              weights=same_piece.astype(np.float32))


def packed_rows(source, tokenizer, *, seq_len: int, seed: int, text_key: str = 'text',
                process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
  """Infinite packed rows of this host's share of `source`, documents reshuffled every epoch."""
  docs = documents(source, text_key, process_index, process_count)
  # Shuffle before repeat: each epoch gets its own order (the seed is folded with the epoch).
  docs = docs.shuffle(seed=seed).repeat().map(tokenize_fn(tokenizer))
  return pack(docs.to_iter_dataset(_READ), seq_len)


def train_dataset(source, tokenizer, *, seq_len: int, batch_size: int, seed: int,
                  shuffle_window: int, text_key: str = 'text', process_index: int = 0,
                  process_count: int = 1,
                  mix: Optional[tuple[Any, str, float]] = None) -> grain.IterDataset:
  """Infinite batches: documents reshuffled every epoch, rows shuffled within a window.

  `mix` = (source, text_key, weight) adds a second dataset: packed on its own, its rows make up
  the fraction `weight` of all rows (1.0: only its rows), interleaved in fixed proportions.
  """
  shard = dict(seq_len=seq_len, process_index=process_index, process_count=process_count)
  rows = packed_rows(source, tokenizer, seed=seed, text_key=text_key, **shard)
  if mix is not None:
    mix_source, mix_key, weight = mix
    # Packed apart, so a row is all one dataset's and the weight counts rows (tokens).
    extra = packed_rows(mix_source, tokenizer, seed=(seed + 2) % 2**32, text_key=mix_key, **shard)
    rows = extra if weight >= 1 else grain.IterDataset.mix([rows, extra], [1 - weight, weight])
  # Rows of one long scene come out together; a window shuffle spreads them over many batches.
  rows = grain.experimental.WindowShuffleIterDataset(rows, window_size=shuffle_window,
                                                     seed=(seed + 1) % 2**32)
  return rows.batch(batch_size, drop_remainder=True).map(to_batch)


def eval_batches(source, tokenizer, *, seq_len: int, batch_size: int, text_key: str = 'text',
                 process_index: int = 0, process_count: int = 1,
                 max_batches: Optional[int] = None) -> list[Batch]:
  """This host's eval batches: the whole split in order, packed, the last batch zero-padded.

  Every host packs the same rows (the whole split, or as much as `max_batches` needs) and takes
  every process_count-th row, so all hosts return the same number of batches and together
  cover every row exactly once. Padding rows have weights 0.
  """
  docs = documents(source, text_key).map(tokenize_fn(tokenizer)).to_iter_dataset(_READ)
  per_step = batch_size * process_count
  limit = None if max_batches is None else max_batches * per_step
  rows = list(itertools.islice(pack(docs, seq_len), limit))
  n_batches = math.ceil(len(rows) / per_step)
  blank = {k: np.zeros(seq_len + 1, np.int32) for k in rows[0]} if rows else {}
  mine = rows[process_index::process_count]
  mine += [blank] * (n_batches * batch_size - len(mine))
  return [to_batch({k: np.stack([r[k] for r in mine[i:i + batch_size]]) for k in blank})
          for i in range(0, n_batches * batch_size, batch_size)]


def _encode(value: Any) -> Any:
  """JSON-safe form of an iterator state; tuples are tagged so they come back as tuples."""
  if isinstance(value, dict):
    return {str(k): _encode(v) for k, v in value.items()}
  if isinstance(value, tuple):
    return {'__tuple__': [_encode(v) for v in value]}
  if isinstance(value, list):
    return [_encode(v) for v in value]
  if isinstance(value, np.generic):
    return value.item()
  return value


def _decode(value: Any) -> Any:
  if isinstance(value, dict):
    if set(value) == {'__tuple__'}:
      return tuple(_decode(v) for v in value['__tuple__'])
    return {k: _decode(v) for k, v in value.items()}
  if isinstance(value, list):
    return [_decode(v) for v in value]
  return value


def iterator_state_to_json(state: dict) -> str:
  """A train iterator's `get_state()` as a JSON string (to save with a checkpoint)."""
  return json.dumps(_encode(state), sort_keys=True)


def iterator_state_from_json(text: str) -> dict:
  """The inverse of `iterator_state_to_json`, ready for `set_state`."""
  return _decode(json.loads(text))
