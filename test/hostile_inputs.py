"""Inputs that misbehave on purpose (issue 16): a chat-completions server and a bomb PNG.

Shared by test/test_http_bounds.py, test/test_reliability.py and
benchmarks/reliability_figures.py; standard library only, so a process that imports it to run
the server carries nothing else.

:class:`MisbehavingServer` listens on 127.0.0.1 in a thread; the first path segment of
``base_url(mode)`` picks what it does with a chat-completions POST:

- ``ok``: a short caption, at once (the reference);
- ``long``: a valid answer whose caption is 20,000 characters;
- ``huge``: a valid answer whose caption is ``huge_bytes`` long, sent in 1 MB writes with an
  empty Content-Length (so the client cannot refuse it from the header);
- ``drip``: a valid answer with its length, one byte every ``drip_s`` seconds;
- ``endless``: no length, ``endless_chunk`` bytes of JSON whitespace every ``endless_s``
  seconds until the client hangs up;
- ``redirect``: 307 to ``redirect_to`` (another host and port).

The huge body is generated while it is written, so the server itself stays small.
"""

import http.server
import json
import struct
import threading
import time
import zlib

OK_CAPTION = 'a red roof beside a road'
WRITE_CHUNK = 1 << 20


def chat_answer(text):
    """Return a chat-completions response body (bytes) whose message content is ``text``."""
    return json.dumps({'choices': [{'message': {'content': text}}]}).encode()


class MisbehavingServer(http.server.ThreadingHTTPServer):
    """A chat-completions server on 127.0.0.1 that misbehaves as its URL path asks."""

    daemon_threads = True

    def __init__(self, drip_s=0.2, endless_chunk=1, endless_s=0.2, huge_bytes=50_000_000,
                 redirect_to='http://127.0.0.2:9/v1/chat/completions'):
        super().__init__(('127.0.0.1', 0), _Handler)
        self.drip_s = drip_s
        self.endless_chunk = endless_chunk
        self.endless_s = endless_s
        self.huge_bytes = huge_bytes
        self.redirect_to = redirect_to
        self.hits = {}
        self._thread = None

    def base_url(self, mode):
        """Return the ``base_url`` a captioner uses to get ``mode``."""
        return f'http://127.0.0.1:{self.server_address[1]}/{mode}/v1'

    def start(self):
        """Serve in a daemon thread; return self."""
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)
        self._thread.start()
        return self

    def close(self):
        """Stop serving and close the socket."""
        self.shutdown()
        self.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 - the http.server API
        self.rfile.read(int(self.headers.get('Content-Length', 0)))
        mode = self.path.split('/')[1]
        srv = self.server
        srv.hits[mode] = srv.hits.get(mode, 0) + 1
        try:
            if mode == 'redirect':
                self.send_response(307)
                self.send_header('Location', srv.redirect_to)
                self.send_header('Content-Length', '0')
                self.end_headers()
            elif mode == 'huge':
                self._send_head(None, length='')
                self._write_huge(srv.huge_bytes)
            elif mode == 'endless':
                self._send_head(None)
                self.wfile.write(b'{"choices": [')
                while True:
                    self.wfile.write(b' ' * srv.endless_chunk)
                    self.wfile.flush()
                    time.sleep(srv.endless_s)
            elif mode == 'drip':
                body = chat_answer('a red roof')
                self._send_head(body)
                for i in range(len(body)):
                    self.wfile.write(body[i:i + 1])
                    self.wfile.flush()
                    time.sleep(srv.drip_s)
            else:
                body = chat_answer('roof ' * 4000 if mode == 'long' else OK_CAPTION)
                self._send_head(body)
                self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _send_head(self, body, length=None):
        self.send_response(200)
        self.send_header('Content-Type', 'application/json')
        if length is not None or body is not None:
            self.send_header('Content-Length', length if length is not None else str(len(body)))
        self.end_headers()

    def _write_huge(self, size):
        head, tail = chat_answer('\0').split(b'\\u0000')
        words = b'roof ' * (WRITE_CHUNK // 5)
        self.wfile.write(head)
        left = size
        while left > 0:
            self.wfile.write(words[:left])
            left -= len(words)
        self.wfile.write(tail)

    def log_message(self, *args):
        pass


def png_claiming(path, width, height):
    """Write a small PNG whose header claims width x height (its pixel data is a stub)."""
    def chunk(kind, data):
        return (struct.pack('>I', len(data)) + kind + data
                + struct.pack('>I', zlib.crc32(kind + data) & 0xffffffff))
    ihdr = struct.pack('>IIBBBBB', width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    idat = zlib.compress(b'\0' * 300_000, 9)  # a few hundred bytes on disk
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', ihdr) + chunk(b'IDAT', idat)
                     + chunk(b'IEND', b''))
    return path
