"""``cgrs query GALLERY "TEXT"``: the best matching gallery images for a description."""

import json

from cgrs_ros.cli.arguments import add_engine_arguments, positive_int
from cgrs_ros.engine.gallery import PLATFORMS


def _score(value):
    return '-' if value is None else f'{value:.3f}'


def format_result(result):
    """Return the human-readable lines of a QueryResult."""
    lines = [f'query: {result.query}']
    if result.normalized_query != result.query:
        lines.append(f'normalized (satellite): {result.normalized_query}')
    lines.append(f'{"#":>2} {"image_id":20} {"platform":9} {"lat":>11} {"lon":>12} '
                 f'{"fused":>6} {"coarse":>6} {"caption":>7}  caption')
    for cand in result.candidates:
        caption = (cand.caption or '')
        caption = caption if len(caption) <= 60 else caption[:57] + '...'
        lines.append(f'{cand.rank:>2} {cand.image_id:20} {cand.platform:9} {cand.lat:11.6f} '
                     f'{cand.lon:12.6f} {cand.fused_score:6.3f} {_score(cand.coarse_score):>6} '
                     f'{_score(cand.caption_score):>7}  {caption}')
    if not result.candidates:
        lines.append('  (no match: is the platform filter too narrow?)')
    elif result.no_match:
        lines.append(f'no match: {result.no_match}')
    timings = ', '.join(f'{k} {v:.1f} ms' for k, v in result.timings_ms.items())
    lines.append(f'time: {timings}')
    return lines


def run(args):
    """Open the indexed gallery, run one query, print the candidates."""
    from cgrs_ros.engine.config import load_config
    from cgrs_ros.engine.retriever import Retriever

    config = load_config(args.config)
    retriever = Retriever.open(args.gallery, config, state_dir=args.state)
    try:
        result = retriever.query(args.text, top_k=args.top_k, platform=args.platform)
    finally:
        retriever.close()
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print('\n'.join(format_result(result)))
    return 0


def register(subparsers):
    """Add the ``query`` subcommand."""
    parser = subparsers.add_parser(
        'query', help='find the gallery images that match a description',
        description='Rank the images of an indexed gallery (run `cgrs index` first) for a '
                    'natural-language description.')
    parser.add_argument('gallery', metavar='GALLERY', help='folder holding gallery.csv')
    parser.add_argument('text', metavar='TEXT', help='the description, e.g. "the red-roofed '
                                                     'building beside the circular plaza"')
    parser.add_argument('--top-k', type=positive_int, metavar='K',
                        help='candidates to return (default: retrieval.top_k)')
    parser.add_argument('--platform', choices=PLATFORMS, help='only images of this platform')
    add_engine_arguments(parser)
    parser.add_argument('--json', action='store_true', help='print the result as JSON')
    parser.set_defaults(func=run)
