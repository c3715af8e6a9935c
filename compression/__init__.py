"""Compression as functions on parameter trees: params (and calibration data) in, params out.

    params, masks = compression.prune(params, 'wanda', 0.5, model=model, batches=calib)
    params, masks = compression.prune(params, 'magnitude', nm=(2, 4), model=model)
    cfg, params, _ = compression.structural.ffn_neurons(model.config, params, 0.25)
    tx = compression.schedules.gradual(optax.adamw(1e-3), 0.8, start=100, end=400,
                                       layouts=models.layouts.of_config(cfg))
    print(compression.report.markdown(compression.report.sparsity_report(params, cfg)))

Which weights a method touches is a regex over parameter paths (`compression.paths.select`):
by default every matmul weight but embeddings, the output head and MoE routers. What each
weight's dimensions mean (stacked layers and experts, inputs, outputs) comes from the model
(`models.layouts`), read from its logical axis names. Leaf types that execute through the
model's seam (`models.seam`) are registered from here.

Submodules load on first use: JAX itself probes `from compression import zstd` (the Python
3.14 standard-library package of this name) while it is being imported, so importing this
package must not import JAX.
"""

import importlib

_SUBMODULES = ('calibration', 'gptq', 'grid', 'masks', 'mixed', 'paths', 'pruning', 'qat',
               'qtensor', 'quantize', 'report', 'schedules', 'smoothing', 'sparsegpt', 'structural')


def __getattr__(name):
  if name in _SUBMODULES:
    return importlib.import_module(f'compression.{name}')
  if name in ('prune', 'METHODS'):
    return getattr(importlib.import_module('compression.pruning'), name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
