"""Default experiment: a byte-level Llama-style model on the embedded Shakespeare corpus (CPU).

Command:
  python -m experiments.main --config=experiments/configs/shakespeare.py --workdir=runs/shakespeare
Variants: `:tiny` (seconds; used by tests).
Result: see the README's results table (measured on the 2-core CPU development machine).
"""

import ml_collections

from experiments.configs.base import base_config


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  config = base_config()   # the defaults are this experiment's settings
  if arg == 'tiny':
    config.num_train_steps = 20
    config.batch_size = 8
    config.eval_batch_size = 8
    config.eval_batches = 2
    config.log_every = 1
    config.eval_every = 10
    config.checkpoint_every = 5
    config.data.seq_len = 64
    config.data.shuffle_window = 64
    config.model.update(d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=64, max_len=256)
    config.sample.num_prompts = 1
    config.sample.max_new_tokens = 16
  elif arg:
    raise ValueError(f'unknown variant {arg!r} of shakespeare.py; known: tiny')
  return config
