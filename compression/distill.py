"""Knowledge distillation: divergences between a teacher's and a student's next-token
distributions, and the per-token KD loss that mixes them with cross-entropy.

With p the teacher's and q the student's distribution at temperature T (softmax(logits / T)):
  forward_kl  KL(p || q) = sum p (log p - log q)   mass-covering (Hinton et al., 2015)
  reverse_kl  KL(q || p)                           mode-seeking (as in MiniLLM, Gu et al., 2024)
  jsd         beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q: the
              generalized Jensen-Shannon divergence of GKD (Agarwal et al., 2024)
and the loss per token is  alpha * T^2 * divergence + (1 - alpha) * CE(student, target)  (T^2
keeps the divergence's gradients the size of CE's as T grows, as Hinton et al. note).

Attention transfer (`attention`, as in MiniLM, Wang et al., 2020): a student layer's
attention probabilities learn a teacher layer's, by KL(teacher || student) over the keys of each
query row, averaged over heads (over the head-averaged maps where the head counts differ).

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
from typing import Any, Callable, NamedTuple, Optional, Tuple, Union

import jax
import jax.numpy as jnp

from models.transformer import attention_maps, block_outputs, capture_filter

DIVERGENCES = ('forward_kl', 'reverse_kl', 'jsd')


@dataclasses.dataclass(frozen=True)
class Spec:
  """How a student learns from a teacher: the mix, temperature and divergence."""
  alpha: float = 0.5          # weight of the divergence; 1 - alpha goes to cross-entropy
  temperature: float = 1.0
  divergence: str = 'forward_kl'
  beta: float = 0.5           # jsd's mixture weight of the teacher, in (0, 1)
  top_k: int = 0              # > 0: the teacher's k most likely ids only; 0: all
  # Hidden-state transfer: (student layer, teacher layer) pairs whose residual streams after
  # those layers are matched (through a learned projection where the widths differ), weighted
  # by `feature_weight` per pair on average.
  features: Tuple[Tuple[int, int], ...] = ()
  feature_weight: float = 0.0
  # Attention transfer: (student layer, teacher layer) pairs whose attention probabilities are
  # matched (`attention_losses`), weighted by `attention_weight` per pair on average. Both
  # models should mask alike (same sliding window): keys only the teacher sees cost a lot.
  attention: Tuple[Tuple[int, int], ...] = ()
  attention_weight: float = 0.0
  # Schedules: alpha and T move linearly from the values above at step 0 to these at
  # `schedule_steps`, then stay (None: constant).
  alpha_end: Optional[float] = None
  temperature_end: Optional[float] = None
  schedule_steps: int = 0


def check(spec: Spec):
  """One-line ValueErrors for fields outside what the loss is defined for."""
  if spec.divergence not in DIVERGENCES:
    raise ValueError(f'divergence={spec.divergence!r} is not one of {", ".join(DIVERGENCES)}')
  for name, ok, allowed in (
      ('alpha', _number(spec.alpha) and 0.0 <= spec.alpha <= 1.0, 'in [0, 1]'),
      ('temperature', _number(spec.temperature) and spec.temperature > 0, '> 0'),
      ('beta', _number(spec.beta) and 0.0 < spec.beta < 1.0, 'in (0, 1)'),
      ('top_k', isinstance(spec.top_k, int) and not isinstance(spec.top_k, bool)
       and spec.top_k >= 0, 'an integer >= 0 (0: the full distribution)'),
      ('feature_weight', _number(spec.feature_weight) and spec.feature_weight >= 0, '>= 0'),
      ('alpha_end', spec.alpha_end is None or (_number(spec.alpha_end) and
                                               0.0 <= spec.alpha_end <= 1.0), 'in [0, 1]'),
      ('temperature_end', spec.temperature_end is None or (
          _number(spec.temperature_end) and spec.temperature_end > 0), '> 0'),
      ('schedule_steps', _index(spec.schedule_steps) and (
          spec.schedule_steps > 0 or (spec.alpha_end is None and spec.temperature_end is None)),
       'an integer > 0 where alpha_end or temperature_end is set'),
      ('attention_weight', _number(spec.attention_weight) and spec.attention_weight >= 0,
       '>= 0'),
      ('features', _pairs(spec.features), 'pairs (student layer, teacher layer) of integers >= 0'),
      ('attention', _pairs(spec.attention),
       'pairs (student layer, teacher layer) of integers >= 0')):
    if not ok:
      raise ValueError(f'{name}={getattr(spec, name)!r} must be {allowed}')
  return spec


def check_layers(spec: Spec, student_layers: int, teacher_layers: int):
  """One-line ValueError for a layer pair outside either model."""
  for name in ('features', 'attention'):
    for i, j in getattr(spec, name):
      if i >= student_layers or j >= teacher_layers:
        raise ValueError(f'{name}: the pair ({i}, {j}) is outside the student\'s '
                         f'{student_layers} or the teacher\'s {teacher_layers} layers')
  return spec


def _pairs(x) -> bool:
  return isinstance(x, tuple) and all(
      isinstance(p, tuple) and len(p) == 2 and all(_index(i) for i in p) for p in x)


def _index(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool) and x >= 0


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


def scheduled(spec: Spec, step=None):
  """(alpha, T) at optimizer `step` (None: the starting values), moving linearly to
  `alpha_end` / `temperature_end` over `schedule_steps`."""
  if step is None or not spec.schedule_steps:
    return spec.alpha, spec.temperature
  frac = jnp.clip(jnp.asarray(step, jnp.float32) / spec.schedule_steps, 0.0, 1.0)
  move = lambda start, end: start if end is None else start + (end - start) * frac
  return move(spec.alpha, spec.alpha_end), move(spec.temperature, spec.temperature_end)


def token_losses(student_BxLxV, teacher: Teacher, targets_BxL, spec: Spec, step=None):
  """Per token [B, L]: (alpha T^2 D + (1 - alpha) CE, D, CE, student's top token == teacher's),
  alpha and T as scheduled at `step`."""
  alpha, temperature = scheduled(spec, step)
  logits = student_BxLxV.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  ce = lse - jnp.take_along_axis(logits, targets_BxL[..., None], axis=-1)[..., 0]
  kd = divergence(logits, teacher, spec.divergence, temperature, spec.beta)
  total = alpha * temperature ** 2 * kd + (1.0 - alpha) * ce
  best = teacher.ids[..., 0] if isinstance(teacher, TopK) else jnp.argmax(teacher, axis=-1)
  agree = (jnp.argmax(logits, axis=-1) == best).astype(jnp.float32)
  return total, kd, ce, agree


# ---- the loss of the training loop

TEACHER = 'distill_teacher'   # the entry of the loss's parameters holding the teacher's
PROJECTIONS = 'distill_proj'  # the learned student -> teacher width projections (trained)
OFFLINE = ('teacher_ids', 'teacher_logprobs')   # batch fields of offline top-k teacher logits


@dataclasses.dataclass(frozen=True)
class Loss:
  """The KD loss of `spec` for a student (`base`) and a `teacher` model; summed over tokens like
  `base`, with sums 'ce' (the student's own cross-entropy), 'kd' (the divergence), 'agree'
  (student's top token == teacher's), 'tokens', and 'feature' / 'attention' where those
  transfers are on. Frozen and hashable: a static jit argument.
  """
  # `base.forward(params, batch, rng, hidden=, attention=) -> (logits, router loss, router
  # metrics, hidden states[, attention maps])`, as `experiments.steps.LmLoss.forward`
  base: Callable
  teacher: Any     # the teacher's flax module (e.g. a `models.Transformer`)
  spec: Spec

  @property
  def model(self):
    return self.base.model

  def __call__(self, params, batch, rng=None):
    student = self.model_params(params)
    features, attention = bool(self.spec.features), bool(self.spec.attention)
    # `attention=` only when asked: a base without attention maps keeps working without it.
    out = self.base.forward(student, batch, rng, hidden=features,
                            **(dict(attention=True) if attention else {}))
    logits, router, metrics, hidden = out[:4]
    teacher_out = self.teacher_outputs(params.get(TEACHER), batch, features, attention)
    teacher, teacher_hidden = teacher_out[:2]
    if not isinstance(teacher, TopK) and teacher.shape[-1] != logits.shape[-1]:
      raise ValueError(f'the teacher scores {teacher.shape[-1]} tokens and the student '
                       f'{logits.shape[-1]}: they need one vocabulary')
    step = batch.get('step')   # the optimizer step (`experiments.steps.train_step` adds it)
    total, kd, ce, agree = token_losses(logits, teacher, batch['targets'], self.spec, step)
    z_loss = getattr(self.base, 'z_loss', 0.0)
    if z_loss:
      total = total + z_loss * jnp.square(jax.nn.logsumexp(logits.astype(jnp.float32), -1))
    w = batch['weights']
    tokens = jnp.sum(w)
    sums = dict(ce=jnp.sum(ce * w), kd=jnp.sum(kd * w), agree=jnp.sum(agree * w), tokens=tokens)
    if self.spec.schedule_steps:   # logged as the step's alpha and temperature
      alpha, temperature = scheduled(self.spec, step)
      sums.update(kd_alpha=tokens * alpha, kd_temperature=tokens * temperature)
    if features:
      feat = feature_losses(hidden, teacher_hidden, self.spec.features, params.get(PROJECTIONS))
      total = total + self.spec.feature_weight * feat
      sums['feature'] = jnp.sum(feat * w)
    if attention:
      att = attention_losses(out[4], teacher_out[2], self.spec.attention)
      total = total + self.spec.attention_weight * att
      sums['attention'] = jnp.sum(att * w)
    sums.update({k: tokens * v for k, v in metrics.items()})
    return jnp.sum(total * w) + tokens * router, sums

  def teacher_outputs(self, teacher_params, batch, hidden: bool = False,
                      attention: bool = False):
    """(the teacher's logits of `batch` (its top k with `spec.top_k`) or the batch's offline
    top k, its residual streams after each layer if `hidden` else None), plus its attention
    maps per layer as a third element if `attention`; never differentiated."""
    if all(k in batch for k in OFFLINE) and not (hidden or attention):
      return TopK(batch['teacher_ids'], jax.lax.stop_gradient(batch['teacher_logprobs'])), None
    if teacher_params is None:
      if attention:
        raise ValueError(f'attention transfer needs the teacher model: pass its parameters as '
                         f'the step\'s frozen {{{TEACHER!r}: params}} (offline top-k batches '
                         f'carry no attention maps)')
      raise ValueError(f'no teacher: pass its parameters as the step\'s frozen {{{TEACHER!r}: '
                       f'params}} or batches with {" and ".join(OFFLINE)}')
    inputs = dict(positions=batch['positions'], segment_ids=batch['segment_ids'])
    capture = capture_filter(hidden, attention)
    out = self.teacher.apply(
        {'params': jax.lax.stop_gradient(teacher_params)}, batch['inputs'], **inputs,
        **(dict(capture_intermediates=capture, mutable=['intermediates']) if capture else {}))
    logits, state = out if capture else (out, None)
    logits = jax.lax.stop_gradient(logits)
    logits = top_k(logits, self.spec.top_k) if self.spec.top_k else logits
    cfg = self.teacher.config
    states = (jax.lax.stop_gradient(block_outputs(state['intermediates'], cfg)) if hidden
              else None)
    if not attention:
      return logits, states
    return logits, states, jax.lax.stop_gradient(
        attention_maps(state['intermediates'], cfg, **inputs))

  def model_params(self, params):
    """The student's own parameters (without the teacher and the projections)."""
    return {k: v for k, v in params.items() if k not in (TEACHER, PROJECTIONS)}

  def init_params(self, params):
    """The student's parameters plus the projections it trains where widths differ."""
    d_s, d_t = self.model.config.d_model, self.teacher.config.d_model
    if not self.spec.features or d_s == d_t or PROJECTIONS in params:
      return params
    proj = {f'{i}_{j}': {'w': jax.random.normal(jax.random.fold_in(jax.random.key(0), n),
                                                (d_s, d_t)) / math.sqrt(d_s)}
            for n, (i, j) in enumerate(self.spec.features)}
    return dict(params, **{PROJECTIONS: proj})


def feature_losses(student_hidden, teacher_hidden, pairs, projections=None):
  """Per token [B, L]: the mean over `pairs` (i, j) of |h_s[i] P_ij - h_t[j]|^2 / |h_t[j]|^2,
  P_ij the learned projection where the widths differ (else none): a scale-free squared error."""
  out = 0.0
  for i, j in pairs:
    s, t = student_hidden[i].astype(jnp.float32), teacher_hidden[j].astype(jnp.float32)
    if s.shape[-1] != t.shape[-1]:
      if projections is None:
        raise ValueError(f'features ({i}, {j}): widths {s.shape[-1]} and {t.shape[-1]} differ '
                         f'and there is no projection (the loss\'s init_params adds them)')
      s = s @ projections[f'{i}_{j}']['w'].astype(jnp.float32)
    err = jnp.sum(jnp.square(s - t), axis=-1)
    out = out + err / jnp.maximum(jnp.sum(jnp.square(t), axis=-1), 1e-12)
  return out / max(len(pairs), 1)


def attention_losses(student_maps, teacher_maps, pairs):
  """Per token [B, L]: the mean over `pairs` (i, j) of KL(teacher map j || student map i) over
  the keys of each query row, averaged over heads. Maps are [B, N, L, S] probabilities; where
  the head counts differ, the head-averaged maps (still distributions) are compared instead.
  Masked keys (probability 0 for the teacher) add 0; a student probability of 0 where the
  teacher's is not counts as the smallest float32 normal (a large finite term)."""
  out = 0.0
  for i, j in pairs:
    s_BxNxLxS = student_maps[i].astype(jnp.float32)
    t_BxNxLxS = teacher_maps[j].astype(jnp.float32)
    if s_BxNxLxS.shape[1] != t_BxNxLxS.shape[1]:
      s_BxNxLxS = jnp.mean(s_BxNxLxS, axis=1, keepdims=True)
      t_BxNxLxS = jnp.mean(t_BxNxLxS, axis=1, keepdims=True)
    seen = t_BxNxLxS > 0
    # Safe logs on both sides of the where: an unselected log(0) would still put NaN in the
    # gradient.
    log_t = jnp.log(jnp.where(seen, t_BxNxLxS, 1.0))
    log_s = jnp.log(jnp.maximum(s_BxNxLxS, jnp.finfo(jnp.float32).tiny))
    kl_BxNxL = jnp.sum(jnp.where(seen, t_BxNxLxS * (log_t - log_s), 0.0), axis=-1)
    out = out + jnp.mean(kl_BxNxL, axis=1)
  return out / max(len(pairs), 1)


def loss(base: Callable, teacher, spec: Spec) -> Loss:
  """The distillation loss of a student's `base` loss and a `teacher` module (spec checked)."""
  check(spec)
  if spec.features or spec.attention:
    check_layers(spec, base.model.config.n_layers, teacher.config.n_layers)
  return Loss(base, teacher, spec)
