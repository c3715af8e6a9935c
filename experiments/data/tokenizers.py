"""Tokenizers: raw UTF-8 bytes (no training) and SentencePiece trained on the training split.

Both share the special ids 0 = pad, 1 = bos, 2 = eos, so packed rows can be zero-padded, and both
give `token_bytes`, the number of UTF-8 bytes each token stands for, so that a loss in nats per
token converts to bits per byte: sum(loss) / (ln 2 * sum(token_bytes[targets])).
"""

import io
import logging
import os
import pathlib
import re
from typing import Iterable, Protocol, Sequence

import numpy as np

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
SPM_MODEL_TYPES = ('unigram', 'bpe')
# SentencePiece sees at most this many characters of the training split, in split order, and
# documents are cut into pieces of at most this many characters (its sentences).
SPM_MAX_TRAIN_CHARS = 20_000_000
SPM_CHUNK_CHARS = 8192


class Tokenizer(Protocol):
  """What training needs from a tokenizer."""
  vocab_size: int
  pad_id: int
  bos_id: int
  eos_id: int
  token_bytes: np.ndarray  # int32 [vocab_size]: UTF-8 bytes per token, 0 for specials

  def encode(self, text: str) -> list[int]: ...

  def decode(self, ids: Sequence[int]) -> str: ...


def _until_stop(ids: Sequence[int]) -> list[int]:
  """Ids up to the first eos or pad, the way a generated continuation ends."""
  ids = [int(i) for i in np.asarray(ids).reshape(-1)]
  for n, i in enumerate(ids):
    if i in (PAD_ID, EOS_ID):
      return ids[:n]
  return ids


class ByteTokenizer:
  """One token per UTF-8 byte: ids 3..258 are bytes 0..255 after the three specials.

  The vocabulary is exactly 259; a model may use a larger, rounder embedding table (e.g. 384)
  since ids past 258 never occur as targets.
  """
  pad_id, bos_id, eos_id = PAD_ID, BOS_ID, EOS_ID
  offset = 3
  vocab_size = 256 + offset

  def __init__(self):
    self.token_bytes = np.array([0] * self.offset + [1] * 256, np.int32)

  def encode(self, text: str) -> list[int]:
    return (np.frombuffer(text.encode('utf-8'), np.uint8).astype(np.int32) + self.offset).tolist()

  def decode(self, ids: Sequence[int]) -> str:
    data = bytes(i - self.offset for i in _until_stop(ids) if self.offset <= i < self.vocab_size)
    return data.decode('utf-8', errors='replace')


class SentencePieceTokenizer:
  """A SentencePiece model with byte fallback: every text round-trips exactly."""
  pad_id, bos_id, eos_id = PAD_ID, BOS_ID, EOS_ID

  def __init__(self, model_proto: bytes):
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top
    self.model_proto = model_proto
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    self.vocab_size = self._sp.get_piece_size()
    if (self._sp.pad_id(), self._sp.bos_id(), self._sp.eos_id()) != (PAD_ID, BOS_ID, EOS_ID):
      raise ValueError('SentencePiece model must use pad=0, bos=1, eos=2')
    self.token_bytes = np.array([self._piece_bytes(i) for i in range(self.vocab_size)], np.int32)

  def _piece_bytes(self, i: int) -> int:
    if self._sp.is_control(i) or self._sp.is_unknown(i):
      return 0
    if self._sp.is_byte(i):
      return 1
    return len(self._sp.id_to_piece(i).replace('\u2581', ' ').encode('utf-8'))

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text)

  def decode(self, ids: Sequence[int]) -> str:
    keep = [i for i in _until_stop(ids) if 0 <= i < self.vocab_size and self.token_bytes[i]]
    return self._sp.decode(keep)


def _chunks(texts: Iterable[str], max_chars: int) -> Iterable[str]:
  """Training sentences for SentencePiece: documents cut into pieces, up to `max_chars` in all."""
  seen = 0
  for text in texts:
    for start in range(0, len(text), SPM_CHUNK_CHARS):
      if seen >= max_chars:
        return
      chunk = text[start:start + SPM_CHUNK_CHARS]
      seen += len(chunk)
      yield chunk


def train_sentencepiece(texts: Iterable[str], vocab_size: int, model_type: str = 'unigram',
                        max_chars: int = SPM_MAX_TRAIN_CHARS) -> bytes:
  """Trains a lossless SentencePiece model on `texts` and returns its serialized proto."""
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_chunks(texts, max_chars)), model_writer=model,
        vocab_size=vocab_size, model_type=model_type,
        pad_id=PAD_ID, bos_id=BOS_ID, eos_id=EOS_ID, unk_id=3,
        # Lossless: no normalization, whitespace and newlines kept, rare characters as bytes.
        normalization_rule_name='identity', remove_extra_whitespaces=False,
        add_dummy_prefix=False, allow_whitespace_only_pieces=True, byte_fallback=True,
        character_coverage=0.9995, max_sentence_length=4 * SPM_CHUNK_CHARS,
        num_threads=os.cpu_count() or 1, minloglevel=2)
  except RuntimeError as e:
    # Its message reads 'INTERNAL: file.cc(line) [condition] what went wrong': keep the end.
    reason = str(e).strip().splitlines()[-1].split('] ', 1)[-1]
    raise ValueError(f'SentencePiece training failed for vocab_size={vocab_size} '
                     f'({model_type}): {reason}') from None
  return model.getvalue()


def cache_path(cache_dir: str, dataset: str, split: str, model_type: str,
               vocab_size: int) -> pathlib.Path:
  """Where the SentencePiece model for this dataset, split, type and size is kept."""
  key = re.sub(r'[^\w.-]+', '_', f'{dataset}-{split}-{model_type}-{vocab_size}')
  return pathlib.Path(cache_dir) / 'tokenizers' / f'{key}.model'


def load_sentencepiece(path, vocab_size=None):
  """The SentencePiece model at `path`, or None when the file is damaged (or of another size)."""
  try:
    tokenizer = SentencePieceTokenizer(pathlib.Path(path).read_bytes())
  except (OSError, RuntimeError, ValueError):
    return None
  if vocab_size is not None and tokenizer.vocab_size != vocab_size:
    return None
  return tokenizer


def cached_sentencepiece(path: pathlib.Path, texts: Iterable[str], vocab_size: int,
                         model_type: str = 'unigram') -> SentencePieceTokenizer:
  """Loads the model at `path`, training it on `texts` first (and saving it) if missing.

  A damaged cache file is trained again and replaced, with a warning.
  """
  if path.exists():
    tokenizer = load_sentencepiece(path, vocab_size)
    if tokenizer is not None:
      return tokenizer
    logging.warning('the cached SentencePiece model %s is damaged; training it again', path)
  proto = train_sentencepiece(texts, vocab_size, model_type)
  path.parent.mkdir(parents=True, exist_ok=True)
  # Write then rename, so a concurrent reader never sees half a model.
  tmp = path.with_suffix(f'.tmp{os.getpid()}')
  tmp.write_bytes(proto)
  os.replace(tmp, path)
  return SentencePieceTokenizer(proto)
