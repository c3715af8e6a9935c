"""A local HTTP endpoint on the serving engine (`--mode=http`): completions, streamed or whole.

  python -m experiments.main --mode=http --config=experiments/configs/shakespeare.py \
      --workdir=runs/shakespeare --slots=8 --port=8000

  curl -s localhost:8000/v1/completions -d '{"prompt": "ROMEO:", "max_tokens": 16}'
  curl -sN localhost:8000/v1/completions -d '{"prompt": "ROMEO:", "stream": true}'
  curl -s localhost:8000/health

`--workdir` and `--draft`/`--draft_tokens` are read as `--mode=serve` reads them
(`serve.load_engine`). `POST /v1/completions` takes a JSON object of `FIELDS`: the prompt is
text (encoded with the run's tokenizer after its BOS id) or a list of token ids, and a request
stops at the tokenizer's EOS id unless it gives `stop`. The reply is one JSON object (id,
tokens, text, finish_reason, ttft_s, latency_s, preemptions) or, with `"stream": true`,
server-sent events: one `data: {"id", "token", "text"}` per token, a last one with the
finish reason and times, then `data: [DONE]`. Bad input is HTTP 400 with a one-line
`{"error": ...}`; `GET /health` gives the slots and the requests running and waiting. The first
request of each new prompt bucket and batch size compiles its programs, so it is slow.

One thread owns the engine: it takes what handler threads queued under a lock, submits it,
steps while anything is live, and hands each request's tokens to that request's own queue.
Handler threads never call the engine, so nothing in it needs to be thread-safe.
"""

import http.server
import json
import logging
import queue
import threading
import time
from typing import Optional

from experiments import serve
from experiments.errors import UserError

# The request fields, in the order the error for an unknown one lists them.
FIELDS = ('prompt', 'max_tokens', 'temperature', 'top_k', 'top_p', 'seed', 'priority', 'stop',
          'stream')
# The engine's name for a field a client names otherwise (the rest are the same).
_ENGINE_NAMES = dict(max_tokens='max_new_tokens', stop='stop_tokens')
MAX_BODY = 1 << 20   # bytes; a request body past this is refused before it is read


class BadRequest(ValueError):
  """A client's mistake: answered with HTTP 400 and this one line."""


def parse_completion(body: bytes, tokenizer) -> tuple:
  """(the engine's request dict, whether to stream) of a completions body; BadRequest names
  the first bad value. What only the engine can judge (ids, lengths, sampling values) is left
  to `Engine.refusal`."""
  try:
    d = json.loads(body)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise BadRequest(f'the body is not JSON ({getattr(e, "msg", e)}); send a JSON object of '
                     f'{", ".join(FIELDS)}') from None
  if not isinstance(d, dict):
    raise BadRequest(f'the body must be a JSON object, got a {type(d).__name__}')
  unknown = sorted(set(d) - set(FIELDS))
  if unknown:
    raise BadRequest(f'unknown field {unknown[0]!r}; allowed: {", ".join(FIELDS)}')
  stream = d.pop('stream', False)
  if not isinstance(stream, bool):
    raise BadRequest(f'stream={stream!r} must be true or false')
  if 'prompt' not in d:
    raise BadRequest('a request needs a prompt: text or a list of token ids')
  prompt = d['prompt']
  if isinstance(prompt, str):
    if tokenizer is None:
      raise BadRequest('this checkpoint has no tokenizer (no tokenizer.model beside it); give '
                       'the prompt as a list of token ids')
    if not prompt:
      raise BadRequest('prompt is empty; give text or a non-empty list of token ids')
    d['prompt'] = serve.encode_text(tokenizer, prompt)
  elif not isinstance(prompt, list):
    raise BadRequest(f'prompt must be text or a list of token ids, got a {type(prompt).__name__}')
  max_tokens = d.setdefault('max_tokens', 32)
  if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
    raise BadRequest(f'max_tokens={json.dumps(max_tokens)} must be an integer >= 1')
  if tokenizer is not None:
    d.setdefault('stop', [tokenizer.eos_id])
  return {_ENGINE_NAMES.get(k, k): v for k, v in d.items()}, stream


def client_words(message: str) -> str:
  """An engine message in the client's field names (max_tokens, not max_new_tokens)."""
  for client, engine in _ENGINE_NAMES.items():
    message = message.replace(engine, client)
  return message


class EngineLoop:
  """The engine's one thread: submits queued requests, steps, delivers tokens per request.

  Each request's queue receives ('id', id) or ('refused', why), then ('token', t) per token,
  then ('done', Result), or ('failed', why) if the engine stops first. A delivered result is
  removed from `engine.results`, so a long-running server holds only live requests.
  """

  def __init__(self, engine):
    self.engine = engine
    self.clock = engine.clock          # a clock function: reading it does not touch the engine
    self.counts = dict(running=0, waiting=0)   # published by the engine thread for /health
    self.served = 0
    self.failure = ''                  # why the engine stopped ('' while it runs)
    self._cond = threading.Condition()
    self._inbox: list = []             # (request dict, arrival, queue) not yet submitted
    self._queues: dict = {}            # engine id -> the queue its tokens go to
    self._closed = False
    self._thread = threading.Thread(target=self._run, name='engine', daemon=True)

  def start(self) -> None:
    self._thread.start()

  def submit(self, request: dict) -> queue.SimpleQueue:
    """Queues `request` for the engine thread (a handler thread's only way in)."""
    q = queue.SimpleQueue()
    with self._cond:
      if self._closed or self.failure:
        q.put(('failed', self.failure or 'the server is shutting down'))
      else:
        # The arrival is taken now, so the time to first token counts the wait for a step.
        self._inbox.append((request, self.clock(), q))
        self._cond.notify()
    return q

  def close(self) -> None:
    """Stops the engine thread (after its current step); live requests get ('failed', ...)."""
    with self._cond:
      self._closed = True
      self._cond.notify()
    if self._thread.is_alive():
      self._thread.join()

  def _run(self) -> None:
    engine = self.engine
    try:
      while True:
        with self._cond:
          # engine.busy is read here only, on the engine's own thread.
          while not (self._closed or self._inbox or engine.busy):
            self._cond.wait()
          if self._closed:
            return
          arrived, self._inbox = self._inbox, []
        for request, arrival, q in arrived:
          self._admit(request, arrival, q)
        self._publish()
        if engine.busy:
          events = engine.step()
          self._publish()   # before the replies, so a client's next /health counts them out
          self._deliver(events)
    except Exception as e:  # noqa: BLE001 - reported to every client, then to the log
      logging.exception('the engine thread failed')
      first = str(e).splitlines()[0] if str(e) else ''
      self.failure = f'the engine failed: {type(e).__name__}: {first}'
    finally:
      with self._cond:
        why = self.failure or 'the server is shutting down'
        for q in [q for _, _, q in self._inbox] + list(self._queues.values()):
          q.put(('failed', why))
        self._inbox, self._queues = [], {}

  def _publish(self) -> None:
    # Read on the engine's own thread, between steps; handlers read only this copy.
    self.counts = dict(running=self.engine.running, waiting=self.engine.waiting)

  def _admit(self, request: dict, arrival: float, q) -> None:
    why = self.engine.refusal(request)
    if why:
      q.put(('refused', client_words(why)))
      return
    rid = self.engine.submit(request, arrival=arrival)
    result = self.engine.results[rid]
    if result.done:   # refused after all (refusal and submit check the same things)
      del self.engine.results[rid]
      q.put(('refused', client_words(result.error)))
      return
    self._queues[rid] = q
    q.put(('id', rid))

  def _deliver(self, events: list) -> None:
    for rid, token in events:
      self._queues[rid].put(('token', token))
    for rid in dict.fromkeys(rid for rid, _ in events):
      result = self.engine.results[rid]
      if result.done:
        del self.engine.results[rid]
        self._queues.pop(rid).put(('done', result))
        self.served += 1


class Server:
  """The HTTP server and its engine thread: `start()` serves from background threads (port 0:
  any free port; the one taken is in `url`), `close()` stops them and frees the port."""

  def __init__(self, engine, tokenizer=None, host: str = '127.0.0.1', port: int = 8000):
    self.loop = EngineLoop(engine)
    self.tokenizer = tokenizer
    self.slots = engine.slots
    self.httpd = http.server.ThreadingHTTPServer((host, port), _Handler)
    self.httpd.daemon_threads = True   # a client still reading does not hold up close()
    self.httpd.app = self
    self._thread: Optional[threading.Thread] = None

  @property
  def url(self) -> str:
    host, port = self.httpd.server_address[:2]
    return f'http://{host}:{port}'

  def start(self) -> 'Server':
    """Serves from background threads; returns self."""
    self.loop.start()
    self._thread = threading.Thread(target=self.httpd.serve_forever, name='http', daemon=True)
    self._thread.start()
    return self

  def close(self) -> None:
    """Stops accepting, fails requests still live, stops the engine thread, frees the port."""
    if self._thread is not None:   # shutdown() waits for a serve_forever loop to end
      self.httpd.shutdown()
      self._thread.join()
    self.loop.close()
    self.httpd.server_close()

  def health(self) -> dict:
    return dict(ok=not self.loop.failure, slots=self.slots, **self.loop.counts)


class _Handler(http.server.BaseHTTPRequestHandler):
  """One connection: HTTP/1.0, so a stream ends when the connection closes."""
  timeout = 60   # seconds a socket read or write may stall: a silent client frees its thread

  def do_GET(self):   # noqa: N802 - the name http.server calls
    if self.path == '/health':
      return self._json(200, self.server.app.health())
    if self.path == '/v1/completions':
      return self._json(405, dict(error='/v1/completions takes POST'))
    self._json(404, dict(error=f'no such path {self.path!r}; try POST /v1/completions or '
                               f'GET /health'))

  def do_POST(self):   # noqa: N802
    if self.path != '/v1/completions':
      return self._json(404, dict(error=f'no such path {self.path!r}; POST to /v1/completions'))
    try:
      self._complete()
    except (BrokenPipeError, ConnectionResetError):
      # The engine has no way to cancel: the request runs to its end, unread.
      logging.info('%s left before its reply', self.address_string())

  def _complete(self) -> None:
    app = self.server.app
    try:
      request, stream = parse_completion(self._body(), app.tokenizer)
    except BadRequest as e:
      return self._json(400, dict(error=str(e)))
    q = app.loop.submit(request)
    kind, value = q.get()
    if kind != 'id':
      return self._json(400 if kind == 'refused' else 503, dict(error=value))
    if stream:
      return self._stream(value, q, app.tokenizer)
    while True:
      kind, got = q.get()
      if kind == 'failed':
        return self._json(503, dict(error=got))
      if kind == 'done':
        return self._json(200, _reply(got, app.tokenizer))

  def _body(self) -> bytes:
    length = self.headers.get('Content-Length')
    if length is None or not length.isdigit():
      raise BadRequest('the request needs a Content-Length header (a JSON body)')
    if int(length) > MAX_BODY:
      raise BadRequest(f'the body of {length} bytes is over the {MAX_BODY} allowed')
    try:
      body = self.rfile.read(int(length))
    except TimeoutError:
      body = b''
    if len(body) < int(length):
      raise BadRequest(f'the body ended after {len(body)} of its Content-Length={length} bytes')
    return body

  def _stream(self, rid: str, q, tokenizer) -> None:
    self.send_response(200)
    self.send_header('Content-Type', 'text/event-stream')
    self.send_header('Cache-Control', 'no-cache')
    self.end_headers()
    tokens, sent = [], ''
    while True:
      kind, got = q.get()
      if kind == 'token':
        tokens.append(got)
        piece, sent = _new_text(tokenizer, tokens, sent)
        self._event(dict(id=rid, token=got, text=piece))
      elif kind == 'done':
        # Text held back (an unfinished character) goes out with the last event.
        rest = _reply(got, tokenizer)
        rest['text'] = rest['text'][len(sent):]
        del rest['tokens']
        self._event(rest)
        break
      else:
        self._event(dict(id=rid, error=got))
        break
    self.wfile.write(b'data: [DONE]\n\n')

  def _event(self, d: dict) -> None:
    self.wfile.write(b'data: ' + json.dumps(d).encode() + b'\n\n')
    self.wfile.flush()

  def _json(self, code: int, d: dict) -> None:
    body = json.dumps(d).encode()
    self.send_response(code)
    self.send_header('Content-Type', 'application/json')
    self.send_header('Content-Length', str(len(body)))
    self.end_headers()
    self.wfile.write(body)

  def log_message(self, format, *args):   # pylint: disable=redefined-builtin
    # To the log, not stderr: a test or a busy server would print a line per request.
    logging.info('%s %s', self.address_string(), format % args)


def _reply(result, tokenizer) -> dict:
  """The JSON reply of a finished request."""
  text = tokenizer.decode(result.tokens) if tokenizer is not None else ''
  return dict(id=result.id, tokens=result.tokens, text=text, finish_reason=result.finish_reason,
              ttft_s=result.ttft, latency_s=result.latency, preemptions=result.preemptions)


def _new_text(tokenizer, tokens: list, sent: str) -> tuple:
  """(the text `tokens` add to `sent`, the text sent so far): pieces are cut from the whole
  decoding, since one token may be half a character or change the spacing before it."""
  if tokenizer is None:
    return '', sent
  text = tokenizer.decode(tokens)
  if text.endswith('\ufffd') or not text.startswith(sent):
    return '', sent   # an unfinished character: wait for the bytes that complete it
  return text[len(sent):], text


def serve_forever(engine, tokenizer=None, host: str = '127.0.0.1', port: int = 8000) -> str:
  """Serves `engine` on host:port until interrupted; returns a one-line summary. Raises
  RuntimeError if the engine fails (its traceback is logged first)."""
  try:
    server = Server(engine, tokenizer, host, port)
  except OSError as e:
    raise UserError(f'--host={host} --port={port}: {e.strerror or e}') from None
  server.start()
  print(f'serving on {server.url} (POST /v1/completions, GET /health); Ctrl-C stops',
        flush=True)
  try:
    while not server.loop.failure:
      time.sleep(1)   # the main thread only waits, and so sees Ctrl-C
  except KeyboardInterrupt:
    pass
  finally:
    server.close()
  if server.loop.failure:
    raise RuntimeError(f'{server.loop.failure} after {server.loop.served} requests')
  return f'served {server.loop.served} requests on {server.url}'


def run(config, workdir, host: str, port: int, slots: int, draft: str = '',
        draft_tokens=(4,)) -> str:
  """`--mode=http`: serves the newest checkpoint of `workdir` until interrupted."""
  if not 0 <= port < 65536:
    raise UserError(f'--port={port} must be in [0, 65535] (0: any free port)')
  engine, tokenizer = serve.load_engine(config, workdir, slots, draft, draft_tokens, mode='http')
  return serve_forever(engine, tokenizer, host, port)
