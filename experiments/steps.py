"""Pure training and evaluation steps: model, optimizer, loss, `train_step`, `eval_step`."""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import traverse_util
from flax.training import train_state

from models import ModelConfig, Transformer

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


def make_optimizer(opt, num_steps: int) -> optax.GradientTransformation:
  return optax.chain(
      optax.clip_by_global_norm(opt.grad_clip),
      optax.adamw(learning_rate_schedule(opt, num_steps), b1=opt.b1, b2=opt.b2, eps=opt.eps,
                  weight_decay=opt.weight_decay, mask=decay_mask))


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


def loss_sums(params, model, batch, z_loss: float):
  """Summed (not averaged) losses, so microbatches combine exactly into one large batch."""
  logits = model.apply({'params': params}, batch['inputs'], positions=batch['positions'],
                       segment_ids=batch['segment_ids'])
  ce, z = token_losses(logits, batch['targets'], z_loss)
  w = batch['weights']
  return jnp.sum((ce + z) * w), dict(ce=jnp.sum(ce * w), z=jnp.sum(z * w), tokens=jnp.sum(w))


@functools.partial(jax.jit, static_argnames=('model', 'accum_steps', 'z_loss'), donate_argnums=0)
def train_step(state: TrainState, batch, token_bytes, *, model, accum_steps: int, z_loss: float):
  """One optimizer step on `batch`, split into `accum_steps` microbatches whose grads are summed."""
  # Microbatch i takes rows i, i + accum, ...: every microbatch draws from every device's shard
  # of the batch, so accumulation needs no data movement.
  micro = jax.tree.map(
      lambda x: x.reshape((-1, accum_steps) + x.shape[1:]).swapaxes(0, 1), batch)
  grad_fn = jax.grad(loss_sums, has_aux=True)

  def accumulate(carry, mb):
    grads, sums = carry
    g, s = grad_fn(state.params, model, mb, z_loss)
    s['bytes'] = jnp.sum(token_bytes[mb['targets']] * mb['weights'])
    return (jax.tree.map(jnp.add, grads, g), jax.tree.map(jnp.add, sums, s)), None

  zeros = (jax.tree.map(jnp.zeros_like, state.params),
           dict(ce=0.0, z=0.0, tokens=0.0, bytes=0.0))
  (grads, sums), _ = jax.lax.scan(accumulate, zeros, micro)
  n = jnp.maximum(sums['tokens'], 1.0)
  grads = jax.tree.map(lambda g: g / n, grads)
  state = state.apply_gradients(grads=grads)
  metrics = dict(loss=sums['ce'] / n, z_loss=sums['z'] / n, grad_norm=optax.tree.norm(grads),
                 bits_per_byte=sums['ce'] / math.log(2) / jnp.maximum(sums['bytes'], 1.0),
                 tokens=sums['tokens'])
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
