"""Mixtral-8x7B shape (8 experts, 2 per token) for accelerators, on C4 with SentencePiece.

Command (a pod slice or GPU cluster; 47B parameters, 13B active per token):
  python -m experiments.main --config=experiments/configs/mixtral.py:8x7b \
      --workdir=gs://BUCKET/mixtral --config.mesh.expert=8
Throughput only: python -m experiments.benchmark --config=experiments/configs/mixtral.py:8x7b
Variants: `8x7b`, `tiny` (CPU-sized, used by tests).
Layout: parameters and optimizer state FSDP over every device; `--config.mesh.expert=N` (N
dividing 8) also splits the experts over N devices (expert parallelism, `ep` rules).
Result: not trained.
"""

import ml_collections

from experiments.configs.base import pretraining_config


def get_config(arg: str = '8x7b') -> ml_collections.ConfigDict:
  if arg not in ('8x7b', 'tiny'):
    raise ValueError(f'unknown variant {arg!r} of mixtral.py; known: 8x7b, tiny')
  config = pretraining_config()
  config.data.vocab_size = 32000
  config.data.seq_len = 4096
  config.model.update(
      d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, d_ff=14336, max_len=32768,
      rope_theta=1e6, norm_eps=1e-5, dtype='bfloat16', scan_layers=True, remat='full',
      n_experts=8, experts_per_token=2, moe_dispatch='dropless', router_aux_weight=0.02,
      router_z_weight=0.001)
  config.mesh.update(data=1, fsdp=-1, expert=1)
  config.sharding_rules = 'ep'
  config.optimizer.update(learning_rate=2e-4, warmup_steps=2000, weight_decay=0.1)
  if arg == 'tiny':
    config.update(num_train_steps=10, batch_size=8, log_every=1, eval_every=10, eval_batches=1)
    config.data.update(seq_len=64, vocab_size=512, shuffle_window=16)
    config.model.update(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96, max_len=128,
                        n_experts=4, dtype='float32', remat='none')
    config.sample.update(num_prompts=1, max_new_tokens=16)
  return config
