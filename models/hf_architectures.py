"""Hugging Face model classes we read and write: config translation and tensor-name maps.

Each `Architecture` says how its config.json becomes a `ModelConfig` and back, which
`ModelConfig`s it can represent, and which HF tensor holds which parameter leaves. Adding a class
is one more entry in `ARCHITECTURES`.
"""

from typing import Callable, List, NamedTuple, Optional, Tuple

from models.config import ModelConfig, gpt2_style


class Tensor(NamedTuple):
  """One HF tensor and the parameter leaves it holds, concatenated along its output axis.

  `layout` is 'linear' for a torch nn.Linear weight [out, in], 'matrix' for [in, out]
  (embeddings, GPT-2's Conv1D), 'vector' for 1-D tensors (biases, norm scales) and 'experts'
  for stacked expert weights [experts, out, in] (ours are [experts, in, out]). `n_in` counts
  the leading input dims of our leaves: attention output kernels are [heads, head_dim, embed].
  With `expert` set, the tensor is one expert's slice (index `expert` of the leaves' first dim).
  """
  name: str
  leaves: Tuple[str, ...]
  layout: str
  n_in: int = 1
  expert: Optional[int] = None   # the tensor holds only this expert's slice of the leaves


class Architecture(NamedTuple):
  name: str                                     # HF class, config.json's `architectures`
  model_type: str
  prefix: str                                   # base-model prefix some checkpoints omit
  config_from_hf: Callable[[dict], ModelConfig]
  config_to_hf: Callable[[ModelConfig], dict]
  problems: Callable[[ModelConfig], List[str]]  # why a config cannot be written as this class
  tensors: Callable[[ModelConfig], List[Tensor]]
  buffers: str = r'.*rotary_emb\.inv_freq'      # non-persistent buffers old checkpoints hold
  other_layouts: Tuple[Callable[[ModelConfig], List[Tensor]], ...] = ()   # also read on load


ACTIVATIONS_FROM_HF = {'silu': 'silu', 'swish': 'silu', 'gelu_pytorch_tanh': 'gelu_tanh',
                       'gelu_new': 'gelu_tanh', 'gelu': 'gelu'}


def _get(c: dict, key: str):
  if c.get(key) is None:
    raise ValueError(f'config.json lacks {key!r}')
  return c[key]


def _activation(name: str) -> str:
  if name not in ACTIVATIONS_FROM_HF:
    raise ValueError(f'activation {name!r} is not supported; supported: '
                     f'{", ".join(ACTIVATIONS_FROM_HF)}')
  return ACTIVATIONS_FROM_HF[name]


def _rope_theta(c: dict) -> float:
  """RoPE base from `rope_parameters` (transformers 5) or the older `rope_theta`/`rope_scaling`."""
  rope = c.get('rope_parameters') or c.get('rope_scaling') or {}
  kind = rope.get('rope_type', rope.get('type', 'default'))
  if kind != 'default':
    raise ValueError(f'RoPE scaling rope_type={kind!r} is not supported (only default RoPE)')
  partial = rope.get('partial_rotary_factor', c.get('partial_rotary_factor', 1.0))
  if partial != 1.0:
    raise ValueError(f'partial_rotary_factor={partial} is not supported (only full RoPE)')
  return float(rope.get('rope_theta', c.get('rope_theta', 10_000.0)))


def _mismatches(cfg: ModelConfig, **needed) -> List[str]:
  return [f'{k}={getattr(cfg, k)!r} (needs {v!r})' for k, v in needed.items()
          if getattr(cfg, k) != v]


# Llama, Mistral and Qwen2 share layout and names; they differ in biases and sliding windows.

def _llama_like(c: dict, max_len: int, **options) -> ModelConfig:
  d, n = _get(c, 'hidden_size'), _get(c, 'num_attention_heads')
  kv, head_dim = c.get('num_key_value_heads') or n, c.get('head_dim') or d // n
  return ModelConfig(
      vocab_size=_get(c, 'vocab_size'), d_model=d, n_layers=_get(c, 'num_hidden_layers'),
      n_heads=n, n_kv_heads=None if kv == n else kv,
      head_dim=None if head_dim * n == d else head_dim, d_ff=_get(c, 'intermediate_size'),
      max_len=c.get('max_position_embeddings') or max_len, norm='rmsnorm',
      norm_eps=c.get('rms_norm_eps', 1e-6), mlp='swiglu',
      activation=_activation(c.get('hidden_act', 'silu')), position='rope',
      rope_theta=_rope_theta(c), tie_embeddings=c.get('tie_word_embeddings', False), **options)


def _llama_like_to_hf(cfg: ModelConfig) -> dict:
  act = {'silu': 'silu', 'gelu_tanh': 'gelu_pytorch_tanh', 'gelu': 'gelu'}[cfg.activation]
  return dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
              num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
              num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, hidden_act=act,
              max_position_embeddings=cfg.max_len, rms_norm_eps=cfg.norm_eps,
              tie_word_embeddings=cfg.tie_embeddings,
              rope_parameters={'rope_type': 'default', 'rope_theta': cfg.rope_theta},
              rope_theta=cfg.rope_theta)   # where transformers before v5 looks


def _llama_like_problems(cfg: ModelConfig, **needed) -> List[str]:
  needed.setdefault('n_experts', 0)   # dense unless the class has experts (Mixtral)
  return _mismatches(cfg, position='rope', norm='rmsnorm', mlp='swiglu', **needed)


def _mlp_tensors(cfg: ModelConfig, hf: str, us: str, fused: bool = False) -> List[Tensor]:
  if cfg.n_experts and fused:   # transformers 5 in memory: experts fused per layer
    return [Tensor(f'{hf}mlp.gate.weight', (f'{us}mlp/router/kernel',), 'linear'),
            Tensor(f'{hf}mlp.experts.gate_up_proj', (f'{us}mlp/gate', f'{us}mlp/up'), 'experts'),
            Tensor(f'{hf}mlp.experts.down_proj', (f'{us}mlp/down',), 'experts')]
  if cfg.n_experts:   # Mixtral files (the Hub, transformers' save_pretrained): one per expert
    moe = f'{hf}block_sparse_moe.'
    out = [Tensor(f'{moe}gate.weight', (f'{us}mlp/router/kernel',), 'linear')]
    for e in range(cfg.n_experts):
      out += [Tensor(f'{moe}experts.{e}.{w}.weight', (f'{us}mlp/{leaf}',), 'linear', expert=e)
              for w, leaf in (('w1', 'gate'), ('w2', 'down'), ('w3', 'up'))]
    return out
  out = []
  for p in ('gate', 'up', 'down'):
    out.append(Tensor(f'{hf}mlp.{p}_proj.weight', (f'{us}mlp/{p}/kernel',), 'linear'))
    if cfg.mlp_bias:
      out.append(Tensor(f'{hf}mlp.{p}_proj.bias', (f'{us}mlp/{p}/bias',), 'vector'))
  return out


def _llama_like_tensors(cfg: ModelConfig, fused_experts: bool = False) -> List[Tensor]:
  out = [Tensor('model.embed_tokens.weight', ('embed/embedding',), 'matrix')]
  for i in range(cfg.n_layers):
    hf, us = f'model.layers.{i}.', f'blocks_{i}/'
    for p, name in (('q', 'query'), ('k', 'key'), ('v', 'value'), ('o', 'out')):
      n_in = 2 if p == 'o' else 1
      out.append(Tensor(f'{hf}self_attn.{p}_proj.weight', (f'{us}attn/{name}/kernel',), 'linear',
                        n_in))
      if cfg.out_bias if p == 'o' else cfg.qkv_bias:
        out.append(Tensor(f'{hf}self_attn.{p}_proj.bias', (f'{us}attn/{name}/bias',), 'vector'))
    out += _mlp_tensors(cfg, hf, us, fused_experts)
    out.append(Tensor(f'{hf}input_layernorm.weight', (f'{us}attn_norm/scale',), 'vector'))
    out.append(Tensor(f'{hf}post_attention_layernorm.weight', (f'{us}mlp_norm/scale',), 'vector'))
  out.append(Tensor('model.norm.weight', ('final_norm/scale',), 'vector'))
  if not cfg.tie_embeddings:
    out.append(Tensor('lm_head.weight', ('lm_head/kernel',), 'linear'))
  return out


def _llama(c: dict) -> ModelConfig:
  bias = bool(c.get('attention_bias', False))
  return _llama_like(c, 2048, qkv_bias=bias, out_bias=bias, mlp_bias=bool(c.get('mlp_bias')))


def _llama_problems(cfg: ModelConfig) -> List[str]:
  problems = _llama_like_problems(cfg, sliding_window=None)
  if cfg.qkv_bias != cfg.out_bias:
    problems.append(f'qkv_bias={cfg.qkv_bias} with out_bias={cfg.out_bias} (attention_bias '
                    'sets both)')
  return problems


LLAMA = Architecture(
    'LlamaForCausalLM', 'llama', 'model.', _llama,
    lambda cfg: dict(_llama_like_to_hf(cfg), attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias),
    _llama_problems, _llama_like_tensors)

MISTRAL = Architecture(
    'MistralForCausalLM', 'mistral', 'model.',
    # transformers' default window when config.json omits the key.
    lambda c: _llama_like(c, 131072, sliding_window=c.get('sliding_window', 4096)),
    lambda cfg: dict(_llama_like_to_hf(cfg), sliding_window=cfg.sliding_window),
    lambda cfg: _llama_like_problems(cfg, qkv_bias=False, out_bias=False, mlp_bias=False),
    _llama_like_tensors)


def _mixtral(c: dict) -> ModelConfig:
  return _llama_like(c, 32768, sliding_window=c.get('sliding_window'),
                     n_experts=_get(c, 'num_local_experts'),
                     experts_per_token=_get(c, 'num_experts_per_tok'),
                     router_jitter=float(c.get('router_jitter_noise') or 0.0),
                     router_aux_weight=float(c.get('router_aux_loss_coef', 0.001)))


def _mixtral_problems(cfg: ModelConfig) -> List[str]:
  problems = _llama_like_problems(cfg, qkv_bias=False, out_bias=False, mlp_bias=False,
                                  n_experts=cfg.n_experts, moe_every=1, n_shared_experts=0,
                                  moe_d_ff=cfg.d_ff)
  if not cfg.n_experts:
    problems.append('n_experts=0 (a dense model)')
  if cfg.experts_per_token == 1:
    problems.append('experts_per_token=1 (Mixtral renormalises even a single weight to 1)')
  return problems


MIXTRAL = Architecture(
    'MixtralForCausalLM', 'mixtral', 'model.', _mixtral,
    lambda cfg: dict(_llama_like_to_hf(cfg), sliding_window=cfg.sliding_window,
                     num_local_experts=cfg.n_experts, num_experts_per_tok=cfg.experts_per_token,
                     router_jitter_noise=cfg.router_jitter,
                     router_aux_loss_coef=cfg.router_aux_weight, output_router_logits=False),
    _mixtral_problems, _llama_like_tensors,
    other_layouts=(lambda cfg: _llama_like_tensors(cfg, fused_experts=True),))


def _qwen2_window(c: dict) -> Optional[int]:
  """Qwen2 slides only in layers marked 'sliding_attention'; we need all layers alike."""
  window = c.get('sliding_window', 4096) if c.get('use_sliding_window') else None
  if window is None:
    return None
  first = c.get('max_window_layers', 28)
  types = c.get('layer_types') or ['sliding_attention' if i >= first else 'full_attention'
                                   for i in range(_get(c, 'num_hidden_layers'))]
  if set(types) == {'full_attention'}:
    return None
  if set(types) == {'sliding_attention'}:
    return window
  raise ValueError(f'Qwen2 layer_types {sorted(set(types))} mix attention kinds across layers, '
                   'which ModelConfig cannot represent')


def _qwen2_to_hf(cfg: ModelConfig) -> dict:
  kind = 'full_attention' if cfg.sliding_window is None else 'sliding_attention'
  return dict(_llama_like_to_hf(cfg), use_sliding_window=cfg.sliding_window is not None,
              sliding_window=cfg.sliding_window, max_window_layers=0,
              layer_types=[kind] * cfg.n_layers)


QWEN2 = Architecture(
    'Qwen2ForCausalLM', 'qwen2', 'model.',
    lambda c: _llama_like(c, 32768, qkv_bias=True, sliding_window=_qwen2_window(c)),
    _qwen2_to_hf,
    lambda cfg: _llama_like_problems(cfg, qkv_bias=True, out_bias=False, mlp_bias=False),
    _llama_like_tensors)


def _gpt2(c: dict) -> ModelConfig:
  if not c.get('scale_attn_weights', True) or c.get('scale_attn_by_inverse_layer_idx'):
    raise ValueError('GPT-2 attention scaling other than 1/sqrt(head_dim) is not supported')
  d = _get(c, 'n_embd')
  return gpt2_style(vocab_size=_get(c, 'vocab_size'), d_model=d, n_layers=_get(c, 'n_layer'),
                    n_heads=_get(c, 'n_head'), d_ff=c.get('n_inner') or 4 * d,
                    max_len=c.get('n_positions', 1024), norm_eps=c.get('layer_norm_epsilon', 1e-5),
                    activation=_activation(c.get('activation_function', 'gelu_new')),
                    tie_embeddings=c.get('tie_word_embeddings', True))


def _gpt2_to_hf(cfg: ModelConfig) -> dict:
  return dict(vocab_size=cfg.vocab_size, n_embd=cfg.d_model, n_layer=cfg.n_layers,
              n_head=cfg.n_heads, n_inner=cfg.d_ff, n_positions=cfg.max_len,
              layer_norm_epsilon=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings,
              activation_function={'gelu_tanh': 'gelu_new', 'gelu': 'gelu'}[cfg.activation])


def _gpt2_problems(cfg: ModelConfig) -> List[str]:
  problems = _mismatches(cfg, position='learned', norm='layernorm', mlp='gelu', qkv_bias=True,
                         out_bias=True, mlp_bias=True, sliding_window=None, n_experts=0)
  if cfg.activation not in ('gelu_tanh', 'gelu'):
    problems.append(f'activation={cfg.activation!r} (needs gelu_tanh or gelu)')
  if cfg.n_kv_heads != cfg.n_heads or cfg.head_dim * cfg.n_heads != cfg.d_model:
    problems.append('grouped heads or head_dim * n_heads != d_model')
  return problems


def _gpt2_tensors(cfg: ModelConfig) -> List[Tensor]:
  out = [Tensor('transformer.wte.weight', ('embed/embedding',), 'matrix'),
         Tensor('transformer.wpe.weight', ('pos_embed/embedding',), 'matrix')]
  for i in range(cfg.n_layers):
    hf, us = f'transformer.h.{i}.', f'blocks_{i}/'
    qkv = lambda leaf, us=us: tuple(f'{us}attn/{p}/{leaf}' for p in ('query', 'key', 'value'))
    out += [Tensor(f'{hf}attn.c_attn.weight', qkv('kernel'), 'matrix'),
            Tensor(f'{hf}attn.c_attn.bias', qkv('bias'), 'vector'),
            Tensor(f'{hf}attn.c_proj.weight', (f'{us}attn/out/kernel',), 'matrix', 2),
            Tensor(f'{hf}attn.c_proj.bias', (f'{us}attn/out/bias',), 'vector'),
            Tensor(f'{hf}mlp.c_fc.weight', (f'{us}mlp/up/kernel',), 'matrix'),
            Tensor(f'{hf}mlp.c_fc.bias', (f'{us}mlp/up/bias',), 'vector'),
            Tensor(f'{hf}mlp.c_proj.weight', (f'{us}mlp/down/kernel',), 'matrix'),
            Tensor(f'{hf}mlp.c_proj.bias', (f'{us}mlp/down/bias',), 'vector')]
    for norm, ours in (('ln_1', 'attn_norm'), ('ln_2', 'mlp_norm')):
      out += [Tensor(f'{hf}{norm}.{p}', (f'{us}{ours}/{leaf}',), 'vector')
              for p, leaf in (('weight', 'scale'), ('bias', 'bias'))]
  out += [Tensor('transformer.ln_f.weight', ('final_norm/scale',), 'vector'),
          Tensor('transformer.ln_f.bias', ('final_norm/bias',), 'vector')]
  if not cfg.tie_embeddings:
    out.append(Tensor('lm_head.weight', ('lm_head/kernel',), 'linear'))
  return out


GPT2 = Architecture('GPT2LMHeadModel', 'gpt2', 'transformer.', _gpt2, _gpt2_to_hf,
                    _gpt2_problems, _gpt2_tensors,
                    buffers=r'(transformer\.)?h\.\d+\.attn\.(bias|masked_bias)')

ARCHITECTURES = {a.name: a for a in (LLAMA, MISTRAL, QWEN2, GPT2, MIXTRAL)}


def default_architecture(cfg: ModelConfig) -> Architecture:
  """The HF class a config is written as when the caller names none."""
  if cfg.position == 'learned':
    return GPT2
  if cfg.n_experts:
    return MIXTRAL
  if cfg.sliding_window is not None and not cfg.qkv_bias:
    return MISTRAL
  if cfg.qkv_bias and not cfg.out_bias:
    return QWEN2
  return LLAMA
