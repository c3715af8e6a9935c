"""Sharding: meshes from config, rule presets, sharded creation, and steps equal to one device's."""

import functools
import re
import warnings

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training import train_state
from jax.sharding import PartitionSpec as P

import sharding
from experiments import steps
from models import ModelConfig, Transformer, axes

CFG = ModelConfig(vocab_size=64, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128)
MODEL = Transformer(CFG)
LOSS = steps.lm_loss(MODEL)
TX = optax.adamw(1e-2, weight_decay=0.1)
ROWS, SEQ = 8, 16
TOKEN_BYTES = np.ones((CFG.vocab_size,), np.float32)


def test_the_eight_fake_devices_are_there():
  # Every mesh below assumes them; conftest.py sets them up before JAX starts.
  assert jax.device_count() == 8


def init_state(rng):
  """A TrainState built from the boxed parameters, so the Adam moments keep the axis names."""
  params = MODEL.init(rng, jnp.zeros((1, SEQ), jnp.int32))['params']
  return train_state.TrainState.create(apply_fn=MODEL.apply, params=params, tx=TX)


def make_batch(seed, rows=ROWS):
  tokens = np.random.default_rng(seed).integers(1, CFG.vocab_size, (rows, SEQ + 1), np.int32)
  return dict(inputs=tokens[:, :-1], targets=tokens[:, 1:],
              positions=np.tile(np.arange(SEQ, dtype=np.int32), (rows, 1)),
              segment_ids=np.ones((rows, SEQ), np.int32), weights=np.ones((rows, SEQ), np.float32))


def mean_loss(params, batch):
  total, sums = LOSS(params, batch)
  return total / sums['tokens']


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def path_str(path) -> str:
  return jax.tree_util.keystr(path, simple=True, separator='/')


def specs(tree, suffix):
  """Mesh axes per dim (trailing unsplit dims dropped) of each leaf whose path ends in `suffix`."""
  out = []
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if path_str(path).endswith(suffix):
      spec = list(x.sharding.spec)
      while spec and spec[-1] is None:
        spec.pop()
      out.append(tuple(spec))
  return out


@pytest.fixture(scope='module')
def reference():
  """Initial parameters, loss, gradients and two steps' losses on one device, without a mesh."""
  state = jax.jit(lambda r: sharding.unbox(init_state(r)))(jax.random.key(0))
  params = jax.device_get(state.params)
  loss, grads = jax.jit(jax.value_and_grad(mean_loss))(state.params, make_batch(0))
  losses = []
  for seed in (0, 1):
    state, metrics = steps.train_step(state, make_batch(seed), TOKEN_BYTES, loss=LOSS,
                                      accum_steps=1)
    losses.append(float(metrics['loss']))
  return dict(params=params, loss=float(loss), grads=jax.device_get(grads), losses=losses)


CASES = {   # name: (mesh sizes, devices, rules preset)
    '1 device': (dict(data=-1), 1, 'fsdp_tp'),
    '8 data': (dict(data=-1), 8, 'dp'),
    '2 data x 4 fsdp': (dict(data=2, fsdp=4), 8, 'fsdp'),
    '2 fsdp x 4 tensor': (dict(data=1, fsdp=2, tensor=-1), 8, 'fsdp_tp'),
    '2 data x 2 fsdp x 2 tensor': (dict(data=2, fsdp=2, tensor=2), 8, 'fsdp_tp'),
}

LAYOUTS = {   # preset: {path suffix: mesh axes per dim}, for the parameter and both Adam moments
    'dp': {'attn/query/kernel': (), 'embed/embedding': ()},
    'fsdp': {'attn/query/kernel': ('fsdp',), 'mlp/down/kernel': (None, 'fsdp'),
             'embed/embedding': (None, 'fsdp'), 'final_norm/scale': ('fsdp',)},
    'fsdp_tp': {'attn/query/kernel': ('fsdp', 'tensor'), 'attn/key/kernel': ('fsdp',),
                'attn/out/kernel': ('tensor', None, 'fsdp'), 'mlp/up/kernel': ('fsdp', 'tensor'),
                'mlp/down/kernel': ('tensor', 'fsdp'), 'embed/embedding': ('tensor', 'fsdp'),
                'lm_head/kernel': ('fsdp', 'tensor')},
}


@pytest.mark.parametrize('name', list(CASES))
def test_one_step_matches_one_device_and_follows_the_rules(name, reference):
  sizes, n, preset = CASES[name]
  config = sharding.default_mesh_config()
  config.update(sizes)
  mesh = sharding.make_mesh(config, devices=jax.devices()[:n])
  rules = sharding.rules_for(preset)
  state = sharding.create_sharded(init_state, mesh, rules, jax.random.key(0))
  chex.assert_trees_all_equal(jax.device_get(state.params), reference['params'])
  abstract = sharding.sharded_abstract(init_state, mesh, rules, jax.random.key(0))
  for a, x in zip(jax.tree.leaves(abstract), jax.tree.leaves(state)):
    assert a.shape == x.shape and a.sharding.is_equivalent_to(x.sharding, x.ndim)

  for suffix, want in LAYOUTS[preset].items():
    found = specs(state, suffix)
    assert len(found) == (6 if suffix.startswith(('attn', 'mlp')) else 3), suffix
    assert set(found) == {want}, (suffix, found)
  assert all(x.sharding.is_fully_replicated for x in jax.tree.leaves(state) if x.ndim == 0)
  query = state.params['blocks_0']['attn']['query']['kernel']
  fsdp, tensor = mesh.shape['fsdp'], mesh.shape['tensor']
  if preset != 'dp':
    assert query.addressable_shards[0].data.shape == (64 // fsdp, 4 // tensor, 16)

  state_sh = jax.tree.map(lambda x: x.sharding, state)
  batch_sh, repl = sharding.batch_sharding(mesh, rules), sharding.replicated(mesh)
  grad_fn = jax.jit(jax.value_and_grad(mean_loss), in_shardings=(state_sh.params, batch_sh),
                    out_shardings=(repl, state_sh.params))
  step = jax.jit(functools.partial(steps.train_step, loss=LOSS, accum_steps=1),
                 in_shardings=(state_sh, batch_sh, repl), out_shardings=(state_sh, repl),
                 donate_argnums=0)
  token_bytes = jax.device_put(TOKEN_BYTES, repl)
  losses = []
  with sharding.activation_rules(mesh, rules):
    batch = sharding.global_batch(make_batch(0), mesh, rules)
    assert batch['inputs'].sharding.spec == P(sharding.BATCH_AXES)
    loss, grads = grad_fn(state.params, batch)
    for seed in (0, 1, 0):
      state, metrics = step(state, sharding.global_batch(make_batch(seed), mesh, rules),
                            token_bytes)
      losses.append(float(metrics['loss']))

  assert rel_err(loss, reference['loss']) < 1e-5
  ref_grads = dict((path_str(p), g) for p, g in
                   jax.tree_util.tree_flatten_with_path(reference['grads'])[0])
  for path, g in jax.tree_util.tree_flatten_with_path(jax.device_get(grads))[0]:
    assert rel_err(g, ref_grads[path_str(path)]) < 1e-5, path_str(path)
  assert rel_err(losses[:2], reference['losses']) < 1e-5, (losses, reference['losses'])
  assert step._cache_size() == 1   # no re-tracing across steps
  for x, s in zip(jax.tree.leaves(state), jax.tree.leaves(state_sh)):
    assert x.sharding.is_equivalent_to(s, x.ndim)   # the step keeps the layout


def _constraint_count(params, batch) -> int:
  text = jax.jit(lambda p, b: mean_loss(p, b)).lower(params, batch).as_text()
  return text.count('sharding_constraint') + text.count('@Sharding')


def test_activation_constraints_need_set_mesh_and_rules():
  mesh = sharding.make_mesh(dict(fsdp=2, tensor=4, data=1))
  rules = sharding.rules_for('fsdp_tp')
  params = sharding.create_sharded(
      lambda r: MODEL.init(r, jnp.zeros((1, SEQ), jnp.int32))['params'], mesh, rules,
      jax.random.key(0))
  batch = sharding.global_batch(make_batch(0), mesh, rules)
  assert _constraint_count(params, batch) == 0
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', DeprecationWarning)
    with mesh, nn.logical_axis_rules(rules):   # the old mesh context: flax sees no mesh
      assert _constraint_count(params, batch) == 0
  with sharding.activation_rules(mesh, rules):
    # embeddings, logits, and per block: queries, MLP hidden, block output
    assert _constraint_count(params, batch) >= 2 + 3 * CFG.n_layers


def test_mesh_shapes_from_config():
  assert dict(sharding.make_mesh().shape) == dict(data=8, stage=1, fsdp=1, expert=1, tensor=1)
  mesh = sharding.make_mesh(dict(data=2, fsdp=-1, tensor=2))
  assert mesh.axis_names == sharding.AXES and mesh.shape['fsdp'] == 2
  assert sharding.mesh_shape(dict(data=-1, tensor=2, dcn=dict(data=2)), 8) == dict(
      data=4, stage=1, fsdp=1, expert=1, tensor=2)


@pytest.mark.parametrize('sizes, match', [
    (dict(data=-1, model=2), "unknown axis 'model'"),
    (dict(data=3), 'needs 3 devices but there are 8'),
    (dict(data=-1, fsdp=-1), 'at most one axis may be -1'),
    (dict(data=-1, fsdp=0), 'fsdp=0 is not allowed'),
    (dict(data=-1, fsdp=3), 'data=-1 cannot take the rest'),
    (dict(data=-1, dcn=dict(data=2)), 'ask for 2 slices but the devices form 1'),
])
def test_bad_mesh_configs_fail_in_one_line(sizes, match):
  with pytest.raises(ValueError, match=re.escape(match)) as e:
    sharding.make_mesh(sizes)
  assert '\n' not in str(e.value)


@pytest.mark.parametrize('spec, match', [
    ('zero3', "unknown preset 'zero3'"),
    ([('hidden', 'fsdp')], "unknown logical axis 'hidden'"),
    ([('embed', 'model')], "unknown mesh axis 'model'"),
    ([('embed',)], 'is not a (logical axis, mesh axes) pair'),
])
def test_bad_rules_fail_in_one_line(spec, match):
  with pytest.raises(ValueError, match=re.escape(match)) as e:
    sharding.rules_for(spec)
  assert '\n' not in str(e.value)


def test_a_dimension_that_does_not_divide_fails_in_one_line():
  mesh = sharding.make_mesh(dict(data=1, tensor=8))
  with pytest.raises(ValueError, match=re.escape(
      'params/blocks_0/attn/out/kernel has shape (4, 16, 64): dim 0 (heads, size 4) does not '
      'divide over mesh axes tensor of size 8')) as e:
    sharding.create_sharded(init_state, mesh, 'tp', jax.random.key(0))
  assert '\n' not in str(e.value)
  with pytest.raises(ValueError, match=re.escape('a global batch of 6 rows does not divide')):
    sharding.global_batch(make_batch(0, rows=6), sharding.make_mesh(), 'dp')
  other = jax.sharding.Mesh(np.array(jax.devices()), ('batch',))
  with pytest.raises(ValueError, match="split over mesh axis 'data'"):
    sharding.batch_sharding(other, 'dp')
  with pytest.raises(ValueError, match='returned no logically named leaves'):
    sharding.create_sharded(lambda r: sharding.unbox(init_state(r)), mesh, 'dp',
                            jax.random.key(0))


def test_presets_decide_every_logical_axis_once_batch_first():
  for name, table in sharding.PRESETS.items():
    assert sorted(logical for logical, _ in table) == sorted(axes.ALL), name
    assert table[0][0] == axes.BATCH, name
    assert sharding.rules_for(list(table)) == table, name
  fsdp, ep = sharding.rules_for('fsdp'), sharding.rules_for('ep')
  # A mesh axis is used once per array: activations keep `embed` whole under FSDP.
  assert nn.logical_to_mesh_axes(('batch', 'length', 'embed'), fsdp) == P(
      ('data', 'fsdp', 'expert'), None, None)
  assert nn.logical_to_mesh_axes(('expert', 'embed', 'mlp'), ep) == P('expert', 'fsdp', None)


def test_checkpoint_saved_on_one_mesh_restores_on_others(tmp_path):
  from experiments import checkpoints   # the training loop's Orbax wrapper
  source = sharding.make_mesh(dict(data=2, fsdp=4))
  state = sharding.create_sharded(init_state, source, 'fsdp', jax.random.key(3))
  ckpts = checkpoints.Checkpoints(tmp_path, keep=1, async_save=False)
  ckpts.save(7, state, checkpoints.data_state('{}', {}))
  ckpts.wait()
  expected = jax.tree.map(np.asarray, state)
  targets = [(sharding.make_mesh(dict(data=4, fsdp=2)), 'fsdp'),
             (sharding.make_mesh(dict(data=1), devices=jax.devices()[:1]), 'dp')]
  for mesh, rules in targets:
    abstract = sharding.sharded_abstract(init_state, mesh, rules, jax.random.key(3))
    r = checkpoints.Checkpoints(tmp_path, writer=False).restore_latest(abstract)
    step, restored = r.step, r.state
    assert step == 7
    for got, want, target in zip(jax.tree.leaves(restored), jax.tree.leaves(expected),
                                 jax.tree.leaves(abstract)):
      np.testing.assert_array_equal(np.asarray(got), want)
      assert got.sharding == target.sharding
    kernel = restored.params['blocks_0']['attn']['query']['kernel']
    assert len(kernel.sharding.device_set) == mesh.size
    assert kernel.sharding.shard_shape(kernel.shape)[0] == CFG.d_model // mesh.shape['fsdp']
