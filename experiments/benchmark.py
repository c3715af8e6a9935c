"""Training throughput and memory: `python -m experiments.main --mode=benchmark --config=...`.

(`python -m experiments.benchmark --config=...gpt2.py:124m` is the same command.) Times the
train step, jitted on the config's mesh exactly as in training, on synthetic batches
of the config's shape (no data pipeline), and prints step time, tokens/s, model TFLOP/s (see
`models/flops.py`; MoE models count active parameters), MFU against the device's bf16
peak where known, and memory per device: the start-up estimate, XLA's figure for the compiled
step, and the measured peak where the backend reports it. `--remat=none,dots,full` compares
activation-checkpointing policies.
"""

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

import sharding
from experiments import memory, runtime, steps, validate
from experiments.errors import UserError
from models import Transformer, flops
from models.transformer import REMAT_POLICIES


def synthetic_batch(batch: int, seq_len: int, vocab: int, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, vocab, (batch, seq_len + 1), dtype=np.int32)
  return dict(inputs=tokens[:, :-1], targets=tokens[:, 1:],
              segment_ids=np.ones((batch, seq_len), np.int32),
              positions=np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch, seq_len)),
              weights=np.ones((batch, seq_len), np.float32))


@dataclasses.dataclass
class Result:
  device: str
  devices: int
  params: int
  active_params: int       # matmul weights a token runs through (MoE: router + k experts)
  compile_s: float
  step_s: float
  tokens_per_s: float
  tflops_per_s: float
  mfu: object              # None where the device's peak is unknown
  estimate: memory.Estimate
  compiled_bytes: object   # XLA's bytes per device, None where not reported
  peak_bytes: object       # measured peak per device, None where not reported


def benchmark(config, n_steps: int, vocab: int) -> Result:
  """Measures `config`'s train step on its mesh; `config.batch_size` rows of random tokens."""
  model = Transformer(steps.model_config(config, vocab))
  loss = steps.training_loss(model, config)   # low-precision dots, QAT, as the config says
  tx = steps.with_loss_state(steps.make_optimizer(config.optimizer, config.num_train_steps), loss)
  placement = runtime.Placement(config, model, tx, loss)
  est = memory.estimate(config, model, placement.abstract, placement.mesh, placement.rules)
  state = sharding.create_sharded(placement.init, placement.mesh, placement.rules, placement.rng)
  per_process = config.batch_size // jax.process_count()
  batch = placement.batch(synthetic_batch(per_process, config.data.seq_len, vocab,
                                          seed=jax.process_index()))
  token_bytes = jax.device_put(jnp.ones((vocab,), jnp.float32), placement.replicated)
  t0 = time.perf_counter()
  step = placement.compile_train_step(vocab)
  compile_s = time.perf_counter() - t0
  for _ in range(2):   # warm-up: first runs allocate
    state, metrics = step(state, batch, token_bytes)
  jax.block_until_ready(metrics)
  t0 = time.perf_counter()
  for _ in range(n_steps):
    state, metrics = step(state, batch, token_bytes)
  jax.block_until_ready(metrics)
  step_s = (time.perf_counter() - t0) / n_steps
  tokens_per_s = config.batch_size * config.data.seq_len / step_s
  flops_per_token = flops.train_flops_per_token(model.config, config.data.seq_len)
  peak = flops.device_peak_flops()
  stats = jax.local_devices()[0].memory_stats() or {}
  return Result(device=jax.devices()[0].device_kind, devices=jax.device_count(),
                params=flops.param_count(state.params),
                active_params=flops.matmul_params(model.config), compile_s=compile_s,
                step_s=step_s, tokens_per_s=tokens_per_s,
                tflops_per_s=tokens_per_s * flops_per_token / 1e12,
                mfu=tokens_per_s * flops_per_token / (peak * jax.device_count()) if peak else None,
                estimate=est, compiled_bytes=memory.compiled_bytes(step),
                peak_bytes=stats.get('peak_bytes_in_use'))


def _median_call_s(fn, args_fn, n_steps: int, warmup: int = 2) -> float:
  """Median wall seconds of `fn(*args_fn())`, each call waited for (after `warmup` calls)."""
  times = []
  for i in range(warmup + n_steps):
    args = args_fn()
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    if i >= warmup:
      times.append(time.perf_counter() - t0)
  return float(np.median(times))


def phase_timer(config, vocab: int):
  """Compiles the train step's phases on `config`'s mesh once; returns `measure(n_steps)`, which
  gives the median seconds of `forward` (the loss), `backward` (loss and gradients, less the
  forward), `optimizer` (clipping and the update, as a step of its own) and `step` (the whole
  jitted train step, as in training) over `n_steps` calls each."""
  model = Transformer(steps.model_config(config, vocab))
  placement = runtime.Placement(config, model,
                                steps.make_optimizer(config.optimizer, config.num_train_steps))
  state = sharding.create_sharded(placement.init, placement.mesh, placement.rules, placement.rng)
  batch = placement.batch(synthetic_batch(config.batch_size // jax.process_count(),
                                          config.data.seq_len, vocab, seed=jax.process_index()))
  token_bytes = jax.device_put(jnp.ones((vocab,), jnp.float32), placement.replicated)
  total = lambda params, b: placement.loss(params, b)[0]
  with placement.rules_scope():
    forward = jax.jit(total)
    grad = jax.jit(jax.value_and_grad(total))
    grads = grad(state.params, batch)[1]
    update = jax.jit(lambda s, g: s.apply_gradients(grads=g))
    step = placement.compile_train_step(vocab)
  holder = [sharding.create_sharded(placement.init, placement.mesh, placement.rules,
                                    placement.rng)]   # donated to the step, call after call

  def train(s):
    holder[0], metrics = step(s, batch, token_bytes)
    return metrics

  def measure(n_steps: int) -> dict:
    with placement.rules_scope():
      time = lambda fn, args: _median_call_s(fn, args, n_steps, warmup=1)
      out = dict(forward=time(forward, lambda: (state.params, batch)),
                 forward_backward=time(grad, lambda: (state.params, batch)),
                 optimizer=time(update, lambda: (state, grads)),
                 step=time(train, lambda: (holder[0],)))
    out['backward'] = out.pop('forward_backward') - out['forward']
    return out
  return measure


def report(config, r: Result) -> str:
  mfu = 'n/a (unknown peak)' if r.mfu is None else f'{100 * r.mfu:.1f}%'
  fmt = lambda n: 'n/a' if not n else memory.human_bytes(n)
  bubble = (f' | pipeline bubble {100 * r.estimate.bubble:.0f}% (MFU at most '
            f'{100 * (1 - r.estimate.bubble):.0f}% of the unpipelined)' if r.estimate.bubble else '')
  return (f'params {r.params / 1e6:.1f}M ({r.active_params / 1e6:.1f}M active matmul) | '
          f'remat {config.model.remat:13s} | compile {r.compile_s:5.1f} s | step '
          f'{1e3 * r.step_s:8.1f} ms | {r.tokens_per_s:10,.0f} tokens/s | '
          f'{r.tflops_per_s:6.2f} model TFLOP/s | MFU {mfu}{bubble} | memory/device: estimate '
          f'{fmt(r.estimate.total)}, compiled {fmt(r.compiled_bytes)}, measured peak '
          f'{fmt(r.peak_bytes)}')


def checked_vocab(config, n_steps: int, vocab_size: int) -> int:
  """Validates a timing run's config and flags; returns the vocabulary size to time with."""
  validate.check_kind(config, 'benchmark')
  validate.check_fields(config)
  validate.check_mesh(config)
  if n_steps <= 0:
    raise UserError(f'--steps={n_steps} must be a positive integer')
  if vocab_size < 0:
    raise UserError(f'--vocab_size={vocab_size} must be >= 0 (0: from the config)')
  return vocab_size or (259 if config.data.tokenizer == 'byte' else config.data.vocab_size)


def run(config, n_steps: int = 10, vocab_size: int = 0, remat=(), microbatches=()) -> list:
  """Validates, then benchmarks `config` once per remat policy (default: the config's) and
  number of microbatches (`grad_accum_steps`; default: the config's), printing a header and one
  line per pair as it goes; returns the `Result`s. With pipeline stages each line also gives
  the bubble formula's step time relative to the first line's."""
  vocab = checked_vocab(config, n_steps, vocab_size)
  policies = list(remat) or [config.model.remat]
  for policy in policies:
    if policy != 'none' and policy not in REMAT_POLICIES:
      raise UserError(f'--remat: {policy!r} is not one of none, {", ".join(REMAT_POLICIES)}')
  counts = list(microbatches) or [config.grad_accum_steps]
  for m in counts:   # each count must pass the same checks as the config's own
    if m <= 0:
      raise UserError(f'--microbatches: {m} must be a positive integer')
    with config.unlocked():
      config.grad_accum_steps = m
    validate.check_mesh(config)
  mesh = sharding.mesh_shape(config.mesh, jax.device_count())
  print(f'{jax.device_count()} x {jax.devices()[0].device_kind} | mesh '
        f'{" ".join(f"{k}={v}" for k, v in mesh.items() if v > 1) or "1 device"} | rules '
        f'{config.sharding_rules} | batch {config.batch_size} x {config.data.seq_len} | '
        f'{config.model.dtype} | scan_layers {config.model.scan_layers}')
  results = []
  for policy in policies:
    for m in counts:
      with config.unlocked():
        config.model.remat, config.grad_accum_steps = policy, m
      results.append(benchmark(config, n_steps, vocab))
      print(f'microbatches {m} | ' * bool(microbatches) + report(config, results[-1])
            + _against_the_bubble(results[-1], results[0]), flush=True)
  return results


def _against_the_bubble(r: Result, first: Result) -> str:
  """Measured step time against the bubble formula's, both relative to `first` (which ran the
  same work per step): a pipeline's step takes 1 / (1 - bubble) of its bubble-free time."""
  if not first.estimate.bubble and not r.estimate.bubble:
    return ''
  predicted = (1 - first.estimate.bubble) / (1 - r.estimate.bubble)
  return (f' | step / first: measured {r.step_s / first.step_s:.2f}, bubble formula '
          f'{predicted:.2f}')


if __name__ == '__main__':   # the benchmark runner of experiments/main.py under its old name
  from experiments import main as entry
  entry.start(mode='benchmark')
