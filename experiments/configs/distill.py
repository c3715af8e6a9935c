"""Distillation experiments on a trained teacher run (experiments/distill.py): students trained
from scratch, by knowledge distillation, or initialised from the teacher, at equal steps.

Command (after training the teacher: `python -m experiments.main
--config=experiments/configs/shakespeare.py:teacher --workdir=runs/teacher`):
  python -m experiments.main --mode=distill --config=experiments/configs/distill.py:half \
      --workdir=runs/distill --config.source_workdir=runs/teacher
Variants: `half` (a half-depth student: from scratch with cross-entropy, by logit KD, by logit
and hidden-state KD, and initialised from every other teacher layer then KD), `minitron` (the teacher's FFN neurons
pruned 50%: KD vs plain fine-tune, and the same shape from scratch). Any list can be given with
--config.variants=L3:scratch:kd:t2 (see experiments/distill.py for the syntax). The teacher's
files are only read; each student trains in <workdir>/students/<variant>/.
"""

import ml_collections

from experiments.configs import base, prune

NAMED = {
    'half': 'scratch:ce,scratch:kd,scratch:kd:feat,every2:kd',
    'minitron': 'ffn50:ce,ffn50:kd,ffn50:scratch:ce',
}


def get_config(arg: str = 'half') -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.source_workdir = 'runs/teacher'   # the teacher: a training run (config.json, checkpoints)
  # Or a Hugging Face checkpoint as the teacher, on the source run's data and tokenizer (its
  # vocabulary must hold the tokenizer's ids; a tokenizer.model beside it must be the run's).
  config.hf_path = ''
  # The teacher as the students see it: '' as trained, or a variant `--mode=quantize` saved from
  # that run (its <workdir>/params/<variant> folder); its float weights and computation in
  # `teacher_dtype` ('' as trained, 'bfloat16', 'float16', 'float32'). Students that start from
  # the teacher's weights (every<k>, ffn<p>) always take the trained ones.
  config.teacher_quantized = ''
  config.teacher_dtype = ''
  if arg not in NAMED:
    raise ValueError(f'unknown variant {arg!r} of distill.py; known: {", ".join(NAMED)}')
  config.variants = NAMED[arg]
  # Every student trains this many steps on the teacher run's data, at this peak rate (linear
  # warmup, then the teacher run's decay), with data order `seed`.
  config.num_steps = 450
  config.learning_rate = 2e-3
  config.warmup_steps = 50
  config.seed = 0
  config.kd = base.kd_config()   # the KD loss of kd variants (rkl, jsd, t<T>, a<alpha> override it)
  # Hidden-state transfer of `feat` variants: 'i:j,...' pairs (student layer i <- teacher layer
  # j; '': layer i <- (i + 1) * depth ratio - 1), each pair's relative squared error weighted so.
  config.features = ''
  config.feature_weight = 1.0
  # Attention-map transfer of `attn` variants: pairs as `features` ('': the same default),
  # each pair's KL(teacher || student) over every query's keys, averaged over heads, weighted so.
  config.attention = ''
  config.attention_weight = 1.0
  # Sequence-level KD of `seq` variants: the teacher continues `num_prompts` windows of
  # `prompt_tokens` training tokens by up to `new_tokens` sampled tokens (temperature, top_k
  # 0 = all), `batch_size` prompts per generate call; the students' rows then come from these
  # generations with probability `weight`, else from the original data. The generations are
  # seeded by `seed` (prompts and sampling), not by the students' seed, and live in `data_dir`
  # ('': <workdir>/generations/seed<seed>; another run's folder shares them).
  config.seqkd = ml_collections.ConfigDict()
  config.seqkd.num_prompts = 2048
  config.seqkd.prompt_tokens = 32
  config.seqkd.new_tokens = 224
  config.seqkd.temperature = 1.0
  config.seqkd.top_k = 0
  config.seqkd.batch_size = 64
  config.seqkd.weight = 0.5
  config.seqkd.seed = 0
  config.seqkd.data_dir = ''
  # Each row's timed greedy decode: this many new tokens for one request (0: forward pass
  # only); its tokens/s and the decode program's bytes go into results and reports.
  config.decode_tokens = 32
  # What the shared source checks read (unused by distillation itself).
  config.calibration_batches = 1
  config.calibration_rows = 8
  config.outliers = prune.outliers(0)
  # Where students train. Unset sizes and '' keep the teacher run's mesh and rules.
  config.mesh = prune.get_config().mesh
  config.sharding_rules = ''
  return config
