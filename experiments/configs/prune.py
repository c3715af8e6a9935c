"""Pruning experiments on a trained run (experiments/prune.py): one variant or a sweep.

Command (after training the default model into runs/shakespeare):
  python -m experiments.main --mode=prune --config=experiments/configs/prune.py:sweep \
      --workdir=runs/prune_sweep --config.source_workdir=runs/shakespeare
Fine-tunes (`finetune_steps`, and between `rounds`) are training runs in
<workdir>/finetune/<variant>/ on the source run's mesh (or --config.mesh.*,
--config.sharding_rules): checkpointed, logged, and continued (or skipped when complete) when the
command runs again.
Variants: a method and amount, e.g. `wanda_50`, `sparsegpt_2of4`, `magnitude_70`, `ffn_25`,
`heads_50`; `sweep` (magnitude/Wanda/SparseGPT at 30/50/70%, 4:8 and 2:4); `structural` (25%
and 50% of FFN neurons and of heads, each fine-tuned briefly); `testbed` (magnitude and Wanda at
50% and 2:4 on the default model with planted outlier features, `config.outliers`). Any list
can be given with --config.variants=wanda:0.5,sparsegpt:2:4 (see experiments/prune.py).
The source checkpoint is only read.
"""

import ml_collections
from ml_collections import config_dict

import sharding
from experiments.configs import base

SWEEP = ','.join([f'{m}:{s}' for m in ('magnitude', 'wanda', 'sparsegpt')
                  for s in ('0.3', '0.5', '0.7', '4:8', '2:4')])
STRUCTURAL = 'ffn:0.25,ffn:0.5,heads:0.25,heads:0.5'
TESTBED = 'magnitude:0.5,wanda:0.5,magnitude:2:4,wanda:2:4'   # on planted outlier features


def _named(arg: str) -> str:
  """'wanda_50' -> 'wanda:0.5', 'sparsegpt_2of4' -> 'sparsegpt:2:4', 'ffn_25' -> 'ffn:0.25'."""
  method, _, amount = arg.rpartition('_')
  if 'of' in amount:
    n, m = amount.split('of')
    return f'{method}:{n}:{m}'
  if not method or not amount.isdigit():
    raise ValueError(f'unknown variant {arg!r} of prune.py; known: sweep, structural, testbed, or '
                     f'method_percent (wanda_50) / method_NofM (sparsegpt_2of4)')
  return f'{method}:{int(amount) / 100}' if method != 'layers' else f'{method}:{amount}'


def get_config(arg: str = 'sweep') -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.source_workdir = 'runs/shakespeare'   # a training run: config.json + checkpoints/
  config.hf_path = ''                 # optional: prune this HF checkpoint instead (same tokenizer)
  config.variants = (SWEEP if arg == 'sweep' else STRUCTURAL if arg == 'structural' else
                     TESTBED if arg == 'testbed' else _named(arg))
  config.calibration_batches = 8      # batches of calibration_rows training rows
  config.calibration_rows = 16
  config.importance = 'l2'            # structural ranking: l1, l2 or taylor
  config.finetune_steps = 100 if arg == 'structural' else 0
  config.rounds = 1                   # > 1: iterative pruning, fine-tuning between rounds
  config.finetune_learning_rate = 3e-4
  # How fine-tunes recover the pruned model: 'finetune' (cross-entropy) or 'distill' (the KD
  # loss of `kd`, the dense source model as the teacher).
  config.recover = 'finetune'
  config.kd = base.kd_config()
  # Each row's timed greedy decode: this many new tokens for one request (0: forward pass
  # only); its tokens/s and the decode program's bytes go into results and reports.
  config.decode_tokens = 32
  config.seed = 0
  config.outliers = outliers(4 if arg == 'testbed' else 0)   # the outlier testbed
  # Where evaluations and fine-tunes run (fine-tunes are training runs in
  # <workdir>/finetune/<variant>/). Unset sizes and '' keep the source run's mesh and rules.
  config.mesh = _unset(sharding.default_mesh_config())   # e.g. --config.mesh.fsdp=4
  config.sharding_rules = ''          # a preset of sharding/rules.py, e.g. fsdp
  return config


def outliers(channels: int) -> ml_collections.ConfigDict:
  """The outlier testbed (compression.smoothing.plant_outliers): `channels` embed channels at
  every norm's output scaled up by `factor` and the following kernels' input rows down by it,
  so the float function is unchanged but the activations have outlier features as large LLMs'
  do. 0 channels: off."""
  out = ml_collections.ConfigDict()
  out.channels = channels
  out.factor = 50.0
  return out


def _unset(mesh: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The mesh's fields, each an unset integer (None: the source run's size)."""
  return ml_collections.ConfigDict({k: _unset(v) if isinstance(v, ml_collections.ConfigDict)
                                    else config_dict.placeholder(int) for k, v in mesh.items()})
