"""``cgrs bench``: query latency vs its floor on synthetic galleries, and re-index speed."""

import json
import shutil
import sys
import tempfile

from cgrs_ros.cli.arguments import positive_int
from cgrs_ros.engine.errors import CgrsError


def _format_query(r):
    stages = ', '.join(f'{k} {v["p50"]:.1f}' for k, v in r['stages_ms'].items())
    return (f'N={r["gallery_size"]:>8}: p50 {r["p50_ms"]:7.1f} ms  p95 {r["p95_ms"]:7.1f} ms  '
            f'floor {r["floor_ms"]:7.1f} ms  ratio {r["ratio_p50_to_floor"]:.2f}  '
            f'{r["bytes_per_item"]:.0f} B/item (indexes {r["index_bytes_per_item"]:.0f})  '
            f'[p50 per stage: {stages}]')


def run(args):
    """Run the benchmarks and print the figures."""
    from cgrs_ros.engine import bench
    from cgrs_ros.engine.config import load_config

    retrieval = load_config(args.config).retrieval.model_dump() if args.config else {}
    for key in ('caption_channel', 'fusion', 'coarse_k'):
        if getattr(args, key) is not None:
            retrieval[key] = getattr(args, key)
    say = (lambda msg: None) if args.json else (lambda msg: print(msg, file=sys.stderr))
    say(f'loading encoders ({args.image_model}, {args.text_model}) ...')
    image, text = bench.load_bench_encoders(args.image_model, args.text_model, args.threads)
    results = []
    for size in args.gallery_size:
        say(f'gallery of {size} items, {args.queries} queries ...')
        result = bench.bench_query(size, image, text, n_queries=args.queries,
                                   retrieval=retrieval, query_threads=args.query_threads)
        results.append(result)
        if not args.json:
            print(_format_query(result))
    if args.index_images:
        work = tempfile.mkdtemp(prefix='cgrs-bench-')
        try:
            model = args.image_model
            if model.startswith('learned:'):
                raise CgrsError('--index-images times open_clip indexing; leave it out with '
                                '--image-model learned:DIR')
            if model.startswith('local-dir:'):
                model_dir = model[len('local-dir:'):]
            else:
                say(f'saving {model} with random weights for the index benchmark ...')
                model_dir = bench.save_random_open_clip(f'{work}/model', model)
            say(f'indexing {args.index_images} images twice ...')
            index = bench.bench_index(args.index_images, model_dir, threads=args.threads,
                                      work_dir=f'{work}/index', progress=not args.json)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        for result in results:
            result.update(index)
        if not results:
            results.append(index)
        if not args.json:
            print(f'index {index["index_images"]} images: first {index["first_index_s"]:.2f} s, '
                  f'unchanged re-index {index["second_index_s"]:.3f} s, '
                  f'{index["reindex_speedup"]:.0f}x faster '
                  f'({index["second_images_embedded"]} images embedded, '
                  f'{index["second_models_loaded"]} models loaded on the second run)')
    if args.json:
        print(json.dumps(results[0] if len(results) == 1 else results, indent=2))
    return 0


def register(subparsers):
    """Add the ``bench`` subcommand."""
    parser = subparsers.add_parser(
        'bench', help='query latency vs its floor on synthetic galleries',
        description='Query latency p50/p95 per stage on synthetic galleries of N items (random '
                    'unit vectors; real-size encoders, random weights for an architecture '
                    'name), the floor measured in the same run (encoder forward passes + bare '
                    'FAISS search), their ratio and memory per item. With --index-images, also '
                    'the time of a first index and of an unchanged re-index.')
    parser.add_argument('--gallery-size', type=positive_int, nargs='+', default=[100000],
                        metavar='N', help='gallery sizes (default: 100000)')
    parser.add_argument('--queries', type=int, default=50, help='timed queries per size')
    parser.add_argument('--image-model', default='ViT-B-32',
                        help="open_clip architecture (random weights), 'local-dir:PATH', "
                             "'learned:DIR' (a `cgrs train dual` folder), or 'none' for "
                             'caption-only (default: ViT-B-32)')
    parser.add_argument('--text-model', default='all-MiniLM-L6-v2')
    parser.add_argument('--threads', type=int, default=0,
                        help='torch CPU threads for indexing (0: torch default)')
    parser.add_argument('--query-threads', type=int, default=1,
                        help='torch CPU threads for encoding a query (default: 1)')
    parser.add_argument('--caption-channel', choices=('rerank', 'hybrid'))
    parser.add_argument('--fusion', choices=('weighted', 'rrf'))
    parser.add_argument('--coarse-k', type=int)
    parser.add_argument('--config', metavar='FILE', help='take the retrieval section from here')
    parser.add_argument('--index-images', type=int, default=0, metavar='N',
                        help='also time indexing N generated images twice (default: skip)')
    parser.add_argument('--json', action='store_true', help='print the figures as JSON')
    parser.set_defaults(func=run)
