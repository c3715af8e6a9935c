"""What token-level early exit buys a run trained with exits (`--mode=exit_benchmark`).

For each threshold of THRESHOLDS (1.0: never exit, the full model) on the run's exits
(`config.early_exit.layers`): greedy decoding of `--steps` new tokens after `PROMPT`-token
eval prompts (`models.early_exit.generate`, for each batch size of `--batch_sizes`; a batch exits
only when all its rows are confident), reporting the mean layers used, tokens/s (median of
ROUNDS runs after one that compiles) and the share of tokens equal to the full model's at the
same place; and the validation nats/byte with each token scored at its exit layer
(teacher-forced: a cheap estimate, since earlier tokens keep their full-depth states).

  python -m experiments.main --mode=exit_benchmark --config=experiments/configs/shakespeare.py:exits \
      --workdir=runs/exits --batch_sizes=1,8 --steps=64
"""

import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments import data, runtime, steps, validate
from experiments.errors import UserError
from experiments.serve_benchmark import PROMPT, prompts
from models import early_exit

THRESHOLDS = (1.0, 0.9, 0.8, 0.6, 0.4, 0.2, 0.0)
ROUNDS = 3


def run(config, workdir, batch_sizes, n_steps: int) -> str:
  """The threshold table of the run in `workdir`; returns markdown."""
  exits = steps.exit_layers(config.early_exit.layers)
  if not exits:
    raise UserError('--mode=exit_benchmark needs a run trained with exits '
                    '(config.early_exit.layers, e.g. shakespeare.py:exits)')
  if not batch_sizes or min(batch_sizes) < 1 or n_steps < 2:
    raise UserError(f'--batch_sizes={",".join(map(str, batch_sizes))} must be integers >= 1 '
                    f'and --steps={n_steps} at least 2')
  validate.check(config, workdir, 'sample')
  _, model, tokenizer, params, _ = runtime.load_served(config, workdir)
  cfg = model.config
  quality = _exit_quality(config, model, params, tokenizer, exits)
  rows = []
  chosen = prompts(config, tokenizer, max(batch_sizes))
  for b in batch_sizes:
    groups = [chosen[i:i + b] for i in range(0, len(chosen), b)]
    full = None
    for threshold in THRESHOLDS:
      gen = lambda: [early_exit.generate(model, params, g, max_new_tokens=n_steps, exits=exits,
                                         threshold=threshold, pad_id=tokenizer.pad_id)
                     for g in groups]
      out = gen()   # compiles
      times = []
      for _ in range(ROUNDS):
        t0 = time.perf_counter()
        gen()
        times.append(time.perf_counter() - t0)
      tokens = [row for toks, _ in out for row in toks]
      used = [u for _, us in out for u in us]
      full = tokens if full is None else full
      same = np.mean([a == f for t, ft in zip(tokens, full) for a, f in zip(t, ft)])
      t = float(np.median(times))
      rows.append(f'| {threshold:g} | {b} | {np.mean(used):.2f} | '
                  f'{len(chosen) * n_steps / t:,.1f} | {100 * same:.1f}% | '
                  f'{quality[threshold][0]:.4f} | {quality[threshold][1]:.2f} |')
  head = [f'Early exit on {workdir} ({cfg.n_layers} layers x {cfg.d_model}; exits after layers '
          f'{", ".join(str(e + 1) for e in exits)}): {len(chosen)} eval prompts of {PROMPT} '
          f'tokens, {n_steps} greedy new tokens each, '
          f'{jax.devices()[0].device_kind} ({jax.default_backend()}), median of {ROUNDS} runs. '
          'Agreement: tokens equal to the full model\'s (threshold 1) at the same place. '
          'Validation: teacher-forced, each token scored at its exit.', '',
          '| threshold | batch | mean layers (decode) | tokens/s | agreement | validation '
          'nats/byte | mean layers (validation) |', '|---|---|---|---|---|---|---|']
  return '\n'.join(head + rows) + '\n'


def _exit_quality(config, model, params, tokenizer, exits) -> dict:
  """{threshold: (validation nats per byte, mean layers)} with teacher-forced exits."""
  cfg = model.config
  token_bytes = jnp.asarray(tokenizer.token_bytes, jnp.float32)
  batches = data.eval_batches(config.data, tokenizer, batch_size=config.eval_batch_size,
                              max_batches=config.eval_batches or None)
  base = steps.lm_loss(model)

  @jax.jit
  def sums(batch):
    logits, _, _, hidden = base.forward(params, batch, hidden=True)
    w, out = batch['weights'], {}
    for threshold in THRESHOLDS:
      chosen, used = early_exit.exit_logits(cfg, params, hidden, logits, exits, threshold)
      ce, _ = steps.token_losses(chosen, batch['targets'], 0.0)
      out[threshold] = (jnp.sum(ce * w), jnp.sum(used * w))
    return out, jnp.sum(token_bytes[batch['targets']] * w), jnp.sum(w)

  total = {t: [0.0, 0.0] for t in THRESHOLDS}
  n_bytes = n_tokens = 0.0
  for batch in batches:
    per, nb, nt = jax.device_get(sums(jax.tree.map(jnp.asarray, batch)))
    n_bytes, n_tokens = n_bytes + nb, n_tokens + nt
    for t in THRESHOLDS:
      total[t][0] += per[t][0]
      total[t][1] += per[t][1]
  return {t: (ce / n_bytes, layers / n_tokens) for t, (ce, layers) in total.items()}
