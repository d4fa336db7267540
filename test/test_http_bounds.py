"""The openai captioner is bounded whatever its server does (issue 16, item 4).

A local server on 127.0.0.1 (hostile_inputs.MisbehavingServer) misbehaves on purpose: it
drips its answer one byte at a time, never finishes, sends a 50 MB caption, sends a caption of
20,000 characters, and redirects to another host. Each failed on main before: the drip held
an image for minutes with ``timeout_s: 5``, the huge caption was stored whole, the redirect
was followed.
"""

import time

from cgrs_ros.engine.captioners import make_captioner
from hostile_inputs import MisbehavingServer
from PIL import Image
import pytest


@pytest.fixture(scope='module')
def server():
    with MisbehavingServer() as srv:
        yield srv


def _caption(server, mode, **extra):
    section = dict({'backend': 'openai', 'model': 'm', 'timeout_s': 2, 'max_retries': 0,
                    'base_url': server.base_url(mode)},
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
