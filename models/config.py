"""`ModelConfig`: the one object that describes a decoder-only Transformer."""

import dataclasses
from typing import Optional

NORMS = ('rmsnorm', 'layernorm')
MLPS = ('swiglu', 'gelu')
POSITIONS = ('rope', 'learned')
ACTIVATIONS = ('silu', 'gelu_tanh', 'gelu')
REMAT_POLICIES = ('none', 'full', 'dots', 'dots_no_batch')
ATTENTION_IMPLS = ('auto', 'xla', 'cudnn')
DTYPES = ('float32', 'bfloat16', 'float16')
KV_CACHE_DTYPES = ('auto',) + DTYPES + ('int8',)   # 'auto': the compute dtype
MOE_DISPATCHES = ('dropless', 'capacity')

# Fields whose None means "derived from the other fields", and how.
DERIVED = {
    'n_kv_heads': lambda cfg: cfg.n_heads,
    'head_dim': lambda cfg: cfg.d_model // cfg.n_heads,
    'moe_d_ff': lambda cfg: cfg.d_ff,
    'n_unique_layers': lambda cfg: cfg.n_layers,
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape and options of a decoder-only language model.

  Llama-style models use the defaults; `gpt2_style()` sets the GPT-2 family options.
  The config is frozen and hashable, so it can be a static argument of `jax.jit`.

  The fields of `DERIVED` accept None, meaning "derive me from the others"; once built they
  always hold an int, so each concept has one name (`cfg.head_dim`, `cfg.n_kv_heads`, ...).
  Configs compare equal when they resolve to the same values. `replace()` derives again
  what was derived rather than given: `ModelConfig(d_model=128, n_heads=4).replace(d_model=256)`
  has head_dim 64, while a head_dim given explicitly is kept.
  """
  vocab_size: int = 256
  d_model: int = 128
  n_layers: int = 2
  n_heads: int = 4
  n_kv_heads: Optional[int] = None   # None: n_heads (MHA); 1: MQA; otherwise GQA
  head_dim: Optional[int] = None     # width of each head; None: d_model // n_heads
  d_ff: int = 512                    # hidden width of the MLP
  max_len: int = 2048                # learned position table size; longest sequence for RoPE models
  norm: str = 'rmsnorm'              # one of NORMS
  norm_eps: float = 1e-6
  mlp: str = 'swiglu'                # 'swiglu' (gate * act(up) style) or 'gelu' (2-layer MLP)
  activation: str = 'silu'           # activation inside the MLP, one of ACTIVATIONS
  position: str = 'rope'             # 'rope' or 'learned' absolute positions
  rope_theta: float = 10_000.0
  qkv_bias: bool = False             # biases on q/k/v projections (GPT-2, Qwen2)
  out_bias: bool = False             # bias on the attention output projection (GPT-2)
  mlp_bias: bool = False             # biases in the MLP (GPT-2)
  tie_embeddings: bool = False       # output head reuses the token embedding
  sliding_window: Optional[int] = None  # attend to the last `sliding_window` positions only
  n_unique_layers: Optional[int] = None  # distinct blocks, reused cyclically; None: n_layers
  scan_layers: bool = False          # one nn.scan over layers: compile time independent of depth
  remat: str = 'none'                # activation checkpointing policy, one of REMAT_POLICIES
  dtype: str = 'float32'             # compute dtype (bfloat16 on accelerators)
  param_dtype: str = 'float32'       # storage dtype of parameters
  attention_impl: str = 'auto'       # 'auto': cuDNN flash on GPU for bf16/fp16, else XLA
  kv_cache_dtype: str = 'auto'       # decoding cache storage, one of KV_CACHE_DTYPES (int8: scaled)
  init_std: float = 0.02
  # Mixture-of-Experts (models/moe.py); n_experts=0 is a dense model.
  n_experts: int = 0                 # experts per MoE layer
  experts_per_token: int = 2         # k: 1 Switch-style, 2 Mixtral-style
  moe_every: int = 1                 # every n-th layer is MoE (layers n-1, 2n-1, ...)
  moe_d_ff: Optional[int] = None     # hidden width of each expert (None: d_ff)
  n_shared_experts: int = 0          # experts of width moe_d_ff applied to every token
  moe_dispatch: str = 'dropless'     # 'dropless' (grouped matmuls) or 'capacity' (drops overflow)
  capacity_factor: float = 1.25      # capacity path: slots per expert = factor * S * k / E
  router_jitter: float = 0.0         # training: router input scaled by U(1-j, 1+j)
  router_aux_weight: float = 0.01    # load-balancing loss weight in the training loss
  router_z_weight: float = 0.001     # router z-loss weight in the training loss

  def __post_init__(self):
    def check(ok, msg):
      if not ok:
        raise ValueError(f'ModelConfig: {msg}')
    for name in ('vocab_size', 'd_model', 'n_layers', 'n_heads', 'd_ff', 'max_len'):
      check(getattr(self, name) > 0, f'{name}={getattr(self, name)} must be positive')
    check(self.head_dim is not None or self.d_model % self.n_heads == 0,
          f'n_heads={self.n_heads} must divide d_model={self.d_model} (or set head_dim)')
    derived = frozenset(name for name in DERIVED if getattr(self, name) is None)
    for name in derived:
      object.__setattr__(self, name, DERIVED[name](self))
    # Not a dataclass field: equality, hashing and repr see only the resolved values.
    object.__setattr__(self, '_derived', derived)
    check(self.head_dim > 0, f'head_dim={self.head_dim} must be positive')
    check(self.n_kv_heads > 0 and self.n_heads % self.n_kv_heads == 0,
          f'n_kv_heads={self.n_kv_heads} must be positive and divide n_heads={self.n_heads}')
    check(self.position != 'rope' or self.head_dim % 2 == 0,
          f'head_dim={self.head_dim} must be even for rotary embeddings')
    check(self.n_unique_layers > 0 and self.n_layers % self.n_unique_layers == 0,
          f'n_unique_layers={self.n_unique_layers} must be positive and divide '
          f'n_layers={self.n_layers}')
    check(self.sliding_window is None or self.sliding_window > 0,
          f'sliding_window={self.sliding_window} must be positive or None')
    if self.n_experts:
      self._check_moe(check)
    else:
      check(self.n_experts == 0, f'n_experts={self.n_experts} must be >= 0 (0: dense)')
    for name, allowed in (('moe_dispatch', MOE_DISPATCHES), ('norm', NORMS), ('mlp', MLPS),
                          ('position', POSITIONS),
                          ('activation', ACTIVATIONS), ('remat', REMAT_POLICIES),
                          ('attention_impl', ATTENTION_IMPLS), ('dtype', DTYPES),
                          ('param_dtype', DTYPES), ('kv_cache_dtype', KV_CACHE_DTYPES)):
      check(getattr(self, name) in allowed,
            f'{name}={getattr(self, name)!r} is not one of {", ".join(allowed)}')

  def _check_moe(self, check):
    e, k = self.n_experts, self.experts_per_token
    check(e > 0, f'n_experts={e} must be >= 0 (0: dense)')
    check(1 <= k <= e, f'experts_per_token={k} must be between 1 and n_experts={e}')
    check(self.capacity_factor > 0, f'capacity_factor={self.capacity_factor} must be > 0')
    check(self.moe_every >= 1, f'moe_every={self.moe_every} must be >= 1')
    check(self.moe_d_ff > 0, f'moe_d_ff={self.moe_d_ff} must be > 0')
    check(self.n_shared_experts >= 0, f'n_shared_experts={self.n_shared_experts} must be >= 0')
    check(0 <= self.router_jitter < 1, f'router_jitter={self.router_jitter} must be in [0, 1)')
    check(not self.mlp_bias, 'mlp_bias is not supported with experts (n_experts > 0)')
    check(self.n_unique_layers % self.moe_every == 0,
          f'moe_every={self.moe_every} must divide the {self.n_unique_layers} unique layers')
    check(not self.scan_layers or self.moe_every == 1,
          f'scan_layers needs every layer alike: moe_every={self.moe_every} must be 1')

  def is_moe_layer(self, block: int) -> bool:
    """Whether unique block `block` has an MoE feed-forward."""
    return self.n_experts > 0 and block % self.moe_every == self.moe_every - 1

  def replace(self, **changes) -> 'ModelConfig':
    """A copy with `changes`; fields that were derived (not given) are derived again.

    Use this rather than `dataclasses.replace`, which would pass the derived values on as if
    they had been given.
    """
    again = {name: None for name in self._derived if name not in changes}
    return dataclasses.replace(self, **again, **changes)


def gpt2_style(**overrides) -> ModelConfig:
  """GPT-2 family: LayerNorm, learned positions, GELU MLP, biases, tied embeddings."""
  kwargs = dict(norm='layernorm', norm_eps=1e-5, mlp='gelu', activation='gelu_tanh',
                position='learned', qkv_bias=True, out_bias=True, mlp_bias=True,
                tie_embeddings=True)
  kwargs.update(overrides)
  return ModelConfig(**kwargs)
