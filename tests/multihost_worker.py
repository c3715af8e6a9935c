"""One process of the two-process test: `python -m tests.multihost_worker ADDRESS PID OUT_DIR`.

Joins a `jax.distributed` run, trains the tiny config for a few steps on fixed synthetic global
batches (this process feeds only its rows), writes the losses (process 0) and a checkpoint written
by both processes together. `run_steps` is also what the single-process reference runs.
"""

import json
import pathlib
import sys

import jax
import jax.numpy as jnp

import sharding
from experiments import benchmark, checkpoints, runtime, steps
from experiments.configs import shakespeare
from models import Transformer

N_STEPS = 3
VOCAB = 259


def config():
  c = shakespeare.get_config('tiny')
  c.mesh.update(data=2, fsdp=4)
  c.sharding_rules = 'fsdp'
  return c


def run_steps(c, n_steps: int = N_STEPS):
  """(losses, final state, placement) for `n_steps` on the global batches of steps 0, 1, ..."""
  model = Transformer(steps.model_config(c, VOCAB))
  placement = runtime.Placement(c, model, steps.make_optimizer(c.optimizer, c.num_train_steps))
  state = sharding.create_sharded(placement.init, placement.mesh, placement.rules, placement.rng)
  token_bytes = jnp.ones((VOCAB,), jnp.float32)
  per_process = c.batch_size // jax.process_count()
  mine = slice(jax.process_index() * per_process, (jax.process_index() + 1) * per_process)
  losses = []
  for step in range(n_steps):
    rows = benchmark.synthetic_batch(c.batch_size, c.data.seq_len, VOCAB, seed=step)
    batch = placement.batch({k: v[mine] for k, v in rows.items()})
    with placement.rules_scope():
      state, metrics = placement.train_step(state, batch, token_bytes)
    losses.append(float(metrics['loss']))
  return losses, state, placement


def main(address: str, process_id: int, out_dir: str):
  sharding.initialize(address, num_processes=2, process_id=process_id)
  losses, state, _ = run_steps(config())
  ckpts = checkpoints.Checkpoints(out_dir, keep=1, async_save=False)
  ckpts.save(N_STEPS, state, checkpoints.data_state(json.dumps(dict(pid=process_id)), {}))
  ckpts.wait()
  if jax.process_index() == 0:
    (pathlib.Path(out_dir) / 'losses.json').write_text(json.dumps(dict(
        losses=losses, process_count=jax.process_count(), devices=jax.device_count())))


if __name__ == '__main__':
  main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
