"""``cgrs bench``: query latency vs its floor on synthetic galleries, and re-index speed."""

import json
import shutil
import sys
import tempfile

from cgrs_ros.cli.arguments import positive_int
from cgrs_ros.engine.errors import CgrsError


def _format_query(r):
    stages = ', '.join(f'{k} {v["p50"]:.1f}' for k, v in r['stages_ms'].items())
    lines = [f'N={r["gallery_size"]:>8}: p50 {r["p50_ms"]:7.1f} ms  p95 {r["p95_ms"]:7.1f} ms  '
             f'floor {r["floor_ms"]:7.1f} ms  ratio {r["ratio_p50_to_floor"]:.2f}  '
             f'{r["bytes_per_item"]:.0f} B/item (indexes {r["index_bytes_per_item"]:.0f}, '
             f'area filter {r["area_filter_bytes_per_item"]:.0f})  [p50 per stage: {stages}]']
    if r.get('index_type'):
        recall = r['recall_at_10']
        lines.append(f'           image index {r["index_type"]} ({r["index_factory"]}), recall@10 '
                     f'{recall:.3f} vs exact, {r["search_breadth"]}, built in '
                     f'{r["index_build_s"]:.0f} s, opened (mmap) in {r["index_open_s"]:.2f} s')
    for radius, f in r.get('radius_queries', {}).items():
        lines.append(f'           within {radius} m (~{f["items_inside_p50"]:.0f} items): p50 '
                     f'{f["p50_ms"]:.1f} ms (coarse {f["coarse_p50_ms"]:.1f}) vs unfiltered '
                     f'{f["unfiltered_p50_ms"]:.1f} ms')
    return '\n'.join(lines)


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
        index = {key: value for key, value in (('type', args.index_type),
                                               ('nprobe', args.nprobe)) if value is not None}
        captions = (size <= args.captions_max) if args.captions == 'auto' else (
            args.captions == 'on')
        result = bench.bench_query(
            size, image, text, n_queries=args.queries, retrieval=retrieval,
            query_threads=args.query_threads, index=index, captions=captions, radii=args.radius,
            log=say)
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
    parser.add_argument('--index-type', metavar='TYPE',
                        help='image index type, as index.type in the config (default: auto, '
                             'by gallery size)')
    parser.add_argument('--nprobe', type=positive_int,
                        help='IVF lists searched (default: tuned at build to reach recall 0.95)')
    parser.add_argument('--captions', choices=('auto', 'on', 'off'), default='auto',
                        help='give every item a caption (an exact 384-d caption index, 1.5 kB '
                             'an item); auto: up to --captions-max items')
    parser.add_argument('--captions-max', type=positive_int, default=2_000_000, metavar='N')
    parser.add_argument('--radius', type=float, nargs='*', default=[], metavar='M',
                        help='also time queries restricted to M metres around a random gallery '
                             'position (near), each against the same query unrestricted')
    parser.add_argument('--index-images', type=int, default=0, metavar='N',
                        help='also time indexing N generated images twice (default: skip)')
    parser.add_argument('--json', action='store_true', help='print the figures as JSON')
    parser.set_defaults(func=run)
