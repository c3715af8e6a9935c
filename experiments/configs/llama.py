"""Llama shapes (1B, 7B) for accelerators, on C4 with a SentencePiece vocabulary.

Command:
  python -m experiments.main --config=experiments/configs/llama.py:1b --workdir=runs/llama_1b
Throughput only: python -m experiments.benchmark --config=experiments/configs/llama.py:1b
Variants: `1b` (Llama-3.2-1B-like shape), `7b` (Llama-2-7B shape), `tiny` (CPU-sized, tests).
Result: not trained yet. 7B runs FSDP over every device (its state does not fit one GPU).
"""

import ml_collections

from experiments.configs.base import pretraining_config

SHAPES = {  # d_model, n_layers, n_heads, n_kv_heads, d_ff, tied
    '1b': (2048, 16, 32, 8, 8192, True),
    '7b': (4096, 32, 32, 32, 11008, False),
    'tiny': (64, 2, 4, 2, 128, True),
}


def get_config(arg: str = '1b') -> ml_collections.ConfigDict:
  if arg not in SHAPES:
    raise ValueError(f'unknown variant {arg!r} of llama.py; known: {", ".join(SHAPES)}')
  d, layers, heads, kv_heads, ff, tied = SHAPES[arg]
  config = pretraining_config()
  config.data.vocab_size = 32000
  config.data.seq_len = 2048
  config.model.update(
      d_model=d, n_layers=layers, n_heads=heads, n_kv_heads=kv_heads, d_ff=ff, max_len=4096,
      rope_theta=500_000.0, norm_eps=1e-5, tie_embeddings=tied, dtype='bfloat16',
      scan_layers=True, remat='dots_no_batch' if arg == '1b' else 'full')
  config.optimizer.update(learning_rate=3e-4, warmup_steps=2000, weight_decay=0.1)
  if arg == '7b':   # 7B parameters + Adam need ~112 GB: shard them over every device (ZeRO-3)
    config.mesh.update(data=1, fsdp=-1)
    config.sharding_rules = 'fsdp'
  if arg == 'tiny':
    config.update(num_train_steps=10, batch_size=8, log_every=1, eval_every=10, eval_batches=1)
    config.data.update(seq_len=64, vocab_size=512, shuffle_window=16)
    config.model.update(max_len=128, dtype='float32', remat='none')
    config.sample.update(num_prompts=1, max_new_tokens=16)
  return config
