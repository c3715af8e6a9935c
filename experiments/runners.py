"""Every job `python -m experiments.main --mode=NAME` can do, in one registry.

A runner is `fn(config, workdir, flags) -> str or None`: a few lines that call the library
(`train`, `runtime`, `prune`, `benchmark`, ...), which validates its input and keeps the run's
books itself, so `run(name, config, workdir)` from Python or a Colab is the same run as the
command line. The text a runner returns is printed by process 0. Adding a runner is a function
and a line in `RUNNERS`; the command line's --mode choices come from here.
"""

import dataclasses
import json
import logging
from typing import Callable, Optional

from etils import epath

from experiments import (benchmark, cascade, compare, decode_benchmark, distill, endpoint,
                         exit_benchmark, prune, quantize, recipe, runtime, saved, serve,
                         serve_benchmark, sweep, trace_benchmark, train)
from experiments.errors import UserError


@dataclasses.dataclass(frozen=True)
class Flags:
  """The command-line flags runners read (each runner names the ones it uses)."""
  resume: str = 'auto'     # train: auto, new or params (see train.train_and_evaluate)
  prompt: str = ''         # sample: the text to continue
  variant: str = ''        # eval, sample: a variant --mode=quantize saved in the workdir
  steps: int = 10          # benchmark: timed steps; serve/exit/cascade_benchmark: new tokens
  vocab_size: int = 0      # benchmark: vocabulary (0: from the config)
  remat: tuple = ()        # benchmark: remat policies to compare (default: the config's)
  microbatches: tuple = ()  # benchmark: grad_accum_steps values to compare (default: the config's)
  peers: tuple = ('eager', 'compile')   # compare: the PyTorch peer's modes
  batch_sizes: tuple = (1, 8)          # decode/serve/exit_benchmark: rows decoded together
  variants: tuple = ('float', 'rtn:int8', 'rtn:int4:g128')   # decode_benchmark: weights timed
  requests: str = ''       # serve: the JSONL file of requests; trace_benchmark: a trace
  output: str = ''         # serve: where the JSONL results go
  slots: int = 8           # serve, http, cascade/trace_benchmark: requests decoded together
  draft: str = ''          # serve, http, serve/cascade_benchmark: a draft (small) run's workdir
  draft_tokens: tuple = (4,)   # serve, http: proposals per pass; serve_benchmark: the k timed
  host: str = '127.0.0.1'  # http: the address listened on
  port: int = 8000         # http: the port listened on (0: any free one)
  point: int = -1          # sweep: run only this point (-1: every point not done)
  print_commands: bool = False   # sweep: print one launch command per point instead
  command: tuple = ()      # sweep: the --config arguments the launch commands repeat


@dataclasses.dataclass(frozen=True)
class Runner:
  fn: Callable             # (config, workdir, Flags) -> text to print, or None
  doc: str                 # one line, shown by --help
  flags: tuple = ()        # the `Flags` fields it reads; giving it any other one is an error
  needs_workdir: bool = True
  distributed: bool = True   # joins a multi-process run (sharding.initialize) first


def _train(config, workdir, flags: Flags):
  metrics = train.train_and_evaluate(config, workdir, flags.resume)
  logging.info('final eval: %s', metrics)


def _eval(config, workdir, flags: Flags):
  if flags.variant:
    return json.dumps(saved.evaluate(config, workdir, flags.variant), indent=2)
  return json.dumps(runtime.evaluate(config, workdir), indent=2)


def _sample(config, workdir, flags: Flags):
  if flags.variant:
    return saved.sample(config, workdir, flags.variant, flags.prompt)
  return runtime.sample(config, workdir, flags.prompt)


def _prune(config, workdir, flags: Flags):
  prune.run(config, workdir)
  return (epath.Path(workdir) / 'results.md').read_text()


def _quantize(config, workdir, flags: Flags):
  quantize.run(config, workdir)
  return (epath.Path(workdir) / 'results.md').read_text()


def _distill(config, workdir, flags: Flags):
  distill.run(config, workdir)
  return (epath.Path(workdir) / 'results.md').read_text()


def _benchmark(config, workdir, flags: Flags):
  # prints as it measures
  benchmark.run(config, flags.steps, flags.vocab_size, flags.remat, flags.microbatches)


def _decode_benchmark(config, workdir, flags: Flags):
  return decode_benchmark.run(config, flags.steps, flags.batch_sizes, flags.variants,
                              flags.vocab_size)


def _serve(config, workdir, flags: Flags):
  return serve.run(config, workdir, flags.requests, flags.output, flags.slots, flags.draft,
                   flags.draft_tokens)


def _http(config, workdir, flags: Flags):
  return endpoint.run(config, workdir, flags.host, flags.port, flags.slots, flags.draft,
                      flags.draft_tokens)


def _sweep(config, workdir, flags: Flags):
  return sweep.run(config, workdir, flags.point, flags.print_commands,
                   flags.command or ('--config=<config>',))


def _merge(config, workdir, flags: Flags):
  return sweep.merge(config, workdir)


def _recipe(config, workdir, flags: Flags):
  return recipe.run(config, workdir)


def _serve_benchmark(config, workdir, flags: Flags):
  return serve_benchmark.run(config, workdir, flags.draft, flags.draft_tokens,
                             flags.batch_sizes, flags.steps)


def _cascade_benchmark(config, workdir, flags: Flags):
  return cascade.run(config, workdir, flags.draft, flags.slots, flags.steps)


def _exit_benchmark(config, workdir, flags: Flags):
  return exit_benchmark.run(config, workdir, flags.batch_sizes, flags.steps)


def _trace_benchmark(config, workdir, flags: Flags):
  return trace_benchmark.run(config, workdir, flags.requests, flags.slots)


def _compare(config, workdir, flags: Flags):
  return compare.run(config, flags.steps, flags.vocab_size, flags.peers)


RUNNERS = {
    'train': Runner(_train, 'trains the config in the workdir, resuming its latest checkpoint',
                    flags=('resume',)),
    'eval': Runner(_eval, 'evaluates the newest checkpoint (or a saved quantized --variant) on '
                   'the eval split (read-only)', flags=('variant',)),
    'sample': Runner(_sample, 'continues --prompt with the newest checkpoint (or a saved '
                     'quantized --variant) (read-only)', flags=('prompt', 'variant')),
    'prune': Runner(_prune, 'prunes a trained run: experiments/configs/prune.py configs',
                    distributed=False),
    'quantize': Runner(_quantize, 'quantizes a trained run: experiments/configs/quantize.py '
                       'configs', distributed=False),
    'distill': Runner(_distill, 'trains students of a trained teacher run: '
                      'experiments/configs/distill.py configs', distributed=False),
    'benchmark': Runner(_benchmark, 'times the train step on synthetic batches (no workdir)',
                        flags=('steps', 'vocab_size', 'remat', 'microbatches'),
                        needs_workdir=False,
                        distributed=False),
    'compare': Runner(_compare, 'times the train step back to back with the PyTorch peer '
                      '(experiments/peer.py)', flags=('steps', 'vocab_size', 'peers'),
                      needs_workdir=False, distributed=False),
    'decode_benchmark': Runner(_decode_benchmark, 'times decoding with float and quantized '
                               'random weights (experiments/decode_benchmark.py)',
                               flags=('steps', 'vocab_size', 'batch_sizes', 'variants'),
                               needs_workdir=False, distributed=False),
    'serve': Runner(_serve, 'serves a JSONL file of --requests from the newest checkpoint '
                    'through the engine into --output (read-only)',
                    flags=('requests', 'output', 'slots', 'draft', 'draft_tokens'),
                    distributed=False),
    'serve_benchmark': Runner(_serve_benchmark, 'times the engine on a trained run with and '
                              'without a --draft, for each of --draft_tokens and --batch_sizes '
                              '(read-only)', flags=('draft', 'draft_tokens', 'batch_sizes',
                                                    'steps'), distributed=False),
    'exit_benchmark': Runner(_exit_benchmark, 'times early-exit decoding of a run trained with '
                             'exits at each threshold, with its agreement and validation loss '
                             '(read-only)', flags=('batch_sizes', 'steps'), distributed=False),
    'cascade_benchmark': Runner(_cascade_benchmark, 'serves eval prompts by a small --draft '
                                'model, escalating unconfident answers to the full model, at '
                                'each threshold (read-only)', flags=('draft', 'slots', 'steps'),
                                distributed=False),
    'trace_benchmark': Runner(_trace_benchmark, 'replays a request trace (--requests, or a '
                              'synthetic one) through the engine and through static batching '
                              '(read-only)', flags=('requests', 'slots'), distributed=False),
    'sweep': Runner(_sweep, 'runs a sweep config\'s points one after another in '
                    '<workdir>/<point>/ (done ones skipped), one with --point, or prints '
                    'one launch command per point (--print_commands)',
                    flags=('point', 'print_commands', 'command'), distributed=False),
    'merge': Runner(_merge, 'collects a sweep\'s finished points into one report.md, '
                    'report.json and pareto.png in the workdir', flags=('command',),
                    distributed=False),
    'recipe': Runner(_recipe, 'runs a recipe\'s stages (train, prune, distill, quantize) in '
                     '<workdir>/<i>-<stage>/, finished ones skipped, then writes its report',
                     distributed=False),
    'http': Runner(_http, 'serves the newest checkpoint over HTTP on --host:--port '
                   '(POST /v1/completions, GET /health) until interrupted (read-only)',
                   flags=('host', 'port', 'slots', 'draft', 'draft_tokens'), distributed=False),
}


def get(name: str) -> Runner:
  if name not in RUNNERS:
    raise UserError(f'--mode={name} is not one of {", ".join(RUNNERS)}')
  return RUNNERS[name]


def check_flags(name: str, flags: Flags, workdir) -> None:
  """Refuses a flag the runner does not read (set to other than its default), in one line."""
  runner = get(name)
  for field in dataclasses.fields(Flags):
    value = getattr(flags, field.name)
    if field.name not in runner.flags and value != field.default:
      users = [n for n, r in RUNNERS.items() if field.name in r.flags]
      shown = ','.join(map(str, value)) if isinstance(value, tuple) else value
      modes = [f'--mode={n}' for n in users]
      listed = ' and '.join([', '.join(modes[:-1]), modes[-1]] if len(modes) > 1 else modes)
      raise UserError(f'--{field.name}={shown} applies to {listed} only')
  if runner.needs_workdir and not workdir:
    raise UserError(f'--mode={name} needs --workdir')
  if not runner.needs_workdir and workdir:
    raise UserError(f'--mode={name} takes no --workdir (it writes nothing)')


def run(name: str, config, workdir=None, **flags) -> Optional[str]:
  """Runs runner `name` as the command line would (without the multi-process start-up)."""
  given = Flags(**flags)
  check_flags(name, given, workdir)
  return get(name).fn(config, workdir, given)
