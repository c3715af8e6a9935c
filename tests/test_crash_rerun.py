"""A test whose xdist worker crashes, or which hangs past the time limit, runs once more in a fresh
process (tests/conftest.py): one crash then a pass passes, and is reported; two crashes fail."""

import os
import subprocess
import sys

import pytest

from tests.runs import ROOT


@pytest.mark.parametrize('crashes,hang,outcome', [(1, '', '1 passed'), (2, '', '1 failed'),
                                                  (1, '1', '1 passed')])
def test_a_crashed_worker_s_test_is_judged_by_one_fresh_run(tmp_path, crashes, hang, outcome):
  counter = tmp_path / 'crashes'
  counter.write_text(str(crashes))
  run = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-n', '1', '-p', 'no:cacheprovider',
                        'tests/crash_case.py'], cwd=ROOT, capture_output=True, text=True,
                       timeout=600, env={**os.environ, 'FRUGAL_CRASHES': str(counter),
                                         'FRUGAL_HANG': hang, 'FRUGAL_TEST_TIME_LIMIT': '20'})
  out = run.stdout + run.stderr
  assert outcome in out, out[-3000:]
  assert "crashed while running 'tests/crash_case.py::test_crashes_while_the_count_lasts'" in out
  if hang:   # the time limit printed where the test was stuck
    assert 'Timeout (0:00:20)!' in out, out[-3000:]
    assert 'crash_case.py", line 19 in test_crashes_while_the_count_lasts' in out, out[-3000:]
  assert counter.read_text() == '0'
  assert (run.returncode == 0) == (crashes == 1)


def test_a_stalled_run_ends_with_the_unreported_tests_run_again(tmp_path):
  # No report for 15 s: both tests run again in one fresh process, then the workers stop.
  counter = tmp_path / 'hangs'
  counter.write_text('1')
  run = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-n', '1', '-p', 'no:cacheprovider',
                        'tests/stall_case.py'], cwd=ROOT, capture_output=True, text=True,
                       timeout=600, env={**os.environ, 'FRUGAL_CRASHES': str(counter),
                                         'FRUGAL_STALL_LIMIT': '15'})
  out = run.stdout + run.stderr
  assert 'no test reported for 15 s: 2 tests never reported run again' in out, out[-3000:]
  assert '2 passed' in out and 'the stalled run ends with exit 0' in out, out[-3000:]
  assert run.returncode == 0 and counter.read_text() == '0'
