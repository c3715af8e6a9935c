"""Fixed-shape programs for serving from decode slots: prefill, insert, decode steps, swap, resize.

The engine (`experiments/engine.py`) keeps one KV cache of `B` slots (rows) and `S` cache entries
per slot, in the layout of `models.attention.init_cache`. All slots share one write index: every
decode step writes every slot's new entry at entry `index mod S`, and a slot's attention sees only
the entries whose stored segment is its own (1 for a live request, 0 for padding and empty
entries), at stored positions up to its own. So a request is placed in any free slot at any time
by writing its prefilled entries just behind the shared index, and it decodes there exactly as it
would alone; a request that has been swapped out resumes in any slot by rotating its entries to
the new index.

The ring's length `S` follows what the live requests span (`resize`): a step reads the whole
ring, so a ring no longer than needed is read where it lies, where a window gathered from a
longer ring costs as much as reading about four times its entries (XLA's CPU backend).

Every program is jitted once per shape: `prefill` once per prompt bucket, `insert` once per
bucket and ring length, `step` once per ring length (twice with sampling, since greedy rows
skip the sort that top-k and top-p need), `steps` (several decode steps in one program)
likewise, `resize` once per pair of ring lengths, `extract` and `restore` once per ring
length.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from models.attention import init_cache


def filter_rows(logits_BxV: jax.Array, temperature_B: jax.Array, top_k_B: jax.Array,
                top_p_B: jax.Array) -> jax.Array:
  """Each row's logits / T with tokens outside its top k (k = 0: all) and then outside the
  smallest prefix of those whose mass reaches top_p (1: all) set to -inf: the filters of
  `models.decode.sample_logits`, each row with its own parameters (T = 0 rows are scaled by 1)."""
  v = logits_BxV.shape[-1]
  t_B = jnp.where(temperature_B > 0, temperature_B, 1.0).astype(jnp.float32)
  scaled_BxV = logits_BxV.astype(jnp.float32) / t_B[:, None]
  sorted_BxV = -jnp.sort(-scaled_BxV, axis=-1)
  k_B = jnp.where((top_k_B > 0) & (top_k_B < v), top_k_B, v)
  kept_BxV = jnp.arange(v)[None, :] < k_B[:, None]
  kth_Bx1 = jnp.take_along_axis(sorted_BxV, (k_B - 1)[:, None], axis=-1)
  sorted_BxV = jnp.where(kept_BxV, sorted_BxV, -jnp.inf)
  probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
  # A token is dropped when the mass strictly before it already reaches top_p; the first is kept.
  drop_BxV = ((jnp.cumsum(probs_BxV, axis=-1) - probs_BxV >= top_p_B[:, None])
              & (top_p_B[:, None] < 1.0))
  cutoff_Bx1 = jnp.min(jnp.where(drop_BxV | ~kept_BxV, jnp.inf, sorted_BxV), axis=-1,
                       keepdims=True)
  threshold_Bx1 = jnp.maximum(kth_Bx1, cutoff_Bx1)
  return jnp.where(scaled_BxV < threshold_Bx1, -jnp.inf, scaled_BxV)


def sample_rows(logits_BxV: jax.Array, keys_B: jax.Array, temperature_B: jax.Array,
                top_k_B: jax.Array, top_p_B: jax.Array) -> jax.Array:
  """One token per row, each row with its own sampling parameters.

  Greedy where temperature is 0; else drawn with the row's own key from the softmax of
  `filter_rows` (temperature, then top k, then top p).
  """
  greedy_B = jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  filtered_BxV = filter_rows(logits_BxV, temperature_B, top_k_B, top_p_B)
  sampled_B = jax.vmap(jax.random.categorical)(keys_B, filtered_BxV).astype(jnp.int32)
  return jnp.where(temperature_B > 0, sampled_B, greedy_B)


def request_keys(seed_B: jax.Array, count_B: jax.Array) -> jax.Array:
  """The key of each row's next token: its request's seed folded with the tokens it has made.

  A request's samples depend on nothing but its seed and its own tokens: not on the slot, the
  batch it shares or a preemption.
  """
  return jax.vmap(lambda s, i: jax.random.fold_in(jax.random.key(s), i))(seed_B, count_B)


@functools.partial(jax.jit, static_argnames=('model', 'storage'))
def prefill(params, tokens_BxL, seg_BxL, pos_BxL, *, model, storage):
  """The prompts' last logits [B, V] and their own KV cache (cache length `L`'s entries)."""
  cache = init_cache(model.config, tokens_BxL.shape[0], tokens_BxL.shape[1], storage)
  logits_BxLxV, cache = model.apply({'params': params}, tokens_BxL, positions=pos_BxL,
                                    segment_ids=seg_BxL, cache=cache)
  return logits_BxLxV[:, -1], cache


@functools.partial(jax.jit, donate_argnames=('cache',))
def insert(cache: dict, kv: dict, row: jax.Array, src: jax.Array) -> dict:
  """Writes row `src` of a prefilled cache `kv` into slot `row`, ending just behind the index.

  The prompt's token a (of the bucket's L) lands at entry (index - L + a) mod S, so the slot's
  next decode step, which writes at `index`, continues it. The slot's other entries are marked
  empty, so nothing of an earlier request there is seen.
  """
  s, n = cache['pos'].shape[1], kv['pos'].shape[1]
  a_N = kv['index'] - n + jnp.arange(n)      # the tokens the prefill cache still holds
  from_N, to_N = a_N % n, (cache['index'] - kv['index'] + a_N) % s
  # Layer arrays are [..., B, K, S, W] (a leading layer axis under scan_layers).
  # (A row index and an entry index apart in one subscript would move their axes to the front.)
  def put(dst, new):
    entries_KxNxW = new[..., src, :, :, :][..., from_N, :]
    slot_KxSxW = dst[..., row, :, :, :].at[..., to_N, :].set(entries_KxNxW)
    return dst.at[..., row, :, :, :].set(slot_KxSxW)
  seg_S = jnp.zeros((s,), jnp.int32).at[to_N].set(kv['seg'][src, from_N])
  return dict(cache, k=jax.tree.map(put, cache['k'], kv['k']),
              v=jax.tree.map(put, cache['v'], kv['v']),
              pos=cache['pos'].at[row, to_N].set(kv['pos'][src, from_N]),
              seg=cache['seg'].at[row].set(seg_S))


def choose(logits_BxV: jax.Array, sampling: dict, count_B: jax.Array,
           greedy: bool) -> jax.Array:
  """The next token of each row: argmax when every row is greedy (no sort), else `sample_rows`
  with each request's parameters (`sampling`: temperature, top_k, top_p, seed, each [B])."""
  if greedy:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  keys_B = request_keys(sampling['seed'], count_B)
  return sample_rows(logits_BxV, keys_B, sampling['temperature'], sampling['top_k'],
                     sampling['top_p'])


@functools.partial(jax.jit, static_argnames=('greedy',))
def first_tokens(logits_BxV, sampling: dict, *, greedy: bool):
  """The first generated token of prefilled prompts (each request's token 0)."""
  return choose(logits_BxV, sampling, jnp.zeros(logits_BxV.shape[:1], jnp.int32), greedy)


@functools.partial(jax.jit, static_argnames=('model', 'greedy'), donate_argnames=('cache',))
def step(params, cache: dict, tok_B, fed_B, prev_B, pos_B, live_B, sampling: dict, count_B, *,
         model, greedy: bool):
  """One decode step for every slot: (next token per slot [B], the cache after writing).

  `tok_B` are the slots' last tokens at positions `pos_B`; `count_B` how many each request has
  made (its next token's key); slots where `live_B` is False write an empty entry. Where
  `fed_B`, the last token is `prev_B` instead: the previous call's output, still on the device
  (the engine starts a call before it reads the one before; choosing the tokens in a program
  of their own would cost a dispatch more per call).
  """
  tok_B = jnp.where(fed_B, prev_B, tok_B)
  logits_Bx1xV, cache = model.apply({'params': params}, tok_B[:, None], positions=pos_B[:, None],
                                    segment_ids=live_B.astype(jnp.int32)[:, None], cache=cache)
  return choose(logits_Bx1xV[:, 0], sampling, count_B, greedy), cache


@functools.partial(jax.jit, static_argnames=('model', 'greedy', 'n'), donate_argnames=('cache',))
def steps(params, cache: dict, tok_B, fed_B, prev_B, pos_B, live_B, sampling: dict, count_B, *,
          model, greedy: bool, n: int = 2):
  """`n` decode steps in one program, each `step`'s: (tokens [n, B], the last of them [B],
  the cache)."""
  def one(carry, i):
    cache, tok_B = carry
    new_B, cache = step(params, cache, tok_B, fed_B & (i == 0), prev_B, pos_B + i, live_B,
                        sampling, count_B + i, model=model, greedy=greedy)
    return (cache, new_B), new_B
  (cache, last_B), tokens_NxB = jax.lax.scan(one, (cache, tok_B), jnp.arange(n))
  return tokens_NxB, last_B, cache


@jax.jit
def extract(cache: dict, row: jax.Array) -> dict:
  """Slot `row`'s entries (k, v, pos, seg) and the index they were written against."""
  take = lambda x: x[..., row, :, :, :]
  return dict(k=jax.tree.map(take, cache['k']), v=jax.tree.map(take, cache['v']),
              pos=cache['pos'][row], seg=cache['seg'][row], index=cache['index'])


@functools.partial(jax.jit, donate_argnames=('cache',))
def restore(cache: dict, saved: dict, row: jax.Array) -> dict:
  """Puts `extract`'s entries back into slot `row`, rotated from their index to the cache's."""
  s = cache['pos'].shape[1]
  from_S = (jnp.arange(s) - (cache['index'] - saved['index'])) % s
  put = lambda dst, old: dst.at[..., row, :, :, :].set(old[..., from_S, :])
  return dict(cache, k=jax.tree.map(put, cache['k'], saved['k']),
              v=jax.tree.map(put, cache['v'], saved['v']),
              pos=cache['pos'].at[row].set(saved['pos'][from_S]),
              seg=cache['seg'].at[row].set(saved['seg'][from_S]))


def ring_sources(index, old: int, new: int, xp=jnp) -> tuple:
  """Where a ring of `old` entries holds each entry of a ring of `new` entries written against
  the same `index`, and whether it holds it at all: entry d of the new ring holds the write
  made age = (index - 1 - d) mod new writes ago, which the old ring keeps if age < old."""
  age_N = (index - 1 - xp.arange(new)) % new
  return (index - 1 - age_N) % old, age_N < old


@functools.partial(jax.jit, static_argnames=('length',))
def resize(cache: dict, *, length: int) -> dict:
  """The cache as a ring of `length` entries per slot, same index: the last min(S, length)
  entries written are kept where the new ring expects them, the rest are empty."""
  src_N, kept_N = ring_sources(cache['index'], cache['pos'].shape[1], length)
  take = lambda x: jnp.take(x, src_N, axis=-2)
  return dict(cache, k=jax.tree.map(take, cache['k']), v=jax.tree.map(take, cache['v']),
              pos=cache['pos'][:, src_N], seg=jnp.where(kept_N, cache['seg'][:, src_N], 0))


def fit(saved: dict, length: int) -> dict:
  """`extract`'s host copy of a slot as if taken from a ring of `length` entries (NumPy: a
  swapped-out request resumes in a ring of another length without a program per pair)."""
  src_N, kept_N = ring_sources(int(saved['index']), saved['pos'].shape[0], length, np)
  take = lambda x: np.take(x, src_N, axis=-2)
  return dict(saved, k=jax.tree.map(take, saved['k']), v=jax.tree.map(take, saved['v']),
              pos=saved['pos'][src_N], seg=np.where(kept_N, saved['seg'][src_N], 0))
