"""The openai captioner is bounded whatever its server does (issue 16, item 4).

A local server on 127.0.0.1 misbehaves on purpose: it drips its answer one byte at a time,
never finishes, sends a 50 MB caption, sends a caption of 20,000 characters, and redirects to
another host. Each failed on main before: the drip held an image for minutes with
``timeout_s: 5``, the huge caption was stored whole, the redirect was followed.
"""

import http.server
import json
import threading
import time

from cgrs_ros.engine.captioners import make_captioner
from PIL import Image
import pytest


class _Misbehaving(http.server.ThreadingHTTPServer):
    daemon_threads = True


def _answer(text):
    return json.dumps({'choices': [{'message': {'content': text}}]}).encode()


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 - the http.server API
        self.rfile.read(int(self.headers.get('Content-Length', 0)))
        mode = self.path.split('/')[1]
        self.server.hits[mode] = self.server.hits.get(mode, 0) + 1
        try:
            if mode == 'redirect':
                self.send_response(307)
                self.send_header('Location', 'http://127.0.0.2:9/v1/chat/completions')
                self.send_header('Content-Length', '0')
                self.end_headers()
                return
            body = {'huge': _answer('roof ' * 10_000_000), 'long': _answer('roof ' * 4000),
                    'drip': _answer('a red roof'), 'endless': b'{"choices": ['}[mode]
            self.send_response(200)
            self.send_header('Content-Type', 'application/json')
            if mode != 'endless':
                self.send_header('Content-Length', str(len(body)) if mode != 'huge' else '')
            self.end_headers()
            if mode == 'huge':
                for start in range(0, len(body), 1 << 20):
                    self.wfile.write(body[start:start + (1 << 20)])
            elif mode == 'drip':  # the whole answer, one byte every 0.2 s (~10 s)
                for i in range(len(body)):
                    self.wfile.write(body[i:i + 1])
                    self.wfile.flush()
                    time.sleep(0.2)
            elif mode == 'endless':  # no length, a byte every 0.2 s until the client hangs up
                while True:
                    self.wfile.write(b' ')
                    self.wfile.flush()
                    time.sleep(0.2)
            else:
                self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, *args):
        pass


@pytest.fixture(scope='module')
def server():
    srv = _Misbehaving(('127.0.0.1', 0), _Handler)
    srv.hits = {}
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _caption(server, mode, **extra):
    section = dict({'backend': 'openai', 'model': 'm', 'timeout_s': 2, 'max_retries': 0,
                    'base_url': f'http://127.0.0.1:{server.server_address[1]}/{mode}/v1'},
                   **extra)
    with make_captioner(section) as captioner:
        start = time.monotonic()
        outcome = captioner.caption([Image.new('RGB', (32, 32), (200, 30, 30))],
                                    ['satellite'])[0]
        return outcome, time.monotonic() - start


@pytest.mark.parametrize('mode', ['drip', 'endless'])
def test_a_dripping_or_endless_answer_ends_at_the_deadline(server, mode):
    outcome, seconds = _caption(server, mode)
    assert outcome.caption is None and 'within 2 s' in outcome.error
    assert seconds < 4.0  # timeout_s is the whole request, not each read


def test_a_huge_answer_is_refused_without_reading_it_all(server):
    outcome, _ = _caption(server, 'huge')
    assert outcome.caption is None and 'more than the 1048576 bytes allowed' in outcome.error


def test_a_long_caption_is_cut_at_a_word(server):
    outcome, _ = _caption(server, 'long', max_caption_chars=100)
    assert outcome.error is None
    assert len(outcome.caption) <= 100 and outcome.caption.endswith('roof')


def test_redirects_are_not_followed(server):
    outcome, _ = _caption(server, 'redirect', max_retries=2)
    assert outcome.caption is None
    assert 'redirected (307) to http://127.0.0.2:9' in outcome.error
    assert server.hits['redirect'] == 1  # not retried, not re-sent elsewhere
