"""Metric sinks: `metrics.jsonl` and TensorBoard event files in the workdir, plus a progress line."""

import json
import logging
import math
import time

import jax
from etils import epath

from experiments.errors import UserError


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
    # Events a killed run wrote past its checkpoint are purged, as in metrics.jsonl.
    self._tb = SummaryWriter(str(epath.Path(workdir) / 'tensorboard'), purge_step=resume_step + 1)

  def _truncate_after(self, step: int) -> None:
    """Drops lines a killed run logged past its last checkpoint, so resumed steps are not doubled.

    A torn last line (a write cut short by a kill or a full disk) is dropped with a warning;
    any other line that does not parse is kept as it is.
    """
    if not self.path.exists():
      return
    lines = [l for l in self.path.read_text().splitlines() if l.strip()]
    keep = []
    for i, line in enumerate(lines):
      try:
        record = json.loads(line)
      except ValueError:
        if i == len(lines) - 1:
          logging.warning('%s: dropped a torn last line (%d characters)', self.path, len(line))
        else:
          keep.append(line)
        continue
      if not isinstance(record, dict) or record.get('step', 0) <= step:
        keep.append(line)
    tmp = self.path.parent / (self.path.name + '.tmp')
    tmp.write_text(''.join(l + '\n' for l in keep))
    tmp.replace(self.path)

  def write(self, step: int, scalars: dict) -> None:
    """Appends one line of scalars; non-finite values are written as null (JSON has no NaN)."""
    if not self.active:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    record = {k: v if math.isfinite(v) else None for k, v in scalars.items()}
    with self.path.open('a') as f:
      f.write(json.dumps(dict(step=step, **record)) + '\n')
    for k, v in scalars.items():
      if math.isfinite(v):
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


def records(workdir) -> list:
  """The readable lines of a workdir's metrics.jsonl as dicts (others skipped)."""
  path = epath.Path(workdir) / 'metrics.jsonl'
  out = []
  for line in path.read_text().splitlines() if path.exists() else []:
    try:
      record = json.loads(line)
    except ValueError:
      continue
    if isinstance(record, dict):
      out.append(record)
  return out


class Diverged(UserError):
  """The run stopped on non-finite losses or gradients (config.nonfinite)."""


class StepMonitor:
  """Reads each step's metrics one step late, so the device never waits for the host.

  `push(step, metrics)` hands over the metrics of a step just dispatched and reads the previous
  step's (computed by then, or nearly). Every step's `finite` flag is checked: a skipped step is
  reported, and the run stops (raising `Diverged`) on the first one with `nonfinite='stop'` or
  after `max_nonfinite_steps` in a row. Log steps are written to the `MetricWriter`.
  """

  def __init__(self, config, writer: MetricWriter, progress: Progress, format_scalars):
    self.config, self.writer, self.progress = config, writer, progress
    self._scalars = format_scalars   # (step, metrics) -> dict of scalars to write
    self.pending = None
    self.streak = self.skipped = 0
    self.last_checkpoint = None
    self._t_last, self._steps_since = time.perf_counter(), 0

  def push(self, step: int, metrics) -> None:
    self.flush()
    self.pending = (step, metrics)

  def flush(self, log: bool = False):
    """Reads the pending step now; returns its metrics on the host (None if nothing pending)."""
    if self.pending is None:
      return None
    step, metrics = self.pending
    self.pending = None
    self._steps_since += 1
    m = jax.device_get(metrics)
    self._check_finite(step, m)
    if log or step % self.config.log_every == 0 or step == self.config.num_train_steps:
      self._log(step, m)
    return m

  def restart_clock(self) -> None:
    """Excludes time spent outside training steps (evaluation) from tokens/s."""
    self._t_last, self._steps_since = time.perf_counter(), 0

  def _check_finite(self, step: int, m) -> None:
    if bool(m['finite']):
      self.streak = 0
      return
    self.streak += 1
    self.skipped += 1
    what = f'loss {float(m["loss"])}, gradient norm {float(m["grad_norm"])}'
    limit = self.config.max_nonfinite_steps
    if self.config.nonfinite == 'stop' or self.streak >= limit:
      run = f' ({self.streak} steps in a row)' if self.streak > 1 else ''
      newest = ('no checkpoint yet' if self.last_checkpoint is None
                else f'the newest checkpoint is step {self.last_checkpoint}')
      raise Diverged(f'training stopped at step {step}: the loss or gradients are not finite '
                     f'({what}){run}; no such state was applied or saved ({newest}); lower the '
                     f'learning rate or check the data, then run again to resume')
    logging.warning('step %d: %s is not finite; the update was skipped (%d in a row, the run '
                    'stops at %d)', step, what, self.streak, limit)

  def _log(self, step: int, m) -> None:
    now = time.perf_counter()
    tokens = self._steps_since * self.config.batch_size * self.config.data.seq_len
    tokens_per_s = tokens / max(now - self._t_last, 1e-9)
    self._t_last, self._steps_since = now, 0
    self.writer.write(step, dict(self._scalars(step, m), tokens_per_second=tokens_per_s,
                                 skipped_steps=self.skipped))
    logging.info(self.progress.line(step, float(m['loss']), tokens_per_s))


def moe_scalars(metrics) -> dict:
  """Router statistics of an MoE step as scalars ({} for a dense model)."""
  if 'expert_load' not in metrics:
    return {}
  out = dict(moe_aux_loss=metrics['moe_aux_loss'], moe_z_loss=metrics['moe_z_loss'],
             router_entropy=metrics['router_entropy'], dropped_fraction=metrics['dropped'])
  out.update({f'expert_load/{e}': v for e, v in enumerate(metrics['expert_load'])})
  return out


def report_expert_load(m, writer: MetricWriter, step: int) -> None:
  """Logs and writes (TensorBoard text) an MoE step's per-layer expert load."""
  if m is not None and 'expert_load' in m:
    report = expert_load_report(m['expert_load_per_layer'])
    logging.info('expert load at step %d (share of routed tokens):\n%s', step, report)
    writer.write_text(step, 'expert_load', report)


def expert_load_report(load_per_layer) -> str:
  """One line per MoE layer: each expert's share of the routed tokens, with a bar."""
  lines = []
  for layer, load in enumerate(load_per_layer):
    cells = ' '.join(f'{100 * x:5.1f}%' for x in load)
    bars = ''.join(' ▁▂▃▄▅▆▇█'[min(8, int(x * len(load) * 4))] for x in load)
    lines.append(f'layer {layer}: {cells}  {bars}')
  return '\n'.join(lines)
