"""Shared runtime of every runner (experiments/runners.py): setup, placement on the mesh,
loading a run, evaluating parameters and sampling. `evaluate` and `sample` are the read-only
runners' library functions.
"""

import functools
import hashlib
import logging

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

import sharding
from experiments import checkpoints, data, steps, validate
from experiments import workdir as workdir_lib
from experiments.errors import UserError
from models import Transformer, decode


def setup(config, workdir=None):
  """Data preparation, tokenizer, model and optimizer shared by all modes.

  The tokenizer of a run is its own copy in the workdir when it has one (the cache may have
  been rebuilt since). Process 0 prepares the data and trains the tokenizer first, so hosts
  sharing a data_dir reuse its files; hosts with their own disks build theirs, and every host
  must end up with the same tokenizer.
  """
  tokenizer = None
  for turn in ('first', 'rest'):
    if (jax.process_index() == 0) == (turn == 'first'):
      data.prepare(config.data)
      tokenizer = _run_tokenizer(config, workdir) or data.get_tokenizer(config.data)
    sharding.sync(f'data ready ({turn})')
  sharding.assert_same('the tokenizer', getattr(tokenizer, 'model_proto', b'') +
                       tokenizer.token_bytes.tobytes())
  model = Transformer(steps.model_config(config, tokenizer.vocab_size))
  if model.config.vocab_size < tokenizer.vocab_size:
    raise UserError(f'config.model.vocab_size={model.config.vocab_size} is smaller than the '
                    f'{tokenizer.vocab_size} ids of the tokenizer')
  tx = steps.make_optimizer(config.optimizer, config.num_train_steps, config.get('pruning'),
                            model.config)
  return tokenizer, model, tx


def _run_tokenizer(config, workdir):
  if workdir is None or config.data.tokenizer != 'sentencepiece':
    return None
  path = epath.Path(workdir) / workdir_lib.TOKENIZER
  if not path.exists():
    return None
  tokenizer = data.tokenizers.load_sentencepiece(path, config.data.vocab_size)
  if tokenizer is None:
    logging.warning('the run\'s tokenizer %s is damaged; using the cached one (it must match the '
                    'run\'s signature)', path)
  return tokenizer


def tokenizer_sha256(tokenizer):
  proto = getattr(tokenizer, 'model_proto', None)
  return hashlib.sha256(proto).hexdigest() if proto else None


class Placement:
  """The mesh, the rules, and the jitted steps with their input/output shardings.

  `loss` is the training loss (default: `steps.lm_loss` with the config's z-loss); evaluation
  always measures the model's own language-model loss. `frozen` ({entry: (tree, logical names
  {path: names})}, e.g. a distillation teacher's parameters) is laid out on the mesh by its
  names and handed to every train step (`steps.train_step`'s `frozen`), never trained or saved.
  `extras` ({name: (trailing shape, dtype)}) are fields the training batches carry beyond the
  tokens, e.g. offline teacher logits, laid out by rows like the rest of the batch.
  """

  def __init__(self, config, model, tx, loss=None, frozen=None, extras=None):
    self.extras = extras or {}   # {name: (trailing shape, dtype)} of extra batch fields
    self.mesh = sharding.make_mesh(config.mesh)
    self.rules = sharding.rules_for(config.sharding_rules)
    self.frozen = None if not frozen else {
        k: self._place(tree, sharding.tree_shardings(tree, self.mesh, self.rules, names))
        for k, (tree, names) in frozen.items()}
    frozen_sh = () if self.frozen is None else (jax.tree.map(lambda x: x.sharding, self.frozen),)
    self.model, self.tx = model, tx
    self.loss = loss if loss is not None else steps.lm_loss(model, config.optimizer.z_loss)
    self.init = steps.state_init_fn(model, tx, config.data.seq_len, self.loss)
    self.rng = jax.random.key(config.seed)
    self.abstract = sharding.sharded_abstract(self.init, self.mesh, self.rules, self.rng)
    state_sh = jax.tree.map(lambda x: x.sharding, self.abstract)
    batch_sh, repl = sharding.batch_sharding(self.mesh, self.rules), sharding.replicated(self.mesh)
    # With pipeline stages the step runs the microbatches through them (steps.pipelined).
    step_loss, accum_steps = steps.pipelined(self.loss, config, self.mesh)
    self.schedule = getattr(step_loss, 'schedule', None)
    self.train_step = jax.jit(
        functools.partial(steps.train_step, loss=step_loss, accum_steps=accum_steps,
                          seed=config.seed),
        in_shardings=(state_sh, batch_sh, repl) + frozen_sh, out_shardings=(state_sh, repl),
        donate_argnums=0)
    # Evaluation pipelines too: unpipelined, the scan over stage-split layers would gather them.
    eval_loss = steps.lm_loss(model)
    if self.schedule is not None:
      eval_loss = steps.PipelinedLmLoss(eval_loss, self.schedule)
    self.eval_step = jax.jit(functools.partial(steps.eval_step, loss=eval_loss),
                             in_shardings=(state_sh.params, batch_sh, repl), out_shardings=repl)
    # Trees of other leaf types (quantized weights) run laid out as they were placed.
    self.eval_any = jax.jit(functools.partial(steps.eval_step, loss=steps.lm_loss(model)),
                            out_shardings=repl)
    self.replicated, self._batch_sharding = repl, batch_sh
    self._rows, self._seq_len = config.batch_size, config.data.seq_len

  def compile_train_step(self, vocab_size: int):
    """The train step compiled ahead of time for the config's batch (to inspect, then call)."""
    i32 = jax.ShapeDtypeStruct((self._rows, self._seq_len), jnp.int32,
                               sharding=self._batch_sharding)
    batch = dict(inputs=i32, targets=i32, positions=i32, segment_ids=i32,
                 weights=jax.ShapeDtypeStruct(i32.shape, jnp.float32, sharding=i32.sharding))
    batch.update({name: jax.ShapeDtypeStruct(i32.shape + tuple(shape), dtype,
                                             sharding=i32.sharding)
                  for name, (shape, dtype) in self.extras.items()})
    token_bytes = jax.ShapeDtypeStruct((vocab_size,), jnp.float32, sharding=self.replicated)
    with self.rules_scope():
      return self.train_step.lower(self.abstract, batch, token_bytes, *self.frozen_args).compile()

  @property
  def frozen_args(self) -> tuple:
    """What the train step takes after (state, batch, token_bytes): (frozen,) if any."""
    return () if self.frozen is None else (self.frozen,)

  def place_params(self, params):
    """A parameter tree (host or device arrays) laid out on the mesh like `abstract.params`."""
    problems = checkpoints.layout_differences(params, self.abstract.params)
    if problems:
      raise UserError(f'the parameters do not fit config.model: {"; ".join(problems[:3])}')

    return self._place(params, jax.tree.map(lambda a: a.sharding, self.abstract.params))

  @staticmethod
  def _place(tree, shardings):
    def put(x, s):
      x = np.asarray(jax.device_get(x))
      return jax.make_array_from_callback(x.shape, s, lambda index: x[index])
    return jax.tree.map(put, tree, shardings)

  def batch(self, local_batch):
    """This host's rows -> one global batch laid out over the mesh."""
    return sharding.global_batch(local_batch, self.mesh, self.rules)

  def rules_scope(self):
    return sharding.activation_rules(self.mesh, self.rules)


def evaluate_params(config, params, model, tokenizer, placement: Placement,
                    should_stop=None):
  """Loss over the eval split; None if `should_stop()` turned true before the end."""
  token_bytes = jnp.asarray(tokenizer.token_bytes, jnp.float32)
  batches = data.eval_batches(config.data, tokenizer,
                              batch_size=config.eval_batch_size // jax.process_count(),
                              process_index=jax.process_index(),
                              process_count=jax.process_count(),
                              max_batches=config.eval_batches or None)
  if not batches:
    raise UserError(f'data config: eval_split={config.data.eval_split!r} of '
                    f'{config.data.name!r} holds no text')
  total = None
  plain = jax.tree.structure(params) == jax.tree.structure(placement.abstract.params)
  eval_step = placement.eval_step if plain else placement.eval_any
  with placement.rules_scope():
    for batch in batches:
      if should_stop is not None and should_stop():
        return None
      sums = eval_step(params, placement.batch(batch), token_bytes)
      total = sums if total is None else jax.tree.map(jnp.add, total, sums)
  return steps.summarize_eval(jax.device_get(total))


def sample_texts(config, params, model, tokenizer, prompts, seed: int = 0, strict: bool = False):
  """Continues each prompt text with the sampling settings in `config.sample`.

  A prompt too long for the model keeps its last tokens, or with `strict` is refused.
  """
  s = config.sample
  room = model.config.max_len - s.max_new_tokens
  ids = [[tokenizer.bos_id] + tokenizer.encode(p) for p in prompts]
  if strict and max(map(len, ids)) > room:
    raise UserError(f'the prompt is {max(map(len, ids))} tokens; with '
                    f'sample.max_new_tokens={s.max_new_tokens} the model (max_len='
                    f'{model.config.max_len}) takes at most {room}')
  ids = [i[-room:] for i in ids]
  out = decode.generate(model, params, ids, max_new_tokens=s.max_new_tokens,
                        rng=jax.random.key(seed), temperature=s.temperature,
                        top_k=s.top_k or None, top_p=s.top_p, stop_tokens=(tokenizer.eos_id,),
                        pad_id=tokenizer.pad_id)
  tokens, lengths = jax.device_get((out.tokens, out.lengths))
  return [p + tokenizer.decode(list(t[:n])) for p, t, n in zip(prompts, tokens, lengths)]


def load_params(config, workdir):
  """Model, tokenizer and trained parameters from the latest readable checkpoint in `workdir`
  (with what the run's loss trains besides the model: `steps.served_params` gives the tree the
  model runs, `steps.model_only` the model's own parameters).

  Reads only: the checkpoints are never changed, and a training run may be writing them.
  """
  tokenizer, model, tx = setup(config, workdir)
  loss = steps.training_loss(model, config)   # its own entries (QAT scales) are in the tree
  placement = Placement(config, model, steps.with_loss_state(tx, loss), loss)
  signature = workdir_lib.signature(config, tokenizer_sha256(tokenizer))
  ckpts = checkpoints.Checkpoints(workdir, writer=False)
  restored = ckpts.restore_latest(placement.abstract.params, signature, params_only=True)
  if restored is None:
    raise UserError(f'no readable checkpoint in {workdir}/checkpoints: train first')
  return restored.step, model, tokenizer, restored.state, placement


def load_served(config, workdir):
  """`load_params` with the parameters cut to the model's own tree (`steps.served_params`)."""
  step, model, tokenizer, params, placement = load_params(config, workdir)
  return step, model, tokenizer, steps.served_params(placement.loss, params), placement


def evaluate(config, workdir) -> dict:
  """Evaluates the newest checkpoint of `workdir` on the eval split (read-only)."""
  validate.check(config, workdir, 'eval')
  step, model, tokenizer, params, placement = load_served(config, workdir)
  metrics = evaluate_params(config, params, model, tokenizer, placement)
  if not np.isfinite(metrics['loss']):
    raise UserError(f'the checkpoint at step {step} in {workdir} evaluates to a non-finite loss '
                    f'({metrics["loss"]}): its parameters are broken')
  return dict(step=step, **metrics)


def sample(config, workdir, prompt: str, seed: int = 0) -> str:
  """Continues `prompt` with the newest checkpoint of `workdir` (read-only)."""
  validate.check(config, workdir, 'sample')
  _, model, tokenizer, params, _ = load_served(config, workdir)
  return sample_texts(config, params, model, tokenizer, [prompt], seed, strict=True)[0]
