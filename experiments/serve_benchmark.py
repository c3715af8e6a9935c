"""What speculative decoding buys the engine on a trained run (`--mode=serve_benchmark`).

Serves the openings of the same eval-split rows (as many as the largest batch size, `PROMPT`
tokens each, `--steps` new tokens, greedy, no stop tokens) through the engine with `b` slots for
each `b` of `--batch_sizes` (batch 1: one request after another): plain, plain with an int8 KV
cache (its bytes and how many requests keep the float cache's tokens), the
draft alone (its own decode speed, the measure of how much cheaper it is), and speculative with
the draft for each k of `--draft_tokens`. The settings are timed in alternating rounds after a
warm-up run that compiles them (median over rounds), so a slow spell of the machine hits all
alike; every speculative run's tokens are compared with the plain engine's. A second table
times what a pass asks of the target: one forward over a chunk of j tokens against the cache,
relative to one token (a decode step), for j = 1..k_max + 1.

  python -m experiments.main --mode=serve_benchmark --config=experiments/configs/shakespeare.py \
      --workdir=runs/shakespeare --draft=runs/draft/students/L1:scratch:kd \
      --draft_tokens=2,3,4,5,6 --batch_sizes=1,8 --steps=64
"""

import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments import data, runtime, serve, validate
from experiments.engine import Engine
from experiments.errors import UserError
from experiments.requests import Request
from models.attention import cache_bytes, init_cache

ROUNDS = 3
PROMPT = 16


def prompts(config, tokenizer, n: int) -> list:
  """The first PROMPT tokens of n eval rows (rows spread over the split's first batch)."""
  batch = data.eval_batches(config.data, tokenizer, batch_size=max(n, 8), max_batches=1)[0]
  return np.asarray(batch['inputs'])[:n, :PROMPT].tolist()


def run(config, workdir, draft: str, draft_tokens, batch_sizes, n_steps: int) -> str:
  """Times the engine plain, the draft alone and each speculative k; returns a markdown table."""
  if not draft:
    raise UserError('--mode=serve_benchmark needs --draft (a draft run\'s workdir)')
  if not draft_tokens or min(draft_tokens) < 1 or not batch_sizes or min(batch_sizes) < 1:
    raise UserError(f'--draft_tokens={",".join(map(str, draft_tokens))} and --batch_sizes='
                    f'{",".join(map(str, batch_sizes))} must be non-empty integers >= 1')
  if n_steps < 2:
    raise UserError(f'--steps={n_steps} must be at least 2 (new tokens per request)')
  validate.check(config, workdir, 'sample')
  _, model, tokenizer, params, _ = runtime.load_served(config, workdir)
  draft_model, draft_params = serve.load_draft(draft, tokenizer)
  max_len = PROMPT + (max(draft_tokens) + 1) * n_steps
  if max_len > min(model.config.max_len, draft_model.config.max_len):
    raise UserError(f'--steps={n_steps} with k={max(draft_tokens)} needs {max_len} cache '
                    f'entries, beyond the models\' max_len')
  rows = []
  requests = [Request(prompt=p, max_new_tokens=n_steps, id=f'p{i}')
              for i, p in enumerate(prompts(config, tokenizer, max(batch_sizes)))]
  for b in batch_sizes:
    engines = {'plain': Engine(model, params, slots=b, max_len=max_len, buckets=(PROMPT,)),
               'plain, int8 cache': Engine(model, params, slots=b, max_len=max_len,
                                           buckets=(PROMPT,), kv_cache_dtype='int8'),
               'draft alone': Engine(draft_model, draft_params, slots=b, max_len=max_len,
                                     buckets=(PROMPT,))}
    for k in draft_tokens:
      engines[f'k={k}'] = Engine(model, params, slots=b, max_len=max_len, buckets=(PROMPT,),
                                 draft=(draft_model, draft_params), draft_tokens=k)
    times = {name: [] for name in engines}
    outputs = {name: _serve(e, requests)[1] for name, e in engines.items()}   # compiles
    for e in engines.values():
      e.stats = dict.fromkeys(e.stats, 0)
    for _ in range(ROUNDS):
      for name, e in engines.items():
        times[name].append(_serve(e, requests)[0])
    base = float(np.median(times['plain']))
    for name, e in engines.items():
      t = float(np.median(times[name]))
      rate = e.acceptance_rate()
      per_pass = 1 + e.stats['accepted'] / e.stats['slot_passes'] if e.stats['passes'] else 1.0
      same = sum(a == p for a, p in zip(outputs[name], outputs['plain']))
      n_tokens = len(requests) * n_steps
      cache = e.cache_bytes() + (0 if e.draft_cache is None else cache_bytes(e.draft_cache))
      rows.append(f'| {name} | {b} | {cache / 2**20:.3g} | '
                  f'{"" if rate is None else f"{100 * rate:.0f}%"} | '
                  f'{per_pass:.2f} | {1e3 * t / n_tokens:.3f} | {n_tokens / t:,.1f} | '
                  f'{base / t:.2f}x | {"" if name == "draft alone" else f"{same}/{len(requests)}"} |')
  cfg, dcfg = model.config, draft_model.config
  head = [f'Engine on {workdir} ({cfg.n_layers} layers x {cfg.d_model}, '
          f'{_count(params) / 1e6:.2f}M parameters) with draft {draft} ({dcfg.n_layers} x '
          f'{dcfg.d_model}, {_count(draft_params) / 1e6:.2f}M): {PROMPT}-token eval prompts, '
          f'{n_steps} greedy new tokens each for {len(requests)} requests, '
          f'{jax.devices()[0].device_kind} ({jax.default_backend()}), median of {ROUNDS} '
          f'alternating rounds; the last column counts the requests whose tokens equal the plain '
          f'engine\'s.', '',
          '| engine | slots | KV cache MiB | draft tokens kept | tokens per slot and pass '
          '| ms per token | tokens/s | vs plain | same tokens |',
          '|---|---|---|---|---|---|---|---|---|']
  chunks = ['', f'Target forward over a chunk of j tokens against a {max_len}-entry cache, '
            f'relative to one token (median of {CHUNK_REPEATS}):', '',
            '| batch | ' + ' | '.join(f'j={j}' for j in range(1, max(draft_tokens) + 2)) + ' |',
            '|---|' + '---|' * (max(draft_tokens) + 1)]
  for b in batch_sizes:
    ms = [chunk_ms(model, params, b, j, max_len) for j in range(1, max(draft_tokens) + 2)]
    chunks.append(f'| {b} | ' + ' | '.join(f'{m:.2f} ms ({m / ms[0]:.2f}x)' for m in ms) + ' |')
  return '\n'.join(head + rows + chunks) + '\n'


CHUNK_REPEATS = 30


def chunk_ms(model, params, batch: int, length: int, max_len: int) -> float:
  """Median ms of the target's forward over `length` new tokens per row against its cache."""
  fwd = jax.jit(lambda p, c, x, pos: model.apply({'params': p}, x, positions=pos,
                                                  segment_ids=jnp.ones_like(x), cache=c),
                donate_argnums=(1,))
  cache = init_cache(model.config, batch, max_len)
  x = jnp.ones((batch, length), jnp.int32)
  pos = jnp.broadcast_to(PROMPT + jnp.arange(length)[None, :], (batch, length))
  times = []
  for i in range(CHUNK_REPEATS + 1):
    t0 = time.perf_counter()
    logits, cache = fwd(params, cache, x, pos)
    jax.block_until_ready(logits)
    times.append(time.perf_counter() - t0)
  return 1e3 * float(np.median(times[1:]))   # the first call compiles


def _serve(engine, requests) -> tuple:
  """(seconds, tokens per request) of serving `requests` from an idle engine."""
  t0 = time.perf_counter()
  results = engine.run(requests)
  seconds = time.perf_counter() - t0
  engine.results.clear()   # the ids serve again in the next round
  return seconds, [results[r.id].tokens for r in requests]


def _count(params) -> int:
  return sum(x.size for x in jax.tree.leaves(params))
