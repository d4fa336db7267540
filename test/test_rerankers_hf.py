"""The local reranker backends (transformers yes/no logits, BLIP / BLIP-2 ITM) on real models.

Tiny random models are built from configs, saved with save_pretrained and loaded through
make_reranker, so the real loading and scoring code runs; the scores are checked against the
same quantities computed by hand from the models' own outputs.
"""

import math

from cgrs_ros.engine.errors import ConfigError, ModelLoadError
from cgrs_ros.engine.rerankers import DEFAULT_PROMPT, make_reranker
from cgrs_ros.engine.torch_compat import ensure_torchvision
import numpy as np
from PIL import Image
import pytest

QUERY = 'the red-roofed building beside the circular plaza'
PLATFORMS = ['satellite', 'drone', 'ground', 'street level ground', 'drone']


@pytest.fixture(scope='module')
def tiny_blip_itm_dir(tmp_path_factory):
    from model_factories import save_tiny_blip_itm
    return save_tiny_blip_itm(tmp_path_factory.mktemp('tiny-blip-itm'))


@pytest.fixture(scope='module')
def tiny_blip2_itm_dir(tmp_path_factory):
    from model_factories import save_tiny_blip2_itm
    return save_tiny_blip2_itm(tmp_path_factory.mktemp('tiny-blip2-itm'))


@pytest.fixture(scope='module', params=['transformers', 'itm-blip', 'itm-blip2'])
def reranker_case(request):
    """(backend, model dir) for each local backend / model family."""
    backend, _, family = request.param.partition('-')
    fixture = {'': 'tiny_llava_dir', 'blip': 'tiny_blip_itm_dir',
               'blip2': 'tiny_blip2_itm_dir'}[family]
    return backend, request.getfixturevalue(fixture)


def _images(count=5):
    rng = np.random.default_rng(7)
    return [Image.fromarray(rng.integers(0, 256, (40 + 4 * i, 32, 3), dtype=np.uint8))
            for i in range(count)]


class _Unreadable:
    """Stands in for an image whose pixels cannot be decoded."""

    def convert(self, mode):
        raise OSError('truncated file')


def _make(backend, model_dir, **extra):
    return make_reranker({'backend': backend, 'model': model_dir, 'device': 'cpu', **extra})


def test_scores_are_probabilities_and_bad_images_are_nan_only_there(reranker_case):
    backend, model_dir = reranker_case
    images = _images()
    with _make(backend, model_dir, batch_size=2) as reranker:
        assert reranker.batch_size == 2
        scores = reranker.score(QUERY, images, PLATFORMS)
        assert scores.shape == (5,) and scores.dtype == np.float64
        assert np.all((scores >= 0) & (scores <= 1))
        mixed = reranker.score(QUERY, [images[0], None, images[2], _Unreadable()],
                               PLATFORMS[:4], captions=['a roof', None, None, None])
        assert np.isnan(mixed[1]) and np.isnan(mixed[3])
        np.testing.assert_allclose(mixed[[0, 2]], scores[[0, 2]], atol=1e-5)
        assert reranker.score(QUERY, [], []).shape == (0,)
        other = reranker.score('a green football pitch with a running track', images,
                               PLATFORMS)
        assert np.abs(other - scores).max() > 1e-4
        with pytest.raises(ValueError, match='5 images, 4 platforms'):
            reranker.score(QUERY, images, PLATFORMS[:4])


def test_batches_score_like_single_candidates(reranker_case):
    # Platforms of different token lengths: the batched prompts are padded, the single ones not.
    backend, model_dir = reranker_case
    images = _images()
    with _make(backend, model_dir, batch_size=2) as reranker:
        batched = reranker.score(QUERY, images, PLATFORMS)
        single = [reranker.score(QUERY, [image], [platform])[0]
                  for image, platform in zip(images, PLATFORMS)]
    np.testing.assert_allclose(batched, single, atol=1e-5)


def test_transformers_score_is_the_yes_no_softmax_of_the_next_token_logits(tiny_llava_dir):
    ensure_torchvision()
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor
    image = _images(1)[0]
    processor = AutoProcessor.from_pretrained(tiny_llava_dir)
    model = AutoModelForImageTextToText.from_pretrained(tiny_llava_dir).eval()
    conversation = [{'role': 'user', 'content': [
        {'type': 'image', 'image': image},
        {'type': 'text', 'text': DEFAULT_PROMPT.format(platform='drone', query=QUERY)}]}]
    inputs = processor.apply_chat_template(conversation, add_generation_prompt=True,
                                           tokenize=True, return_dict=True, return_tensors='pt')
    assert processor.tokenizer.decode(inputs['input_ids'][0]).endswith('assistant :')
    with torch.no_grad():
        logits = model(**inputs).logits[0, -1].double()
    # The MiniLM tokenizer lower-cases, so every spelling of the answers is one of two tokens.
    yes, no = (logits[processor.tokenizer.convert_tokens_to_ids(t)].item() for t in ('yes', 'no'))
    expected = 1.0 / (1.0 + math.exp(no - yes))
    with _make('transformers', tiny_llava_dir) as reranker:
        assert reranker.score(QUERY, [image], ['drone'])[0] == pytest.approx(expected, abs=1e-6)


def test_image_goals_show_the_photo_then_the_candidate_with_the_image_prompt(tiny_llava_dir):
    """An image goal is one chat per candidate: the photo, the candidate, the same-place
    question; P(match) is the Yes/No softmax of its next token, batched like single rows."""
    ensure_torchvision()
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from cgrs_ros.engine.rerankers.base import DEFAULT_IMAGE_PROMPT
    photo, *candidates = _images(3)
    question = DEFAULT_IMAGE_PROMPT.format(query_platform='drone', platform='satellite',
                                           query='q')
    processor = AutoProcessor.from_pretrained(tiny_llava_dir)
    model = AutoModelForImageTextToText.from_pretrained(tiny_llava_dir).eval()
    expected = []
    for candidate in candidates:
        chat = [{'role': 'user', 'content': [
            {'type': 'image', 'image': photo}, {'type': 'image', 'image': candidate},
            {'type': 'text', 'text': question}]}]
        inputs = processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=True,
                                               return_dict=True, return_tensors='pt')
        image_token = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
        assert int((inputs['pixel_values'].shape[0])) == 2
        assert int((inputs['input_ids'] == image_token).sum()) > 0
        with torch.no_grad():
            logits = model(**inputs).logits[0, -1].double()
        yes, no = (logits[processor.tokenizer.convert_tokens_to_ids(t)].item()
                   for t in ('yes', 'no'))
        expected.append(1.0 / (1.0 + math.exp(no - yes)))
    with _make('transformers', tiny_llava_dir, batch_size=2) as reranker:
        assert reranker.compares_images
        scores = reranker.score('q', candidates, ['satellite', 'satellite'], query_image=photo)
        text_scores = reranker.score('q', candidates, ['satellite', 'satellite'])
    np.testing.assert_allclose(scores, expected, atol=1e-5)
    assert np.abs(scores - text_scores).max() > 1e-4  # not the text question


def test_itm_rerankers_refuse_a_photo(tiny_blip_itm_dir):
    with _make('itm', tiny_blip_itm_dir) as reranker:
        assert not reranker.compares_images
        with pytest.raises(ValueError, match='cannot compare a photo'):
            reranker.score(QUERY, _images(1), ['drone'], query_image=_images(1)[0])


@pytest.mark.parametrize('family', ['blip', 'blip2'])
def test_itm_score_is_the_match_probability_of_the_head(family, request):
    ensure_torchvision()
    import torch
    from transformers import AutoProcessor, Blip2ForImageTextRetrieval, BlipForImageTextRetrieval
    model_dir = request.getfixturevalue(f'tiny_{family}_itm_dir')
    images = _images(2)
    cls = BlipForImageTextRetrieval if family == 'blip' else Blip2ForImageTextRetrieval
    processor = AutoProcessor.from_pretrained(model_dir)
    model = cls.from_pretrained(model_dir).eval()
    inputs = processor(images=images, text=[QUERY] * 2, return_tensors='pt')
    inputs.pop('token_type_ids', None)
    with torch.no_grad():
        if family == 'blip':
            logits = model(**inputs, use_itm_head=True).itm_score
        else:
            logits = model(**inputs, use_image_text_matching_head=True).logits_per_image
    expected = torch.softmax(logits.double(), dim=1)[:, 1].numpy()
    with _make('itm', model_dir) as reranker:
        np.testing.assert_allclose(reranker.score(QUERY, images, ['drone'] * 2), expected,
                                   atol=1e-6)
        assert reranker.identity == f'itm:{model_dir}:{"blip" if family == "blip" else "blip-2"}'


def test_identity_names_backend_model_and_prompt(tiny_llava_dir):
    with _make('transformers', tiny_llava_dir) as default:
        identity = default.identity
    assert identity.startswith(f'transformers:{tiny_llava_dir}:')
    with _make('transformers', tiny_llava_dir, prompt='Is this {query}? ({platform})') as edited:
        assert edited.identity != identity
        assert edited.identity.startswith(f'transformers:{tiny_llava_dir}:')
        assert 0 <= edited.score(QUERY, _images(1), ['drone'])[0] <= 1
    edited.close()  # a second close is harmless
    assert edited._model is None


@pytest.mark.parametrize('backend', ['transformers', 'itm'])
def test_missing_models_name_the_path_and_how_to_fetch_it(backend, tmp_path):
    missing = str(tmp_path / 'no-such-model')
    with pytest.raises(ModelLoadError, match=f'hf download {missing} --local-dir DIR') as info:
        _make(backend, missing)
    assert 'reranker.model' in str(info.value)
    with pytest.raises(ModelLoadError, match='has no config.json'):
        _make(backend, str(tmp_path))
    with pytest.raises(ConfigError, match='reranker.model is empty'):
        make_reranker({'backend': backend})
    with pytest.raises(ConfigError, match='reranker.device'):
        _make(backend, str(tmp_path), device='toaster')


def test_models_without_the_needed_head_are_refused(tiny_blip_dir, tiny_blip_itm_dir):
    # A BLIP captioner has no trained matching head; a BLIP ITM model has no chat template.
    with pytest.raises(ModelLoadError, match='no trained matching head'):
        _make('itm', tiny_blip_dir)
    with pytest.raises(ModelLoadError, match='no chat template.*backend: itm'):
        _make('transformers', tiny_blip_itm_dir)
