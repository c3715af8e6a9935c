"""Cost reports: one row per stage or sweep point, as report.json, report.md and a Pareto plot.

A row names a model (`name`) with its quality (`nats_per_byte`, lower is better), its bytes,
its forward FLOPs per token and, when measured, its forward latency (`forward_ms`) on
`device`. Ratios are to the baseline row (the first, or the one named). The plot has two
panels, quality against bytes and quality against measured latency, each with its Pareto front
(`compression.cost.pareto_front`) drawn and every point labelled.

Rows of the runners' results.json files (pruning, quantization, distillation) become report
rows with `from_results`: their variant's name, the quality after any fine-tune, the bytes the
variant holds and its timed forward pass.
"""

import math
from typing import Optional

from etils import epath

from compression import cost
from experiments import workdir as workdir_lib

FILES = ('report.json', 'report.md', 'pareto.png')


def from_results(rows: list, prefix: str = '') -> list:
  """Report rows of a runner's results.json rows (`prefix`/ before each variant's name); rows
  with no quality (none evaluated) are left out."""
  out = []
  for r in rows:
    quality = r.get('finetuned_nats_per_byte', r.get('nats_per_byte'))
    if quality is None:
      continue
    size = next((r[k] for k in ('weight_bytes', 'sparse_bytes', 'dense_bytes', 'bytes')
                 if r.get(k) is not None), None)
    flops = r.get('effective_flops_per_token', r.get('flops_per_token'))
    name = str(r.get('variant', r.get('name', '?')))
    out.append(dict(name=f'{prefix}/{name}' if prefix else name, nats_per_byte=quality,
                    bytes=size, flops_per_token=flops, forward_ms=r.get('forward_ms')))
  return out


def with_ratios(rows: list, baseline: Optional[str] = None) -> list:
  """The rows with each figure's ratio to the baseline row's (None where either is missing)."""
  if not rows:
    raise ValueError('a report needs at least one row')
  base = rows[0] if baseline is None else next((r for r in rows if r['name'] == baseline), None)
  if base is None:
    raise ValueError(f'baseline={baseline!r} is not a row; rows: '
                     f'{", ".join(r["name"] for r in rows)}')
  ratio = lambda r, k: (r[k] / base[k] if r.get(k) is not None and base.get(k) else None)
  return [dict(r, bytes_ratio=ratio(r, 'bytes'), flops_ratio=ratio(r, 'flops_per_token'),
               speedup=(base['forward_ms'] / r['forward_ms']
                        if r.get('forward_ms') and base.get('forward_ms') else None),
               quality_change=r['nats_per_byte'] - base['nats_per_byte']) for r in rows]


def markdown(rows: list, device: str = '') -> str:
  """The rows (`with_ratios`) as a markdown table, Pareto points (quality vs bytes) marked."""
  front = {r['name'] for r in cost.pareto_front([r for r in rows if r.get('bytes')], 'bytes',
                                                'nats_per_byte')}
  fmt = lambda x, f: '' if x is None else format(x, f)
  lines = ['| model | nats/byte | vs baseline | bytes | x baseline | MFLOP/token | x baseline '
           f'| forward ms{f" ({device})" if device else ""} | speedup | Pareto |',
           '|---|---|---|---|---|---|---|---|---|---|']
  for r in rows:
    mflops = None if r.get('flops_per_token') is None else r['flops_per_token'] / 1e6
    lines.append(
        f"| {r['name']} | {r['nats_per_byte']:.4f} | {r['quality_change']:+.4f} | "
        f"{fmt(r.get('bytes'), ',')} | {fmt(r['bytes_ratio'], '.3f')} | {fmt(mflops, '.2f')} | "
        f"{fmt(r['flops_ratio'], '.3f')} | {fmt(r.get('forward_ms'), '.2f')} | "
        f"{fmt(r['speedup'], '.2f')} | {'yes' if r['name'] in front else ''} |")
  return '\n'.join(lines) + '\n'


def plot(rows: list, path, title: str = '') -> None:
  """quality vs bytes and quality vs forward latency, fronts drawn, points labelled (PNG)."""
  import matplotlib   # imported here: only writing a plot needs it
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt
  fig, panels = plt.subplots(1, 2, figsize=(11, 4.2))
  for ax, key, label in ((panels[0], 'bytes', 'bytes (MB)'),
                         (panels[1], 'forward_ms', 'forward latency (ms)')):
    pts = [r for r in rows if r.get(key)]
    scale = 1e6 if key == 'bytes' else 1.0
    if not pts:
      ax.text(0.5, 0.5, f'no {key} measured', ha='center', transform=ax.transAxes)
    for r in pts:
      ax.scatter(r[key] / scale, r['nats_per_byte'], color='tab:blue', zorder=3)
      ax.annotate(r['name'], (r[key] / scale, r['nats_per_byte']), fontsize=7,
                  xytext=(3, 3), textcoords='offset points')
    front = cost.pareto_front(pts, key, 'nats_per_byte')
    if front:
      ax.step([r[key] / scale for r in front], [r['nats_per_byte'] for r in front],
              where='post', color='tab:red', label='Pareto front', zorder=2)
      ax.legend(fontsize=8)
    ax.set_xlabel(label)
    ax.set_ylabel('validation nats/byte (lower is better)')
    ax.grid(alpha=0.3)
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  tmp = epath.Path(str(path) + '.tmp.png')
  fig.savefig(str(tmp), dpi=110)
  plt.close(fig)
  tmp.replace(path)


def write(workdir, rows: list, title: str = '', baseline: Optional[str] = None,
          device: str = '') -> list:
  """report.json, report.md and pareto.png in `workdir` (each written whole, then renamed);
  returns the rows with their ratios."""
  rows = with_ratios(rows, baseline)
  for r in rows:
    if not math.isfinite(r['nats_per_byte']):
      raise ValueError(f'row {r["name"]!r} has nats_per_byte={r["nats_per_byte"]}')
  workdir = epath.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  workdir_lib.write_json(workdir / 'report.json', dict(title=title, device=device, rows=rows))
  workdir_lib.write_text(workdir / 'report.md',
                         (f'{title}\n\n' if title else '') + markdown(rows, device))
  plot(rows, workdir / 'pareto.png', title)
  return rows
