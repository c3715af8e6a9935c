"""Sharding: multi-process start-up, device meshes from config, and logical-axis rules that lay
the model out on them.

    sharding.initialize()                                  # multi-host runs; see distributed.py
    mesh = sharding.make_mesh(config.mesh)                 # axes data, stage, fsdp, expert, tensor
    rules = sharding.rules_for('fsdp')                     # or an explicit list of pairs
    state = sharding.create_sharded(init_fn, mesh, rules, rng)   # never whole on one device
    batch = sharding.global_batch(local_rows, mesh, rules)
    with sharding.activation_rules(mesh, rules):
      state, metrics = step(state, batch)

Pipeline stages (`sharding.pipeline`) run the scanned layers of a step's microbatches over the
`stage` axis; `experiments.steps.pipelined` picks them when the mesh has that axis.
"""

from sharding.distributed import allgather_bytes, assert_same, initialize, sync
from sharding.layout import (activation_rules, batch_sharding, create_sharded, global_batch,
                             init_shardings, param_shardings, replicated, sharded_abstract,
                             tree_shardings, unbox)
from sharding.mesh import AXES, STAGE, default_mesh_config, make_mesh, mesh_shape
from sharding.rules import BATCH_AXES, PRESETS, mesh_axes_of, rules_for
