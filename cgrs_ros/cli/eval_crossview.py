"""``cgrs eval university1652|sues200`` and ``cgrs eval gallery --image-queries``.

Cross-view image-query benchmarks (engine/evaluation/crossview.py): R@1/5/10 and AP per
direction (d2s, s2d). Kept apart from ``cli/eval.py``, which registers them with one call, so
the text benchmarks' options (methods, weight tuning) do not leak into image queries.
"""

from cgrs_ros.engine.errors import CgrsError
from cgrs_ros.engine.gallery import PLATFORMS

DIRECTION_CHOICES = ('d2s', 's2d')


def _directions(args):
    return [args.direction] if args.direction else None


def run_university1652(args):
    """Evaluate University-1652's test split (d2s and s2d)."""
    from cgrs_ros.cli.eval import _finish
    from cgrs_ros.engine.evaluation import crossview

    report = crossview.evaluate_university1652(
        args.root, _directions(args), config_path=args.config, state_dir=args.state_dir,
        limit=args.limit, progress=not args.json)
    return _finish(report, args)


def run_sues200(args):
    """Evaluate SUES-200's test split at one flight height."""
    from cgrs_ros.cli.eval import _finish
    from cgrs_ros.engine.evaluation import crossview

    report = crossview.evaluate_sues200(
        args.root, args.height, _directions(args), config_path=args.config,
        state_dir=args.state_dir, limit=args.limit, progress=not args.json)
    return _finish(report, args)


def run_gallery_any(args):
    """Run ``cgrs eval gallery``: image queries with --image-queries, else the text queries."""
    from cgrs_ros.cli.eval import _finish, run_gallery

    if not args.image_queries:
        if args.source or args.target:
            raise CgrsError('--from and --to go with --image-queries')
        if not args.queries:
            raise CgrsError('cgrs eval gallery needs --queries QUERIES.csv (text queries) or '
                            '--image-queries (its own photos as queries)')
        return run_gallery(args)
    if args.queries:
        raise CgrsError('--queries (text) and --image-queries are two runs; give one of them')
    if getattr(args, 'tune_weights', None):
        raise CgrsError('--tune-weights tunes the text fusion weights; image queries have none')
    from cgrs_ros.engine.evaluation import crossview

    report = crossview.evaluate_gallery_images(
        args.gallery, args.source or 'drone', args.target or 'satellite',
        config_path=args.config, state_dir=args.state_dir, limit=args.limit,
        progress=not args.json)
    return _finish(report, args)


def _add_options(parser):
    parser.add_argument('--config', metavar='FILE',
                        help='engine config YAML; its image_encoder embeds queries and gallery')
    parser.add_argument('--direction', choices=DIRECTION_CHOICES,
                        help='evaluate one direction only (default: both that the data has)')
    parser.add_argument('--state-dir', '--state', dest='state_dir', metavar='DIR',
                        help='evaluation folder holding the generated manifest, a link to the '
                             'images and the engine state (default ~/.cache/cgrs/eval/'
                             '<benchmark>-<hash of the inputs>); a later run reuses its index')
    parser.add_argument('--limit', type=int, metavar='N',
                        help='evaluate only the first N queries per direction (a quick look)')
    parser.add_argument('--json', action='store_true', help='print the report as JSON')
    parser.add_argument('--plot', metavar='OUT.png',
                        help='write Recall@K curves and latency histograms')
    parser.add_argument('--report', metavar='OUT.json',
                        help='write the JSON report (compare two with cgrs eval compare)')


def register_crossview(sub, gallery):
    """Add the cross-view benchmarks to ``cgrs eval`` and image queries to its gallery parser."""
    university = sub.add_parser(
        'university1652', help='University-1652 drone <-> satellite image queries (R@K, AP)',
        description='Rank University-1652 satellite tiles for each drone photo (d2s) and drone '
                    'photos for each satellite tile (s2d) with the image encoder of the config; '
                    'report R@1, R@5, R@10 and AP per direction.')
    university.add_argument('root', metavar='ROOT',
                            help='University-1652 folder (holding test/query_drone, '
                                 'test/gallery_satellite, ...) or its test folder')
    _add_options(university)
    university.set_defaults(func=run_university1652)

    sues = sub.add_parser(
        'sues200', help='SUES-200 drone <-> satellite image queries at one height (R@K, AP)',
        description='Rank SUES-200 satellite images for each drone photo taken at --height '
                    '(d2s) and the reverse (s2d); report R@1, R@5, R@10 and AP per direction.')
    sues.add_argument('root', metavar='ROOT',
                      help='SUES-200 folder (drone-view/ and satellite-view/, or the Testing '
                           'folder its split script writes)')
    sues.add_argument('--height', required=True, type=int, choices=(150, 200, 250, 300),
                      help='flight height of the drone views, metres')
    _add_options(sues)
    sues.set_defaults(func=run_sues200)

    gallery.add_argument('--image-queries', action='store_true',
                         help='use the --from photos of the gallery as queries against its --to '
                              'images (a hit: same group_id) and report R@K and AP')
    gallery.add_argument('--from', dest='source', choices=PLATFORMS,
                         help='query platform of --image-queries (default drone)')
    gallery.add_argument('--to', dest='target', choices=PLATFORMS,
                         help='gallery platform of --image-queries (default satellite)')
    gallery.set_defaults(func=run_gallery_any)
