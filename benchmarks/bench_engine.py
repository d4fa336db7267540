#!/usr/bin/env python3
"""Engine benchmark: query latency vs floor at 100k items, memory per item, re-index speed.

Runs the same code as ``cgrs bench`` with the settings the targets are stated for:

- query p50 at 100k items within 1.5x of the floor (encoders' forward + bare FAISS search),
  with open_clip ViT-B-32 (random weights, real size) and the real all-MiniLM-L6-v2;
- a second ``cgrs index`` over an unchanged gallery at least 20x faster than the first.

Usage: ``python benchmarks/bench_engine.py [--sizes 10000 100000] [--index-images 200]
[--threads 0] [--query-threads 1] [--json OUT.json]``. Prints one line per figure; --json
also writes them all to a file.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault('HF_HUB_OFFLINE', '1')

from cgrs_ros.cli.bench import _format_query  # noqa: E402 (after the path set-up above)
from cgrs_ros.engine import bench  # noqa: E402


def main():
    """Run the benchmarks and print (and optionally save) the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--sizes', type=int, nargs='+', default=[10000, 100000])
    parser.add_argument('--queries', type=int, default=60)
    parser.add_argument('--index-images', type=int, default=200)
    parser.add_argument('--threads', type=int, default=0, help='torch threads for indexing')
    parser.add_argument('--query-threads', type=int, default=1,
                        help='torch threads for encoding a query')
    parser.add_argument('--image-model', default='ViT-B-32')
    parser.add_argument('--json', metavar='OUT', help='also write the figures to this file')
    args = parser.parse_args()

    image, text = bench.load_bench_encoders(args.image_model, threads=args.threads)
    report = {'threads': args.threads, 'query_threads': args.query_threads,
              'cpu_count': os.cpu_count(),
              'load_avg_at_start': os.getloadavg(), 'query': [], 'index': None}
    for channel in ('rerank', 'hybrid'):
        for size in args.sizes:
            result = bench.bench_query(size, image, text, n_queries=args.queries,
                                       retrieval={'caption_channel': channel},
                                       query_threads=args.query_threads)
            report['query'].append(result)
            print(f'{channel:6} {_format_query(result)}')
            print(f'       plain queries p50 {result["p50_ms_plain_queries"]:.1f} ms, '
                  f'queries with orientation words p50 '
                  f'{result["p50_ms_orientation_queries"]:.1f} ms '
                  f'({result["orientation_query_share"]:.0%} of queries)')
    if args.index_images:
        work = tempfile.mkdtemp(prefix='cgrs-bench-')
        try:
            model_dir = bench.save_random_open_clip(os.path.join(work, 'model'),
                                                    args.image_model)
            index = bench.bench_index(args.index_images, model_dir, threads=args.threads,
                                      work_dir=os.path.join(work, 'index'))
        finally:
            shutil.rmtree(work, ignore_errors=True)
        report['index'] = index
        print(f'index {index["index_images"]} images: first {index["first_index_s"]:.2f} s, '
              f'unchanged re-index {index["second_index_s"]:.3f} s '
              f'({index["reindex_speedup"]:.0f}x faster, {index["second_images_embedded"]} '
              f'embedded and {index["second_models_loaded"]} models loaded on the second run)')
    report['load_avg_at_end'] = os.getloadavg()
    if args.json:
        with open(args.json, 'w') as handle:
            json.dump(report, handle, indent=2)
    return 0


if __name__ == '__main__':
    sys.exit(main())
