"""Not collected by the suite (no test_ prefix): tests/test_crash_rerun.py runs it under xdist.

Its first test hangs while the file named by FRUGAL_CRASHES holds a positive count (decremented
first), without crashing or reaching its time limit: a run that stalls. Its second test
checks that the count is used up."""

import os
import pathlib
import time


def test_hangs_while_the_count_lasts():
  counter = pathlib.Path(os.environ['FRUGAL_CRASHES'])
  left = int(counter.read_text())
  if left > 0:
    counter.write_text(str(left - 1))
    time.sleep(3600)


def test_after_it():
  # Runs only after the first test has used up the count (in the fresh process that reruns both).
  assert int(pathlib.Path(os.environ['FRUGAL_CRASHES']).read_text()) == 0
