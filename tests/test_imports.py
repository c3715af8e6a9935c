"""Imports point down (experiments -> compression, sharding -> models), and `compression` can
shadow Python 3.14's standard-library package of that name without breaking JAX."""

import ast
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).parents[1]
ALLOWED = {'models': {'models'}, 'sharding': {'models', 'sharding'},
           'compression': {'models', 'compression'}}
PROJECT = {'models', 'compression', 'sharding', 'experiments'}


def project_imports(path: pathlib.Path):
  """The project packages a module imports (module-level and inside functions)."""
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      names = [node.module]
    else:
      continue
    yield from (n.split('.')[0] for n in names if n.split('.')[0] in PROJECT)


@pytest.mark.parametrize('package', sorted(ALLOWED))
def test_imports_point_down(package):
  bad = {(str(p.relative_to(ROOT)), name) for p in (ROOT / package).rglob('*.py')
         for name in project_imports(p) if name not in ALLOWED[package]}
  assert not bad, f'{package}/ imports upward: {sorted(bad)}'


def test_importing_compression_imports_no_jax_and_leaves_zstd_to_the_standard_library():
  # JAX probes `from compression import zstd` (Python 3.14's standard-library package) while
  # it is imported; with the repo root on sys.path that finds this package, which must answer
  # with a clean ImportError and must not import JAX itself (a circular import).
  code = ('import sys\n'
          'import compression\n'
          'assert "jax" not in sys.modules, "import compression pulled in jax"\n'
          'try:\n'
          '  from compression import zstd\n'
          'except ImportError as e:\n'
          '  print("ImportError:", e)\n'
          'else:\n'
          '  raise SystemExit("from compression import zstd did not raise ImportError")\n'
          'assert "jax" not in sys.modules\n'
          'import jax\n'
          'print("jax", jax.__version__)\n')
  out = subprocess.run([sys.executable, '-c', code], cwd=pathlib.Path(__file__).parents[1],
                       capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert out.returncode == 0, out.stderr
  assert "ImportError: cannot import name 'zstd'" in out.stdout and 'jax ' in out.stdout
