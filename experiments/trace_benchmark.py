"""The engine against static batching on a replayed request trace (`--mode=trace_benchmark`).

A trace is a list of requests with arrival times: `--requests`, a JSONL file of
`experiments.requests.Request` fields plus `arrival` (seconds from the start), or by default
`synthetic_trace`: TRACE_REQUESTS requests at Poisson arrivals, prompts of 4-64 tokens cut from
the eval split's rows (at most a row), token limits drawn from 8-128, a fifth of them at priority 1, all greedy.

Both systems replay the trace on the wall clock with `--slots` rows, after unmeasured replays
that compile the shapes they meet (repeated until one compiles nothing):
  - the engine: requests are submitted as they arrive, the engine steps while any is live;
  - static batching: whenever the model is free, the waiting requests (up to `--slots`, in
    arrival order) are padded into one batch and decoded by `decode.generate` until the
    longest of them is done; a request's tokens are ready when its batch ends.
Reported per system and priority: tokens/s (all tokens over first arrival to last finish), p50
and p99 time to first token and latency, the engine's median inter-token gap, and how many
requests' tokens equal the other system's.

  python -m experiments.main --mode=trace_benchmark --config=experiments/configs/shakespeare.py \
      --workdir=runs/shakespeare --slots=8
"""

import json
import time

import jax
import numpy as np
from etils import epath

from experiments import data, runtime, validate
from experiments.engine import Engine
from experiments.errors import UserError
from experiments.requests import Request
from models import decode

TRACE_REQUESTS = 256
RATE = 100.0                     # mean arrivals per second: more than either system serves here
LIMITS = (8, 16, 32, 64, 128)    # token limits, drawn uniformly
MAX_PROMPT = 64
WARMUPS = 4                      # unmeasured replays at most, until one compiles nothing


def synthetic_trace(config, tokenizer, n: int = TRACE_REQUESTS, seed: int = 0) -> list:
  """(arrival seconds, Request) pairs: Poisson arrivals, eval-split prompts, mixed lengths."""
  rng = np.random.default_rng(seed)
  rows = np.asarray(data.eval_batches(config.data, tokenizer, batch_size=64,
                                      max_batches=1)[0]['inputs'])
  arrivals = np.cumsum(rng.exponential(1 / RATE, n))
  longest = min(MAX_PROMPT, rows.shape[1])
  out = []
  for i in range(n):
    length = int(rng.integers(4, longest + 1))
    start = int(rng.integers(0, rows.shape[1] - length + 1))
    prompt = rows[i % len(rows), start:start + length].tolist()
    out.append((float(arrivals[i]), Request(
        prompt=prompt, max_new_tokens=int(rng.choice(LIMITS)),
        priority=int(rng.random() < 0.2), id=f't{i}')))
  return out


def read_trace(path) -> list:
  """(arrival, Request) pairs of a JSONL trace, in arrival order; a bad line is one error."""
  out = []
  for n, line in enumerate(epath.Path(path).read_text().splitlines(), 1):
    if not line.strip():
      continue
    try:
      d = json.loads(line)
      arrival = d.pop('arrival')
      if not isinstance(arrival, (int, float)) or arrival < 0:
        raise ValueError(f'arrival={arrival!r} must be a number of seconds >= 0')
      d.setdefault('id', f'line{n}')
      out.append((float(arrival), Request.from_dict(d)))
    except (json.JSONDecodeError, KeyError, ValueError, TypeError, AttributeError) as e:
      what = 'no arrival' if isinstance(e, KeyError) else e
      raise UserError(f'--requests={path}: line {n}: {what}') from None
  return sorted(out, key=lambda x: x[0])


def replay_engine(engine: Engine, trace: list) -> tuple:
  """Replays `trace` into the engine on the wall clock; returns (start, {id: Result})."""
  engine.results.clear()
  t0, pending = time.perf_counter(), list(trace)
  while pending or engine.busy:
    now = time.perf_counter() - t0
    while pending and pending[0][0] <= now:
      arrival, request = pending.pop(0)
      engine.submit(request, arrival=t0 + arrival)
    if engine.busy:
      engine.step()
    elif pending:
      time.sleep(max(0.0, pending[0][0] - (time.perf_counter() - t0)))
  return t0, dict(engine.results)


def replay_static(model, params, trace: list, slots: int, pad_id: int) -> tuple:
  """Replays `trace` with static batches; returns (start, {id: (arrival, end, tokens)})."""
  t0, pending, out = time.perf_counter(), list(trace), {}
  while pending:
    now = time.perf_counter() - t0
    if pending[0][0] > now:
      time.sleep(pending[0][0] - now)
      now = time.perf_counter() - t0
    batch = [x for x in pending if x[0] <= now][:slots]
    for x in batch:
      pending.remove(x)
    requests = [r for _, r in batch]
    gen = decode.generate(model, params, [list(r.prompt) for r in requests],
                          max_new_tokens=max(r.max_new_tokens for r in requests), pad_id=pad_id)
    tokens = np.asarray(gen.tokens)
    end = time.perf_counter()
    for (arrival, r), row in zip(batch, tokens):
      out[r.id] = (t0 + arrival, end, _cut(row.tolist(), r))
  return t0, out


def _cut(tokens, r):
  tokens = tokens[:r.max_new_tokens]
  for i, t in enumerate(tokens):
    if t in r.stop_tokens:
      return tokens[:i + 1]
  return tokens


def run(config, workdir, requests: str, slots: int) -> str:
  """Replays the trace through both systems; returns a markdown table."""
  if slots < 1:
    raise UserError(f'--slots={slots} must be at least 1')
  if requests and not epath.Path(requests).exists():
    raise UserError(f'--requests={requests} does not exist')
  validate.check(config, workdir, 'sample')
  _, model, tokenizer, params, _ = runtime.load_served(config, workdir)
  trace = read_trace(requests) if requests else synthetic_trace(config, tokenizer)
  if not trace:
    raise UserError(f'--requests={requests} holds no requests')
  engine = Engine(model, params, slots=slots, pad_id=tokenizer.pad_id,
                  max_len=min(model.config.max_len, 256))
  refused = [(r.id, engine.refusal(r)) for _, r in trace if engine.refusal(r)]
  if refused:
    raise UserError(f'request {refused[0][0]} (of {len(refused)} refused) cannot be served: '
                    f'{refused[0][1]}')
  static_compiles = decode._generate._cache_size
  # Which shapes a replay meets depends on timing: warm up until a replay compiles nothing.
  for _ in range(WARMUPS):
    before = engine.compiles(), static_compiles()
    replay_engine(engine, trace)
    replay_static(model, params, trace, slots, tokenizer.pad_id)
    if (engine.compiles(), static_compiles()) == before:
      break
  before = engine.compiles(), static_compiles()
  t_engine, served = replay_engine(engine, trace)
  t_static, static = replay_static(model, params, trace, slots, tokenizer.pad_id)
  compiled = (engine.compiles() - before[0], static_compiles() - before[1])
  priority = {r.id: r.priority for _, r in trace}
  same = sum(served[i].tokens == static[i][2] for i in served)
  engine_rows = {i: (r.arrival, r.token_times, r.tokens) for i, r in served.items()}
  static_rows = {i: (a, [end] * len(toks), toks) for i, (a, end, toks) in static.items()}
  lines = [f'{len(trace)} requests replayed on {workdir} ({model.config.n_layers} layers x '
           f'{model.config.d_model}) with {slots} slots, {jax.devices()[0].device_kind} '
           f'({jax.default_backend()}); greedy; {same}/{len(trace)} requests made the same '
           f'tokens in both systems; programs compiled during the measured replays: engine '
           f'{compiled[0]}, static {compiled[1]}. Times in ms; static batching\'s tokens are '
           f'ready when its batch ends, so its first token comes with its last.', '',
           '| system | priority | requests | tokens/s | TTFT p50 | TTFT p99 | latency p50 | '
           'latency p99 | inter-token p50 |', '|---|---|---|---|---|---|---|---|---|']
  for name, t0, rows in (('engine', t_engine, engine_rows), ('static', t_static, static_rows)):
    total = sum(len(toks) for _, _, toks in rows.values())
    span = max(times[-1] for _, times, _ in rows.values()) - t0
    for p in [None] + sorted(set(priority.values())):
      picked = [v for i, v in rows.items() if p is None or priority[i] == p]
      ttft = [1e3 * (times[0] - a) for a, times, _ in picked]
      lat = [1e3 * (times[-1] - a) for a, times, _ in picked]
      gaps = [1e3 * g for _, times, _ in picked for g in np.diff(times)]
      itl = f'{np.median(gaps):.2f}' if name == 'engine' and gaps else 'n/a'
      rate = f'{total / span:,.0f}' if p is None else ''
      lines.append(f'| {name} | {"all" if p is None else p} | {len(picked)} | {rate} | '
                   f'{np.percentile(ttft, 50):.0f} | {np.percentile(ttft, 99):.0f} | '
                   f'{np.percentile(lat, 50):.0f} | {np.percentile(lat, 99):.0f} | {itl} |')
  return '\n'.join(lines) + '\n'
