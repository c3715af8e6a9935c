"""Decoding speed of float and quantized weights (`--mode=decode_benchmark`).

Times `models.decode.generate` (greedy, a short random prompt, `--steps` new tokens per row) for
the config's model with random weights, as float and as each quantized variant of
`--variants` (round-to-nearest specs of experiments/quantize.py, e.g. rtn:int8, rtn:int4:g128,
rtn:w8a8), at each batch size of `--batch_sizes`. Two more variants serve the float weights
otherwise: `engine` (the serving engine, `experiments/engine.py`, with one slot per row;
`engine:<n>` with n decode steps per call) and
`transformers` (the model exported with `models.hf.save_pretrained` and decoded by Hugging
Face `generate`, greedy, in torch on the CPU: a test dependency). Variants are timed in
alternating rounds (median over rounds), so a slow spell of the machine hits all of them alike,
and each one's tokens are compared with float `generate`'s. Decoding a batch of a few rows
reads every weight once per token: its speed is the weight bytes' speed, and the table's
roofline is the float weights' bytes over the machine's read bandwidth (measured in the same
run by summing a large array). A second floor, timed in the same rounds, is the model's weight
products alone (`products`): what the backend's matrix products cost, whatever else a step does.

  python -m experiments.main --mode=decode_benchmark --config=experiments/configs/shakespeare.py \
      --config.model.d_model=1024 --config.model.n_layers=8 --config.model.d_ff=4096 \
      --variants=float,rtn:int8,rtn:int4:g128 --batch_sizes=1,8 --steps=32
"""

import functools
import tempfile
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from compression import quantize as quantize_lib
from experiments import benchmark, quantize, steps
from experiments.errors import UserError
from experiments.engine import Engine
from experiments.requests import Request
from models import Transformer, decode, hf, layers

ROUNDS = 5
PROMPT = 8
PRODUCTS = 'weight products alone'


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


def _served(v: str) -> bool:
  """Whether variant `v` serves the float weights another way (engine[:n], transformers)."""
  return v in ('engine', 'transformers') or v.startswith('engine:')


def read_bandwidth(n_bytes: int = 1 << 29, repeats: int = 5) -> float:
  """Bytes per second this machine reads: the best of `repeats` jitted sums of a large array."""
  x = jnp.ones((n_bytes // 4,), jnp.float32)
  total = jax.jit(jnp.sum)
  jax.block_until_ready(total(x))
  best = float('inf')
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(total(x))
    best = min(best, time.perf_counter() - t0)
  return n_bytes / best


# One decode step's weight products in a dense block, in the order the block runs them: each
# group reads the previous group's output, and a group's products are independent of each other.
_GROUPS = (('attn', ('query', 'key', 'value'), 1), ('attn', ('out',), 2),
           ('mlp', ('gate', 'up'), 1), ('mlp', ('down',), 1))


def products(model, params, batch: int, n_steps: int):
  """A function decoding nothing that runs `n_steps` steps of the model's weight products
  alone, for `batch` rows: every block's kernels and the output head through the seam
  (`models.layers.dot`), with the block's order and independence, in one jitted loop as
  `generate` runs its steps. No norms, attention, cache or sampling: its time is what the
  backend's products cost, the floor of a decode step. None for MoE blocks."""
  cfg = model.config
  if cfg.n_experts or cfg.scan_layers:
    return None
  dtype = jnp.dtype(cfg.dtype)

  def join(main, others):   # main, made to depend on the others at the cost of one add
    for o in others:
      main = main + o.reshape(o.shape[0], -1)[:, :1].reshape((-1,) + (1,) * (main.ndim - 1))
    return main

  def one_step(p, i, x_BxD):
    x = x_BxD
    for layer in range(cfg.n_layers):
      block = p[f'blocks_{layer % cfg.n_unique_layers}']
      for module, names, n_contract in _GROUPS:
        outs = [layers.dot(x, block[module][n]['kernel'], n_contract, dtype)
                for n in names if n in block[module]]
        x = join(outs[0], outs[1:])
    head = (layers.dot(x, p['embed']['embedding'], 1, dtype, transpose_w=True)
            if cfg.tie_embeddings else layers.dot(x, p['lm_head']['kernel'], 1, dtype))
    return x_BxD + 1e-30 * jnp.max(head, axis=-1, keepdims=True)

  run = jax.jit(lambda p, x: jax.lax.fori_loop(0, n_steps, functools.partial(one_step, p), x))
  x = jnp.ones((batch, cfg.d_model), dtype)
  return lambda: run(params, x)


def _engine_gen(model, params, prompts, n_steps, per_call: int = 1):
  engine = Engine(model, params, slots=len(prompts), max_len=PROMPT + n_steps,
                  buckets=(PROMPT,), steps_per_call=per_call)
  requests = [Request(prompt=p, max_new_tokens=n_steps, id=str(i)) for i, p in enumerate(prompts)]

  def gen():
    results = engine.run(requests)
    engine.results.clear()
    return np.array([results[str(i)].tokens for i in range(len(prompts))])
  return gen


def _transformers_gen(path, prompts, n_steps):
  import torch          # test dependencies: imported only when this variant is asked for
  import transformers
  hf = transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
  ids = torch.tensor(prompts, dtype=torch.long)

  def gen():
    with torch.no_grad():
      out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_steps,
                        min_new_tokens=n_steps, do_sample=False, pad_token_id=0)
    return out[:, PROMPT:].numpy()
  return gen


def run(config, n_steps: int, batch_sizes, variants, vocab_size: int = 0) -> str:
  """Times every variant at every batch size; returns a markdown table."""
  vocab = benchmark.checked_vocab(config, n_steps, vocab_size)
  if not variants or not batch_sizes or min(batch_sizes) < 1:
    raise UserError(f'--variants={",".join(variants)} and --batch_sizes='
                    f'{",".join(map(str, batch_sizes))} must be non-empty, sizes >= 1')
  model = Transformer(steps.model_config(config, vocab).replace(scan_layers=False))
  params = nn.meta.unbox(jax.jit(lambda k: model.init(
      k, jnp.zeros((1, PROMPT), jnp.int32))['params'])(jax.random.key(config.seed)))
  for v in variants:
    if v.startswith('engine:') and not (v[7:].isdigit() and int(v[7:]) >= 1):
      raise UserError(f'--variants: {v!r} must be engine:<steps per call >= 1>')
  trees = {v: params if _served(v) else _tree(v, model, params) for v in variants}
  tmp = tempfile.TemporaryDirectory() if 'transformers' in variants else None
  if tmp is not None:
    hf.save_pretrained(model, params, tmp.name)
  rng = np.random.default_rng(0)
  times = {(v, b): [] for v in variants for b in batch_sizes}
  same = {}
  for b in batch_sizes:
    prompts = rng.integers(1, vocab, (b, PROMPT)).tolist()
    gens = {}
    for v in variants:
      if v == 'engine' or v.startswith('engine:'):
        gens[v] = _engine_gen(model, params, prompts, n_steps, int(v[7:] or 1))
      elif v == 'transformers':
        gens[v] = _transformers_gen(tmp.name, prompts, n_steps)
      else:
        gens[v] = functools.partial(
            lambda tree: np.asarray(decode.generate(model, tree, prompts,
                                                    max_new_tokens=n_steps).tokens), trees[v])
    reference = np.asarray(decode.generate(model, params, prompts, max_new_tokens=n_steps).tokens)
    for v in variants:   # compile and warm up
      same[v, b] = int(np.sum(np.all(np.asarray(gens[v]()) == reference, axis=1)))
    floor = products(model, params, b, n_steps)
    if floor is not None:
      jax.block_until_ready(floor())
      gens[PRODUCTS], times[PRODUCTS, b] = floor, []
    for _ in range(ROUNDS):
      for v, gen in gens.items():
        t0 = time.perf_counter()
        jax.block_until_ready(gen())
        times[v, b].append(time.perf_counter() - t0)
  if tmp is not None:
    tmp.cleanup()
  bandwidth = read_bandwidth()
  float_bytes = quantize_lib.weight_bytes(params)
  lines = [f'Decoding {n_steps} tokens after a {PROMPT}-token prompt, {model.config.n_layers} '
           f'layers x {model.config.d_model}, {_count(params) / 1e6:.0f}M parameters, '
           f'{jax.devices()[0].device_kind} ({jax.default_backend()}), median of {ROUNDS} '
           f'alternating rounds. Read bandwidth {bandwidth / 1e9:.1f} GB/s: reading the float '
           f'weights once per step allows at most {bandwidth / float_bytes:,.1f} steps/s '
           f'(the roofline).', '',
           '| variant | weight MB | batch | ms per token step | tokens/s | vs float | of roofline '
           '| of products alone | same tokens as float |', '|---|---|---|---|---|---|---|---|---|']
  for b in batch_sizes:
    base = np.median(times['float' if 'float' in variants else variants[0], b])
    floor = np.median(times[PRODUCTS, b]) if (PRODUCTS, b) in times else None
    for v in list(variants) + ([PRODUCTS] if floor is not None else []):
      t = float(np.median(times[v, b]))
      roofline = (n_steps / t) / (bandwidth / float_bytes)
      weights = quantize_lib.weight_bytes(trees.get(v, params)) / 2**20
      lines.append(f'| {v} | {weights:,.1f} | {b} | {1e3 * t / n_steps:.2f} | '
                   f'{b * n_steps / t:,.1f} | {base / t:.2f}x | {100 * roofline:.0f}% | '
                   + (f'{100 * floor / t:.0f}% | ' if floor is not None else '| ')
                   + (f'{same[v, b]}/{b} |' if v != PRODUCTS else '|'))
  if any(v == PRODUCTS for v, _ in times):
    lines += ['', f'"{PRODUCTS}": the float model\'s weight products for one step each, in the '
              f'blocks\' order and nothing else (`products`), timed in the same rounds; a '
              f'decode step cannot be faster than they are on this backend.']
  return '\n'.join(lines) + '\n'


def _count(params) -> int:
  return sum(x.size for x in jax.tree.leaves(params))
