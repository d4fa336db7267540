"""Captioner backends: real tiny transformers models from disk, and a real local HTTP endpoint.

The transformers tests load tiny BLIP (plain captioner, prompted with a text prefix) and LLaVA
(chat VLM, prompted through its chat template) models, built with random weights and saved by
``model_factories`` (fixtures in conftest), through ``make_captioner``: the same code path a
real checkpoint takes. Their captions are random words, but real generated text.

The openai tests run ``model_factories.ChatServer``, a chat-completions server on 127.0.0.1 in
a thread; it decodes the uploaded image and answers with its dominant colour, so a test can see
the image arrived.
"""

import io
import socket
import threading

from cgrs_ros.engine.captioners import (
    CaptionOutcome, CHAT_PROMPTS, make_captioner, PREFIX_PROMPTS, SYSTEM_PROMPT)
from cgrs_ros.engine.config import load_config
from cgrs_ros.engine.errors import ConfigError, ModelLoadError
from model_factories import uploaded_image
import numpy as np
from PIL import Image
import pytest

MIXED_PLATFORMS = ['satellite', 'drone', 'satellite', 'ground', 'drone']


def _images():
    """Return distinct RGB-ish test images of different sizes and modes."""
    rng = np.random.RandomState(7)
    noise = [Image.fromarray((rng.rand(40 + 9 * i, 50, 3) * 255).astype('uint8'))
             for i in range(3)]
    gray = Image.fromarray((rng.rand(64, 48) * 255).astype('uint8'), mode='L')
    rgba = Image.new('RGBA', (30, 70), (200, 30, 30, 128))
    return noise + [gray, rgba]


def _truncated_jpeg():
    """Return an image whose pixel data cannot be decoded (the file was cut short)."""
    buffer = io.BytesIO()
    Image.fromarray((np.random.RandomState(1).rand(64, 64, 3) * 255).astype('uint8')).save(
        buffer, format='JPEG')
    data = buffer.getvalue()
    return Image.open(io.BytesIO(data[:len(data) // 2]))  # header intact, pixels cut


def _transformers_section(model_dir, **extra):
    return {'backend': 'transformers', 'model': model_dir, 'device': 'cpu',
            'max_new_tokens': 8, 'batch_size': 5, **extra}


@pytest.fixture(scope='module')
def blip_captioner(tiny_blip_dir):
    captioner = make_captioner(_transformers_section(tiny_blip_dir))
    yield captioner
    captioner.close()


@pytest.fixture(scope='module')
def llava_captioner(tiny_llava_dir):
    captioner = make_captioner(_transformers_section(tiny_llava_dir))
    yield captioner
    captioner.close()


def test_blip_from_disk_captions_a_mixed_batch(blip_captioner, tiny_blip_dir):
    images = _images()
    outcomes = blip_captioner.caption(images, MIXED_PLATFORMS)

    assert blip_captioner.prompt_style == 'prefix'
    assert blip_captioner.identity == \
        f'transformers:{tiny_blip_dir}:greedy:max_new_tokens=8'
    assert blip_captioner.batch_size == 5
    assert len(outcomes) == len(images)
    assert all(isinstance(o, CaptionOutcome) and o.ok and o.error is None for o in outcomes)
    for outcome, platform in zip(outcomes, MIXED_PLATFORMS):
        assert outcome.caption.strip() == outcome.caption and outcome.caption
        # BLIP echoes its text prefix; the captioner must cut it off.
        assert not outcome.caption.lower().startswith(PREFIX_PROMPTS[platform])
    # Random weights still look at the image: different images, different captions.
    assert len({o.caption for o in outcomes}) > 1
    # Greedy decoding: the same batch gives the same captions, and batching (grouped by
    # prefix) gives what one-at-a-time captioning gives.
    assert blip_captioner.caption(images, MIXED_PLATFORMS) == outcomes
    singles = [blip_captioner.caption([image], [platform])[0]
               for image, platform in zip(images, MIXED_PLATFORMS)]
    assert singles == outcomes


def test_llava_chat_model_from_disk_captions_a_mixed_batch(llava_captioner):
    images = _images()
    outcomes = llava_captioner.caption(images, MIXED_PLATFORMS)

    assert llava_captioner.prompt_style == 'chat'
    assert len(outcomes) == len(images)
    assert all(o.ok and o.caption for o in outcomes)
    for outcome in outcomes:
        # Only the generated answer comes back, not the chat prompt before it.
        assert 'assistant' not in outcome.caption
        assert 'satellite image tile' not in outcome.caption
    assert len({o.caption for o in outcomes}) > 1
    # Left padding: rows of a mixed-platform batch match captions made one at a time.
    singles = [llava_captioner.caption([image], [platform])[0]
               for image, platform in zip(images, MIXED_PLATFORMS)]
    assert singles == outcomes


def test_unreadable_image_fails_alone(blip_captioner):
    images = _images()[:2]
    outcomes = blip_captioner.caption([images[0], _truncated_jpeg(), images[1]],
                                      ['satellite', 'satellite', 'drone'])

    assert outcomes[0].ok and outcomes[2].ok
    assert not outcomes[1].ok and 'cannot read image' in outcomes[1].error
    assert outcomes[0] == blip_captioner.caption([images[0]], ['satellite'])[0]


def test_prompt_version_and_identity_follow_the_settings(tiny_blip_dir, blip_captioner):
    edited = make_captioner(_transformers_section(
        tiny_blip_dir, prompts={'satellite': 'an aerial view of'}, max_new_tokens=6))
    labelled = make_captioner(_transformers_section(tiny_blip_dir, prompt_version='v7'))
    unconditional = make_captioner(_transformers_section(
        tiny_blip_dir, prompts=dict.fromkeys(PREFIX_PROMPTS, '')))
    try:
        same = make_captioner(_transformers_section(tiny_blip_dir, batch_size=2))
        assert same.prompt_version == blip_captioner.prompt_version
        assert same.identity == blip_captioner.identity  # batch size does not change captions
        assert edited.prompt_version != blip_captioner.prompt_version
        assert edited.prompt_version.startswith('sha256:')
        assert edited.identity.endswith('max_new_tokens=6')
        assert labelled.prompt_version == 'v7'
        image = _images()[:1]
        assert edited.caption(image, ['satellite'])[0].ok
        assert unconditional.caption(image, ['ground'])[0].ok  # no prefix at all
    finally:
        for captioner in (edited, labelled, unconditional):
            captioner.close()


def test_missing_model_names_the_id_and_how_to_fetch_it(tmp_path):
    model_id = 'Salesforce/blip-image-captioning-base'
    with pytest.raises(ModelLoadError, match=f'hf download {model_id} --local-dir DIR'):
        make_captioner({'backend': 'transformers', 'model': model_id})
    with pytest.raises(ModelLoadError, match='has no config.json'):
        make_captioner({'backend': 'transformers', 'model': str(tmp_path)})


@pytest.mark.parametrize('section, message', [
    ({'backend': 'clip'}, "'transformers', 'openai', 'learned', 'manifest' or 'none'"),
    ({'backend': 'manifest'}, 'runs no model'),
    ({'backend': 'none'}, 'runs no model'),
    ({'backend': 'learned'}, 'captioner.model is empty'),
    ({'backend': 'transformers'}, 'captioner.model is empty'),
    ({'backend': 'openai', 'model': 'm', 'prompts': {'street': 'x'}}, 'unknown platform'),
    ({'backend': 'openai', 'model': 'm', 'base_url': 'localhost:8000'}, 'not an http'),
    ({'backend': 'openai', 'model': 'm', 'concurency': 2}, 'concurency'),
    ({'backend': 'openai', 'model': 'm', 'timeout_s': 0}, 'timeout_s'),
    ('openai', 'must be a mapping'),
])
def test_bad_sections_raise_config_errors(section, message):
    with pytest.raises(ConfigError, match=message):
        make_captioner(section)


def test_engine_config_section_builds_a_captioner(tmp_path):
    path = tmp_path / 'engine.yaml'
    path.write_text('captioner:\n  backend: openai\n  model: qwen2.5-vl\n'
                    '  base_url: http://127.0.0.1:9/v1\n  concurrency: 2\n'
                    '  prompts:\n    satellite: Describe the roofs.\n')
    with make_captioner(load_config(str(path)).captioner) as captioner:
        assert captioner.identity.startswith('openai:qwen2.5-vl:')
        assert captioner.prompts.text('satellite') == 'Describe the roofs.'
        assert captioner.prompts.text('drone') == CHAT_PROMPTS['drone']
    # A typo in a backend key fails when the config is loaded, not hours into a run.
    with pytest.raises(ConfigError, match='captioner.retries'):
        load_config(None, {'captioner': {'backend': 'openai', 'model': 'm', 'retries': 2}})


# ---------------------------------------------------------------------------------------------
# openai backend against a real HTTP server


def _openai_section(server, **extra):
    return {'backend': 'openai', 'model': 'tiny-vlm', 'base_url': server.url,
            'api_key_env': 'CGRS_TEST_CAPTION_KEY', 'timeout_s': 5, 'max_retries': 2,
            'retry_backoff_s': 0.01, 'concurrency': 1, 'max_new_tokens': 50, **extra}


def test_openai_sends_image_prompt_model_and_key(chat_server, monkeypatch):
    monkeypatch.setenv('CGRS_TEST_CAPTION_KEY', 'sk-test-123')
    images = [Image.new('RGB', (64, 48), (220, 20, 20)),
              Image.new('RGB', (2000, 1000), (20, 20, 230)),
              Image.new('L', (32, 32), 90)]
    platforms = ['satellite', 'drone', 'ground']
    with make_captioner(_openai_section(chat_server, concurrency=3)) as captioner:
        outcomes = captioner.caption(images, platforms)
        assert captioner.identity == 'openai:tiny-vlm:greedy:max_tokens=50:max_side=1024'
        assert captioner.prompt_version.startswith('sha256:')

    assert outcomes == [CaptionOutcome('a red roof, 64x48'),
                        CaptionOutcome('a blue roof, 1024x512'),  # shrunk before upload
                        CaptionOutcome('a red roof, 32x32')]  # grey: equal channels
    assert len(chat_server.requests) == 3
    by_platform = {}
    for request in chat_server.requests:
        assert request['path'] == '/v1/chat/completions'
        assert request['headers']['Authorization'] == 'Bearer sk-test-123'
        body = request['body']
        assert body['model'] == 'tiny-vlm'
        assert body['max_tokens'] == 50 and body['temperature'] == 0
        assert body['messages'][0] == {'role': 'system', 'content': SYSTEM_PROMPT}
        text_part, image_part = body['messages'][1]['content']
        assert image_part['type'] == 'image_url'
        by_platform[text_part['text']] = uploaded_image(body).size
    assert by_platform == {CHAT_PROMPTS['satellite']: (64, 48),
                           CHAT_PROMPTS['drone']: (1024, 512),
                           CHAT_PROMPTS['ground']: (32, 32)}


def test_openai_without_key_sends_no_auth_header(chat_server, monkeypatch):
    monkeypatch.delenv('CGRS_TEST_CAPTION_KEY', raising=False)
    with make_captioner(_openai_section(chat_server)) as captioner:
        assert captioner.caption([Image.new('RGB', (8, 8), 'green')], ['ground'])[0].ok
    assert 'Authorization' not in chat_server.requests[0]['headers']


def test_openai_retries_server_errors_and_rate_limits(chat_server):
    chat_server.plan = [500, 429, 'ok']
    with make_captioner(_openai_section(chat_server, max_retries=2)) as captioner:
        outcome, = captioner.caption([Image.new('RGB', (8, 8), 'green')], ['drone'])
    assert outcome == CaptionOutcome('a green roof, 8x8')
    assert len(chat_server.requests) == 3


def test_openai_client_error_fails_one_image_without_retry(chat_server):
    chat_server.plan = ['ok', 400, 'garbage', 'ok']
    images = [Image.new('RGB', (8, 8), c) for c in ('red', 'green', 'blue', 'red')]
    with make_captioner(_openai_section(chat_server)) as captioner:
        outcomes = captioner.caption(images + [_truncated_jpeg()], ['satellite'] * 5)
    assert outcomes[0] == CaptionOutcome('a red roof, 8x8')
    assert outcomes[1].caption is None and 'HTTP 400' in outcomes[1].error
    assert 'status 400' in outcomes[1].error  # the server's own message is kept
    assert outcomes[2].caption is None and 'not with a chat completion' in outcomes[2].error
    assert outcomes[3] == CaptionOutcome('a red roof, 8x8')
    assert outcomes[4].caption is None and 'cannot encode image' in outcomes[4].error
    assert len(chat_server.requests) == 4  # no retry of the 400, no request for the bad file


def test_openai_gives_up_after_retries_when_the_server_is_too_slow(chat_server):
    chat_server.plan = [('sleep', 2.0)] * 2
    section = _openai_section(chat_server, timeout_s=0.25, max_retries=1)
    with make_captioner(section) as captioner:
        outcome, = captioner.caption([Image.new('RGB', (8, 8), 'red')], ['satellite'])
    assert outcome.caption is None
    assert 'within 0.25 s' in outcome.error and 'gave up after 2 attempts' in outcome.error
    assert len(chat_server.requests) == 2


def test_openai_unreachable_server_is_an_error_outcome():
    with socket.socket() as probe:  # a port nothing listens on once closed
        probe.bind(('127.0.0.1', 0))
        port = probe.getsockname()[1]
    section = {'backend': 'openai', 'model': 'm', 'base_url': f'http://127.0.0.1:{port}/v1',
               'max_retries': 1, 'retry_backoff_s': 0.01}
    with make_captioner(section) as captioner:
        outcome, = captioner.caption([Image.new('RGB', (8, 8), 'red')], ['drone'])
    assert outcome.caption is None and 'connection to' in outcome.error


def test_openai_concurrency_is_bounded(chat_server):
    # The first two requests wait for each other: this only completes if two run at once.
    barrier = threading.Barrier(2, timeout=10)
    chat_server.plan = [('barrier', barrier), ('barrier', barrier)]
    images = [Image.new('RGB', (8, 8), 'blue')] * 6
    with make_captioner(_openai_section(chat_server, concurrency=2, timeout_s=20)) as captioner:
        outcomes = captioner.caption(images, ['ground'] * 6)
    assert all(o == CaptionOutcome('a blue roof, 8x8') for o in outcomes)
    assert not barrier.broken
    assert chat_server.max_inflight == 2
