"""The PyTorch peer — not part of Frugal: the same model and optimizer in transformers + torch.

`python -m experiments.main --mode=compare --config=...` (see `experiments/compare.py`) times
Frugal's train step and this peer's back to back on one machine. The peer is what a PyTorch user
would write: `transformers`' `LlamaForCausalLM` built from the config (random weights, its default
SDPA attention), cross-entropy on the logits, `clip_grad_norm_` and `torch.optim.AdamW` (weight
decay on the matmul kernels only, as Frugal's), eager or under `torch.compile`. torch is a test
dependency, imported only here.
"""

import time

import numpy as np

from models import ModelConfig
from models.hf_architectures import default_architecture

MODES = ('eager', 'compile')


def _model(cfg: ModelConfig, seed: int):
  import torch
  import transformers
  arch = default_architecture(cfg)
  if arch.name != 'LlamaForCausalLM':
    raise ValueError(f'the PyTorch peer is a Llama model; this config is written as {arch.name}')
  torch.manual_seed(seed)
  hf = transformers.LlamaConfig(**arch.config_to_hf(cfg))
  return transformers.LlamaForCausalLM(hf).float().train()


def _optimizer(model, opt):
  import torch
  kernels = [p for n, p in model.named_parameters() if n.endswith('proj.weight')]
  others = [p for n, p in model.named_parameters() if not n.endswith('proj.weight')]
  return torch.optim.AdamW([dict(params=kernels, weight_decay=opt.weight_decay),
                            dict(params=others, weight_decay=0.0)],
                           lr=opt.learning_rate, betas=(opt.b1, opt.b2), eps=opt.eps)


def train_step_timer(cfg: ModelConfig, opt, batch: dict, mode: str, warmup: int = 2):
  """Builds the peer (and compiles it: `warmup` steps); returns `measure(n_steps)`, the median
  seconds per phase of its train step: forward (with the loss), backward, optimizer (clipping
  + AdamW) and their sum `step`. The returned function's `info` holds the compile time, torch's
  version and thread count."""
  import torch
  import torch.nn.functional as F
  if mode not in MODES:
    raise ValueError(f'peer mode {mode!r} is not one of {", ".join(MODES)}')
  model = _model(cfg, seed=0)
  tx = _optimizer(model, opt)
  inputs = torch.from_numpy(np.asarray(batch['inputs'], np.int64))
  targets = torch.from_numpy(np.asarray(batch['targets'], np.int64))

  def loss_fn(x, y):
    logits = model(input_ids=x).logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))

  forward = torch.compile(loss_fn) if mode == 'compile' else loss_fn

  def one_step():
    t0 = time.perf_counter()
    loss = forward(inputs, targets)
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    torch.nn.utils.clip_grad_norm_(model.parameters(), opt.grad_clip)
    tx.step()
    tx.zero_grad(set_to_none=True)
    t3 = time.perf_counter()
    return t1 - t0, t2 - t1, t3 - t2, t3 - t0

  t_start = time.perf_counter()
  for _ in range(warmup):
    one_step()

  def measure(n_steps: int) -> dict:
    times = np.median(np.array([one_step() for _ in range(n_steps)]), axis=0)
    return dict(zip(('forward', 'backward', 'optimizer', 'step'), times))
  measure.info = dict(compile_s=time.perf_counter() - t_start, threads=torch.get_num_threads(),
                      version=torch.__version__)
  return measure
