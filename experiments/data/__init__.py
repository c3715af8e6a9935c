"""Training data: the embedded plays or any TFDS text dataset, tokenized, packed and batched.

Typical use (the train loop calls exactly these):

  check_config(cfg.data); check_available(cfg.data); prepare(cfg.data)
  tokenizer = get_tokenizer(cfg.data)
  batches = train_iterator(cfg.data, tokenizer, batch_size=..., seed=...)   # infinite
  evals = eval_batches(cfg.data, tokenizer, batch_size=..., max_batches=...)

Batches are dicts of NumPy arrays [batch, seq_len]: int32 inputs, targets, segment_ids,
positions and float32 weights (see `pipeline`).

`mix` adds a second training dataset by rows, e.g. a teacher's generations written by
`experiments/seqkd.py`; evaluation and the tokenizer always come from the main dataset.
"""

from typing import Optional

import ml_collections
from ml_collections import config_dict

from experiments.data import pipeline, sources, tokenizers
from experiments.data.pipeline import iterator_state_from_json, iterator_state_to_json
from experiments.data.tokenizers import ByteTokenizer, SentencePieceTokenizer, Tokenizer

__all__ = ['default_config', 'mix_config', 'check_config', 'check_available', 'prepare',
           'get_tokenizer', 'train_iterator', 'eval_batches', 'eval_texts', 'iterator_state_to_json',
           'iterator_state_from_json',
           'ByteTokenizer', 'SentencePieceTokenizer', 'Tokenizer']

TOKENIZERS = ('byte', 'sentencepiece')
MIN_SPM_VOCAB = 384  # byte fallback takes 256 ids, plus 4 specials and every common character


def default_config() -> ml_collections.ConfigDict:
  """The data settings, with defaults that train on the embedded plays."""
  c = ml_collections.ConfigDict()
  c.name = sources.EMBEDDED  # 'shakespeare' (embedded plays) or a TFDS name: 'lm1b', 'c4/en'
  c.data_dir = config_dict.placeholder(str)  # data + tokenizer caches; None: ~/tensorflow_datasets
  c.text_key = 'text'        # feature holding the document text
  c.train_split = 'train'    # TFDS split expression, e.g. 'train[:90%]'
  c.eval_split = 'validation'
  c.tokenizer = 'byte'       # 'byte' (259 ids, nothing to train) or 'sentencepiece'
  c.vocab_size = 1024        # SentencePiece vocabulary size (ignored by the byte tokenizer)
  c.spm_model_type = 'unigram'  # SentencePiece algorithm: 'unigram' or 'bpe'
  c.seq_len = 256            # tokens per training row (model input length)
  c.shuffle_window = 1024    # packed rows shuffled together, so a batch mixes many documents
  # A second training dataset mixed in by rows; configs saved without `mix` read as off.
  c.mix = ml_collections.ConfigDict()
  c.mix.name = ''            # '' = off; a TFDS name, e.g. the 'seqkd' of experiments/seqkd.py
  c.mix.data_dir = config_dict.placeholder(str)  # where it is prepared; None: data_dir
  c.mix.split = 'train'      # TFDS split expression
  c.mix.weight = 0.5         # fraction of training rows from the mix dataset, in (0, 1]
  c.mix.text_key = 'text'    # its feature holding the document text
  return c


def mix_config(data_config) -> Optional[ml_collections.ConfigDict]:
  """The `mix` section when mixing is on, else None (older configs have no `mix`)."""
  mix = data_config.get('mix')
  return mix if mix is not None and mix.get('name') else None


def _mix_dir(data_config) -> Optional[str]:
  return data_config.mix.get('data_dir') or data_config.data_dir


def check_config(data_config) -> None:
  """Raises ValueError with one line naming the first bad field and what is allowed."""
  c = data_config

  def bad(msg):
    raise ValueError(f'data config: {msg}')

  if not isinstance(c.name, str) or not c.name:
    bad(f'name={c.name!r} must be {sources.EMBEDDED!r} or a TFDS dataset name such as lm1b')
  if not sources.is_known(c.name, c.data_dir):
    bad(f'unknown dataset name={c.name!r}: use {sources.EMBEDDED!r} or a registered or '
        f'prepared TFDS dataset such as lm1b or c4/en')
  for field in ('text_key', 'train_split', 'eval_split'):
    if not isinstance(c[field], str) or not c[field]:
      bad(f'{field}={c[field]!r} must be a non-empty string')
  if c.tokenizer not in TOKENIZERS:
    bad(f'tokenizer={c.tokenizer!r} is not one of {", ".join(TOKENIZERS)}')
  for field in ('seq_len', 'shuffle_window', 'vocab_size'):
    if not isinstance(c[field], int) or c[field] <= 0:
      bad(f'{field}={c[field]!r} must be a positive integer')
  if c.tokenizer == 'sentencepiece':
    if c.vocab_size < MIN_SPM_VOCAB:
      bad(f'vocab_size={c.vocab_size} is too small for sentencepiece: use at least '
          f'{MIN_SPM_VOCAB}')
    model_type = c.get('spm_model_type', 'unigram')
    if model_type not in tokenizers.SPM_MODEL_TYPES:
      bad(f'spm_model_type={model_type!r} is not one of {", ".join(tokenizers.SPM_MODEL_TYPES)}')
  mix = mix_config(c)
  if mix is not None:
    if not isinstance(mix.name, str):
      bad(f'mix.name={mix.name!r} must be a dataset name, or \'\' for no mixing')
    for field in ('split', 'text_key'):
      if not isinstance(mix[field], str) or not mix[field]:
        bad(f'mix.{field}={mix[field]!r} must be a non-empty string')
    w = mix.weight
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 < w <= 1:
      bad(f'mix.weight={w!r} must be in (0, 1]: the fraction of training rows from mix.name '
          f'(1.0: only it)')
    if not sources.is_known(mix.name, _mix_dir(c)):
      bad(f'mix dataset mix.name={mix.name!r} is not prepared under '
          f'{sources.data_dir(_mix_dir(c))}: write it first (experiments/seqkd.py) or set '
          f'mix.data_dir')


def check_available(data_config) -> None:
  """Raises UserError unless the dataset, its splits and text feature can be read (see
  `sources.check`); nothing is prepared or written."""
  sources.check(data_config.name, data_config.data_dir,
                dict(train_split=data_config.train_split, eval_split=data_config.eval_split),
                data_config.text_key)
  mix = mix_config(data_config)
  if mix is not None:
    sources.check(mix.name, _mix_dir(data_config), {'mix.split': mix.split}, mix.text_key,
                  text_field='mix.text_key')


def prepare(data_config) -> None:
  """Builds the embedded corpus if missing (offline, seconds); other datasets must be ready."""
  sources.prepare(data_config.name, data_config.data_dir)
  if mix_config(data_config) is not None:
    sources.prepare(data_config.mix.name, _mix_dir(data_config))


def _source(data_config, split: str):
  return sources.data_source(data_config.name, split, data_config.data_dir)


def get_tokenizer(data_config) -> Tokenizer:
  """The byte tokenizer, or the SentencePiece model for this dataset (trained once, cached)."""
  if data_config.tokenizer == 'byte':
    return ByteTokenizer()
  model_type = data_config.get('spm_model_type', 'unigram')
  path = tokenizers.cache_path(sources.data_dir(data_config.data_dir), data_config.name,
                               data_config.train_split, model_type, data_config.vocab_size)
  texts = (sources.as_text(ex[data_config.text_key])
           for ex in _source(data_config, data_config.train_split))
  return tokenizers.cached_sentencepiece(path, texts, data_config.vocab_size, model_type)


def train_iterator(data_config, tokenizer: Tokenizer, *, batch_size: int, seed: int,
                   process_index: int = 0, process_count: int = 1):
  """An infinite Grain `DatasetIterator` of this host's batches of `batch_size` rows.

  With `mix` on, the fraction `mix.weight` of the rows comes from the mix dataset.
  `get_state()` / `set_state()` restore the exact position; save the state with
  `iterator_state_to_json`.
  """
  mix = mix_config(data_config)
  if mix is not None:
    mix = (sources.data_source(mix.name, mix.split, _mix_dir(data_config)), mix.text_key,
           float(mix.weight))
  ds = pipeline.train_dataset(
      _source(data_config, data_config.train_split), tokenizer, seq_len=data_config.seq_len,
      batch_size=batch_size, seed=seed, shuffle_window=data_config.shuffle_window,
      text_key=data_config.text_key, process_index=process_index, process_count=process_count,
      mix=mix)
  return iter(ds)


def eval_batches(data_config, tokenizer: Tokenizer, *, batch_size: int, process_index: int = 0,
                 process_count: int = 1, max_batches: Optional[int] = None):
  """This host's eval batches (same count on every host; last one padded with weight 0)."""
  return pipeline.eval_batches(
      _source(data_config, data_config.eval_split), tokenizer, seq_len=data_config.seq_len,
      batch_size=batch_size, text_key=data_config.text_key, process_index=process_index,
      process_count=process_count, max_batches=max_batches)


def eval_texts(data_config, n: int, max_chars: int = 300) -> list[str]:
  """Openings of `n` eval documents spread over the split, cut at a line end when possible."""
  source = _source(data_config, data_config.eval_split)
  picks = sorted({i * len(source) // max(n, 1) for i in range(min(n, len(source)))})
  texts = []
  for i in picks:
    text = sources.as_text(source[i][data_config.text_key])[:max_chars]
    cut = text.rfind('\n')
    texts.append(text[:cut + 1] if cut > 0 else text)
  return texts
