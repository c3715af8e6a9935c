"""The compression seam (models/seam.py, models/layers.py) and layouts (models/layouts.py).

A toy leaf type, int8 values with a scale per output column, is registered here the way
compression code registers its own. Every dense, expert, embedding and head contraction of a
dense and of an MoE model must run through its rule, with no model change, on one device and
on 8 fake devices, and a tree of such leaves must save and restore through Orbax onto another
mesh without being upcast.
"""

import collections
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax import lax

import sharding
from compression import paths
from models import ModelConfig, Transformer, axes, layouts, seam
from tests.conftest import init_params

CALLS = collections.Counter()


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ScaledInt8(seam.Leaf):
  """w ~= values * scale, scale per output column of every matrix of the stack."""
  values: jax.Array                    # int8, the weight's shape
  scale: jax.Array                     # float32, [stack..., outputs...]
  layout: layouts.Layout = dataclasses.field(metadata=dict(static=True))

  @property
  def shape(self):
    return tuple(self.values.shape)

  def logical_axes(self):
    l = self.layout
    return ScaledInt8(l.names, l.stacked_names + l.names[l.stack + l.inputs:], l)

  def dequantize(self, dtype):
    l = self.layout
    scale = self.scale.reshape(self.scale.shape[:l.stack] + (1,) * l.inputs
                               + self.scale.shape[l.stack:])
    return (self.values.astype(jnp.float32) * scale).astype(dtype)


def quantize(w, layout):
  l = layout
  reduce = tuple(range(l.stack, l.stack + l.inputs))
  scale = jnp.max(jnp.abs(w), axis=reduce) / 127.0
  values = jnp.round(w / jnp.expand_dims(scale, reduce)).astype(jnp.int8)
  return ScaledInt8(values, scale.astype(jnp.float32), layout)


def counted(kind, fn):
  def rule(*args):
    CALLS[kind] += 1
    return fn(*args)
  return rule


seam.register(ScaledInt8, seam.Rule(
    dense=lambda w, dtype: w.dequantize(dtype),
    dot=counted('dot', lambda x, w, xd, wd, dtype: lax.dot_general(
        x.astype(dtype), w.dequantize(dtype), ((xd, wd), ((), ())))),
    expert_dot=counted('expert_dot', lambda x, w, dtype: jnp.einsum(
        'emi,eio->emo', x.astype(dtype), w.dequantize(dtype))),
    ragged_dot=counted('ragged_dot', lambda x, w, sizes, dtype, rows: lax.ragged_dot(
        x.astype(dtype), w.dequantize(dtype), sizes)),
    take=counted('take', lambda w, ids, dtype: jnp.take(w.dequantize(dtype), ids, axis=0))))

DENSE = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                    tie_embeddings=True)
MOE = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=64, n_experts=4,
                  experts_per_token=2, moe_d_ff=32, moe_dispatch='capacity',
                  capacity_factor=2.0)


def quantize_all(params, cfg):
  """Every matmul weight (tables, heads and routers included) becomes a ScaledInt8 leaf."""
  lay = layouts.of_config(cfg)
  flat = paths.flatten(params)
  return paths.unflatten({p: quantize(v, lay[p]) if p in lay else v for p, v in flat.items()})


def dequantize_all(tree):
  return jax.tree.map(lambda x: x.dequantize(jnp.float32) if isinstance(x, ScaledInt8) else x,
                      tree, is_leaf=lambda x: isinstance(x, ScaledInt8))


TOKENS = np.random.default_rng(0).integers(0, 64, (8, 12)).astype(np.int32)


def expected_calls(cfg):
  per_layer = 4 + (1 if cfg.n_experts else 3)   # q, k, v, out; the router or up, gate, down
  head = 1                                              # the tied or untied head
  calls = dict(dot=per_layer * cfg.n_layers + head, take=1)
  if cfg.n_experts:   # up, gate and down of every MoE layer
    calls['expert_dot' if cfg.moe_dispatch == 'capacity' else 'ragged_dot'] = 3 * cfg.n_layers
  return calls


@pytest.mark.parametrize('cfg', [DENSE, MOE, MOE.replace(moe_dispatch='dropless',
                                                         tie_embeddings=True)],
                         ids=['dense-tied', 'moe-capacity', 'moe-dropless-tied'])
def test_every_contraction_runs_through_the_leaf_types_rule(cfg):
  model = Transformer(cfg)
  q = quantize_all(init_params(cfg), cfg)
  CALLS.clear()
  out = jax.jit(lambda p: model.apply({'params': p}, TOKENS))(q)
  assert dict(CALLS) == expected_calls(cfg)
  # The leaf executes as the weight it stands for: same function as the dequantized tree.
  ref = model.apply({'params': dequantize_all(q)}, TOKENS)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def names_of(cfg):
  return layouts.logical_names(Transformer(cfg))


@pytest.mark.parametrize('cfg,mesh_shape,rules', [
    (DENSE, dict(data=2, fsdp=2, tensor=2), 'fsdp_tp'),
    (MOE, dict(data=2, expert=4), 'ep'),
    (MOE.replace(moe_dispatch='dropless'), dict(fsdp=2, expert=4), 'ep'),
], ids=['dense-fsdp-tp', 'moe-capacity-ep', 'moe-dropless-ep'])
def test_leaf_trees_are_created_sharded_and_run_on_eight_devices_as_on_one(cfg, mesh_shape,
                                                                          rules):
  model = Transformer(cfg)
  params = init_params(cfg)
  one = jax.jit(lambda p: model.apply({'params': p}, TOKENS))(quantize_all(params, cfg))
  mesh = sharding.make_mesh(mesh_shape)
  fn = lambda p: quantize_all(p, cfg)
  shardings = sharding.tree_shardings(jax.eval_shape(fn, params), mesh, rules, names_of(cfg))
  q = jax.jit(fn, out_shardings=shardings)(params)   # created directly in its layout
  up = q['blocks_1']['mlp']['up']
  up = up['kernel'] if isinstance(up, dict) else up
  assert up.values.dtype == jnp.int8
  if cfg.n_experts:   # experts split over the expert axis, values and scales alike
    assert up.values.sharding.spec[0] == 'expert' and up.scale.sharding.spec[0] == 'expert'
  CALLS.clear()
  with sharding.activation_rules(mesh, rules):
    many = jax.jit(lambda p, t: model.apply({'params': p}, t))(
        q, sharding.global_batch(TOKENS, mesh, rules))
  assert dict(CALLS) == expected_calls(cfg)
  np.testing.assert_allclose(many, one, rtol=2e-5, atol=2e-5)


def test_a_leaf_tree_saves_int8_and_restores_onto_another_mesh(tmp_path):
  params = init_params(MOE)
  fn = lambda p: quantize_all(p, MOE)
  abstract = jax.eval_shape(fn, params)
  names = names_of(MOE)
  mesh_a = sharding.make_mesh(dict(data=2, expert=4))
  saved = jax.jit(fn, out_shardings=sharding.tree_shardings(abstract, mesh_a, 'ep', names))(
      params)
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(tmp_path / 'q', saved)
  mesh_b = sharding.make_mesh(dict(fsdp=4, tensor=2))
  target_sh = sharding.tree_shardings(abstract, mesh_b, 'fsdp_tp', names)
  target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        abstract, target_sh)
  with ocp.StandardCheckpointer() as ckpt:
    restored = ckpt.restore(tmp_path / 'q', target)
  assert jax.tree.structure(restored) == jax.tree.structure(saved)
  for a, b, s in zip(jax.tree.leaves(saved), jax.tree.leaves(restored),
                     jax.tree.leaves(target_sh)):
    assert b.dtype == a.dtype and b.sharding == s
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  q = restored['blocks_0']['attn']['query']['kernel']
  assert q.values.dtype == jnp.int8 and tuple(q.values.sharding.spec)[:2] == ('fsdp', 'tensor')
  with ocp.StandardCheckpointer() as ckpt:   # stored as int8 on disk, not upcast
    stored = ckpt.metadata(tmp_path / 'q')
  stored = getattr(stored, 'item_metadata', stored)
  dtypes = {str(m.dtype) for m in jax.tree.leaves(stored, is_leaf=lambda x: hasattr(x, 'dtype'))}
  assert dtypes == {'int8', 'float32'}
  query = stored['blocks_0']['attn']['query']['kernel']
  assert str(query['values'].dtype) == 'int8'


def test_layouts_come_from_the_logical_names():
  lay = layouts.of_config(MOE.replace(scan_layers=True))
  assert lay['blocks/attn/out/kernel'] == layouts.Layout(
      (axes.LAYERS, axes.HEADS, axes.HEAD_DIM, axes.EMBED), stack=1, inputs=2)
  assert lay['blocks/mlp/down'].stack == 2 and lay['blocks/mlp/down'].inputs == 1
  assert lay['blocks/mlp/router/kernel'].stack == 1   # the expert axis is its output
  assert lay['embed/embedding'].inputs == 1           # a lookup is one_hot(ids) x table
  assert 'blocks/attn_norm/scale' not in lay           # [layers, embed]: not a matmul weight
  with pytest.raises(ValueError, match='neither reads nor writes'):
    layouts.of_names((axes.HEADS, axes.MLP))


def test_a_leaf_of_the_wrong_shape_is_one_clear_error():
  params = init_params(DENSE)
  params['blocks_0']['mlp']['up']['kernel'] = jnp.zeros((3, 3))
  with pytest.raises(ValueError, match=r'blocks_0/mlp/up/kernel has shape \(3, 3\)'):
    Transformer(DENSE).apply({'params': params}, TOKENS)


def test_an_unregistered_leaf_type_is_refused_by_name():
  class Unknown(seam.Leaf):
    shape = (32, 64)

    def logical_axes(self):
      return ()
  with pytest.raises(TypeError, match='no seam rule for a weight of type Unknown'):
    seam.rule_for(Unknown())


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Factored(seam.Leaf):   # the README's example leaf type, verbatim
  a: jax.Array
  b: jax.Array
  names: tuple = dataclasses.field(metadata=dict(static=True))
  shape = property(lambda self: (self.a.shape[0], self.b.shape[1]))

  def logical_axes(self):
    return Factored((self.names[0], None), (None, self.names[1]), self.names)


seam.register(Factored, seam.Rule(dense=lambda w, dtype: (w.a @ w.b).astype(dtype),
                                  dot=lambda x, w, xd, wd, dtype: (x @ w.a) @ w.b))


def test_the_readme_factored_leaf_runs_the_mlp_as_two_products():
  params = init_params(DENSE)
  up = params['blocks_0']['mlp']['up']['kernel']                    # [32, 64]
  u, sv, vt = np.linalg.svd(np.asarray(up, np.float64), full_matrices=False)
  exact = Factored(jnp.asarray(u * sv, jnp.float32), jnp.asarray(vt, jnp.float32),
                   (axes.EMBED, axes.MLP))
  factored = jax.tree.map(lambda x: x, params)
  factored['blocks_0']['mlp']['up']['kernel'] = exact
  model = Transformer(DENSE)
  np.testing.assert_allclose(model.apply({'params': factored}, TOKENS),
                             model.apply({'params': params}, TOKENS), rtol=1e-4, atol=1e-4)
  mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
  sh = sharding.tree_shardings({'k': exact}, mesh, 'fsdp_tp')['k']
  assert tuple(sh.a.spec)[:1] == ('fsdp',) and tuple(sh.b.spec)[1:2] == ('tensor',)
