"""Pure training and evaluation steps: model, optimizer, loss, `train_step`, `eval_step`."""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import traverse_util
from flax.training import train_state

from compression import schedules
from models import ModelConfig, Transformer, moe

MOE_METRICS = ('moe_aux_loss', 'moe_z_loss', 'router_entropy', 'dropped', 'expert_load',
               'expert_load_per_layer')

TrainState = train_state.TrainState


def model_config(config, vocab_size: int) -> ModelConfig:
  """The `ModelConfig` named by `config.model`, with the tokenizer's vocabulary size."""
  return ModelConfig(**dict(config.model.to_dict(), vocab_size=vocab_size))


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
  """Weight decay on matmul kernels only: not on norms, biases or embedding tables."""
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict({k: k[-1] == 'kernel' for k in flat})


def make_optimizer(opt, num_steps: int, pruning=None) -> optax.GradientTransformation:
  """AdamW with clipping; with `pruning.final_sparsity > 0`, gradual magnitude pruning on top."""
  tx = optax.chain(
      optax.clip_by_global_norm(opt.grad_clip),
      optax.adamw(learning_rate_schedule(opt, num_steps), b1=opt.b1, b2=opt.b2, eps=opt.eps,
                  weight_decay=opt.weight_decay, mask=decay_mask))
  if pruning is not None and pruning.final_sparsity > 0:
    tx = schedules.gradual(tx, pruning.final_sparsity, pruning.start_step,
                           pruning.end_step or num_steps, pruning.every,
                           include=pruning.include or None)
  return tx


def state_init_fn(model: Transformer, tx, seq_len: int):
  """`rng -> TrainState` with boxed (logically named) params, for `sharding.create_sharded`."""
  def init(rng):
    params = model.init(rng, jnp.zeros((1, seq_len), jnp.int32))['params']
    return TrainState.create(apply_fn=model.apply, params=params, tx=tx)
  return init


def init_state(model: Transformer, tx, seed: int, seq_len: int) -> TrainState:
  """An unsharded train state on the default device (tests, benchmarks)."""
  return nn.meta.unbox(state_init_fn(model, tx, seq_len)(jax.random.key(seed)))


def token_losses(logits_BxLxV, targets_BxL, z_loss: float):
  """Cross-entropy per token and the z-loss term z_loss * logsumexp^2."""
  lse_BxL = jax.nn.logsumexp(logits_BxLxV, axis=-1)
  target_logit_BxL = jnp.take_along_axis(logits_BxLxV, targets_BxL[..., None], axis=-1)[..., 0]
  ce_BxL = lse_BxL - target_logit_BxL
  return ce_BxL, z_loss * jnp.square(lse_BxL)


def loss_sums(params, model, batch, z_loss: float, rng=None):
  """Summed (not averaged) losses, so microbatches combine exactly into one large batch.

  MoE models add their router losses (`router_aux_weight`, `router_z_weight`, per token) and
  report router statistics, token-weighted like the losses: moe_aux_loss, moe_z_loss,
  router_entropy, dropped (fraction of assignments), expert_load [E], expert_load_per_layer.
  `rng` drives router jitter where the model has it.
  """
  cfg = model.config
  inputs = dict(positions=batch['positions'], segment_ids=batch['segment_ids'])
  stats = {}
  if cfg.n_experts:
    rngs = {'jitter': rng} if rng is not None and cfg.router_jitter > 0 else {}
    logits, state = model.apply({'params': params}, batch['inputs'], mutable=['moe'], rngs=rngs,
                                **inputs)
    stats = moe.summarize(state['moe'])
  else:
    logits = model.apply({'params': params}, batch['inputs'], **inputs)
  ce, z = token_losses(logits, batch['targets'], z_loss)
  w = batch['weights']
  tokens = jnp.sum(w)
  total = jnp.sum((ce + z) * w)
  sums = dict(ce=jnp.sum(ce * w), z=jnp.sum(z * w), tokens=tokens)
  if stats:
    total += tokens * (cfg.router_aux_weight * stats['aux_loss'] +
                       cfg.router_z_weight * stats['z_loss'])
    sums.update(moe_aux_loss=stats['aux_loss'], moe_z_loss=stats['z_loss'],
                router_entropy=stats['entropy'], dropped=stats['dropped'],
                expert_load=stats['load'], expert_load_per_layer=stats['load_per_layer'])
    sums.update({k: tokens * v for k, v in sums.items() if k not in ('ce', 'z', 'tokens')})
  return total, sums


@functools.partial(jax.jit, static_argnames=('model', 'accum_steps', 'z_loss', 'seed'),
                   donate_argnums=0)
def train_step(state: TrainState, batch, token_bytes, *, model, accum_steps: int, z_loss: float,
               seed: int = 0):
  """One optimizer step on `batch`, split into `accum_steps` microbatches whose grads are summed."""
  # Microbatch i takes rows i, i + accum, ...: every microbatch draws from every device's shard
  # of the batch, so accumulation needs no data movement.
  micro = jax.tree.map(
      lambda x: x.reshape((-1, accum_steps) + x.shape[1:]).swapaxes(0, 1), batch)
  grad_fn = jax.grad(loss_sums, has_aux=True)
  step_rng = jax.random.fold_in(jax.random.key(seed), state.step)

  def accumulate(carry, mb_and_index):
    mb, i = mb_and_index
    grads, sums = carry
    g, s = grad_fn(state.params, model, mb, z_loss, jax.random.fold_in(step_rng, i))
    s['bytes'] = jnp.sum(token_bytes[mb['targets']] * mb['weights'])
    return (jax.tree.map(jnp.add, grads, g), jax.tree.map(jnp.add, sums, s)), None

  first = jax.tree.map(lambda x: x[0], micro)
  shapes = jax.eval_shape(lambda: grad_fn(state.params, model, first, z_loss, step_rng)[1])
  zero_sums = dict(jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes), bytes=0.0)
  zeros = (jax.tree.map(jnp.zeros_like, state.params), zero_sums)
  (grads, sums), _ = jax.lax.scan(accumulate, zeros, (micro, jnp.arange(accum_steps)))
  n = jnp.maximum(sums['tokens'], 1.0)
  grads = jax.tree.map(lambda g: g / n, grads)
  grad_norm = optax.tree.norm(grads)
  # A step whose loss or gradients are not finite is not applied: parameters and optimizer
  # state stay as they were (only the step count advances), so no NaN ever reaches them. The
  # flag travels with the metrics; the host decides whether to go on (train.py).
  finite = jnp.isfinite(sums['ce'] + sums['z']) & jnp.isfinite(grad_norm)
  updated = state.apply_gradients(grads=grads)
  state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), updated, state).replace(
      step=updated.step)
  metrics = dict(loss=sums['ce'] / n, z_loss=sums['z'] / n, grad_norm=grad_norm,
                 bits_per_byte=sums['ce'] / math.log(2) / jnp.maximum(sums['bytes'], 1.0),
                 tokens=sums['tokens'], finite=finite)
  metrics.update({k: v / n for k, v in sums.items() if k in MOE_METRICS})
  return state, metrics


@functools.partial(jax.jit, static_argnames=('model',))
def eval_step(params, batch, token_bytes, *, model):
  """Summed cross-entropy, token and byte counts of one batch."""
  _, sums = loss_sums(params, model, batch, 0.0)
  sums['bytes'] = jnp.sum(token_bytes[batch['targets']] * batch['weights'])
  return sums


def summarize_eval(sums) -> dict:
  tokens, ce = max(float(sums['tokens']), 1.0), float(sums['ce'])
  return dict(loss=ce / tokens, tokens=tokens, perplexity=math.exp(min(ce / tokens, 50.0)),
              bits_per_byte=ce / math.log(2) / max(float(sums['bytes']), 1.0),
              nats_per_byte=ce / max(float(sums['bytes']), 1.0))
