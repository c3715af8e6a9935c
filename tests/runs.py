"""Helpers for tests that train: the tiny config, the CLI in a subprocess, logged losses."""

import hashlib
import json
import os
import pathlib
import subprocess
import sys

import ml_collections

from experiments.configs import shakespeare

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = 'experiments/configs/shakespeare.py:tiny'


def tiny_config(data_dir, **changes) -> ml_collections.ConfigDict:
  """The tiny Shakespeare config on `data_dir`, without samples; `changes` are top-level."""
  config = shakespeare.get_config('tiny')
  config.data.data_dir = str(data_dir)
  config.sample.num_prompts = 0
  config.update(changes)
  return config


def apply_change(config, change: dict) -> ml_collections.ConfigDict:
  """`config` with `change` applied: {field: value}, or {section: {field: value}} updated."""
  for key, value in change.items():
    if isinstance(value, dict):
      config[key].update(value)
    else:
      config[key] = value
  return config


def tree_digest(root: pathlib.Path) -> str:
  """One hash of every file's name and bytes below `root` (to show a source is left untouched)."""
  h = hashlib.sha256()
  for f in sorted(root.rglob('*')):
    if f.is_file():
      h.update(str(f.relative_to(root)).encode() + f.read_bytes())
  return h.hexdigest()


def cli_env(extra=None) -> dict:
  env = dict(os.environ, JAX_PLATFORMS='cpu', **(extra or {}))
  env.pop('XLA_FLAGS', None)   # one CPU device in subprocesses
  return env


def run_main(*args, workdir, data_dir, wait=True, extra_env=None, config=TINY, timeout=300,
             prefix=()):
  """`python -m experiments.main` on the tiny config; a CompletedProcess, or a Popen if not wait.

  `prefix` runs it under another command (e.g. a shell that sets limits first).
  """
  cmd = [*prefix, sys.executable, '-m', 'experiments.main', f'--config={config}',
         f'--workdir={workdir}', f'--config.data.data_dir={data_dir}', *args]
  if not wait:
    return subprocess.Popen(cmd, cwd=ROOT, env=cli_env(extra_env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
  return subprocess.run(cmd, cwd=ROOT, env=cli_env(extra_env), capture_output=True, text=True,
                        timeout=timeout)


def records(workdir) -> list:
  path = pathlib.Path(workdir) / 'metrics.jsonl'
  return [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []


def losses(workdir) -> dict:
  """{step: train loss} from metrics.jsonl (every line must parse)."""
  return {r['step']: r['train_loss'] for r in records(workdir) if 'train_loss' in r}


def snapshot(path, skip=('.lock',)) -> dict:
  """{relative path: (size, mtime)} of every file under `path` (None if there is no `path`):
  equal snapshots mean untouched."""
  path = pathlib.Path(path)
  if not path.exists():
    return None
  if path.is_file():
    return {'': (path.stat().st_size, path.stat().st_mtime_ns)}
  return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns)
          for p in sorted(path.rglob('*')) if p.is_file() and p.name not in skip}
