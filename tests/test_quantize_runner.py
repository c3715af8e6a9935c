"""The quantization runner (experiments/quantize.py) and the decode benchmark, end to end on a
tiny trained run: result rows, integer checkpoints, the source left untouched, one-line errors."""

import json

import jax
import numpy as np
import pytest

from compression import qtensor
from compression import quantize as quantize_lib
from experiments import decode_benchmark, quantize, runners
from experiments.configs import quantize as quantize_configs
from experiments.errors import UserError
from tests.runs import tiny_config, tree_digest


def config_for(source, variants, **changes):
  config = quantize_configs.get_config('rtn_int8')
  config.update(dict(source_workdir=str(source), variants=variants, calibration_batches=1,
                     calibration_rows=4), **changes)
  return config


def test_runner_writes_a_row_per_variant_and_integer_checkpoints(source, tmp_path):
  before = tree_digest(source)
  variants = 'rtn:int8,gptq:int4:g16:act,awq:int2:g16:asym,smoothquant:w8a8'
  rows = quantize.run(config_for(source, variants), tmp_path)
  assert tree_digest(source) == before
  assert [r['variant'] for r in rows] == ['float'] + variants.split(',')
  saved = json.loads((tmp_path / 'results.json').read_text())
  assert saved['rows'] == json.loads(json.dumps(rows))
  assert (tmp_path / 'results.md').read_text().startswith('| variant |')
  for r in rows:
    assert np.isfinite(r['nats_per_byte']) and r['weight_bytes'] > 0
  int8, int4, int2 = rows[1], rows[2], rows[3]
  assert 0.25 < int8['quantized_bytes'] / int8['quantized_float_bytes'] < 0.3
  assert int4['quantized_bytes'] < 0.7 * int8['quantized_bytes']   # a float scale per 16
  assert int2['quantized_bytes'] < int4['quantized_bytes']
  assert abs(int8['nats_per_byte'] / rows[0]['nats_per_byte'] - 1) < 0.005
  # Each variant's parameters restore as integers from <workdir>/params/<variant>.
  from experiments import source as source_lib
  src = source_lib.source_config(source)
  _, model, _, params = source_lib.load(config_for(source, 'rtn:int8'), src)
  abstract = jax.eval_shape(lambda p: quantize.apply_variant(
      quantize.parse_variant('rtn:int8'), model, p, None), params)
  restored = quantize.restore(tmp_path / 'params' / 'rtn-int8', abstract)
  leaf = restored['blocks_0']['mlp']['down']['kernel']
  assert isinstance(leaf, qtensor.QTensor) and leaf.values.dtype == np.int8
  assert quantize_lib.weight_bytes(restored) == int8['weight_bytes']
  assert int8['disk_bytes'] > 0


def test_the_outlier_testbed_keeps_the_float_loss(source, tmp_path):
  plain = quantize.run(config_for(source, 'rtn:int8'), tmp_path / 'plain')
  planted = quantize.run(config_for(source, 'rtn:int8', outliers=dict(channels=2, factor=30.0)),
                         tmp_path / 'planted')
  assert planted[0]['nats_per_byte'] == pytest.approx(plain[0]['nats_per_byte'], rel=1e-5)


@pytest.mark.parametrize('spec, match', [
    ('hqq:int4', "unknown method 'hqq'"), ('rtn:int5', 'bits=5 is not one of'),
    ('rtn:int4:g24', 'group_size=24 does not divide'), ('rtn:fast', "unknown option 'fast'"),
    ('awq:int4:act', 'act-order.*gptq only'), ('smoothquant:a1.5', 'alpha=1.5 must be in'),
    ('rtn:int4:w8a8', 'needs bits=8')])
def test_bad_variants_are_one_clear_error_before_any_work(source, tmp_path, spec, match):
  with pytest.raises(UserError, match=match) as e:
    quantize.check(config_for(source, spec), tmp_path / 'out')
  assert '\n' not in str(e.value)
  assert not (tmp_path / 'out').exists()


def test_the_source_run_is_never_the_workdir(source):
  with pytest.raises(UserError, match='is the source run'):
    quantize.check(config_for(source, 'rtn:int8'), source)


def test_decode_benchmark_times_float_and_quantized_weights(data_dir):
  text = runners.run('decode_benchmark', tiny_config(data_dir), steps=3, batch_sizes=(2,),
                     variants=('float', 'rtn:int4:g16', 'rtn:w8a8'))
  rows = [l for l in text.splitlines() if l.startswith('| rtn') or l.startswith('| float')]
  assert len(rows) == 3 and all(r.endswith('x |') for r in rows)
  with pytest.raises(UserError, match='needs calibration data'):
    decode_benchmark.run(tiny_config(data_dir), 3, (1,), ('float', 'gptq:int4'))


def test_reading_through_a_float_cache_scores_as_the_full_forward(source, tmp_path):
  rows = quantize.run(config_for(source, 'rtn:int8', kv_cache='float32,int8', kv_chunk=16),
                      tmp_path)
  assert [r['variant'] for r in rows] == ['float', 'rtn:int8', 'kv_cache:float32',
                                          'kv_cache:int8']
  assert rows[2]['nats_per_byte'] == pytest.approx(rows[0]['nats_per_byte'], rel=1e-5)
  assert rows[3]['nats_per_byte'] == pytest.approx(rows[0]['nats_per_byte'], rel=1e-2)
  assert '| kv_cache:int8 (16-token chunks) |' in (tmp_path / 'results.md').read_text()


def test_quantization_aware_and_plain_fine_tunes_run_through_the_training_loop(source, tmp_path):
  config = config_for(source, 'rtn:int4:g16:ft3,rtn:int4:g16:qat3')
  rows = quantize.run(config, tmp_path)
  ft, qat_row = rows[1], rows[2]
  assert np.isfinite(ft['ft_eval_nats_per_byte']) and np.isfinite(qat_row['qat_eval_nats_per_byte'])
  # What QAT trained (its fake-quantized eval) is what the converted integers serve.
  assert qat_row['nats_per_byte'] == pytest.approx(qat_row['qat_eval_nats_per_byte'], rel=1e-4)
  for name in ('rtn-int4-g16-ft3', 'rtn-int4-g16-qat3'):
    ran = json.loads((tmp_path / 'finetune' / name / 'config.json').read_text())
    assert ran['num_train_steps'] == 3
    assert ran['qat']['bits'] == (4 if 'qat' in name else 0)
  again = quantize.run(config, tmp_path)   # the fine-tunes are complete: reused, not rerun
  assert again[2]['nats_per_byte'] == qat_row['nats_per_byte']
