"""Sweeps declared in config files (experiments/sweep.py): run, launch elsewhere, merge.

Commands (after training the default model into runs/shakespeare):
  python -m experiments.main --mode=sweep --config=experiments/configs/sweeps.py:gptq_calibration \
      --workdir=runs/sweep_gptq                       # the points, one after another
  python -m experiments.main --mode=merge --config=experiments/configs/sweeps.py:gptq_calibration \
      --workdir=runs/sweep_gptq                       # one report.md and pareto.png
Sweeps: `gptq_calibration` (GPTQ int4 and int3, group 128, calibrated on 1, 4 or 16 batches:
bits x calibration data), `prune_recovery` (Wanda 50% and SparseGPT 2:4, fine-tuned 0 or 50
steps: method x recovery).
"""

import ml_collections

from experiments.configs import prune, quantize


def get_config(arg: str = 'gptq_calibration') -> ml_collections.ConfigDict:
  if arg == 'gptq_calibration':
    config = quantize.get_config('gptq_int4_g128')
    config.kv_cache = ''
    config.sweep = ml_collections.ConfigDict(dict(
        mode='quantize',
        product=(('variants', ('gptq:int4:g128', 'gptq:int3:g128')),
                 ('calibration_batches', (1, 4, 16))),
        points=()))
  elif arg == 'prune_recovery':
    config = prune.get_config('wanda_50')
    config.sweep = ml_collections.ConfigDict(dict(
        mode='prune',
        product=(('variants', ('wanda:0.5', 'sparsegpt:2:4')), ('finetune_steps', (0, 50))),
        points=()))
  else:
    raise ValueError(f'unknown sweep {arg!r} of sweeps.py; known: gptq_calibration, '
                     f'prune_recovery')
  return config
