"""Reranking through an OpenAI-compatible chat-completions server, scored by Yes/No logprobs.

A VLM too large for the robot (or shared by several) runs behind vLLM, llama.cpp server or
Ollama. Per candidate we send its image (inline, base64 JPEG) and the yes/no question, ask for
one token at temperature 0 with ``top_logprobs``, and read P(yes) off the logprobs of the Yes
and No answers instead of off the sampled text: a probability ranks candidates, a bare "Yes"
does not.

A server that does not return logprobs would make every score meaningless, so one tiny request
at construction checks for them and refuses such a server with what to change. Requests share
``engine.openai_client`` with the captioner: the same bounds, retries and bounded concurrency.
"""

import hashlib
import logging
import math

from cgrs_ros.engine.errors import ConfigError
from cgrs_ros.engine.openai_client import encode_image, OpenAIClient
from cgrs_ros.engine.rerankers.base import Reranker, yes_probability
import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

PROBE_IMAGE = ('RGB', (16, 16), (128, 128, 128))
PROBE_QUERY = 'a plain grey square'
# Word-start markers some servers leave on raw tokens (SentencePiece and byte-level BPE).
TOKEN_MARKERS = '\u2581\u0120'


def answer_word(token):
    """Return a token as the answer word it spells: ' Yes', 'YES' and '\u2581yes' -> 'yes'."""
    return token.strip().strip(TOKEN_MARKERS).strip().lower()


def top_logprobs(payload):
    """Return [(token, logprob)] for the first generated token, or None when there are none.

    Reads the chat-completions shape (``logprobs.content[0].top_logprobs``, a list of
    {token, logprob}) and the older completions shape (``logprobs.top_logprobs``, a list with
    one {token: logprob} dict per position).
    """
    try:
        logprobs = payload['choices'][0].get('logprobs')
    except (KeyError, IndexError, TypeError, AttributeError):
        return None
    if not isinstance(logprobs, dict):
        return None
    pairs = []
    content = logprobs.get('content')
    legacy = logprobs.get('top_logprobs')
    if isinstance(content, list) and content and isinstance(content[0], dict):
        pairs = [(alt.get('token'), alt.get('logprob'))
                 for alt in content[0].get('top_logprobs') or [] if isinstance(alt, dict)]
    elif isinstance(legacy, list) and legacy and isinstance(legacy[0], dict):
        pairs = list(legacy[0].items())
    pairs = [(token, float(logprob)) for token, logprob in pairs
             if isinstance(token, str) and isinstance(logprob, (int, float))
             and not isinstance(logprob, bool)]
    return pairs or None


def _is_completion(payload):
    return isinstance(payload, dict) and isinstance(payload.get('choices'), list) \
        and bool(payload['choices']) and isinstance(payload['choices'][0], dict)


def yes_no_score(pairs, floor):
    """Return P(yes) from (token, logprob) pairs; a missing Yes or No gets ``floor``."""
    best = {'yes': None, 'no': None}
    for token, logprob in pairs:
        word = answer_word(token)
        if word in best and math.isfinite(logprob) and (best[word] is None
                                                        or logprob > best[word]):
            best[word] = logprob
    return yes_probability(floor if best['yes'] is None else best['yes'],
                           floor if best['no'] is None else best['no'])


class OpenAIReranker(Reranker):
    """Score (query, candidate image) pairs with a VLM behind an OpenAI-compatible HTTP API."""

    def __init__(self, settings):
        """Check the settings, start the request pool and probe the server for logprobs.

        Raises ConfigError when the server cannot be reached or answers without logprobs.
        """
        self._settings = settings
        self.batch_size = settings.batch_size
        self.last_errors = []
        self._client = OpenAIClient(settings, 'reranker', thread_name_prefix='cgrs-rerank')
        try:
            self._probe()
        except BaseException:
            self._client.close()
            raise

    @property
    def identity(self):
        """Return 'openai-rerank:<model>:max_side=<px>:prompt=<hash>' (not the URL)."""
        s = self._settings
        digest = hashlib.sha256(s.prompt.encode('utf-8')).hexdigest()[:12]
        return f'openai-rerank:{s.model}:max_side={s.max_image_side}:prompt={digest}'

    compares_images = True

    def score(self, query, images, platforms, captions=None, query_image=None,
              query_platform='drone'):
        """Return P(yes) per candidate, requests concurrent (at most ``concurrency`` at once).

        With ``query_image`` (an image goal) the photo and each candidate go in one request
        with ``image_prompt``. A candidate whose image is None or whose request fails gets
        NaN; ``last_errors`` then holds one reason per NaN, in candidate order (empty when
        every candidate was scored).
        """
        self._check_inputs(images, platforms, captions)
        pair = None if query_image is None else (query_image, query_platform)
        futures = [None if image is None else
                   self._client.submit(self._score_one, query, image, platform, pair)
                   for image, platform in zip(images, platforms)]
        scores = np.full(len(images), np.nan)
        errors = []
        for i, future in enumerate(futures):
            try:
                value, error = (None, 'the image could not be read') if future is None \
                    else future.result()
            except Exception as exc:  # noqa: B902 - one candidate never fails the others
                value, error = None, f'{type(exc).__name__}: {exc}'
            if error is None:
                scores[i] = value
            else:
                errors.append(error)
        self.last_errors = errors
        if errors:
            reasons = list(dict.fromkeys(errors))
            logger.warning('%d of %d candidates not reranked by %s: %s', len(errors),
                           len(images), self._client.url, '; '.join(reasons[:3]))
        return scores

    def close(self):
        """Stop the request pool and close the HTTP connections."""
        self._client.close()

    def _body(self, query, image, platform, pair=None):
        s = self._settings
        parts = [{'type': 'image_url',
                  'image_url': {'url': encode_image(image, s.max_image_side)}},
                 {'type': 'text', 'text': s.prompt.format(platform=platform, query=query)}]
        if pair is not None:  # an image goal: the photo, the candidate, the same-place question
            photo, photo_platform = pair
            parts = [{'type': 'image_url',
                      'image_url': {'url': encode_image(photo, s.max_image_side)}},
                     parts[0],
                     {'type': 'text', 'text': s.image_prompt.format(
                         platform=platform, query_platform=photo_platform, query=query)}]
        return {
            'model': s.model,
            'messages': [{'role': 'user', 'content': parts}],
            'max_tokens': 1, 'temperature': 0, 'logprobs': True,
            'top_logprobs': s.top_logprobs,
        }

    def _score_one(self, query, image, platform, pair=None):
        """Return (P(yes), None) or (None, reason)."""
        try:
            body = self._body(query, image, platform, pair)
        except Exception as exc:  # noqa: B902 - PIL raises many types for a bad image
            return None, f'cannot encode image: {exc}'
        reply = self._client.post(body)
        if not reply.ok:
            return None, reply.error
        pairs = top_logprobs(reply.payload)
        if pairs is None:
            return None, f'{self._client.url} answered without top_logprobs'
        return yes_no_score(pairs, self._settings.logprob_floor), None

    def _probe(self):
        s = self._settings
        reply = self._client.post(self._body(PROBE_QUERY, Image.new(*PROBE_IMAGE), 'satellite'))
        where = f'the reranker server at {s.base_url}'
        if reply.status is None:  # never answered: down, wrong address, redirect, too slow
            raise ConfigError(
                f'{where} did not answer a probe request ({reply.error}); start it or set '
                f'reranker.base_url to the address that serves {s.model!r}.')
        if reply.status in (401, 403):
            raise ConfigError(f'{where} refused a probe request ({reply.error}).')
        if not reply.ok and 400 <= reply.status < 500:
            raise ConfigError(
                f'{where} refused a probe request for model {s.model!r} with '
                f'{s.top_logprobs} top logprobs ({reply.error}); check reranker.model, and '
                'lower reranker.top_logprobs if the server caps logprobs (vLLM: '
                '--max-logprobs).')
        if not reply.ok or not _is_completion(reply.payload):
            raise ConfigError(
                f'{where} failed a probe request ({reply.error or "no choices in the answer"}); '
                'check the server log, and that reranker.base_url is its OpenAI-compatible '
                '/v1 address.')
        if top_logprobs(reply.payload) is None:
            raise ConfigError(
                f'{where} answered a probe request without top_logprobs, which the openai '
                'reranker scores by; enable them on the server (vLLM: --max-logprobs of at '
                f'least {s.top_logprobs}; llama.cpp server: a build whose '
                '/v1/chat/completions returns logprobs; Ollama: 0.12.11 or newer) or set '
                'reranker.backend to one that runs the model locally (transformers, itm).')
        logger.info('%s serves %s with logprobs; reranking by P(yes)', s.base_url, s.model)
