"""FLOP and byte accounting in one place: model FLOPs per token, device peaks, MFU.

Model FLOPs per token (training) = 6 * N + 12 * layers * heads * head_dim * context, where N is
the number of parameters multiplied per token (every applied layer's weights, shared blocks
counted once per use, only the active experts of MoE layers, and the output head; position
tables excluded) and context is the
attended length (the sliding window if shorter). The second term is the attention score and
value matmuls, forward and backward. Forward-only (inference) FLOPs are a third of this.
"""

import math

import jax

from models.config import ModelConfig

# Dense bf16 peak FLOP/s per chip by `device_kind` prefix (datasheet figures).
PEAK_BF16_FLOPS = {
    'NVIDIA H100': 989e12,
    'NVIDIA H200': 989e12,
    'NVIDIA A100': 312e12,
    'NVIDIA L4': 121e12,
    'TPU v4': 275e12,
    'TPU v5 lite': 197e12,
    'TPU v5e': 197e12,
    'TPU v5p': 459e12,
    'TPU v5': 459e12,
    'TPU v6 lite': 918e12,
    'TPU v6e': 918e12,
}


def matmul_params(cfg: ModelConfig) -> int:
  """Weights multiplied per token: applied blocks (shared ones per use) plus the output head.

  MoE layers count their router and the k experts (plus shared experts) a token runs through:
  the active parameters, not all of them.
  """
  d, h, v = cfg.d_model, cfg.head_dim, cfg.vocab_size
  attn = d * h * (cfg.n_heads * 2 + cfg.n_kv_heads * 2)
  per_mlp = lambda width: d * width * (3 if cfg.mlp == 'swiglu' else 2)
  moe = d * cfg.n_experts + per_mlp(cfg.moe_d_ff) * (cfg.experts_per_token +
                                                     cfg.n_shared_experts)
  mlps = [moe if cfg.is_moe_layer(i % cfg.n_unique_layers) else per_mlp(cfg.d_ff)
          for i in range(cfg.n_layers)]
  return cfg.n_layers * attn + sum(mlps) + d * v


def param_count(params) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(params))


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  context = seq_len if cfg.sliding_window is None else min(seq_len, cfg.sliding_window)
  attention = 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * context
  return 6 * matmul_params(cfg) + attention


def device_peak_flops(device=None):
  """bf16 peak of one device, or None when unknown (CPUs)."""
  kind = (device or jax.devices()[0]).device_kind
  for prefix, peak in PEAK_BF16_FLOPS.items():
    if kind.startswith(prefix):
      return peak
  return None
