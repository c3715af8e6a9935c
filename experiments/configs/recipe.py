"""Recipes (experiments/recipe.py): ordered stages, each a runner with its config, one report.

Command (the README's main job):
  python -m experiments.main --mode=recipe --config=experiments/configs/recipe.py \
      --workdir=runs/recipe
Recipes:
  default  train the default model; remove a quarter of its FFN neurons (structural pruning:
           a smaller model, faster on any backend) and fine-tune 100 steps; quantize that to
           int8 per output channel by RTN (a quarter of the float bytes, integer dots).
  sparse   train; SparseGPT 2:4 with a 100-step fine-tune; RTN int8.
  int4     train; GPTQ int4 with groups of 128.
Any stage's config field can be overridden in its `overrides` dict (dotted paths);
`price_per_hour` (USD per hour of the machine the report is measured on; 0: none) prices a
million decoded tokens in the report; `decode_tokens` and `timing_rounds` set how the report
times every row's model together.
"""

import ml_collections

SHAKESPEARE = 'experiments/configs/shakespeare.py'
RECIPES = ('default', 'sparse', 'int4')


def get_config(arg: str = 'default') -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.price_per_hour = 0.0
  # The report times every row's model again in one process, in alternating rounds: the forward
  # pass on a calibration batch and greedy decoding of `decode_tokens` tokens for one request.
  config.decode_tokens = 128
  config.timing_rounds = 15
  train = dict(name='train', mode='train', config=SHAKESPEARE, overrides={})
  int8 = dict(name='int8', mode='quantize', config='experiments/configs/quantize.py:rtn_int8',
              overrides={'kv_cache': ''})
  if arg == 'default':
    config.title = 'Default recipe: train, FFN neurons -25% + 100-step fine-tune, RTN int8'
    config.stages = (
        train,
        dict(name='ffn-25', mode='prune', config='experiments/configs/prune.py:ffn_25',
             overrides={'finetune_steps': 100}),
        int8)
  elif arg == 'sparse':
    config.title = 'Recipe: train, SparseGPT 2:4 + 100-step fine-tune, RTN int8'
    config.stages = (
        train,
        dict(name='sparsegpt-2of4', mode='prune', config='experiments/configs/prune.py:'
             'sparsegpt_2of4', overrides={'finetune_steps': 100}),
        int8)
  elif arg == 'int4':
    config.title = 'Recipe: train, GPTQ int4 g128'
    config.stages = (
        train,
        dict(name='gptq-int4', mode='quantize',
             config='experiments/configs/quantize.py:gptq_int4_g128', overrides={'kv_cache': ''}))
  else:
    raise ValueError(f'unknown recipe {arg!r} of recipe.py; known: {", ".join(RECIPES)}')
  return config
