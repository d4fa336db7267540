"""Latency the reranker stage adds per candidate, for the itm and transformers backends.

The stage scores the top ``reranker.k`` candidates of every query, so its cost per candidate
times k is what a query pays on top of the coarse search and the caption channel. That cost is
set by the architecture, not by the weights (one forward pass; nothing is generated), and no
pretrained weights exist on this machine, so the models are real-size architectures with random
weights, saved to a temp dir and loaded back through ``make_reranker`` (the path a downloaded
checkpoint takes):

- itm: BLIP-base image-text matching (``BlipConfig`` defaults: ViT-B/16 at 384 px, BERT-base
  text encoder with cross-attention), the size of Salesforce/blip-itm-base-coco;
- transformers: SmolVLM-256M-Instruct's shape (Idefics3: SigLIP-B/16 at 512 px, pixel shuffle
  to 64 image tokens, a 30-layer 576-wide Llama), one 512 px tile per image by default
  (``--image-splitting`` adds SmolVLM's sub-image tiles, many times the cost).

The tokenizer is the offline MiniLM WordPiece one (a smaller vocabulary than the real models';
the reranker reads only the last position's logits, so the vocabulary barely matters).

    python benchmarks/rerank_latency.py [--backends itm,transformers] [--candidates 4]
                                        [--batch-sizes 1,4] [--image-splitting]
"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np
from PIL import Image

# Run from a checkout without installing the package; the tokenizer helpers live in test/.
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), 'test'))

QUERY = 'the red-roofed building beside the circular plaza, south of the river'


def build_blip_itm_base(path, _splitting):
    """Save BLIP-base ITM (BlipConfig defaults) with random weights; return a description."""
    from model_factories import minilm_tokenizer
    from transformers import (BlipConfig, BlipForImageTextRetrieval, BlipImageProcessor,
                              BlipProcessor)
    tokenizer = minilm_tokenizer()
    config = BlipConfig(text_config={'vocab_size': len(tokenizer),
                                     'bos_token_id': tokenizer.cls_token_id,
                                     'pad_token_id': tokenizer.pad_token_id})
    model = BlipForImageTextRetrieval(config)
    model.save_pretrained(path)
    BlipProcessor(image_processor=BlipImageProcessor(), tokenizer=tokenizer).save_pretrained(path)
    return _describe('BLIP-base ITM', model, f'{config.vision_config.image_size} px')


def build_smolvlm_256m(path, splitting):
    """Save an Idefics3 model of SmolVLM-256M's shape, random weights; return a description."""
    from model_factories import CHAT_TEMPLATE, minilm_tokenizer
    from transformers import (Idefics3Config, Idefics3ForConditionalGeneration,
                              Idefics3ImageProcessor, Idefics3Processor)
    tokenizer = minilm_tokenizer()
    tokenizer.add_special_tokens({'bos_token': '[CLS]', 'eos_token': '[SEP]',
                                  'additional_special_tokens': [
                                      '<fake_token_around_image>', '<image>',
                                      '<end_of_utterance>', '<global-img>',
                                      *[f'<row_{r}_col_{c}>' for r in range(1, 7)
                                        for c in range(1, 7)]]})
    config = Idefics3Config(
        vision_config={'hidden_size': 768, 'intermediate_size': 3072, 'num_hidden_layers': 12,
                       'num_attention_heads': 12, 'image_size': 512, 'patch_size': 16},
        text_config={'model_type': 'llama', 'vocab_size': len(tokenizer), 'hidden_size': 576,
                     'intermediate_size': 1536, 'num_hidden_layers': 30,
                     'num_attention_heads': 9, 'num_key_value_heads': 3,
                     'max_position_embeddings': 8192, 'rope_theta': 100000.0,
                     'bos_token_id': tokenizer.cls_token_id,
                     'eos_token_id': tokenizer.sep_token_id,
                     'pad_token_id': tokenizer.pad_token_id, 'tie_word_embeddings': True},
        scale_factor=4, image_token_id=tokenizer.convert_tokens_to_ids('<image>'),
        tie_word_embeddings=True)
    model = Idefics3ForConditionalGeneration(config)
    model.save_pretrained(path)
    image_processor = Idefics3ImageProcessor(
        size={'longest_edge': 2048 if splitting else 512}, max_image_size={'longest_edge': 512},
        do_image_splitting=splitting)
    Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=64,
                      chat_template=CHAT_TEMPLATE).save_pretrained(path)
    tiles = '512 px tiles + global' if splitting else 'one 512 px tile'
    return _describe('SmolVLM-256M-shaped Idefics3', model, tiles)


BUILDERS = {'itm': build_blip_itm_base, 'transformers': build_smolvlm_256m}


def _describe(name, model, detail):
    params = sum(p.numel() for p in model.parameters())
    return f'{name} ({params / 1e6:.0f} M parameters, {detail})'


def _images(count):
    rng = np.random.RandomState(0)
    return [Image.fromarray((rng.rand(480, 640, 3) * 255).astype('uint8')) for _ in range(count)]


def measure(reranker, images, platforms, batch_size):
    """Return ms per candidate scoring ``images`` in model calls of ``batch_size``."""
    reranker.batch_size = batch_size
    reranker.score(QUERY, images[:batch_size], platforms[:batch_size])  # warm-up
    start = time.perf_counter()
    for i in range(0, len(images), batch_size):
        scores = reranker.score(QUERY, images[i:i + batch_size], platforms[i:i + batch_size])
        assert not np.isnan(scores).any(), 'a candidate failed to score'
    return 1000.0 * (time.perf_counter() - start) / len(images)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--backends', default='itm,transformers')
    parser.add_argument('--candidates', type=int, default=4,
                        help='candidates timed per batch size (after one warm-up call)')
    parser.add_argument('--batch-sizes', default='1,4')
    parser.add_argument('--image-splitting', action='store_true',
                        help="transformers: SmolVLM's sub-image tiles (default: one tile)")
    args = parser.parse_args(argv)
    from cgrs_ros.engine.torch_compat import ensure_torchvision
    ensure_torchvision()
    import torch
    from cgrs_ros.engine.rerankers import make_reranker

    batch_sizes = [int(b) for b in args.batch_sizes.split(',')]
    images = _images(args.candidates)
    platforms = ['drone'] * len(images)
    print(f'torch {torch.__version__}, {torch.get_num_threads()} CPU threads, '
          f'{args.candidates} candidates of 640x480 per batch size, float32 on CPU')
    for backend in args.backends.split(','):
        torch.manual_seed(0)
        with tempfile.TemporaryDirectory() as folder:
            what = BUILDERS[backend](folder, args.image_splitting)
            with make_reranker({'backend': backend, 'model': folder, 'device': 'cpu'}) as r:
                for batch_size in batch_sizes:
                    ms = measure(r, images, platforms, batch_size)
                    print(f'{backend:12s} batch {batch_size:2d}: {ms:8.1f} ms per candidate  '
                          f'[{what}]', flush=True)


if __name__ == '__main__':
    main()
