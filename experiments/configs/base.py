"""Defaults shared by every experiment config; each config file overrides what it changes."""

import dataclasses

import ml_collections
from ml_collections import config_dict

from experiments import data
import sharding
from models.config import ModelConfig


def base_config() -> ml_collections.ConfigDict:
  """Every field a config may set, with general defaults (config files override them)."""
  config = ml_collections.ConfigDict()
  config.seed = 0                      # parameter init, data order and sampling
  config.num_train_steps = 2000        # optimizer steps
  config.batch_size = 32               # global batch in rows of data.seq_len tokens
  config.grad_accum_steps = 1          # microbatches per step (batch_size must divide evenly)
  config.eval_batch_size = 32          # rows per evaluation batch
  config.eval_batches = 0              # 0: the whole validation split
  config.log_every = 50                # steps between progress lines / metric writes
  config.eval_every = 500              # steps between evaluations (and at the end)
  config.checkpoint_every = 500        # steps between checkpoints (and at the end / SIGTERM)
  config.keep_checkpoints = 2          # newest checkpoints kept (older ones go only once a newer
                                       # one has committed)
  config.nonfinite = 'skip'            # a step with a non-finite loss or gradient is not applied;
                                       # 'skip' goes on, 'stop' ends the run there (exit 1)
  config.max_nonfinite_steps = 10      # consecutive skipped steps after which the run stops

  config.mesh = sharding.default_mesh_config()   # device mesh axes (fields in sharding/mesh.py)
  config.sharding_rules = 'dp'         # preset in sharding/rules.py: dp, fsdp, tp, fsdp_tp, ep
  # Pipeline parallelism (sharding/pipeline.py), on when mesh.stage > 1: the scanned layers split
  # into stages, the grad_accum_steps microbatches flow through them.
  config.pipeline = ml_collections.ConfigDict()
  config.pipeline.schedule = 'gpipe'   # 'gpipe' or 'circular' (interleaved layer chunks)
  config.pipeline.repeats = 2          # circular: layer chunks per stage (bubble / repeats)

  config.data = data.default_config()   # fields documented in experiments/data/__init__.py

  # Every models.ModelConfig field (documented there) may be set or overridden from the command
  # line; the vocabulary size comes from the tokenizer. Optional ints are typed placeholders.
  config.model = model_defaults()
  config.model.d_model = 256
  config.model.n_layers = 4
  config.model.n_heads = 4
  config.model.d_ff = 768
  config.model.tie_embeddings = True

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.learning_rate = 2e-3
  config.optimizer.warmup_steps = 100
  config.optimizer.schedule = 'cosine'   # 'cosine' or 'linear' decay after warmup
  config.optimizer.end_lr_factor = 0.1   # final learning rate as a fraction of the peak
  config.optimizer.b1 = 0.9
  config.optimizer.b2 = 0.95
  config.optimizer.eps = 1e-8
  config.optimizer.weight_decay = 0.1    # on kernels only (not norms, biases, embeddings)
  config.optimizer.grad_clip = 1.0       # global-norm clipping
  config.optimizer.z_loss = 0.0          # weight of the log-partition penalty

  # Gradual magnitude pruning during training (compression/schedules.py): sparsity ramps
  # cubically from 0 at start_step to final_sparsity at end_step; pruned weights stay exactly 0.
  config.pruning = ml_collections.ConfigDict()
  config.pruning.final_sparsity = 0.0    # 0: off
  config.pruning.start_step = 0
  config.pruning.end_step = 0            # 0: num_train_steps
  config.pruning.every = 10              # steps between mask updates on the ramp
  config.pruning.include = ''            # regex over weight paths ('' : all but embeddings/head)

  # Quantization-aware training (compression/qat.py): the loss sees the selected kernels rounded
  # to their integer grid (straight-through gradients); compression.qat.convert makes the
  # trained weights integers on that same grid. Evaluation runs the fake-quantized model.
  config.qat = ml_collections.ConfigDict()
  config.qat.bits = 0                    # 0: off; else 2, 3, 4 or 8
  config.qat.group_size = 0              # inputs per scale: k > 0, 0 per output channel, -1 per
                                         # tensor
  config.qat.symmetric = True            # False: asymmetric grids with integer zero points
  config.qat.ranges = 'minmax'           # 'minmax' (fitted to the weights every step) or 'learned'
                                         # (LSQ scales, trained; start from min-max)
  config.qat.clip = 1.0                  # fraction of the min-max range kept (outliers clipped)
  config.qat.act_bits = 0                # 8: int8 inputs per token too (W8A8; with bits=4
                                         # W4A8, torchao's 8da4w)
  config.qat.include = ''                # regex over weight paths ('' : all but embeddings/head/
                                         # routers)

  # Low-precision training matmuls (compression/low_precision.py): the selected kernels' forward
  # (and gradient) dots run on int8 (dynamic per-row/channel scales, AQT-style) or fp8 (e4m3
  # forward, e5m2 gradients, per-tensor scales); parameters and optimizer stay float32.
  config.low_precision = ml_collections.ConfigDict()
  config.low_precision.format = ''       # '': off; 'int8' or 'fp8'
  config.low_precision.backward = True   # the two gradient dots too (False: float32 gradients)
  config.low_precision.scaling = 'current'   # fp8: 'current' (each tensor's max) or 'delayed'
                                         # (max of the last `history` steps' maxima)
  config.low_precision.history = 16      # delayed scaling's amax history, in steps
  config.low_precision.include = ''      # regex over weight paths ('' : all but embeddings/head/
                                         # routers)

  # Early-exit training (compression/early_exit.py): these layers' outputs, read through the
  # final norm and head, get their own next-token loss, so decoding may stop there when
  # confident (models/early_exit.py).
  config.early_exit = ml_collections.ConfigDict()
  config.early_exit.layers = ''          # '': off; e.g. '0,1,2' (exits after those layers)
  config.early_exit.weight = 1.0         # total += weight * the exits' mean cross-entropy

  config.sample = ml_collections.ConfigDict()
  config.sample.num_prompts = 2          # held-out openings continued at each evaluation
  config.sample.prompt_chars = 64        # characters of each opening used as the prompt
  config.sample.max_new_tokens = 200
  config.sample.temperature = 0.8
  config.sample.top_k = 0                # 0: off
  config.sample.top_p = 0.95
  return config


def kd_config() -> ml_collections.ConfigDict:
  """The knowledge-distillation loss (compression/distill.py): per token
  alpha * T^2 * divergence(teacher, student) + (1 - alpha) * cross-entropy."""
  kd = ml_collections.ConfigDict()
  kd.alpha = 0.5                 # weight of the divergence, in [0, 1]
  kd.temperature = 1.0           # > 0
  kd.divergence = 'forward_kl'   # forward_kl | reverse_kl | jsd
  kd.beta = 0.5                  # jsd's weight of the teacher, in (0, 1)
  kd.top_k = 0                   # > 0: the teacher's k most likely tokens only; 0: all
  # Linear schedules from alpha / temperature at step 0 to these (unset: constant), reached at
  # schedule_steps (0: the run's last step).
  kd.alpha_end = config_dict.placeholder(float)
  kd.temperature_end = config_dict.placeholder(float)
  kd.schedule_steps = 0
  return kd


def model_defaults() -> ml_collections.ConfigDict:
  """`ModelConfig`'s fields and defaults (but the vocabulary) as a ConfigDict."""
  model = ml_collections.ConfigDict()
  for field in dataclasses.fields(ModelConfig):
    if field.name != 'vocab_size':
      value = field.default
      model[field.name] = config_dict.placeholder(int) if value is None else value
  return model


def pretraining_config() -> ml_collections.ConfigDict:
  """Accelerator pretraining on C4 with a SentencePiece vocabulary (gpt2.py, llama.py)."""
  config = base_config()
  config.num_train_steps = 20_000
  config.batch_size = 64
  config.log_every = 100
  config.eval_every = 2000
  config.checkpoint_every = 1000
  config.eval_batches = 50             # C4's validation split is large: a fixed sample of it
  config.data.name = 'c4/en'
  config.data.tokenizer = 'sentencepiece'
  config.data.shuffle_window = 4096
  return config
