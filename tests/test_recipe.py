"""Recipes: stages wired in order, finished ones skipped, an interrupted one continued, one
report equal to an uninterrupted run's; bad recipes one line each with nothing written."""

import json
import re
import signal

import ml_collections
import pytest

from experiments import recipe, train
from experiments.configs import recipe as recipe_configs
from experiments.errors import UserError

PRUNE = 'experiments/configs/prune.py:magnitude_50'
QUANT = 'experiments/configs/quantize.py:rtn_int8'
SMALL = {'calibration_batches': 1, 'calibration_rows': 4, 'decode_tokens': 8}


def tiny_recipe(data_dir, *extra) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.title = 'tiny'
  config.decode_tokens, config.timing_rounds = 8, 3
  config.stages = (
      dict(name='train', mode='train', config='experiments/configs/shakespeare.py:tiny',
           overrides={'data.data_dir': str(data_dir), 'sample.num_prompts': 0,
                      'num_train_steps': 4, 'checkpoint_every': 2, 'eval_every': 4}),
      dict(name='pruned', mode='prune', config=PRUNE, overrides=dict(SMALL, finetune_steps=3)),
      dict(name='int8', mode='quantize', config=QUANT, overrides=dict(SMALL, kv_cache='')),
  ) + extra
  return config


def stages(*stage_dicts, **top):
  return ml_collections.ConfigDict(dict(stages=tuple(stage_dicts), **top))


TRAIN = dict(name='train', mode='train', config='experiments/configs/shakespeare.py:tiny')


@pytest.mark.parametrize('config,message', [
    (stages(), 'config.stages is empty'),
    (stages(dict(TRAIN, mode='serve')), "stage 'train': mode='serve' is not one of train, prune"),
    (stages(dict(TRAIN, overrides={'nope': 1})), "stage 'train' overrides config.nope, which"),
    (stages(dict(TRAIN, overrides={'data.nope': 1})), "overrides config.data.nope, which this"),
    (stages(dict(TRAIN, overrides={'num_train_steps': 'x'})), "sets config.num_train_steps='x'"),
    (stages(dict(TRAIN, config='experiments/configs/nope.py')), 'is not a config file'),
    (stages(dict(TRAIN, config='experiments/configs/prune.py:nope')), "unknown variant 'nope'"),
    (stages(dict(name='p', mode='prune', config=PRUNE,
                 overrides={'source_workdir': '/does/not/exist'})),
     "stage 'p': its input config.source_workdir='/does/not/exist' is not a training run"),
    (stages(TRAIN, dict(name='q', mode='quantize', config=QUANT), dict(TRAIN, name='t2')),
     "comes after quantization stage 'q'"),
    (stages(TRAIN, dict(name='p', mode='prune', config='experiments/configs/prune.py:sweep')),
     "stage 'p': a recipe stage makes one model; config.variants="),
    (stages(TRAIN, dict(name='p', mode='prune', config=PRUNE), dict(TRAIN, name='t2')),
     "stage 'p': a pruned model is passed on as its fine-tune run; set finetune_steps > 0"),
    (stages(TRAIN, TRAIN), "stage 'train': stage names must be unique"),
    (stages(dict(TRAIN, what=1)), "stage 'train': unknown key 'what'"),
    (stages('train'), 'config.stages[0] must be a dict with name, mode and config'),
    (stages(TRAIN, price_per_hour=-1.0), 'config.price_per_hour=-1.0 must be a number >= 0'),
])
def test_bad_recipes_are_one_line_and_write_nothing(tmp_path, config, message):
  with pytest.raises(UserError, match=re.escape(message)) as e:
    recipe.run(config, tmp_path / 'w', run_stage=lambda *a: pytest.fail('ran a stage'))
  assert '\n' not in str(e.value)
  assert not (tmp_path / 'w').exists()


def test_stages_read_what_the_stage_before_made_and_finished_ones_are_skipped(tmp_path,
                                                                             capsys):
  config = stages(TRAIN, dict(name='p', mode='prune', config=PRUNE,
                              overrides={'finetune_steps': 2}),
                  dict(name='q', mode='quantize', config=QUANT))
  ran = []

  def fake(mode, c, workdir):
    ran.append((mode, str(workdir), c.get('source_workdir')))
    if mode != 'train':
      rows = [dict(variant='dense', nats_per_byte=2.0, dense_bytes=1000, forward_ms=4.0,
                   decode_tokens_per_s=100.0),
              dict(variant=c.variants, nats_per_byte=2.1, sparse_bytes=600, forward_ms=3.0,
                   finetuned_nats_per_byte=2.05, decode_tokens_per_s=200.0)]
      workdir.mkdir(parents=True, exist_ok=True)
      (workdir / 'results.json').write_text(json.dumps(dict(rows=rows)))
  recipe.run(config, tmp_path, run_stage=fake)
  w = str(tmp_path)
  assert ran == [('train', f'{w}/0-train', None),
                 ('prune', f'{w}/1-p', f'{w}/0-train'),
                 ('quantize', f'{w}/2-q', f'{w}/1-p/finetune/magnitude-0.5')]
  rows = json.loads((tmp_path / 'report.json').read_text())['rows']
  assert [r['name'] for r in rows] == ['train', 'p', 'q']
  assert rows[1]['nats_per_byte'] == 2.05 and rows[1]['bytes_ratio'] == pytest.approx(0.6)
  assert rows[1]['decode_speedup'] == pytest.approx(2.0)
  assert (tmp_path / 'pareto.png').exists()
  # A price per hour prices a million decoded tokens: 3.6 USD/h at 200 tokens/s is 5 USD.
  config.price_per_hour = 3.6
  recipe.run(config, tmp_path, run_stage=fake)
  report = json.loads((tmp_path / 'report.json').read_text())
  assert report['rows'][1]['usd_per_million_tokens'] == pytest.approx(5.0)
  assert [t['name'] for t in report['stages']] == ['train', 'p', 'q']
  text = (tmp_path / 'report.md').read_text()
  assert '$ per M tokens' in text and '| 5.0000 |' in text
  assert 'Stage wall times: train ' in text and "of training's" in text
  ran.clear()
  recipe.run(config, tmp_path, run_stage=fake)
  assert not ran and 'stage 2 of 3: p (prune) is done' in capsys.readouterr().out


def test_an_interrupted_recipe_continues_to_the_report_of_an_uninterrupted_one(
    tmp_path, data_dir, monkeypatch):
  whole = recipe.run(tiny_recipe(data_dir), tmp_path / 'whole')
  push = train.StepMonitor.push

  def stop_at_step_1(self, step, metrics):   # SIGTERM (a preemption) during the fine-tune
    push(self, step, metrics)
    if step == 1 and 'origin' in self.config:   # a fine-tune, not the training stage
      signal.raise_signal(signal.SIGTERM)
  with monkeypatch.context() as m:
    m.setattr(train.StepMonitor, 'push', stop_at_step_1)
    with pytest.raises(UserError, match='stopped at step 1 of 3; run the same command again'):
      recipe.run(tiny_recipe(data_dir), tmp_path / 'cut')
  assert (tmp_path / 'cut' / '0-train' / 'stage.json').exists()
  assert not (tmp_path / 'cut' / '1-pruned' / 'stage.json').exists()
  assert not (tmp_path / 'cut' / 'report.json').exists()
  recipe.run(tiny_recipe(data_dir), tmp_path / 'cut')
  assert whole.count('|') > 20
  read = lambda d: json.loads((tmp_path / d / 'report.json').read_text())['rows']
  assert all(r['decode_tokens_per_s'] > 0 and r['peak_bytes'] > 0 for r in read('whole'))
  for a, b in zip(read('whole'), read('cut'), strict=True):
    for key in ('name', 'nats_per_byte', 'bytes', 'bytes_ratio', 'quality_change',
                'flops_per_token', 'peak_bytes'):
      assert a[key] == b[key], key


def test_the_declared_recipes_plan(tmp_path):
  for name in recipe_configs.RECIPES:
    planned = recipe.plan(recipe_configs.get_config(name), tmp_path)
    assert planned[0].mode == 'train' and planned[-1].mode == 'quantize'
  assert not list(tmp_path.iterdir())
