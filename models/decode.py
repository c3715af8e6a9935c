"""Autoregressive decoding with a fixed-shape KV cache: prefill, then one jitted loop of steps.

Prompts of different lengths are left-padded to a common bucket length, so every row writes its
next token into the same cache slot; padding carries segment id 0 and is never attended to, and
positions count from each prompt's first real token, so a row decodes exactly as it would alone.
"""

import functools
from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from models.attention import cache_bytes, cache_storage, init_cache  # noqa: F401 (re-exported)


class GenerateOutput(NamedTuple):
  tokens: jax.Array   # [batch, max_new_tokens] generated ids, pad_id after a stop token
  lengths: jax.Array  # [batch] generated tokens per row, a final stop token included


def sample_logits(logits_BxV: jax.Array, rng: jax.Array, temperature: float = 0.0,
                  top_k: Optional[int] = None, top_p: Optional[float] = None) -> jax.Array:
  """One token per row: greedy at temperature 0, else sampled after top-k / top-p filtering."""
  if temperature == 0.0:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  logits_BxV = logits_BxV.astype(jnp.float32) / temperature
  if top_k is not None and top_k < logits_BxV.shape[-1]:
    kth_Bx1 = jax.lax.top_k(logits_BxV, top_k)[0][:, -1:]
    logits_BxV = jnp.where(logits_BxV < kth_Bx1, -jnp.inf, logits_BxV)
  if top_p is not None and top_p < 1.0:
    sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
    probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    # Keep the smallest prefix whose mass reaches top_p: a token is dropped when the mass
    # strictly before it already does. The first token is always kept.
    drop_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV >= top_p
    cutoff_Bx1 = jnp.min(jnp.where(drop_BxV, jnp.inf, sorted_BxV), axis=-1, keepdims=True)
    logits_BxV = jnp.where(logits_BxV < cutoff_Bx1, -jnp.inf, logits_BxV)
  return jax.random.categorical(rng, logits_BxV, axis=-1).astype(jnp.int32)


def _bucket(n: int) -> int:
  """Prompt lengths are padded to powers of two (at least 8) to bound recompilation."""
  return max(8, 1 << (n - 1).bit_length())


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int = 0, length: Optional[int] = None):
  """Left-pads prompts to [batch, length] tokens with segment ids (0 = pad) and positions."""
  lengths = np.array([len(p) for p in prompts], np.int32)
  length = _bucket(int(lengths.max())) if length is None else length
  tokens = np.full((len(prompts), length), pad_id, np.int32)
  seg = np.zeros((len(prompts), length), np.int32)
  for i, p in enumerate(prompts):
    if len(p):
      tokens[i, length - len(p):] = p
      seg[i, length - len(p):] = 1
  positions = np.maximum(np.arange(length)[None, :] - (length - lengths)[:, None], 0)
  return tokens, seg, positions.astype(np.int32)


def generate(model, params, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             rng: Optional[jax.Array] = None, temperature: float = 0.0, top_k: Optional[int] = None,
             top_p: Optional[float] = None, stop_tokens: Sequence[int] = (),
             pad_id: int = 0, kv_cache_dtype: Optional[str] = None) -> GenerateOutput:
  """Continues each prompt by up to `max_new_tokens` tokens (all rows stop at a stop token).

  Args:
    model: a `models.Transformer`.
    params: its parameter tree.
    prompts: token-id sequences, of different lengths if need be (none empty).
    max_new_tokens: the most tokens generated per row.
    rng: PRNG key for sampling; the same key gives the same tokens. Unused when greedy.
    temperature: 0 for greedy decoding.
    top_k, top_p: optional filters before sampling.
    stop_tokens: ids that end a row (the stop token is included in the output).
    pad_id: fills the prompt padding and the output after a row stops.
    kv_cache_dtype: the KV cache's storage, one of `models.config.KV_CACHE_DTYPES`; None: the
      model config's `kv_cache_dtype`. 'int8' keeps about a quarter of a float32 cache's bytes.
  """
  cfg = model.config
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError('generate: prompts must be a non-empty list of non-empty token sequences')
  if max_new_tokens < 1:
    raise ValueError(f'generate: max_new_tokens={max_new_tokens} must be at least 1')
  if temperature < 0:
    raise ValueError(f'generate: temperature={temperature} must be >= 0')
  if top_k is not None and top_k < 1:
    raise ValueError(f'generate: top_k={top_k} must be >= 1 or None')
  if top_p is not None and not 0.0 < top_p <= 1.0:
    raise ValueError(f'generate: top_p={top_p} must be in (0, 1] or None')
  longest = max(len(p) for p in prompts)
  if cfg.position == 'learned' and longest + max_new_tokens > cfg.max_len:
    raise ValueError(f'generate: prompt length {longest} + max_new_tokens={max_new_tokens} '
                     f'exceeds the model max_len={cfg.max_len}')
  storage = cache_storage(cfg, kv_cache_dtype)
  tokens, seg, positions = pad_prompts(prompts, pad_id)
  rng = jax.random.key(0) if rng is None else rng
  return _generate(params, tokens, seg, positions, rng, model=model,
                   max_new_tokens=max_new_tokens, temperature=float(temperature), top_k=top_k,
                   top_p=top_p, stop_tokens=tuple(int(t) for t in stop_tokens), pad_id=pad_id,
                   storage=storage)


def lower_greedy(model, params, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 kv_cache_dtype: Optional[str] = None):
  """`generate`'s greedy program for `prompts`, lowered, with the arguments it takes:
  `(lowered, args)`; `lowered.compile()(*args)` decodes exactly `max_new_tokens` tokens (no stop
  tokens) and the compiled program's memory analysis is what decoding holds on the device."""
  if not prompts or any(len(p) == 0 for p in prompts) or max_new_tokens < 1:
    raise ValueError(f'lower_greedy: needs non-empty prompts and max_new_tokens >= 1, got '
                     f'{len(prompts)} prompts and max_new_tokens={max_new_tokens}')
  tokens, seg, positions = pad_prompts(prompts)
  args = (params, tokens, seg, positions, jax.random.key(0))
  lowered = _generate.lower(*args, model=model, max_new_tokens=max_new_tokens, temperature=0.0,
                            top_k=None, top_p=None, stop_tokens=(), pad_id=0,
                            storage=cache_storage(model.config, kv_cache_dtype))
  return lowered, args


@functools.partial(jax.jit, static_argnames=('model', 'max_new_tokens', 'temperature', 'top_k',
                                             'top_p', 'stop_tokens', 'pad_id', 'storage'))
def _generate(params, tokens_BxL, seg_BxL, pos_BxL, rng, *, model, max_new_tokens, temperature,
              top_k, top_p, stop_tokens, pad_id, storage):
  b, length = tokens_BxL.shape
  sample = functools.partial(sample_logits, temperature=temperature, top_k=top_k, top_p=top_p)
  stops = jnp.asarray(stop_tokens, jnp.int32)
  is_stop = lambda t_B: jnp.isin(t_B, stops) if stop_tokens else jnp.zeros_like(t_B, bool)

  cache = init_cache(model.config, b, length + max_new_tokens, storage)
  logits_BxLxV, cache = model.apply({'params': params}, tokens_BxL, positions=pos_BxL,
                                    segment_ids=seg_BxL, cache=cache)
  tok_B = sample(logits_BxLxV[:, -1], jax.random.fold_in(rng, 0))
  out = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(tok_B)   # [B, new tokens]
  state = (1, tok_B, pos_BxL[:, -1] + 1, cache, out, is_stop(tok_B), jnp.ones((b,), jnp.int32))

  def cond(state):
    step, *_, done_B, _ = state
    return (step < max_new_tokens) & ~jnp.all(done_B)

  def body(state):
    step, tok_B, pos_B, cache, out, done_B, len_B = state
    logits_Bx1xV, cache = model.apply({'params': params}, tok_B[:, None], positions=pos_B[:, None],
                                      segment_ids=jnp.ones((b, 1), jnp.int32), cache=cache)
    new_B = sample(logits_Bx1xV[:, 0], jax.random.fold_in(rng, step))
    new_B = jnp.where(done_B, pad_id, new_B)
    out = out.at[:, step].set(new_B)
    len_B = len_B + (~done_B).astype(jnp.int32)
    done_B = done_B | is_stop(new_B)
    return step + 1, new_B, pos_B + 1, cache, out, done_B, len_B

  state = jax.lax.while_loop(cond, body, state)
  return GenerateOutput(state[4], state[6])
