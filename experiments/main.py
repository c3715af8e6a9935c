"""Entry point: `python -m experiments.main --config=experiments/configs/shakespeare.py --workdir=DIR`.

Modes: train (default; resumes from the workdir's latest checkpoint), eval, sample (--prompt),
prune (experiments/configs/prune.py configs). Bad input and run-level failures print one line
`error: ...` and exit 1 (see `experiments/cli.py`); `--resume=new|params` starts over in a
workdir whose run has another configuration, archiving that run.
Multi-process runs start the same command on every host: on Cloud TPU, Slurm or Open MPI nothing
more is needed; elsewhere add --coordinator_address=HOST:PORT (process 0's) --num_processes=N
--process_id=I.
Kept short: the logic lives in importable modules (`experiments.train`, `experiments.runtime`).
"""

import json

from absl import app, flags, logging
from etils import epath
from ml_collections import config_flags

import jax

import sharding
from experiments import cli, prune, runtime, train, validate
from experiments.errors import UserError

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (get_config(arg)).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory: checkpoints, metrics, samples.')
_MODE = flags.DEFINE_enum('mode', 'train', ['train', 'eval', 'sample', 'prune'], 'What to do: '
                          'prune runs experiments/configs/prune.py configs.')
_RESUME = flags.DEFINE_enum('resume', 'auto', list(validate.RESUME),
                            'train: auto (continue the workdir\'s run; refuse one of another '
                            'config), new (archive it and start over), params (archive it, '
                            'start a new run from its parameters).')
_PROMPT = flags.DEFINE_string('prompt', '', 'Prompt text for --mode=sample.')
_DISTRIBUTED = flags.DEFINE_enum('distributed', 'auto', list(sharding.distributed.MODES),
                                 'Join a multi-process run: auto (when an address is given or a '
                                 'TPU/Slurm/MPI launcher is detected), on, off.')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None,
                                   'HOST:PORT of process 0, for multi-process runs elsewhere.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes in the run.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process, 0..num_processes-1.')
flags.mark_flags_as_required(['config', 'workdir'])


@cli.guarded
def main(argv):
  cli.quiet_libraries()
  if len(argv) > 1:
    raise UserError(f'unexpected arguments {argv[1:]}')
  config, workdir, mode = _CONFIG.value, epath.Path(_WORKDIR.value), _MODE.value
  cli.check_is_config(config, flags.FLAGS['config'].config_filename)
  validate.check_kind(config, mode)
  if _RESUME.value != 'auto' and mode != 'train':
    raise UserError(f'--resume={_RESUME.value} applies to --mode=train only')
  if mode == 'prune':
    prune.run(config, workdir)
    print((workdir / 'results.md').read_text())
    return
  try:
    sharding.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                        _DISTRIBUTED.value)
  except ValueError as e:
    raise UserError(str(e)) from None
  lead = jax.process_index() == 0   # the one process that prints
  if not lead:
    logging.set_verbosity(logging.WARNING)
  if mode == 'train':
    metrics = train.train_and_evaluate(config, workdir, _RESUME.value)
    logging.info('final eval: %s', metrics)
  elif mode == 'eval':
    metrics = runtime.evaluate(config, workdir)
    if lead:
      print(json.dumps(metrics, indent=2))
  else:
    text = runtime.sample(config, workdir, _PROMPT.value)
    if lead:
      print(text)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
