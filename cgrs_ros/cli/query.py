"""``cgrs query GALLERY "TEXT"``: the best matching gallery images for a description.

``cgrs query GALLERY --image PHOTO`` ranks the gallery for a photo instead (drone ->
satellite and back, engine/image_query.py); both print the same table and JSON shape.
"""

import argparse
import json

from cgrs_ros.cli.arguments import add_engine_arguments, positive_int
from cgrs_ros.engine.errors import CgrsError, QueryError
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


def load_query_image(path):
    """Decode the photo of ``--image``; QueryError naming the file when it cannot be read."""
    from cgrs_ros.engine.gallery import decode_image

    try:
        return decode_image(path)
    except FileNotFoundError:
        raise QueryError(f'query image {path} does not exist; give the path of a photo') \
            from None
    except IsADirectoryError:
        raise QueryError(f'query image {path} is a folder; give the path of a photo') from None
    except Exception as exc:  # noqa: B902 - PIL raises many types for a corrupt file
        reason = ' '.join(str(exc).split()) or type(exc).__name__
        raise QueryError(f'query image {path} cannot be read as an image ({reason}); give a '
                         'JPEG or PNG photo') from None


def _near(args):
    if (args.near is None) != (args.radius is None):
        raise CgrsError('--near LAT LON and --radius M go together: give both or neither')
    return None if args.near is None else (args.near[0], args.near[1], args.radius)


def run(args):
    """Open the indexed gallery, run one query, print the candidates."""
    from cgrs_ros.engine.config import load_config
    from cgrs_ros.engine.retriever import Retriever

    if (args.text is None) == (args.image is None):
        raise CgrsError('give a description (TEXT) or a photo (--image PHOTO), not both or '
                        'neither')
    if args.image is None and args.query_platform is not None:
        raise CgrsError('--query-platform applies to --image queries only')
    near = _near(args)
    image = load_query_image(args.image) if args.image is not None else None
    config = load_config(args.config)
    retriever = Retriever.open(args.gallery, config, state_dir=args.state)
    try:
        if image is not None:
            result = retriever.query_image(image, top_k=args.top_k, platform=args.platform,
                                           near=near,
                                           query_platform=args.query_platform or 'drone')
        elif near is not None:
            result = retriever.query(args.text, top_k=args.top_k, platform=args.platform,
                                     near=near)
        else:
            result = retriever.query(args.text, top_k=args.top_k, platform=args.platform)
    finally:
        retriever.close()
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print('\n'.join(format_result(result)))
    return 0


def _finite(text):
    """Argparse type: a finite number."""
    try:
        value = float(text)
    except ValueError:
        value = float('nan')
    if value != value or value in (float('inf'), float('-inf')):
        raise argparse.ArgumentTypeError(f'{text!r} is not a finite number')
    return value


def register(subparsers):
    """Add the ``query`` subcommand."""
    parser = subparsers.add_parser(
        'query', help='find the gallery images that match a description or a photo',
        description='Rank the images of an indexed gallery (run `cgrs index` first) for a '
                    'natural-language description, or for a photo (--image).')
    parser.add_argument('gallery', metavar='GALLERY', help='folder holding gallery.csv')
    parser.add_argument('text', metavar='TEXT', nargs='?',
                        help='the description, e.g. "the red-roofed building beside the '
                             'circular plaza" (omit it with --image)')
    parser.add_argument('--image', metavar='PHOTO',
                        help='rank the gallery for this photo instead of a description '
                             '(embedded by the image tower of the image encoder)')
    parser.add_argument('--query-platform', choices=PLATFORMS,
                        help='platform the --image photo was taken from (default drone; picks '
                             'the expert of a learned encoder with platform experts)')
    parser.add_argument('--top-k', type=positive_int, metavar='K',
                        help='candidates to return (default: retrieval.top_k)')
    parser.add_argument('--platform', choices=PLATFORMS, help='only images of this platform')
    parser.add_argument('--near', nargs=2, type=_finite, metavar=('LAT', 'LON'),
                        help='only images within --radius metres of this point (WGS84 degrees)')
    parser.add_argument('--radius', type=_finite, metavar='M',
                        help='search radius in metres around --near')
    add_engine_arguments(parser)
    parser.add_argument('--json', action='store_true', help='print the result as JSON')
    parser.set_defaults(func=run)
