"""Decoding speed of float and quantized weights (`--mode=decode_benchmark`).

Times `models.decode.generate` (greedy, a short random prompt, `--steps` new tokens per row) for
the config's model with random weights, as float and as each quantized variant of
`--variants` (round-to-nearest specs of experiments/quantize.py, e.g. rtn:int8, rtn:int4:g128,
rtn:w8a8), at each batch size of `--batch_sizes`. Variants are timed in alternating rounds
(median over rounds), so a slow spell of the machine hits all of them alike. Decoding a batch
of a few rows reads every weight once per token: its speed is the weight bytes' speed.

  python -m experiments.main --mode=decode_benchmark --config=experiments/configs/shakespeare.py \
      --config.model.d_model=1024 --config.model.n_layers=8 --config.model.d_ff=4096 \
      --variants=float,rtn:int8,rtn:int4:g128 --batch_sizes=1,8 --steps=32
"""

import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from compression import quantize as quantize_lib
from experiments import benchmark, quantize, steps
from experiments.errors import UserError
from models import Transformer, decode

ROUNDS = 3
PROMPT = 8


def _tree(spec: str, model, params):
  if spec == 'float':
    return params
  v = quantize.parse_variant(spec)
  if v['method'] != 'rtn' or v['clip'] != 'minmax' or v['act'] == 'static':
    raise UserError(f'--variants: {spec!r} needs calibration data; the decode benchmark times '
                    f'random weights with round-to-nearest variants (rtn:...)')
  try:
    return quantize.apply_variant(v, model, params, calib=None)
  except ValueError as e:
    raise UserError(f'--variants: {spec!r}: {e}') from None


def run(config, n_steps: int, batch_sizes, variants, vocab_size: int = 0) -> str:
  """Times every variant at every batch size; returns a markdown table."""
  vocab = benchmark.checked_vocab(config, n_steps, vocab_size)
  if not variants or not batch_sizes or min(batch_sizes) < 1:
    raise UserError(f'--variants={",".join(variants)} and --batch_sizes='
                    f'{",".join(map(str, batch_sizes))} must be non-empty, sizes >= 1')
  model = Transformer(steps.model_config(config, vocab).replace(scan_layers=False))
  params = nn.meta.unbox(jax.jit(lambda k: model.init(
      k, jnp.zeros((1, PROMPT), jnp.int32))['params'])(jax.random.key(config.seed)))
  trees = {v: _tree(v, model, params) for v in variants}
  rng = np.random.default_rng(0)
  times = {(v, b): [] for v in variants for b in batch_sizes}
  for b in batch_sizes:
    prompts = rng.integers(1, vocab, (b, PROMPT)).tolist()
    gen = lambda tree: decode.generate(model, tree, prompts, max_new_tokens=n_steps).tokens
    for v in variants:   # compile and warm up
      jax.block_until_ready(gen(trees[v]))
    for _ in range(ROUNDS):
      for v in variants:
        t0 = time.perf_counter()
        jax.block_until_ready(gen(trees[v]))
        times[v, b].append(time.perf_counter() - t0)
  lines = [f'Decoding {n_steps} tokens after a {PROMPT}-token prompt, {model.config.n_layers} '
           f'layers x {model.config.d_model}, {_count(params) / 1e6:.0f}M parameters, '
           f'{jax.devices()[0].device_kind} ({jax.default_backend()}), median of {ROUNDS} '
           f'alternating rounds.', '',
           '| variant | weight MB | batch | ms per token step | tokens/s | vs float |',
           '|---|---|---|---|---|---|']
  for b in batch_sizes:
    base = np.median(times['float' if 'float' in variants else variants[0], b])
    for v in variants:
      t = float(np.median(times[v, b]))
      lines.append(f'| {v} | {quantize_lib.weight_bytes(trees[v]) / 2**20:,.1f} | {b} | '
                   f'{1e3 * t / n_steps:.2f} | {b * n_steps / t:,.1f} | {base / t:.2f}x |')
  return '\n'.join(lines) + '\n'


def _count(params) -> int:
  return sum(x.size for x in jax.tree.leaves(params))
