"""The openai reranker backend against a real chat-completions server on 127.0.0.1.

``model_factories.ChatServer`` runs in a thread and answers each request with the Yes/No
logprobs a test computes from that request (here: Yes when the question names the dominant
colour of the uploaded image), or without logprobs, late, or with an HTTP error. Everything
between the reranker and the socket is the production path: request pool, bounded POST,
retries, parsing.
"""

import hashlib
import logging
import math
import re
import socket
import threading
import time

from cgrs_ros.engine.errors import ConfigError
from cgrs_ros.engine.rerankers import DEFAULT_PROMPT, make_reranker
from cgrs_ros.engine.rerankers.openai_backend import OpenAIReranker
from model_factories import dominant_colour, prompt_text, uploaded_image
import numpy as np
from PIL import Image
import pytest

RED = Image.new('RGB', (64, 48), (220, 20, 20))
GREEN = Image.new('RGB', (16, 16), (20, 200, 20))
BLUE = Image.new('RGB', (40, 40), (20, 20, 230))


def _section(server, **extra):
    return {'backend': 'openai', 'model': 'tiny-vlm', 'base_url': server.url, 'timeout_s': 5,
            'max_retries': 0, 'retry_backoff_s': 0.01, 'concurrency': 2, **extra}


def _sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def _colour_judge(body):
    """Answer like a VLM asked a yes/no question: Yes when the query names the image's colour."""
    words = re.findall(r'[a-z]+', prompt_text(body).lower())
    if dominant_colour(uploaded_image(body)) not in words:
        return [(' No', -0.1), ('No', -1.0), ('Yes', -3.0)]
    if 'surely' in words:  # No is not among the top logprobs: the floor stands in for it
        return [('YES', -0.05), ('Sure', -3.5)]
    # Yes spelled two ways (the best counts), a non-answer token, No with a leading space.
    return [(' Yes', -0.2), ('Maybe', -1.5), ('yes', -0.9), (' no', -2.0)]


@pytest.mark.parametrize('shape', ['chat', 'completions'])
def test_scores_follow_the_servers_yes_no_logprobs(chat_server, shape):
    chat_server.logprobs = _colour_judge
    chat_server.logprobs_shape = shape
    section = _section(chat_server, top_logprobs=5, logprob_floor=-12.0, max_image_side=32)
    with make_reranker(section) as reranker:
        scores = reranker.score('the red roof by the river', [RED, BLUE, GREEN],
                                ['satellite', 'drone', 'ground'])
        assert reranker.last_errors == []
        surely = reranker.score('surely a red roof', [RED], ['drone'])

    np.testing.assert_allclose(scores, [_sigmoid(-0.2 + 2.0), _sigmoid(-3.0 + 0.1),
                                        _sigmoid(-3.0 + 0.1)], rtol=1e-9)
    np.testing.assert_allclose(surely, [_sigmoid(-0.05 + 12.0)], rtol=1e-9)
    assert scores[0] > 0.8 > 0.1 > scores[1]

    probe, *calls = chat_server.requests
    assert len(calls) == 4
    for call in [probe] + calls:
        body = call['body']
        assert call['path'] == '/v1/chat/completions'
        assert body['model'] == 'tiny-vlm'
        assert (body['max_tokens'], body['temperature'], body['logprobs'],
                body['top_logprobs']) == (1, 0, True, 5)
    asked = {prompt_text(c['body']): uploaded_image(c['body']).size for c in calls}
    assert asked == {
        DEFAULT_PROMPT.format(platform='satellite', query='the red roof by the river'): (32, 24),
        DEFAULT_PROMPT.format(platform='drone', query='the red roof by the river'): (32, 32),
        DEFAULT_PROMPT.format(platform='ground', query='the red roof by the river'): (16, 16),
        DEFAULT_PROMPT.format(platform='drone', query='surely a red roof'): (32, 24)}


def test_a_server_without_logprobs_is_refused_at_construction(chat_server):
    # chat_server.logprobs stays None: it answers like a server that does not serve them.
    with pytest.raises(ConfigError) as caught:
        make_reranker(_section(chat_server, top_logprobs=7))
    message = str(caught.value)
    assert chat_server.url in message and 'without top_logprobs' in message
    assert '--max-logprobs of at least 7' in message and 'Ollama: 0.12.11' in message
    assert len(chat_server.requests) == 1  # one probe, nothing more
    assert prompt_text(chat_server.requests[0]['body']).startswith('This is a satellite image')


def test_a_server_that_rejects_the_logprobs_request_is_refused(chat_server):
    chat_server.plan = [400]  # what vLLM answers when top_logprobs exceeds --max-logprobs
    with pytest.raises(ConfigError, match='refused a probe request .*status 400.*'
                                          'lower reranker.top_logprobs'):
        make_reranker(_section(chat_server))


def test_an_unreachable_server_is_refused_naming_its_url():
    with socket.socket() as probe:  # a port nothing listens on once closed
        probe.bind(('127.0.0.1', 0))
        port = probe.getsockname()[1]
    url = f'http://127.0.0.1:{port}/v1'
    with pytest.raises(ConfigError, match=f'{re.escape(url)} did not answer.*reranker.base_url'):
        make_reranker({'backend': 'openai', 'model': 'm', 'base_url': url, 'max_retries': 0})


def test_a_slow_server_gives_nan_without_hanging(chat_server, caplog):
    # One warning per call names the reasons; the reranker stays usable after a timeout.
    chat_server.logprobs = _colour_judge
    chat_server.plan = ['ok', ('sleep', 2.5)]  # the probe is answered, the next one is late
    section = _section(chat_server, timeout_s=0.5, max_retries=0, concurrency=1)
    with make_reranker(section) as reranker:
        start = time.monotonic()
        with caplog.at_level(logging.WARNING, logger='cgrs_ros.engine.rerankers'):
            scores = reranker.score('a red roof', [RED, None], ['drone', 'satellite'])
        elapsed = time.monotonic() - start
        assert np.isnan(scores).all()
        timeout, unreadable = reranker.last_errors
        assert 'within 0.5 s' in timeout and unreadable == 'the image could not be read'
        assert elapsed < 1.5
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and '2 of 2 candidates' in warnings[0].getMessage()
        again = reranker.score('a red roof', [RED, None, BLUE], ['drone'] * 3)
        assert again[0] > 0.8 and np.isnan(again[1]) and again[2] < 0.1
        assert reranker.last_errors == ['the image could not be read']
    assert len(chat_server.requests) == 4  # the image that could not be read is never sent


def test_one_failed_request_fails_only_its_candidate(chat_server):
    chat_server.logprobs = _colour_judge
    chat_server.plan = ['ok', 'ok', 500, 'garbage', 'ok']  # in order: concurrency 1
    with make_reranker(_section(chat_server, concurrency=1)) as reranker:
        scores = reranker.score('red', [RED, RED, RED, BLUE], ['drone'] * 4)
        first_error, second_error = reranker.last_errors
    assert scores[0] > 0.8 and scores[3] < 0.1 and np.isnan(scores[1:3]).all()
    assert 'HTTP 500' in first_error and 'not with a chat completion' in second_error


def test_make_reranker_builds_the_openai_backend(chat_server):
    chat_server.logprobs = _colour_judge
    section = {'backend': 'openai', 'model': 'm', 'base_url': chat_server.url}
    with make_reranker(section) as reranker:
        assert isinstance(reranker, OpenAIReranker)
        assert reranker.batch_size == 4
        digest = hashlib.sha256(DEFAULT_PROMPT.encode()).hexdigest()[:12]
        assert reranker.identity == f'openai-rerank:m:max_side=512:prompt={digest}'
        assert chat_server.url not in reranker.identity
    other = dict(section, prompt='Is this {query}? ({platform}) Yes or No.', batch_size=8,
                 max_image_side=256)
    with make_reranker(other) as reranker:
        assert reranker.batch_size == 8
        assert reranker.identity.startswith('openai-rerank:m:max_side=256:prompt=')
        assert reranker.identity.rsplit('=', 1)[1] != digest


def test_concurrency_is_bounded(chat_server):
    # The first two scoring requests wait for each other: this only completes if two run at once.
    chat_server.logprobs = _colour_judge
    barrier = threading.Barrier(2, timeout=10)
    chat_server.plan = ['ok', ('barrier', barrier), ('barrier', barrier)]
    with make_reranker(_section(chat_server, concurrency=2, timeout_s=20)) as reranker:
        scores = reranker.score('blue', [BLUE] * 6, ['ground'] * 6)
    assert np.isfinite(scores).all() and (scores > 0.8).all()
    assert not barrier.broken
    assert chat_server.max_inflight == 2
    assert len(chat_server.requests) == 7
