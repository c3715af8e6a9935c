"""Recipes: train -> prune -> distil -> quantize as one command, with one cost report.

A recipe config lists ordered stages, each a runner that exists (`--mode` train, prune, distill
or quantize) with its own config file and overrides:
  config.stages = (
      dict(name='train', mode='train', config='experiments/configs/shakespeare.py'),
      dict(name='prune', mode='prune', config='experiments/configs/prune.py:sparsegpt_2of4',
           overrides={'finetune_steps': 100}),
      dict(name='int8', mode='quantize', config='experiments/configs/quantize.py:rtn_int8'))
Stage i runs in <workdir>/<i>-<name>/ and reads what stage i - 1 made: a training run's
workdir, a pruned model's fine-tune run (<stage>/finetune/<variant>), or a distilled student
(<stage>/students/<variant>). A quantization stage makes integer weights no runner trains on,
so it comes last. The first compression stage reads `config.source_workdir` of its own config
when no training stage comes before it. Sources are only read.

  python -m experiments.main --mode=recipe --config=experiments/configs/recipe.py \\
      --workdir=runs/recipe

A finished stage leaves <stage>/stage.json; running the recipe again skips it and continues an
interrupted one where its runner continues (training and fine-tunes from their checkpoints).
The report (report.json, report.md, pareto.png in the workdir) has the source model as the
baseline row and one row per compression stage: its quality (after any fine-tune), bytes,
FLOPs per token, forward pass and greedy decode (every model timed again together, in one
process: `experiments.retime`), with ratios to the baseline, and each stage's wall time;
`price_per_hour` in the config adds a price per million decoded tokens. Bad recipes (an
unknown mode, an input that does not exist, an override of an unknown field, no stages, a bad
price or timing setting) are one line each, found before anything runs or is written.
"""

import dataclasses
import importlib.util
import re
import time
from typing import Optional

import jax
import ml_collections
from etils import epath

from experiments import report, retime, source, sweep
from experiments import workdir as workdir_lib
from experiments.errors import UserError

MODES = ('train', 'prune', 'distill', 'quantize')
ROOT = epath.Path(__file__).resolve().parent.parent


@dataclasses.dataclass
class Stage:
  """One stage of a recipe, its input wired to what the stage before it makes."""
  name: str
  mode: str
  config: ml_collections.ConfigDict
  workdir: epath.Path
  output: Optional[epath.Path]    # the run the next stage reads (None: quantized weights)


def load_config(spec: str, who: str) -> ml_collections.ConfigDict:
  """`get_config(arg)` of 'path/to/file.py[:arg]' (relative to the repository root)."""
  path, _, arg = str(spec).partition(':')
  file = epath.Path(path) if epath.Path(path).is_absolute() else ROOT / path
  if not file.is_file() or file.suffix != '.py':
    raise UserError(f'{who}: config={spec!r} is not a config file (path/to/file.py[:arg])')
  module_spec = importlib.util.spec_from_file_location(f'recipe_stage_{file.stem}', str(file))
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  try:
    config = module.get_config(arg) if arg else module.get_config()
  except ValueError as e:
    raise UserError(f'{who}: config={spec!r}: {e}') from None
  return config


def plan(config, workdir) -> list:
  """The recipe's stages with their configs, workdirs and inputs, every one checked."""
  stages = tuple(config.get('stages') or ())
  if not stages:
    raise UserError('config.stages is empty: a recipe needs at least one stage, e.g. '
                    "dict(name='train', mode='train', config='experiments/configs/shakespeare.py')")
  retime.check_settings(config, 'config')
  out, names = [], set()
  previous: Optional[Stage] = None
  for i, d in enumerate(stages):
    if not isinstance(d, dict) or not {'name', 'mode', 'config'} <= set(d):
      raise UserError(f'config.stages[{i}] must be a dict with name, mode and config (and '
                      f'optionally overrides), got {d!r}')
    unknown = sorted(set(d) - {'name', 'mode', 'config', 'overrides'})
    name, mode = str(d['name']), d['mode']
    who = f'stage {name!r}'
    if unknown:
      raise UserError(f'{who}: unknown key {unknown[0]!r}; allowed: name, mode, config, '
                      f'overrides')
    if not re.fullmatch(r'[A-Za-z0-9_.-]+', name) or name in names:
      raise UserError(f'{who}: stage names must be unique and made of letters, digits, _ . -')
    names.add(name)
    if mode not in MODES:
      raise UserError(f'{who}: mode={mode!r} is not one of {", ".join(MODES)}')
    if previous is not None and previous.output is None:
      raise UserError(f'{who}: comes after quantization stage {previous.name!r}, whose integer '
                      f'weights no runner trains on; put the quantization stage last')
    stage_config = sweep.overridden(load_config(d['config'], who), dict(d.get('overrides') or {}),
                                    who)
    if mode != 'train':
      if previous is not None:
        stage_config.source_workdir = str(previous.output)
      elif not (epath.Path(stage_config.source_workdir) / 'config.json').exists():
        raise UserError(f'{who}: its input config.source_workdir={stage_config.source_workdir!r}'
                        f' is not a training run (no config.json); train it first or put a '
                        f'train stage before this one')
      variants = [v for v in str(stage_config.variants).split(',') if v.strip()]
      if len(variants) != 1:
        raise UserError(f'{who}: a recipe stage makes one model; config.variants='
                        f'{stage_config.variants!r} names {len(variants)}')
      if mode == 'prune' and i + 1 < len(stages) and not stage_config.finetune_steps:
        raise UserError(f'{who}: a pruned model is passed on as its fine-tune run; set '
                        f'finetune_steps > 0 (the next stage reads it)')
    sub = epath.Path(workdir) / f'{i}-{name}'
    previous = Stage(name, mode, stage_config, sub, _output(mode, stage_config, sub))
    out.append(previous)
  return out


def _output(mode: str, config, sub: epath.Path) -> Optional[epath.Path]:
  if mode == 'train':
    return sub
  variant = source.slug(str(config.variants).split(',')[0])
  return dict(prune=sub / 'finetune' / variant, distill=sub / 'students' / variant).get(mode)


def run(config, workdir, run_stage=None) -> str:
  """Runs the stages not done yet, in order, then writes the report; returns report.md."""
  stages = plan(config, workdir)
  if run_stage is None:
    from experiments import runners   # the registry imports this module
    run_stage = lambda mode, c, w: runners.run(mode, c, w)
  workdir = epath.Path(workdir)
  start = time.perf_counter()
  for i, st in enumerate(stages):
    marker = st.workdir / 'stage.json'
    if marker.exists():
      print(f'stage {i + 1} of {len(stages)}: {st.name} ({st.mode}) is done', flush=True)
      continue
    print(f'stage {i + 1} of {len(stages)}: {st.name} ({st.mode}) in {st.workdir}', flush=True)
    t0 = time.perf_counter()
    run_stage(st.mode, st.config, st.workdir)
    st.workdir.mkdir(parents=True, exist_ok=True)
    workdir_lib.write_json(marker, dict(name=st.name, mode=st.mode, config=st.config.to_dict(),
                                        seconds=time.perf_counter() - t0))
  rows = report_rows(stages)
  if rows:
    rows = timed_together(config, stages, rows)
  if not rows:
    return f'{len(stages)} stages done in {time.perf_counter() - start:.0f} s (no compression ' \
           f'stage: nothing to report)'
  times = [dict(name=st.name, mode=st.mode, seconds=workdir_lib.read_json(
      st.workdir / 'stage.json', f'stage {st.name}\'s marker')['seconds']) for st in stages]
  report.write(workdir, rows, title=str(config.get('title') or f'Recipe in {workdir}'),
               device=jax.devices()[0].device_kind, price_per_hour=config.get('price_per_hour'),
               notes=stage_times(times), extra=dict(stages=times))
  return (workdir / 'report.md').read_text()


def stage_times(times: list) -> str:
  """One line of each stage's wall time and the compression stages' share of training's."""
  line = 'Stage wall times: ' + ', '.join(f"{t['name']} {t['seconds']:.0f} s" for t in times)
  trained = sum(t['seconds'] for t in times if t['mode'] == 'train')
  compressed = sum(t['seconds'] for t in times if t['mode'] != 'train')
  if trained:
    line += f'; compression {compressed:.0f} s = {compressed / trained:.2f} of training\'s'
  return line + ' (a stage resumed after an interruption counts its last run only).'


def timed_together(config, stages: list, rows: list) -> list:
  """The rows with every model they name timed again in this process (`experiments.retime`)."""
  models, base = {}, None
  for row, (path, quantized) in zip(rows, _made(stages)):
    if quantized is not None:
      loaded = retime.load_variant(quantized.config, quantized.workdir,
                                   str(quantized.config.variants))
    else:
      loaded = None if path is None else retime.load_run(path)
      base = base or loaded
    if loaded is not None:
      models[row['name']] = loaded[:2]
  if base is None:
    return [dict(r, timed_in_stage=True) for r in rows]
  first = next(st for st in stages if st.mode != 'train')
  return retime.apply(rows, models, first.config, base[3], base[2], config)


def _made(stages: list) -> list:
  """(training-run folder or None, quantization stage or None) of the model behind each report
  row: the first compression stage's input, then what each compression stage made."""
  out = []
  for i, st in enumerate(stages):
    if st.mode == 'train':
      continue
    if not out:
      out.append((stages[i - 1].output if i else
                  (None if st.config.get('hf_path') else epath.Path(st.config.source_workdir)),
                  None))
    out.append((None, st) if st.mode == 'quantize' else (st.output, None))
  return out


def report_rows(stages: list) -> list:
  """The source model's row (the first compression stage's baseline, named after the stage
  that made it) and each compression stage's row, named after the stage."""
  rows = []
  for i, st in enumerate(stages):
    if st.mode == 'train':
      continue
    results = workdir_lib.read_json(st.workdir / 'results.json', f'stage {st.name}\'s results')
    base, own = report.from_results(results['rows'][:1]), report.from_results(
        results['rows'][1:2])
    if not rows:
      made_by = stages[i - 1].name if i else 'source'
      rows.append(dict(base[0], name=made_by))
    rows.append(dict(own[0], name=st.name))
  return rows
