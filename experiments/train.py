"""The training loop: `train_and_evaluate(config, workdir)`, plus `evaluate` and `sample`.

Reads top to bottom: data, model and state, resume, then the loop (step, log, evaluate,
checkpoint). Everything is importable, so a Colab can call these functions directly.
"""

import functools
import logging
import signal
import time

import jax
import jax.numpy as jnp
from etils import epath

import sharding
from experiments import checkpoints, data, flops, memory, steps
from experiments.metrics import MetricWriter, Progress
from models import Transformer, decode


class _StopFlag:
  """Set by SIGTERM (preemption): the loop then checkpoints and returns cleanly."""

  def __init__(self):
    self.stop = False
    self._previous = None

  def __enter__(self):
    self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    logging.warning('SIGTERM received: saving a checkpoint and stopping')
    self.stop = True

  def __exit__(self, *exc):
    signal.signal(signal.SIGTERM, self._previous)


def setup(config):
  """Data preparation, tokenizer, model and optimizer shared by all modes.

  Process 0 prepares the data and trains the tokenizer first, so hosts sharing a data_dir reuse
  its files; hosts with their own disks build theirs, and every host must end up with the same
  tokenizer.
  """
  tokenizer = None
  for turn in ('first', 'rest'):
    if (jax.process_index() == 0) == (turn == 'first'):
      data.prepare(config.data)
      tokenizer = data.get_tokenizer(config.data)
    sharding.sync(f'data ready ({turn})')
  sharding.assert_same('the tokenizer', getattr(tokenizer, 'model_proto', b'') +
                       tokenizer.token_bytes.tobytes())
  model = Transformer(steps.model_config(config, tokenizer.vocab_size))
  tx = steps.make_optimizer(config.optimizer, config.num_train_steps, config.get('pruning'))
  return tokenizer, model, tx


class Placement:
  """The mesh, the rules, and the jitted steps with their input/output shardings."""

  def __init__(self, config, model, tx):
    self.mesh = sharding.make_mesh(config.mesh)
    self.rules = sharding.rules_for(config.sharding_rules)
    self.init = steps.state_init_fn(model, tx, config.data.seq_len)
    self.rng = jax.random.key(config.seed)
    self.abstract = sharding.sharded_abstract(self.init, self.mesh, self.rules, self.rng)
    state_sh = jax.tree.map(lambda x: x.sharding, self.abstract)
    batch_sh, repl = sharding.batch_sharding(self.mesh, self.rules), sharding.replicated(self.mesh)
    self.train_step = jax.jit(
        functools.partial(steps.train_step, model=model, accum_steps=config.grad_accum_steps,
                          z_loss=config.optimizer.z_loss, seed=config.seed),
        in_shardings=(state_sh, batch_sh, repl), out_shardings=(state_sh, repl), donate_argnums=0)
    self.eval_step = jax.jit(functools.partial(steps.eval_step, model=model),
                             in_shardings=(state_sh.params, batch_sh, repl), out_shardings=repl)
    self.replicated, self._batch_sharding = repl, batch_sh
    self._rows, self._seq_len = config.batch_size, config.data.seq_len

  def compile_train_step(self, vocab_size: int):
    """The train step compiled ahead of time for the config's batch (to inspect, then call)."""
    i32 = jax.ShapeDtypeStruct((self._rows, self._seq_len), jnp.int32,
                               sharding=self._batch_sharding)
    batch = dict(inputs=i32, targets=i32, positions=i32, segment_ids=i32,
                 weights=jax.ShapeDtypeStruct(i32.shape, jnp.float32, sharding=i32.sharding))
    token_bytes = jax.ShapeDtypeStruct((vocab_size,), jnp.float32, sharding=self.replicated)
    with self.rules_scope():
      return self.train_step.lower(self.abstract, batch, token_bytes).compile()

  def batch(self, local_batch):
    """This host's rows -> one global batch laid out over the mesh."""
    return sharding.global_batch(local_batch, self.mesh, self.rules)

  def rules_scope(self):
    return sharding.activation_rules(self.mesh, self.rules)


def _restore_or_init(mngr, placement: Placement):
  """The newest readable checkpoint, restored straight into the mesh layout, or a fresh state."""
  restored = checkpoints.restore_latest(mngr, placement.abstract)
  if restored is None:
    state = sharding.create_sharded(placement.init, placement.mesh, placement.rules,
                                    placement.rng)
    return 0, state, None
  step, state, data_state = restored
  logging.info('resumed from the checkpoint at step %d', step)
  return step, state, data_state


def evaluate_params(config, params, model, tokenizer, placement: Placement) -> dict:
  token_bytes = jnp.asarray(tokenizer.token_bytes, jnp.float32)
  batches = data.eval_batches(config.data, tokenizer,
                              batch_size=config.eval_batch_size // jax.process_count(),
                              process_index=jax.process_index(),
                              process_count=jax.process_count(),
                              max_batches=config.eval_batches or None)
  if not batches:
    raise ValueError(f'the eval split {config.data.eval_split!r} of {config.data.name!r} is empty')
  total = None
  with placement.rules_scope():
    for batch in batches:
      sums = placement.eval_step(params, placement.batch(batch), token_bytes)
      total = sums if total is None else jax.tree.map(jnp.add, total, sums)
  return steps.summarize_eval(jax.device_get(total))


def sample_texts(config, params, model, tokenizer, prompts, seed: int = 0):
  """Continues each prompt text with the sampling settings in `config.sample`."""
  s = config.sample
  ids = [[tokenizer.bos_id] + tokenizer.encode(p) for p in prompts]
  out = decode.generate(model, params, ids, max_new_tokens=s.max_new_tokens,
                        rng=jax.random.key(seed), temperature=s.temperature,
                        top_k=s.top_k or None, top_p=s.top_p, stop_tokens=(tokenizer.eos_id,),
                        pad_id=tokenizer.pad_id)
  tokens, lengths = jax.device_get((out.tokens, out.lengths))
  return [p + tokenizer.decode(list(t[:n])) for p, t, n in zip(prompts, tokens, lengths)]


def train_and_evaluate(config, workdir) -> dict:
  """Trains `config` in `workdir`, resuming from its latest checkpoint; returns final eval metrics."""
  workdir = epath.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  tokenizer, model, tx = setup(config)
  mngr = checkpoints.manager(workdir, config.keep_checkpoints)
  placement = Placement(config, model, tx)
  step, state, data_state = _restore_or_init(mngr, placement)

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
  progress = Progress(config.num_train_steps, step, flops_per_token, flops.device_peak_flops())
  active = (f' ({flops.matmul_params(model.config):,} matmul weights active per token)'
            if model.config.n_experts else '')
  logging.info('model: %s parameters%s, %.3g training FLOPs per token',
               f'{flops.param_count(state.params):,}', active, flops_per_token)
  train_step = _compile_and_report(config, model, placement, tokenizer.vocab_size)

  eval_metrics = {}
  t_last, steps_since = time.perf_counter(), 0
  tokens_per_step = config.batch_size * config.data.seq_len
  with _StopFlag() as flag:
    while step < config.num_train_steps and not flag.stop:
      batch = placement.batch(next(train_iter))
      with placement.rules_scope():
        state, metrics = train_step(state, batch, token_bytes)
      step += 1
      steps_since += 1
      if step % config.log_every == 0 or step == config.num_train_steps:
        metrics = jax.device_get(metrics)
        now = time.perf_counter()
        tokens_per_s = steps_since * tokens_per_step / (now - t_last)
        t_last, steps_since = now, 0
        writer.write(step, dict(train_loss=metrics['loss'], train_bits_per_byte=metrics[
            'bits_per_byte'], grad_norm=metrics['grad_norm'], z_loss=metrics['z_loss'],
            learning_rate=steps.learning_rate_schedule(config.optimizer,
                                                       config.num_train_steps)(step - 1),
            tokens_per_second=tokens_per_s, **_moe_scalars(metrics)))
        logging.info(progress.line(step, float(metrics['loss']), tokens_per_s))
        if 'expert_load' in metrics and (step == config.num_train_steps or flag.stop):
          report = expert_load_report(metrics['expert_load_per_layer'])
          logging.info('expert load at step %d (share of routed tokens):\n%s', step, report)
          writer.write_text(step, 'expert_load', report)
      if step % config.eval_every == 0 or step == config.num_train_steps:
        eval_metrics = _evaluate_and_sample(config, state.params, model, tokenizer, writer, step,
                                            placement)
        t_last = time.perf_counter()
      if step % config.checkpoint_every == 0 or step == config.num_train_steps or flag.stop:
        position = data.iterator_state_to_json(train_iter.get_state())
        checkpoints.save(mngr, step, state, checkpoints.data_state(position))
  mngr.wait_until_finished()
  writer.close()
  return eval_metrics


def _moe_scalars(metrics) -> dict:
  """Router statistics of an MoE step as scalars ({} for a dense model)."""
  if 'expert_load' not in metrics:
    return {}
  out = dict(moe_aux_loss=metrics['moe_aux_loss'], moe_z_loss=metrics['moe_z_loss'],
             router_entropy=metrics['router_entropy'], dropped_fraction=metrics['dropped'])
  out.update({f'expert_load/{e}': v for e, v in enumerate(metrics['expert_load'])})
  return out


def expert_load_report(load_per_layer) -> str:
  """One line per MoE layer: each expert's share of the routed tokens, with a bar."""
  lines = []
  for layer, load in enumerate(load_per_layer):
    cells = ' '.join(f'{100 * x:5.1f}%' for x in load)
    bars = ''.join(' ▁▂▃▄▅▆▇█'[min(8, int(x * len(load) * 4))] for x in load)
    lines.append(f'layer {layer}: {cells}  {bars}')
  return '\n'.join(lines)


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


def _evaluate_and_sample(config, params, model, tokenizer, writer, step, placement) -> dict:
  metrics = evaluate_params(config, params, model, tokenizer, placement)
  writer.write(step, {f'eval_{k}': v for k, v in metrics.items()})
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


def load_params(config, workdir):
  """Model, tokenizer and trained parameters from the latest readable checkpoint in `workdir`."""
  tokenizer, model, tx = setup(config)
  mngr = checkpoints.manager(workdir, config.keep_checkpoints, async_save=False, read_only=True)
  placement = Placement(config, model, tx)
  restored = checkpoints.restore_latest(mngr, placement.abstract)
  if restored is None:
    raise FileNotFoundError(f'no readable checkpoint in {workdir}/checkpoints: train first')
  step, state, _ = restored
  return step, model, tokenizer, state.params, placement


def evaluate(config, workdir) -> dict:
  step, model, tokenizer, params, placement = load_params(config, workdir)
  metrics = evaluate_params(config, params, model, tokenizer, placement)
  return dict(step=step, **metrics)


def sample(config, workdir, prompt: str, seed: int = 0) -> str:
  _, model, tokenizer, params, _ = load_params(config, workdir)
  return sample_texts(config, params, model, tokenizer, [prompt], seed)[0]
