"""Hugging Face interop: logits parity with transformers, exact round trips, and clear errors.

Reference models are tiny random transformers models. Every parameter, including norm scales and
biases that transformers initialises to constants, is redrawn so that a transposed, swapped or
dropped tensor changes the logits.
"""

import copy
import json
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax.core import meta
from safetensors import numpy as st_numpy

from models import ModelConfig, Transformer, gpt2_style, hf
from models.hf_architectures import GPT2, LLAMA, MISTRAL, MIXTRAL, QWEN2

SIZES = dict(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, max_position_embeddings=64)
NO_SPECIAL_TOKENS = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None)
CASES = {
    'llama_mha': ('Llama', dict(num_key_value_heads=4)),
    'llama_gqa_tied': ('Llama', dict(num_key_value_heads=2, tie_word_embeddings=True)),
    'llama_mqa_theta_biases': ('Llama', dict(
        num_key_value_heads=1, head_dim=32, attention_bias=True, mlp_bias=True,
        rope_parameters={'rope_type': 'default', 'rope_theta': 500_000.0})),
    'mistral_window': ('Mistral', dict(num_key_value_heads=2, sliding_window=4)),
    'qwen2': ('Qwen2', dict(num_key_value_heads=2)),
    'qwen2_window': ('Qwen2', dict(num_key_value_heads=2, use_sliding_window=True,
                                   sliding_window=5, max_window_layers=0)),
    'mixtral': ('Mixtral', dict(num_key_value_heads=2, num_local_experts=4,
                                num_experts_per_tok=2)),
    'gpt2': ('GPT2', dict(vocab_size=100, n_embd=64, n_layer=2, n_head=4, n_positions=64)),
    'gpt2_untied': ('GPT2', dict(vocab_size=100, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                 n_inner=96, tie_word_embeddings=False)),
}
TOKENS = np.random.RandomState(0).randint(0, 100, (2, 12))


def make_hf_model(case: str):
  family, options = CASES[case]
  kwargs = options if family == 'GPT2' else dict(SIZES, **options)
  config = getattr(transformers, f'{family}Config')(**kwargs, **NO_SPECIAL_TOKENS)
  torch.manual_seed(sorted(CASES).index(case))
  model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation='eager')
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.normal_(0.0, 0.1)
      if p.ndim == 1 and name.endswith('weight'):   # norm scales: around 1, never exactly 1
        p.add_(1.0)
  return model.eval()


def hf_logits(model, tokens) -> np.ndarray:
  with torch.no_grad():
    return model(torch.tensor(tokens)).logits.numpy()


def our_logits(model, params, tokens) -> np.ndarray:
  return np.asarray(model.apply({'params': params}, jnp.asarray(tokens)))


@pytest.fixture(scope='module')
def hf_dir(tmp_path_factory):
  """case -> (directory written by transformers, the transformers model), built once."""
  cache = {}

  def get(case):
    if case not in cache:
      path = tmp_path_factory.mktemp(case)
      model = make_hf_model(case)
      model.save_pretrained(path)
      cache[case] = path, model
    return cache[case]
  return get


@pytest.mark.parametrize('scan', [False, True], ids=['unrolled', 'scan'])
@pytest.mark.parametrize('case', list(CASES))
def test_logits_match_transformers(hf_dir, case, scan):
  path, ref = hf_dir(case)
  model, params = hf.from_pretrained(path, scan_layers=scan)
  assert model.config.scan_layers == scan and ('blocks' in params) == scan
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  diff = np.abs(our_logits(model, params, TOKENS) - hf_logits(ref, TOKENS)).max()
  print(f'{case} scan={scan}: max |diff| = {diff:.2e}')
  assert diff <= 1e-4


OUR_SIZES = dict(vocab_size=100, d_model=64, n_layers=2, n_heads=4, d_ff=128, max_len=64)
OUR_CONFIGS = {
    'LlamaForCausalLM': ModelConfig(n_kv_heads=2, qkv_bias=True, out_bias=True, mlp_bias=True,
                                    rope_theta=500_000.0, norm_eps=1e-5, **OUR_SIZES),
    'MistralForCausalLM': ModelConfig(n_kv_heads=1, sliding_window=4, tie_embeddings=True,
                                      activation='gelu_tanh', **OUR_SIZES),
    'Qwen2ForCausalLM': ModelConfig(qkv_bias=True, head_dim=32, scan_layers=True, **OUR_SIZES),
    'GPT2LMHeadModel': gpt2_style(**OUR_SIZES),
    'MixtralForCausalLM': ModelConfig(n_kv_heads=2, n_experts=4, experts_per_token=2,
                                      **OUR_SIZES),
}


def random_params(cfg: ModelConfig, seed: int = 0):
  """Random parameters drawn with NumPy (no compiles), norm scales around 1."""
  rng = np.random.RandomState(seed)
  tokens = jnp.zeros((1, 4), jnp.int32)
  shapes = jax.eval_shape(lambda: Transformer(cfg).init(jax.random.key(0), tokens))['params']
  draw = lambda path, s: jnp.asarray(
      0.1 * rng.standard_normal(s.shape) + (path[-1].key == 'scale'), s.dtype)
  return jax.tree_util.tree_map_with_path(draw, meta.unbox(shapes))


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize('arch', list(OUR_CONFIGS))
def test_round_trip_through_transformers(tmp_path, arch):
  cfg = OUR_CONFIGS[arch]
  model, params = Transformer(cfg), random_params(cfg)
  hf.save_pretrained(model, params, tmp_path / 'ours')
  config = json.loads((tmp_path / 'ours' / 'config.json').read_text())
  assert config['architectures'] == [arch] and config['dtype'] == 'float32'
  ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / 'ours',
                                                          attn_implementation='eager')
  assert type(ref).__name__ == arch
  diff = np.abs(our_logits(model, params, TOKENS) - hf_logits(ref, TOKENS)).max()
  print(f'{arch}: ours -> transformers max |diff| = {diff:.2e}')
  assert diff <= 1e-4
  ref.save_pretrained(tmp_path / 'theirs')
  model2, params2 = hf.from_pretrained(tmp_path / 'theirs', scan_layers=cfg.scan_layers)
  assert model2.config == cfg
  assert_trees_equal(params, params2)


def test_bf16_sharded_checkpoints_load_without_torch(hf_dir, tmp_path):
  _, ref = hf_dir('llama_gqa_tied')
  ref = copy.deepcopy(ref).to(torch.bfloat16)
  ref.save_pretrained(tmp_path / 'theirs', max_shard_size='40KB')
  assert (tmp_path / 'theirs' / 'model.safetensors.index.json').is_file()
  code = ('import sys; from models import hf; import jax\n'
          f'_, p = hf.from_pretrained({str(tmp_path / "theirs")!r}, param_dtype="bfloat16")\n'
          'assert {x.dtype.name for x in jax.tree.leaves(p)} == {"bfloat16"}\n'
          'assert "torch" not in sys.modules, "torch was imported"\n')
  env = {'JAX_PLATFORMS': 'cpu', 'PATH': '/usr/bin:/bin'}
  result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env,
                          cwd=pathlib.Path(__file__).parents[1])
  assert result.returncode == 0, result.stderr[-2000:]

  model, params = hf.from_pretrained(tmp_path / 'theirs', param_dtype='bfloat16')
  want = ref.model.layers[1].self_attn.k_proj.weight.detach().float().numpy()
  got = np.asarray(params['blocks_1']['attn']['key']['kernel'], np.float32)
  np.testing.assert_array_equal(got.reshape(64, -1).T, want)
  # Our own sharded bf16 output reads back identically, here and in transformers.
  hf.save_pretrained(model, params, tmp_path / 'ours', max_shard_bytes=20_000)
  assert len(list((tmp_path / 'ours').glob('model-*-of-*.safetensors'))) > 1
  assert_trees_equal(params, hf.from_pretrained(tmp_path / 'ours', param_dtype='bfloat16')[1])
  back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / 'ours')
  assert back.dtype == torch.bfloat16
  for (name, a), b in zip(ref.state_dict().items(), back.state_dict().values()):
    assert torch.equal(a, b), name


def test_pytorch_bin_and_unprefixed_names(hf_dir, tmp_path):
  path, ref = hf_dir('llama_gqa_tied')
  _, expected = hf.from_pretrained(path)
  shutil.copy(path / 'config.json', tmp_path)
  torch.save(ref.state_dict(), tmp_path / 'pytorch_model.bin')   # holds the tied lm_head too
  assert_trees_equal(expected, hf.from_pretrained(tmp_path)[1])

  # Original GPT-2 checkpoints omit the 'transformer.' prefix and keep attention-mask buffers.
  path, _ = hf_dir('gpt2')
  _, expected = hf.from_pretrained(path)
  tensors = {k.removeprefix('transformer.'): v
             for k, v in st_numpy.load_file(path / 'model.safetensors').items()}
  tensors['h.0.attn.bias'] = np.tril(np.ones((1, 1, 64, 64), np.float32))
  edited = copy_checkpoint(path, tmp_path / 'gpt2', tensors)
  assert_trees_equal(expected, hf.from_pretrained(edited)[1])


def copy_checkpoint(src, dst, tensors):
  dst.mkdir()
  shutil.copy(src / 'config.json', dst)
  st_numpy.save_file(tensors, dst / 'model.safetensors', metadata={'format': 'pt'})
  return dst


def edit_tensors(path, edit):
  tensors = st_numpy.load_file(path / 'model.safetensors')
  edit(tensors)
  return tensors


def test_bad_checkpoints_fail_clearly(hf_dir, tmp_path):
  path, _ = hf_dir('llama_gqa_tied')
  with pytest.raises(FileNotFoundError, match='no config.json'):
    hf.from_pretrained(tmp_path)
  (tmp_path / 'bert').mkdir()
  (tmp_path / 'bert' / 'config.json').write_text(json.dumps({'architectures': ['BertForMaskedLM']}))
  with pytest.raises(ValueError, match="unsupported architecture 'BertForMaskedLM'.*LlamaForCaus"):
    hf.from_pretrained(tmp_path / 'bert')
  (tmp_path / 'empty').mkdir()
  shutil.copy(path / 'config.json', tmp_path / 'empty')
  with pytest.raises(FileNotFoundError, match='no weight files'):
    hf.from_pretrained(tmp_path / 'empty')
  (tmp_path / 'empty' / 'model.safetensors.index.json').write_text(
      json.dumps({'weight_map': {'model.norm.weight': 'model-00001-of-00002.safetensors'}}))
  with pytest.raises(FileNotFoundError, match='missing weight files: model-00001-of-00002'):
    hf.from_pretrained(tmp_path / 'empty')

  up = 'model.layers.1.mlp.up_proj.weight'
  bad = copy_checkpoint(path, tmp_path / 'shape', edit_tensors(
      path, lambda t: t.update({up: t[up][:127]})))
  with pytest.raises(ValueError, match=rf"'{up}' has shape \(127, 64\), expected \(128, 64\)"):
    hf.from_pretrained(bad)
  norm = 'model.layers.1.post_attention_layernorm.weight'
  bad = copy_checkpoint(path, tmp_path / 'missing', edit_tensors(path, lambda t: t.pop(norm)))
  with pytest.raises(ValueError, match=f'lacks 1 tensor.*{norm}'):
    hf.from_pretrained(bad)
  extra = 'model.layers.0.self_attn.q_norm.weight'
  bad = copy_checkpoint(path, tmp_path / 'extra', edit_tensors(
      path, lambda t: t.update({extra: np.ones(16, np.float32)})))
  with pytest.raises(ValueError, match=f'1 unexpected tensor.*{extra}'):
    hf.from_pretrained(bad)


def test_config_translation():
  legacy = dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, vocab_size=100,
                intermediate_size=128, rope_theta=1e6, rope_scaling=None)
  assert LLAMA.config_from_hf(legacy).rope_theta == 1e6
  with pytest.raises(ValueError, match="rope_type='yarn'"):
    LLAMA.config_from_hf(dict(legacy, rope_parameters={'rope_type': 'yarn', 'factor': 4.0}))
  with pytest.raises(ValueError, match="activation 'relu'"):
    LLAMA.config_from_hf(dict(legacy, hidden_act='relu'))
  assert MISTRAL.config_from_hf(dict(legacy, sliding_window=None)).sliding_window is None
  assert QWEN2.config_from_hf(dict(legacy, sliding_window=8)).sliding_window is None
  with pytest.raises(ValueError, match='mix attention kinds'):
    QWEN2.config_from_hf(dict(legacy, use_sliding_window=True, max_window_layers=1))
  gpt = GPT2.config_from_hf(dict(n_embd=64, n_layer=2, n_head=4, vocab_size=100, n_inner=None,
                                 activation_function='gelu_new'))
  assert (gpt.d_ff, gpt.activation, gpt.tie_embeddings) == (256, 'gelu_tanh', True)


def test_config_export_writes_resolved_heads_and_reads_back_equal():
  for cfg, kv, head_dim in ((ModelConfig(**OUR_SIZES), 4, 16),
                            (ModelConfig(n_kv_heads=2, head_dim=32, **OUR_SIZES), 2, 32)):
    c = LLAMA.config_to_hf(cfg)
    assert (c['num_key_value_heads'], c['head_dim']) == (kv, head_dim)
    assert LLAMA.config_from_hf(c) == cfg
  moe = dict(n_experts=4, **OUR_SIZES)
  assert MIXTRAL.problems(ModelConfig(**moe)) == []
  assert MIXTRAL.problems(ModelConfig(moe_d_ff=32, **moe)) == ['moe_d_ff=32 (needs 128)']


def test_unrepresentable_configs_fail_to_save(tmp_path):
  shared = ModelConfig(n_unique_layers=2, **dict(OUR_SIZES, n_layers=4))
  with pytest.raises(ValueError, match='n_unique_layers=2 != n_layers=4'):
    hf.save_pretrained(Transformer(shared), random_params(shared), tmp_path)
  cfg = ModelConfig(norm='layernorm', **OUR_SIZES)
  with pytest.raises(ValueError, match="as LlamaForCausalLM: norm='layernorm'"):
    hf.save_pretrained(Transformer(cfg), random_params(cfg), tmp_path)
  with pytest.raises(ValueError, match="unsupported architecture 'Phi3ForCausalLM'"):
    hf.save_pretrained(Transformer(cfg), random_params(cfg), tmp_path, 'Phi3ForCausalLM')


@pytest.mark.parametrize('case', ['llama_gqa_tied', 'gpt2', 'mixtral'])
def test_greedy_generation_matches_transformers(hf_dir, case):
  decode = pytest.importorskip('models.decode')
  path, ref = hf_dir(case)
  model, params = hf.from_pretrained(path)
  prompt = [5, 17, 42, 8, 99, 3, 61]
  out = decode.generate(model, params, [prompt], max_new_tokens=20)
  with torch.no_grad():
    theirs = ref.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt)),
                          do_sample=False, max_new_tokens=20)[0, len(prompt):]
  assert int(out.lengths[0]) == 20
  assert np.asarray(out.tokens)[0].tolist() == theirs.tolist()


def test_mixtral_fused_expert_layout_loads_like_the_per_expert_files(hf_dir, tmp_path):
  path, _ = hf_dir('mixtral')
  tensors = st_numpy.load_file(str(path / 'model.safetensors'))
  fused = {}
  for name, value in tensors.items():
    if '.block_sparse_moe.experts.' in name:
      continue
    fused[name.replace('.block_sparse_moe.gate.', '.mlp.gate.')] = value
  for layer in range(2):
    w = lambda e, k: tensors[f'model.layers.{layer}.block_sparse_moe.experts.{e}.{k}.weight']
    fused[f'model.layers.{layer}.mlp.experts.gate_up_proj'] = np.stack(
        [np.concatenate([w(e, 'w1'), w(e, 'w3')]) for e in range(4)])   # (E, 2 * ffn, d)
    fused[f'model.layers.{layer}.mlp.experts.down_proj'] = np.stack(
        [w(e, 'w2') for e in range(4)])                                 # (E, d, ffn)
  shutil.copy(path / 'config.json', tmp_path / 'config.json')
  st_numpy.save_file(fused, str(tmp_path / 'model.safetensors'))
  _, want = hf.from_pretrained(path)
  _, got = hf.from_pretrained(tmp_path)
  assert_trees_equal(got, want)
