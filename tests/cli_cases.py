"""Runs many command lines of the entry points cheaply, exactly as the shell would.

`python -m tests.cli_cases < cases.json > results.json`: this process imports the libraries
once (about 2 s), then forks one child per case that runs `python -m <module> <args>` through
`runpy` (about 0.3 s each). The parent holds no threads when it forks (checked). Each case is
{"module", "args", "watch": [paths]}; each result is {"rc", "stdout", "stderr", "changed": [the
watched paths whose files changed]}.
"""

import json
import os
import runpy
import sys
import tempfile
import threading
import traceback

import experiments.cli  # noqa: F401  (the slow imports, shared by every child)
import experiments.prune  # noqa: F401
import experiments.runtime  # noqa: F401
import experiments.train  # noqa: F401
from tests.runs import snapshot


def _child(module: str, args: list) -> int:
  sys.argv = [module] + args
  try:
    runpy.run_module(module, run_name='__main__', alter_sys=True)
  except SystemExit as e:
    if e.code is None or isinstance(e.code, int):
      return e.code or 0
    print(e.code, file=sys.stderr)   # what the interpreter does with sys.exit('message')
    return 1
  except BaseException:  # noqa: BLE001 - reported like the interpreter would
    traceback.print_exc()
    return 1
  return 0


def run(case: dict) -> dict:
  before = {p: snapshot(p) for p in case['watch']}
  with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
    assert threading.active_count() == 1, 'forking with threads alive'
    pid = os.fork()
    if pid == 0:
      os.dup2(out.fileno(), 1)
      os.dup2(err.fileno(), 2)
      code = _child(case['module'], case['args'])
      sys.stdout.flush()
      sys.stderr.flush()
      os._exit(code)
    _, status = os.waitpid(pid, 0)
    out.seek(0)
    err.seek(0)
    result = dict(rc=os.waitstatus_to_exitcode(status), stdout=out.read().decode(errors='replace'),
                  stderr=err.read().decode(errors='replace'))
  result['changed'] = [p for p in case['watch'] if snapshot(p) != before[p]]
  return result


if __name__ == '__main__':
  json.dump([run(c) for c in json.load(sys.stdin)], sys.stdout)
