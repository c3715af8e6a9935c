"""Quantization experiments on a trained run (experiments/quantize.py): one variant or a sweep.

Command (after training the default model into runs/shakespeare):
  python -m experiments.main --mode=quantize --config=experiments/configs/quantize.py:sweep \
      --workdir=runs/quantize_sweep --config.source_workdir=runs/shakespeare
Variants: `rtn_int8`, `rtn_int4_g128`, `gptq_int4_g128`, `awq_int4_g128`, `gptq_int3_g128`,
`smoothquant_w8a8`, `w8a8` (naive per-token W8A8); `sweep` (the README's table: int8, int4 g128
and 3-bit g128 by RTN, GPTQ and AWQ, W8A8 naive and smoothed); `testbed` (the sweep on the
default model with planted outlier features, `config.outliers`). Any list can be given with
--config.variants=rtn:int4:g64,gptq:int4:g64:act (see experiments/quantize.py for the syntax).
The source checkpoint is only read; each variant's parameters are saved under
<workdir>/params/<variant>/.
"""

import ml_collections

from experiments.configs import base, prune

NAMED = {
    'rtn_int8': 'rtn:int8',
    'rtn_int4_g128': 'rtn:int4:g128',
    'gptq_int4_g128': 'gptq:int4:g128',
    'awq_int4_g128': 'awq:int4:g128',
    'rtn_int3_g128': 'rtn:int3:g128',
    'gptq_int3_g128': 'gptq:int3:g128',
    'w8a8': 'rtn:w8a8',
    'smoothquant_w8a8': 'smoothquant:w8a8:a0.5',
    'mixed_int4_g128': 'mixed:int4:g128',
}
SWEEP = ','.join(NAMED.values())


def get_config(arg: str = 'sweep') -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.source_workdir = 'runs/shakespeare'   # a training run: config.json + checkpoints/
  config.hf_path = ''                 # optional: quantize this HF checkpoint (same tokenizer)
  if arg in ('sweep', 'testbed'):
    config.variants = SWEEP
  elif arg in NAMED:
    config.variants = NAMED[arg]
  else:
    raise ValueError(f'unknown variant {arg!r} of quantize.py; known: sweep, testbed, '
                     f'{", ".join(NAMED)}')
  config.include = ''                 # regex over weight paths ('': all but embeddings/head)
  # Validation loss read chunk by chunk through a KV cache of each storage ('' : none), e.g.
  # 'float32,int8': the int8 cache's cost in quality (its bytes are a quarter of float32's).
  config.kv_cache = 'float32,int8' if arg in ('sweep', 'testbed') else ''
  config.kv_chunk = 16                # tokens per chunk
  config.finetune_learning_rate = 3e-4   # ft<N> and qat<N> variants (warmup min(10, N) steps)
  # How ft<N> and qat<N> fine-tunes learn: 'finetune' (cross-entropy) or 'distill' (the KD loss
  # of `kd`, the float source model as the teacher; QAT wraps it).
  config.recover = 'finetune'
  config.kd = base.kd_config()
  config.calibration_batches = 8      # batches of calibration_rows training rows
  config.calibration_rows = 16
  # Each row's timed greedy decode: this many new tokens for one request (0: forward pass
  # only); its tokens/s and the decode program's bytes go into results and reports.
  config.decode_tokens = 32
  config.seed = 0
  config.outliers = prune.outliers(4 if arg == 'testbed' else 0)   # the outlier testbed
  # Where evaluations run. Unset sizes and '' keep the source run's mesh and rules.
  config.mesh = prune.get_config().mesh
  config.sharding_rules = ''
  return config
