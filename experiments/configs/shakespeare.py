"""Default experiment: a small Llama-style model on the embedded Shakespeare corpus (CPU).

Command:
  python -m experiments.main --config=experiments/configs/shakespeare.py --workdir=runs/shakespeare
Variants: `:bytes` (byte-level tokenizer, same budget), `:moe` (8 experts, 2 active per token,
as many active parameters as the dense model), `:teacher` (6 layers, 2000 steps: a teacher for
distillation; 1.3061 nats/byte, 2026-11-25, its wall time not measured alone), `:exits` (exit
losses after layers 1-3 for early-exit decoding, models/early_exit.py), `:pipeline` (8 scanned
layers in 4 pipeline stages x 2 data replicas: 8 devices, e.g. 8 fake CPU devices through
XLA_FLAGS=--xla_force_host_platform_device_count=8), `:tiny` and `:moe_tiny` (seconds; used by
tests).
Result (2-core CPU development machine, 2026-11-24): 7 min 8 s wall for the whole command
(8 min 51 s before the CPU step work of issue 12, same machine and day), validation loss 1.459
nats/byte (2.11 bits/byte) on the four held-out plays.
"""

import ml_collections

from experiments.configs.base import base_config


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  config = base_config()
  # Sized for ~10 minutes on 2 CPU cores. SentencePiece tokens carry ~2.5 bytes each, so at equal
  # compute the model reads ~2.5x more text than with bytes; the loss is reported per byte.
  config.num_train_steps = 450
  config.log_every = 25
  config.eval_every = 225
  config.checkpoint_every = 225
  config.data.tokenizer = 'sentencepiece'
  config.data.vocab_size = 1024
  config.data.seq_len = 128
  config.optimizer.warmup_steps = 50
  if arg == 'bytes':   # the same model, rows and steps with the byte-level tokenizer
    config.data.tokenizer = 'byte'
  elif arg == 'moe':   # 8 experts of half the MLP width, 2 per token: the dense model's active size
    # Capacity dispatch: XLA's CPU backend runs the dropless path's grouped matmuls 3x slower.
    config.model.update(n_experts=8, experts_per_token=2, moe_d_ff=config.model.d_ff // 2,
                        moe_dispatch='capacity', capacity_factor=1.25)
  elif arg == 'teacher':   # a teacher worth distilling from: 1.5x deeper, 4.4x the steps
    config.num_train_steps = 2000
    config.eval_every = 500
    config.checkpoint_every = 250
    config.optimizer.warmup_steps = 100
    config.model.n_layers = 6
  elif arg == 'exits':   # the default model with exits after layers 1-3 trained beside it
    config.early_exit.layers = '0,1,2'
  elif arg == 'pipeline':   # 8 scanned layers in 4 pipeline stages x 2 batch replicas (8 devices)
    config.model.update(n_layers=8, scan_layers=True)
    config.mesh.update(data=2, stage=4)
    config.grad_accum_steps = 8       # the microbatches that flow through the stages
    config.pipeline.schedule = 'gpipe'   # or 'circular' (pipeline.repeats chunks per stage)
  elif arg == 'moe_tiny':
    config = get_config('tiny')
    config.model.update(n_experts=4, experts_per_token=2, moe_d_ff=32)
  elif arg == 'tiny':
    config.num_train_steps = 20
    config.batch_size = 8
    config.eval_batch_size = 8
    config.eval_batches = 2
    config.log_every = 1
    config.eval_every = 10
    config.checkpoint_every = 5
    config.data.tokenizer = 'byte'
    config.data.seq_len = 64
    config.data.shuffle_window = 64
    config.model.update(d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=64, max_len=256)
    config.sample.num_prompts = 1
    config.sample.max_new_tokens = 16
  elif arg:
    raise ValueError(f'unknown variant {arg!r} of shakespeare.py; known: bytes, moe, teacher, '
                     f'exits, pipeline, tiny, moe_tiny')
  return config
