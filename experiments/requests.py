"""Serving requests and their results: what a client may ask for, checked field by field."""

import dataclasses
from typing import Optional, Sequence

FINISH_REASONS = ('stop', 'length', 'error')


@dataclasses.dataclass
class Request:
  """One completion request: a prompt of token ids and how to continue it."""
  prompt: Sequence[int]
  max_new_tokens: int = 32
  temperature: float = 0.0        # 0: greedy
  top_k: int = 0                  # sample among the k most likely tokens (0: all)
  top_p: float = 1.0              # ... then among the smallest set of mass top_p (1: all)
  stop_tokens: Sequence[int] = () # ids that end the request (kept in its output)
  priority: int = 0               # higher is served first and may preempt lower
  seed: int = 0                   # the request's own sampling key
  id: str = ''                    # '' : the engine names it

  @classmethod
  def from_dict(cls, d: dict) -> 'Request':
    """A request from a JSON object; an unknown field is an error naming the allowed ones."""
    if not isinstance(d, dict):
      raise ValueError(f'a request must be a JSON object, got {type(d).__name__}')
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(d) - set(names))
    if unknown:
      raise ValueError(f'unknown request field {unknown[0]!r}; allowed: {", ".join(names)}')
    if 'prompt' not in d:
      raise ValueError('a request needs a prompt (a list of token ids)')
    return cls(**d)


@dataclasses.dataclass
class Result:
  """What the engine made of a request, with the times (engine clock, seconds) it happened."""
  id: str
  tokens: list = dataclasses.field(default_factory=list)
  finish_reason: Optional[str] = None   # one of FINISH_REASONS once finished
  error: str = ''
  priority: int = 0
  arrival: float = 0.0
  token_times: list = dataclasses.field(default_factory=list)
  preemptions: int = 0

  @property
  def done(self) -> bool:
    return self.finish_reason is not None

  @property
  def ttft(self) -> Optional[float]:
    """Time to first token: arrival to the first token."""
    return self.token_times[0] - self.arrival if self.token_times else None

  @property
  def latency(self) -> Optional[float]:
    """Arrival to the last token."""
    return self.token_times[-1] - self.arrival if self.token_times else None


def check(r: Request, vocab_size: int, room: int, bucket: Optional[int],
          entries_per_token: int = 1) -> None:
  """Raises ValueError naming the first field of `r` that cannot be served.

  `room`: the most cache entries a request may use (its prompt's bucket plus
  `entries_per_token` per new token); `bucket`: its prompt's bucket length (None: longer than
  every bucket).
  """
  def is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)
  prompt = r.prompt
  if not isinstance(prompt, (list, tuple)) or not prompt:
    raise ValueError('prompt must be a non-empty list of token ids')
  bad = [t for t in prompt if not is_int(t) or not 0 <= t < vocab_size]
  if bad:
    raise ValueError(f'prompt token {bad[0]!r} is not an id in [0, {vocab_size})')
  if not is_int(r.max_new_tokens) or r.max_new_tokens < 1:
    raise ValueError(f'max_new_tokens={r.max_new_tokens!r} must be an integer >= 1')
  if bucket is None or bucket + entries_per_token * r.max_new_tokens > room:
    per = f' x {entries_per_token} entries each' if entries_per_token > 1 else ''
    raise ValueError(f'a prompt of {len(prompt)} tokens (bucket {bucket or "none"}) plus '
                     f'max_new_tokens={r.max_new_tokens}{per} exceeds the {room} cache entries '
                     f'a request may use')
  if not isinstance(r.temperature, (int, float)) or not r.temperature >= 0:
    raise ValueError(f'temperature={r.temperature!r} must be a number >= 0')
  if not is_int(r.top_k) or not 0 <= r.top_k < 2**31:   # int32 on the device
    raise ValueError(f'top_k={r.top_k!r} must be an integer in [0, 2**31) (0: off)')
  if not isinstance(r.top_p, (int, float)) or not 0 < r.top_p <= 1:
    raise ValueError(f'top_p={r.top_p!r} must be in (0, 1]')
  if (not isinstance(r.stop_tokens, (list, tuple))
      or not all(is_int(t) for t in r.stop_tokens)):
    raise ValueError(f'stop_tokens={r.stop_tokens!r} must be a list of token ids')
  for name in ('priority', 'seed'):
    if not is_int(getattr(r, name)):
      raise ValueError(f'{name}={getattr(r, name)!r} must be an integer')
  if not 0 <= r.seed < 2**32:
    raise ValueError(f'seed={r.seed} must be in [0, 2**32)')
