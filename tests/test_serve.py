"""--mode=serve: a JSONL file of requests served from a trained run through the engine."""

import json

import numpy as np
import pytest

from experiments import runners, runtime
from experiments.errors import UserError
from models import decode
from tests.runs import tiny_config, tree_digest


def alone(config, workdir, prompt, n):
  """Greedy `decode.generate` on one prompt, cut after the EOS id."""
  _, model, tokenizer, params, _ = runtime.load_served(config, workdir)
  out = decode.generate(model, params, [prompt], max_new_tokens=n,
                        stop_tokens=(tokenizer.eos_id,), pad_id=tokenizer.pad_id)
  return np.asarray(out.tokens[0, :int(out.lengths[0])]).tolist(), tokenizer


def test_serve_writes_every_request_in_order_as_if_each_ran_alone(source, data_dir, tmp_path):
  config = tiny_config(data_dir)
  lines = [json.dumps(dict(text='ROMEO:', max_new_tokens=12, id='romeo')),
           'this is not json',
           json.dumps(dict(prompt=[1, 40, 41, 42], max_new_tokens=7, priority=1)),
           json.dumps(dict(prompt=[], max_new_tokens=3, id='empty')),
           json.dumps(dict(text='JULIET:', max_new_tokens=9, beams=2, id='beams')),
           json.dumps(dict(text='KING:', max_new_tokens=10, temperature=0.8, seed=3, id='hot'))]
  requests, output = tmp_path / 'requests.jsonl', tmp_path / 'out.jsonl'
  requests.write_text('\n'.join(lines) + '\n')
  before = tree_digest(source)
  text = runners.run('serve', config, source, requests=str(requests), output=str(output),
                     slots=2)
  assert text.startswith('served 3 of 6 requests (3 errors)')
  got = [json.loads(line) for line in output.read_text().splitlines()]
  assert [g['id'] for g in got] == ['romeo', 'line2', 'line3', 'empty', 'beams', 'hot']
  _, tokenizer = alone(config, source, [1], 1)
  romeo, _ = alone(config, source, [tokenizer.bos_id] + tokenizer.encode('ROMEO:'), 12)
  assert got[0]['tokens'] == romeo and got[0]['text'] == tokenizer.decode(romeo)
  assert got[2]['tokens'] == alone(config, source, [1, 40, 41, 42], 7)[0]
  assert got[1]['finish_reason'] == 'error' and 'line 2 is not JSON' in got[1]['error']
  assert 'prompt must be a non-empty' in got[3]['error']
  assert "unknown request field 'beams'" in got[4]['error']
  assert got[5]['finish_reason'] in ('stop', 'length') and 1 <= len(got[5]['tokens']) <= 10
  assert all(g['ttft'] >= 0 for g in got if g['finish_reason'] != 'error')
  assert tree_digest(source) == before


@pytest.mark.parametrize('case, match', [
    ('missing', '--requests=.*does not exist'),
    ('same', '--output=.* is the requests file'),
    ('slots', '--slots=0 must be at least 1'),
    ('none', '--mode=serve needs --requests'),
])
def test_serve_refuses_bad_flags_in_one_line_and_writes_nothing(source, data_dir, tmp_path,
                                                                 case, match):
  requests = tmp_path / 'requests.jsonl'
  requests.write_text(json.dumps(dict(prompt=[1, 2], max_new_tokens=2)) + '\n')
  flags = dict(requests=str(requests), output=str(tmp_path / 'out.jsonl'), slots=2)
  if case == 'missing':
    flags['requests'] = str(tmp_path / 'nope.jsonl')
  elif case == 'same':
    flags['output'] = str(requests)
  elif case == 'slots':
    flags['slots'] = 0
  else:
    flags = {}
  with pytest.raises(UserError, match=match):
    runners.run('serve', tiny_config(data_dir), source, **flags)
  assert sorted(p.name for p in tmp_path.iterdir()) == ['requests.jsonl']


def test_only_serve_takes_requests_output_and_slots():
  with pytest.raises(UserError, match='--slots=4 applies to --mode=serve, '
                                      '--mode=cascade_benchmark, --mode=trace_benchmark and '
                                      '--mode=http only'):
    runners.check_flags('sample', runners.Flags(slots=4), 'w')


def test_serve_with_a_draft_makes_the_same_tokens_and_reports_acceptance(source, data_dir,
                                                                         tmp_path):
  # The run as its own draft: every proposal is the target's token, so all are kept.
  config = tiny_config(data_dir)
  requests, plain, drafted = (tmp_path / n for n in ('requests.jsonl', 'plain.jsonl',
                                                     'drafted.jsonl'))
  requests.write_text(''.join(json.dumps(dict(text=t, max_new_tokens=9)) + '\n'
                              for t in ('ROMEO:', 'KING HENRY:', 'O')))
  runners.run('serve', config, source, requests=str(requests), output=str(plain), slots=2)
  text = runners.run('serve', config, source, requests=str(requests), output=str(drafted),
                     slots=2, draft=str(source), draft_tokens=(3,))
  assert '100% of draft tokens kept' in text
  tokens = lambda p: [json.loads(line)['tokens'] for line in p.read_text().splitlines()]
  assert tokens(drafted) == tokens(plain)
  with pytest.raises(UserError, match='--draft=.* has no config.json'):
    runners.run('serve', config, source, requests=str(requests), output=str(tmp_path / 'x'),
                slots=2, draft=str(tmp_path))
  with pytest.raises(UserError, match='--draft_tokens=2,3 must be one integer'):
    runners.run('serve', config, source, requests=str(requests), output=str(tmp_path / 'x'),
                slots=2, draft=str(source), draft_tokens=(2, 3))
  assert not (tmp_path / 'x').exists()


def test_serve_benchmark_times_plain_draft_and_speculative_engines(source, data_dir):
  table = runners.run('serve_benchmark', tiny_config(data_dir), source, draft=str(source),
                      draft_tokens=(2,), batch_sizes=(1, 2), steps=4)
  rows = [line.split(' | ') for line in table.splitlines() if line.startswith('| k=2')]
  assert len(rows) == 2 and all(r[3] == '100%' and r[-1] == '2/2 |' for r in rows)
  assert '| plain | 1 |' in table and '| draft alone | 2 |' in table and '| 2 | ' in table
  # The int8 cache holds a quarter of the float32 bytes, plus its scales and bookkeeping.
  mib = {r[0][2:]: float(r[2]) for r in (line.split(' | ') for line in table.splitlines())
         if r[0] in ('| plain', '| plain, int8 cache') and r[1] == '2'}
  assert 0.25 < mib['plain, int8 cache'] / mib['plain'] < 0.5


def test_the_cascade_escalates_by_confidence_and_the_full_model_alone_escalates_all(source,
                                                                                   data_dir):
  # The run as its own small model: every answer equals the full model's, escalated or not.
  table = runners.run('cascade_benchmark', tiny_config(data_dir), source, draft=str(source),
                      slots=4, steps=3)
  rows = [[c.strip() for c in line.split('|')[1:-1]] for line in table.splitlines()
          if line.startswith('| ') and (line[2].isdigit() or line.startswith('| full'))]
  escalated = [int(r[1].split('/')[0]) for r in rows]
  assert len(rows) == 5 and escalated[0] == 0 and escalated[-1] == 64
  assert escalated == sorted(escalated)
  assert all(r[4] == '64/64' for r in rows) and rows[-1][3] == '1.00x'
  with pytest.raises(UserError, match='needs --draft'):
    runners.run('cascade_benchmark', tiny_config(data_dir), source, slots=4, steps=3)


def test_serve_reads_a_hugging_face_checkpoint_directory(data_dir, tmp_path):
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  from models import ModelConfig, Transformer, hf
  cfg = ModelConfig(vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                    init_std=0.2, max_len=128)
  model = Transformer(cfg)
  params = nn.meta.unbox(model.init(jax.random.key(3), jnp.zeros((1, 4), jnp.int32))['params'])
  ckpt = tmp_path / 'hf'
  hf.save_pretrained(model, params, ckpt)
  requests, output = tmp_path / 'requests.jsonl', tmp_path / 'out.jsonl'
  requests.write_text(json.dumps(dict(prompt=[5, 6, 7], max_new_tokens=6, id='ids')) + '\n'
                      + json.dumps(dict(text='ROMEO:', max_new_tokens=3, id='text')) + '\n')
  text = runners.run('serve', tiny_config(data_dir), ckpt, requests=str(requests),
                     output=str(output), slots=2)
  assert text.startswith('served 1 of 2 requests (1 errors)')
  got = {g['id']: g for g in map(json.loads, output.read_text().splitlines())}
  loaded, loaded_params = hf.from_pretrained(ckpt)
  want = decode.generate(loaded, loaded_params, [[5, 6, 7]], max_new_tokens=6).tokens
  assert got['ids']['tokens'] == np.asarray(want[0]).tolist()
  assert 'text needs a tokenizer' in got['text']['error']
