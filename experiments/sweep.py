"""Ablations from config files: a sweep's points run here one after another, or one per machine.

A sweep config is a runner's config (pruning, quantization or distillation) with a `sweep`
block:
  config.sweep.mode = 'quantize'                  # the runner every point runs
  config.sweep.product = (('calibration_rows', (8, 16)), ('variants', ('rtn:int4:g64', ...)))
  config.sweep.points = ()                        # or explicit points: ({'seed': 1}, ...)
`product` is every combination of the listed values (fields named by their dotted path),
`points` a list of override dicts; a config may give both (the product's points first). Each
point runs the runner on the config without its `sweep` block and with its overrides, in
<workdir>/<point name>/ (its overrides, e.g. `calibration_rows-8_variants-rtn-int4-g64`).

  python -m experiments.main --mode=sweep --config=experiments/configs/sweeps.py:quant_groups \
      --workdir=runs/sweep                 # every point here, in order (done ones skipped)
  ... --mode=sweep --print_commands        # one launch command per point, to run elsewhere
  ... --mode=sweep --point=3               # one point (what each launch command runs)
  ... --mode=merge                         # every finished point's rows: one report and plot

A merge first times every model the points kept (saved quantized variants, fine-tune and
student runs) and the source model again, together in one process (`experiments.retime`;
`config.sweep.decode_tokens`, `.timing_rounds`; `.price_per_hour` prices decoded tokens).

A point is done when its runner has written its results.json (written whole, at the end), so
running the sweep again skips finished points and reruns an interrupted one. Bad sweeps (no
points, an unknown field, a value of the wrong type, an unknown mode) are one line each, before
anything is written.
"""

import itertools
import logging
import re
import shlex
import time

import ml_collections
from etils import epath

from experiments import report, retime, source
from experiments import workdir as workdir_lib
from experiments.errors import UserError

MODES = ('prune', 'quantize', 'distill')   # the runners whose results.json a merge reads
BASELINES = ('dense', 'float', 'teacher')  # each point's first row: the source model, kept once


def points(config) -> list:
  """[(name, {dotted path: value})] of the config's sweep, every override checked against the
  config (existence and type) before any point runs."""
  if 'sweep' not in config:
    raise UserError('--mode=sweep needs a config with a sweep block (config.sweep.mode, '
                    '.product and/or .points), e.g. experiments/configs/sweeps.py')
  sweep = config.sweep
  if sweep.get('mode') not in MODES:
    raise UserError(f'config.sweep.mode={sweep.get("mode")!r} is not one of {", ".join(MODES)}')
  retime.check_settings(sweep, 'config.sweep')
  out = []
  product = tuple(sweep.get('product') or ())
  for entry in product:
    if (not isinstance(entry, (tuple, list)) or len(entry) != 2
        or not isinstance(entry[1], (tuple, list)) or not entry[1]):
      raise UserError(f'config.sweep.product entry {entry!r} must be (field, (value, ...)) with '
                      f'at least one value')
  if product:
    fields = [f for f, _ in product]
    out += [dict(zip(fields, values)) for values in itertools.product(*(v for _, v in product))]
  for p in tuple(sweep.get('points') or ()):
    if not isinstance(p, dict) or not p:
      raise UserError(f'config.sweep.points entry {p!r} must be a non-empty dict of overrides')
    out.append(dict(p))
  if not out:
    raise UserError('config.sweep has no points: give config.sweep.product and/or '
                    'config.sweep.points')
  named = [(name_of(p), p) for p in out]
  seen = {}
  for name, p in named:
    if name in seen:
      raise UserError(f'config.sweep gives the point {p} twice')
    seen[name] = p
    point_config(config, p)    # every override checked now, not when its point comes
  return named


def name_of(overrides: dict) -> str:
  """A point's folder name: its overrides as field-value, '_'-joined, safe for a path."""
  parts = [f'{f.split(".")[-1]}-{v}' for f, v in overrides.items()]
  return re.sub(r'[^A-Za-z0-9_.=-]+', '-', '_'.join(parts)).strip('-')[:120]


def point_config(config, overrides: dict) -> ml_collections.ConfigDict:
  """The runner's config of one point: `config` without its sweep block, with `overrides`."""
  out = ml_collections.ConfigDict(config.to_dict())
  del out['sweep']
  return overridden(out, overrides, 'config.sweep')


def overridden(config, overrides: dict, who: str) -> ml_collections.ConfigDict:
  """`config` (changed in place) with {dotted field: value} `overrides`; a field it does not
  have, or a value of another type, is one line naming `who` set it."""
  for field, value in overrides.items():
    *parents, leaf = str(field).split('.')
    node = config
    for i, key in enumerate(parents):
      if key not in node or not isinstance(node[key], ml_collections.ConfigDict):
        raise UserError(f'{who} overrides config.{field}, but config.'
                        f'{".".join(parents[:i + 1])} is not a group of this config')
      node = node[key]
    if leaf not in node:
      raise UserError(f'{who} overrides config.{field}, which this config does not '
                      f'have; its fields: {", ".join(sorted(node.keys()))}')
    try:
      node[leaf] = value
    except TypeError:
      raise UserError(f'{who} sets config.{field}={value!r}, but that field holds a '
                      f'{type(node[leaf]).__name__}') from None
  return config


def launch_commands(config_args: tuple, workdir, named: list) -> list:
  """One command line per point, each running just that point (e.g. on its own machine);
  `config_args` are the sweep command's own --config arguments."""
  given = ' '.join(shlex.quote(a) for a in config_args)
  return [f'python -m experiments.main --mode=sweep {given} '
          f'--workdir={shlex.quote(str(workdir))} --point={i}' for i in range(len(named))]


def run(config, workdir, point: int = -1, print_commands: bool = False,
        config_args: tuple = ('--config=<config>',), run_point=None) -> str:
  """Runs every point not done yet (or only `point`), printing progress; or, with
  `print_commands`, returns the launch commands. `run_point(mode, config, workdir)` runs one
  point (the runners' registry by default)."""
  named = points(config)
  workdir = epath.Path(workdir)
  if print_commands:
    return '\n'.join(launch_commands(config_args, workdir, named))
  if point != -1 and not 0 <= point < len(named):
    raise UserError(f'--point={point} is not a point of this sweep: 0..{len(named) - 1}')
  if run_point is None:
    from experiments import runners   # the registry imports this module
    run_point = lambda mode, c, w: runners.run(mode, c, w)
  chosen = range(len(named)) if point == -1 else [point]
  start, ran = time.perf_counter(), 0
  for n, i in enumerate(chosen):
    name, overrides = named[i]
    sub = workdir / name
    if (sub / 'results.json').exists():
      print(f'point {i + 1} of {len(named)}: {name} is done', flush=True)
      continue
    eta = ''
    if ran:
      eta = f', about {(time.perf_counter() - start) / ran * (len(chosen) - n) / 60:.1f} min left'
    print(f'point {i + 1} of {len(named)}: {name}{eta}', flush=True)
    logging.info('sweep point %s: %s', name, overrides)
    sub.mkdir(parents=True, exist_ok=True)
    workdir_lib.write_json(sub / 'point.json', dict(name=name, overrides=overrides))
    run_point(config.sweep.mode, point_config(config, overrides), sub)
    ran += 1
  left = [name for name, _ in named if not (workdir / name / 'results.json').exists()]
  return (f'{len(named) - len(left)} of {len(named)} points done in {workdir}'
          + (f'; not yet: {", ".join(left)}' if left else '; merge with --mode=merge'))


def _made(mode: str, config, point: epath.Path, variant: str):
  """(model, params) a point made for `variant`, where it is kept: a saved quantized variant,
  a pruned model's fine-tune run, a student's run; else None."""
  if mode == 'quantize':
    return retime.load_variant(config, point, variant)
  run = point / ('finetune' if mode == 'prune' else 'students') / source.slug(variant)
  loaded = retime.load_run(run)
  return None if loaded is None else loaded[:2]


def merge(config, workdir) -> str:
  """One report (report.json, report.md, pareto.png in `workdir`) of every finished point's
  rows; the points not finished are named."""
  named = points(config)
  workdir = epath.Path(workdir)
  rows, missing, models = [], [], {}
  for name, overrides in named:
    path = workdir / name / 'results.json'
    if not path.exists():
      missing.append(name)
      continue
    # A row is its variant, with the point's other overrides after it.
    rest = ', '.join(f'{f}={v}' for f, v in overrides.items() if f != 'variants')
    for row in report.from_results(
        workdir_lib.read_json(path, f'point {name}\'s results')['rows']):
      if row['name'] in BASELINES:   # every point scores the same source model first
        if not any(r['name'] == row['name'] for r in rows):
          rows.append(row)
        continue
      rows.append(dict(row, name=f'{row["name"]} ({rest})' if rest else row['name']))
      loaded = _made(config.sweep.mode, point_config(config, overrides), workdir / name,
                     row['name'])
      if loaded is not None:
        models[rows[-1]['name']] = loaded
  if not rows:
    raise UserError(f'no point of this sweep has finished in {workdir}: run --mode=sweep first')
  base = (None if config.get('hf_path') or not config.get('source_workdir') else
          retime.load_run(config.source_workdir))
  if base is not None and rows[0]['name'] in BASELINES:
    models[rows[0]['name']] = base[:2]
    rows = retime.apply(rows, models, config, base[3], base[2], config.sweep)
  title = f'Sweep of {len(named)} points ({config.sweep.mode})'
  out = report.write(workdir, rows, title, price_per_hour=config.sweep.get('price_per_hour'),
                     device=str(rows[0].get('device') or ''))
  text = (workdir / 'report.md').read_text()
  return text + (f'\nNot finished yet: {", ".join(missing)}\n' if missing else '') + (
      f'\n{len(out)} rows from {len(named) - len(missing)} points; plot: '
      f'{workdir / "pareto.png"}')
