"""The runner registry and the command line's log filter (imports: tests/test_imports.py)."""

import dataclasses
import logging

import pytest

from experiments import cli, runners
from experiments.errors import UserError
from tests.runs import ROOT


def test_every_mode_is_a_registered_runner_with_a_one_line_doc():
  from experiments import main   # defines the command line's flags: its --mode choices
  assert main.flags.FLAGS['mode'].parser.enum_values == list(runners.RUNNERS)
  assert {'train', 'eval', 'sample', 'prune', 'benchmark'} <= set(runners.RUNNERS)
  for name, runner in runners.RUNNERS.items():
    assert runner.doc and '\n' not in runner.doc, name
    assert set(runner.flags) <= {f.name for f in dataclasses.fields(runners.Flags)}


@pytest.mark.parametrize('name, flags, workdir, match', [
    ('bogus', {}, 'w', '--mode=bogus is not one of train, eval, sample, prune, benchmark'),
    ('eval', dict(resume='new'), 'w', '--resume=new applies to --mode=train only'),
    ('train', dict(prompt='x'), 'w', '--prompt=x applies to --mode=sample only'),
    ('sample', dict(remat=('full',)), 'w', '--remat=full applies to --mode=benchmark only'),
    ('eval', {}, None, '--mode=eval needs --workdir'),
    ('benchmark', {}, 'w', '--mode=benchmark takes no --workdir'),
])
def test_a_runner_refuses_what_it_does_not_take_in_one_line(name, flags, workdir, match):
  with pytest.raises(UserError, match=match):
    runners.run(name, None, workdir, **flags)


def _record(path: str, level: int) -> logging.LogRecord:
  return logging.LogRecord('x', level, path, 1, 'message', None, None)


@pytest.mark.parametrize('package', ['experiments', 'models', 'compression', 'sharding'])
def test_info_lines_of_every_project_package_are_shown(package):
  keep = cli.OwnInfoOnly()
  assert keep.filter(_record(str(ROOT / package / 'module.py'), logging.INFO))
  library = '/usr/lib/python3/site-packages/orbax/checkpoint/manager.py'
  assert not keep.filter(_record(library, logging.INFO))
  assert keep.filter(_record(library, logging.WARNING))
