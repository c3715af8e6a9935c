"""Knowledge distillation: divergences between a teacher's and a student's next-token
distributions, and the per-token KD loss that mixes them with cross-entropy.

With p the teacher's and q the student's distribution at temperature T (softmax(logits / T)):
  forward_kl  KL(p || q) = sum p (log p - log q)   mass-covering (Hinton et al., 2015)
  reverse_kl  KL(q || p)                           mode-seeking (as in MiniLLM, Gu et al., 2024)
  jsd         beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q: the
              generalized Jensen-Shannon divergence of GKD (Agarwal et al., 2024)
and the loss per token is  alpha * T^2 * divergence + (1 - alpha) * CE(student, target)  (T^2
keeps the divergence's gradients the size of CE's as T grows, as Hinton et al. note).

Top-k teachers (`top_k`): the teacher's k most likely ids with their log-probabilities at T = 1,
what an offline pass stores for a large vocabulary. The divergence is then taken between the
two distributions restricted to those k ids, each renormalised over them (the teacher's
log-probabilities divided by T; the student's logits at those ids); with k = V it is the full
divergence. Nothing here sees parameters: the losses that run the teacher and student models
build on these functions.

`Loss` is distillation as a loss of the one training loop: the student's LM loss (`base`, e.g.
`experiments.steps.LmLoss`, read through its `forward`) and a teacher model whose parameters
arrive among the loss's parameters under `TEACHER` (the training step's `frozen` input: no
gradient, no optimizer state, no checkpoint), or a batch carrying the teacher's top-k
(`teacher_ids`, `teacher_logprobs`, computed offline). Quantization-aware training and
low-precision matmuls wrap it like any loss and touch only the student's weights.
"""

import dataclasses
import math
from typing import Any, Callable, NamedTuple, Union

import jax
import jax.numpy as jnp

DIVERGENCES = ('forward_kl', 'reverse_kl', 'jsd')


@dataclasses.dataclass(frozen=True)
class Spec:
  """How a student learns from a teacher: the mix, temperature and divergence."""
  alpha: float = 0.5          # weight of the divergence; 1 - alpha goes to cross-entropy
  temperature: float = 1.0
  divergence: str = 'forward_kl'
  beta: float = 0.5           # jsd's mixture weight of the teacher, in (0, 1)
  top_k: int = 0              # > 0: the teacher's k most likely ids only; 0: all


def check(spec: Spec):
  """One-line ValueErrors for fields outside what the loss is defined for."""
  if spec.divergence not in DIVERGENCES:
    raise ValueError(f'divergence={spec.divergence!r} is not one of {", ".join(DIVERGENCES)}')
  for name, ok, allowed in (
      ('alpha', _number(spec.alpha) and 0.0 <= spec.alpha <= 1.0, 'in [0, 1]'),
      ('temperature', _number(spec.temperature) and spec.temperature > 0, '> 0'),
      ('beta', _number(spec.beta) and 0.0 < spec.beta < 1.0, 'in (0, 1)'),
      ('top_k', isinstance(spec.top_k, int) and not isinstance(spec.top_k, bool)
       and spec.top_k >= 0, 'an integer >= 0 (0: the full distribution)')):
    if not ok:
      raise ValueError(f'{name}={getattr(spec, name)!r} must be {allowed}')
  return spec


def _number(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


class TopK(NamedTuple):
  """A teacher's k most likely next tokens: ids [..., k] (int32), log-probs [..., k] (T = 1)."""
  ids: jax.Array
  logprobs: jax.Array


Teacher = Union[jax.Array, TopK]   # full logits [..., V], or its top k


def top_k(logits_BxLxV, k: int) -> TopK:
  """The teacher's `k` most likely ids and their log-probabilities under its full softmax."""
  logprobs = jax.nn.log_softmax(logits_BxLxV.astype(jnp.float32), axis=-1)
  values, ids = jax.lax.top_k(logprobs, k)
  return TopK(ids.astype(jnp.int32), values)


def log_distributions(student_BxLxV, teacher: Teacher, temperature: float):
  """(log p teacher, log q student) at `temperature`, over the vocabulary or the teacher's top k."""
  s = student_BxLxV.astype(jnp.float32)
  if isinstance(teacher, TopK):
    s = jnp.take_along_axis(s, teacher.ids, axis=-1)
    t = teacher.logprobs.astype(jnp.float32)
  else:
    t = teacher.astype(jnp.float32)
  return (jax.nn.log_softmax(t / temperature, axis=-1),
          jax.nn.log_softmax(s / temperature, axis=-1))


def divergence(student_BxLxV, teacher: Teacher, kind: str = 'forward_kl',
               temperature: float = 1.0, beta: float = 0.5):
  """The divergence `kind` per token [B, L] between teacher and student at `temperature`."""
  logp, logq = log_distributions(student_BxLxV, teacher, temperature)
  p, q = jnp.exp(logp), jnp.exp(logq)
  if kind == 'forward_kl':
    return jnp.sum(p * (logp - logq), axis=-1)
  if kind == 'reverse_kl':
    return jnp.sum(q * (logq - logp), axis=-1)
  if kind == 'jsd':
    logm = jnp.logaddexp(math.log(beta) + logp, math.log1p(-beta) + logq)
    return (beta * jnp.sum(p * (logp - logm), axis=-1)
            + (1.0 - beta) * jnp.sum(q * (logq - logm), axis=-1))
  raise ValueError(f'divergence={kind!r} is not one of {", ".join(DIVERGENCES)}')


def token_losses(student_BxLxV, teacher: Teacher, targets_BxL, spec: Spec):
  """Per token [B, L]: (alpha T^2 D + (1 - alpha) CE, D, CE, student's top token == teacher's)."""
  logits = student_BxLxV.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  ce = lse - jnp.take_along_axis(logits, targets_BxL[..., None], axis=-1)[..., 0]
  kd = divergence(logits, teacher, spec.divergence, spec.temperature, spec.beta)
  total = spec.alpha * spec.temperature ** 2 * kd + (1.0 - spec.alpha) * ce
  best = teacher.ids[..., 0] if isinstance(teacher, TopK) else jnp.argmax(teacher, axis=-1)
  agree = (jnp.argmax(logits, axis=-1) == best).astype(jnp.float32)
  return total, kd, ce, agree


# ---- the loss of the training loop

TEACHER = 'distill_teacher'   # the entry of the loss's parameters holding the teacher's
OFFLINE = ('teacher_ids', 'teacher_logprobs')   # batch fields of offline top-k teacher logits


@dataclasses.dataclass(frozen=True)
class Loss:
  """The KD loss of `spec` for a student (`base`) and a `teacher` model; summed over tokens like
  `base`, with sums 'ce' (the student's own cross-entropy), 'kd' (the divergence), 'agree'
  (student's top token == teacher's) and 'tokens'. Frozen and hashable: a static jit argument.
  """
  base: Callable   # `base.forward(params, batch, rng) -> (logits, router loss, router metrics)`
  teacher: Any     # the teacher's flax module (e.g. a `models.Transformer`)
  spec: Spec

  @property
  def model(self):
    return self.base.model

  def __call__(self, params, batch, rng=None):
    student = {k: v for k, v in params.items() if k != TEACHER}
    logits, router, metrics = self.base.forward(student, batch, rng)
    teacher = self.teacher_distribution(params.get(TEACHER), batch)
    if not isinstance(teacher, TopK) and teacher.shape[-1] != logits.shape[-1]:
      raise ValueError(f'the teacher scores {teacher.shape[-1]} tokens and the student '
                       f'{logits.shape[-1]}: they need one vocabulary')
    total, kd, ce, agree = token_losses(logits, teacher, batch['targets'], self.spec)
    z_loss = getattr(self.base, 'z_loss', 0.0)
    if z_loss:
      total = total + z_loss * jnp.square(jax.nn.logsumexp(logits.astype(jnp.float32), -1))
    w = batch['weights']
    tokens = jnp.sum(w)
    sums = dict(ce=jnp.sum(ce * w), kd=jnp.sum(kd * w), agree=jnp.sum(agree * w), tokens=tokens)
    sums.update({k: tokens * v for k, v in metrics.items()})
    return jnp.sum(total * w) + tokens * router, sums

  def teacher_distribution(self, teacher_params, batch) -> Teacher:
    """The teacher's logits of `batch` (its top k with `spec.top_k`), or the batch's offline
    top k; never differentiated."""
    if all(k in batch for k in OFFLINE):
      return TopK(batch['teacher_ids'], jax.lax.stop_gradient(batch['teacher_logprobs']))
    if teacher_params is None:
      raise ValueError(f'no teacher: pass its parameters as the step\'s frozen {{{TEACHER!r}: '
                       f'params}} or batches with {" and ".join(OFFLINE)}')
    logits = self.teacher.apply({'params': jax.lax.stop_gradient(teacher_params)},
                                batch['inputs'], positions=batch['positions'],
                                segment_ids=batch['segment_ids'])
    logits = jax.lax.stop_gradient(logits)
    return top_k(logits, self.spec.top_k) if self.spec.top_k else logits


def loss(base: Callable, teacher, spec: Spec) -> Loss:
  """The distillation loss of a student's `base` loss and a `teacher` module (spec checked)."""
  return Loss(base, teacher, check(spec))
