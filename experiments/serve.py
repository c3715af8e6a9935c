"""Serving a JSONL file of requests from a trained run through the engine (`--mode=serve`).

  python -m experiments.main --mode=serve --config=experiments/configs/shakespeare.py \
      --workdir=runs/shakespeare --requests=requests.jsonl --output=outputs.jsonl --slots=8

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

from experiments import runtime, source, validate
from experiments import workdir as workdir_lib
from experiments.engine import Engine
from experiments.errors import UserError


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
      if not isinstance(text, str):
        out.append((str(d['id']), f'line {n}: text must be a string'))
        continue
      d['prompt'] = [tokenizer.bos_id] + tokenizer.encode(text)
    d.setdefault('stop_tokens', [tokenizer.eos_id])
    out.append(d)
  return out


def load_draft(draft_dir: str, tokenizer) -> tuple:
  """(model, params) of the draft run in `draft_dir`, checked to share the target's tokenizer."""
  path = epath.Path(draft_dir)
  if not (path / 'config.json').is_file():
    raise UserError(f'--draft={draft_dir} has no config.json: point it at a training run or a '
                    f'distilled student')
  config = source.source_config(path)
  _, model, draft_tokenizer, params, _ = runtime.load_served(config, path)
  if runtime.tokenizer_sha256(draft_tokenizer) != runtime.tokenizer_sha256(tokenizer):
    raise UserError(f'--draft={draft_dir} uses another tokenizer than the served run; a draft '
                    f'must propose the same ids')
  return model, params


def one_draft_tokens(draft_tokens) -> int:
  """The single k of `--draft_tokens` that serving takes."""
  if len(draft_tokens) != 1 or draft_tokens[0] < 1:
    raise UserError(f'--draft_tokens={",".join(map(str, draft_tokens))} must be one integer '
                    f'>= 1 for --mode=serve')
  return draft_tokens[0]


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
  if slots < 1:
    raise UserError(f'--slots={slots} must be at least 1')
  k = one_draft_tokens(draft_tokens)
  validate.check(config, workdir, 'sample')
  _, model, tokenizer, params, _ = runtime.load_served(config, workdir)
  drafted = dict(draft=load_draft(draft, tokenizer), draft_tokens=k) if draft else {}
  try:
    engine = Engine(model, params, slots=slots, pad_id=tokenizer.pad_id, **drafted)
  except ValueError as e:
    raise UserError(f'--draft={draft}: {e}') from None
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
    lines.append(dict(id=item, tokens=r.tokens, text=tokenizer.decode(r.tokens),
                      finish_reason=r.finish_reason, error=r.error, ttft=r.ttft,
                      latency=r.latency, preemptions=r.preemptions))
  workdir_lib.write_text(dst, ''.join(json.dumps(line) + '\n' for line in lines))
  errors = sum(line['finish_reason'] == 'error' for line in lines)
  made = sum(len(line['tokens']) for line in lines)
  rate = engine.acceptance_rate()
  kept = '' if rate is None else f', {100 * rate:.0f}% of draft tokens kept'
  return (f'served {len(lines) - errors} of {len(lines)} requests ({errors} errors), {made} '
          f'tokens, {engine.compiles()} compiled programs{kept}: {output}')
