"""Captioning through an OpenAI-compatible chat-completions endpoint (vLLM, llama.cpp, Ollama).

Each image travels inline as a base64 JPEG data URL in an ``image_url`` content part, next to
the platform's instruction. Requests run on a bounded thread pool; transient failures (timeouts,
dropped connections, HTTP 429 and 5xx) are retried with exponential backoff, other HTTP errors
are reported at once. Every image gets its own outcome, so one refusal fails one image only.
"""

import base64
import concurrent.futures
import io
import logging
import os
import random
import threading
import time
import urllib.parse

from cgrs_ros.engine.captioners.base import Captioner, CaptionOutcome
from cgrs_ros.engine.captioners.prompts import PromptSet
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


def _message_text(payload):
    """Pull the assistant text out of a chat-completions response body."""
    content = payload['choices'][0]['message']['content']
    if isinstance(content, list):  # some servers return content parts
        content = ''.join(part.get('text', '') for part in content if isinstance(part, dict))
    if not isinstance(content, str):
        raise TypeError(f'message content is {type(content).__name__}')
    return ' '.join(content.split())


def _retry_after(response):
    value = response.headers.get('Retry-After', '')
    try:
        return max(0.0, float(value))
    except ValueError:
        return 0.0  # an HTTP date or garbage: fall back to our own backoff


class OpenAICaptioner(Captioner):
    """Caption images with a VLM served behind an OpenAI-compatible HTTP API."""

    def __init__(self, settings):
        """Check the endpoint settings and start the request pool (no request is sent yet)."""
        if not settings.model:
            raise ConfigError(
                'captioner.model is empty; set it to the model name the endpoint serves.')
        parsed = urllib.parse.urlparse(settings.base_url)
        if parsed.scheme not in ('http', 'https') or not parsed.netloc:
            raise ConfigError(
                f'captioner.base_url {settings.base_url!r} is not an http(s) URL; use e.g. '
                'http://127.0.0.1:8000/v1.')
        if settings.prompt_style == 'prefix':
            raise ConfigError(
                "captioner.prompt_style 'prefix' does not apply to chat endpoints; use 'auto'.")
        self._settings = settings
        self.batch_size = settings.batch_size
        self.prompts = PromptSet('chat', settings.prompts, settings.system_prompt,
                                 version=settings.prompt_version)
        self.url = settings.base_url.rstrip('/') + '/chat/completions'
        self._api_key = os.environ.get(settings.api_key_env) if settings.api_key_env else None
        self._local = threading.local()
        self._sessions = []
        self._lock = threading.Lock()
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=settings.concurrency, thread_name_prefix='cgrs-caption')

    @property
    def identity(self):
        """Return 'openai:<model>:greedy:max_tokens=<n>:max_side=<px>' (not the URL)."""
        # The server address is left out on purpose: the same model moved to another host
        # writes the same captions.
        s = self._settings
        return f'openai:{s.model}:greedy:max_tokens={s.max_new_tokens}:max_side={s.max_image_side}'

    @property
    def prompt_version(self):
        """Return the prompt version (configured, or a hash of the prompts in use)."""
        return self.prompts.version

    def caption(self, images, platforms):
        """Caption images concurrently (at most ``concurrency`` requests in flight)."""
        self._check_inputs(images, platforms)
        prompts = [self.prompts.text(platform) for platform in platforms]
        futures = [self._pool.submit(self._caption_one, image, prompt)
                   for image, prompt in zip(images, prompts)]
        return [future.result() for future in futures]

    def close(self):
        """Stop the request pool and close the HTTP connections."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            for session in self._sessions:
                session.close()
            self._sessions.clear()

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

    def _body(self, image, prompt):
        s = self._settings
        messages = [{'role': 'system', 'content': self.prompts.system}] \
            if self.prompts.system else []
        messages.append({'role': 'user', 'content': [
            {'type': 'text', 'text': prompt},
            {'type': 'image_url', 'image_url': {'url': encode_image(image, s.max_image_side)}},
        ]})
        return {'model': s.model, 'messages': messages, 'max_tokens': s.max_new_tokens,
                'temperature': 0}

    def _caption_one(self, image, prompt):
        try:
            body = self._body(image, prompt)
        except Exception as exc:  # noqa: B902 - PIL raises many types for a bad image
            return CaptionOutcome(error=f'cannot encode image: {exc}')
        s = self._settings
        attempts = 1 + s.max_retries
        for attempt in range(attempts):
            wait = 0.0
            try:
                response = post_json(self._session(), self.url, body, s.timeout_s,
                                     s.max_response_bytes)
            except BoundedHTTPError as exc:
                if exc.kind != 'deadline':  # too large or a redirect: retrying cannot help
                    return CaptionOutcome(error=str(exc))
                problem = str(exc)
            except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError) as exc:
                problem = f'connection to {self.url} failed ({type(exc).__name__})'
            except requests.RequestException as exc:
                return CaptionOutcome(error=f'request to {self.url} failed: {exc}')
            else:
                status = response.status_code
                if status == 200:
                    return self._parse(response)
                detail = ' '.join(response.text.split())[:300]
                problem = f'HTTP {status} from {self.url}: {detail}'
                if status != 429 and status < 500:
                    if status in (401, 403):
                        problem += (f' (check the API key in ${s.api_key_env})'
                                    if s.api_key_env else ' (set captioner.api_key_env)')
                    return CaptionOutcome(error=problem)
                wait = _retry_after(response)
            if attempt + 1 < attempts:
                backoff = s.retry_backoff_s * 2 ** attempt * (1 + 0.25 * random.random())
                delay = min(MAX_BACKOFF_S, max(wait, backoff))
                logger.info('%s; retry %d/%d in %.1f s', problem, attempt + 1, s.max_retries,
                            delay)
                time.sleep(delay)
        return CaptionOutcome(error=f'{problem} (gave up after {attempts} attempts)')

    def _parse(self, response):
        try:
            text = _message_text(response.json())
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            return CaptionOutcome(
                error=f'{self.url} answered 200 but not with a chat completion ({exc!r})')
        if not text:
            return CaptionOutcome(error='the endpoint returned an empty caption')
        limit = self._settings.max_caption_chars
        if len(text) > limit:  # keep whole words; the store and the text encoder stay bounded
            text = text[:limit].rsplit(' ', 1)[0] if ' ' in text[:limit] else text[:limit]
        return CaptionOutcome(caption=text)
