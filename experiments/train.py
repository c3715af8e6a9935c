"""The training loop: `train_and_evaluate(config, workdir)`.

Reads top to bottom: checks, the workdir's lock, data, model and state, resume, then the loop
(step, log, checkpoint, evaluate). Everything is importable, so a Colab can call these
functions directly and gets the same run as the command line. It is the one loop: runs derived
from another model (a pruned model's fine-tune, `experiments/finetune.py`) pass their starting
parameters, an optimizer wrapper (frozen masks) and a loss factory in, and the step
(`steps.train_step`) is compiled once per run.

What protects a run: `validate.check` rejects bad input before anything is written; the
workdir lock keeps a second run out; a resume must match the run's signature
(`workdir.signature`) and state layout; damaged checkpoints are set aside, not deleted
(`checkpoints.Checkpoints`); non-finite steps are never applied or saved (`steps.train_step`,
`metrics.StepMonitor`); SIGTERM and SIGINT checkpoint and stop; every exit waits for the
checkpoint being written.
"""

import functools
import logging
import signal
import threading

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

import sharding
from compression import qat
from experiments import checkpoints, data, memory, metrics as metrics_lib, steps, validate
from experiments import workdir as workdir_lib
from experiments.errors import UserError
from experiments.metrics import MetricWriter, Progress, StepMonitor
from experiments.runtime import (Placement, evaluate_params, sample_texts, setup,
                                 tokenizer_sha256)
from models import flops, moe


class StopRequest:
  """SIGTERM (preemption) or SIGINT (Ctrl-C) asks the loop to checkpoint and return cleanly.

  A second Ctrl-C interrupts at once (the checkpoint being written is still waited for).
  """

  def __init__(self):
    self.requested = False
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():   # signals reach only that one
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    if self.requested and signum == signal.SIGINT:
      raise KeyboardInterrupt
    logging.warning('%s received: saving a checkpoint and stopping (the run resumes from it)',
                    signal.Signals(signum).name)
    self.requested = True

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def _start_state(ckpts, placement: Placement, signature, params_from, params):
  """(step, state, data position): the newest checkpoint, or a fresh state (with the parameters
  of `params_from`, a checkpoint folder, or `params`, a parameter tree, when given)."""
  restored = ckpts.restore_latest(placement.abstract, signature)
  if restored is not None:
    logging.info('resumed from the checkpoint at step %d', restored.step)
    return restored.step, restored.state, restored.data
  given = params_from is not None or params is not None
  if workdir_lib.damaged_steps(ckpts.directory.parent) and not given:
    raise workdir_lib.all_damaged(ckpts.directory.parent)   # never quietly start over
  if not given:
    return 0, sharding.create_sharded(placement.init, placement.mesh, placement.rules,
                                      placement.rng), None
  abstract = placement.abstract.params
  add = getattr(placement.loss, 'init_params', None)
  if params_from is not None:   # a float run's parameters; the loss's own entries start anew
    params = checkpoints.restore_params(params_from, steps.model_only(abstract))
    if add is not None:
      params = jax.jit(add, out_shardings=jax.tree.map(lambda x: x.sharding, abstract))(params)
  else:
    params = placement.place_params(add(params) if add is not None else params)
  state_sh = jax.tree.map(lambda x: x.sharding, placement.abstract)
  create = jax.jit(lambda p: steps.TrainState.create(apply_fn=placement.model.apply, params=p,
                                                     tx=placement.tx), out_shardings=state_sh)
  logging.info('new run from the parameters of %s', params_from or 'the caller')
  return 0, create(params), None


def _set_aside_previous_run(workdir, resume: str):
  """For --resume=new/params: archives the workdir's run; returns the checkpoint to take
  parameters from (params) or None."""
  if resume == 'auto':
    return None
  present = any((workdir / name).exists() for name in workdir_lib.RUN_FILES)
  source = None
  if present:
    if jax.process_index() == 0:
      workdir_lib.archive(workdir)
    sharding.sync('previous run archived')
    archived = sorted((p for p in (workdir / 'archive').iterdir() if p.name.isdigit()),
                      key=lambda p: int(p.name))[-1]
    if resume == 'params':
      steps_there = workdir_lib.checkpoint_steps(archived)
      source = archived / 'checkpoints' / str(steps_there[-1]) if steps_there else None
  if resume == 'params' and source is None:
    raise UserError(f'--resume=params found no checkpoint in {workdir}')
  return source


def train_and_evaluate(config, workdir, resume: str = 'auto', *, params=None,
                       wrap_optimizer=None, make_loss=None, frozen=None,
                       batch_extras=None) -> dict:
  """Trains `config` in `workdir`, resuming from its latest checkpoint; returns final eval metrics.

  `resume`: 'auto' continues the workdir's run and refuses one of another configuration;
  'new' archives that run (workdir/archive/<n>/) and starts over; 'params' archives it and
  starts a new run (step 0, fresh optimizer) from its newest parameters. Raises `UserError`
  (one line) for bad input, a busy workdir or a run that stopped on non-finite values.

  Runs derived from another model (a pruned one's fine-tune, later quantized or distilled ones)
  go through this same loop, changed only by what is passed in:
    params: a parameter tree of `config.model`'s shapes that a new run starts from (step 0,
      fresh optimizer state); a workdir that holds a checkpoint resumes from it instead.
    wrap_optimizer: `tx -> tx` around the config's optimizer, e.g. frozen pruning masks
      (`compression.schedules.frozen`).
    make_loss: `model -> loss` (see `steps.LmLoss`); default `steps.lm_loss(model, z_loss)`.
    frozen: {entry: (tree, logical names)} the loss reads beside the parameters, untrained and
      unsaved, e.g. `{compression.distill.TEACHER: (teacher params, names)}` (`Placement`).
    batch_extras: fields added to each training batch, `batch_extras(step, batch) -> {name:
      host array [rows, seq_len, ...]}` for the 0-based step the batch trains, with
      `batch_extras.fields() -> {name: (trailing shape, dtype)}`; e.g. offline teacher logits
      (`experiments.teacher_logits.Reader`).
  With `config.qat.bits` > 0 the loss is quantization-aware (`steps.qat_loss` around it) and
  evaluation and samples run the fake-quantized model, the one `compression.qat.convert` serves;
  with `config.low_precision.format` set its matmuls run on int8 or fp8 (`steps.training_loss`).
  """
  workdir = epath.Path(workdir)
  if params is not None and resume == 'params':
    raise ValueError('give either params or resume=\'params\', not both')
  validate.check(config, workdir, 'train', resume)
  with StopRequest() as stop, workdir_lib.claim(workdir):
    params_from = _set_aside_previous_run(workdir, resume)
    tokenizer, model, tx = setup(config, workdir)
    spec = steps.qat_spec(config)
    if wrap_optimizer is not None and spec is not None and spec.ranges == 'learned':
      # The wrapper (frozen masks) is written for the model's tree; the scales bypass it.
      plain = steps.make_optimizer(config.optimizer, config.num_train_steps)
      tx = qat.split_optimizer(wrap_optimizer(tx), plain)
    elif wrap_optimizer is not None:
      tx = wrap_optimizer(tx)
    loss = steps.training_loss(model, config, make_loss(model) if make_loss else None)
    tx = steps.with_loss_state(tx, loss)
    signature = workdir_lib.signature(config, tokenizer_sha256(tokenizer))
    saved = workdir_lib.saved_signature(workdir)
    if saved is not None and workdir_lib.checkpoint_steps(workdir):
      changed = workdir_lib.signature_mismatch(saved, signature)
      if changed:   # only the tokenizer can differ here: validation compared the rest
        raise UserError(f'--workdir={workdir}: {changed[0]}; the run was trained with another '
                        f'tokenizer (restore {workdir_lib.TOKENIZER} in the workdir)')
    ckpts = checkpoints.Checkpoints(workdir, config.keep_checkpoints)
    failed = True
    try:
      placement = Placement(config, model, tx, loss, frozen,
                            batch_extras.fields() if batch_extras else None)
      start = _start_state(ckpts, placement, signature, params_from, params)
      result = _train(config, workdir, stop, tokenizer, placement, signature, ckpts, start,
                      batch_extras)
      failed = False
    finally:   # every exit path, an exception included, finishes the write in flight
      ckpts.wait(raise_errors=not failed)
      ckpts.close()
    return result


def _train(config, workdir, stop, tokenizer, placement, signature, ckpts, start,
           batch_extras=None) -> dict:
  lead = jax.process_index() == 0   # the one process that writes files
  model = placement.model
  step, state, data_state = start
  if lead:
    workdir_lib.record_config(workdir, config, step)
  total = config.num_train_steps
  per_host = config.batch_size // jax.process_count()
  train_iter = data.train_iterator(config.data, tokenizer, batch_size=per_host, seed=config.seed,
                                   process_index=jax.process_index(),
                                   process_count=jax.process_count())
  position = None if data_state is None else checkpoints.iterator_json(data_state)
  if position is not None:
    train_iter.set_state(data.iterator_state_from_json(position))
  token_bytes = jax.device_put(jnp.asarray(tokenizer.token_bytes, jnp.float32),
                               placement.replicated)
  writer = MetricWriter(workdir, resume_step=step)
  flops_per_token = flops.train_flops_per_token(model.config, config.data.seq_len)
  progress = Progress(total, step, flops_per_token, flops.device_peak_flops())
  monitor = StepMonitor(config, writer, progress, functools.partial(_scalars, config))
  monitor.last_checkpoint = step or None
  active = (f' ({flops.matmul_params(model.config):,} matmul weights active per token)'
            if model.config.n_experts else '')
  logging.info('model: %s parameters%s, %.3g training FLOPs per token',
               f'{flops.param_count(state.params):,}', active, flops_per_token)

  recorded = []
  model_params = getattr(placement.loss, 'model_params', None)   # QAT: fake-quantized
  served = jax.jit(model_params) if model_params is not None else lambda p: p

  def save():
    if lead and not recorded:   # binds the workdir to this run from its first checkpoint on
      _record_run(workdir, signature, tokenizer)
      recorded.append(True)
    position = data.iterator_state_to_json(train_iter.get_state())
    ckpts.save(step, state, checkpoints.data_state(position, signature))
    monitor.last_checkpoint = step

  def evaluate():
    params = served(state.params)
    result = _evaluate_and_sample(config, params, model, tokenizer, writer, step, placement,
                                  should_stop=lambda: stop.requested)
    monitor.restart_clock()
    return result

  evaluated = {r['step']: r for r in metrics_lib.records(workdir) if 'eval_loss' in r}
  eval_metrics = ({k[len('eval_'):]: v for k, v in evaluated[step].items() if k != 'step'}
                  if step in evaluated else {})
  if step and step not in evaluated and (step % config.eval_every == 0 or step == total):
    eval_metrics = evaluate() or {}   # the run stopped during this evaluation last time
  if step == total:
    logging.info('the run is complete (step %d of %d); raise num_train_steps to train on', step,
                 total)
  train_step = _compile_and_report(config, model, placement, tokenizer.vocab_size) if (
      step < total) else None
  try:
    while step < total and not stop.requested:
      batch = next(train_iter)
      if batch_extras is not None:
        batch = dict(batch, **batch_extras(step, batch))
      batch = placement.batch(batch)
      with placement.rules_scope():
        state, metrics = train_step(state, batch, token_bytes, *placement.frozen_args)
      step += 1
      monitor.push(step, metrics)
      checkpoint_now = step % config.checkpoint_every == 0 or step == total
      eval_now = step % config.eval_every == 0 or step == total
      if not (checkpoint_now or eval_now or stop.requested):
        continue
      host_metrics = monitor.flush(log=stop.requested)
      if step == total or stop.requested:
        metrics_lib.report_expert_load(host_metrics, writer, step)
      if monitor.streak:
        logging.warning('no checkpoint or evaluation at step %d: its update was skipped', step)
        continue
      if checkpoint_now or stop.requested:
        save()
      if eval_now and not stop.requested:
        eval_metrics = evaluate() or eval_metrics
    monitor.flush(log=stop.requested)
    if stop.requested and monitor.last_checkpoint != step and not monitor.streak:
      save()   # the stop arrived during an evaluation or between two checks
  finally:
    writer.close()
  return eval_metrics


def _record_run(workdir, signature, tokenizer) -> None:
  """The run's signature and own tokenizer copy, written with its first checkpoint."""
  workdir_lib.write_json(workdir / workdir_lib.SIGNATURE, signature)
  proto = getattr(tokenizer, 'model_proto', None)
  copy = workdir / workdir_lib.TOKENIZER
  if proto and not copy.exists():
    tmp = workdir / f'.{workdir_lib.TOKENIZER}.tmp'
    tmp.write_bytes(proto)
    tmp.replace(copy)


_STEP_METRICS = ('loss', 'bits_per_byte', 'grad_norm', 'z_loss', 'tokens', 'finite')


def _scalars(config, step: int, m) -> dict:
  """A log line's scalars from one step's host metrics (an injected loss's own terms too)."""
  lr = steps.learning_rate_schedule(config.optimizer, config.num_train_steps)(step - 1)
  out = dict(train_loss=m['loss'], train_bits_per_byte=m['bits_per_byte'],
             grad_norm=m['grad_norm'])
  if 'z_loss' in m:
    out['z_loss'] = m['z_loss']
  out.update(learning_rate=lr, **metrics_lib.moe_scalars(m))
  out.update({k: v for k, v in m.items()
              if k not in _STEP_METRICS + moe.METRICS and np.ndim(v) == 0})
  return out


def _compile_and_report(config, model, placement: Placement, vocab_size: int):
  """Compiles the train step, logging the memory estimate next to XLA's figure for it."""
  est = memory.estimate(config, model, placement.abstract, placement.mesh, placement.rules)
  logging.info(est.summary(model.config.remat))
  logging.info(memory.cost_summary(est))
  capacity = memory.device_capacity()
  if capacity and est.total > capacity:
    logging.warning('the estimate (%s per device) exceeds the device memory (%s): use remat, '
                    'more fsdp shards or gradient accumulation', memory.human_bytes(est.total),
                    memory.human_bytes(capacity))
  compiled = placement.compile_train_step(vocab_size)
  actual = memory.compiled_bytes(compiled)
  if actual:
    logging.info('memory per device (compiled step): %s; estimate/compiled %.2f',
                 memory.human_bytes(actual), est.total / actual)
  return compiled


def _evaluate_and_sample(config, params, model, tokenizer, writer, step, placement,
                         should_stop=None):
  metrics = evaluate_params(config, params, model, tokenizer, placement, should_stop)
  if metrics is None:
    logging.warning('evaluation at step %d interrupted; it runs again on resume', step)
    return None
  writer.write(step, {f'eval_{k}': v for k, v in metrics.items()})
  if not np.isfinite(metrics['loss']):
    logging.warning('eval at step %d: the loss is not finite (%s)', step, metrics['loss'])
  logging.info('eval at step %d: loss %.4f, %.4f nats/byte, %.4f bits/byte, perplexity %.2f',
               step, metrics['loss'], metrics['nats_per_byte'], metrics['bits_per_byte'],
               metrics['perplexity'])
  if config.sample.num_prompts:
    prompts = data.eval_texts(config.data, config.sample.num_prompts)
    prompts = [p[:config.sample.prompt_chars] for p in prompts]
    for i, text in enumerate(sample_texts(config, params, model, tokenizer, prompts, seed=step)):
      logging.info('sample %d at step %d:\n%s', i, step, text)
      writer.write_text(step, f'sample_{i}', text)
  return metrics


