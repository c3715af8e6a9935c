"""Recipes (experiments/recipe.py): ordered stages, each a runner with its config, one report.

Command:
  python -m experiments.main --mode=recipe --config=experiments/configs/recipe.py \
      --workdir=runs/recipe
Recipes: `default` (train the default model, prune it 2:4 with SparseGPT and fine-tune it 100
steps, quantize that to int8 by RTN), `int4` (train, then GPTQ int4 with groups of 128).
Any stage's config field can be overridden in its `overrides` dict (dotted paths).
"""

import ml_collections

SHAKESPEARE = 'experiments/configs/shakespeare.py'


def get_config(arg: str = 'default') -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  train = dict(name='train', mode='train', config=SHAKESPEARE, overrides={})
  if arg == 'default':
    config.title = 'Default recipe: train, SparseGPT 2:4 + 100-step fine-tune, RTN int8'
    config.stages = (
        train,
        dict(name='sparsegpt-2of4', mode='prune', config='experiments/configs/prune.py:'
             'sparsegpt_2of4', overrides={'finetune_steps': 100}),
        dict(name='int8', mode='quantize', config='experiments/configs/quantize.py:rtn_int8',
             overrides={'kv_cache': ''}))
  elif arg == 'int4':
    config.title = 'Recipe: train, GPTQ int4 g128'
    config.stages = (
        train,
        dict(name='gptq-int4', mode='quantize',
             config='experiments/configs/quantize.py:gptq_int4_g128', overrides={'kv_cache': ''}))
  else:
    raise ValueError(f'unknown recipe {arg!r} of recipe.py; known: default, int4')
  return config
