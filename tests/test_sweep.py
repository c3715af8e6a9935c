"""Sweeps from config files and their merged reports, on a toy config and a stand-in runner."""

import json
import re

import ml_collections
import pytest

from experiments import report, sweep
from experiments.configs import sweeps
from experiments.errors import UserError


def toy(product=(('variants', ('a:1', 'b:2')), ('calibration_rows', (8, 16))), points=(),
        mode='quantize', **settings):
  config = ml_collections.ConfigDict(dict(variants='a:1', calibration_rows=4, seed=0,
                                          mesh=dict(data=1)))
  config.sweep = ml_collections.ConfigDict(dict(mode=mode, product=product, points=points,
                                                **settings))
  return config


def fake_runner(calls):
  """A runner writing results.json like the quantization runner: the float row, then one."""
  def run_point(mode, config, workdir):
    calls.append((mode, config.variants, config.calibration_rows))
    assert 'sweep' not in config
    size = 100 * config.calibration_rows
    rows = [dict(variant='float', nats_per_byte=1.5, weight_bytes=4000, forward_ms=2.0),
            dict(variant=config.variants, nats_per_byte=1.5 + 1 / config.calibration_rows,
                 weight_bytes=size, forward_ms=1.0)]
    (workdir / 'results.json').write_text(json.dumps(dict(rows=rows)))
  return run_point


def test_product_and_points_expand_in_order_with_names():
  named = sweep.points(toy(points=({'seed': 3},)))
  assert [o for _, o in named] == [
      dict(variants='a:1', calibration_rows=8), dict(variants='a:1', calibration_rows=16),
      dict(variants='b:2', calibration_rows=8), dict(variants='b:2', calibration_rows=16),
      dict(seed=3)]
  assert named[0][0] == 'variants-a-1_calibration_rows-8' and named[-1][0] == 'seed-3'
  config = sweep.point_config(toy(), {'calibration_rows': 16, 'mesh.data': 2})
  assert config.calibration_rows == 16 and config.mesh.data == 2 and 'sweep' not in config


@pytest.mark.parametrize('config,message', [
    (toy(product=(), points=()), 'config.sweep has no points'),
    (toy(product=(('nope', (1, 2)),)), 'overrides config.nope, which this config does not have'),
    (toy(product=(('mesh.fsdp', (1,)),)), 'overrides config.mesh.fsdp, which this config'),
    (toy(product=(('seed.x', (1,)),)), 'config.seed is not a group of this config'),
    (toy(product=(('calibration_rows', ('many',)),)), "sets config.calibration_rows='many', but"),
    (toy(product=(('seed', ()),)), 'must be (field, (value, ...)) with at least one value'),
    (toy(mode='train'), "config.sweep.mode='train' is not one of prune, quantize, distill"),
    (toy(product=(), points=({'seed': 1}, {'seed': 1})), 'gives the point'),
    (toy(product=(), points=({},)), 'must be a non-empty dict of overrides'),
    (toy(timing_rounds=0), 'config.sweep.timing_rounds=0 must be an integer >= 1'),
    (toy(price_per_hour='x'), "config.sweep.price_per_hour='x' must be a number >= 0"),
])
def test_bad_sweeps_are_one_line_and_write_nothing(tmp_path, config, message):
  with pytest.raises(UserError, match=re.escape(message)) as e:
    sweep.run(config, tmp_path / 'w', run_point=fake_runner([]))
  assert '\n' not in str(e.value)
  assert not (tmp_path / 'w').exists()


def test_a_config_without_a_sweep_block_is_refused():
  with pytest.raises(UserError, match='needs a config with a sweep block'):
    sweep.points(ml_collections.ConfigDict(dict(seed=0)))


def test_run_skips_done_points_and_runs_one_by_index(tmp_path, capsys):
  calls = []
  out = sweep.run(toy(), tmp_path, point=2, run_point=fake_runner(calls))
  assert calls == [('quantize', 'b:2', 8)] and '1 of 4 points done' in out
  out = sweep.run(toy(), tmp_path, run_point=fake_runner(calls))
  assert [c[1:] for c in calls[1:]] == [('a:1', 8), ('a:1', 16), ('b:2', 16)]
  printed = capsys.readouterr().out
  assert 'point 3 of 4: variants-b-2_calibration_rows-8 is done' in printed
  assert 'min left' in printed and '4 of 4 points done' in out
  with pytest.raises(UserError, match='--point=4 is not a point of this sweep: 0..3'):
    sweep.run(toy(), tmp_path, point=4, run_point=fake_runner(calls))


def test_launch_commands_run_one_point_each(tmp_path):
  text = sweep.run(toy(), tmp_path, print_commands=True,
                   config_args=('--config=experiments/configs/sweeps.py:x', '--config.seed=2'))
  lines = text.splitlines()
  assert len(lines) == 4 and not tmp_path.joinpath('variants-a-1_calibration_rows-8').exists()
  for i, line in enumerate(lines):
    assert line.endswith(f'--point={i}') and '--config.seed=2' in line and '--mode=sweep' in line


def test_merge_collects_every_point_into_one_report_and_plot(tmp_path):
  with pytest.raises(UserError, match='no point of this sweep has finished'):
    sweep.merge(toy(), tmp_path)
  sweep.run(toy(), tmp_path, point=0, run_point=fake_runner([]))
  sweep.run(toy(), tmp_path, point=3, run_point=fake_runner([]))
  text = sweep.merge(toy(), tmp_path)
  assert 'Not finished yet: variants-a-1_calibration_rows-16, variants-b-2_calibration_rows-8' \
      in text
  rows = json.loads((tmp_path / 'report.json').read_text())['rows']
  # The source model's row once (every point scores it), then each point's variant.
  assert [r['name'] for r in rows] == ['float', 'a:1 (calibration_rows=8)',
                                       'b:2 (calibration_rows=16)']
  assert rows[1]['bytes_ratio'] == pytest.approx(800 / 4000)
  assert rows[2]['speedup'] == pytest.approx(2.0)
  assert rows[2]['quality_change'] == pytest.approx(1 / 16)
  assert (tmp_path / 'pareto.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  assert '| float | 1.5000 | +0.0000 | 4,000 | 1.000 |' in (tmp_path / 'report.md').read_text()


def test_report_rows_from_each_runners_results():
  prune = dict(variant='wanda:0.5', nats_per_byte=1.6, finetuned_nats_per_byte=1.55,
               sparse_bytes=900, dense_bytes=1600, effective_flops_per_token=5e6, sparsity=0.5,
               forward_ms=1.0, decode_tokens_per_s=50.0, decode_peak_bytes=3000, device='cpu')
  quant = dict(variant='rtn:int8', nats_per_byte=1.46, weight_bytes=400, forward_ms=2.0)
  cached = dict(variant='kv_cache:int8', nats_per_byte=1.46, weight_bytes=1600)
  unscored = dict(variant='x')
  dense = dict(variant='dense', nats_per_byte=1.5, sparse_bytes=1700, dense_bytes=1600)
  assert report.from_results([dense])[0]['bytes'] == 1600   # the smaller storage
  # A quantized row counts the FLOPs it runs, a student its bytes by storage type.
  int3 = dict(variant='gptq:int3', nats_per_byte=1.5, weight_bytes=10, flops_per_token=8e6,
              effective_flops_per_token=6e6)
  student = dict(variant='scratch:kd', nats_per_byte=1.5, storage_bytes={'float32': 800})
  assert [r['flops_per_token'] for r in report.from_results([int3])] == [8e6]
  assert report.from_results([student])[0]['bytes'] == 800
  rows = report.from_results([prune, quant, cached, unscored], prefix='p')
  assert rows[0] == dict(name='p/wanda:0.5', nats_per_byte=1.55, bytes=900,
                         flops_per_token=5e6, forward_ms=1.0, decode_tokens_per_s=50.0,
                         peak_bytes=3000, device='cpu')
  assert rows[1]['bytes'] == 400 and rows[2]['forward_ms'] is None and len(rows) == 3
  with pytest.raises(ValueError, match="baseline='nope' is not a row"):
    report.with_ratios(rows, 'nope')


def test_the_declared_sweeps_expand():
  for name, n in (('gptq_calibration', 6), ('prune_recovery', 4)):
    assert len(sweep.points(sweeps.get_config(name))) == n


def test_prices_follow_the_measured_decode_speed_and_bad_prices_are_refused(tmp_path):
  rows = [dict(name='a', nats_per_byte=1.5, bytes=100, decode_tokens_per_s=100.0),
          dict(name='b', nats_per_byte=1.6, bytes=50, decode_tokens_per_s=400.0),
          dict(name='c', nats_per_byte=1.7, bytes=40)]
  out = report.write(tmp_path, rows, price_per_hour=7.2)
  # 7.2 USD/h = 0.002 USD/s; a million tokens take 1e4 s at 100 tokens/s, 2.5e3 s at 400.
  assert [r['usd_per_million_tokens'] for r in out] == [pytest.approx(20.0),
                                                        pytest.approx(5.0), None]
  assert out[1]['decode_speedup'] == pytest.approx(4.0)
  assert '| 20.0000 |' in (tmp_path / 'report.md').read_text()
  assert '$ per M tokens' not in report.markdown(report.with_ratios(rows))
  with pytest.raises(ValueError, match="price_per_hour='x' must be a number >= 0"):
    report.write(tmp_path / 'bad', rows, price_per_hour='x')
  assert not (tmp_path / 'bad').exists()
