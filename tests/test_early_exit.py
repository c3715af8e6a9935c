"""Token-level early exit: threshold 1.0 is the full model, exits are read through its own head,
and skipped layers' KV entries come from the exit state."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compression import early_exit as exit_loss
from experiments import steps, validate
from experiments.errors import UserError
from models import ModelConfig, Transformer, decode, early_exit, gpt2_style
from models.transformer import block_name, block_outputs, capture_filter
from tests.runs import tiny_config

CONFIGS = {
    'llama': ModelConfig(vocab_size=61, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2,
                         d_ff=64, init_std=0.2, max_len=64),
    'gpt2': gpt2_style(vocab_size=61, d_model=32, n_layers=3, n_heads=4, d_ff=64, max_len=64,
                       init_std=0.2),
}
PROMPTS = [[3, 1, 4, 1, 5], [9, 2, 6]]


def build(name):
  model = Transformer(CONFIGS[name])
  params = nn.meta.unbox(model.init(jax.random.key(1), jnp.zeros((1, 4), jnp.int32))['params'])
  return model, params


def hidden_states(model, params, tokens):
  logits, state = model.apply({'params': params}, tokens, mutable=['intermediates'],
                              capture_intermediates=capture_filter(True))
  return logits, block_outputs(state['intermediates'], model.config)


@pytest.mark.parametrize('name', sorted(CONFIGS))
def test_the_head_on_the_last_layers_output_is_the_models_logits(name):
  model, params = build(name)
  tokens = jnp.asarray(np.random.default_rng(0).integers(1, 61, (2, 9)))
  logits, hidden = hidden_states(model, params, tokens)
  np.testing.assert_allclose(early_exit.head_logits(model.config, params, hidden[-1]), logits,
                             atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('name', sorted(CONFIGS))
def test_threshold_one_never_exits_and_is_the_full_model(name):
  model, params = build(name)
  want = np.asarray(decode.generate(model, params, PROMPTS, max_new_tokens=10).tokens).tolist()
  got, used = early_exit.generate(model, params, PROMPTS, max_new_tokens=10, exits=(0, 1),
                                  threshold=1.0)
  assert got == want and set(used) == {3}


def test_skipped_layers_store_the_exit_states_keys_and_values():
  # Blocks 1 and 2 with zero output projections leave the residual stream as block 0 made it:
  # the full model then computes every layer's keys and values from block 0's output, which is
  # what exiting at block 0 stores for the layers it skips. Tokens and caches must agree.
  model, params = build('llama')
  for i in (1, 2):
    b = params[block_name(i)]
    b['attn']['out']['kernel'] = jnp.zeros_like(b['attn']['out']['kernel'])
    b['mlp']['down']['kernel'] = jnp.zeros_like(b['mlp']['down']['kernel'])
  cfg, n = model.config, 8
  out = {}
  for threshold in (1.0, 0.0):
    tokens, seg, pos = decode.pad_prompts(PROMPTS)
    cache = early_exit.init_cache(cfg, 2, tokens.shape[1] + n)
    logits, cache = early_exit._prefill(params, cache, tokens, pos, seg, model=model)
    tok, made, used = jnp.argmax(logits[:, -1], -1).astype(jnp.int32), [], []
    for i in range(n):
      tok, layers, cache = early_exit.step(params, cache, tok, pos[:, -1] + 1 + i,
                                           jnp.ones(2, bool), jnp.float32(threshold), cfg=cfg,
                                           exits=(0,))
      made.append(np.asarray(tok))
      used.append(int(layers))
    out[threshold] = made, used, cache
  assert out[1.0][1] == [3] * n and out[0.0][1] == [1] * n
  np.testing.assert_array_equal(np.stack(out[0.0][0]), np.stack(out[1.0][0]))
  for layer in range(3):
    for kv in ('k', 'v'):
      np.testing.assert_allclose(out[0.0][2][kv][layer], out[1.0][2][kv][layer], atol=1e-5,
                                 rtol=1e-5)


def test_lower_thresholds_use_fewer_layers():
  model, params = build('llama')
  mean = []
  for threshold in (1.0, 0.3, 0.1, 0.0):
    _, used = early_exit.generate(model, params, PROMPTS[:1], max_new_tokens=12, exits=(0, 1),
                                  threshold=threshold)
    mean.append(np.mean(used))
  assert mean[0] == 3 and mean[-1] == 1 and all(a >= b for a, b in zip(mean, mean[1:]))


def test_the_exit_loss_adds_each_exits_cross_entropy_through_the_shared_head():
  model, params = build('llama')
  rng = np.random.default_rng(1)
  tokens = jnp.asarray(rng.integers(1, 61, (2, 8)), jnp.int32)
  batch = dict(inputs=tokens[:, :-1], targets=tokens[:, 1:],
               weights=jnp.asarray(rng.random((2, 7)) > 0.2, jnp.float32),
               positions=jnp.broadcast_to(jnp.arange(7), (2, 7)),
               segment_ids=jnp.ones((2, 7), jnp.int32))
  base = steps.lm_loss(model)
  loss = exit_loss.loss(base, exit_loss.Spec((0, 1), 0.5))
  total, sums = loss(params, batch)
  base_total, _ = base(params, batch)
  logits, hidden = hidden_states(model, params, batch['inputs'])

  def ce(lg):   # a plain reference: -log softmax at the target, weighted
    lp = np.asarray(jax.nn.log_softmax(lg, -1))
    picked = np.take_along_axis(lp, np.asarray(batch['targets'])[..., None], -1)[..., 0]
    return float(-(picked * np.asarray(batch['weights'])).sum())

  exits = [ce(early_exit.head_logits(model.config, params, hidden[e])) for e in (0, 1)]
  np.testing.assert_allclose(float(sums['exit_ce_0']), exits[0], rtol=1e-5)
  np.testing.assert_allclose(float(total), float(base_total) + 0.5 * np.mean(exits), rtol=1e-5)
  np.testing.assert_allclose(float(sums['ce']), ce(logits), rtol=1e-5)
  # The exits train the blocks below them: block 0 gets more gradient than from the LM alone.
  g = jax.grad(lambda p: loss(p, batch)[0])(params)
  g0 = jax.grad(lambda p: base(p, batch)[0])(params)
  diff = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), g[block_name(0)],
                      g0[block_name(0)])
  assert max(jax.tree.leaves(diff)) > 1e-4


@pytest.mark.parametrize('layers, weight, match', [
    ('1', 1.0, r"config.early_exit.layers='1' exit layer 1 is not in \[0, 1\)"),
    ('a,b', 1.0, "config.early_exit.layers='a,b' is not a comma-separated list"),
    ('0', 0.0, 'config.early_exit.weight=0.0 must be a number > 0'),
])
def test_bad_exit_settings_are_one_line(data_dir, layers, weight, match):
  config = tiny_config(data_dir)      # 2 layers: only layer 0 may be an exit
  config.early_exit.layers, config.early_exit.weight = layers, weight
  with pytest.raises(UserError, match=match):
    validate.check_fields(config)


def test_a_run_trained_with_exits_reports_the_threshold_table(data_dir, tmp_path, source):
  from experiments import runners, train
  config = tiny_config(data_dir, num_train_steps=4, checkpoint_every=4, eval_every=4)
  config.early_exit.layers = '0'
  train.train_and_evaluate(config, tmp_path)
  metrics = (tmp_path / 'metrics.jsonl').read_text()
  assert 'exit_ce_0' in metrics
  table = runners.run('exit_benchmark', config, tmp_path, batch_sizes=(1, 2), steps=4)
  rows = [[c.strip() for c in line.split('|')[1:-1]] for line in table.splitlines()
          if line.startswith('| ') and line[2].isdigit()]
  assert len(rows) == 2 * 7
  by = {(r[0], r[1]): r for r in rows}
  assert by['1', '1'][2] == '2.00' and by['1', '1'][4] == '100.0%'
  assert by['0', '2'][2] == '1.00' and by['0', '2'][6] == '1.00'
  with pytest.raises(UserError, match='needs a run trained with exits'):
    runners.run('exit_benchmark', tiny_config(data_dir), source, batch_sizes=(1,), steps=4)
