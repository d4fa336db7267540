"""Encoders load through the real loaders: tiny saved open_clip / transformers models, MiniLM."""

import os

from cgrs_ros.engine.config import load_config
from cgrs_ros.engine.encoders import (HfClipEncoder, image_encoder_identity, load_image_encoder,
                                      load_text_encoder, OpenClipEncoder, text_encoder_identity)
from cgrs_ros.engine.errors import ModelLoadError
import numpy as np
import pytest


def _images(make_png, tmp_path, n=3):
    from PIL import Image
    return [Image.open(make_png(tmp_path / f'{i}.png', i)).convert('RGB') for i in range(n)]


def _check_unit_rows(array, n, dim):
    assert array.dtype == np.float32 and array.shape == (n, dim)
    np.testing.assert_allclose(np.linalg.norm(array, axis=1), 1.0, rtol=1e-5)


def test_open_clip_local_dir(tiny_open_clip_dir, make_png, tmp_path):
    encoder = OpenClipEncoder(f'local-dir:{tiny_open_clip_dir}', batch_size=2)
    assert encoder.dim == 32 and encoder.identity.startswith('open_clip:local-dir:')
    images = encoder.encode_images(_images(make_png, tmp_path))
    _check_unit_rows(images, 3, 32)
    assert encoder.images_encoded == 3
    texts = encoder.encode_texts(['a red roof', 'a green park'])
    _check_unit_rows(texts, 2, 32)
    assert not np.allclose(texts[0], texts[1])
    # Batching is a parameter, not a different result.
    np.testing.assert_allclose(encoder.encode_images(_images(make_png, tmp_path)[:1]),
                               images[:1], atol=1e-5)


def test_open_clip_checkpoint_file(tiny_open_clip_dir, tmp_path):
    # `pretrained` as a checkpoint path loads into a built-in architecture; a file of the
    # wrong architecture is a ModelLoadError that says so.
    weights = str(tiny_open_clip_dir / 'open_clip_model.safetensors')
    with pytest.raises(ModelLoadError, match='could not be loaded.*checkpoint matches'):
        OpenClipEncoder('ViT-B-32', pretrained=weights)


def test_open_clip_missing_weights_name_the_path_and_the_fix(tmp_path):
    with pytest.raises(ModelLoadError, match=r'/nope/ckpt.pt does not exist'):
        OpenClipEncoder('ViT-B-32', pretrained='/nope/ckpt.pt')
    with pytest.raises(ModelLoadError, match='has no open_clip_config.json.*huggingface-cli'):
        OpenClipEncoder(f'local-dir:{tmp_path}')
    with pytest.raises(ModelLoadError, match='random weights'):
        OpenClipEncoder('ViT-B-32', pretrained=None)
    with pytest.raises(ModelLoadError, match="no pretrained tag 'bogus'"):
        OpenClipEncoder('ViT-B-32', pretrained='bogus')


def test_open_clip_tag_not_cached_offline():
    assert os.environ.get('HF_HUB_OFFLINE') == '1'
    with pytest.raises(ModelLoadError, match='not available offline.*create_model_and_transforms'):
        OpenClipEncoder('RN50', pretrained='openai')


def test_hf_clip_local_dir(tiny_hf_clip_dir, make_png, tmp_path):
    encoder = HfClipEncoder(str(tiny_hf_clip_dir), batch_size=2)
    assert encoder.dim == 16
    _check_unit_rows(encoder.encode_images(_images(make_png, tmp_path)), 3, 16)
    _check_unit_rows(encoder.encode_texts(['a red roof', 'x', 'a long ' * 50]), 3, 16)
    cfg = load_config(None, {'image_encoder': {'backend': 'hf_clip',
                                               'model': str(tiny_hf_clip_dir)}})
    assert image_encoder_identity(cfg.image_encoder) == encoder.identity


def test_hf_clip_missing_model():
    with pytest.raises(ModelLoadError, match='does not exist.*huggingface-cli download'):
        HfClipEncoder('/nope/clip')
    with pytest.raises(ModelLoadError, match='could not be loaded.*huggingface-cli download'):
        HfClipEncoder('nobody/no-such-clip')


def test_minilm_from_its_package():
    cfg = load_config(None, {'text_encoder.threads': 1})
    encoder = load_text_encoder(cfg.text_encoder)
    assert encoder.dim == 384
    assert encoder.identity == text_encoder_identity(cfg.text_encoder)
    vectors = encoder.encode_texts(['a red-roofed house by a round plaza',
                                    'a house with a red roof next to a circular square',
                                    'a football stadium'])
    _check_unit_rows(vectors, 3, 384)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2] + 0.2
    assert load_text_encoder(cfg.text_encoder) is encoder  # loaded once per process


def test_identity_tracks_the_checkpoint(tiny_open_clip_dir, tmp_path):
    import shutil
    copy = tmp_path / 'copy'
    shutil.copytree(tiny_open_clip_dir, copy)
    cfg = load_config(None, {'image_encoder.model': f'local-dir:{copy}'})
    first = image_encoder_identity(cfg.image_encoder)
    encoder = load_image_encoder(cfg.image_encoder)
    assert encoder.identity == first
    weights = copy / 'open_clip_model.safetensors'
    weights.write_bytes(weights.read_bytes() + b'')  # same bytes, new mtime
    os.utime(weights, ns=(1, 1))
    assert image_encoder_identity(cfg.image_encoder) != first
    assert image_encoder_identity(load_config(None, {'image_encoder.backend': 'none'})
                                  .image_encoder) is None


def test_open_clip_text_vectors_equal_the_library_ones(tiny_open_clip_dir):
    # The encoder runs the text tower on the used positions only; that must not change a bit
    # of what open_clip's own encode_text returns.
    from cgrs_ros.engine.torch_compat import ensure_torchvision
    ensure_torchvision()
    import open_clip
    import torch

    name = f'local-dir:{tiny_open_clip_dir}'
    model = open_clip.create_model_and_transforms(name)[0].eval()
    texts = ['a red roof', 'the red-roofed building beside the circular plaza, south of the '
             'river, with a fountain in the middle and trees all around it']
    with torch.inference_mode():
        reference = model.encode_text(open_clip.get_tokenizer(name)(texts), normalize=True)
    ours = OpenClipEncoder(name, threads=1).encode_texts(texts)
    np.testing.assert_allclose(ours, reference.numpy(), atol=1e-5)
