"""Device memory and cost of a training step, estimated before compiling and read after.

The estimate, in bytes per device:
  params, optimizer  the sharded train state, exactly (each leaf's shard shape on the mesh);
  gradients          one parameter-shaped buffer, sharded like the parameters (two when
                     microbatches are accumulated);
  activations        what the forward pass saves for the backward pass under the remat policy:
                     JAX's own list of saved residuals for one microbatch of this device's rows;
  working set        the largest live extras of the backward pass: the logits' gradient and,
                     when blocks are rematerialised, one block recomputed without remat.
Activations are traced at this device's batch rows but full head/MLP width, so under tensor
parallelism they are an upper bound. `compiled_bytes` reads XLA's own figure for comparison.

With pipeline stages (`sharding.pipeline`) the state is split over `stage` as laid out, there is
no accumulation buffer, and the activations are the pipeline's: each iteration's input to the
stage (C M + S - 1 of them, one microbatch each), the microbatches' inputs and outputs (and the
circular schedule's waiting room), while the working set holds one chunk recomputed and one
microbatch's logits gradient (the head runs a microbatch at a time). `bubble` is the stages'
idle fraction, (S - 1) / (C M + S - 1): the model FLOP/s and MFU pay it.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp

import sharding
from experiments import steps
from sharding import pipeline
from models import Transformer, axes, flops

try:   # the list behind the public jax.ad_checkpoint.print_saved_residuals
  from jax._src.ad_checkpoint import saved_residuals
except ImportError:   # pragma: no cover - a JAX that moved it: activations are then not estimated
  saved_residuals = None

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Estimate:
  params: int
  optimizer: int
  gradients: int
  activations: int
  working_set: int
  flops_per_step: float   # model FLOPs of one step on the whole mesh
  devices: int
  bubble: float = 0.0     # idle fraction of each pipeline stage (0 without stages)

  @property
  def total(self) -> int:
    return self.params + self.optimizer + self.gradients + self.activations + self.working_set

  def summary(self, remat: str) -> str:
    parts = ', '.join(f'{name.replace("_", " ")} {human_bytes(getattr(self, name))}' for name in (
        'params', 'optimizer', 'gradients', 'activations', 'working_set'))
    bubble = f', pipeline bubble {100 * self.bubble:.0f}%' if self.bubble else ''
    return (f'memory per device (estimate): {human_bytes(self.total)} = {parts} '
            f'(remat {remat}{bubble})')


def human_bytes(n: float) -> str:
  for unit, size in (('GiB', GIB), ('MiB', 2**20), ('KiB', 2**10)):
    if n >= size:
      return f'{n / size:.2f} {unit}'
  return f'{int(n)} B'


def shard_bytes(tree) -> int:
  """Bytes one device holds of a tree of sharded arrays or `jax.ShapeDtypeStruct`s."""
  total = 0
  for x in jax.tree.leaves(tree):
    shape = x.sharding.shard_shape(x.shape) if getattr(x, 'sharding', None) else x.shape
    total += math.prod(shape) * jnp.dtype(x.dtype).itemsize
  return total


def _residual_bytes(model: Transformer, params, rows: int, seq_len: int) -> int:
  """Bytes the forward pass keeps for the backward pass (not counting the parameters)."""
  if saved_residuals is None:
    return 0
  i32 = jax.ShapeDtypeStruct((rows, seq_len), jnp.int32)
  batch = dict(inputs=i32, targets=i32, positions=i32, segment_ids=i32,
               weights=jax.ShapeDtypeStruct((rows, seq_len), jnp.float32))
  loss = lambda p, b: steps.lm_loss(model)(p, b)[0]
  return sum(math.prod(aval.shape) * aval.dtype.itemsize
             for aval, origin in saved_residuals(loss, params, batch)
             if not origin.startswith('from the argument'))


def _abstract_params(model: Transformer, seq_len: int):
  init = lambda: model.init(jax.random.key(0), jnp.zeros((1, seq_len), jnp.int32))['params']
  return jax.eval_shape(lambda: sharding.unbox(init()))


def _one_block_bytes(model: Transformer, rows: int, seq_len: int) -> int:
  """Residuals of one block without remat: what recomputing a block holds at once."""
  group = model.config.moe_every if model.config.n_experts else 1   # MoE and dense blocks alike

  def residuals(n_layers):
    cfg = dataclasses.replace(model.config, n_layers=n_layers, n_unique_layers=None,
                              remat='none')
    small = Transformer(cfg)
    return _residual_bytes(small, _abstract_params(small, seq_len), rows, seq_len)
  return (residuals(2 * group) - residuals(group)) // group


def batch_shards(mesh, rules) -> int:
  return math.prod(mesh.shape[a] for a in sharding.mesh_axes_of(sharding.rules_for(rules),
                                                                 axes.BATCH))


def estimate(config, model: Transformer, abstract_state, mesh, rules) -> Estimate:
  """The per-device memory of `steps.train_step` for this config, model, state layout and mesh."""
  seq_len, cfg = config.data.seq_len, model.config
  rows = config.batch_size // batch_shards(mesh, rules) // config.grad_accum_steps
  params = shard_bytes(abstract_state.params)
  working = rows * seq_len * cfg.vocab_size * 4   # float32 gradient of one microbatch's logits
  stages, bubble, accumulating = pipeline.stages_of(mesh), 0.0, config.grad_accum_steps > 1
  if stages > 1:   # every pipeline iteration is rematerialised, whatever model.remat says
    schedule = pipeline.schedule_of(config.pipeline, stages, config.grad_accum_steps)
    m, chunk = schedule.microbatches, cfg.n_layers // (stages * schedule.repeats)
    x = rows * seq_len * cfg.d_model * jnp.dtype(cfg.dtype).itemsize   # one microbatch's
    activations = x * (schedule.iterations + m * (3 if schedule.repeats > 1 else 2))
    if saved_residuals is not None:
      working += chunk * _one_block_bytes(model, rows, seq_len)
    bubble, accumulating = schedule.bubble, False
  else:
    activations = _residual_bytes(model, _abstract_params(model, seq_len), rows, seq_len)
    if cfg.remat != 'none' and saved_residuals is not None:
      working += _one_block_bytes(model, rows, seq_len)
  tokens = config.batch_size * seq_len
  return Estimate(params=params, optimizer=shard_bytes(abstract_state.opt_state),
                  gradients=params * (2 if accumulating else 1),
                  activations=activations, working_set=working,
                  flops_per_step=tokens * flops.train_flops_per_token(cfg, seq_len),
                  devices=mesh.size, bubble=bubble)


def compiled_bytes(compiled):
  """XLA's bytes per device for a compiled step: arguments + outputs - donated + temporaries."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # noqa: BLE001 - backends without the analysis
    return None
  if m is None:
    return None
  return (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes +
          m.temp_size_in_bytes)


def device_capacity():
  """Bytes one device may allocate, where the backend says (GPUs, TPUs), else None."""
  stats = jax.local_devices()[0].memory_stats() or {}
  return stats.get('bytes_limit')


def cost_summary(est: Estimate) -> str:
  line = f'cost: {est.flops_per_step:.3g} model FLOPs per step'
  peak = flops.device_peak_flops()
  if peak:
    line += (f' on {est.devices} devices: >= {1e3 * est.flops_per_step / (peak * est.devices):.1f}'
             f' ms/step at their bf16 peak')
  return line
