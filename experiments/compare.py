"""Frugal's train step against the PyTorch peer, back to back on one machine.

`python -m experiments.main --mode=compare --config=experiments/configs/shakespeare.py` times the
phases of Frugal's jitted train step (see `benchmark.phase_timer`) and those of the same model in
PyTorch (`experiments/peer.py`: eager and under `torch.compile`), on batches of the config's
shape, in `ROUNDS` alternating rounds of `--steps` steps each, and prints one table with the
speed-up of Frugal's step over each peer. Run it on an idle machine: both sides share the cores.
"""

import jax
import numpy as np

from experiments import benchmark, peer, steps
from experiments.errors import UserError


def run(config, n_steps: int = 10, vocab_size: int = 0, peers=peer.MODES) -> str:
  """Measures and returns the comparison as a Markdown table (printed by the runner)."""
  vocab = benchmark.checked_vocab(config, n_steps, vocab_size)
  for mode in peers:
    if mode not in peer.MODES:
      raise UserError(f'--peers: {mode!r} is not one of {", ".join(peer.MODES)}')
  if jax.process_count() > 1:
    raise UserError('--mode=compare runs in one process (the peer is single-process)')
  model_config = steps.model_config(config, vocab)
  batch = benchmark.synthetic_batch(config.batch_size, config.data.seq_len, vocab)
  timers = [('Frugal, jax.jit', benchmark.phase_timer(config, vocab))]
  for mode in peers:
    try:
      timer = peer.train_step_timer(model_config, config.optimizer, batch, mode)
    except ValueError as e:
      raise UserError(str(e)) from None
    timers.append((f'PyTorch {timer.info["version"]}, {mode} ({timer.info["threads"]} '
                   f'threads)', timer))
  # Rounds alternate the implementations, so a machine that slows down or speeds up during the
  # run weighs on every side alike; each figure is the median over rounds.
  rounds = [[measure(n_steps) for _, measure in timers] for _ in range(ROUNDS)]
  rows = [(name, {k: float(np.median([r[i][k] for r in rounds])) for k in rounds[0][i]})
          for i, (name, _) in enumerate(timers)]
  return table(config, model_config, rows, n_steps)


ROUNDS = 3


def table(config, model_config, rows, n_steps: int) -> str:
  tokens = config.batch_size * config.data.seq_len
  ours = rows[0][1]['step']
  head = (f'{model_config.n_layers} layers x {model_config.d_model}, {model_config.n_heads} '
          f'heads, MLP {model_config.d_ff}, vocabulary {model_config.vocab_size}, batch '
          f'{config.batch_size} x {config.data.seq_len}, {model_config.dtype}, '
          f'{jax.device_count()} x {jax.devices()[0].device_kind}; medians of {n_steps} steps, '
          f'then over {ROUNDS} alternating rounds')
  lines = [head, '',
           '| implementation | forward | backward | optimizer | train step | tokens/s '
           '| Frugal step speed-up |',
           '|---|---|---|---|---|---|---|']
  for name, t in rows:
    ms = lambda k: f'{1e3 * t[k]:,.0f} ms'
    lines.append(f'| {name} | {ms("forward")} | {ms("backward")} | {ms("optimizer")} | '
                 f'{ms("step")} | {tokens / t["step"]:,.0f} | {t["step"] / ours:.2f}x |')
  return '\n'.join(lines)
