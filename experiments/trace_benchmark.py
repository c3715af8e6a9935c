"""The engine against static batching on a replayed request trace (`--mode=trace_benchmark`).

A trace is a list of requests with arrival times: `--requests`, a JSONL file of
`experiments.requests.Request` fields plus `arrival` (seconds from the start), or by default
`synthetic_trace`: TRACE_REQUESTS requests at Poisson arrivals, prompts of 4-64 tokens cut from
the eval split's rows (at most a row), token limits drawn from 8-128, a fifth of them at
priority 1, all greedy.

Both systems replay the trace on the wall clock with `--slots` rows; the replay reported is
the first that compiles nothing (the shapes a replay meets depend on its timing):
  - the engine: requests are submitted as they arrive, the engine steps while any is live
    (with 1 and with up to 4 decode steps per call, PER_CALL);
  - static batching: whenever the model is free, the waiting requests (up to `--slots`, in
    arrival order) are padded into one batch of `--slots` rows and decoded by
    `decode.generate` until the longest of them is done; a request's tokens are ready when its
    batch ends.
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
RATE = 200.0                     # mean arrivals per second: more than either system serves here
LIMITS = (8, 16, 32, 64, 128)    # token limits, drawn uniformly
MAX_PROMPT = 64
PER_CALL = (1, 4)                # the engine's decode steps per call: both are measured
WARMUPS = 10                     # replays at most after the first, until one compiles nothing


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
    # A static batch has a fixed number of rows: missing ones repeat the first prompt.
    rows = [list(r.prompt) for r in requests] + [list(requests[0].prompt)] * (slots - len(batch))
    gen = decode.generate(model, params, rows,
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
  engines = {n: Engine(model, params, slots=slots, pad_id=tokenizer.pad_id, steps_per_call=n)
             for n in PER_CALL}
  refused = [(r.id, engines[1].refusal(r)) for _, r in trace if engines[1].refusal(r)]
  if refused:
    raise UserError(f'request {refused[0][0]} (of {len(refused)} refused) cannot be served: '
                    f'{refused[0][1]}')
  compiles = lambda: (engines[1].compiles(), decode._generate._cache_size())
  replay_all = lambda: ([replay_engine(engines[n], trace) for n in PER_CALL],
                        replay_static(model, params, trace, slots, tokenizer.pad_id))
  # Which shapes a replay meets depends on timing: replay until one compiles nothing (a replay
  # that compiles pays for it in its times), and report that one; after WARMUPS replays, the
  # last one and what it compiled.
  replay_all()
  for _ in range(WARMUPS):
    before = compiles()
    served, (t_static, static) = replay_all()
    compiled = [a - b for a, b in zip(compiles(), before)]
    if not any(compiled):
      break
  priority = {r.id: r.priority for _, r in trace}
  systems = [(f'engine, {"up to " if n > 1 else ""}{n} step{"s" if n > 1 else ""} per call', t0,
              {i: (r.arrival, r.token_times, r.tokens) for i, r in results.items()})
             for n, (t0, results) in zip(PER_CALL, served)]
  systems.append(('static', t_static,
                  {i: (a, [end] * len(toks), toks) for i, (a, end, toks) in static.items()}))
  same = sum(all(rows[i][2] == static[i][2] for _, _, rows in systems) for i in static)
  lines = [f'{len(trace)} requests replayed on {workdir} ({model.config.n_layers} layers x '
           f'{model.config.d_model}) with {slots} slots, {jax.devices()[0].device_kind} '
           f'({jax.default_backend()}); greedy; {same}/{len(trace)} requests made the same '
           f'tokens in every system; programs compiled during the measured replays: engines '
           f'{compiled[0]}, static {compiled[1]}. Times in ms; static batching\'s tokens are '
           f'ready when its batch ends, so its first token comes with its last. Inter-token: '
           f'the median over requests of their mean gap between tokens.', '',
           '| system | priority | requests | tokens/s | TTFT p50 | TTFT p99 | latency p50 | '
           'latency p99 | inter-token |', '|---|---|---|---|---|---|---|---|---|']
  for name, t0, rows in systems:
    total = sum(len(toks) for _, _, toks in rows.values())
    span = max(times[-1] for _, times, _ in rows.values()) - t0
    for p in [None] + sorted(set(priority.values())):
      picked = [v for i, v in rows.items() if p is None or priority[i] == p]
      ttft = [1e3 * (times[0] - a) for a, times, _ in picked]
      lat = [1e3 * (times[-1] - a) for a, times, _ in picked]
      gaps = [1e3 * (times[-1] - times[0]) / (len(times) - 1) for _, times, _ in picked
              if len(times) > 1]
      itl = f'{np.median(gaps):.2f}' if name != 'static' and gaps else 'n/a'
      rate = f'{total / span:,.0f}' if p is None else ''
      lines.append(f'| {name} | {"all" if p is None else p} | {len(picked)} | {rate} | '
                   f'{np.percentile(ttft, 50):.0f} | {np.percentile(ttft, 99):.0f} | '
                   f'{np.percentile(lat, 50):.0f} | {np.percentile(lat, 99):.0f} | {itl} |')
  return '\n'.join(lines) + '\n'
