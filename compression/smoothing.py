"""Function-preserving scale transforms: SmoothQuant, AWQ and a testbed of planted outliers.

A site is where a per-channel scale s can move between parameters without changing the float
function: its producers' outputs are divided by s and the input rows of every consumer of that
output are multiplied by s. In a pre-norm block (`sites`, in forward order):

  norm   attn_norm / mlp_norm (scale, and bias for LayerNorm) -> every kernel reading the norm:
         query, key, value; the MLP's gate and up, or in an MoE layer the router, every
         expert's gate and up and the shared experts'. Channels: embed.
  value  the value projection (kernel output columns and bias) -> the attention output's input
         rows. Channels: (kv head, head dim); with GQA a kv head feeds G query heads' rows.
  up     SwiGLU's up projection (output columns and bias) -> down's input rows, per expert in
         MoE layers. Channels: mlp. The gate is never scaled: it goes through the nonlinearity.

A site's consumers read activations and weights that no other site changes (the value and up
sites rescale output columns of the norm sites' consumers, but only after them), so statistics
calibrated once (`calibrate`) serve every site. Weights the quantizer leaves in float by default
(routers, `compression.paths.default_excluded`) are rescaled but do not count in the choice.
The function is kept to float32 rounding; parameters stored narrower are rounded once more.
"""

import functools
import math
import numbers
from typing import Callable, Dict, NamedTuple, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from compression import calibration, paths
from models import axes, layouts
from models.transformer import block_name

KINDS = ('norm', 'value', 'up')
ALPHAS = tuple(round(0.05 * i, 2) for i in range(21))   # AWQ's grid: 0, 0.05, ..., 1
_HIGHEST = lax.Precision.HIGHEST


class Edge(NamedTuple):
  """One parameter on a side of a site; `index` picks one matrix of a stack (an expert)."""
  path: str
  index: Tuple[int, ...] = ()
  repeat: int = 1   # consumers: each channel's row block is repeated this often (GQA groups)


class Site(NamedTuple):
  name: str
  kind: str                     # one of KINDS
  channels: Tuple[int, ...]     # (embed,), (kv_heads, head_dim) or (mlp,)
  producers: Tuple[Edge, ...]   # divided by s along their trailing (output) dims
  consumers: Tuple[Edge, ...]   # input rows multiplied by s

  @property
  def width(self) -> int:
    return math.prod(self.channels)


def sites(config, kinds: Sequence[str] = KINDS) -> list:
  """The scalable sites of `Transformer(config)` of the given kinds, in forward order."""
  bad = [k for k in kinds if k not in KINDS]
  if bad:
    raise ValueError(f'site kind {bad[0]!r} is not one of {", ".join(KINDS)}')
  if config.scan_layers:
    raise ValueError('scale transforms need the unrolled layout: use scan_layers=False '
                     '(models.unstack_layers converts the parameters)')
  names = layouts.names_of_config(config)
  out = []
  for i in range(config.n_unique_layers):
    b = block_name(i)
    if 'norm' in kinds:
      out.append(_norm_site(f'{b}/attn_norm', f'{b}/attn/', config, names))
    if 'value' in kinds:
      out.append(_value_site(b, config, names))
    if 'norm' in kinds:
      out.append(_norm_site(f'{b}/mlp_norm', f'{b}/mlp/', config, names))
    if 'up' in kinds and config.mlp == 'swiglu':
      out += _up_sites(b, config.is_moe_layer(i), config, names)
  return out


def _matrices(path: str, names, config) -> list:
  """One edge per matrix of `path`: one per expert for a stack of experts."""
  if names[path][0] == axes.EXPERT:
    return [Edge(path, (e,)) for e in range(config.n_experts)]
  return [Edge(path)]


def _optional(path: str, names) -> tuple:
  return (Edge(path),) if path in names else ()


def _norm_site(norm: str, module: str, config, names) -> Site:
  consumers = []
  for p, n in names.items():   # every weight of the module reading embed (biases read nothing)
    stack = int(n[0] == axes.EXPERT)
    if p.startswith(module) and len(n) - stack >= 2 and n[stack] == axes.EMBED:
      consumers += _matrices(p, names, config)
  producers = _optional(f'{norm}/scale', names) + _optional(f'{norm}/bias', names)
  return Site(norm, 'norm', (config.d_model,), producers, tuple(consumers))


def _value_site(b: str, config, names) -> Site:
  v = f'{b}/attn/value'
  out = Edge(f'{b}/attn/out/kernel', repeat=config.n_heads // config.n_kv_heads)
  return Site(v, 'value', (config.n_kv_heads, config.head_dim),
              (Edge(f'{v}/kernel'),) + _optional(f'{v}/bias', names), (out,))


def _up_sites(b: str, moe: bool, config, names) -> list:
  mlps = [(f'{b}/mlp', config.moe_d_ff if moe else config.d_ff)]
  if moe and config.n_shared_experts:
    mlps.append((f'{b}/mlp/shared', config.moe_d_ff * config.n_shared_experts))
  out = []
  for mlp, width in mlps:
    up, down = ((f'{mlp}/up', f'{mlp}/down') if f'{mlp}/up' in names
                else (f'{mlp}/up/kernel', f'{mlp}/down/kernel'))
    for u, d in zip(_matrices(up, names, config), _matrices(down, names, config)):
      name = f'{mlp}/up' + (f'[{u.index[0]}]' if u.index else '')
      out.append(Site(name, 'up', (width,), (u,) + _optional(f'{mlp}/up/bias', names), (d,)))
  return out


def _prepare(params, config, kinds):
  site_list = sites(config, kinds)
  flat = paths.flatten(params)
  for site in site_list:
    for e in site.producers + site.consumers:
      if e.path not in flat:
        raise ValueError(f'{e.path} is not in the parameters: they do not match the config')
  return flat, site_list


def _rows(s_C, site: Site, e: Edge):
  """A consumer's per-input-row scale from the site's per-channel scale [width]."""
  return jnp.repeat(s_C.reshape(site.channels[0], -1), e.repeat, axis=0).reshape(-1)


def _to_channels(x_rows, site: Site, e: Edge, reduce):
  """Per-input-row values of a consumer reduced (max, mean) to the site's channels."""
  return reduce(x_rows.reshape(site.channels[0], e.repeat, -1), axis=1).reshape(-1)


def _update(leaf, index, fn):
  leaf = jnp.asarray(leaf)
  part = leaf[index] if index else leaf
  new = fn(part.astype(jnp.float32)).reshape(part.shape).astype(leaf.dtype)
  return leaf.at[index].set(new) if index else new


def _apply(flat: dict, site: Site, s_C) -> dict:
  """A copy of `flat` with the site's producers divided by s and its consumers' rows times s."""
  flat = dict(flat)
  s_C = jnp.asarray(s_C, jnp.float32).reshape(-1)
  for e in site.producers:
    flat[e.path] = _update(flat[e.path], e.index, lambda w: w.reshape(-1, s_C.shape[0]) / s_C[None])
  for e in site.consumers:
    r = _rows(s_C, site, e)
    flat[e.path] = _update(flat[e.path], e.index, lambda w, r=r: w.reshape(r.shape[0], -1)
                           * r[:, None])
  return flat


def _matrix(flat, site: Site, e: Edge):
  """A consumer as an [in, out] float32 matrix."""
  w = jnp.asarray(flat[e.path])
  return (w[e.index] if e.index else w).astype(jnp.float32).reshape(site.width * e.repeat, -1)


def _stat(stats, e: Edge, key: str):
  if e.path not in stats or key not in stats[e.path]:
    raise ValueError(f'the statistics have no {key!r} for {e.path}: calibrate with '
                     f'compression.smoothing.calibrate (gram=True for awq)')
  x = jnp.asarray(stats[e.path][key])
  return x[e.index] if e.index else x


def _activation(site: Site, stats, key: str):
  """Per channel max |x| ('absmax') or mean |x| ('abssum') of the site's activation, read at the
  consumer seeing the most tokens (the router of an MoE layer, not one expert)."""
  e = max(site.consumers, key=lambda e: float(_stat(stats, e, 'tokens')))
  if key == 'absmax':
    return _to_channels(_stat(stats, e, key), site, e, jnp.max)
  tokens = jnp.maximum(_stat(stats, e, 'tokens'), 1.0)
  return _to_channels(_stat(stats, e, key), site, e, jnp.mean) / tokens


def _counted(site: Site, config) -> list:
  names = layouts.names_of_config(config)
  return [e for e in site.consumers
          if not paths.default_excluded(layouts.of_names(names[e.path], e.path))]


def _finite_positive(s):
  return jnp.where(jnp.isfinite(s) & (s > 0), s, 1.0)


def _is_fraction(alpha) -> bool:
  return not isinstance(alpha, bool) and isinstance(alpha, numbers.Real) and 0 <= alpha <= 1


def calibrate(model, params, batches, kinds: Sequence[str] = KINDS, gram: bool = False) -> dict:
  """The statistics the transforms read ('absmax', 'abssum', 'tokens', with `gram` the Gram
  matrix for `awq`) at the input of every consumer of the sites of `kinds`."""
  wanted = sorted({e.path for site in sites(model.config, kinds) for e in site.consumers})
  return calibration.input_statistics(model, params, batches, wanted, gram=gram, absmax=True,
                                      abssum=True)


def outlier_channels(config, n_channels: int, seed: int = 0) -> Dict[str, np.ndarray]:
  """{norm site: the sorted embed channels `plant_outliers` scales there}, drawn from `seed`."""
  d = config.d_model
  if (isinstance(n_channels, bool) or not isinstance(n_channels, numbers.Integral)
      or not 0 <= n_channels <= d):
    raise ValueError(f'n_channels={n_channels!r} must be an integer in [0, {d}] (the embed width)')
  rng = np.random.default_rng(seed)
  return {s.name: np.sort(rng.choice(d, n_channels, replace=False))
          for s in sites(config, ('norm',))}


def plant_outliers(params, config, n_channels: int, factor: float, seed: int = 0):
  """The outlier testbed: the same function, with `n_channels` planted outlier channels.

  The outliers are planted, not learned: at every norm site the output of `n_channels` seeded
  embed channels (`outlier_channels`) is multiplied by `factor` (norm scale and bias) and the
  consumers' input rows divided by it, so the logits equal the original's to float rounding
  while q/k/v/gate/up (and routers) read `factor`x larger channels, as billion-parameter LLMs
  do (20-100x). Gives small random models something for SmoothQuant and AWQ to fix.
  """
  if (isinstance(factor, bool) or not isinstance(factor, numbers.Real)
      or not math.isfinite(factor) or factor <= 0):
    raise ValueError(f'factor={factor!r} must be a finite number > 0')
  chosen = outlier_channels(config, n_channels, seed)
  flat, site_list = _prepare(params, config, ('norm',))
  for site in site_list:
    s_C = np.ones((site.width,), np.float32)
    s_C[chosen[site.name]] = 1.0 / factor
    flat = _apply(flat, site, s_C)
  return paths.unflatten(flat)


def smoothquant(params, config, stats, alpha: float = 0.5, kinds: Sequence[str] = ('norm',)):
  """SmoothQuant (Xiao et al., 2023): at each site s_j = max|X_j|^alpha / max|W_j|^(1-alpha).

  max|X_j| is the activation's calibrated absmax (`calibrate`), max|W_j| the largest weight of
  input channel j over all the site's quantized consumers. After smoothing, channel j's
  activation absmax is max|X_j|^(1-alpha) max|W_j|^alpha. Channels with a zero maximum keep
  s = 1. Returns the smoothed parameters (the same float function).
  """
  if not _is_fraction(alpha):
    raise ValueError(f'alpha={alpha!r} must be a number in [0, 1]')
  flat, site_list = _prepare(params, config, kinds)
  for site in site_list:
    x_max = _activation(site, stats, 'absmax')
    w_max = jnp.max(jnp.stack([
        _to_channels(jnp.max(jnp.abs(_matrix(flat, site, e)), axis=1), site, e, jnp.max)
        for e in _counted(site, config)]), axis=0)
    flat = _apply(flat, site, _finite_positive(x_max ** alpha / w_max ** (1 - alpha)))
  return paths.unflatten(flat)


def awq_scale(mean_abs_C, alpha: float):
  """AWQ's scale mean|X_j|^alpha normalised by sqrt(max * min); means below 1e-6 of the largest
  (dead channels) count as that, so that no scale is 0."""
  x = jnp.asarray(mean_abs_C, jnp.float32)
  s = jnp.maximum(x, 1e-6 * jnp.max(x) + 1e-30) ** alpha
  return s / jnp.sqrt(jnp.max(s) * jnp.min(s))


@functools.partial(jax.jit, static_argnums=0)
def _output_errors(quantize_fn, w_IxO, h_IxI, s_AxI):
  """tr(dW^T H dW) with dW = diag(1/s) Q(diag(s) W) - W, for each row s of `s_AxI`."""
  def one(s_I):
    q = quantize_fn(w_IxO * s_I[:, None])
    if q.shape != w_IxO.shape:
      raise ValueError(f'quantize_fn turned an [in, out] matrix {w_IxO.shape} into {q.shape}')
    d = q / s_I[:, None] - w_IxO
    return jnp.sum(d * jnp.matmul(h_IxI, d, precision=_HIGHEST))
  return lax.map(one, s_AxI)


def awq(params, config, stats, quantize_fn: Callable, alphas: Sequence[float] = ALPHAS,
        kinds: Sequence[str] = KINDS):
  """AWQ (Lin et al., 2024): per site, the scale `awq_scale(mean|X|, alpha)` whose quantized
  output error over the site's quantized consumers is least, alpha searched over `alphas`.

  A consumer's error is tr(dW^T H dW), dW = diag(1/s) Q(diag(s) W) - W, with H = X^T X from
  `calibrate(..., gram=True)` (exact on the calibration tokens) and Q = `quantize_fn`, a
  function of a float32 [in, out] matrix (e.g. `lambda w: grid.fake_quant(w, 4, 128, True)`;
  kept as a static jit argument, so pass the same function object for every call). alpha 0 is
  plain round-to-nearest. Returns (parameters with the scales folded in, the same float
  function; {site name: chosen alpha}).
  """
  alphas = tuple(alphas)
  bad = [a for a in alphas if not _is_fraction(a)]
  if bad or not alphas:
    raise ValueError(f'alphas={alphas!r}: give one or more numbers in [0, 1]')
  flat, site_list = _prepare(params, config, kinds)
  chosen = {}
  for site in site_list:
    mean_abs = _activation(site, stats, 'abssum')
    s_AxC = jnp.stack([awq_scale(mean_abs, a) for a in alphas])
    err_A = sum(_output_errors(quantize_fn, _matrix(flat, site, e), _stat(stats, e, 'gram'),
                               jax.vmap(lambda s, e=e: _rows(s, site, e))(s_AxC))
                for e in _counted(site, config))
    best = int(jnp.argmin(err_A))   # the first of equal errors: the smallest alpha
    chosen[site.name] = alphas[best]
    flat = _apply(flat, site, s_AxC[best])
  return paths.unflatten(flat), chosen
