"""Pipeline parallelism: the scanned layers split into stages over the `stage` mesh axis.

The stacked block parameters [R, ...] are split over `stage` along their `layers` axis (every
rule table maps it there), so stage s holds layers [s R/S, (s+1) R/S) and their optimizer state.
A step's microbatches (the gradient-accumulation microbatches) flow through the stages inside one
`jax.shard_map` that is manual over `stage` only: `data`, `fsdp`, `tensor` and `expert` stay
automatic inside it, so every other parallelism composes unchanged. Each iteration every stage
runs its layers on the activation it holds, then hands it to the next stage with one collective
permute; the backward pass is the same loop transposed (all forward, then all backward: GPipe).

Schedules (`Schedule`):
  gpipe     one chunk of R/S layers per stage; M microbatches take M + S - 1 iterations, of which
            S - 1 are the bubble: idle fraction (S - 1) / (M + S - 1).
  circular  C chunks of R/(S C) layers per stage, chunk c on stage c mod S (interleaved, as in
            Megatron's virtual stages and MaxText's circular pipeline). A microbatch goes round
            the ring C times; C M + S - 1 iterations of a C-times smaller chunk, so the idle
            fraction is (S - 1) / (C M + S - 1). Needs M >= S: a microbatch returning to stage 0
            waits in a buffer until its turn. Parameters stay stored in layer order (so
            checkpoints move freely between meshes); the step regroups them by chunk, one
            all-to-all of the block weights per step (and one of their gradients).

Every iteration is rematerialised: the backward pass keeps only each iteration's input
activation and recomputes the chunk (`jax.checkpoint`), the usual per-stage remat.
"""

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from models import ModelConfig
from models.attention import Geometry
from models.transformer import block_class
from sharding.mesh import STAGE

SCHEDULES = ('gpipe', 'circular')


@dataclasses.dataclass(frozen=True)
class Schedule:
  """`stages` pipeline stages, `microbatches` per step, `repeats` layer chunks per stage."""
  stages: int
  microbatches: int
  repeats: int = 1

  @property
  def iterations(self) -> int:
    return self.repeats * self.microbatches + self.stages - 1

  @property
  def bubble(self) -> float:
    """The idle fraction of a stage: (S - 1) / (C M + S - 1)."""
    return (self.stages - 1) / self.iterations


def schedule_of(pipeline_config, stages: int, microbatches: int) -> Schedule:
  """The `Schedule` of `config.pipeline` (schedule name, repeats) on `stages` stages."""
  name = pipeline_config.schedule
  if name not in SCHEDULES:
    raise ValueError(f'pipeline.schedule={name!r} is not one of {", ".join(SCHEDULES)}')
  repeats = pipeline_config.repeats if name == 'circular' else 1
  if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
    raise ValueError(f'pipeline.repeats={repeats!r} must be an integer >= 1 (layer chunks per '
                     f'stage of the circular schedule)')
  return Schedule(stages, microbatches, repeats)


def check(cfg: ModelConfig, schedule: Schedule) -> None:
  """One ValueError line for a model or schedule the pipeline cannot run."""
  s, m, c = schedule.stages, schedule.microbatches, schedule.repeats
  where = f'a pipeline of stage={s}'
  if not cfg.scan_layers:
    raise ValueError(f'{where} splits the scanned layers: set model.scan_layers=True (the model '
                     f'has {cfg.n_layers} unrolled layers)')
  if cfg.n_unique_layers != cfg.n_layers:
    raise ValueError(f'{where} needs one block per layer: n_unique_layers='
                     f'{cfg.n_unique_layers} differs from n_layers={cfg.n_layers}')
  if cfg.n_layers % (s * c):
    raise ValueError(f'n_layers={cfg.n_layers} does not divide into stage={s} x '
                     f'pipeline.repeats={c} equal chunks')
  if m < s:
    raise ValueError(f'grad_accum_steps={m} microbatches are fewer than stage={s} pipeline '
                     f'stages; use at least {s}')
  if cfg.router_jitter > 0:
    raise ValueError(f'router_jitter={cfg.router_jitter} is not supported in {where}; set it '
                     f'to 0')


def microbatched(x, m: int):
  """[B, ...] -> [M, B/M, ...], microbatch i taking rows i, i + M, ... (as accumulation does)."""
  return x.reshape((-1, m) + x.shape[1:]).swapaxes(0, 1)


def unmicrobatched(x):
  """The inverse of `microbatched`."""
  return x.swapaxes(0, 1).reshape((-1,) + x.shape[2:])


def _chunk_fn(cfg: ModelConfig, chunk: int) -> Callable:
  """(a stage's chunks [C, K, ...], chunk index, x [b, L, D], positions, segment ids) ->
  (x after the chunk's K layers, their router stats or {}), rematerialised."""
  chunk_cfg = cfg.replace(n_layers=chunk, n_unique_layers=chunk)
  module = block_class(chunk_cfg)(chunk_cfg, cfg.n_experts > 0, name='blocks')

  def run(local, r, x, pos, seg):
    # Indexing the stage's chunks here, inside the remat, keeps one chunk's weights from being
    # saved for every iteration.
    params = jax.tree.map(lambda a: a[r], local)
    (x, _), state = module.apply({'params': params}, x, Geometry(pos, seg), None,
                                 mutable=['moe'])
    stats = state['moe']['mlp']['stats'][0] if 'moe' in state else {}
    return x, stats

  return jax.checkpoint(run, prevent_cse=False)


def run_layers(cfg: ModelConfig, schedule: Schedule, params, x_BxLxD, geo: Geometry):
  """The scanned blocks (`params`: the stacked 'blocks' tree) on `x`, pipelined over `stage`.

  Returns (x after every layer [B, L, D], router stats with leading [M, R] or {}): the rows
  are split into `schedule.microbatches` as `microbatched` does. Call inside
  `sharding.activation_rules` (the mesh must be in context).
  """
  s_n, m_n, c_n = schedule.stages, schedule.microbatches, schedule.repeats
  r_n = jax.tree.leaves(params)[0].shape[0]
  k_n = r_n // (s_n * c_n)
  if c_n > 1:   # layer order -> stage-major chunks: stage s holds chunks s, s + S, ...
    params = jax.tree.map(
        lambda a: a.reshape((c_n, s_n, k_n) + a.shape[1:]).swapaxes(0, 1).reshape(a.shape),
        params)
  seg = geo.q_seg if geo.q_seg is not None else jnp.ones_like(geo.q_pos)
  x_all, pos_all, seg_all = (microbatched(a, m_n) for a in (x_BxLxD, geo.q_pos, seg))
  chunk = _chunk_fn(cfg, k_n)

  def body(local, x_all, pos_all, seg_all):
    s = lax.axis_index(STAGE)
    local = jax.tree.map(lambda a: a.reshape((c_n, k_n) + a.shape[1:]), local)
    zeros = jnp.zeros_like(x_all[0])
    stats_shape = jax.eval_shape(chunk, local, 0, zeros, pos_all[0], seg_all[0])[1]
    stats0 = jax.tree.map(lambda a: jnp.zeros((m_n, c_n) + a.shape, a.dtype), stats_shape)

    def iteration(carry, t):
      held, waiting, outputs, stats = carry
      k = t - s                      # this stage's work item: repeat k // M of microbatch k % M
      valid = (k >= 0) & (k < c_n * m_n)
      kc = jnp.clip(k, 0, c_n * m_n - 1)
      r, m = kc // m_n, kc % m_n
      # Stage 0 takes a new microbatch in the first M iterations, then those back from the ring.
      fresh = x_all[t % m_n] if c_n == 1 else jnp.where(t < m_n, x_all[t % m_n],
                                                        waiting[t % m_n])
      x = jnp.where(s == 0, fresh, held)
      y, st = chunk(local, r, x, pos_all[m], seg_all[m])
      last = valid & (s == s_n - 1) & (r == c_n - 1)
      outputs = outputs.at[m].set(jnp.where(last, y, outputs[m]))
      stats = jax.tree.map(lambda acc, v: acc.at[m, r].set(jnp.where(valid, v, acc[m, r])),
                           stats, st)
      held = lax.ppermute(y, STAGE, [(i, (i + 1) % s_n) for i in range(s_n)])
      if c_n > 1:   # what stage 0 just received left the last stage: it waits for its next round
        back = jnp.clip(t - (s_n - 1), 0, c_n * m_n - 1) % m_n
        keep = (s == 0) & (t >= s_n - 1)
        waiting = waiting.at[back].set(jnp.where(keep, held, waiting[back]))
      return (held, waiting, outputs, stats), None

    waiting = jnp.zeros_like(x_all) if c_n > 1 else jnp.zeros((), x_all.dtype)
    carry = (zeros, waiting, jnp.zeros_like(x_all), stats0)
    (_, _, outputs, stats), _ = lax.scan(iteration, carry, jnp.arange(schedule.iterations))
    return outputs[None], jax.tree.map(lambda a: a[None], stats)

  outputs, stats = jax.shard_map(
      body, in_specs=(P(STAGE), P(), P(), P()), out_specs=(P(STAGE), P(STAGE)),
      axis_names={STAGE}, check_vma=False)(params, x_all, pos_all, seg_all)
  y = unmicrobatched(outputs[-1])   # the last stage's outputs
  # stats [S, M, C, K, ...]: layer (c S + s) K + k of microbatch m -> [M, R, ...]
  stats = jax.tree.map(
      lambda a: a.transpose((1, 2, 0, 3) + tuple(range(4, a.ndim))).reshape(
          (m_n, r_n) + a.shape[4:]), stats)
  return y, stats


def layers_fn(cfg: ModelConfig, schedule: Schedule, params) -> Callable:
  """The `layers_fn` argument of `Transformer.__call__` that pipelines `params['blocks']`."""
  return lambda x, geo: run_layers(cfg, schedule, params['blocks'], x, geo)


def stages_of(mesh: Optional[jax.sharding.Mesh]) -> int:
  """The size of the mesh's `stage` axis (1 without a mesh or without the axis)."""
  if mesh is None or STAGE not in mesh.axis_names:
    return 1
  return mesh.shape[STAGE]
