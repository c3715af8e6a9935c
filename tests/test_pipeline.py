"""Pipeline parallelism (sharding/pipeline.py) on 8 fake CPU devices: the loss and every gradient
equal one device's for both schedules and every composition the design names, the training loop
equal to one device step by step and compiled once, checkpoints moving between pipeline and
other meshes, and bad configs in one line."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import sharding
from experiments import checkpoints, memory, runtime, steps, train, validate
from models import ModelConfig, Transformer
from sharding import pipeline
from tests.conftest import lm_batches
from tests.runs import apply_change, losses, records, run_main, tiny_config

DENSE = ModelConfig(vocab_size=64, d_model=32, n_layers=8, n_heads=4, n_kv_heads=2, d_ff=64,
                    scan_layers=True)
MOE = DENSE.replace(n_layers=4, n_experts=4, experts_per_token=2, moe_d_ff=32)
M = 4   # microbatches


def _mesh(sizes):
  n = int(np.prod(list(sizes.values())))
  return sharding.make_mesh(sizes, devices=jax.devices()[:n])


def _grads(cfg, sizes, rules, schedule=None):
  """(summed loss, sums, gradients) of one batch on a mesh: pipelined when the mesh has stages,
  else the microbatches' losses summed as gradient accumulation sums them."""
  model = Transformer(cfg)
  mesh = _mesh(sizes)
  config = ml_collections.ConfigDict(dict(
      grad_accum_steps=M, pipeline=dict(schedule=schedule or 'gpipe', repeats=2)))
  base = steps.lm_loss(model, z_loss=1e-3)
  loss, accum = steps.pipelined(base, config, mesh)
  init = lambda rng: model.init(rng, jnp.zeros((1, 16), jnp.int32))['params']
  params = sharding.create_sharded(init, mesh, rules, jax.random.key(0))
  batch = {k: jnp.asarray(v) for k, v in
           lm_batches(cfg.vocab_size, rows=16, length=16, padded_rows=3)[0].items()}

  def accumulated(p, b):
    micro = jax.tree.map(lambda x: pipeline.microbatched(x, M), b)
    parts = [base(p, jax.tree.map(lambda x: x[i], micro))
             for i in range(M)]
    return jax.tree.map(lambda *xs: sum(xs), *parts)

  fn = accumulated if accum == M else loss
  with sharding.activation_rules(mesh, rules):
    (total, sums), grads = jax.jit(jax.value_and_grad(fn, has_aux=True))(params, batch)
  return jax.device_get((total, sums, grads))


@functools.lru_cache(maxsize=None)
def _one_device(kind):
  return _grads(DENSE if kind == 'dense' else MOE, dict(data=1), 'dp')


@pytest.mark.parametrize('schedule', pipeline.SCHEDULES)
@pytest.mark.parametrize('kind, sizes, rules', [
    ('dense', dict(stage=4, data=2), 'dp'),
    ('dense', dict(stage=2, fsdp=2, tensor=2), 'fsdp_tp'),
    ('moe', dict(stage=2, expert=2, data=2), 'ep'),
])
def test_loss_and_every_gradient_equal_one_device(kind, sizes, rules, schedule):
  want_total, want_sums, want = _one_device(kind)
  total, sums, got = _grads(DENSE if kind == 'dense' else MOE, sizes, rules, schedule)
  assert total == pytest.approx(want_total, rel=1e-5)
  assert sums.keys() == want_sums.keys()
  for name in want_sums:
    np.testing.assert_allclose(sums[name], want_sums[name], rtol=1e-5, atol=1e-6, err_msg=name)
  paths = jax.tree_util.tree_flatten_with_path(want)[0]
  assert len(paths) == len(jax.tree.leaves(got))
  for (path, w), g in zip(paths, jax.tree.leaves(got)):
    scale = float(np.max(np.abs(w)))
    assert scale > 0, jax.tree_util.keystr(path)   # every parameter is trained
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * scale,
                               err_msg=jax.tree_util.keystr(path))


def test_the_schedules_bubble_and_iterations():
  gpipe, circular = pipeline.Schedule(4, 8), pipeline.Schedule(4, 8, repeats=2)
  assert (gpipe.iterations, gpipe.bubble) == (11, pytest.approx(3 / 11))
  assert (circular.iterations, circular.bubble) == (19, pytest.approx(3 / 19))
  assert pipeline.Schedule(1, 4).bubble == 0


def _train_config(data_dir, sizes=None, rules='dp', schedule='gpipe', steps_=4):
  config = tiny_config(data_dir)
  config.model.update(n_layers=4, scan_layers=True)
  config.grad_accum_steps = 4
  config.num_train_steps, config.eval_every, config.checkpoint_every = steps_, steps_, steps_
  config.mesh.update(sizes or {})
  if not isinstance(rules, str):   # an explicit rule list replaces the preset name's field
    del config['sharding_rules']
  config.sharding_rules = rules
  config.pipeline.schedule = schedule
  return config


def eval_loss(workdir) -> float:
  (last,) = [r['eval_loss'] for r in records(workdir) if 'eval_loss' in r]
  return last


def test_training_steps_equal_one_device_compile_once_and_the_checkpoint_moves(
    tmp_path, data_dir, monkeypatch):
  one = tmp_path / 'one'
  cli = run_main('--mode=train', '--config.model.n_layers=4', '--config.model.scan_layers=True',
                 '--config.grad_accum_steps=4', '--config.num_train_steps=4',
                 '--config.eval_every=4', '--config.checkpoint_every=4',
                 '--config.sample.num_prompts=0', workdir=one, data_dir=data_dir)
  assert cli.returncode == 0, cli.stdout[-3000:] + cli.stderr[-3000:]
  want = losses(one)
  assert len(want) == 4 and len(set(want.values())) == 4   # four steps that moved the model

  traces = []
  step = steps.train_step
  monkeypatch.setattr(steps, 'train_step', lambda *a, **k: traces.append(1) or step(*a, **k))
  # fsdp_tp without the vocabulary split (the byte vocabulary, 259, is odd)
  fsdp_tp = [('batch', ('data', 'fsdp', 'expert')), ('embed', 'fsdp'), ('heads', 'tensor'),
             ('mlp', 'tensor'), ('layers', 'stage')]
  runs = [('gpipe', dict(data=2, stage=4), 'dp'),
          ('circular', dict(data=1, stage=2, fsdp=2, tensor=2), fsdp_tp)]
  for schedule, sizes, rules in runs:
    traces.clear()
    train.train_and_evaluate(_train_config(data_dir, sizes, rules, schedule),
                             tmp_path / schedule)
    assert len(traces) == 1, schedule   # traced (and compiled) once for the run's steps
    got = losses(tmp_path / schedule)
    assert got.keys() == want.keys()
    for s, loss in want.items():
      assert got[s] == pytest.approx(loss, rel=1e-5), (schedule, s)
    # Evaluation runs through the stages too, and measures the same.
    assert eval_loss(tmp_path / schedule) == pytest.approx(eval_loss(one), rel=1e-5)

  # The gpipe run's checkpoint restores onto one device and onto a 2 x 4 fsdp mesh, and both
  # equal what the pipeline mesh restores.
  config = _train_config(data_dir, dict(data=2, stage=4))
  tokenizer, model, tx = runtime.setup(config)
  placement = runtime.Placement(config, model, tx)
  ckpts = checkpoints.Checkpoints(tmp_path / 'gpipe', writer=False)
  staged = ckpts.restore_latest(placement.abstract).state
  blocks = jax.tree.leaves(staged.params['blocks'])[0]
  assert blocks.sharding.shard_shape(blocks.shape)[0] == 1   # 4 layers over 4 stages
  want_leaves = [np.asarray(x) for x in jax.tree.leaves(staged)]
  for sizes, rules in ((dict(data=1), 'dp'), (dict(data=2, fsdp=4), 'fsdp')):
    mesh = _mesh(sizes)
    abstract = sharding.sharded_abstract(placement.init, mesh, rules, placement.rng)
    restored = ckpts.restore_latest(abstract).state
    for got, w, target in zip(jax.tree.leaves(restored), want_leaves, jax.tree.leaves(abstract)):
      np.testing.assert_array_equal(np.asarray(got), w)
      assert got.sharding == target.sharding
  # ... and the one-device run's checkpoint restores onto the pipeline mesh.
  restored = checkpoints.Checkpoints(one, writer=False).restore_latest(placement.abstract).state
  blocks = jax.tree.leaves(restored.params['blocks'])[0]
  assert blocks.sharding.spec[0] == sharding.STAGE


def test_the_step_permutes_activations_and_the_reports_count_the_bubble(data_dir):
  config = _train_config(data_dir, dict(data=2, stage=4))
  tokenizer, model, tx = runtime.setup(config)
  placement = runtime.Placement(config, model, tx)
  assert placement.schedule == pipeline.Schedule(4, 4)
  hlo = placement.compile_train_step(tokenizer.vocab_size).as_text()
  assert 'collective-permute' in hlo
  est = memory.estimate(config, model, placement.abstract, placement.mesh, placement.rules)
  assert est.bubble == pytest.approx(3 / 7)
  config_flat = _train_config(data_dir, dict(data=2, tensor=4))   # 'dp': tensor left unused
  flat = runtime.Placement(config_flat, model, tx)
  est_flat = memory.estimate(config_flat, model, flat.abstract, flat.mesh, flat.rules)
  assert est_flat.bubble == 0
  # Stages hold a quarter of the block parameters and their optimizer state.
  assert est.params < est_flat.params and est.optimizer < est_flat.optimizer


@pytest.mark.parametrize('change, match', [
    (dict(model=dict(n_layers=6)), r'n_layers=6 does not divide into stage=4 x '
                                   r'pipeline.repeats=1 equal chunks'),
    (dict(pipeline=dict(schedule='circular', repeats=2), model=dict(n_layers=4)),
     r'n_layers=4 does not divide into stage=4 x pipeline.repeats=2'),
    (dict(grad_accum_steps=2, batch_size=8), r'grad_accum_steps=2 microbatches are fewer than '
                                             r'stage=4 pipeline stages'),
    (dict(model=dict(scan_layers=False)), r'set model.scan_layers=True'),
    (dict(model=dict(n_unique_layers=2)), r'n_unique_layers=2 differs from n_layers=8'),
    (dict(pipeline=dict(schedule='1f1b')), r"pipeline.schedule='1f1b' is not one of gpipe, "
                                           r"circular"),
    (dict(pipeline=dict(schedule='circular', repeats=0)), r'pipeline.repeats=0 must be an '
                                                          r'integer >= 1'),
    (dict(qat=dict(bits=8)), r'pipelines the language-model loss only; config.qat is on'),
    (dict(eval_batch_size=4), r'eval_batch_size=4 must be divisible by the 2 batch shards of '
                              r'the mesh times grad_accum_steps \(4\) with pipeline stages'),
])
def test_bad_pipeline_configs_are_one_line(tmp_path, data_dir, change, match):
  config = _train_config(data_dir, dict(data=2, stage=4))
  config.model.n_layers = 8
  apply_change(config, change)
  with pytest.raises(ValueError, match=match) as info:
    validate.check(config, tmp_path / 'w')
  assert '\n' not in str(info.value)
  assert not (tmp_path / 'w').exists()


def test_the_pipeline_refuses_losses_it_does_not_run():
  mesh = _mesh(dict(stage=2))
  config = ml_collections.ConfigDict(dict(grad_accum_steps=2, pipeline=dict(schedule='gpipe',
                                                                            repeats=1)))
  model = Transformer(DENSE)
  other = steps.early_exit.loss(steps.lm_loss(model), steps.early_exit.Spec((0,), 1.0))
  with pytest.raises(ValueError, match='pipelines the language-model loss only, not'):
    steps.pipelined(other, config, mesh)


def test_the_benchmark_compares_microbatch_counts_against_the_bubble(data_dir, capsys):
  from experiments import benchmark
  config = _train_config(data_dir, dict(data=2, stage=4))
  config.batch_size = 16
  results = benchmark.run(config, n_steps=1, microbatches=(4, 8))
  assert [r.estimate.bubble for r in results] == [pytest.approx(3 / 7), pytest.approx(3 / 11)]
  out = capsys.readouterr().out
  assert 'microbatches 8 |' in out and 'pipeline bubble 27%' in out
  assert 'bubble formula 0.79' in out   # (1 - 3/7) / (1 - 3/11)
  with pytest.raises(ValueError, match='grad_accum_steps=2 microbatches are fewer than stage=4'):
    benchmark.run(config, n_steps=1, microbatches=(2,))
