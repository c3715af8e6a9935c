"""Test-wide JAX settings: 8 fake CPU devices, float32 matmuls, strict rank promotion."""

import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')

import jax  # noqa: E402

jax.config.update('jax_platforms', 'cpu')
jax.config.update('jax_numpy_rank_promotion', 'raise')
jax.config.update('jax_default_matmul_precision', 'highest')

import pytest  # noqa: E402

from experiments import data  # noqa: E402


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
  """A data_dir with the embedded corpus prepared once for the whole session."""
  root = tmp_path_factory.mktemp('tfds')
  config = data.default_config()
  config.data_dir = str(root)
  data.prepare(config)
  return root
