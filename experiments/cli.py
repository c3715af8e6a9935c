"""The command-line boundary shared by the entry points (`main.py`, `benchmark.py`).

Bad flags, config files and overrides, and every `UserError` or `OSError` (disk full,
permissions) raised later, end as one line `error: ...` on stderr with exit status 1. Anything
else is a bug and keeps its traceback.
"""

import ast
import errno
import functools
import logging as pylogging
import os
import re
import sys

import ml_collections
from absl import flags, logging

from experiments.errors import UserError


def _config_value(argv):
  """The value given to --config (as '--config=V' or '--config V'), or None."""
  for i, arg in enumerate(argv):
    if arg.startswith('--config='):
      return arg[len('--config='):]
    if arg == '--config' and i + 1 < len(argv):
      return argv[i + 1]
  return None


def check_config_file(value) -> None:
  """The file behind --config=PATH[:ARG] exists, parses and defines get_config."""
  if value is None:
    return
  path = value.split(':', 1)[0]
  if not os.path.isfile(path):
    raise UserError(f'--config={value}: no such file {path!r}' if not os.path.exists(path) else
                    f'--config={value}: {path!r} is not a file')
  try:
    with open(path, encoding='utf-8') as f:
      tree = ast.parse(f.read(), path)
  except SyntaxError as e:
    raise UserError(f'--config={value}: {path}:{e.lineno}: {e.msg}') from None
  except (OSError, UnicodeDecodeError) as e:
    raise UserError(f'--config={value}: {path} cannot be read ({e})') from None
  if not any(isinstance(n, ast.FunctionDef) and n.name == 'get_config' for n in tree.body):
    raise UserError(f'--config={value}: {path} defines no get_config(arg) function')


def parse_flags(argv):
  """absl flag parsing with bad flags, config files and overrides reported in one line."""
  try:
    check_config_file(_config_value(argv[1:]))
  except UserError as e:
    sys.exit(f'error: {e}')
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    if isinstance(e, (AttributeError, KeyError)):
      key = str(e).strip('"\'')
      culprit = [a for a in argv[1:] if a.startswith('--config.') and key in a.split('=')[0]]
      sys.exit(f'error: unknown config field {key!r} in {culprit[0] if culprit else argv[1:]}')
    lines = [l for l in str(e).strip().splitlines() if l.strip()]
    last = re.sub(r'^\w+Error: ', '', lines[-1]) if lines else type(e).__name__
    sys.exit(f'error: {last}')
  except Exception as e:  # noqa: BLE001 - an exception inside the config file's get_config
    sys.exit(f'error: --config: get_config raised {type(e).__name__}: {e}')


def check_is_config(config, value) -> None:
  if not isinstance(config, ml_collections.ConfigDict):
    raise UserError(f'--config={value}: get_config returned a {type(config).__name__}, not a '
                    f'ml_collections.ConfigDict')


def describe_os_error(e: OSError) -> str:
  what = f'{e.strerror or e}' + (f': {e.filename}' if e.filename else '')
  if e.errno == errno.ENOSPC:
    return f'the disk is full ({what}); free space and run again: the run resumes'
  return what


def guarded(main_fn):
  """Wraps an absl main so user-facing failures print one line and exit 1."""
  @functools.wraps(main_fn)
  def wrapper(argv):
    try:
      return main_fn(argv)
    except UserError as e:
      sys.exit(f'error: {e}')
    except OSError as e:
      sys.exit(f'error: {describe_os_error(e)}')
    except KeyboardInterrupt:
      sys.exit('error: interrupted (checkpoints on disk are complete; run again to resume)')
  return wrapper


_PROJECT = tuple(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), pkg, '')
                 for pkg in ('experiments', 'models', 'compression', 'sharding'))


class OwnInfoOnly(pylogging.Filter):
  """Keeps warnings from everyone but INFO lines only from this project (libraries are chatty).

  A library's error is cut to its first line: the failure it reports reaches the entry point,
  which says in one line what happened and what to do (`--verbosity=1` keeps the tracebacks).
  """

  def filter(self, record):
    if record.pathname.startswith(_PROJECT):
      return True
    if record.levelno >= pylogging.ERROR and logging.get_verbosity() < logging.DEBUG:
      record.msg = record.getMessage().strip().split('\n', 1)[0][:300]
      record.args, record.exc_info, record.exc_text = None, None, None
    return record.levelno >= pylogging.WARNING


def quiet_libraries() -> None:
  logging.get_absl_handler().addFilter(OwnInfoOnly())
