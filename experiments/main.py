"""Entry point: `python -m experiments.main --config=experiments/configs/shakespeare.py --workdir=DIR`.

--mode picks a runner of `experiments/runners.py`: train (default; resumes from the workdir's
latest checkpoint), eval, sample (--prompt; with --variant, both read a variant --mode=quantize
saved), prune and quantize (experiments/configs/prune.py and quantize.py configs), benchmark,
compare (against the PyTorch peer) and decode_benchmark (no workdir), serve (--requests,
--output, --slots, --draft: a JSONL file of requests through the serving engine),
serve_benchmark (speculative decoding), cascade_benchmark (small model first),
trace_benchmark (the engine vs static batching on a request trace), exit_benchmark (early
exit on a run trained with exits), http (--host, --port: an HTTP endpoint on the engine),
sweep (a sweep config's points; --point, --print_commands) and merge (their one report).
Bad input and run-level failures print one line `error: ...` and exit 1 (see
`experiments/cli.py`); `--resume=new|params` starts over in a workdir whose run has another
configuration, archiving that run.
Multi-process runs start the same command on every host: on Cloud TPU, Slurm or Open MPI nothing
more is needed; elsewhere add --coordinator_address=HOST:PORT (process 0's) --num_processes=N
--process_id=I.
Kept short: this file parses flags; the runners and the library do the rest.
"""

import sys

from absl import app, flags, logging
from etils import epath
from ml_collections import config_flags

import jax

import sharding
from experiments import cli, runners, validate
from experiments.errors import UserError
from models.transformer import REMAT_POLICIES

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (get_config(arg)).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory: checkpoints, metrics, samples.')
_MODE = flags.DEFINE_enum('mode', 'train', list(runners.RUNNERS), 'What to do: ' + '; '.join(
    f'{name}: {r.doc}' for name, r in runners.RUNNERS.items()) + '.')
_RESUME = flags.DEFINE_enum('resume', 'auto', list(validate.RESUME),
                            'train: auto (continue the workdir\'s run; refuse one of another '
                            'config), new (archive it and start over), params (archive it, '
                            'start a new run from its parameters).')
_PROMPT = flags.DEFINE_string('prompt', '', 'sample: the prompt text.')
_VARIANT = flags.DEFINE_string('variant', '', 'eval, sample: a variant that --mode=quantize saved '
                               'in --workdir, e.g. rtn:int4:g128 (--config: that run\'s '
                               'quantization config).')
_STEPS = flags.DEFINE_integer('steps', runners.Flags.steps,
                              'benchmark: timed steps (after one compile + warmup step); '
                              'serve_benchmark, exit_benchmark: new tokens per request.')
_VOCAB = flags.DEFINE_integer('vocab_size', 0, 'benchmark: vocabulary (0: 259 bytes, or '
                              'data.vocab_size for SentencePiece).')
_REMAT = flags.DEFINE_list('remat', [], 'benchmark: remat policies to compare (default: the '
                           f'config\'s); any of {", ".join(["none", *REMAT_POLICIES])}.')
_MICROBATCHES = flags.DEFINE_list('microbatches', [], 'benchmark: grad_accum_steps values to '
                                  'compare, e.g. 4,8,16 (with pipeline stages: the microbatches '
                                  'that flow through them; default: the config\'s).')
_PEERS = flags.DEFINE_list('peers', list(runners.Flags.peers), 'compare: PyTorch peer modes '
                           '(eager, compile).')
_BATCH_SIZES = flags.DEFINE_list('batch_sizes', list(map(str, runners.Flags.batch_sizes)),
                                 'decode_benchmark, serve_benchmark, exit_benchmark: rows '
                                 'decoded together, e.g. 1,8.')
_VARIANTS = flags.DEFINE_list('variants', list(runners.Flags.variants),
                              'decode_benchmark: float and round-to-nearest quantization specs '
                              '(experiments/quantize.py), e.g. float,rtn:int8,rtn:int4:g128.')
_REQUESTS = flags.DEFINE_string('requests', '', 'serve: a JSONL file of requests; '
                                'trace_benchmark: a trace (requests with an arrival field).')
_OUTPUT = flags.DEFINE_string('output', '', 'serve: the JSONL file the results are written to.')
_SLOTS = flags.DEFINE_integer('slots', runners.Flags.slots,
                              'serve, http, cascade_benchmark, trace_benchmark: requests '
                              'decoded together.')
_DRAFT = flags.DEFINE_string('draft', '', 'serve, http, serve_benchmark: the workdir of a draft '
                             'run (same tokenizer) for speculative decoding; '
                             'cascade_benchmark: the small model.')
_DRAFT_TOKENS = flags.DEFINE_list('draft_tokens', list(map(str, runners.Flags.draft_tokens)),
                                  'serve, http: draft tokens proposed per pass; serve_benchmark: '
                                  'the values timed, e.g. 2,3,4,5,6.')
_HOST = flags.DEFINE_string('host', runners.Flags.host, 'http: the address to listen on.')
_PORT = flags.DEFINE_integer('port', runners.Flags.port, 'http: the port to listen on (0: any '
                             'free one).')
_POINT = flags.DEFINE_integer('point', runners.Flags.point, 'sweep: run only this point (its '
                              'index; -1: every point not done yet).')
_PRINT_COMMANDS = flags.DEFINE_bool('print_commands', False, 'sweep: print one launch command '
                                    'per point (to run on several machines) and run nothing.')
_DISTRIBUTED = flags.DEFINE_enum('distributed', 'auto', list(sharding.distributed.MODES),
                                 'Join a multi-process run: auto (when an address is given or a '
                                 'TPU/Slurm/MPI launcher is detected), on, off.')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None,
                                   'HOST:PORT of process 0, for multi-process runs elsewhere.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes in the run.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process, 0..num_processes-1.')
flags.mark_flags_as_required(['config'])


@cli.guarded
def main(argv):
  cli.quiet_libraries()
  if len(argv) > 1:
    raise UserError(f'unexpected arguments {argv[1:]}')
  config, workdir, mode = _CONFIG.value, _WORKDIR.value, _MODE.value
  cli.check_is_config(config, flags.FLAGS['config'].config_filename)
  try:
    batch_sizes = tuple(int(b) for b in _BATCH_SIZES.value)
  except ValueError:
    raise UserError(f'--batch_sizes={",".join(_BATCH_SIZES.value)} must be integers') from None
  try:
    microbatches = tuple(int(m) for m in _MICROBATCHES.value)
  except ValueError:
    raise UserError(f'--microbatches={",".join(_MICROBATCHES.value)} must be integers') from None
  try:
    draft_tokens = tuple(int(k) for k in _DRAFT_TOKENS.value)
  except ValueError:
    raise UserError(f'--draft_tokens={",".join(_DRAFT_TOKENS.value)} must be integers') from None
  given = runners.Flags(resume=_RESUME.value, prompt=_PROMPT.value, variant=_VARIANT.value,
                        steps=_STEPS.value, vocab_size=_VOCAB.value, remat=tuple(_REMAT.value),
                        microbatches=microbatches,
                        peers=tuple(_PEERS.value), batch_sizes=batch_sizes,
                        variants=tuple(_VARIANTS.value), requests=_REQUESTS.value,
                        output=_OUTPUT.value, slots=_SLOTS.value, draft=_DRAFT.value,
                        draft_tokens=draft_tokens, host=_HOST.value, port=_PORT.value,
                        point=_POINT.value, print_commands=_PRINT_COMMANDS.value,
                        # A sweep's launch commands repeat its --config arguments.
                        command=_config_args(sys.argv[1:]) if mode in ('sweep', 'merge')
                        else ())
  runners.check_flags(mode, given, workdir)
  runner = runners.get(mode)
  if runner.distributed:
    try:
      sharding.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                          _DISTRIBUTED.value)
    except ValueError as e:
      raise UserError(str(e)) from None
  lead = jax.process_index() == 0   # the one process that prints
  if not lead:
    logging.set_verbosity(logging.WARNING)
  text = runner.fn(config, workdir and epath.Path(workdir), given)
  if text is not None and lead:
    print(text)


def _config_args(argv) -> tuple:
  """The --config arguments of a command line (`--config=F`, `--config F`, `--config.x=v`)."""
  out = []
  for i, a in enumerate(argv):
    if a.startswith('--config'):
      out.append(a if '=' in a or i + 1 == len(argv) else f'{a}={argv[i + 1]}')
  return tuple(out)


def start(mode: str = 'train') -> None:
  """Runs the command line with `mode` as the default --mode (entry points under other names)."""
  flags.FLAGS.set_default('mode', mode)
  app.run(main, flags_parser=cli.parse_flags)


if __name__ == '__main__':
  start()
