"""--mode=trace_benchmark: a request trace replayed through the engine and static batching."""

import json

import pytest

from experiments import runners
from experiments.errors import UserError
from tests.runs import tiny_config


def write_trace(path, lines):
  path.write_text(''.join((x if isinstance(x, str) else json.dumps(x)) + '\n' for x in lines))
  return str(path)


def test_a_trace_replays_through_both_systems_with_the_same_tokens(source, data_dir, tmp_path):
  trace = write_trace(tmp_path / 'trace.jsonl', [
      dict(arrival=0.0, prompt=[1, 40, 41], max_new_tokens=6, id='a'),
      dict(arrival=0.01, prompt=[1, 50], max_new_tokens=3, priority=1, id='b'),
      dict(arrival=0.0, prompt=[1, 60, 61, 62, 63], max_new_tokens=9, id='c'),
      dict(arrival=0.05, prompt=[1, 70], max_new_tokens=4, stop_tokens=[2], id='d'),
      dict(arrival=0.2, prompt=[1, 80, 81], max_new_tokens=5, id='e')])
  table = runners.run('trace_benchmark', tiny_config(data_dir), source, requests=trace, slots=2)
  assert '5/5 requests made the same tokens in every system' in table
  rows = {tuple(c.strip() for c in line.split('|')[1:3]): line for line in table.splitlines()
          if line.startswith('| engine') or line.startswith('| static')}
  systems = ('engine, 1 step per call', 'engine, up to 4 steps per call', 'static')
  assert set(rows) == {(s, p) for s in systems for p in ('all', '0', '1')}
  assert '| 4 |' in rows[systems[0], '0'] and '| 1 |' in rows[systems[1], '1']
  assert rows['static', 'all'].endswith('| n/a |')


@pytest.mark.parametrize('line, match', [
    (dict(prompt=[1, 2], max_new_tokens=2), 'line 1: no arrival'),
    (dict(arrival=-1, prompt=[1, 2]), r'line 1: arrival=-1 must be a number of seconds >= 0'),
    ('{not json', 'line 1: '),
    (dict(arrival=0, prompt=[1, 2], beams=3), "line 1: unknown request field 'beams'"),
    (dict(arrival=0, prompt=[1, 2], max_new_tokens=10 ** 6),
     r'request line1 \(of 1 refused\) cannot be served: .*exceeds the'),
])
def test_a_bad_trace_is_one_line_naming_its_line(source, data_dir, tmp_path, line, match):
  trace = write_trace(tmp_path / 'trace.jsonl', [line])
  with pytest.raises(UserError, match=match):
    runners.run('trace_benchmark', tiny_config(data_dir), source, requests=trace, slots=2)


def test_the_synthetic_trace_has_mixed_lengths_priorities_and_rising_arrivals(source,
                                                                             data_dir):
  from experiments import runtime, trace_benchmark
  config = tiny_config(data_dir)
  tokenizer = runtime.setup(config, source)[0]
  trace = trace_benchmark.synthetic_trace(config, tokenizer, n=64)
  arrivals = [a for a, _ in trace]
  assert arrivals == sorted(arrivals) and arrivals[0] > 0
  assert len({len(r.prompt) for _, r in trace}) > 10
  assert {r.max_new_tokens for _, r in trace} == set(trace_benchmark.LIMITS)
  assert {r.priority for _, r in trace} == {0, 1}
