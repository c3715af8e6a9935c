"""The quantization runner (experiments/quantize.py) and the decode benchmark, end to end on a
tiny trained run: result rows, integer checkpoints, the source left untouched, one-line errors;
saved variants read back by --mode=eval and --mode=sample --variant (experiments/saved.py)."""

import json
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compression import paths, qtensor
from compression import quantize as quantize_lib
from experiments import decode_benchmark, quantize, runners, runtime, saved
from experiments import steps as steps_lib
from experiments import source as source_lib
from experiments.configs import prune as prune_configs
from experiments.configs import quantize as quantize_configs
from experiments.errors import UserError
from models import Transformer
from tests.runs import snapshot, tiny_config, tree_digest


def config_for(source, variants, **changes):
  config = quantize_configs.get_config('rtn_int8')
  config.update(dict(source_workdir=str(source), variants=variants, calibration_batches=1,
                     calibration_rows=4), **changes)
  return config


VARIANTS = 'rtn:int8,gptq:int4:g16:act,awq:int2:g16:asym,smoothquant:w8a8'


@pytest.fixture(scope='module')
def quantized(source, tmp_path_factory):
  """(workdir, result rows, source digest before the run) of one quantization run, shared."""
  before = tree_digest(source)
  workdir = tmp_path_factory.mktemp('quantized')
  return workdir, quantize.run(config_for(source, VARIANTS), workdir), before


def test_runner_writes_a_row_per_variant_and_integer_checkpoints(source, quantized):
  tmp_path, rows, before = quantized
  assert tree_digest(source) == before
  assert [r['variant'] for r in rows] == ['float'] + VARIANTS.split(',')
  saved_rows = json.loads((tmp_path / 'results.json').read_text())
  assert saved_rows['rows'] == json.loads(json.dumps(rows))
  assert (tmp_path / 'results.md').read_text().startswith('| variant |')
  for r in rows:
    assert np.isfinite(r['nats_per_byte']) and r['weight_bytes'] > 0
  int8, int4, int2 = rows[1], rows[2], rows[3]
  assert 0.25 < int8['quantized_bytes'] / int8['quantized_float_bytes'] < 0.3
  assert int4['quantized_bytes'] < 0.7 * int8['quantized_bytes']   # a float scale per 16
  assert int2['quantized_bytes'] < int4['quantized_bytes']
  assert abs(int8['nats_per_byte'] / rows[0]['nats_per_byte'] - 1) < 0.005
  # The cost model's figures: the same parameters and FLOPs, the bytes moved to int8 and scales.
  assert int8['params'] == rows[0]['params'] and int8['flops_per_token'] == rows[0][
      'flops_per_token']
  assert int8['storage_bytes']['int8'] == int8['quantized_float_bytes'] // 4
  assert sum(int8['storage_bytes'].values()) == int8['weight_bytes']
  # Each row timed its decoding; the int8 tree's decode program holds fewer bytes.
  assert all(r['decode_tokens_per_s'] > 0 and r['device'] for r in rows)
  assert int8['decode_peak_bytes'] < rows[0]['decode_peak_bytes']
  # Each variant's parameters restore as integers from <workdir>/params/<variant>.
  restored = saved.load(tmp_path / 'params' / 'rtn-int8')
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
    ('rtn:int4:static:qat5', 'use a8, not static'),
    ('rtn:int4:lsq', r'lsq \(learned ranges\) applies to qat')])
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
  assert len(rows) == 3 and all(' | 2/2 |' in r or ' | 1/2 |' in r or ' | 0/2 |' in r
                                for r in rows)
  assert rows[0].endswith('| 2/2 |') and 'GB/s' in text
  floor = [l for l in text.splitlines() if l.startswith(f'| {decode_benchmark.PRODUCTS} |')]
  assert len(floor) == 1 and '| 100% |' in floor[0]
  with pytest.raises(UserError, match='needs calibration data'):
    decode_benchmark.run(tiny_config(data_dir), 3, (1,), ('float', 'gptq:int4'))


def test_the_products_floor_runs_each_weight_once_per_step(data_dir):
  # Every kernel and the tied head: one dot each in the loop body, whatever the block's layout.
  config = tiny_config(data_dir)
  model = Transformer(steps_lib.model_config(config, 64).replace(scan_layers=False))
  params = nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))['params'])
  kernels = [p for p, _ in jax.tree_util.tree_leaves_with_path(params)
             if jax.tree_util.keystr(p).endswith("['kernel']")]
  lowered = jax.jit(decode_benchmark.products(model, params, 2, 3)).lower().as_text()
  assert lowered.count('stablehlo.dot_general') == len(kernels) + model.config.tie_embeddings
  assert decode_benchmark.products(model.clone(config=model.config.replace(n_experts=4)),
                                   params, 2, 3) is None


def test_the_engine_and_transformers_decode_the_same_exported_model_side_by_side(data_dir):
  # The tiny config unrolled and untied as a Llama checkpoint: all three make the same tokens.
  config = tiny_config(data_dir)
  text = runners.run('decode_benchmark', config, steps=4, batch_sizes=(1, 2),
                     variants=('float', 'engine', 'transformers'))
  rows = {tuple(c.strip() for c in l.split('|')[1:4:2]): l for l in text.splitlines()
          if l.startswith('| float') or l.startswith('| engine') or l.startswith('| transf')}
  assert set(rows) == {(v, b) for v in ('float', 'engine', 'transformers') for b in ('1', '2')}
  for (v, b), line in rows.items():
    assert line.endswith(f'| {b}/{b} |'), line


def test_reading_through_a_float_cache_scores_as_the_full_forward(source, tmp_path):
  rows = quantize.run(config_for(source, 'rtn:int8', kv_cache='float32,int8', kv_chunk=16),
                      tmp_path)
  assert [r['variant'] for r in rows] == ['float', 'rtn:int8', 'kv_cache:float32',
                                          'kv_cache:int8']
  assert rows[2]['nats_per_byte'] == pytest.approx(rows[0]['nats_per_byte'], rel=1e-5)
  assert rows[3]['nats_per_byte'] == pytest.approx(rows[0]['nats_per_byte'], rel=1e-2)
  assert '| kv_cache:int8 (16-token chunks) |' in (tmp_path / 'results.md').read_text()


def test_quantization_aware_and_plain_fine_tunes_run_through_the_training_loop(source, tmp_path):
  config = config_for(source, 'rtn:int4:g16:ft3,rtn:int4:g16:qat3:lsq')
  rows = quantize.run(config, tmp_path)
  ft, qat_row = rows[1], rows[2]
  assert np.isfinite(ft['ft_eval_nats_per_byte']) and np.isfinite(qat_row['qat_eval_nats_per_byte'])
  # What QAT trained (its fake-quantized eval, learned scales read back from the checkpoint)
  # is what the converted integers serve.
  assert qat_row['nats_per_byte'] == pytest.approx(qat_row['qat_eval_nats_per_byte'], rel=1e-4)
  for name in ('rtn-int4-g16-ft3', 'rtn-int4-g16-qat3-lsq'):
    ran = json.loads((tmp_path / 'finetune' / name / 'config.json').read_text())
    assert ran['num_train_steps'] == 3
    assert ran['qat']['bits'] == (4 if 'qat' in name else 0)
    assert ran['qat']['ranges'] == ('learned' if 'qat' in name else 'minmax')
  again = quantize.run(config, tmp_path)   # the fine-tunes are complete: reused, not rerun
  assert again[2]['nats_per_byte'] == qat_row['nats_per_byte']


def test_qat_with_int8_activations_serves_w4a8_integers(source, tmp_path):
  # torchao's 8da4w: int8 per-token activations and asymmetric int4 grouped weights, trained
  # through ActQuant and served as s8 x s8 products per group.
  rows = quantize.run(config_for(source, 'rtn:int4:g16:asym:a8:qat2'), tmp_path)
  ran = json.loads((tmp_path / 'finetune' / 'rtn-int4-g16-asym-a8-qat2' / 'config.json'
                    ).read_text())
  assert ran['qat']['act_bits'] == 8 and ran['qat']['symmetric'] is False
  assert rows[1]['nats_per_byte'] == pytest.approx(rows[1]['qat_eval_nats_per_byte'], rel=1e-4)
  leaves = jax.tree.leaves(saved.load(tmp_path / 'params' / 'rtn-int4-g16-asym-a8-qat2'),
                           is_leaf=lambda x: isinstance(x, qtensor.QTensor))
  quantized = [x for x in leaves if isinstance(x, qtensor.QTensor)]
  assert quantized and all(x.act == 'dynamic' and x.bits == 4 for x in quantized)


# ---- Saved variants read like any run: --mode=eval and --mode=sample with --variant.

def test_eval_of_a_saved_variant_is_its_results_row(source, quantized):
  workdir, rows, _ = quantized
  before = snapshot(workdir)
  for spec in ('rtn:int8', 'smoothquant:w8a8'):   # weight-only, and W8A8 (rescaled first)
    out = json.loads(runners.run('eval', config_for(source, 'rtn:int8'), workdir, variant=spec))
    row = next(r for r in rows if r['variant'] == spec)
    assert out['nats_per_byte'] == pytest.approx(row['nats_per_byte'], rel=1e-6)
    assert (out['step'], out['variant'], out['weight_bytes']) == (4, spec, row['weight_bytes'])
  assert snapshot(workdir) == before


def test_sampling_a_saved_variant_is_sampling_the_quantized_tree(source, quantized):
  workdir = quantized[0]
  config = config_for(source, 'rtn:int8')
  text = runners.run('sample', config, workdir, prompt='ROMEO:', variant='rtn:int8')
  src = source_lib.on_mesh(config, source_lib.source_config(source))
  _, model, tokenizer, params = source_lib.load(config, src)
  new = quantize.apply_variant(quantize.parse_variant('rtn:int8'), model, params, None)
  assert text.startswith('ROMEO:') and len(text) > len('ROMEO:')
  assert text == runtime.sample_texts(src, new, model, tokenizer, ['ROMEO:'], seed=0)[0]
  # What was restored is the quantized tree itself: its integers stay int8 (uint8 when packed).
  restored = saved.load(workdir / 'params' / 'rtn-int8')
  assert jax.tree.structure(restored) == jax.tree.structure(new)
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(new)):
    assert got.dtype == want.dtype and np.array_equal(got, want)
  assert any(isinstance(x, qtensor.QTensor) and x.values.dtype == np.int8
             for x in paths.flatten(restored).values())
  packed = [x for x in paths.flatten(saved.load(workdir / 'params' / 'awq-int2-g16-asym')).values()
            if isinstance(x, qtensor.QTensor)]
  assert packed and all(x.values.dtype == np.uint8 and x.zero.dtype == np.int8 for x in packed)


def test_a_described_tree_restores_with_its_leaf_types_and_dtypes(tmp_path):
  q = qtensor.QTensor(jnp.arange(-6, 6, dtype=jnp.int8).reshape(3, 4), jnp.full((1, 3), 0.5),
                      jnp.zeros((1, 3), jnp.int8), jnp.float32(0.25), names=('embed', 'mlp'),
                      inputs=1, outputs=1, bits=8, group_size=0, dtype='bfloat16', act='static')
  tree = {'layer': {'kernel': q, 'bias': jnp.arange(3, dtype=jnp.bfloat16)}}
  info = dict(variant=dict(spec='rtn:int8:static'), source_step=4)
  assert saved.save(tmp_path / 'v', tree, info) > 0
  description = json.loads((tmp_path / 'v.json').read_text())
  assert description['info'] == info
  assert jax.tree.structure(saved.abstract(description)) == jax.tree.structure(tree)
  back = saved.load(tmp_path / 'v')
  assert jax.tree.structure(back) == jax.tree.structure(tree)   # static fields (tuples) too
  for got, want in zip(jax.tree.leaves(back), jax.tree.leaves(tree)):
    assert got.dtype == want.dtype and np.array_equal(got, want)
  (tmp_path / 'v.json').unlink()   # as an interrupted save leaves it
  with pytest.raises(UserError, match='has no v.json: its save was interrupted; rerun '
                                      '--mode=quantize'):
    saved.load(tmp_path / 'v')


@pytest.mark.parametrize('mode, case, match', [
    ('eval', 'training', '--variant=rtn:int8 reads a variant saved by --mode=quantize: .*not a '
                         'training config'),
    ('sample', 'pruning', 'needs a quantization config .* this is a pruning config'),
    ('eval', 'unsaved', r'--variant=rtn:int3 was not saved in .*params; saved: awq:int2:g16:asym, '
                        r'gptq:int4:g16:act, rtn:int8, smoothquant:w8a8$'),
    ('eval', 'other_source', 'was quantized from .*; config.source_workdir is .*: pass '
                             '--config.source_workdir='),
    ('eval', 'no_variant', '--mode=eval needs a training config.*--mode=eval --variant=SPEC'),
    ('sample', 'no_variant', '--mode=sample needs a training config.*--mode=sample '
                             '--variant=SPEC'),
])
def test_reading_a_variant_refuses_bad_input_in_one_line(source, quantized, data_dir, tmp_path,
                                                          mode, case, match):
  workdir = quantized[0]
  before, source_before = snapshot(workdir), tree_digest(source)
  config, variant = config_for(source, 'rtn:int8'), 'rtn:int8'
  if case == 'training':
    config = tiny_config(data_dir)
  elif case == 'pruning':
    config = prune_configs.get_config()
    config.source_workdir = str(source)
  elif case == 'unsaved':
    variant = 'rtn:int3'
  elif case == 'other_source':
    config.source_workdir = str(tmp_path)
  elif case == 'no_variant':
    variant = ''
  with pytest.raises(UserError, match=match) as e:
    runners.run(mode, config, workdir, variant=variant)
  assert '\n' not in str(e.value)
  assert snapshot(workdir) == before and tree_digest(source) == source_before


def test_a_variant_whose_save_was_interrupted_is_refused(source, quantized, tmp_path):
  shutil.copytree(quantized[0] / 'params' / 'rtn-int8', tmp_path / 'params' / 'rtn-int8')
  with pytest.raises(UserError, match='rtn-int8 has no rtn-int8.json: its save was interrupted; '
                                      'rerun --mode=quantize') as e:
    runners.run('eval', config_for(source, 'rtn:int8'), tmp_path, variant='rtn:int8')
  assert '\n' not in str(e.value)


def test_only_eval_and_sample_take_a_variant():
  with pytest.raises(UserError, match='--variant=rtn:int8 applies to --mode=eval and '
                                      '--mode=sample only'):
    runners.check_flags('train', runners.Flags(variant='rtn:int8'), 'w')
  for mode in ('eval', 'sample'):
    runners.check_flags(mode, runners.Flags(variant='rtn:int8'), 'w')
