"""GPT-2 shapes (124M, 350M) for accelerators, on C4 with a SentencePiece vocabulary.

Command (one GPU or a TPU host):
  python -m experiments.main --config=experiments/configs/gpt2.py:124m --workdir=runs/gpt2_124m
Throughput only: python -m experiments.benchmark --config=experiments/configs/gpt2.py:124m
Variants: `124m`, `350m`, `tiny` (CPU-sized, used by tests).
Result: not trained to completion yet; the benchmark's figures go in the README.
"""

import ml_collections

from experiments.configs.base import pretraining_config

SHAPES = {  # d_model, n_layers, n_heads
    '124m': (768, 12, 12),
    '350m': (1024, 24, 16),
    'tiny': (64, 2, 4),
}


def get_config(arg: str = '124m') -> ml_collections.ConfigDict:
  if arg not in SHAPES:
    raise ValueError(f'unknown variant {arg!r} of gpt2.py; known: {", ".join(SHAPES)}')
  d, layers, heads = SHAPES[arg]
  config = pretraining_config()
  config.data.vocab_size = 50304        # GPT-2's padded vocabulary size
  config.data.seq_len = 1024
  config.model.update(
      d_model=d, n_layers=layers, n_heads=heads, n_kv_heads=None, d_ff=4 * d, max_len=1024,
      norm='layernorm', norm_eps=1e-5, mlp='gelu', activation='gelu_tanh', position='learned',
      qkv_bias=True, out_bias=True, mlp_bias=True, tie_embeddings=True, dtype='bfloat16',
      scan_layers=True, remat='full')   # 64 x 1024 tokens per step fit one 80 GB GPU
  config.optimizer.update(learning_rate=6e-4, warmup_steps=700, weight_decay=0.1)
  if arg == 'tiny':
    config.update(num_train_steps=10, batch_size=8, log_every=1, eval_every=10, eval_batches=1)
    config.data.update(seq_len=64, vocab_size=512, shuffle_window=16)
    config.model.update(max_len=64, dtype='float32', remat='none')
    config.sample.update(num_prompts=1, max_new_tokens=16)
  return config
