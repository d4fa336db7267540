"""One client for OpenAI-compatible chat-completions servers (vLLM, llama.cpp server, Ollama).

The captioner and the reranker both send one JSON request per image to such a server, and both
need the same care around it, so it lives here once instead of in each backend:

- requests run on a bounded thread pool (at most ``concurrency`` in flight), each worker with
  its own ``requests.Session`` (not documented as thread-safe) carrying the API key, if any;
- every POST is bounded by ``engine.http.post_json`` (total deadline, size cap, no redirects);
- transient failures (deadline, dropped connection, HTTP 429 and 5xx) are retried with
  jittered exponential backoff, honouring ``Retry-After``; other failures return at once;
- a failure is returned as a reason (one string), never raised, so one bad image fails only
  its own result.

Backends build the request body and read the answer; this module knows nothing of captions or
scores.
"""

import base64
import concurrent.futures
import dataclasses
import io
import logging
import os
import random
import threading
import time
from typing import Any, Optional
import urllib.parse

from cgrs_ros.engine.errors import ConfigError
from cgrs_ros.engine.http import BoundedHTTPError, post_json
import requests

logger = logging.getLogger(__name__)

MAX_BACKOFF_S = 60.0
JPEG_QUALITY = 90


def encode_image(image, max_side=None):
    """Return a PIL image as a ``data:image/jpeg;base64,...`` URL, shrunk to ``max_side``."""
    image = image.convert('RGB')
    if max_side and max(image.size) > max_side:
        image = image.copy()
        image.thumbnail((max_side, max_side))
    buffer = io.BytesIO()
    image.save(buffer, format='JPEG', quality=JPEG_QUALITY)
    return 'data:image/jpeg;base64,' + base64.b64encode(buffer.getvalue()).decode('ascii')


def retry_after(response):
    """Return the seconds a response's ``Retry-After`` header asks for (0 when unusable)."""
    value = response.headers.get('Retry-After', '')
    try:
        return max(0.0, float(value))
    except ValueError:
        return 0.0  # an HTTP date or garbage: fall back to our own backoff


@dataclasses.dataclass(frozen=True)
class Reply:
    """The outcome of one request: the parsed JSON body, or the reason there is none.

    ``status`` is the HTTP status of the last answer (None when no answer came), so a caller
    can tell a server that refused the request from one that could not be reached.
    """

    payload: Any = None
    error: Optional[str] = None
    status: Optional[int] = None

    @property
    def ok(self):
        """Return True when the server answered 200 with a JSON body."""
        return self.error is None


class OpenAIClient:
    """Post JSON bodies to ``<base_url>/chat/completions`` with bounds, retries and a pool.

    ``settings`` is any config section with the shared endpoint keys (model, base_url,
    api_key_env, timeout_s, max_response_bytes, max_retries, retry_backoff_s, concurrency);
    ``section`` is its name in the config, used in error messages ('captioner', 'reranker').
    """

    def __init__(self, settings, section, thread_name_prefix='cgrs-openai',
                 path='/chat/completions'):
        """Check the endpoint settings and start the request pool (no request is sent yet)."""
        if not settings.model:
            raise ConfigError(
                f'{section}.model is empty; set it to the model name the endpoint serves.')
        parsed = urllib.parse.urlparse(settings.base_url)
        if parsed.scheme not in ('http', 'https') or not parsed.netloc:
            raise ConfigError(
                f'{section}.base_url {settings.base_url!r} is not an http(s) URL; use e.g. '
                'http://127.0.0.1:8000/v1.')
        self._settings = settings
        self._section = section
        self.base_url = settings.base_url
        self.url = settings.base_url.rstrip('/') + path
        self._api_key = os.environ.get(settings.api_key_env) if settings.api_key_env else None
        self._local = threading.local()
        self._sessions = []
        self._lock = threading.Lock()
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=settings.concurrency, thread_name_prefix=thread_name_prefix)

    def submit(self, fn, *args):
        """Run ``fn(*args)`` on the request pool and return its future."""
        return self._pool.submit(fn, *args)

    def close(self):
        """Stop the request pool and close the HTTP connections."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            for session in self._sessions:
                session.close()
            self._sessions.clear()

    def post(self, body, files=None):
        """POST ``body`` with retries and return a :class:`Reply` (never raises for HTTP).

        ``files`` makes it a multipart form (see ``engine.http.post_json``).
        """
        s = self._settings
        attempts = 1 + s.max_retries
        status = None
        for attempt in range(attempts):
            wait = 0.0
            try:
                response = post_json(self._session(), self.url, body, s.timeout_s,
                                     s.max_response_bytes, files)
            except BoundedHTTPError as exc:
                if exc.kind != 'deadline':  # too large or a redirect: retrying cannot help
                    return Reply(error=str(exc), status=status)
                problem = str(exc)
            except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError) as exc:
                problem = f'connection to {self.url} failed ({type(exc).__name__})'
            except requests.RequestException as exc:
                return Reply(error=f'request to {self.url} failed: {exc}', status=status)
            else:
                status = response.status_code
                if status == 200:
                    try:
                        return Reply(payload=response.json(), status=status)
                    except ValueError as exc:
                        what = ('a chat completion' if self.url.endswith('/chat/completions')
                                else 'JSON')
                        return Reply(error=f'{self.url} answered 200 but not with {what} '
                                           f'({exc!r})', status=status)
                detail = ' '.join(response.text.split())[:300]
                problem = f'HTTP {status} from {self.url}: {detail}'
                if status != 429 and status < 500:
                    if status in (401, 403):
                        problem += (f' (check the API key in ${s.api_key_env})'
                                    if s.api_key_env else f' (set {self._section}.api_key_env)')
                    return Reply(error=problem, status=status)
                wait = retry_after(response)
            if attempt + 1 < attempts:
                backoff = s.retry_backoff_s * 2 ** attempt * (1 + 0.25 * random.random())
                delay = min(MAX_BACKOFF_S, max(wait, backoff))
                logger.info('%s; retry %d/%d in %.1f s', problem, attempt + 1, s.max_retries,
                            delay)
                time.sleep(delay)
        return Reply(error=f'{problem} (gave up after {attempts} attempts)', status=status)

    def _session(self):
        # requests.Session is not documented as thread-safe: one per worker thread.
        session = getattr(self._local, 'session', None)
        if session is None:
            session = requests.Session()
            if self._api_key:
                session.headers['Authorization'] = f'Bearer {self._api_key}'
            self._local.session = session
            with self._lock:
                self._sessions.append(session)
        return session
