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
    ('bogus', {}, 'w', '--mode=bogus is not one of train, eval, sample, prune, quantize, '
                       'distill, benchmark, compare, decode_benchmark, serve'),
    ('eval', dict(resume='new'), 'w', '--resume=new applies to --mode=train only'),
    ('train', dict(prompt='x'), 'w', '--prompt=x applies to --mode=sample only'),
    ('sample', dict(remat=('full',)), 'w', '--remat=full applies to --mode=benchmark only'),
    ('eval', {}, None, '--mode=eval needs --workdir'),
    ('benchmark', {}, 'w', '--mode=benchmark takes no --workdir'),
    ('benchmark', dict(peers=('eager',)), None, '--peers=eager applies to --mode=compare only'),
    ('compare', dict(remat=('full',)), None, '--remat=full applies to --mode=benchmark only'),
])
def test_a_runner_refuses_what_it_does_not_take_in_one_line(name, flags, workdir, match):
  with pytest.raises(UserError, match=match):
    runners.run(name, None, workdir, **flags)


def test_compare_times_frugal_and_the_pytorch_peer_of_the_same_model(capsys):
  from experiments.configs import shakespeare
  config = shakespeare.get_config('tiny')
  text = runners.run('compare', config, steps=1, peers=('eager',))
  rows = [line for line in text.splitlines() if line.startswith('| ') and 'ms |' in line]
  assert [r.split(' | ')[0] for r in rows] == ['| Frugal, jax.jit', f'| PyTorch {_torch()}, eager '
                                                f'({_threads()} threads)']
  assert rows[0].endswith('| 1.00x |')
  with pytest.raises(UserError, match="--peers: 'jit' is not one of eager, compile"):
    runners.run('compare', config, peers=('jit',))


def test_the_pytorch_peer_has_the_parameters_of_the_frugal_model():
  from experiments import peer
  from models import ModelConfig, flops
  from tests.conftest import init_params
  cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48,
                    tie_embeddings=True)
  model = peer._model(cfg, seed=0)
  assert sum(p.numel() for p in model.parameters()) == flops.param_count(init_params(cfg))
  with pytest.raises(ValueError, match='the PyTorch peer is a Llama model'):
    peer._model(cfg.replace(qkv_bias=True), seed=0)


def _torch():
  import torch
  return torch.__version__


def _threads():
  import torch
  return torch.get_num_threads()


def _record(path: str, level: int) -> logging.LogRecord:
  return logging.LogRecord('x', level, path, 1, 'message', None, None)


@pytest.mark.parametrize('package', ['experiments', 'models', 'compression', 'sharding'])
def test_info_lines_of_every_project_package_are_shown(package):
  keep = cli.OwnInfoOnly()
  assert keep.filter(_record(str(ROOT / package / 'module.py'), logging.INFO))
  library = '/usr/lib/python3/site-packages/orbax/checkpoint/manager.py'
  assert not keep.filter(_record(library, logging.INFO))
  assert keep.filter(_record(library, logging.WARNING))
