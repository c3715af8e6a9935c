"""Serving a JSONL file of requests from a trained run through the engine (`--mode=serve`).

  python -m experiments.main --mode=serve --config=experiments/configs/shakespeare.py \
      --workdir=runs/shakespeare --requests=requests.jsonl --output=outputs.jsonl --slots=8

`--workdir` may also be a Hugging Face checkpoint directory (config.json with `architectures`,
safetensors weights): the model is read by `models.hf.from_pretrained`, the tokenizer is the
`tokenizer.model` (SentencePiece) beside it if there is one, and without one requests give
token ids (`prompt`) and their own stop tokens. `--config` is then not read.

With `--draft=<a run's workdir>` (a trained or distilled run on the same tokenizer, e.g. a
`--mode=distill` student's <workdir>/students/<variant>) each decode step is a speculative pass
of `--draft_tokens` proposals (`models.speculative`): the same greedy tokens, the target's
distribution when sampled, fewer target passes.

Each input line is one JSON object: the fields of `experiments.requests.Request`, with the
prompt given as token ids (`prompt`) or as text (`text`, encoded with the run's tokenizer after
its BOS id). Without `stop_tokens` a request stops at the tokenizer's EOS id. Each output line
(in input order) holds the request's id, its tokens and their text, the finish reason (`stop`,
`length` or `error` with a one-line `error`), the time to first token, the latency and the
preemptions. A line that cannot be read is an error for that line only. The output is written
whole under a temporary name and then renamed, so a failed run leaves no partial file.
"""

import json

from etils import epath

from experiments import data, runtime, source, validate
from experiments import workdir as workdir_lib
from experiments.engine import Engine
from experiments.errors import UserError
from models import hf


def read_requests(path, tokenizer) -> list:
  """The requests of a JSONL file: dicts for the engine, or (id, error) for unreadable lines."""
  out = []
  for n, line in enumerate(epath.Path(path).read_text().splitlines(), 1):
    if not line.strip():
      continue
    try:
      d = json.loads(line)
    except json.JSONDecodeError as e:
      out.append((f'line{n}', f'line {n} is not JSON: {e.msg}'))
      continue
    if not isinstance(d, dict):
      out.append((f'line{n}', f'line {n} is not a JSON object'))
      continue
    d.setdefault('id', f'line{n}')
    if 'text' in d:
      if 'prompt' in d:
        out.append((str(d['id']), f'line {n} gives both prompt and text; give one'))
        continue
      text = d.pop('text')
      if tokenizer is None:
        out.append((str(d['id']), f'line {n}: text needs a tokenizer (a tokenizer.model beside '
                                  f'the checkpoint); give the prompt as token ids'))
        continue
      if not isinstance(text, str):
        out.append((str(d['id']), f'line {n}: text must be a string'))
        continue
      d['prompt'] = encode_text(tokenizer, text)
    if tokenizer is not None:
      d.setdefault('stop_tokens', [tokenizer.eos_id])
    out.append(d)
  return out


def encode_text(tokenizer, text: str) -> list:
  """The prompt ids of `text`: the tokenizer's BOS id, then the text's ids."""
  return [tokenizer.bos_id] + tokenizer.encode(text)


def is_hf_checkpoint(path) -> bool:
  """Whether `path` is a Hugging Face checkpoint directory (its config.json names
  `architectures`), not a training run (whose config.json is the run's config)."""
  file = epath.Path(path) / 'config.json'
  try:
    return file.is_file() and 'architectures' in json.loads(file.read_text())
  except (json.JSONDecodeError, OSError):
    return False


def load_target(config, workdir) -> tuple:
  """(model, tokenizer or None, params) of a training run or a Hugging Face checkpoint."""
  if not is_hf_checkpoint(workdir):
    validate.check(config, workdir, 'sample')
    _, model, tokenizer, params, _ = runtime.load_served(config, workdir)
    return model, tokenizer, params
  try:
    model, params = hf.from_pretrained(workdir)
  except (ValueError, FileNotFoundError, KeyError) as e:
    raise UserError(f'--workdir={workdir}: {e}') from None
  tokenizer = None
  spm = epath.Path(workdir) / 'tokenizer.model'
  if spm.exists():
    tokenizer = data.tokenizers.load_sentencepiece(spm)
    if tokenizer is None:
      raise UserError(f'{spm} is not a readable SentencePiece model')
    if tokenizer.vocab_size > model.config.vocab_size:
      raise UserError(f'{spm} has {tokenizer.vocab_size} ids, more than the checkpoint\'s '
                      f'vocab_size={model.config.vocab_size}')
  return model, tokenizer, params


def load_draft(draft_dir: str, tokenizer) -> tuple:
  """(model, params) of the draft run in `draft_dir`, checked to share the target's tokenizer."""
  path = epath.Path(draft_dir)
  if tokenizer is None:
    raise UserError(f'--draft={draft_dir}: the served checkpoint has no tokenizer.model to '
                    f'check that the draft proposes the same ids')
  if not (path / 'config.json').is_file():
    raise UserError(f'--draft={draft_dir} has no config.json: point it at a training run or a '
                    f'distilled student')
  config = source.source_config(path)
  _, model, draft_tokenizer, params, _ = runtime.load_served(config, path)
  if runtime.tokenizer_sha256(draft_tokenizer) != runtime.tokenizer_sha256(tokenizer):
    raise UserError(f'--draft={draft_dir} uses another tokenizer than the served run; a draft '
                    f'must propose the same ids')
  return model, params


def one_draft_tokens(draft_tokens, mode: str = 'serve') -> int:
  """The single k of `--draft_tokens` that serving takes."""
  if len(draft_tokens) != 1 or draft_tokens[0] < 1:
    raise UserError(f'--draft_tokens={",".join(map(str, draft_tokens))} must be one integer '
                    f'>= 1 for --mode={mode}')
  return draft_tokens[0]


def load_engine(config, workdir, slots: int, draft: str = '', draft_tokens=(4,),
                mode: str = 'serve') -> tuple:
  """(engine, tokenizer or None) serving the newest checkpoint of `workdir` (a training run or
  a Hugging Face checkpoint) from `slots` slots, speculatively with `draft` if given; bad
  flags are one-line `UserError`s naming `--mode={mode}`."""
  if slots < 1:
    raise UserError(f'--slots={slots} must be at least 1')
  k = one_draft_tokens(draft_tokens, mode)
  model, tokenizer, params = load_target(config, workdir)
  drafted = dict(draft=load_draft(draft, tokenizer), draft_tokens=k) if draft else {}
  try:
    engine = Engine(model, params, slots=slots, pad_id=getattr(tokenizer, 'pad_id', 0),
                    **drafted)
  except ValueError as e:
    raise UserError(f'--draft={draft}: {e}') from None
  return engine, tokenizer


def run(config, workdir, requests: str, output: str, slots: int, draft: str = '',
        draft_tokens=(4,)) -> str:
  """Serves the `requests` JSONL file with the newest checkpoint; writes `output`; returns a
  one-line summary."""
  if not requests or not output:
    raise UserError('--mode=serve needs --requests (a JSONL file) and --output')
  src, dst = epath.Path(requests), epath.Path(output)
  if not src.exists():
    raise UserError(f'--requests={requests} does not exist')
  if dst.resolve() == src.resolve():
    raise UserError(f'--output={output} is the requests file; give another path')
  engine, tokenizer = load_engine(config, workdir, slots, draft, draft_tokens)
  # Each input line keeps its place: an engine id, or the error that kept it from the engine.
  placed = [item if isinstance(item, tuple) else engine.submit(item)
            for item in read_requests(src, tokenizer)]
  results = engine.run()
  lines = []
  for item in placed:
    if isinstance(item, tuple):
      lines.append(dict(id=item[0], tokens=[], text='', finish_reason='error', error=item[1]))
      continue
    r = results[item]
    text = tokenizer.decode(r.tokens) if tokenizer is not None else ''
    lines.append(dict(id=item, tokens=r.tokens, text=text,
                      finish_reason=r.finish_reason, error=r.error, ttft=r.ttft,
                      latency=r.latency, preemptions=r.preemptions))
  workdir_lib.write_text(dst, ''.join(json.dumps(line) + '\n' for line in lines))
  errors = sum(line['finish_reason'] == 'error' for line in lines)
  made = sum(len(line['tokens']) for line in lines)
  rate = engine.acceptance_rate()
  kept = '' if rate is None else f', {100 * rate:.0f}% of draft tokens kept'
  return (f'served {len(lines) - errors} of {len(lines)} requests ({errors} errors), {made} '
          f'tokens, {engine.compiles()} compiled programs{kept}: {output}')
