"""Training throughput: `python -m experiments.benchmark --config=experiments/configs/gpt2.py:124m`.

Times the jitted train step on synthetic batches of the config's shape (no data pipeline) and
prints step time, tokens/s, model TFLOP/s (see `experiments/flops.py` for the formula), MFU
against the device's bf16 peak where known, and peak device memory where the backend reports it.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from experiments import flops, steps
from models import Transformer

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file.', lock_config=True)
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed steps (after one compile + warmup step).')
_VOCAB = flags.DEFINE_integer('vocab_size', 0, 'Vocabulary (0: 259 bytes, or data.vocab_size '
                              'for SentencePiece).')
flags.mark_flags_as_required(['config'])


def synthetic_batch(batch: int, seq_len: int, vocab: int, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, vocab, (batch, seq_len + 1), dtype=np.int32)
  return dict(inputs=tokens[:, :-1], targets=tokens[:, 1:],
              segment_ids=np.ones((batch, seq_len), np.int32),
              positions=np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch, seq_len)),
              weights=np.ones((batch, seq_len), np.float32))


def benchmark(config, n_steps: int, vocab: int) -> dict:
  """Returns the measured figures for `config`'s model, batch and sequence length."""
  model = Transformer(steps.model_config(config, vocab))
  tx = steps.make_optimizer(config.optimizer, config.num_train_steps)
  state = steps.init_state(model, tx, config.seed, config.data.seq_len)
  batch = jax.device_put(synthetic_batch(config.batch_size, config.data.seq_len, vocab))
  token_bytes = jnp.ones((vocab,), jnp.float32)
  run = lambda s: steps.train_step(s, batch, token_bytes, model=model,
                                   accum_steps=config.grad_accum_steps,
                                   z_loss=config.optimizer.z_loss)
  t0 = time.perf_counter()
  state, metrics = run(state)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - t0
  state, metrics = run(state)
  jax.block_until_ready(metrics)
  t0 = time.perf_counter()
  for _ in range(n_steps):
    state, metrics = run(state)
  jax.block_until_ready(metrics)
  step_s = (time.perf_counter() - t0) / n_steps
  tokens_per_s = config.batch_size * config.data.seq_len / step_s
  flops_per_token = flops.train_flops_per_token(model.config, config.data.seq_len)
  peak = flops.device_peak_flops()
  stats = jax.devices()[0].memory_stats() or {}
  return dict(device=jax.devices()[0].device_kind, params=flops.param_count(state.params),
              compile_s=compile_s, step_s=step_s, tokens_per_s=tokens_per_s,
              tflops_per_s=tokens_per_s * flops_per_token / 1e12,
              mfu=tokens_per_s * flops_per_token / peak if peak else None,
              peak_memory_gib=stats.get('peak_bytes_in_use', 0) / 2**30 or None)


def main(argv):
  del argv
  config = _CONFIG.value
  vocab = _VOCAB.value or (259 if config.data.tokenizer == 'byte' else config.data.vocab_size)
  r = benchmark(config, _STEPS.value, vocab)
  print(f"device {r['device']} | params {r['params']:,} | batch {config.batch_size} x "
        f"{config.data.seq_len} | {config.model.dtype} | remat {config.model.remat}")
  mfu = 'n/a (unknown peak)' if r['mfu'] is None else f"{100 * r['mfu']:.1f}%"
  memory = 'n/a' if r['peak_memory_gib'] is None else f"{r['peak_memory_gib']:.2f} GiB"
  print(f"compile {r['compile_s']:.1f} s | step {1e3 * r['step_s']:.1f} ms | "
        f"{r['tokens_per_s']:,.0f} tokens/s | {r['tflops_per_s']:.2f} model TFLOP/s | "
        f"MFU {mfu} | peak memory {memory}")

if __name__ == '__main__':
  app.run(main)
