"""Metric sinks: `metrics.jsonl` and TensorBoard event files in the workdir, plus a progress line."""

import json
import math
import time

import jax
from etils import epath


class MetricWriter:
  """Writes scalars from process 0 only; other processes get a no-op writer."""

  def __init__(self, workdir, resume_step: int = 0):
    self.active = jax.process_index() == 0
    self.path = epath.Path(workdir) / 'metrics.jsonl'
    self._tb = None
    if not self.active:
      return
    self._truncate_after(resume_step)
    from tensorboardX import SummaryWriter   # imported lazily: only the writing process needs it
    self._tb = SummaryWriter(str(epath.Path(workdir) / 'tensorboard'))

  def _truncate_after(self, step: int) -> None:
    """Drops lines a killed run logged past its last checkpoint, so resumed steps are not doubled."""
    if not self.path.exists():
      return
    lines = [l for l in self.path.read_text().splitlines() if l.strip()]
    keep = [l for l in lines if json.loads(l).get('step', 0) <= step]
    tmp = self.path.parent / (self.path.name + '.tmp')
    tmp.write_text(''.join(l + '\n' for l in keep))
    tmp.replace(self.path)

  def write(self, step: int, scalars: dict) -> None:
    if not self.active:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    bad = [k for k, v in scalars.items() if not math.isfinite(v)]
    if bad:
      raise FloatingPointError(f'non-finite metrics at step {step}: {", ".join(bad)}')
    with self.path.open('a') as f:
      f.write(json.dumps(dict(step=step, **scalars)) + '\n')
    for k, v in scalars.items():
      self._tb.add_scalar(k, v, step)

  def write_text(self, step: int, name: str, text: str) -> None:
    if self.active:
      self._tb.add_text(name, text, step)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


class Progress:
  """Formats 'step 120/3000 | loss 1.712 | 14.1k tok/s | MFU 41.2% | ETA 6m02s'."""

  def __init__(self, total_steps: int, start_step: int, flops_per_token: float, peak_flops):
    self.total, self.flops_per_token, self.peak = total_steps, flops_per_token, peak_flops
    self.t0, self.step0 = time.perf_counter(), start_step

  def line(self, step: int, loss: float, tokens_per_s: float) -> str:
    parts = [f'step {step}/{self.total}', f'loss {loss:.4f}', f'{tokens_per_s / 1e3:.1f}k tok/s']
    if self.peak:
      parts.append(f'MFU {100 * tokens_per_s * self.flops_per_token / self.peak:.1f}%')
    elapsed = time.perf_counter() - self.t0
    done = max(step - self.step0, 1)
    eta = elapsed / done * (self.total - step)
    parts.append(f'ETA {int(eta // 60)}m{int(eta % 60):02d}s')
    return ' | '.join(parts)
