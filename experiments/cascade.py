"""Request-level early exit: a cascade from a small model to the full one
(`--mode=cascade_benchmark`).

Every request is first served by the small model (`--draft`, e.g. a distilled student) through
the engine. Its answer is then scored by the small model itself in one forward pass: the
request's confidence is the mean top probability the small model gave its own tokens. Requests
below the threshold are escalated: served again by the full model, whose answer replaces the
small one. The thresholds are 0 (never escalate), the QUANTILES of the small model's confidence
on these requests (escalating about that share) and above 1 (always: the full model alone);
for each it reports the share escalated, tokens/s over the whole cascade (small model, scoring and
escalations), the requests whose answer equals the full model's, and the full model's mean
negative log-likelihood of the answers given (nats per token: how far they are from what it
would say itself).

  python -m experiments.main --mode=cascade_benchmark --config=experiments/configs/shakespeare.py \
      --workdir=runs/shakespeare --draft=runs/draft/students/L1-scratch-kd --slots=8 --steps=32
"""

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments import data, runtime, serve, validate
from experiments.engine import Engine
from experiments.errors import UserError
from experiments.requests import Request
from models.decode import pad_prompts

QUANTILES = (0.25, 0.5, 0.75)   # thresholds at these quantiles of the small model's confidence
REQUESTS = 64
ROUNDS = 3
PROMPT = 16


@functools.partial(jax.jit, static_argnames=('model',))
def _scores(params, tokens, seg, pos, *, model):
  """Per position: the model's top probability and its log-probability of the next token."""
  logp = jax.nn.log_softmax(model.apply({'params': params}, tokens, positions=pos,
                                        segment_ids=seg), axis=-1)
  nxt = jnp.take_along_axis(logp[:, :-1], tokens[:, 1:, None], axis=-1)[..., 0]
  return jnp.exp(jnp.max(logp[:, :-1], axis=-1)), nxt


def score(model, params, prompts, answers, pad_id: int) -> tuple:
  """(mean top probability, mean log-probability) the model gives each answer after its prompt."""
  rows = [list(p) + list(a) for p, a in zip(prompts, answers)]
  tokens, seg, pos = pad_prompts(rows, pad_id)
  top, logp = jax.device_get(_scores(params, tokens, seg, pos, model=model))
  conf, ll = [], []
  for i, a in enumerate(answers):
    # Position t predicts token t + 1: the answer's tokens are the row's last len(a).
    conf.append(float(np.mean(top[i, -len(a):])))
    ll.append(float(np.mean(logp[i, -len(a):])))
  return np.array(conf), np.array(ll)


def run(config, workdir, draft: str, slots: int, n_steps: int) -> str:
  """The cascade table of the run in `workdir` with the small model `draft`; markdown."""
  if not draft:
    raise UserError('--mode=cascade_benchmark needs --draft (the small model\'s workdir)')
  if slots < 1 or n_steps < 1:
    raise UserError(f'--slots={slots} and --steps={n_steps} must be at least 1')
  validate.check(config, workdir, 'sample')
  _, model, tokenizer, params, _ = runtime.load_served(config, workdir)
  small, small_params = serve.load_draft(draft, tokenizer)
  rows = np.asarray(data.eval_batches(config.data, tokenizer, batch_size=REQUESTS,
                                      max_batches=1)[0]['inputs'])
  prompts = [r[:PROMPT].tolist() for r in rows[:REQUESTS]]
  max_len = PROMPT + n_steps + 8
  engines = {name: Engine(m, p, slots=slots, max_len=max_len, buckets=(PROMPT,),
                          pad_id=tokenizer.pad_id)
             for name, (m, p) in (('full', (model, params)), ('small', (small, small_params)))}

  def serve_all(name, chosen):
    engine = engines[name]
    results = engine.run([Request(prompt=prompts[i], max_new_tokens=n_steps, id=str(i))
                          for i in chosen])
    engine.results.clear()
    return {int(rid): r.tokens for rid, r in results.items()}

  def cascade(threshold):
    answers = serve_all('small', range(len(prompts))) if threshold <= 1 else {}
    up = list(range(len(prompts)))
    if answers:
      conf, _ = score(small, small_params, prompts, [answers[i] for i in up], tokenizer.pad_id)
      up = [i for i in up if conf[i] < threshold]
    answers.update(serve_all('full', up) if up else {})
    return answers, len(up)

  small_answers = serve_all('small', range(len(prompts)))     # also compiles the small side
  conf, _ = score(small, small_params, prompts, [small_answers[i] for i in range(len(prompts))],
                  tokenizer.pad_id)
  thresholds = (0.0,) + tuple(float(np.quantile(conf, q)) for q in QUANTILES) + (1.01,)
  full, _ = cascade(thresholds[-1])                            # compiles the full side
  lines = [f'Cascade on {workdir} ({model.config.n_layers} layers) from {draft} '
           f'({small.config.n_layers} layers): {len(prompts)} eval prompts of {PROMPT} tokens, '
           f'{n_steps} greedy new tokens each, {slots} slots, {jax.devices()[0].device_kind} '
           f'({jax.default_backend()}), median of {ROUNDS} runs. Confidence: the small '
           f'model\'s mean top probability over its answer (thresholds: 0, its '
           f'{", ".join(f"{q:g}" for q in QUANTILES)} quantiles on these requests, and above '
           f'1); full-model NLL: the full model\'s mean negative log-likelihood of the answers '
           f'given, nats per token.', '',
           '| threshold | escalated | tokens/s | vs full alone | answers equal to full | '
           'full-model NLL |', '|---|---|---|---|---|---|']
  measured = []
  for threshold in thresholds:
    times = []
    for _ in range(ROUNDS):
      t0 = time.perf_counter()
      answers, up = cascade(threshold)
      times.append(time.perf_counter() - t0)
    rate = len(prompts) * n_steps / float(np.median(times))
    _, ll = score(model, params, prompts, [answers[i] for i in range(len(prompts))],
                  tokenizer.pad_id)
    same = sum(answers[i] == full[i] for i in range(len(prompts)))
    measured.append((threshold, up, rate, same, -float(np.mean(ll))))
  alone = measured[-1][2]   # the last threshold escalates everything: the full model alone
  for threshold, up, rate, same, nll in measured:
    name = 'full alone' if threshold > 1 else f'{threshold:.3f}'
    lines.append(f'| {name} | {up}/{len(prompts)} | {rate:,.0f} | {rate / alone:.2f}x | '
                 f'{same}/{len(prompts)} | {nll:.3f} |')
  return '\n'.join(lines) + '\n'
