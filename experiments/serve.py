"""Serving a JSONL file of requests from a trained run through the engine (`--mode=serve`).

  python -m experiments.main --mode=serve --config=experiments/configs/shakespeare.py \
      --workdir=runs/shakespeare --requests=requests.jsonl --output=outputs.jsonl --slots=8

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

from experiments import runtime, validate
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


def run(config, workdir, requests: str, output: str, slots: int) -> str:
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
  validate.check(config, workdir, 'sample')
  _, model, tokenizer, params, _ = runtime.load_served(config, workdir)
  engine = Engine(model, params, slots=slots, pad_id=tokenizer.pad_id)
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
  return (f'served {len(lines) - errors} of {len(lines)} requests ({errors} errors), {made} '
          f'tokens, {engine.compiles()} compiled programs: {output}')
