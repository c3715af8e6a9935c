"""Not collected by the suite (no test_ prefix): tests/test_crash_rerun.py runs it under xdist.

Its one test kills its own process with SIGSEGV (or, with FRUGAL_HANG set, hangs) while the file
named by FRUGAL_CRASHES holds a positive count, decrementing it first: a native crash or a
deadlock that happens a given number of times."""

import os
import pathlib
import signal
import time


def test_crashes_while_the_count_lasts():
  counter = pathlib.Path(os.environ['FRUGAL_CRASHES'])
  left = int(counter.read_text())
  if left > 0:
    counter.write_text(str(left - 1))
    if os.environ.get('FRUGAL_HANG'):
      time.sleep(3600)
    os.kill(os.getpid(), signal.SIGSEGV)
