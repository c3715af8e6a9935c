"""Speculative decoding from decode slots: a draft model proposes, the target verifies at once.

One pass of `speculate` serves every slot of the engine's caches (`models.slots`): the draft
makes `k` tokens one step at a time, the target scores the slot's last token and the `k`
proposals as one chunk of k + 1 tokens, and each slot keeps the longest prefix of its proposals
that the rejection rule accepts (Leviathan et al. 2023; Chen et al. 2023) plus one token more, so
a pass makes between 1 and k + 1 tokens per slot, each slot its own number.

The rule (`accept`): proposal d_j, drawn from the draft's distribution q_j, is kept with
probability min(1, p_j(d_j) / q_j(d_j)), p_j the target's; at the first rejection the token is
drawn from the residual norm(max(p_j - q_j, 0)) instead, and when all k are kept a bonus token is
drawn from p_k. Every token then follows the target's own distribution exactly (after the
request's temperature, top-k and top-p filters, applied to both models alike); a greedy request
(one-hot p and q) keeps the proposals that equal the target's argmax and so makes the target's
greedy tokens.

Both caches write k + 1 entries per pass, all slots together (they share one write index); the
entries of rejected proposals are marked empty (segment 0), so what a slot attends to is
exactly its accepted tokens, and the index then moves on by one more than the most proposals
any live slot kept. A request therefore uses up to k + 1 cache entries per token it makes
(when another slot keeps all of its proposals and it keeps none), which the engine checks
when it is submitted.
"""

import functools

import jax
import jax.numpy as jnp

from models.slots import filter_rows, request_keys


def row_probs(logits_BxV: jax.Array, sampling: dict) -> jax.Array:
  """The distribution each row's next token is drawn from [B, V] float32: softmax of the
  row's filtered logits, or one-hot at the argmax for greedy rows (temperature 0)."""
  probs_BxV = jax.nn.softmax(filter_rows(logits_BxV, sampling['temperature'],
                                         sampling['top_k'], sampling['top_p']), axis=-1)
  onehot_BxV = jax.nn.one_hot(jnp.argmax(logits_BxV, axis=-1), logits_BxV.shape[-1])
  return jnp.where((sampling['temperature'] > 0)[:, None], probs_BxV, onehot_BxV)


def accept(p_BxJxV: jax.Array, q_BxKxV: jax.Array, drafts_BxK: jax.Array,
           key_B: jax.Array) -> tuple:
  """The rejection rule: (proposals kept per row [B] in [0, k], the token after them [B]).

  `p` holds the target's distributions at the k proposals and one after them (J = k + 1), `q`
  the draft's that each proposal was drawn from, `key_B` one key per row.
  """
  b, k = drafts_BxK.shape
  rows_B = jnp.arange(b)
  keys_Bx2 = jax.vmap(lambda key: jax.random.split(key, 2))(key_B)
  u_BxK = jax.vmap(lambda key: jax.random.uniform(key, (k,)))(keys_Bx2[:, 0])
  take = lambda x, i: jnp.take_along_axis(x, i[..., None], axis=-1)[..., 0]
  p_d_BxK, q_d_BxK = take(p_BxJxV[:, :k], drafts_BxK), take(q_BxKxV, drafts_BxK)
  # Keep d_j with probability min(1, p/q): u * q < p, with u uniform in [0, 1).
  kept_B = jnp.sum(jnp.cumprod(u_BxK * q_d_BxK < p_d_BxK, axis=1), axis=1).astype(jnp.int32)
  p_BxV = p_BxJxV[rows_B, kept_B]
  q_pad_BxJxV = jnp.concatenate([q_BxKxV, jnp.zeros_like(q_BxKxV[:, :1])], axis=1)
  residual_BxV = jnp.maximum(p_BxV - q_pad_BxJxV[rows_B, kept_B], 0.0)
  # Rounding can leave no residual mass where p and q agree; p itself is then the answer.
  residual_BxV = jnp.where(jnp.sum(residual_BxV, axis=-1, keepdims=True) > 0, residual_BxV,
                           p_BxV)
  next_B = jax.vmap(jax.random.categorical)(keys_Bx2[:, 1], jnp.log(residual_BxV))
  return kept_B, next_B.astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=('model', 'draft', 'k', 'greedy'),
                   donate_argnames=('cache', 'draft_cache'))
def speculate(params, cache: dict, draft_params, draft_cache: dict, tok_B, pos_B, live_B,
              carry_B, sampling: dict, count_B, *, model, draft, k: int, greedy: bool):
  """One speculative pass for every slot.

  Returns (tokens [B, k + 1], made per slot [B] in [1, k + 1], cache, draft_cache): slot b's new
  tokens are tokens[b, :made[b]]. Inputs are those of `models.slots.step`, plus `carry_B`: the
  slot's k-th proposal of its last pass where all k were kept (-1: none), which the draft has
  not seen yet; `draft` and `draft_params` are the draft model, `draft_cache` its slots (same
  index and ring length as `cache`).
  """
  seg_Bx1 = live_B.astype(jnp.int32)[:, None]
  keys_B = None if greedy else request_keys(sampling['seed'], count_B)
  index, n_slots = cache['index'], cache['pos'].shape[1]
  drafts, qs, tok_in_B = [], [], tok_B
  # The draft's first step reads [carry, last token] (an empty entry where there is no carry),
  # then one token a step: k steps, k + 1 entries, as many as the target's chunk writes.
  has_carry_Bx1 = (carry_B >= 0)[:, None] & live_B[:, None]
  first_Bx2 = jnp.concatenate([jnp.maximum(carry_B, 0)[:, None], tok_B[:, None]], axis=1)
  for j in range(k):
    if j == 0:
      inputs = dict(tokens=first_Bx2, positions=pos_B[:, None] + jnp.arange(-1, 1)[None, :],
                    segment_ids=jnp.concatenate([has_carry_Bx1.astype(jnp.int32), seg_Bx1], 1))
    else:
      inputs = dict(tokens=tok_in_B[:, None], positions=(pos_B + j)[:, None],
                    segment_ids=seg_Bx1)
    logits_BxLxV, draft_cache = draft.apply({'params': draft_params}, inputs.pop('tokens'),
                                            cache=draft_cache, **inputs)
    logits_BxV = logits_BxLxV[:, -1]
    if greedy:
      tok_in_B = jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    else:
      q_BxV = row_probs(logits_BxV, sampling)
      draw = lambda key, q: jax.random.categorical(jax.random.fold_in(key, j), jnp.log(q))
      tok_in_B = jax.vmap(draw)(keys_B, q_BxV).astype(jnp.int32)
      qs.append(q_BxV)
    drafts.append(tok_in_B)
  drafts_BxK = jnp.stack(drafts, axis=1)
  chunk_BxJ = jnp.concatenate([tok_B[:, None], drafts_BxK], axis=1)
  logits_BxJxV, cache = model.apply({'params': params}, chunk_BxJ,
                                    positions=pos_B[:, None] + jnp.arange(k + 1)[None, :],
                                    segment_ids=jnp.repeat(seg_Bx1, k + 1, axis=1), cache=cache)
  if greedy:
    target_BxJ = jnp.argmax(logits_BxJxV, axis=-1).astype(jnp.int32)
    kept_B = jnp.sum(jnp.cumprod(drafts_BxK == target_BxJ[:, :k], axis=1), axis=1)
    next_B = jnp.take_along_axis(target_BxJ, kept_B[:, None], axis=1)[:, 0]
  else:
    b, j, v = logits_BxJxV.shape
    rep = lambda x: jnp.repeat(x, j, axis=0)
    p_BxJxV = row_probs(logits_BxJxV.reshape(b * j, v),
                        {name: rep(x) for name, x in sampling.items()}).reshape(b, j, v)
    kept_B, next_B = accept(p_BxJxV, jnp.stack(qs, axis=1), drafts_BxK,
                            jax.vmap(lambda key: jax.random.fold_in(key, k))(keys_B))
  kept_B = kept_B.astype(jnp.int32)
  steps_J = jnp.arange(k + 1)
  drafts_BxJ = jnp.concatenate([drafts_BxK, drafts_BxK[:, :1]], axis=1)
  tokens_BxJ = jnp.where(steps_J[None, :] < kept_B[:, None], drafts_BxJ, next_B[:, None])
  # Target entry j holds chunk token j: the last token and proposals 1..kept stay. Draft entry
  # j holds the carry (j = 0), the last token (1) and proposal j - 1: those up to kept stay.
  # The index moves past what any live slot keeps in either cache, so the next pass
  # overwrites only what no slot kept.
  slots_J = (index + steps_J) % n_slots
  end = index + moved(jnp.max(jnp.where(live_B, kept_B, 0)) + 1, k)
  drop = lambda c, rejected_BxJ: dict(c, index=end, seg=c['seg'].at[:, slots_J].set(
      jnp.where(rejected_BxJ, 0, c['seg'][:, slots_J])))
  return (tokens_BxJ, kept_B + 1, drop(cache, steps_J[None, :] > kept_B[:, None]),
          drop(draft_cache, steps_J[None, :] > kept_B[:, None] + 1))


def moved(made_max, k: int):
  """How far a pass moves the shared index when its slots made at most `made_max` tokens: past
  the target's kept entries (made_max of them) and the draft's (one more, its carry), at most
  the k + 1 written."""
  return jnp.minimum(made_max + 1, k + 1)

