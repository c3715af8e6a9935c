"""Training exit points for token-level early exit (`models.early_exit`): an added loss.

Each exit layer's output, read through the model's own final norm and head, is scored with
next-token cross-entropy beside the model's loss (CALM trains every layer's exit this way):
total = base total + weight * mean over exits of the exit cross-entropy. The exits add no
parameters; the loss is a wrapper the one training loop takes like any other.
"""

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from models.early_exit import check_exits, head_logits


@dataclasses.dataclass(frozen=True)
class Spec:
  layers: tuple      # exit after these layers (0-based, each before the last)
  weight: float = 1.0


@dataclasses.dataclass(frozen=True)
class Loss:
  """`base` (an `experiments.steps.LmLoss`-like loss with `forward` and `totals`) plus the
  exits' losses.

  `sums` gain 'exit_ce_<layer>' per exit (reported per token by the training loop).
  """
  base: Callable
  spec: Spec

  @property
  def model(self):
    return self.base.model

  def forward(self, params, batch, rng=None, hidden: bool = False, attention: bool = False):
    return self.base.forward(params, batch, rng, hidden=hidden, attention=attention)

  def __call__(self, params, batch, rng=None):
    cfg = self.model.config
    logits, router, metrics, hidden = self.base.forward(params, batch, rng, hidden=True)
    total, sums = self.base.totals(logits, router, metrics, batch)
    w = batch['weights']
    exit_total = 0.0
    for e in self.spec.layers:
      exit_ce, _ = token_losses(head_logits(cfg, params, hidden[e]), batch['targets'], 0.0)
      sums[f'exit_ce_{e}'] = jnp.sum(exit_ce * w)
      exit_total += sums[f'exit_ce_{e}']
    total += self.spec.weight * exit_total / len(self.spec.layers)
    return total, sums


def token_losses(logits_BxLxV, targets_BxL, z_loss: float):
  """Cross-entropy per token and z_loss * logsumexp^2 (as the training loop's LM loss)."""
  lse_BxL = jax.nn.logsumexp(logits_BxLxV, axis=-1)
  target_BxL = jnp.take_along_axis(logits_BxLxV, targets_BxL[..., None], axis=-1)[..., 0]
  return lse_BxL - target_BxL, z_loss * jnp.square(lse_BxL)


def loss(base: Callable, spec: Spec) -> Loss:
  """The early-exit loss around `base` (its model's exits checked)."""
  check_exits(base.model.config, spec.layers)
  if not spec.layers:
    raise ValueError('early exit needs at least one exit layer')
  return Loss(base, Spec(tuple(spec.layers), float(spec.weight)))
