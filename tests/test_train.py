"""Training core: steps, optimizer pieces, checkpoints/resume, CLI, config validation."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

from experiments import benchmark, checkpoints, data, runtime, steps, train, validate
from experiments import workdir as workdir_lib
from experiments.configs import gpt2 as gpt2_configs
from experiments.configs import llama as llama_configs
from experiments.configs import mixtral as mixtral_configs
from experiments.configs import shakespeare
from models import Transformer, flops
from tests.runs import ROOT, apply_change, losses, run_main

def tiny_config(data_dir) -> ml_collections.ConfigDict:
  config = shakespeare.get_config('tiny')
  config.data.data_dir = str(data_dir)
  return config


def test_loss_falls_on_the_tiny_config_and_the_step_compiles_once(tmp_path, data_dir,
                                                                  monkeypatch):
  traces = []
  step = steps.train_step
  monkeypatch.setattr(steps, 'train_step', lambda *a, **k: traces.append(1) or step(*a, **k))
  config = tiny_config(data_dir)
  config.num_train_steps = 30
  config.optimizer.learning_rate = 3e-3
  config.optimizer.warmup_steps = 5
  config.eval_every = 15   # an evaluation between steps does not retrace the step
  config.checkpoint_every = 30
  train.train_and_evaluate(config, tmp_path)
  assert len(traces) == 1   # traced (and compiled) once for the run's 30 steps
  loss = losses(tmp_path)
  assert np.mean([loss[s] for s in (26, 27, 28, 29, 30)]) < loss[1] - 1.0
  assert loss[1] == pytest.approx(np.log(259), abs=0.3)   # uniform over the byte vocabulary


def test_eval_batches_zero_means_the_whole_split(data_dir):
  config = tiny_config(data_dir)
  config.data.seq_len, config.eval_batch_size, config.eval_batches = 256, 64, 0
  tokenizer, model, tx = runtime.setup(config)
  placement = runtime.Placement(config, model, tx)   # 8-way data parallel on the fake devices
  state = steps.init_state(model, tx, 0, config.data.seq_len)
  metrics = runtime.evaluate_params(config, state.params, model, tokenizer, placement)
  batches = data.eval_batches(config.data, tokenizer, batch_size=64)
  assert metrics['tokens'] == sum(float(b['weights'].sum()) for b in batches) > 400_000
  assert metrics['nats_per_byte'] == pytest.approx(metrics['loss'], rel=0.02)   # bytes: 1 token each


def test_gradient_accumulation_equals_one_large_batch(data_dir):
  config = tiny_config(data_dir)
  tokenizer, model, tx = runtime.setup(config)
  batch = next(data.train_iterator(config.data, tokenizer, batch_size=8, seed=0))
  token_bytes = jnp.asarray(tokenizer.token_bytes, jnp.float32)
  results = []
  for accum in (1, 2, 4):
    state = steps.init_state(model, tx, 0, config.data.seq_len)
    state, metrics = steps.train_step(state, batch, token_bytes,
                                      loss=steps.lm_loss(model, z_loss=1e-4), accum_steps=accum)
    results.append((state.params, metrics))
  for params, metrics in results[1:]:
    np.testing.assert_allclose(metrics['loss'], results[0][1]['loss'], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(results[0][0])):
      np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)


def test_weight_decay_mask_and_schedule():
  params = {'embed': {'embedding': 1}, 'blocks_0': {'attn_norm': {'scale': 1, 'bias': 1},
                                                    'mlp': {'up': {'kernel': 1, 'bias': 1}}}}
  mask = steps.decay_mask(params)
  assert mask == {'embed': {'embedding': False}, 'blocks_0': {'attn_norm': {'scale': False,
                  'bias': False}, 'mlp': {'up': {'kernel': True, 'bias': False}}}}
  opt = shakespeare.get_config().optimizer
  opt.warmup_steps, opt.learning_rate, opt.end_lr_factor = 10, 1.0, 0.1
  lr = steps.learning_rate_schedule(opt, 110)
  assert float(lr(0)) == 0.0 and float(lr(5)) == pytest.approx(0.5)
  assert float(lr(10)) == pytest.approx(1.0) and float(lr(110)) == pytest.approx(0.1)
  assert float(lr(60)) == pytest.approx(0.55, abs=1e-6)   # cosine midpoint


def test_flops_formula_matches_the_reference_convention():
  config = gpt2_configs.get_config('124m')
  cfg = steps.model_config(config, 50304)
  model = Transformer(cfg)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
  flat = traverse_util.flatten_dict(nn.meta.unbox(shapes['params']))
  total = sum(int(np.prod(v.shape)) for v in flat.values())
  pos = cfg.max_len * cfg.d_model
  small = sum(int(np.prod(v.shape)) for k, v in flat.items() if k[-1] in ('bias', 'scale'))
  # 6 * (params - position table) + 12 * L * d * seq, with norms and biases left out of the 6N.
  expected = 6 * (total - pos - small) + 12 * cfg.n_layers * cfg.d_model * 1024
  assert flops.train_flops_per_token(cfg, 1024) == expected


def test_damaged_latest_checkpoint_falls_back_to_the_previous(tmp_path, data_dir, caplog):
  config = tiny_config(data_dir)
  config.num_train_steps, config.checkpoint_every, config.eval_every = 10, 5, 100
  config.sample.num_prompts = 0
  train.train_and_evaluate(config, tmp_path)
  latest = tmp_path / 'checkpoints' / '10' / 'state'
  for f in latest.rglob('*'):
    if f.is_file():
      f.write_bytes(b'garbage')
  tokenizer, model, tx = runtime.setup(config)
  state = steps.init_state(model, tx, 0, config.data.seq_len)
  with caplog.at_level('WARNING'):
    restored = checkpoints.Checkpoints(tmp_path, 2, writer=False).restore_latest(
        checkpoints.abstract(state))
  assert restored.step == 5 and restored.data is not None
  assert 'checkpoint at step 10 is unreadable' in caplog.text
  assert latest.exists()   # a reader never moves or deletes anything


def test_cli_train_eval_sample(tmp_path, data_dir):
  workdir = tmp_path / 'run'
  relative = os.path.relpath(workdir, ROOT)   # as typed by a user; Orbax needs absolute paths
  r = run_main('--config.num_train_steps=3', workdir=relative, data_dir=data_dir)
  assert r.returncode == 0, r.stderr
  assert 'step 3/3' in r.stderr and (workdir / 'checkpoints' / '3').exists()
  assert 'memory per device (estimate)' in r.stderr and 'estimate/compiled' in r.stderr
  assert (workdir / 'tensorboard').exists() and (workdir / 'signature.json').exists()
  r = run_main('--mode=eval', workdir=workdir, data_dir=data_dir)
  assert r.returncode == 0, r.stderr
  result = json.loads(r.stdout)
  assert result['step'] == 3 and 0 < result['nats_per_byte'] < 10
  r = run_main('--mode=sample', '--prompt=ROMEO:', workdir=workdir, data_dir=data_dir)
  assert r.returncode == 0, r.stderr
  assert r.stdout.startswith('ROMEO:') and len(r.stdout.strip()) > len('ROMEO:')


@pytest.mark.parametrize('change, match', [
    (dict(batch_size=0), 'config.batch_size=0 must be a positive integer'),
    (dict(num_train_steps=-5), 'config.num_train_steps=-5'),
    (dict(model=dict(d_model=33)), 'n_heads=2 must divide d_model=33'),
    (dict(model=dict(n_kv_heads=3, n_heads=4, d_model=32)), 'n_kv_heads=3'),
    (dict(model=dict(n_layers=0)), 'n_layers=0 must be positive'),
    (dict(batch_size=6, grad_accum_steps=4), 'batch_size=6 must be divisible'),
    (dict(data=dict(name='no_such_dataset')), 'no_such_dataset'),
    (dict(data=dict(tokenizer='wordpiece')), 'wordpiece'),
    (dict(optimizer=dict(schedule='step')), "schedule='step'"),
])
def test_bad_configs_are_rejected_in_one_line(tmp_path, data_dir, change, match):
  config = apply_change(tiny_config(data_dir), change)
  with pytest.raises(ValueError, match=match) as info:
    validate.check(config, tmp_path / 'w')
  assert '\n' not in str(info.value)


def test_bad_workdirs_are_rejected(tmp_path, data_dir):
  config = tiny_config(data_dir)
  blocker = tmp_path / 'file'
  blocker.write_text('not a directory')
  with pytest.raises(ValueError, match='cannot be created: .* is a file'):
    validate.check(config, blocker / 'run')
  (tmp_path / 'old' / 'checkpoints' / '5').mkdir(parents=True)
  (tmp_path / 'old' / 'signature.json').write_text(json.dumps(workdir_lib.signature(config)))
  validate.check(config, tmp_path / 'old')
  config.model.d_model = 64
  with pytest.raises(ValueError, match='holds a run of another configuration .*d_model: 32 there'):
    validate.check(config, tmp_path / 'old')


def test_cli_errors_are_one_line(tmp_path, data_dir):
  r = run_main('--config.model.n_heads=3', workdir=tmp_path / 'a', data_dir=data_dir)
  assert r.returncode != 0
  assert r.stderr.strip().splitlines()[-1].startswith('error: ModelConfig: n_heads=3')
  assert 'Traceback' not in r.stderr
  r = run_main('--config.model.no_such_field=3', workdir=tmp_path / 'b', data_dir=data_dir)
  assert r.returncode != 0 and 'no_such_field' in r.stderr and 'Traceback' not in r.stderr


@pytest.mark.parametrize('module, variants', [
    (shakespeare, ['', 'bytes', 'tiny', 'moe', 'moe_tiny', 'pipeline']),
    (gpt2_configs, ['124m', '350m', 'tiny']), (llama_configs, ['1b', '7b', 'tiny']),
    (mixtral_configs, ['8x7b', 'tiny'])])
def test_every_config_variant_validates(tmp_path, module, variants):
  # Fields and mesh only: the accelerator configs read c4, which is not prepared here (reading a
  # prepared TFDS dataset by name is tested in test_data.py and test_faults.py).
  for arg in variants:
    config = module.get_config(arg) if arg else module.get_config()
    validate.check_fields(config)
    validate.check_mesh(config)
    validate.check_train_workdir(config, tmp_path / arg, 'auto')
  with pytest.raises(ValueError, match="unknown variant 'huge'"):
    module.get_config('huge')


@pytest.mark.parametrize('module', [gpt2_configs, llama_configs, mixtral_configs])
def test_benchmark_runs_the_tiny_variants(module):
  config = module.get_config('tiny')
  result = benchmark.benchmark(config, n_steps=2, vocab=config.data.vocab_size)
  assert result.step_s > 0 and result.params > 0 and result.devices == 8
  assert result.tokens_per_s == pytest.approx(8 * 64 / result.step_s)
  assert result.mfu is None   # no known peak for CPUs
  assert result.compiled_bytes > result.estimate.params
  assert f'remat {config.model.remat}' in benchmark.report(config, result)


def test_training_losses_agree_across_meshes(tmp_path, data_dir):
  results = {}
  for name, mesh, rules in [('dp8', dict(data=8), 'dp'), ('fsdp', dict(data=2, fsdp=4), 'fsdp'),
                            ('fsdp8', dict(data=1, fsdp=8), 'fsdp')]:
    config = tiny_config(data_dir)
    config.num_train_steps, config.eval_every, config.checkpoint_every = 4, 4, 4
    config.sample.num_prompts = 0
    config.mesh.update(mesh)
    config.sharding_rules = rules
    train.train_and_evaluate(config, tmp_path / name)
    results[name] = losses(tmp_path / name)
  for name in ('fsdp', 'fsdp8'):
    assert results[name].keys() == results['dp8'].keys()
    for step, loss in results['dp8'].items():
      assert results[name][step] == pytest.approx(loss, rel=1e-5)
