"""A continuous-batching serving engine with priorities and preemption.

Requests wait in a queue ordered by priority (higher first) and then arrival. Each `step()`
first admits waiting requests into free decode slots (prefilling new prompts, a batch per prompt
bucket, or restoring preempted ones), then runs one decode step for every live slot and streams
each slot's new token. A request finishes at a stop token or its token limit and frees its slot
at once, so the next one starts without waiting for the rest of a batch.

When every slot is busy and a waiting request has a higher priority than the lowest running one,
that one is preempted: its slot's cache entries are swapped out to host memory and it is queued
again at its place of arrival; when a slot frees it is swapped back in (`models.slots.restore`)
and continues with the tokens it had, exactly as if it had never left.

  engine = Engine(model, params, slots=8, max_len=256)
  results = engine.run([Request(prompt=[1, 2, 3], max_new_tokens=20), ...])

Bad requests finish at once with `finish_reason='error'` and a one-line `error`; the others are
served as usual. All programs are fixed-shape: `compiles()` counts them (per ring length: at
most two per prompt bucket and slot-batch size, two decode steps, one swap each way; and one
resize per pair of ring lengths met).

The cache's ring follows what the live requests span: it grows before a call would overwrite a
live entry and shrinks once half of it would do (`models.slots.resize`), so a decode step reads
little more than what is live. Decode calls are pipelined: each `step()` starts the next call
before it reads the tokens of the one before, so the host's streaming, scheduling and dispatch
overlap the device's work.

With `draft=(draft_model, draft_params)` every decode step is a speculative pass
(`models.speculative`): the draft proposes `draft_tokens` tokens per slot, the target verifies
them in one forward pass, and each slot takes the tokens the rejection rule keeps (greedy: the
target's own tokens; sampled: the target's distribution). The draft keeps its own slot cache
beside the target's, prefilled, swapped and restored with it; `stats` counts proposals and
acceptances.
"""

import dataclasses
import itertools
import time
from typing import Callable, Iterable, Optional, Sequence

import jax
import numpy as np

from experiments.requests import Request, Result, check
from models import slots as slots_lib
from models import speculative
from models.attention import cache_bytes, cache_length, cache_storage, init_cache
from models.decode import pad_prompts


@dataclasses.dataclass
class _Entry:
  """A request the engine holds: waiting, running in `slot`, or swapped out (`saved`)."""
  request: Request
  result: Result
  seq: int                       # arrival order, kept through preemption
  slot: Optional[int] = None
  saved: Optional[tuple] = None  # host copies of its cache entries (target, draft) while out
  span: int = 0                  # cache entries from its first one to the shared index
  in_flight: int = 0             # its tokens in the decode call still running
  carry: int = -1                # speculative: its slot's carry while swapped out


MIN_RING = 16   # the shortest ring: a few programs for short requests, not one per length


def default_buckets(max_len: int) -> tuple:
  """Prompt buckets: powers of two from 8 up to `max_len` (and `max_len` itself)."""
  out = [8]
  while out[-1] * 2 < max_len:
    out.append(out[-1] * 2)
  return tuple(b for b in out if b < max_len) + (max_len,)


class Engine:
  """Serves `Request`s from `slots` decode slots of a model's parameters (float or quantized).

  Args:
    model: a `models.Transformer`.
    params: its parameter tree (quantized leaves run through the seam as usual).
    slots: requests decoded together.
    max_len: the most tokens (prompt bucket plus new tokens) one request may span; None: the
      model's max_len.
    kv_cache_dtype: cache storage, one of `models.config.KV_CACHE_DTYPES` (None: the config's).
    buckets: prompt lengths compiled for (each prompt is left-padded to the next).
    pad_id: the id padding prompts.
    clock: the time source for the results' timestamps.
    draft: (model, params) of a draft model for speculative decoding (same vocabulary), or None.
    draft_tokens: proposals per speculative pass (k).
    steps_per_call: the most decode steps run in one program between two admissions (1:
      admit and stream every step). More steps spare the host's per-step work. A call stops
      where the first of its requests reaches its token limit (its steps are that many
      rounded down to a power of two, so that few programs are compiled), so a slot frees on
      time; a request that ends on a stop token mid-call wastes the rest of the call's steps on
      its slot.
  """

  def __init__(self, model, params, *, slots: int = 8, max_len: Optional[int] = None,
               kv_cache_dtype: Optional[str] = None, buckets: Optional[Sequence[int]] = None,
               pad_id: int = 0, clock: Callable[[], float] = time.perf_counter,
               draft: Optional[tuple] = None, draft_tokens: int = 4, steps_per_call: int = 1):
    cfg = model.config
    max_len = cfg.max_len if max_len is None else max_len
    if slots < 1:
      raise ValueError(f'slots={slots} must be at least 1')
    if not 1 < max_len <= cfg.max_len:
      raise ValueError(f'max_len={max_len} must be in [2, the model max_len={cfg.max_len}]')
    self.buckets = tuple(sorted(set(buckets or default_buckets(max_len))))
    if self.buckets[0] < 1 or self.buckets[-1] > max_len:
      raise ValueError(f'buckets={self.buckets} must lie in [1, max_len={max_len}]')
    self.model, self.params, self.slots, self.max_len = model, params, slots, max_len
    self.storage = cache_storage(cfg, kv_cache_dtype)
    self.pad_id, self.clock = pad_id, clock
    # The ring grows and shrinks with what live requests span (`_fit_ring`), up to `full`.
    self.full = cache_length(cfg, max_len)
    self.cache = init_cache(cfg, slots, min(MIN_RING, self.full), self.storage)
    if not isinstance(steps_per_call, int) or steps_per_call < 1:
      raise ValueError(f'steps_per_call={steps_per_call!r} must be an integer >= 1')
    self.steps_per_call = steps_per_call
    self.draft, self.draft_tokens, self.draft_cache = None, 0, None
    if draft is not None:
      if steps_per_call != 1:
        raise ValueError(f'steps_per_call={steps_per_call} applies without a draft only (a '
                         f'speculative pass is already several tokens)')
      self._init_draft(draft, draft_tokens)
    # Cache entries one new token may take: a speculative pass writes k + 1 for at least one.
    self.entries_per_token = self.draft_tokens + 1
    # Entries one decode call writes: a speculative pass k + 1, else one per step.
    self.entries_per_call = self.draft_tokens + 1 if self.draft is not None else steps_per_call
    self.stats = dict(passes=0, slot_passes=0, proposed=0, accepted=0)
    self._inflight = None   # (tokens [n, B] or [B], {slot: entry}, last tokens [B]) on device
    self.results: dict = {}
    self._waiting: list = []
    self._running: dict = {}                # slot -> _Entry
    self._seq = itertools.count()
    self._names = itertools.count()
    # Per-slot decode inputs, kept on the host and sent with each step.
    self._tok = np.zeros(slots, np.int32)
    self._pos = np.zeros(slots, np.int32)
    self._carry = np.full(slots, -1, np.int32)   # speculative: a kept proposal the draft owes

  def _init_draft(self, draft, k: int) -> None:
    if not (isinstance(draft, (tuple, list)) and len(draft) == 2):
      raise ValueError(f'draft must be a (model, params) pair, got {type(draft).__name__}')
    model, cfg = draft[0], draft[0].config
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
      raise ValueError(f'draft_tokens={k!r} must be an integer >= 1')
    if cfg.vocab_size != self.model.config.vocab_size:
      raise ValueError(f'the draft vocab_size={cfg.vocab_size} differs from the target '
                       f'vocab_size={self.model.config.vocab_size}')
    for name, c in (('target', self.model.config), ('draft', cfg)):
      # Rejected entries leave gaps in the ring, which a window counted in entries would misread.
      if c.sliding_window is not None:
        raise ValueError(f'speculative decoding needs full attention; the {name} has '
                         f'sliding_window={c.sliding_window}')
    if cfg.max_len < self.max_len:
      raise ValueError(f'the draft max_len={cfg.max_len} is below the engine max_len='
                       f'{self.max_len}')
    self.draft, self.draft_params, self.draft_tokens = model, draft[1], k
    self.draft_cache = init_cache(cfg, self.slots, self.cache['pos'].shape[1], self.storage)

  # --- the client's side -------------------------------------------------------------------

  def submit(self, request, arrival: Optional[float] = None) -> str:
    """Queues a `Request` (or its dict); returns its id. A bad one finishes at once with its
    error; one whose id is taken is named `<id>#<n>` for that error. `arrival`: when it
    arrived on the engine's clock (None: now), the origin of its time to first token."""
    now = self.clock() if arrival is None else arrival
    rid = request.get('id', '') if isinstance(request, dict) else getattr(request, 'id', '')
    rid = str(rid) if rid else f'req{next(self._names)}'
    result = Result(id=rid, arrival=now)
    try:
      if rid in self.results:
        # The refusal gets a name of its own, so the first request's result stays as it is.
        rid = result.id = f'{rid}#{next(self._names)}'
        raise ValueError(f'id {rid.split("#")[0]!r} is already in use')
      request = self._checked(request, rid)
    except (ValueError, TypeError) as e:
      result.finish_reason, result.error = 'error', f'request {rid}: {e}'
      self.results[rid] = result
      return rid
    result.priority = request.priority
    self.results[rid] = result
    self._waiting.append(_Entry(request, result, next(self._seq)))
    return rid

  def refusal(self, request) -> str:
    """Why this engine would refuse `request` ('' if it would serve it); queues nothing."""
    try:
      self._checked(request, 'checked')
    except (ValueError, TypeError) as e:
      return str(e)
    return ''

  def _checked(self, request, rid: str) -> Request:
    if isinstance(request, dict):
      request = Request.from_dict(request)
    request = dataclasses.replace(request, id=rid)
    check(request, self.model.config.vocab_size, self.max_len,
          self.bucket(len(request.prompt)), self.entries_per_token)
    # A speculative pass scores positions up to k past the request's last token.
    span = len(request.prompt) + request.max_new_tokens + self.draft_tokens
    for m in (self.model, self.draft):
      if m is not None and m.config.position == 'learned' and span > m.config.max_len:
        raise ValueError(f'prompt of {len(request.prompt)} tokens plus max_new_tokens='
                         f'{request.max_new_tokens} (plus {self.draft_tokens} proposed) '
                         f'exceeds the model max_len={m.config.max_len}')
    return request

  def run(self, requests: Iterable = (), on_token: Optional[Callable] = None) -> dict:
    """Submits `requests`, steps until every request is done; returns {id: Result}."""
    ids = [self.submit(r) for r in requests]
    while self.busy:
      for rid, token in self.step():
        if on_token is not None:
          on_token(rid, token)
    return {rid: self.results[rid] for rid in ids} if ids else dict(self.results)

  @property
  def busy(self) -> bool:
    """Whether any request is waiting or running."""
    return bool(self._waiting or self._running or self._inflight)

  @property
  def running(self) -> int:
    """Requests decoding in a slot now."""
    return len(self._running)

  @property
  def waiting(self) -> int:
    """Requests queued: new, or preempted and swapped out."""
    return len(self._waiting)

  def bucket(self, n: int) -> Optional[int]:
    """The prompt bucket for `n` tokens (None if longer than every bucket)."""
    return next((b for b in self.buckets if b >= n), None)

  def cache_bytes(self) -> int:
    """Bytes of the slots' KV cache at its longest ring (entries, scales and bookkeeping)."""
    return cache_bytes(jax.eval_shape(lambda: init_cache(self.model.config, self.slots,
                                                         self.full, self.storage)))

  @property
  def ring(self) -> int:
    """Cache entries per slot now (they follow what the live requests span)."""
    return self.cache['pos'].shape[1]

  def compiles(self) -> int:
    """Programs compiled so far by the slot programs (every engine in this process)."""
    fns = (slots_lib.prefill, slots_lib.insert, slots_lib.step, slots_lib.steps,
           slots_lib.resize, slots_lib.first_tokens, slots_lib.extract,
           slots_lib.restore, speculative.speculate)
    return sum(f._cache_size() for f in fns)

  # --- one engine iteration ----------------------------------------------------------------

  def step(self) -> list:
    """Admits what fits, starts the next decode call for every live slot and emits the tokens
    of the call before it; returns (id, token) pairs in the order they were made."""
    events = []
    self._admit(events)
    if self._running or self._inflight:
      self._decode(events)
    return events

  def _admit(self, events: list) -> None:
    placed = []
    free = [s for s in range(self.slots) if s not in self._running]
    while self._waiting:
      entry = min(self._waiting, key=lambda e: (-e.request.priority, e.seq))
      if not free:
        victim = min(self._running.values(), key=lambda e: (e.request.priority, -e.seq))
        if victim.request.priority >= entry.request.priority:
          break
        free.append(self._preempt(victim))
      self._waiting.remove(entry)
      entry.slot = free.pop(0)
      self._running[entry.slot] = entry
      placed.append(entry)
    fresh = [e for e in placed if not e.result.tokens]
    for entry in fresh:
      entry.span = self.bucket(len(entry.request.prompt))
    if self._running:
      self._fit_ring()
    for entry in [e for e in placed if e.saved is not None]:
      row = np.int32(entry.slot)
      self.cache = slots_lib.restore(self.cache, slots_lib.fit(entry.saved[0], self.ring), row)
      if self.draft is not None:
        self.draft_cache = slots_lib.restore(self.draft_cache,
                                             slots_lib.fit(entry.saved[1], self.ring), row)
        self._carry[entry.slot] = entry.carry
      entry.saved = None
      # The next decode input: its last token, at the position after its prompt and tokens.
      self._tok[entry.slot] = entry.result.tokens[-1]
      self._pos[entry.slot] = len(entry.request.prompt) + len(entry.result.tokens) - 1
    for bucket in sorted({self.bucket(len(e.request.prompt)) for e in fresh}):
      self._prefill([e for e in fresh if self.bucket(len(e.request.prompt)) == bucket],
                    bucket, events)

  def _preempt(self, entry: _Entry) -> int:
    slot = entry.slot
    row = np.int32(slot)
    entry.carry = int(self._carry[slot])
    entry.saved = jax.device_get((
        slots_lib.extract(self.cache, row),
        None if self.draft is None else slots_lib.extract(self.draft_cache, row)))
    entry.slot = None
    entry.result.preemptions += 1
    del self._running[slot]
    self._waiting.append(entry)
    return slot

  def _prefill(self, entries: list, bucket: int, events: list) -> None:
    rows = 1 << (len(entries) - 1).bit_length()    # a power of two: few compiled batch sizes
    prompts = [e.request.prompt for e in entries]
    prompts += [prompts[0]] * (rows - len(entries))
    tokens, seg, pos = pad_prompts(prompts, self.pad_id, bucket)
    logits, kv = slots_lib.prefill(self.params, tokens, seg, pos, model=self.model,
                                   storage=self.storage)
    sampling = _sampling([e.request for e in entries] + [None] * (rows - len(entries)))
    first = np.asarray(slots_lib.first_tokens(logits, sampling, greedy=_all_greedy(entries)))
    draft_kv = None
    if self.draft is not None:
      _, draft_kv = slots_lib.prefill(self.draft_params, tokens, seg, pos, model=self.draft,
                                      storage=self.storage)
    for i, entry in enumerate(entries):
      self.cache = slots_lib.insert(self.cache, kv, np.int32(entry.slot), np.int32(i))
      if draft_kv is not None:
        self.draft_cache = slots_lib.insert(self.draft_cache, draft_kv, np.int32(entry.slot),
                                            np.int32(i))
      self._tok[entry.slot] = first[i]
      self._pos[entry.slot] = len(entry.request.prompt)
      self._carry[entry.slot] = -1
      self._emit(entry, int(first[i]), events)

  def _decode(self, events: list) -> None:
    """Starts the next decode call, then emits the previous call's tokens while it runs.

    The host's work between two calls (streaming, stop checks, admission, the call's own
    dispatch) thus overlaps the device's: the next call takes a slot's input token straight
    from the previous call's output. The price is that a request ending on a stop token is
    seen one call late; the call made meanwhile wastes its slot, and its token is dropped.
    """
    if self.draft is not None:
      return self._speculate(events)
    previous, self._inflight = self._inflight, None
    # A request whose last tokens are already in flight needs no further call.
    left = {s: e.request.max_new_tokens - len(e.result.tokens) - e.in_flight
            for s, e in self._running.items()}
    run = {s: e for s, e in self._running.items() if left[s] > 0}
    if run:
      n = 1 << (min(self.steps_per_call, *(left[s] for s in run)).bit_length() - 1)
      live, sampling, count = self._inputs(run)
      # Copies: a call may still read its NumPy inputs after dispatch, while the host moves on.
      tok, pos = self._tok.copy(), self._pos.copy()
      fed, last = np.zeros(self.slots, bool), tok
      if previous is not None:   # the previous call's last tokens, still on the device
        fed = np.array([previous[1].get(s) is run.get(s) for s in range(self.slots)]) & live
        last = previous[2]
      args = (self.params, self.cache, tok, fed, last, pos, live, sampling, count)
      kwargs = dict(model=self.model, greedy=_all_greedy(run.values()))
      if n == 1:
        tokens, self.cache = slots_lib.step(*args, **kwargs)
        last = tokens
      else:
        tokens, last, self.cache = slots_lib.steps(*args, n=n, **kwargs)
      for slot, entry in run.items():
        entry.span += n
        entry.in_flight += n
        self._pos[slot] += n
      self._inflight = (tokens, run, last)
    if previous is not None:
      tokens = np.asarray(previous[0]).reshape(-1, self.slots)   # [steps of the call, B]
      for slot, entry in sorted(previous[1].items()):
        entry.in_flight -= tokens.shape[0]
        if not entry.result.done:
          self._emit_row(entry, tokens[:, slot], events)

  def _inputs(self, run: dict) -> tuple:
    """The live mask, sampling parameters and tokens made so far of the slots in `run`."""
    live = np.zeros(self.slots, bool)
    live[list(run)] = True
    requests = [run[s].request if live[s] else None for s in range(self.slots)]
    count = np.array([len(run[s].result.tokens) + run[s].in_flight if live[s] else 0
                      for s in range(self.slots)], np.int32)
    return live, _sampling(requests), count

  def _speculate(self, events: list) -> None:
    """One speculative pass for every live slot (synchronous: the next pass needs how many
    tokens each slot kept)."""
    k = self.draft_tokens
    live, sampling, count = self._inputs(self._running)
    tokens, made, self.cache, self.draft_cache = speculative.speculate(
        self.params, self.cache, self.draft_params, self.draft_cache, self._tok, self._pos,
        live, self._carry, sampling, count, model=self.model, draft=self.draft, k=k,
        greedy=_all_greedy(self._running.values()))
    tokens, made = np.asarray(tokens), np.asarray(made)
    moved = int(speculative.moved(made[live].max(), k))   # as the pass moved the index
    for entry in self._running.values():
      entry.span += moved
    self.stats['passes'] += 1
    for slot, entry in sorted(self._running.items()):
      self.stats['slot_passes'] += 1
      self.stats['proposed'] += k
      self.stats['accepted'] += int(made[slot]) - 1
      self._emit_row(entry, tokens[slot, :made[slot]], events)
      self._tok[slot] = entry.result.tokens[-1]
      self._pos[slot] += made[slot]
      # All k kept: the draft has not seen the k-th proposal; its next pass reads it first.
      self._carry[slot] = tokens[slot, k - 1] if made[slot] == k + 1 else -1

  def _fit_ring(self) -> None:
    """Grows the ring (both caches) to hold every live request's span plus the entries the
    next call writes, or shrinks it once half of it would do; lengths are 2^n or 1.5 x 2^n (at
    least MIN_RING, at most `full`), so that few programs are compiled and at most a third
    more is read than needed."""
    need = max(MIN_RING, max(e.span for e in self._running.values()) + self.entries_per_call)
    power = 1 << (need - 1).bit_length()
    length = min(self.full, power * 3 // 4 if power * 3 // 4 >= need else power)
    if length > self.ring or 2 * length <= self.ring:
      self.cache = slots_lib.resize(self.cache, length=length)
      if self.draft is not None:
        self.draft_cache = slots_lib.resize(self.draft_cache, length=length)

  def acceptance_rate(self) -> Optional[float]:
    """The share of proposed draft tokens the target kept so far (None before any pass)."""
    return self.stats['accepted'] / self.stats['proposed'] if self.stats['proposed'] else None

  def _emit_row(self, entry: _Entry, tokens, events: list) -> None:
    """Emits a slot's new tokens in order until its request finishes (the rest are dropped)."""
    for token in tokens:
      self._emit(entry, int(token), events)
      if entry.result.done:
        return

  def _emit(self, entry: _Entry, token: int, events: list) -> None:
    result, request = entry.result, entry.request
    result.tokens.append(token)
    result.token_times.append(self.clock())
    events.append((result.id, token))
    if token in request.stop_tokens:
      result.finish_reason = 'stop'
    elif len(result.tokens) >= request.max_new_tokens:
      result.finish_reason = 'length'
    if result.done:
      self._running.pop(entry.slot, None)
      entry.slot = None
      if entry in self._waiting:   # preempted while its last token was in flight
        self._waiting.remove(entry)


def _all_greedy(entries) -> bool:
  return all(e.request.temperature == 0 for e in entries)


def _sampling(requests: list) -> dict:
  """Per-row sampling parameters (rows without a request: greedy, unfiltered)."""
  get = lambda name, default, dtype: np.array(
      [getattr(r, name) if r is not None else default for r in requests], dtype)
  return dict(temperature=get('temperature', 0.0, np.float32), top_k=get('top_k', 0, np.int32),
              top_p=get('top_p', 1.0, np.float32), seed=get('seed', 0, np.uint32))
