"""Pure training and evaluation steps: model, optimizer, loss, `train_step`, `eval_step`.

The loss is injected (a loss factory, as in nanodo): `train_step(state, batch, token_bytes,
loss=...)` only calls the loss it is handed. `lm_loss(model, z_loss)` is the language-model loss;
distillation or quantization-aware training (`qat_loss`) plug in as other factories returning
a hashable `loss(params, batch, rng) -> (summed total, sums)`, not as new steps. A loss that
trains parameters of its own (QAT's learned scales) adds them to the model's with
`loss.init_params(params)`, which `state_init_fn` calls.
"""

import dataclasses
import functools
import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import traverse_util
from flax.training import train_state

from compression import distill, early_exit, low_precision, qat, schedules
from compression.early_exit import token_losses   # the one cross-entropy, shared with the exits
from models import ModelConfig, Transformer, layouts, moe
from models.transformer import attention_maps, block_outputs, capture_filter, output_logits
from sharding import pipeline

TrainState = train_state.TrainState


def model_config(config, vocab_size: int) -> ModelConfig:
  """The `ModelConfig` named by `config.model`, with the tokenizer's vocabulary size.

  A run derived from another model (e.g. a Hugging Face checkpoint whose embedding table is
  padded past the tokenizer's ids) sets `config.model.vocab_size`, which then wins.
  """
  fields = config.model.to_dict()
  return ModelConfig(**dict(fields, vocab_size=fields.get('vocab_size') or vocab_size))


def learning_rate_schedule(opt, num_steps: int):
  """Linear warmup to `opt.learning_rate`, then cosine or linear decay to `end_lr_factor` of it."""
  warmup = max(1, min(opt.warmup_steps, num_steps))
  decay = max(1, num_steps - warmup)
  end = opt.learning_rate * opt.end_lr_factor
  if opt.schedule == 'cosine':
    tail = optax.cosine_decay_schedule(opt.learning_rate, decay, alpha=opt.end_lr_factor)
  else:
    tail = optax.linear_schedule(opt.learning_rate, end, decay)
  return optax.join_schedules([optax.linear_schedule(0.0, opt.learning_rate, warmup), tail],
                              [warmup])


def decay_mask(params):
  """Weight decay on matmul kernels only: not on norms, biases, embedding tables, QAT scales or
  low-precision amax histories."""
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict(
      {k: k[-1] == 'kernel' and k[0] not in (qat.SCALES, low_precision.HISTORY) for k in flat})


def make_optimizer(opt, num_steps: int, pruning=None,
                   model_config=None) -> optax.GradientTransformation:
  """AdamW with clipping; with `pruning.final_sparsity > 0`, gradual magnitude pruning on top
  (of the matmul weights of `model_config`)."""
  tx = optax.chain(
      optax.clip_by_global_norm(opt.grad_clip),
      optax.adamw(learning_rate_schedule(opt, num_steps), b1=opt.b1, b2=opt.b2, eps=opt.eps,
                  weight_decay=opt.weight_decay, mask=decay_mask))
  if pruning is not None and pruning.final_sparsity > 0:
    tx = schedules.gradual(tx, pruning.final_sparsity, pruning.start_step,
                           pruning.end_step or num_steps, pruning.every,
                           include=pruning.include or None,
                           layouts=layouts.of_config(model_config))
  return tx


def state_init_fn(model: Transformer, tx, seq_len: int, loss=None):
  """`rng -> TrainState` with boxed (logically named) params, for `sharding.create_sharded`;
  with the parameters `loss` trains besides the model's (`loss.init_params`), if it has any."""
  def init(rng):
    params = model.init(rng, jnp.zeros((1, seq_len), jnp.int32))['params']
    if hasattr(loss, 'init_params'):
      params = loss.init_params(params)
    return TrainState.create(apply_fn=model.apply, params=params, tx=tx)
  return init


def init_state(model: Transformer, tx, seed: int, seq_len: int, loss=None) -> TrainState:
  """An unsharded train state on the default device (tests, benchmarks)."""
  return nn.meta.unbox(state_init_fn(model, tx, seq_len, loss)(jax.random.key(seed)))


@dataclasses.dataclass(frozen=True)
class LmLoss:
  """Next-token cross-entropy, `z_loss` * logsumexp^2 and the MoE router losses of `model`.

  `loss(params, batch, rng) -> (total, sums)`: summed over tokens (not averaged), so
  microbatches combine exactly into one large batch. `sums` holds 'ce', 'z' and 'tokens', and
  for MoE models the router statistics of `moe.METRICS`, token-weighted like the losses. The
  router losses (`moe.router_loss`) count once per token in `total`. `rng` drives router jitter
  where the model has it (None: no jitter). Frozen and hashable: a static argument of jit.
  """
  model: Transformer
  z_loss: float = 0.0

  def forward(self, params, batch, rng=None, hidden: bool = False, attention: bool = False):
    """(logits [B, L, V], the router loss per token, the router metrics, the residual stream
    after each layer if `hidden` else None) of `batch`: what a loss built on this one
    (distillation) reads of the model. With `attention`, a fifth element: each layer's
    attention probabilities [B, N, L, L] (`models.transformer.attention_maps`)."""
    cfg = self.model.config
    inputs = dict(positions=batch['positions'], segment_ids=batch['segment_ids'])
    rngs = {'jitter': rng} if rng is not None and cfg.router_jitter > 0 else {}
    capture = hidden or attention
    mutable = (['moe'] if cfg.n_experts else []) + (['intermediates'] if capture else [])
    if not mutable:
      return self.model.apply({'params': params}, batch['inputs'], **inputs), 0.0, {}, None
    logits, state = self.model.apply(
        {'params': params}, batch['inputs'], mutable=mutable, rngs=rngs,
        capture_intermediates=capture_filter(hidden, attention), **inputs)
    router, metrics = moe.router_loss(state['moe'], cfg) if cfg.n_experts else (0.0, {})
    states = block_outputs(state['intermediates'], cfg) if hidden else None
    if not attention:
      return logits, router, metrics, states
    return logits, router, metrics, states, attention_maps(state['intermediates'], cfg, **inputs)

  def __call__(self, params, batch, rng=None):
    logits, router, metrics, _ = self.forward(params, batch, rng)
    return self.totals(logits, router, metrics, batch)

  def totals(self, logits, router, metrics, batch):
    """(total, sums) of `forward`'s outputs on `batch`: what `__call__` returns, for losses
    that add terms to it (early exit) without a second forward pass."""
    ce, z = token_losses(logits, batch['targets'], self.z_loss)
    w = batch['weights']
    tokens = jnp.sum(w)
    total = jnp.sum((ce + z) * w)
    sums = dict(ce=jnp.sum(ce * w), z=jnp.sum(z * w), tokens=tokens)
    if metrics:
      total += tokens * router
      sums.update({k: tokens * v for k, v in metrics.items()})
    return total, sums


@dataclasses.dataclass(frozen=True)
class PipelinedLmLoss:
  """`base` (an `LmLoss`) over all of a step's microbatches in one call, the blocks pipelined
  over the `stage` mesh axis (`sharding.pipeline`); the sums equal `base`'s summed over the
  microbatches `schedule.microbatches` cuts (rows i, i + M, ...), as accumulation cuts them.
  The train step runs it with accum_steps=1: the pipeline is the microbatch loop."""
  base: LmLoss
  schedule: pipeline.Schedule

  def __call__(self, params, batch, rng=None):
    del rng   # router jitter is refused with a pipeline (pipeline.check)
    model, m = self.base.model, self.schedule.microbatches
    cfg = model.config
    x_BxLxD, state = model.apply(
        {'params': params}, batch['inputs'], positions=batch['positions'],
        segment_ids=batch['segment_ids'], mutable=['moe'],
        layers_fn=pipeline.layers_fn(cfg, self.schedule, params))

    # The head and the loss a microbatch at a time, rematerialised: one microbatch's logits
    # live at once, as under gradient accumulation, not the whole batch's.
    @jax.checkpoint
    def head(carry, mb):
      ce, z = token_losses(output_logits(cfg, params, mb['x']), mb['targets'],
                           self.base.z_loss)
      w = mb['weights']
      return jax.tree.map(jnp.add, carry, (jnp.sum((ce + z) * w), jnp.sum(ce * w),
                                           jnp.sum(z * w))), None

    micro = {k: pipeline.microbatched(v, m) for k, v in
             dict(x=x_BxLxD, targets=batch['targets'], weights=batch['weights']).items()}
    (total, ce, z), _ = jax.lax.scan(head, (jnp.float32(0),) * 3, micro)
    tokens = jnp.sum(micro['weights'], axis=(1, 2))
    sums = dict(ce=ce, z=z, tokens=jnp.sum(tokens))
    if cfg.n_experts:   # the router losses of each microbatch, weighted by its tokens
      stats = state['moe']['pipeline'][0]   # {name: [M, R, ...]}
      router, metrics = jax.vmap(lambda st: moe.router_loss({'stats': st}, cfg))(stats)
      weigh = lambda v: jnp.tensordot(tokens, v, axes=1)   # sum over m of tokens[m] * v[m]
      total += weigh(router)
      sums.update({k: weigh(v) for k, v in metrics.items()})
    return total, sums


def pipelined(loss, config, mesh) -> tuple:
  """(the loss the train step runs, its accum_steps) on `mesh`: `loss` and
  config.grad_accum_steps without pipeline stages; with them, `PipelinedLmLoss` and 1.

  Raises:
    ValueError: in one line, for a loss other than the language-model loss, or a model or
      schedule the pipeline cannot run (`pipeline.check`).
  """
  stages = pipeline.stages_of(mesh)
  if stages == 1:
    return loss, config.grad_accum_steps
  if type(loss) is not LmLoss:
    raise ValueError(f'mesh.stage={stages} pipelines the language-model loss only, not '
                     f'{type(loss).__name__} (distillation, QAT, early exit and low-precision '
                     f'training run without pipeline stages)')
  schedule = pipeline.schedule_of(config.pipeline, stages, config.grad_accum_steps)
  pipeline.check(loss.model.config, schedule)
  return PipelinedLmLoss(loss, schedule), 1


def lm_loss(model: Transformer, z_loss: float = 0.0) -> LmLoss:
  """The language-model loss factory: the default loss of `train_step` and `eval_step`."""
  return LmLoss(model, float(z_loss))


def qat_spec(config) -> Optional[qat.Spec]:
  """The `compression.qat.Spec` of `config.qat`, or None when QAT is off (bits 0, no section)."""
  q = config.get('qat')
  if q is None or not q.bits:
    return None
  return qat.Spec(bits=q.bits, group_size=q.group_size, symmetric=q.symmetric, ranges=q.ranges,
                  clip=q.clip, act_bits=q.act_bits, include=q.include or None)


def qat_loss(model: Transformer, config, base=None) -> qat.Loss:
  """Quantization-aware training as `config.qat` says, around `base` (default: the LM loss)."""
  base = base if base is not None else lm_loss(model, config.optimizer.z_loss)
  return qat.loss(base, qat_spec(config), model)


def low_precision_spec(config) -> Optional[low_precision.Spec]:
  """The `compression.low_precision.Spec` of `config.low_precision`, or None when it is off."""
  lp = config.get('low_precision')
  if lp is None or not lp.format:
    return None
  return low_precision.Spec(format=lp.format, backward=lp.backward, scaling=lp.scaling,
                            history=lp.history, include=lp.include or None)


def exit_layers(text: str) -> tuple:
  """The layer indices of `config.early_exit.layers` ('0,2': exits after layers 0 and 2)."""
  return tuple(int(x) for x in text.split(',')) if text else ()


def training_loss(model: Transformer, config, base=None):
  """The loss a run of `config` trains: `base` (default: the LM loss), with early-exit heads
  trained beside it (`config.early_exit`), quantization-aware (`config.qat`) or with
  low-precision dots (`config.low_precision`) as the config says."""
  base = base if base is not None else lm_loss(model, config.optimizer.z_loss)
  ee = config.get('early_exit')
  if ee is not None and ee.layers:
    base = early_exit.loss(base, early_exit.Spec(exit_layers(ee.layers), ee.weight))
  if qat_spec(config) is not None:
    return qat_loss(model, config, base)
  spec = low_precision_spec(config)
  return low_precision.loss(base, spec, model) if spec is not None else base


def with_loss_state(tx: optax.GradientTransformation, loss) -> optax.GradientTransformation:
  """`tx`, with the state a loss keeps among the parameters (delayed fp8 scaling's amax
  histories) updated beside it, out of its reach."""
  if isinstance(loss, low_precision.Loss) and loss.spec.scaling == 'delayed':
    return low_precision.split_optimizer(tx)
  return tx


def served_params(loss, params):
  """The tree the model runs for evaluation and sampling: the fake-quantized one of a QAT loss,
  the float model without a low-precision loss's histories, else `params`."""
  return loss.model_params(params) if hasattr(loss, 'model_params') else params


def model_only(params):
  """`params` without the entries a loss trains or keeps besides the model's own."""
  return {k: v for k, v in params.items()
          if k not in (qat.SCALES, low_precision.HISTORY, distill.PROJECTIONS)}


@functools.partial(jax.jit, static_argnames=('loss', 'accum_steps', 'seed'), donate_argnums=0)
def train_step(state: TrainState, batch, token_bytes, frozen=None, *, loss, accum_steps: int,
               seed: int = 0):
  """One optimizer step on `batch`, split into `accum_steps` microbatches whose grads are summed.

  `loss(params, batch, rng) -> (total, sums)` is summed over tokens (see `LmLoss`): `sums`
  holds 'tokens' (the normaliser), 'ce' (reported as `loss` and `bits_per_byte`) and any other
  terms, each reported divided by the tokens ('z' as `z_loss`). `frozen` ({entry: tree}, e.g. a
  distillation teacher's parameters) joins the parameters the loss sees, outside the gradient,
  the optimizer and the checkpoints.
  """
  def loss_fn(params, mb, rng):
    return loss(params if frozen is None else dict(params, **frozen), mb, rng)

  grad_fn = jax.grad(loss_fn, has_aux=True)
  step_rng = jax.random.fold_in(jax.random.key(seed), state.step)

  def microbatch(mb, i):
    # The loss sees the optimizer step (scheduled losses: distillation's alpha and T).
    g, s = grad_fn(state.params, dict(mb, step=state.step), jax.random.fold_in(step_rng, i))
    s['bytes'] = jnp.sum(token_bytes[mb['targets']] * mb['weights'])
    return g, s

  if accum_steps == 1:   # no loop: a one-step scan would keep XLA from overlapping its ops
    grads, sums = microbatch(batch, 0)
  else:
    # Microbatch i takes rows i, i + accum, ...: every microbatch draws from every device's
    # shard of the batch, so accumulation needs no data movement.
    micro = jax.tree.map(
        lambda x: x.reshape((-1, accum_steps) + x.shape[1:]).swapaxes(0, 1), batch)

    def accumulate(carry, mb_and_index):
      g, s = microbatch(*mb_and_index)
      return jax.tree.map(jnp.add, carry, (g, s)), None

    first = jax.tree.map(lambda x: x[0], micro)
    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype),
                         jax.eval_shape(lambda: microbatch(first, 0)))
    (grads, sums), _ = jax.lax.scan(accumulate, zeros, (micro, jnp.arange(accum_steps)))
  n = jnp.maximum(sums['tokens'], 1.0)
  grads = jax.tree.map(lambda g: g / n, grads)
  grad_norm = optax.tree.norm(grads)
  # A step whose loss or gradients are not finite is not applied: parameters and optimizer
  # state stay as they were (only the step count advances), so no NaN ever reaches them. The
  # flag travels with the metrics; the host decides whether to go on (train.py).
  finite = jnp.isfinite(grad_norm)
  for v in jax.tree.leaves(sums):
    finite &= jnp.all(jnp.isfinite(v))
  updated = state.apply_gradients(grads=grads)
  state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), updated, state).replace(
      step=updated.step)
  metrics = dict(loss=sums['ce'] / n, grad_norm=grad_norm,
                 bits_per_byte=sums['ce'] / math.log(2) / jnp.maximum(sums['bytes'], 1.0),
                 tokens=sums['tokens'], finite=finite)
  metrics.update({_METRIC_NAMES.get(k, k): v / n for k, v in sums.items()
                  if k not in ('ce', 'tokens', 'bytes')})
  return state, metrics


# How a summed term is named among the step's metrics.
_METRIC_NAMES = dict(z='z_loss', kd='kd_loss', agree='teacher_agreement', feature='feature_loss',
                     attention='attention_loss')


@functools.partial(jax.jit, static_argnames=('loss',))
def eval_step(params, batch, token_bytes, *, loss):
  """Summed losses (`loss`'s sums: 'ce', 'tokens', ...) and the byte count of one batch."""
  _, sums = loss(params, batch, None)
  sums['bytes'] = jnp.sum(token_bytes[batch['targets']] * batch['weights'])
  return sums


def summarize_eval(sums) -> dict:
  tokens, ce = max(float(sums['tokens']), 1.0), float(sums['ce'])
  return dict(loss=ce / tokens, tokens=tokens, perplexity=math.exp(min(ce / tokens, 50.0)),
              bits_per_byte=ce / math.log(2) / max(float(sums['bytes']), 1.0),
              nats_per_byte=ce / max(float(sums['bytes']), 1.0))
