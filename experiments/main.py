"""Entry point: `python -m experiments.main --config=experiments/configs/shakespeare.py --workdir=DIR`.

Modes: train (default; resumes from the workdir's latest checkpoint), eval, sample (--prompt).
Multi-process runs start the same command on every host: on Cloud TPU, Slurm or Open MPI nothing
more is needed; elsewhere add --coordinator_address=HOST:PORT (process 0's) --num_processes=N
--process_id=I.
Kept short: the logic lives in importable modules (`experiments.train`).
"""

import json
import logging as pylogging
import sys

from absl import app, flags, logging
from etils import epath
from ml_collections import config_flags

import jax

import sharding
from experiments import prune, train, validate

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (get_config(arg)).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory: checkpoints, metrics, samples.')
_MODE = flags.DEFINE_enum('mode', 'train', ['train', 'eval', 'sample', 'prune'], 'What to do: '
                          'prune runs experiments/configs/prune.py configs.')
_PROMPT = flags.DEFINE_string('prompt', '', 'Prompt text for --mode=sample.')
_DISTRIBUTED = flags.DEFINE_enum('distributed', 'auto', list(sharding.distributed.MODES),
                                 'Join a multi-process run: auto (when an address is given or a '
                                 'TPU/Slurm/MPI launcher is detected), on, off.')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None,
                                   'HOST:PORT of process 0, for multi-process runs elsewhere.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes in the run.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process, 0..num_processes-1.')
flags.mark_flags_as_required(['config', 'workdir'])


def parse_flags(argv):
  """absl flag parsing, with bad flags and config overrides reported in one line, no traceback."""
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    if isinstance(e, (AttributeError, KeyError)):
      key = str(e).strip('"\'')
      culprit = [a for a in argv[1:] if a.startswith('--config.') and key in a.split('=')[0]]
      sys.exit(f'error: unknown config field {key!r} in {culprit[0] if culprit else argv[1:]}')
    lines = [l for l in str(e).strip().splitlines() if l.strip()]
    sys.exit(f'error: {lines[-1] if lines else type(e).__name__}')


class _OwnInfoOnly(pylogging.Filter):
  """Keeps warnings from everyone but INFO lines only from this project (libraries are chatty)."""

  def filter(self, record):
    return record.levelno >= pylogging.WARNING or '/experiments/' in record.pathname or (
        '/models/' in record.pathname)


def main(argv):
  logging.get_absl_handler().addFilter(_OwnInfoOnly())
  if len(argv) > 1:
    sys.exit(f'error: unexpected arguments {argv[1:]}')
  config, workdir = _CONFIG.value, epath.Path(_WORKDIR.value)
  if _MODE.value == 'prune':
    try:
      prune.run(config, workdir)
    except (ValueError, FileNotFoundError) as e:
      sys.exit(f'error: {e}')
    print((workdir / 'results.md').read_text())
    return
  try:
    sharding.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                        _DISTRIBUTED.value)
    validate.check(config, workdir, _MODE.value)
  except ValueError as e:
    sys.exit(f'error: {e}')
  lead = jax.process_index() == 0   # the one process that writes files and prints
  if not lead:
    logging.set_verbosity(logging.WARNING)
  if _MODE.value == 'train':
    signature = workdir / 'model.json'
    if lead and not signature.exists():
      signature.write_text(json.dumps(validate.model_signature(config), indent=2))
    if lead:
      (workdir / 'config.json').write_text(config.to_json_best_effort(indent=2))
    metrics = train.train_and_evaluate(config, workdir)
    logging.info('final eval: %s', metrics)
  elif _MODE.value == 'eval':
    metrics = train.evaluate(config, workdir)
    if lead:
      print(json.dumps(metrics, indent=2))
  else:
    text = train.sample(config, workdir, _PROMPT.value)
    if lead:
      print(text)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
