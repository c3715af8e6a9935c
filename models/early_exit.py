"""Token-level early exit (CALM, Schuster et al. 2022): a token leaves at the first exit layer
whose confidence passes a threshold.

Exit points are layer outputs read through the model's own final norm and head (`head_logits`),
so exits add no parameters; `compression.early_exit` trains them with an added loss. At decode
time (`step`, `generate`) each exit point measures the confidence of its prediction (the top
probability); when every live row's exceeds `threshold` the step stops there, and the layers it
skips still get their KV entries, computed from the exit state (CALM's state propagation), so
later tokens attend to them. A threshold of 1.0 never exits: the full model. The skipped
layers' K/V projections are all that is paid for them; the branch is a `lax.cond`, so the
compute saved is real (exiting is decided per step, for the whole batch of rows).

Unrolled layers only (`scan_layers=False`), each its own block (`n_unique_layers == n_layers`).
"""

import functools
from typing import Sequence

import jax
import jax.numpy as jnp

from models import axes
from models.attention import init_cache, rope, write_cache
from models.config import ModelConfig
from models.decode import pad_prompts
from models.layers import Embed, Linear, Norm
from models.transformer import Block, block_name, geometry


def _dtypes(cfg: ModelConfig):
  return jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)


def _embed(cfg: ModelConfig) -> Embed:
  dtype, param_dtype = _dtypes(cfg)
  return Embed(cfg.vocab_size, cfg.d_model, axes.VOCAB, dtype, param_dtype, cfg.init_std)


def check_exits(cfg: ModelConfig, exits: Sequence[int]) -> tuple:
  """`exits` sorted, each a layer index in [0, n_layers - 1) (the last layer is the model)."""
  exits = tuple(sorted(set(int(e) for e in exits)))
  bad = [e for e in exits if not 0 <= e < cfg.n_layers - 1]
  if bad:
    raise ValueError(f'exit layer {bad[0]} is not in [0, {cfg.n_layers - 1}): exits are the '
                     f'outputs of layers before the last of {cfg.n_layers}')
  return exits


def head_logits(cfg: ModelConfig, params, x_BxLxD: jax.Array) -> jax.Array:
  """The model's final norm and head applied to a residual stream: float32 logits [B, L, V]."""
  dtype, param_dtype = _dtypes(cfg)
  x_BxLxD = Norm(cfg.norm, cfg.norm_eps, dtype, param_dtype).apply(
      {'params': params['final_norm']}, x_BxLxD)
  if cfg.tie_embeddings:
    logits = _embed(cfg).apply({'params': params['embed']}, x_BxLxD, method='attend')
  else:
    logits = Linear((cfg.d_model,), (cfg.vocab_size,), (axes.EMBED,), (axes.VOCAB,),
                    dtype=dtype, param_dtype=param_dtype, init_std=cfg.init_std).apply(
                        {'params': params['lm_head']}, x_BxLxD)
  return logits.astype(jnp.float32)


def confidence(logits_BxLxV: jax.Array) -> jax.Array:
  """CALM's softmax confidence: the top probability of each prediction [B, L]."""
  return jnp.max(jax.nn.softmax(logits_BxLxV, axis=-1), axis=-1)


def _propagated_kv(cfg: ModelConfig, block_params, x_BxLxD, pos_BxL):
  """Layer's keys and values computed from the state `x` (its attention norm and K/V
  projections only): what a skipped layer stores for the token."""
  dtype, param_dtype = _dtypes(cfg)
  h = Norm(cfg.norm, cfg.norm_eps, dtype, param_dtype).apply(
      {'params': block_params['attn_norm']}, x_BxLxD)
  proj = lambda name: Linear(
      (cfg.d_model,), (cfg.n_kv_heads, cfg.head_dim), (axes.EMBED,),
      (axes.KV_HEADS, axes.HEAD_DIM), use_bias=cfg.qkv_bias, dtype=dtype,
      param_dtype=param_dtype, init_std=cfg.init_std).apply(
          {'params': block_params['attn'][name]}, h)
  k, v = proj('key'), proj('value')
  if cfg.position == 'rope':
    k = rope(k, pos_BxL, cfg.rope_theta)
  return k, v


def _check_model(cfg: ModelConfig) -> None:
  if cfg.scan_layers or cfg.n_unique_layers != cfg.n_layers:
    raise ValueError('early exit runs unrolled layers, each its own block (scan_layers=False, '
                     'n_unique_layers=n_layers)')


@functools.partial(jax.jit, static_argnames=('cfg', 'exits'), donate_argnames=('cache',))
def step(params, cache: dict, tok_B, pos_B, live_B, threshold, *, cfg: ModelConfig,
         exits: tuple):
  """One greedy decode step with early exit: (next token [B], layers used, cache).

  Rows where `live_B` is False write empty entries and do not hold the batch back.
  """
  _check_model(cfg)
  seg_Bx1, pos_Bx1 = live_B.astype(jnp.int32)[:, None], pos_B[:, None]
  geo, cache = geometry(pos_Bx1, seg_Bx1, cache, 1)
  x = _embed(cfg).apply({'params': params['embed']}, tok_B[:, None])
  if cfg.position == 'learned':
    x = x + Embed(cfg.max_len, cfg.d_model, axes.POSITION, *_dtypes(cfg), cfg.init_std).apply(
        {'params': params['pos_embed']}, pos_Bx1)

  def fill(start, x, ks, vs):
    """The layers from `start` on store K/V of the exit state `x`."""
    ks, vs = list(ks), list(vs)
    for j in range(start, cfg.n_layers):
      k, v = _propagated_kv(cfg, params[block_name(j)], x, pos_Bx1)
      ks[j], vs[j] = (write_cache(c, new, geo.write_slots)
                      for c, new in ((ks[j], k), (vs[j], v)))
    return tuple(ks), tuple(vs)

  def run(start, x, ks, vs):
    ks, vs = list(ks), list(vs)
    for j in range(start, cfg.n_layers):
      x, (ks[j], vs[j]) = Block(cfg, cfg.is_moe_layer(j)).apply(
          {'params': params[block_name(j)]}, x, geo, (ks[j], vs[j]))
      if j in exits:
        logits = head_logits(cfg, params, x)
        sure = jnp.all(jnp.where(live_B, confidence(logits)[:, 0] > threshold, True))
        exit_branch = lambda ops, j=j, logits=logits: (
            logits,) + fill(j + 1, ops[0], ops[1], ops[2]) + (jnp.int32(j + 1),)
        go_on = lambda ops, j=j: run(j + 1, *ops)
        return jax.lax.cond(sure, exit_branch, go_on, (x, tuple(ks), tuple(vs)))
    return (head_logits(cfg, params, x), tuple(ks), tuple(vs), jnp.int32(cfg.n_layers))

  logits, ks, vs, used = run(0, x, cache['k'], cache['v'])
  token = jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32)
  return token, used, dict(cache, k=ks, v=vs)


def generate(model, params, prompts, *, max_new_tokens: int, exits: Sequence[int],
             threshold: float, pad_id: int = 0) -> tuple:
  """Greedy continuation of `prompts` with early exit: (tokens [B, max_new_tokens] as a list of
  lists, the layers each step used). The prompt is prefilled by the full model."""
  cfg = model.config
  _check_model(cfg)
  exits = check_exits(cfg, exits)
  tokens, seg, pos = pad_prompts(prompts, pad_id)
  cache = init_cache(cfg, len(prompts), tokens.shape[1] + max_new_tokens)
  logits, cache = _prefill(params, cache, tokens, pos, seg, model=model)
  tok = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
  nxt = pos[:, -1] + 1
  live = jnp.ones(len(prompts), bool)
  out, used = [tok], []
  for i in range(max_new_tokens - 1):
    tok, layers, cache = step(params, cache, tok, nxt + i, live, jnp.float32(threshold),
                              cfg=cfg, exits=exits)
    out.append(tok)
    used.append(layers)
  return jax.device_get(jnp.stack(out, axis=1)).tolist(), [int(u) for u in jax.device_get(used)]


@functools.partial(jax.jit, static_argnames=('model',), donate_argnames=('cache',))
def _prefill(params, cache, tokens, pos, seg, *, model):
  return model.apply({'params': params}, tokens, positions=pos, segment_ids=seg, cache=cache)


def exit_logits(cfg: ModelConfig, params, hidden: Sequence[jax.Array], logits_BxLxV,
                exits: Sequence[int], threshold) -> tuple:
  """Teacher-forced early exit over a sequence: (each token's logits at its exit [B, L, V],
  the layers each token used [B, L]), from the residual streams after each layer (`hidden`)
  and the model's logits. Earlier tokens keep their full-depth states here (no propagation):
  a cheap estimate of the quality early exit keeps."""
  chosen, used = logits_BxLxV, jnp.full(logits_BxLxV.shape[:2], cfg.n_layers, jnp.int32)
  for e in sorted(exits, reverse=True):   # the first confident exit wins: fill from the back
    at = head_logits(cfg, params, hidden[e])
    sure = confidence(at) > threshold
    chosen = jnp.where(sure[..., None], at, chosen)
    used = jnp.where(sure, e + 1, used)
  return chosen, used
