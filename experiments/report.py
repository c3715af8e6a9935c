"""Cost reports: one row per stage or sweep point, as report.json, report.md and a Pareto plot.

A row names a model (`name`) with its quality (`nats_per_byte`, lower is better), its bytes,
its forward FLOPs per token and, when measured on `device`, its forward latency
(`forward_ms`), its greedy decoding speed for one request (`decode_tokens_per_s`) and the
decode program's bytes (`peak_bytes`); given the device's price per hour, also what a million
decoded tokens cost. Ratios are to the baseline row (the first, or the one named). The plot
has three panels, quality against bytes, against forward latency and against decode latency
per token, each with its Pareto front (`compression.cost.pareto_front`) drawn and every point
labelled.

Rows of the runners' results.json files (pruning, quantization, distillation) become report
rows with `from_results`: their variant's name, the quality after any fine-tune, the bytes the
variant holds, its FLOPs and its measured figures.
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
    # A pruned model is held in the smaller of dense storage and non-zeros + a bitmask.
    stored = [r[k] for k in ('sparse_bytes', 'dense_bytes') if r.get(k) is not None]
    if r.get('storage_bytes'):
      stored.append(sum(r['storage_bytes'].values()))
    size = next((r[k] for k in ('weight_bytes', 'bytes') if r.get(k) is not None),
                min(stored) if stored else None)
    # FLOPs a token runs; less the zero weights only of a pruned model (`sparsity` rows): a
    # quantized code at its zero point is multiplied all the same.
    flops = (r.get('effective_flops_per_token') if 'sparsity' in r else
             r.get('flops_per_token', r.get('effective_flops_per_token')))
    name = str(r.get('variant', r.get('name', '?')))
    out.append(dict(name=f'{prefix}/{name}' if prefix else name, nats_per_byte=quality,
                    bytes=size, flops_per_token=flops, forward_ms=r.get('forward_ms'),
                    decode_tokens_per_s=r.get('decode_tokens_per_s'),
                    peak_bytes=r.get('decode_peak_bytes'), device=r.get('device')))
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
               decode_speedup=ratio(r, 'decode_tokens_per_s'),
               quality_change=r['nats_per_byte'] - base['nats_per_byte']) for r in rows]


def with_prices(rows: list, price_per_hour: Optional[float]) -> list:
  """The rows with `usd_per_million_tokens`: what decoding a million tokens for one request
  costs at `price_per_hour` for the device (`compression.cost.Measured`); None where no decode
  was timed or no price is given."""
  out = []
  for r in rows:
    rate = r.get('decode_tokens_per_s')
    price = None
    if price_per_hour is not None and rate:
      price = cost.Measured(str(r.get('device') or ''), decode_tokens_per_s=rate
                            ).price_per_million_tokens(price_per_hour)
    out.append(dict(r, usd_per_million_tokens=price))
  return out


def markdown(rows: list, device: str = '') -> str:
  """The rows (`with_ratios`, optionally `with_prices`) as a markdown table, Pareto points
  (quality vs bytes) marked; the price column only when a price was given."""
  front = {r['name'] for r in cost.pareto_front([r for r in rows if r.get('bytes')], 'bytes',
                                                'nats_per_byte')}
  priced = any(r.get('usd_per_million_tokens') is not None for r in rows)
  fmt = lambda x, f: '' if x is None else format(x, f)
  scaled = lambda x, s: None if x is None else x / s
  on = f' ({device})' if device else ''
  lines = ['| model | nats/byte | vs baseline | bytes | x baseline | MFLOP/token | x baseline '
           f'| forward ms{on} | speedup | decode tokens/s{on} | x baseline | decode peak MB '
           f'{"| $ per M tokens " if priced else ""}| Pareto |',
           '|---' * (14 if priced else 13) + '|']
  for r in rows:
    price = f"| {fmt(r.get('usd_per_million_tokens'), '.4f')} " if priced else ''
    lines.append(
        f"| {r['name']} | {r['nats_per_byte']:.4f} | {r['quality_change']:+.4f} | "
        f"{fmt(r.get('bytes'), ',')} | {fmt(r['bytes_ratio'], '.3f')} | "
        f"{fmt(scaled(r.get('flops_per_token'), 1e6), '.2f')} | {fmt(r['flops_ratio'], '.3f')} | "
        f"{fmt(r.get('forward_ms'), '.2f')} | {fmt(r['speedup'], '.2f')} | "
        f"{fmt(r.get('decode_tokens_per_s'), '.1f')} | {fmt(r.get('decode_speedup'), '.2f')} | "
        f"{fmt(scaled(r.get('peak_bytes'), 1e6), '.2f')} {price}| "
        f"{'yes' if r['name'] in front else ''} |")
  return '\n'.join(lines) + '\n'


def plot(rows: list, path, title: str = '') -> None:
  """Quality vs bytes, vs forward latency and vs decode latency per token: fronts drawn,
  points labelled (PNG)."""
  import matplotlib   # imported here: only writing a plot needs it
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt
  # Long names (sweep points) are numbered on the panels and listed under them.
  numbered = any(len(r['name']) > 14 for r in rows)
  rows = [dict(r, decode_ms=1e3 / r['decode_tokens_per_s'] if r.get('decode_tokens_per_s')
               else None, label=str(i + 1) if numbered else r['name'])
          for i, r in enumerate(rows)]
  fig, panels = plt.subplots(1, 3, figsize=(15, 4.4 + (0.22 * len(rows) if numbered else 0)))
  for ax, key, label, scale in (
      (panels[0], 'bytes', 'bytes (MB)', 1e6),
      (panels[1], 'forward_ms', 'forward latency of the timing batch (ms)', 1.0),
      (panels[2], 'decode_ms', 'decode latency per token, one request (ms)', 1.0)):
    pts = [r for r in rows if r.get(key)]
    if not pts:
      ax.text(0.5, 0.5, f'no {key} measured', ha='center', transform=ax.transAxes)
    for r in pts:
      ax.scatter(r[key] / scale, r['nats_per_byte'], color='tab:blue', zorder=3)
      ax.annotate(r['label'], (r[key] / scale, r['nats_per_byte']), fontsize=7,
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
  if numbered:
    key = '\n'.join(f"{r['label']}: {r['name']}" for r in rows)
    height = 0.22 * len(rows) / fig.get_figheight()
    fig.subplots_adjust(bottom=0.12 + height)
    fig.text(0.06, 0.02, key, fontsize=8, va='bottom', family='monospace')
  tmp = epath.Path(str(path) + '.tmp.png')
  fig.savefig(str(tmp), dpi=110)
  plt.close(fig)
  tmp.replace(path)


def write(workdir, rows: list, title: str = '', baseline: Optional[str] = None,
          device: str = '', price_per_hour: Optional[float] = None, notes: str = '',
          extra: Optional[dict] = None) -> list:
  """report.json, report.md and pareto.png in `workdir` (each written whole, then renamed);
  returns the rows with their ratios (and prices per million decoded tokens, given the
  device's `price_per_hour`; 0 or None: no prices). `notes` end report.md; `extra` entries
  join report.json."""
  if price_per_hour is not None and (isinstance(price_per_hour, bool) or
                                     not isinstance(price_per_hour, (int, float))
                                     or price_per_hour < 0):
    raise ValueError(f'price_per_hour={price_per_hour!r} must be a number >= 0')
  rows = with_prices(with_ratios(rows, baseline), price_per_hour or None)
  for r in rows:
    if not math.isfinite(r['nats_per_byte']):
      raise ValueError(f'row {r["name"]!r} has nats_per_byte={r["nats_per_byte"]}')
  workdir = epath.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  workdir_lib.write_json(workdir / 'report.json', dict(
      title=title, device=device, price_per_hour=price_per_hour, rows=rows, **(extra or {})))
  workdir_lib.write_text(workdir / 'report.md', (f'{title}\n\n' if title else '') +
                         markdown(rows, device) + (f'\n{notes}\n' if notes else ''))
  plot(rows, workdir / 'pareto.png', title)
  return rows
