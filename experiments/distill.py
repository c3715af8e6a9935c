"""Distillation experiments on a trained teacher: `run(config, workdir)` (main.py --mode=distill).

Loads the teacher run (`config.source_workdir`: its config.json and latest checkpoint,
read-only; or, with `config.hf_path`, a Hugging Face checkpoint scoring that run's tokenizer's
ids, the run giving data and tokenizer), evaluates it, then for each variant in `config.variants` makes a student, trains it
`config.num_steps` steps on the teacher run's data and tokenizer through the one training loop
(`experiments/finetune.py`, in <workdir>/students/<variant>/: resumed, or skipped when
complete, when the command runs again), with cross-entropy or the KD loss of
`compression.distill` (the teacher's parameters are the step's frozen input, on the same mesh),
and evaluates it. Writes results.json (one row per variant: `variant`, `nats_per_byte`,
`params`, ...) and results.md.

Variant specs (comma-separated in `config.variants`), ':'-separated tokens:
  L<n>            the student's depth (default: half the teacher's, rounded up)
  ffn<p>          the teacher's FFN neurons pruned by p% (`compression.structural`, l2 norms):
                  the student is the pruned teacher (Minitron's width pruning)
  scratch         a fresh initialisation of the student's shape (default for L<n>)
  every<k>        blocks 0, k, 2k, ... of the teacher (DistilBERT's initialisation)
  ce | kd         plain cross-entropy, or the KD loss of `config.kd` (default: kd)
  rkl | jsd       kd with reverse KL or the generalized JSD instead of `config.kd.divergence`
  feat            kd plus hidden-state transfer: `config.features` pairs (default: student
                  layer i <- teacher layer (i + 1) * depth ratio - 1), weight
                  `config.feature_weight`, a learned projection where the widths differ
  attn            kd plus attention-map transfer: `config.attention` pairs (default as feat's),
                  KL(teacher || student) over each query's keys, weight `config.attention_weight`
  t<T>  a<alpha>  kd's temperature and weight instead of `config.kd`'s
  seq             sequence-level KD (Kim and Rush): the student's training rows mix the
                  teacher's sampled continuations of training prompts (`config.seqkd`,
                  `experiments/seqkd.py`, in `config.seqkd.data_dir`, by default
                  <workdir>/generations/seed<seqkd.seed>/) with the original data; ce or kd
  top<k>          kd against the teacher's k most likely tokens only (`config.kd.top_k`'s
                  place)
  offline         kd from the teacher's top k computed once over the student's training
                  batches (`experiments/teacher_logits.py`, in <workdir>/teacher_logits/):
                  the teacher is not in memory while the student trains
e.g. scratch:ce  scratch:kd  scratch:kd:feat  every2:kd  ffn50:kd  ffn50:ce  L2:scratch:jsd:t2
     scratch:kd:top16:offline  scratch:ce:seq  scratch:kd:attn
"""

import dataclasses
import json
import logging
import math
import os
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from compression import distill as distill_lib
from compression import paths, qtensor, structural
from experiments import data, finetune, saved, seqkd, source, steps, teacher_logits, validate
from experiments import workdir as workdir_lib
from experiments.errors import UserError
from models import Transformer, layouts


def parse_variant(spec: str) -> dict:
  """'every2:kd:t2' -> {'init': 'every', 'every': 2, 'loss': 'kd', 'temperature': 2.0, ...}."""
  parts = [p for p in spec.strip().split(':') if p]
  if not parts:
    raise UserError(f'variant {spec!r} is empty')
  v = dict(spec=spec.strip(), layers=None, ffn=None, init=None, every=None, loss='kd',
           divergence=None, temperature=None, alpha=None, features=False, attention=False,
           top_k=None, offline=False, seq=False)
  for token in parts:
    number = re.fullmatch(r'(L|ffn|every|top|t|a)([0-9.]+)', token)
    if token in ('scratch', 'ce', 'kd'):
      v.update(init='scratch') if token == 'scratch' else v.update(loss=token)
    elif token in ('feat', 'attn', 'offline', 'seq'):
      v[dict(feat='features', attn='attention').get(token, token)] = True
    elif token in ('rkl', 'jsd'):
      v['divergence'] = 'reverse_kl' if token == 'rkl' else 'jsd'
    elif number:
      key, text = number.groups()
      try:
        value = float(text)
      except ValueError:
        raise UserError(f'variant {spec!r}: {token!r} is not a number after {key}') from None
      if key in ('L', 'every', 'ffn', 'top') and not value.is_integer():
        raise UserError(f'variant {spec!r}: {token!r} needs a whole number')
      if key == 'L':
        v['layers'] = int(value)
      elif key == 'ffn':
        v['ffn'] = int(value)
      elif key == 'every':
        v.update(init='every', every=int(value))
      elif key == 'top':
        v['top_k'] = int(value)
      else:
        v['temperature' if key == 't' else 'alpha'] = value
    else:
      raise UserError(f'variant {spec!r}: unknown option {token!r}; options: L<n>, ffn<p>, '
                      f'scratch, every<k>, ce, kd, rkl, jsd, feat, attn, seq, t<T>, '
                      f'a<alpha>, top<k>, offline')
  if v['ffn'] is not None and (v['layers'] is not None or v['init'] == 'every'):
    raise UserError(f'variant {spec!r}: ffn<p> keeps the teacher\'s depth; drop L<n>/every<k>')
  if v['ffn'] is not None and not 0 < v['ffn'] < 100:
    raise UserError(f'variant {spec!r}: ffn{v["ffn"]} must prune between 0 and 100%')
  if v['init'] is None:
    v['init'] = 'pruned' if v['ffn'] is not None else 'scratch'
  if v['loss'] == 'ce' and (v['divergence'] or v['temperature'] is not None or
                            v['alpha'] is not None or v['features'] or v['attention'] or
                            v['top_k'] is not None or v['offline']):
    raise UserError(f'variant {spec!r}: ce trains without the teacher; rkl, jsd, feat, attn, '
                    f't<T>, a<alpha>, top<k> and offline apply to kd')
  if v['offline'] and (v['features'] or v['attention']):
    raise UserError(f'variant {spec!r}: feat and attn match the teacher\'s hidden states and '
                    f'attention, which offline teacher logits do not hold; drop offline')
  return v


RECOVER = ('finetune', 'distill')
TEACHER_DTYPES = ('', 'float32', 'bfloat16', 'float16')


def check_recovery(config) -> None:
  """One-line errors for a compression runner's `recover` and `kd` fields."""
  if config.recover not in RECOVER:
    raise UserError(f'config.recover={config.recover!r} is not one of {", ".join(RECOVER)}')
  if config.recover == 'distill':
    try:
      distill_lib.check(_spec(config.kd))
    except ValueError as e:
      raise UserError(f'config.kd: {e}') from None


def recovery(config, teacher, teacher_params, num_steps: int) -> dict:
  """`finetune.run`'s make_loss and frozen for a compression runner's fine-tune of `num_steps`:
  none for recover='finetune'; for 'distill' the KD loss of `config.kd`, with the uncompressed
  model (`teacher`, `teacher_params`) as the teacher."""
  if config.recover != 'distill':
    return {}
  spec = distill_lib.check(_spec(config.kd, num_steps))
  return dict(make_loss=lambda m: distill_lib.loss(steps.lm_loss(m), teacher, spec),
              frozen={distill_lib.TEACHER: (teacher_params, layouts.logical_names(teacher))})


def recovery_origin(config, num_steps: int) -> dict:
  """What a fine-tune's signature records of its recovery (a change starts it again; plain
  fine-tunes record nothing, as before recovery by distillation existed)."""
  if config.recover != 'distill':
    return {}
  return dict(recover=config.recover, kd=_jsonable(_spec(config.kd, num_steps)))


def _jsonable(spec: distill_lib.Spec) -> dict:
  return json.loads(json.dumps(dataclasses.asdict(spec)))   # layer pairs as lists


def _spec(kd, num_steps: int = 1, **changes) -> distill_lib.Spec:
  """The `compression.distill.Spec` of a `kd` config section in a run of `num_steps`."""
  scheduled = kd.alpha_end is not None or kd.temperature_end is not None
  fields = dict(alpha=kd.alpha, temperature=kd.temperature, divergence=kd.divergence,
                beta=kd.beta, top_k=kd.top_k, alpha_end=kd.alpha_end,
                temperature_end=kd.temperature_end,
                schedule_steps=(kd.schedule_steps or num_steps) if scheduled else kd.schedule_steps)
  return distill_lib.Spec(**dict(fields, **changes))


def kd_spec(config, v: dict, student_cfg=None, teacher_cfg=None) -> distill_lib.Spec:
  """The KD loss of variant `v`: `config.kd` with the variant's overrides (checked; layer
  pairs against the student's and teacher's depths when their configs are given)."""
  kd = config.kd
  features = attention = ()
  if v['features']:
    features = (_layer_pairs(config.features, 'features') if config.features else
                _uniform_pairs(student_cfg.n_layers, teacher_cfg.n_layers))
  if v['attention']:
    attention = (_layer_pairs(config.attention, 'attention') if config.attention else
                 _uniform_pairs(student_cfg.n_layers, teacher_cfg.n_layers))
  spec = _spec(kd, config.num_steps,
               alpha=kd.alpha if v['alpha'] is None else v['alpha'],
               temperature=kd.temperature if v['temperature'] is None else v['temperature'],
               divergence=v['divergence'] or kd.divergence, features=features,
               top_k=kd.top_k if v['top_k'] is None else v['top_k'],
               feature_weight=config.feature_weight if features else 0.0,
               attention=attention,
               attention_weight=config.attention_weight if attention else 0.0)
  try:
    distill_lib.check(spec)
    if v['offline'] and not spec.top_k:
      raise ValueError('offline stores the teacher\'s top k: give top<k> or config.kd.top_k > 0')
    if teacher_cfg is not None and spec.top_k > teacher_cfg.vocab_size:
      raise ValueError(f'top_k={spec.top_k} exceeds the teacher\'s {teacher_cfg.vocab_size} '
                       f'tokens')
    if features or attention:
      distill_lib.check_layers(spec, student_cfg.n_layers, teacher_cfg.n_layers)
    return spec
  except ValueError as e:
    raise UserError(f'variant {v["spec"]!r}: {e}') from None


def _layer_pairs(text: str, field: str):
  try:
    pairs = tuple(tuple(int(x) for x in p.split(':')) for p in text.split(','))
  except ValueError:
    pairs = ()
  if not pairs or any(len(p) != 2 or min(p) < 0 for p in pairs):
    raise UserError(f'config.{field}={text!r} must be student:teacher layer pairs, e.g. 0:1,1:3')
  return pairs


def _uniform_pairs(n_student: int, n_teacher: int):
  """Student layer i <- teacher layer round((i + 1) * n_teacher / n_student) - 1."""
  return tuple((i, round((i + 1) * n_teacher / n_student) - 1) for i in range(n_student))


def student_config(v: dict, teacher_cfg):
  """The student's `ModelConfig` (without its parameters: see `student_params`)."""
  n = teacher_cfg.n_layers
  if v['ffn'] is not None:
    return teacher_cfg.replace(d_ff=teacher_cfg.d_ff - int(round(teacher_cfg.d_ff * v['ffn'] / 100)))
  if v['init'] == 'every':
    return teacher_cfg.replace(n_layers=len(range(0, n, v['every'])))
  return teacher_cfg.replace(n_layers=v['layers'] if v['layers'] is not None else math.ceil(n / 2))


def student_params(v: dict, teacher_cfg, teacher_params):
  """The student's starting parameters: None (a fresh initialisation) or taken from the teacher."""
  if v['init'] == 'scratch':
    return None
  if v['init'] == 'every':
    return structural.every_nth_layer(teacher_cfg, teacher_params, v['every'])[1]
  return structural.ffn_neurons(teacher_cfg, teacher_params, v['ffn'] / 100)[1]


def check(config, workdir):
  """Validates a distillation config, its workdir and its teacher before any work is done.
  Returns (the teacher run's config, variants)."""
  validate.check_kind(config, 'distill')
  variants = [parse_variant(s) for s in str(config.variants).split(',') if s.strip()]
  if not variants:
    raise UserError('config.variants is empty: name at least one, e.g. scratch:kd')
  src, cfg, _ = source.check(config, workdir, 'distill')
  if config.get('hf_path'):
    _check_hf_tokenizer(config, src, cfg)
  source.positive_int(config, 'num_steps')
  source.positive_int(config, 'warmup_steps', 0)
  lr = config.learning_rate
  if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
    raise UserError(f'config.learning_rate={lr!r} must be a number > 0')
  for field in ('feature_weight', 'attention_weight'):
    w = config.get(field, 0.0)
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not w >= 0:
      raise UserError(f'config.{field}={w!r} must be a number >= 0')
  if any(v['seq'] for v in variants):
    _check_seqkd(config.seqkd)
  if config.teacher_dtype not in TEACHER_DTYPES:
    raise UserError(f'config.teacher_dtype={config.teacher_dtype!r} is not one of '
                    f'{", ".join(repr(d) for d in TEACHER_DTYPES)} (\'\': as trained)')
  if config.teacher_quantized:
    saved.read(config.teacher_quantized)   # one line if nothing was saved there
  for v in variants:
    if v['loss'] == 'kd':
      kd_spec(config, v, student_config(v, cfg), cfg)
    if v['layers'] is not None and not 1 <= v['layers']:
      raise UserError(f'variant {v["spec"]!r}: L{v["layers"]} needs at least one layer')
    try:
      if v['init'] == 'every':
        _check_every(cfg, v)
      elif v['ffn'] is not None:
        structural.check('ffn', cfg, v['ffn'] / 100)
    except ValueError as e:
      raise UserError(f'variant {v["spec"]!r}: {e}') from None
  return src, variants


def _check_hf_tokenizer(config, src, cfg) -> None:
  """A Hugging Face teacher must score the ids of the run's tokenizer, which the students
  share: its tokenizer.model (if it has one) is the run's, and its vocabulary holds every id."""
  theirs = epath.Path(config.hf_path) / workdir_lib.TOKENIZER
  ours = epath.Path(config.source_workdir) / workdir_lib.TOKENIZER
  if theirs.exists() and (not ours.exists() or theirs.read_bytes() != ours.read_bytes()):
    raise UserError(f'config.hf_path={config.hf_path!r}: its {workdir_lib.TOKENIZER} is not the '
                    f'tokenizer of {config.source_workdir} ({src.data.tokenizer}); teacher and '
                    f'students need one tokenizer')
  ids = (data.ByteTokenizer().vocab_size if src.data.tokenizer == 'byte'
         else src.data.vocab_size)
  if cfg.vocab_size < ids:
    raise UserError(f'config.hf_path={config.hf_path!r}: vocab_size={cfg.vocab_size} is smaller '
                    f'than the {ids} ids of the run\'s tokenizer; teacher and students need one '
                    f'tokenizer')


def _check_every(cfg, v):
  k = v['every']
  if not 1 <= k <= cfg.n_layers:
    raise ValueError(f'every{k}: k must be in [1, {cfg.n_layers}] (the teacher\'s layers)')
  structural.check('layers', cfg, 0)


def run(config, workdir) -> list:
  """Trains every variant's student; returns the result rows (also results.json/results.md)."""
  return source.run(config, workdir, check, _run)


def teacher_form(config, teacher, params):
  """(model, parameters) of the teacher as the students learn from it: as trained, or the
  quantized variant `config.teacher_quantized` that `--mode=quantize` saved from this run
  (integers and scales through the seam), with `config.teacher_dtype` its float weights and
  computation in that dtype (e.g. bfloat16: half the teacher's memory)."""
  if config.get('teacher_quantized'):
    path = epath.Path(config.teacher_quantized)
    info = saved.read(path)['info']
    here = os.path.abspath(str(config.source_workdir))
    hf_path = config.get('hf_path') or ''
    if info.get('source_workdir') != here or (info.get('hf_path') or '') != hf_path:
      raise UserError(f'config.teacher_quantized={str(path)!r} was quantized from '
                      f'{info.get("hf_path") or info.get("source_workdir")}, not the teacher '
                      f'{hf_path or here}')
    quantized = jax.device_get(saved.load(path))
    have, want = paths.flatten(quantized), paths.flatten(params)
    for key in sorted(set(have) | set(want)):
      shapes = [tuple(t[key].shape) if key in t else None for t in (have, want)]
      if shapes[0] != shapes[1]:
        raise UserError(f'config.teacher_quantized={str(path)!r} does not fit the teacher '
                        f'run\'s model ({key}: {shapes[0]} saved, {shapes[1]} in the model)')
    params = quantized
  dtype = config.get('teacher_dtype') or ''
  if dtype:
    cast = lambda x: (x.astype(dtype) if isinstance(x, (np.ndarray, jax.Array))
                      and jnp.issubdtype(x.dtype, jnp.floating) else x)
    params = jax.tree.map(cast, params, is_leaf=lambda x: isinstance(x, qtensor.QTensor))
    teacher = Transformer(teacher.config.replace(dtype=dtype))
  return teacher, params


def _run(config, workdir, src, variants) -> list:
  step, float_teacher, tokenizer, float_params = source.load(config, src)
  teacher, teacher_params = teacher_form(config, float_teacher, float_params)
  timing_batch = source.calibration_batches(config, src, tokenizer, 1, config.seed)[0]
  rows = [dict(variant='teacher', nats_per_byte=source.evaluate(src, teacher, teacher_params,
                                                                  tokenizer),
               layers=teacher.config.n_layers, d_ff=teacher.config.d_ff,
               dtype=config.teacher_dtype or None, quantized=config.teacher_quantized or None,
               **source.cost_figures(teacher, teacher_params, src.data.seq_len),
               **source.measured(teacher, teacher_params, timing_batch, config.decode_tokens))]
  logging.info('teacher: %s', rows[0])
  frozen = {distill_lib.TEACHER: (teacher_params, layouts.logical_names(teacher))}
  for v in variants:
    cfg = student_config(v, float_teacher.config)
    start = student_params(v, float_teacher.config, float_params)   # from the trained weights
    spec = kd_spec(config, v, cfg, teacher.config) if v['loss'] == 'kd' else None
    origin = dict(runner='distill', source_workdir=os.path.abspath(str(config.source_workdir)),
                  source_step=step, variant=v['spec'],
                  **({'hf_path': config.hf_path} if config.get('hf_path') else {}),
                  kd=None if spec is None else _jsonable(spec),
                  **({'offline': True} if v['offline'] else {}),
                  **({'teacher': dict(dtype=config.teacher_dtype,
                                      quantized=os.path.abspath(config.teacher_quantized)
                                      if config.teacher_quantized else '')}
                     if spec is not None and (config.teacher_dtype or config.teacher_quantized)
                     else {}),
                  **({'seqkd': config.seqkd.to_dict()} if v['seq'] else {}))
    sub = finetune.derived_config(src, cfg, num_steps=config.num_steps,
                                  learning_rate=config.learning_rate, seed=config.seed + 1,
                                  origin=origin, warmup_steps=config.warmup_steps)
    make_loss = None if spec is None else (
        lambda m, spec=spec: distill_lib.loss(steps.lm_loss(m, sub.optimizer.z_loss), teacher,
                                              spec))
    extras = None
    if v['seq']:   # the teacher's generations, written once per seed, mixed into the rows
      sub.data.mix = ml_collections.ConfigDict(dict(
          name=seqkd.NAME, data_dir=generations(config, workdir, teacher, teacher_params, tokenizer,
                                             src, origin, step),
          split='train', weight=config.seqkd.weight, text_key='text'))
    if v['offline']:   # the teacher's top k over exactly the batches this student will see
      folder = teacher_logits.write(
          sub, teacher, teacher_params, tokenizer,
          workdir / 'teacher_logits' / f'seed{sub.seed}-k{spec.top_k}-steps{config.num_steps}',
          k=spec.top_k, num_steps=config.num_steps,
          teacher=dict(workdir=origin['source_workdir'], step=step))
      extras = teacher_logits.Reader(folder)
    student_dir = workdir / 'students' / source.slug(v['spec'])
    metrics = finetune.run(sub, student_dir, start,
                           source_workdir=config.source_workdir, make_loss=make_loss,
                           frozen=None if spec is None or v['offline'] else frozen,
                           batch_extras=extras)
    student, trained = Transformer(cfg), finetune.trained_params(sub, student_dir)
    row = dict(variant=v['spec'], nats_per_byte=metrics['nats_per_byte'],
               layers=cfg.n_layers, d_ff=cfg.d_ff, init=v['init'], loss=v['loss'],
               kd=origin['kd'], steps=config.num_steps,
               **source.cost_figures(student, trained, src.data.seq_len),
               **source.measured(student, trained, timing_batch, config.decode_tokens))
    logging.info('%s: %s', v['spec'], row)
    rows.append(row)
  source.write_results(workdir, config, rows, _table(rows))
  return rows


def generations(config, workdir, teacher, teacher_params, tokenizer, src, origin, step) -> str:
  """The data_dir of the teacher's continuations for `seq` students (written if missing,
  resumed if partial, reused if complete): `config.seqkd`'s prompts and sampling, in
  `config.seqkd.data_dir` ('': <workdir>/generations/seed<seqkd.seed>)."""
  g = config.seqkd
  folder = g.get('data_dir') or workdir / 'generations' / f'seed{g.seed}'
  info = seqkd.generate_dataset(
      teacher, teacher_params, tokenizer, src.data, folder, name=seqkd.NAME,
      num_prompts=g.num_prompts, prompt_tokens=g.prompt_tokens, new_tokens=g.new_tokens,
      temperature=g.temperature, top_k=g.top_k or None, seed=g.seed, batch_size=g.batch_size,
      teacher=dict(workdir=origin['source_workdir'], step=step))
  logging.info('seqkd: %s examples, %s generated tokens (%s)', info['num_examples'],
               info['generated_tokens'], 'reused' if info['reused'] else 'written')
  return info['data_dir']


def _check_seqkd(g) -> None:
  for field, least in (('num_prompts', 1), ('prompt_tokens', 1), ('new_tokens', 1),
                       ('batch_size', 1), ('seed', 0)):
    value = g[field]
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
      raise UserError(f'config.seqkd.{field}={value!r} must be an integer >= {least}')
  for field, ok, allowed in (
      ('temperature', lambda x: x >= 0, '>= 0 (0: greedy)'),
      ('top_k', lambda x: x >= 0 and float(x).is_integer(), 'an integer >= 0 (0: off)'),
      ('weight', lambda x: 0 < x <= 1, 'in (0, 1] (the share of rows from the generations)')):
    value = g[field]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value):
      raise UserError(f'config.seqkd.{field}={value!r} must be {allowed}')


def _table(rows) -> str:
  teacher = rows[0]['nats_per_byte']
  lines = ['| variant | layers | FFN width | parameters | validation nats/byte | vs teacher |',
           '|---|---|---|---|---|---|']
  for r in rows:
    lines.append(f'| {r["variant"]} | {r["layers"]} | {r["d_ff"]} | {r["params"]:,} | '
                 f'{r["nats_per_byte"]:.4f} | {r["nats_per_byte"] - teacher:+.4f} |')
  return '\n'.join(lines) + '\n'
