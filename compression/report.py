"""Sparsity report: per-layer and total sparsity, non-zeros, FLOPs per token and bytes.

Counts are of the actual arrays: a weight is pruned when it is exactly zero. Effective FLOPs per
token are the dense forward FLOPs minus two per zero matmul weight a token multiplies (expert
weights count at k / n_experts, the share of experts a token uses); they are what sparse kernels
could save, not what dense kernels run. Bytes: dense storage, and the non-zeros plus a 1-bit mask
per weight (a simple sparse format).
"""

import numpy as np

from compression import paths
from models import axes, flops, layouts as layouts_lib


def sparsity_report(params, cfg, seq_len: int = 0, include=None,
                    exclude=paths.DEFAULT) -> dict:
  """{'layers': {path: {...}}, 'total': {...}} for the selected weights (and all parameters)
  of a model of config `cfg`."""
  flat = paths.flatten(params)
  layouts = layouts_lib.of_config(cfg)
  selected = paths.select(params, layouts, include, exclude)
  layers, zeros_active = {}, 0.0
  for p in selected:
    w = np.asarray(flat[p])
    nonzero = int(np.count_nonzero(w))
    layers[p] = dict(params=int(w.size), nonzero=nonzero, sparsity=1 - nonzero / w.size)
    share = 1.0
    if axes.EXPERT in layouts[p].stacked_names:
      share = cfg.experts_per_token / cfg.n_experts
    zeros_active += share * (w.size - nonzero)
  n_sel = sum(l['params'] for l in layers.values())
  nz_sel = sum(l['nonzero'] for l in layers.values())
  n_all = sum(int(np.size(v)) for v in flat.values())
  itemsize = max(np.asarray(v).dtype.itemsize for v in flat.values())
  total = dict(params=n_all, nonzero=n_all - (n_sel - nz_sel), selected_params=n_sel,
               selected_nonzero=nz_sel, sparsity=1 - nz_sel / max(n_sel, 1),
               dense_bytes=n_all * itemsize,
               sparse_bytes=(n_all - n_sel) * itemsize + nz_sel * itemsize + n_sel // 8)
  dense = flops.train_flops_per_token(cfg, seq_len or cfg.max_len) / 3   # forward only
  total.update(dense_flops_per_token=dense, effective_flops_per_token=dense - 2 * zeros_active)
  return dict(layers=layers, total=total)


def markdown(report: dict) -> str:
  """The report as a markdown table (one row per layer, then the total)."""
  rows = ['| weight | params | non-zero | sparsity |', '|---|---|---|---|']
  for p, l in report['layers'].items():
    rows.append(f"| `{p}` | {l['params']:,} | {l['nonzero']:,} | {100 * l['sparsity']:.1f}% |")
  t = report['total']
  rows.append(f"| **selected total** | {t['selected_params']:,} | {t['selected_nonzero']:,} | "
              f"{100 * t['sparsity']:.1f}% |")
  lines = ['\n'.join(rows), '',
           f"All parameters: {t['params']:,}, non-zero {t['nonzero']:,}; bytes dense "
           f"{t['dense_bytes']:,}, non-zeros + bitmask {t['sparse_bytes']:,}."]
  if 'dense_flops_per_token' in t:
    lines.append(f"Forward FLOPs per token: dense {t['dense_flops_per_token']:.4g}, effective "
                 f"{t['effective_flops_per_token']:.4g}.")
  return '\n'.join(lines)
