"""--mode=http: completions over HTTP equal `decode.generate` on each prompt alone, streamed or
not, however many clients; bad input is a one-line 400 and the server goes on."""

import json
import socket
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from experiments import endpoint, runners
from experiments.data.tokenizers import ByteTokenizer
from experiments.engine import Engine
from experiments.errors import UserError
from models import ModelConfig, Transformer, decode
from tests.conftest import init_params

TOKENIZER = ByteTokenizer()
CFG = ModelConfig(vocab_size=TOKENIZER.vocab_size, d_model=32, n_layers=2, n_heads=2,
                  n_kv_heads=1, d_ff=64, init_std=0.2, max_len=64)


@pytest.fixture(scope='module')
def model():
  return Transformer(CFG), init_params(CFG, seed=1)


@pytest.fixture(scope='module')
def server(model):
  served = endpoint.Server(Engine(*model, slots=2), TOKENIZER, port=0).start()
  yield served
  served.close()


def alone(model, prompt, n):
  """Greedy `decode.generate` on `prompt` alone, cut after the EOS id."""
  out = decode.generate(*model, [prompt], max_new_tokens=n, stop_tokens=(TOKENIZER.eos_id,))
  return np.asarray(out.tokens[0, :int(out.lengths[0])]).tolist()


def post(url, body, path='/v1/completions'):
  """(status, the reply's bytes) of POSTing `body` (a dict, or bytes as they are)."""
  data = body if isinstance(body, bytes) else json.dumps(body).encode()
  try:
    with urllib.request.urlopen(urllib.request.Request(url + path, data=data), timeout=60) as r:
      return r.status, r.read(), r.headers.get('Content-Type')
  except urllib.error.HTTPError as e:
    return e.code, e.read(), e.headers.get('Content-Type')


def complete(url, **body):
  status, reply, _ = post(url, body)
  assert status == 200, reply
  return json.loads(reply)


def events(url, **body):
  """The `data:` payloads of a streamed completion, in order."""
  status, reply, kind = post(url, dict(body, stream=True))
  assert status == 200 and kind == 'text/event-stream', reply
  lines = reply.decode().split('\n\n')
  assert lines[-1] == '' and all(l.startswith('data: ') for l in lines[:-1])
  return [l[len('data: '):] for l in lines[:-1]]


def get(url, path):
  try:
    with urllib.request.urlopen(url + path, timeout=60) as r:
      return r.status, json.loads(r.read())
  except urllib.error.HTTPError as e:
    return e.code, json.loads(e.read())


def test_a_greedy_completion_equals_generate_on_the_prompt_alone(server, model):
  got = complete(server.url, prompt='ROMEO:', max_tokens=8)
  want = alone(model, [TOKENIZER.bos_id] + TOKENIZER.encode('ROMEO:'), 8)
  assert got['tokens'] == want and got['text'] == TOKENIZER.decode(want)
  assert got['finish_reason'] == ('stop' if want[-1] == TOKENIZER.eos_id else 'length')
  assert 0 <= got['ttft_s'] <= got['latency_s'] and got['preemptions'] == 0
  ids = complete(server.url, prompt=[7, 8, 9], max_tokens=5, stop=[])
  assert ids['tokens'] == alone(model, [7, 8, 9], 5)[:5]
  assert server.loop.engine.results == {}   # delivered results are removed


def test_the_streamed_events_join_to_the_reply(server):
  whole = complete(server.url, prompt='KING:', max_tokens=8)
  *tokens, last, done = [json.loads(e) if e != '[DONE]' else e for e in events(
      server.url, prompt='KING:', max_tokens=8)]
  assert done == '[DONE]' and len(tokens) == len(whole['tokens'])
  assert [e['token'] for e in tokens] == whole['tokens']
  assert ''.join(e['text'] for e in tokens) + last['text'] == whole['text']
  assert last['finish_reason'] == whole['finish_reason'] and last['id'] == tokens[0]['id']
  assert server.loop.engine.results == {}


def test_stream_pieces_hold_back_half_a_character():
  tokens = TOKENIZER.encode('aé')   # 'é' is two bytes: its first alone is no text yet
  pieces, sent = [], ''
  for n in range(1, len(tokens) + 1):
    piece, sent = endpoint._new_text(TOKENIZER, tokens[:n], sent)
    pieces.append(piece)
  assert pieces == ['a', '', 'é']


def test_concurrent_clients_each_get_the_tokens_they_would_get_alone(server, model):
  prompts = [[5 + i, 40, 41, 42 + i] for i in range(6)]   # one length: one reference compile
  limits = [3, 8, 5, 8, 2, 6]
  got, start = {}, threading.Barrier(len(prompts))
  def client(i):
    start.wait()
    got[i] = complete(server.url, prompt=prompts[i], max_tokens=limits[i], stop=[],
                      priority=i % 2)
  threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
  for t in threads:
    t.start()
  for t in threads:
    t.join(60)
  assert len(got) == len(prompts)   # more clients than the 2 slots: some waited
  for i, prompt in enumerate(prompts):
    assert got[i]['tokens'] == alone(model, prompt, 8)[:limits[i]], i
  assert len({g['id'] for g in got.values()}) == len(prompts)
  assert server.loop.engine.results == {}
  assert get(server.url, '/health') == (200, dict(ok=True, slots=2, running=0, waiting=0))


@pytest.mark.parametrize('body, match', [
    (b'not json', 'the body is not JSON (Expecting value); send a JSON object of prompt, '),
    (b'[1, 2]', 'the body must be a JSON object, got a list'),
    (dict(prompt='hi', beams=2), "unknown field 'beams'; allowed: prompt, max_tokens, "),
    (dict(prompt='hi', min_p=0.1), "unknown field 'min_p'; allowed: prompt, max_tokens, "),
    ({}, 'a request needs a prompt: text or a list of token ids'),
    (dict(prompt=''), 'prompt is empty; give text or a non-empty list of token ids'),
    (dict(prompt=[]), 'prompt must be a non-empty list of token ids'),
    (dict(prompt=5), 'prompt must be text or a list of token ids, got a int'),
    (dict(prompt=[5, 999]), 'prompt token 999 is not an id in [0, 259)'),
    (dict(prompt='hi', max_tokens=0), 'max_tokens=0 must be an integer >= 1'),
    (dict(prompt='hi', max_tokens='8'), 'max_tokens="8" must be an integer >= 1'),
    (dict(prompt=[5] * 70), 'a prompt of 70 tokens (bucket none) plus max_tokens=32 exceeds '
                            'the 64 cache entries a request may use'),
    (dict(prompt='hi', max_tokens=60), 'plus max_tokens=60 exceeds the 64 cache entries'),
    (dict(prompt='hi', temperature=-1), 'temperature=-1 must be a number >= 0'),
    (dict(prompt='hi', top_k=2**40), 'top_k=1099511627776 must be an integer in [0, 2**31)'),
    (dict(prompt='hi', top_p=2), 'top_p=2 must be in (0, 1]'),
    (dict(prompt='hi', seed=-1), 'seed=-1 must be in [0, 2**32)'),
    (dict(prompt='hi', priority=1.5), 'priority=1.5 must be an integer'),
    (dict(prompt='hi', stop='x'), "stop='x' must be a list of token ids"),
    (dict(prompt='hi', stream='yes'), "stream='yes' must be true or false"),
])
def test_bad_input_is_a_one_line_400_and_the_next_request_is_served(server, body, match):
  status, reply, kind = post(server.url, body)
  error = json.loads(reply)['error']
  assert (status, kind) == (400, 'application/json') and '\n' not in error
  assert match in error
  assert complete(server.url, prompt=[5, 6], max_tokens=2)['finish_reason'] == 'length'
  assert server.loop.engine.results == {}


def raw(url, data: bytes, read: bool = True) -> bytes:
  """Sends `data` as it is on a fresh connection; the reply's bytes (or b'' if not `read`)."""
  host, port = url.rsplit('/', 1)[-1].split(':')
  with socket.create_connection((host, int(port)), timeout=60) as s:
    s.sendall(data)
    if not read:
      s.recv(64)   # the stream has begun
      return b''
    s.shutdown(socket.SHUT_WR)   # the body ends here, whatever its Content-Length said
    return b''.join(iter(lambda: s.recv(65536), b''))


def test_a_body_without_its_length_is_a_400(server):
  reply = raw(server.url, b'POST /v1/completions HTTP/1.0\r\n\r\n')
  assert reply.startswith(b'HTTP/1.0 400') and b'needs a Content-Length header' in reply
  reply = raw(server.url, b'POST /v1/completions HTTP/1.0\r\nContent-Length: 50\r\n\r\n{}')
  assert b'the body ended after 2 of its Content-Length=50 bytes' in reply


def test_a_client_that_leaves_mid_stream_does_not_stop_the_others(server):
  body = json.dumps(dict(prompt=[5, 6], max_tokens=12, stop=[], stream=True)).encode()
  raw(server.url, b'POST /v1/completions HTTP/1.0\r\nContent-Length: %d\r\n\r\n%s'
      % (len(body), body), read=False)
  assert complete(server.url, prompt=[5, 6], max_tokens=2)['finish_reason'] == 'length'
  for _ in range(100):   # the one left runs to its end, and its result goes too
    if not server.loop.engine.results and get(server.url, '/health')[1]['running'] == 0:
      break
    time.sleep(0.05)
  assert server.loop.engine.results == {}


def test_health_and_unknown_paths(server):
  assert get(server.url, '/health') == (200, dict(ok=True, slots=2, running=0, waiting=0))
  status, reply = get(server.url, '/nope')
  assert status == 404 and "no such path '/nope'" in reply['error']
  assert get(server.url, '/v1/completions')[0] == 405
  status, reply, _ = post(server.url, dict(prompt='hi'), path='/health')
  assert status == 404 and 'POST to /v1/completions' in json.loads(reply)['error']


def test_close_stops_the_threads_and_frees_the_port(model):
  served = endpoint.Server(Engine(*model, slots=1), TOKENIZER, port=0).start()
  url, port = served.url, served.httpd.server_address[1]
  assert complete(url, prompt=[5, 6], max_tokens=2)['tokens']
  served.close()
  assert not served.loop._thread.is_alive() and not served._thread.is_alive()
  with pytest.raises(urllib.error.URLError):
    urllib.request.urlopen(url + '/health', timeout=5)
  with socket.socket() as s:
    # Free again for a restarted server (which, like http.server, reuses the address: the
    # closed connections' TIME_WAIT entries still name the port).
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(('127.0.0.1', port))
    s.listen()


def test_a_failing_engine_answers_503_and_health_says_so(model):
  engine = Engine(*model, slots=1)
  def broken():
    raise RuntimeError('boom\nsecond line')
  engine.step = broken
  served = endpoint.Server(engine, TOKENIZER, port=0).start()
  try:
    for _ in range(2):   # the request that met the failure, then one after it
      status, reply, _ = post(served.url, dict(prompt=[5, 6], max_tokens=2))
      assert status == 503
      assert json.loads(reply)['error'] == 'the engine failed: RuntimeError: boom'
    assert get(served.url, '/health')[1]['ok'] is False
  finally:
    served.close()


def test_a_taken_port_and_bad_flags_are_one_line_errors(model):
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    s.listen()
    port = s.getsockname()[1]
    with pytest.raises(UserError, match=f'--host=127.0.0.1 --port={port}: .*in use'):
      endpoint.serve_forever(Engine(*model, slots=1), TOKENIZER, port=port)
  with pytest.raises(UserError, match=r'--port=70000 must be in \[0, 65535\]'):
    runners.run('http', None, 'w', port=70000)
  with pytest.raises(UserError, match='--port=9000 applies to --mode=http only'):
    runners.check_flags('serve', runners.Flags(port=9000), 'w')
