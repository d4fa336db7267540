"""What a resumable captioning run costs on top of the captioner itself.

``cgrs caption`` commits every batch to SQLite and stores the new captions' MiniLM embeddings
before the next batch, so a crash loses at most one batch and queries see new captions at
once. This script measures that pipeline with a captioner that costs (almost) nothing: the
openai backend against a chat-completions server on 127.0.0.1 that answers at once. The run
therefore times image decoding, JPEG upload, HTTP, the per-batch commit and embedding, and
the ``captioned/s`` it prints is an upper bound no real VLM gets near (BLIP-base on a CPU core
writes about 0.5 captions/s; see bench_captioning.py), i.e. the pipeline's share of a real run.

    python benchmarks/bench_caption_run.py [--images 200] [--batch-sizes 1,8,32]
"""

import argparse
import os
from pathlib import Path
import sys
import tempfile
import time

# Run from a checkout without installing the package; the chat server lives with the tests.
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / 'test'))
os.environ.setdefault('HF_HUB_OFFLINE', '1')


def _gallery(root, n):
    from PIL import Image
    (root / 'img').mkdir(parents=True)
    rows = ['image_id,path,lat,lon,alt,heading_deg,platform,group_id,description']
    for i in range(n):
        Image.new('RGB', (256, 256), (i % 256, (7 * i) % 256, 90)).save(root / 'img' / f'{i}.png')
        rows.append(f'i{i},img/{i}.png,47.0,8.0,400,0,{("satellite", "drone")[i % 2]},g{i},')
    (root / 'gallery.csv').write_text('\n'.join(rows) + '\n')


def main():
    """Time captioning runs per batch size and print images/s and per-batch overhead."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--images', type=int, default=200)
    parser.add_argument('--batch-sizes', default='1,8,32')
    args = parser.parse_args()

    from cgrs_ros.engine.captioning import run_captioning
    from cgrs_ros.engine.config import load_config
    from cgrs_ros.engine.encoders import load_text_encoder
    from model_factories import ChatServer

    server = ChatServer()
    try:
        base = {'image_encoder': {'backend': 'none'}, 'text_encoder': {'threads': 1},
                'captioner': {'backend': 'openai', 'model': 'bench', 'base_url': server.url,
                              'concurrency': 4, 'max_retries': 0, 'api_key_env': None}}
        load_text_encoder(load_config(None, base).text_encoder)  # load MiniLM outside timing
        print(f'{args.images} images (256x256 PNG), openai backend, instant local endpoint')
        print(f'{"batch":>6} {"seconds":>8} {"images/s":>9} {"ms/batch":>9} {"commits":>8}')
        for size in [int(s) for s in args.batch_sizes.split(',')]:
            with tempfile.TemporaryDirectory() as tmp:
                gallery = Path(tmp)
                _gallery(gallery, args.images)
                config = load_config(None, base)
                start = time.perf_counter()
                summary = run_captioning(gallery, config, batch_size=size)
                seconds = time.perf_counter() - start
                assert summary.new_captions == args.images, summary
                batches = -(-args.images // size)
                print(f'{size:>6} {seconds:>8.2f} {args.images / seconds:>9.1f} '
                      f'{1e3 * seconds / batches:>9.1f} {batches:>8}')
    finally:
        server.close()


if __name__ == '__main__':
    main()
