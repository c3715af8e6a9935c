"""Mixed-precision quantization: a bit width per weight, from measured sensitivity, under a
byte budget.

    sens = mixed.sensitivity(params, model, calib, loss_fn)       # {path: {bits: loss increase}}
    sizes = mixed.layer_bytes(params, sens, model=model)          # {path: {bits: stored bytes}}
    budget = (mixed.uniform_budget(sizes, 4) + mixed.uniform_budget(sizes, 8)) // 2
    bits = mixed.allocate(sens, sizes, budget)                    # {path: bits}
    qparams = mixed.quantize_mixed(params, bits, model=model)

`sensitivity` quantizes one weight at a time (everything else float) and measures the mean
calibration loss minus the float model's. `allocate` assumes these increases add up across
weights (an additive model: a heuristic, errors of different weights interact) and picks the bit
widths of least summed increase whose stored bytes fit the budget. Bytes are the real `QTensor`
bytes (`nbytes()` of `qtensor.quantize` on abstract shapes), so they follow any change of the
storage format. With the current storage 2 bits take a quarter of a byte, 3 and 4 bits half a
byte and 8 bits a byte (plus scales): 3 bits never beat 4 at equal bytes, so the real choices
are 2, 4 and 8 bits.
"""

import functools
import math
import re
from typing import Dict, Iterable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from compression import grid, paths, qtensor, quantize
from models import layouts as layouts_lib

Table = Dict[str, Dict[int, float]]   # {path: {bits: value}}


def _check_bits(bits_choices: Iterable[int]):
  bits_choices = tuple(bits_choices)
  if not bits_choices:
    raise ValueError(f'no bit width to choose from; choices are {", ".join(map(str, grid.BITS))}')
  for b in bits_choices:
    grid.check(b, 0)
  return tuple(sorted(set(bits_choices)))


def _check_options(options) -> None:
  if options.get('act', 'none') != 'none':
    raise ValueError(f'act={options["act"]!r}: mixed precision is weight-only (act=none)')


def _layouts(model, layouts):
  if layouts is not None:
    return layouts
  if model is None:
    raise ValueError('pass the model (or its layouts): it says which parameters are weights')
  return layouts_lib.of_model(model)


def exact(which: Iterable[str]) -> str:
  """A `paths.select` regex matching exactly the paths `which`."""
  return '^(?:' + '|'.join(re.escape(p) for p in which) + ')$'


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _rtn_roundtrip(w, layout, bits: int, group_size: int, symmetric: bool):
  t = qtensor.quantize(w, layout, bits, group_size, symmetric)
  return qtensor.dequantize(t)


def sensitivity(params, model, batches, loss_fn, bits_choices=grid.BITS, *, group_size: int = 0,
                symmetric: bool = True, include: Optional[str] = None,
                exclude: Optional[str] = paths.DEFAULT, method: str = 'rtn', layouts=None,
                **options) -> Table:
  """{path: {bits: mean calibration loss with only that weight quantized - float loss}}.

  The quantized weight enters the model dequantized to its float dtype, so every evaluation
  sees a float tree of one structure and shapes: `loss_fn` is jitted once and compiled once
  per batch shape, for all weights and widths (plus one small round-trip compile per weight
  shape and width). RTN with min/max ranges rounds with `qtensor.quantize` directly; other
  methods and options (`clip='mse'`, 'gptq' with its options) go through `quantize.quantize`
  for the one weight, which for calibrated methods runs calibration once per weight and width.

  Args:
    params: the float parameter tree.
    model: the `Transformer` (its layouts; the forward pass for calibrated methods).
    batches: calibration batches; the loss is the mean of `loss_fn` over them.
    loss_fn: `loss_fn(params, batch) -> mean loss` (a scalar), traceable.
    bits_choices: widths to measure, from `grid.BITS`.
    group_size, symmetric, method, options: as `quantize.quantize`.
    include, exclude: which weights (`compression.paths.select`).
    layouts: {path: Layout} when no model is given.
  """
  bits_choices = _check_bits(bits_choices)
  _check_options(options)
  if not batches:
    raise ValueError('sensitivity needs at least one calibration batch')
  layouts = _layouts(model, layouts)
  selected = paths.select(params, layouts, include, exclude)
  flat = paths.flatten(params)
  done = [p for p in selected if isinstance(flat[p], qtensor.QTensor)]
  if done:
    raise ValueError(f'{done[0]} is quantized already; measure sensitivity on the float model')
  for bits in bits_choices:   # every shape error up front, naming the weight
    quantize.check(params, method, bits, group_size=group_size,
                   clip=options.get('clip', 'minmax'), include=exact(selected), exclude=None,
                   layouts=layouts)
  fast = method == 'rtn' and options.get('clip', 'minmax') == 'minmax'
  loss = jax.jit(loss_fn)
  batches = [jax.tree.map(jnp.asarray, b) for b in batches]

  def mean_loss(tree) -> float:
    return float(sum(loss(tree, b) for b in batches)) / len(batches)

  def roundtrip(p, bits):
    if fast:
      return _rtn_roundtrip(flat[p], layouts[p], bits, group_size, symmetric)
    q = quantize.quantize(params, method, bits, group_size=group_size, symmetric=symmetric,
                          include=exact([p]), exclude=None, model=model, layouts=layouts,
                          batches=batches, **options)
    return qtensor.dequantize(paths.flatten(q)[p])

  base = mean_loss(paths.unflatten(flat))   # the same tree type as every evaluation below
  return {p: {bits: mean_loss(paths.unflatten({**flat, p: roundtrip(p, bits)})) - base
              for bits in bits_choices}
          for p in selected}


def layer_bytes(params, which: Iterable[str], bits_choices=grid.BITS, *, group_size: int = 0,
                symmetric: bool = True, model=None, layouts=None) -> Dict[str, Dict[int, int]]:
  """{path: {bits: bytes of the weight stored as a `QTensor`}}: values (packed below 8 bits),
  scales and zero points, from `qtensor.quantize` on abstract shapes."""
  bits_choices = _check_bits(bits_choices)
  layouts = _layouts(model, layouts)
  flat = paths.flatten(params)
  table = {}
  for p in which:
    if p not in layouts or p not in flat:
      raise ValueError(f'{p!r} is not a weight of the model; weights look like '
                       f'{next(iter(sorted(layouts)), "(none)")!r}')
    spec = jax.ShapeDtypeStruct(flat[p].shape, flat[p].dtype)
    table[p] = {}
    for bits in bits_choices:
      fn = functools.partial(qtensor.quantize, layout=layouts[p], bits=bits,
                             group_size=group_size, symmetric=symmetric)
      try:
        table[p][bits] = int(jax.eval_shape(fn, spec).nbytes())
      except ValueError as e:
        raise ValueError(f'{p}: {e}') from None
  return table


def uniform_budget(sizes: Dict[str, Dict[int, int]], bits: int) -> int:
  """Bytes of the weights of `sizes` (`layer_bytes`) all at `bits`: the uniform model's budget."""
  grid.check(bits, 0)
  missing = [p for p in sizes if bits not in sizes[p]]
  if missing:
    raise ValueError(f'{missing[0]} has no size at bits={bits}; it has {sorted(sizes[missing[0]])}')
  return int(sum(s[bits] for s in sizes.values()))


def predicted_loss(sens: Table, bits_by_path: Dict[str, int]) -> float:
  """The additive model's loss increase of an assignment."""
  return float(sum(sens[p][b] for p, b in bits_by_path.items()))


def total_bytes(sizes: Dict[str, Dict[int, int]], bits_by_path: Dict[str, int]) -> int:
  return int(sum(sizes[p][b] for p, b in bits_by_path.items()))


def _options(sens: Table, sizes) -> Dict[str, list]:
  """Per weight, its (bytes, loss increase, bits) choices, smallest bytes first."""
  if not sens:
    raise ValueError('allocate needs the sensitivity of at least one weight')
  out = {}
  for p in sorted(sens):
    bits = _check_bits(sens[p])
    missing = [b for b in bits if b not in sizes.get(p, {})]
    if missing:
      raise ValueError(f'{p} has a sensitivity at bits={missing[0]} but no size for it')
    losses = [float(sens[p][b]) for b in bits]
    if not all(math.isfinite(x) for x in losses):
      raise ValueError(f'{p} has a non-finite sensitivity {losses}')
    out[p] = sorted((int(sizes[p][b]), x, b) for b, x in zip(bits, losses))
  return out


def allocate(sens: Table, sizes: Dict[str, Dict[int, int]], budget_bytes: int, *,
             max_cells: int = 1 << 17) -> Dict[str, int]:
  """{path: bits} of least summed loss increase (`sens`, additive) with bytes <= budget.

  A multiple-choice knapsack solved by dynamic programming over the bytes each weight takes
  above its smallest choice, on a grid of `unit` bytes: the gcd of those extra bytes, so the
  optimum is exact, unless the largest useful budget would need more than `max_cells` cells;
  then `unit` is a multiple of the gcd and the extra bytes are rounded up to it: the budget
  still holds and the result is optimal for the rounded sizes (it may leave up to one unit per
  weight unused). The grid depends only on `sizes`, so a larger budget never predicts more loss.
  Ties go to fewer bytes.

  Args:
    sens: {path: {bits: loss increase}} (`sensitivity`), the widths each weight may take.
    sizes: {path: {bits: bytes}} (`layer_bytes`), covering those widths.
    budget_bytes: the most bytes all weights of `sens` may take together.
    max_cells: the largest grid.
  """
  options = _options(sens, sizes)
  lowest = sum(o[0][0] for o in options.values())
  if budget_bytes < lowest:
    raise ValueError(f'budget_bytes={budget_bytes} is below {lowest}, the bytes of these '
                     f'weights at their smallest storage')
  extra = {p: [o[0] - opts[0][0] for o in opts] for p, opts in options.items()}
  span = sum(e[-1] for e in extra.values())   # beyond this much extra, every weight is at its max
  unit = math.gcd(*(x for e in extra.values() for x in e)) or 1
  if span // unit > max_cells:
    unit *= -(-span // (unit * max_cells))
  cells = min(int(budget_bytes) - lowest, span) // unit

  best = np.zeros(cells + 1)   # least loss of the weights so far within c units of extra bytes
  picks = []
  for p, opts in options.items():
    new, pick = np.full(cells + 1, np.inf), np.zeros(cells + 1, np.int8)
    for k, ((_, loss, _), e) in enumerate(zip(opts, extra[p])):
      w = -(-e // unit)
      if w > cells:
        continue
      cand = best[:cells + 1 - w] + loss
      better = cand < new[w:]
      new[w:] = np.where(better, cand, new[w:])
      pick[w:] = np.where(better, k, pick[w:])
    best = new
    picks.append(pick)

  c, out = cells, {}
  for (p, opts), pick in zip(reversed(list(options.items())), reversed(picks)):
    k = int(pick[c])
    out[p] = opts[k][2]
    c -= -(-extra[p][k] // unit)
  return dict(sorted(out.items()))


def quantize_mixed(params, bits_by_path: Dict[str, int], *, group_size: int = 0,
                   symmetric: bool = True, method: str = 'rtn', model=None, layouts=None,
                   batches=None, **options):
  """`params` with each weight of `bits_by_path` quantized at its own width (the rest as it was).

  One `quantize.quantize` pass per width over exactly its weights, lowest width first; for
  calibrated methods (GPTQ), a pass sees the weights of the earlier passes already quantized.
  """
  if bits_by_path:
    _check_bits(bits_by_path.values())
  _check_options(options)
  layouts = _layouts(model, layouts)
  flat = paths.flatten(params)
  for p in bits_by_path:
    if p not in layouts or p not in flat:
      raise ValueError(f'{p!r} is not a weight of the model')
    if isinstance(flat[p], qtensor.QTensor):
      raise ValueError(f'{p} is quantized already')
  by_bits = {}
  for p, b in sorted(bits_by_path.items()):
    by_bits.setdefault(b, []).append(p)
  for bits in sorted(by_bits):
    params = quantize.quantize(params, method, bits, group_size=group_size, symmetric=symmetric,
                               include=exact(by_bits[bits]), exclude=None, model=model,
                               layouts=layouts, batches=batches, **options)
  return params
