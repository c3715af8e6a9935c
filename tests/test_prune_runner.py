"""The pruning runner's fine-tunes go through the one training loop (experiments/finetune.py).

Sharded on the mesh like any run (8 fake devices match one device), compiled once per run,
checkpointed and logged in <workdir>/finetune/<variant>/, continued when the command runs
again, and started over (the old one archived) when their starting point changed.
"""

import json
import signal

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from compression import schedules
from experiments import data, finetune, prune, runtime, steps, train
from experiments import source as source_lib
from experiments import workdir as workdir_lib
from experiments.configs import prune as prune_configs
from experiments.errors import UserError
from models import ModelConfig, hf
from tests.runs import losses, records, tiny_config, tree_digest


def prune_config(source, **changes):
  config = prune_configs.get_config('magnitude_50')
  config.update(dict(source_workdir=str(source), finetune_steps=3, calibration_batches=1,
                     calibration_rows=4), **changes)
  return config


@pytest.fixture
def traces(monkeypatch):
  """How often `steps.train_step` is traced (each trace is one compilation of the step)."""
  seen = []
  original = steps.train_step

  def counted(*args, **kwargs):
    seen.append(1)
    return original(*args, **kwargs)
  monkeypatch.setattr(steps, 'train_step', counted)
  return seen


def one_device_losses(source, sub, spec: str, n_steps: int) -> dict:
  """The fine-tune as a plain loop on one device: the run's config, the runner's pruning."""
  src = source_lib.source_config(source)
  _, model, _, params, _ = runtime.load_params(src, source)
  _, pruned, masks = prune.apply_variant(prune.parse_variant(spec), model,
                                         jax.device_get(params), None, None)
  config = ml_collections.ConfigDict(json.loads((sub / 'config.json').read_text()))
  tokenizer, model, tx = runtime.setup(config, sub)
  state = steps.TrainState.create(apply_fn=model.apply, params=jax.device_put(pruned),
                                  tx=schedules.frozen(tx, masks))
  batches = data.train_iterator(config.data, tokenizer, batch_size=config.batch_size,
                                seed=config.seed)
  token_bytes = jnp.asarray(tokenizer.token_bytes, jnp.float32)
  out = {}
  for step in range(1, n_steps + 1):
    state, metrics = steps.train_step(
        state, next(batches), token_bytes, loss=steps.lm_loss(model, config.optimizer.z_loss),
        accum_steps=config.grad_accum_steps, seed=config.seed)
    out[step] = float(metrics['loss'])
  return out


def test_finetune_runs_sharded_through_the_loop_resumes_and_matches_one_device(
    tmp_path, source, traces, monkeypatch):
  config = prune_config(source, sharding_rules='fsdp')
  config.mesh.update(data=2, fsdp=4)   # 8 fake devices: batch over 8, parameters over 4
  sub = tmp_path / 'finetune' / 'magnitude-0.5'
  push = train.StepMonitor.push

  def stop_after_step_1(self, step, metrics):   # SIGTERM (a preemption) during the fine-tune
    push(self, step, metrics)
    if step == 1:
      signal.raise_signal(signal.SIGTERM)
  with monkeypatch.context() as m:
    m.setattr(train.StepMonitor, 'push', stop_after_step_1)
    with pytest.raises(UserError, match=r'fine-tune in .*magnitude-0.5 stopped at step 1 of 3; '
                                        r'run the same command again'):
      prune.run(config, tmp_path)
  assert len(traces) == 1 and workdir_lib.checkpoint_steps(sub) == [1]
  assert not (tmp_path / 'results.json').exists()

  rows = prune.run(config, tmp_path)   # the same command continues the fine-tune
  assert len(traces) == 2   # once per run: each run compiles its step once
  assert workdir_lib.checkpoint_steps(sub)[-1] == 3
  ran = json.loads((sub / 'config.json').read_text())
  assert ran['mesh']['fsdp'] == 4 and ran['sharding_rules'] == 'fsdp'
  assert ran['origin']['variant'] == 'magnitude:0.5' and ran['origin']['source_step'] == 4
  evals = [r for r in records(sub) if 'eval_nats_per_byte' in r]
  assert rows[1]['finetuned_nats_per_byte'] == evals[-1]['eval_nats_per_byte']

  got = losses(sub)
  want = one_device_losses(source, sub, 'magnitude:0.5', 3)
  assert got.keys() == want.keys() == {1, 2, 3}
  for step, loss in want.items():
    assert got[step] == pytest.approx(loss, rel=1e-5)

  traces.clear()
  again = prune.run(config, tmp_path)   # complete: nothing trains or compiles
  assert not traces and losses(sub) == got
  for key in ('nats_per_byte', 'finetuned_nats_per_byte', 'nonzero'):
    assert again[1][key] == rows[1][key]


def test_a_finetune_of_another_origin_is_archived_not_continued(tmp_path, data_dir):
  def config(lr):
    return finetune.derived_config(
        tiny_config(data_dir), ModelConfig(vocab_size=259, d_model=32, n_layers=1, n_heads=2,
                                           d_ff=64, max_len=256),
        num_steps=2, learning_rate=lr, seed=1, origin=dict(variant='magnitude:0.5'))
  (tmp_path / 'checkpoints' / '2').mkdir(parents=True)
  workdir_lib.write_json(tmp_path / 'signature.json', workdir_lib.signature(config(1e-3)))
  finetune._prepare(config(1e-3), tmp_path, None)   # the same origin: kept
  assert workdir_lib.checkpoint_steps(tmp_path) == [2]
  finetune._prepare(config(3e-4), tmp_path, None)   # another learning rate: archived
  assert workdir_lib.checkpoint_steps(tmp_path) == []
  assert workdir_lib.checkpoint_steps(tmp_path / 'archive' / '1') == [2]


@pytest.mark.parametrize('spec, match', [
    ('wanda:1.5', r'sparsity=1.5 must be in \[0, 1\)'), ('magnitud:0.5', "unknown method"),
    ('sparsegpt:4:2', 'N:M pattern 4:2'), ('ffn', 'give one amount')])
def test_bad_variant_specs_are_one_clear_error(spec, match):
  with pytest.raises(ValueError, match=match):
    prune.parse_variant(spec)


def test_prune_runner_end_to_end_leaves_the_source_untouched(source, tmp_path):
  config = source_lib.source_config(source)
  before = tree_digest(source)

  pc = prune_configs.get_config('sweep')
  pc.update(source_workdir=str(source), variants='wanda:2:4,ffn:0.5',
            finetune_steps=2, calibration_batches=2, calibration_rows=4)
  rows = prune.run(pc, tmp_path / 'out')
  assert [r['variant'] for r in rows] == ['dense', 'wanda:2:4', 'ffn:0.5']
  assert rows[2]['params'] < rows[0]['params'] == rows[1]['params']
  assert rows[1]['nonzero'] < rows[0]['nonzero']
  assert all(np.isfinite(r['nats_per_byte']) for r in rows)
  assert all('finetuned_nats_per_byte' in r for r in rows[1:])
  saved = json.loads((tmp_path / 'out' / 'results.json').read_text())
  assert saved['rows'] == json.loads(json.dumps(rows))
  assert (tmp_path / 'out' / 'results.md').read_text().startswith('| variant |')
  assert tree_digest(source) == before

  assert rows[1]['sparsity'] == pytest.approx(0.5, abs=1e-3)
  assert rows[1]['effective_flops_per_token'] < rows[0]['effective_flops_per_token']
  assert rows[2]['dense_flops_per_token'] < rows[0]['dense_flops_per_token']   # smaller model

  dense = rows[0]['nats_per_byte']
  pc.update(variants='magnitude:0.5', rounds=2)   # iterative: 29% then 50%, fine-tuned between
  rows = prune.run(pc, tmp_path / 'iterative')
  assert rows[1]['sparsity'] == pytest.approx(0.5, abs=1e-3)
  assert tree_digest(source) == before

  # The same weights as a Hugging Face checkpoint prune through the same path.
  _, model, _, params, _ = runtime.load_params(config, source)
  hf.save_pretrained(model, params, tmp_path / 'hf')
  pc.update(hf_path=str(tmp_path / 'hf'), rounds=1, finetune_steps=0)
  rows = prune.run(pc, tmp_path / 'from_hf')
  assert rows[0]['nats_per_byte'] == pytest.approx(dense, rel=1e-5)

  pc.source_workdir = str(tmp_path / 'missing')
  with pytest.raises(UserError, match='has no config.json'):
    prune.run(pc, tmp_path / 'out2')
  assert not (tmp_path / 'out2').exists()   # checked before anything was written
