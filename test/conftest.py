"""Shared test set-up: ROS isolation, offline model hubs, and helpers for real processes.

Every test run gets its own ROS_DOMAIN_ID (and every ROS test a fresh one from
``ros_domain``), discovery limited to localhost, logs in a temp dir, and the Hugging Face
hub switched off so a missing model fails at once instead of hanging on the network.
"""

import itertools
import os
import random
import tempfile

import pytest

os.environ.setdefault('ROS_AUTOMATIC_DISCOVERY_RANGE', 'LOCALHOST')
os.environ.setdefault('ROS_LOG_DIR', tempfile.mkdtemp(prefix='cgrs-roslog-'))
os.environ.setdefault('HOME', tempfile.gettempdir())
os.environ['HF_HUB_OFFLINE'] = '1'
os.environ['TRANSFORMERS_OFFLINE'] = '1'
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')

# Domain ids 1..100 are safe for DDS port arithmetic on Linux; start from the run's own id
# (make test picks one at random) and hand out successive ids so tests never share one.
_BASE_DOMAIN = int(os.environ.get('ROS_DOMAIN_ID') or random.randint(1, 100))
_domains = itertools.count()


def _next_domain():
    return 1 + (_BASE_DOMAIN - 1 + next(_domains)) % 100


@pytest.fixture
def ros_domain(monkeypatch):
    """Give this test a ROS_DOMAIN_ID of its own (set in os.environ for child processes too)."""
    domain = _next_domain()
    monkeypatch.setenv('ROS_DOMAIN_ID', str(domain))
    monkeypatch.setenv('ROS_AUTOMATIC_DISCOVERY_RANGE', 'LOCALHOST')
    return domain


@pytest.fixture(scope='module')
def module_ros_domain():
    """A ROS_DOMAIN_ID shared by the tests of one module (for a stack started once)."""
    with pytest.MonkeyPatch.context() as patch:
        domain = _next_domain()
        patch.setenv('ROS_DOMAIN_ID', str(domain))
        patch.setenv('ROS_AUTOMATIC_DISCOVERY_RANGE', 'LOCALHOST')
        yield domain


# ---- engine fixtures: tiny real models saved to disk and loaded through the real loaders ----

def _save_tiny_open_clip(folder):
    """Build a tiny open_clip CLIP from a config, save it as open_clip saves models."""
    import json

    from cgrs_ros.engine.torch_compat import ensure_torchvision
    ensure_torchvision()
    import open_clip
    from safetensors.torch import save_file
    import torch

    model_cfg = {'embed_dim': 32,
                 'vision_cfg': {'image_size': 32, 'layers': 2, 'width': 64, 'head_width': 32,
                                'patch_size': 8},
                 'text_cfg': {'context_length': 77, 'vocab_size': 49408, 'width': 64,
                              'heads': 2, 'layers': 2}}
    torch.manual_seed(0)
    model = open_clip.CLIP(**model_cfg)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / 'open_clip_config.json').write_text(json.dumps(
        {'model_cfg': model_cfg, 'preprocess_cfg': {'size': 32}}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(folder / 'open_clip_model.safetensors'))
    return folder


def _save_tiny_hf_clip(folder):
    """Build a tiny transformers CLIPModel + processor (real CLIP BPE vocab) and save them."""
    import gzip
    import json

    from cgrs_ros.engine.torch_compat import ensure_torchvision
    ensure_torchvision()
    from open_clip.tokenizer import bytes_to_unicode, default_bpe
    import torch
    import transformers

    # The CLIP BPE vocabulary ships with open_clip; write it in the files CLIPTokenizer reads.
    merges = gzip.open(default_bpe()).read().decode('utf-8').split('\n')[1:49152 - 256 - 2 + 1]
    vocab = list(bytes_to_unicode().values())
    vocab += [v + '</w>' for v in vocab]
    vocab += [''.join(m.split()) for m in merges] + ['<|startoftext|>', '<|endoftext|>']
    folder.mkdir(parents=True, exist_ok=True)
    (folder / 'vocab.json').write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / 'merges.txt').write_text('#version: 0.2\n' + '\n'.join(merges) + '\n')
    tokenizer = transformers.CLIPTokenizer(str(folder / 'vocab.json'), str(folder / 'merges.txt'))
    images = transformers.CLIPImageProcessor(size={'shortest_edge': 32},
                                             crop_size={'height': 32, 'width': 32})
    config = transformers.CLIPConfig(
        text_config={'vocab_size': len(vocab), 'hidden_size': 32, 'intermediate_size': 64,
                     'num_hidden_layers': 2, 'num_attention_heads': 2,
                     'max_position_embeddings': 77, 'bos_token_id': len(vocab) - 2,
                     'eos_token_id': len(vocab) - 1, 'pad_token_id': len(vocab) - 1},
        vision_config={'hidden_size': 32, 'intermediate_size': 64, 'num_hidden_layers': 2,
                       'num_attention_heads': 2, 'image_size': 32, 'patch_size': 8},
        projection_dim=16)
    torch.manual_seed(0)
    transformers.CLIPModel(config).save_pretrained(str(folder))
    transformers.CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(
        str(folder))
    return folder


@pytest.fixture(scope='session')
def tiny_open_clip_dir(tmp_path_factory):
    """A tiny random open_clip model saved as open_clip_config.json + safetensors."""
    return _save_tiny_open_clip(tmp_path_factory.mktemp('tiny_open_clip'))


@pytest.fixture(scope='session')
def tiny_hf_clip_dir(tmp_path_factory):
    """A tiny random transformers CLIPModel saved with save_pretrained."""
    return _save_tiny_hf_clip(tmp_path_factory.mktemp('tiny_hf_clip'))


def write_png(path, seed, size=(40, 32)):
    """Write a small PNG of seeded random colour blocks (distinct per seed)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    pixels = np.kron(blocks, np.ones((size[1] // 4, size[0] // 4, 1), dtype=np.uint8))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture
def make_png():
    """Return write_png(path, seed, size=(40, 32)): writes a small distinct PNG."""
    return write_png


# ---- captioning fixtures: tiny VLMs saved to disk, a local chat-completions endpoint ----

@pytest.fixture(scope='session')
def tiny_blip_dir(tmp_path_factory):
    """A tiny random BLIP captioner + processor saved with save_pretrained (model_factories)."""
    from model_factories import save_tiny_blip
    return save_tiny_blip(tmp_path_factory.mktemp('tiny-blip'))


@pytest.fixture(scope='session')
def tiny_llava_dir(tmp_path_factory):
    """A tiny random LLaVA chat VLM with a chat template, saved with save_pretrained."""
    from model_factories import save_tiny_llava
    return save_tiny_llava(tmp_path_factory.mktemp('tiny-llava'))


@pytest.fixture
def chat_server():
    """A chat-completions server on 127.0.0.1 (model_factories.ChatServer), closed after."""
    from model_factories import ChatServer
    server = ChatServer()
    yield server
    server.close()
