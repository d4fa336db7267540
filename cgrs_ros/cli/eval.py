"""``cgrs eval``: Recall@K on GeoText-1652, RoboSense Track 4 and project galleries.

Subcommands::

    cgrs eval geotext --ann TEST.json --images ROOT [--methods coarse,rerank,hybrid] ...
    cgrs eval track4 --queries Q.txt --gallery DIR [--gt GT] [--submission OUT.txt] ...
    cgrs eval track4 --from-submission SUB.txt --gt GT     (score a finished submission)
    cgrs eval gallery GALLERY --queries QUERIES.csv ...
    cgrs eval gallery GALLERY --image-queries [--from drone --to satellite]   (R@K and AP)
    cgrs eval university1652 ROOT | sues200 ROOT --height 150   (drone <-> satellite photos)
    cgrs eval ... --tune-weights VAL                        (choose the fusion weights on VAL)
    cgrs eval compare A.json B.json                         (deltas between two reports)
    cgrs eval plot REPORT.json --out OUT.png                (re-plot a report)
"""

import json
import sys

from cgrs_ros.cli.eval_crossview import register_crossview
from cgrs_ros.engine.errors import CgrsError


def _print_json(value):
    print(json.dumps(value, indent=2))


def _finish(report, args):
    """Write the report and plot a run asked for, then print it as a table or JSON."""
    from cgrs_ros.engine.evaluation import report as report_mod

    if getattr(args, 'report', None):
        report_mod.write_report(args.report, report)
    if getattr(args, 'plot', None):
        from cgrs_ros.engine.evaluation.plots import write_report_png
        write_report_png(report, args.plot)
    if args.json:
        _print_json(report)
    else:
        print(report_mod.format_report(report))
        for problem in report.get('problems', [])[:10]:
            print(f'skipped: {problem}', file=sys.stderr)
        if getattr(args, 'report', None):
            print(f'report: {args.report}')
        if getattr(args, 'plot', None):
            print(f'plot: {args.plot}')
    tuning = report.get('tuning')
    if tuning:
        # With --json stdout is the report alone; the lines to paste go to stderr then.
        out = sys.stderr if args.json else sys.stdout
        print('weights chosen on the validation set; paste into the engine config:', file=out)
        print(tuning['config_yaml'], end='', file=out)
    return 0


def _caption_progress(args):
    """Return the captioning progress bar of ``cgrs caption`` for a run on a terminal."""
    from cgrs_ros.cli.caption import _Bar
    return _Bar(not args.json and sys.stderr.isatty())


def _methods(args):
    from cgrs_ros.engine.evaluation.runner import parse_methods
    return parse_methods(args.methods)


def run_geotext(args):
    """Evaluate every GeoText-1652 caption as a text->image query."""
    from cgrs_ros.engine.evaluation import runner

    report = runner.evaluate_geotext(
        args.ann, args.images, config_path=args.config, methods=_methods(args),
        state_dir=args.state_dir, limit=args.limit, progress=not args.json,
        tune_path=args.tune_weights, caption_progress=_caption_progress(args))
    return _finish(report, args)


def run_track4(args):
    """Run (or score) RoboSense Track 4: write the submission, score it when --gt is given."""
    from cgrs_ros.engine.evaluation import runner

    if args.from_submission:
        if not args.gt:
            raise CgrsError('--from-submission needs --gt with the ground truth to score '
                            'against')
        report = runner.score_track4_submission(args.from_submission, args.gt,
                                                queries_path=args.queries)
        return _finish(report, args)
    if not args.queries or not args.gallery:
        raise CgrsError('cgrs eval track4 needs --queries and --gallery (or --from-submission '
                        'with --gt)')
    report = runner.evaluate_track4(
        args.queries, args.gallery, gt_path=args.gt, submission_path=args.submission,
        config_path=args.config, methods=_methods(args), state_dir=args.state_dir,
        limit=args.limit, progress=not args.json, tune_path=args.tune_weights,
        tune_gt_path=args.tune_gt, caption_progress=_caption_progress(args))
    return _finish(report, args)


def run_gallery(args):
    """Evaluate a project gallery (manifest with group_id) on a query CSV."""
    from cgrs_ros.engine.evaluation import runner

    report = runner.evaluate_gallery(
        args.gallery, args.queries, config_path=args.config, methods=_methods(args),
        state_dir=args.state_dir, limit=args.limit, progress=not args.json,
        tune_path=args.tune_weights, caption_progress=_caption_progress(args))
    return _finish(report, args)


def run_compare(args):
    """Print the metric and latency deltas from report A to report B."""
    from cgrs_ros.engine.evaluation import report as report_mod

    a = report_mod.load_report(args.a)
    b = report_mod.load_report(args.b)
    pairs = None
    if args.pair:
        pairs = []
        for text in args.pair:
            name_a, sep, name_b = text.partition(':')
            if not sep or not name_a or not name_b:
                raise CgrsError(f'--pair {text!r} is not A_METHOD:B_METHOD, e.g. '
                                'hybrid:config')
            pairs.append((name_a, name_b))
    rows = report_mod.compare_reports(a, b, pairs)
    if args.json:
        _print_json(rows)
    else:
        print(report_mod.format_comparison(rows, args.a, args.b))
    return 0


def run_plot(args):
    """Draw the Recall@K curves and latency histograms of a saved report."""
    from cgrs_ros.engine.evaluation import report as report_mod
    from cgrs_ros.engine.evaluation.plots import write_report_png

    write_report_png(report_mod.load_report(args.report_file), args.out)
    print(f'plot: {args.out}')
    return 0


def _add_run_options(parser, methods_default='coarse,rerank,hybrid', tune_help=''):
    parser.add_argument('--config', metavar='FILE', help='engine config YAML (default: built-in)')
    parser.add_argument('--methods', default=methods_default,
                        help='comma-separated retrieval methods to compare: coarse (image '
                             'embedding only), rerank (coarse top-k re-ordered by caption '
                             'similarity), hybrid (caption channel searches the whole gallery '
                             'too), config (the config file unchanged); one index serves them '
                             'all; with a reranker configured each also runs with the '
                             f'reranker stage as METHOD+reranker; default {methods_default}')
    parser.add_argument('--tune-weights', metavar='VAL',
                        help='choose retrieval.caption_weight (and reranker.weight, with a '
                             'reranker) by R@1 on these validation queries, never on the '
                             'evaluation queries, run the evaluation with them and print the '
                             f'config lines to paste; VAL is {tune_help}')
    parser.add_argument('--state-dir', '--state', dest='state_dir', metavar='DIR',
                        help='gallery: the engine state folder (default GALLERY/.cgrs); '
                             'geotext/track4: the evaluation folder holding the generated '
                             'manifest, a link to the images and the engine state (default '
                             '~/.cache/cgrs/eval/<benchmark>-<hash of the inputs>); a later run '
                             'with the same folder reuses the index and captions')
    parser.add_argument('--limit', type=int, metavar='N',
                        help='evaluate only the first N queries (a quick look)')
    parser.add_argument('--json', action='store_true', help='print the report as JSON')
    parser.add_argument('--plot', metavar='OUT.png',
                        help='write Recall@K curves and latency histograms')
    parser.add_argument('--report', metavar='OUT.json',
                        help='write the JSON report (compare two with cgrs eval compare)')


def register(subparsers):
    """Add the ``eval`` subcommand and its benchmarks."""
    parser = subparsers.add_parser(
        'eval', help='measure Recall@K (GeoText-1652, Track 4, project galleries)',
        description='Measure text->image Recall@K per retrieval method, with latency per '
                    'stage, and compare runs.')
    sub = parser.add_subparsers(dest='eval_command', metavar='BENCHMARK')

    def _help(args):
        parser.print_help()
        return 2

    parser.set_defaults(func=_help)

    geotext = sub.add_parser('geotext', help='GeoText-1652 annotation JSON + images')
    geotext.add_argument('--ann', required=True, metavar='TEST.json',
                         help='GeoText-1652 annotation JSON (its captions are the queries)')
    geotext.add_argument('--images', required=True, metavar='ROOT',
                         help='folder the annotation image paths are relative to')
    _add_run_options(geotext,
                     tune_help='an annotation JSON of the same format (e.g. held-out captions '
                               'of these images), searched in this gallery')
    geotext.set_defaults(func=run_geotext)

    track4 = sub.add_parser('track4', help='RoboSense 2025 Track 4 queries + image folder')
    track4.add_argument('--queries', metavar='QUERIES.txt', help='q_00001<TAB>text lines')
    track4.add_argument('--gallery', metavar='DIR', help='flat folder of image_<hex>.jpeg')
    track4.add_argument('--gt', metavar='GT', help='ground truth: q_00001<TAB>image_<hex> ...')
    track4.add_argument('--submission', metavar='OUT.txt',
                        help='write the official submission (q1 id1 ... id10) of the first '
                             'method')
    track4.add_argument('--from-submission', metavar='SUB.txt',
                        help='score an existing submission file against --gt instead of '
                             'running retrieval')
    track4.add_argument('--tune-gt', metavar='GT',
                        help='ground truth of the --tune-weights queries (format of --gt)')
    _add_run_options(track4, methods_default='config',
                     tune_help='a query file of the same format (with --tune-gt), searched in '
                               'this gallery')
    track4.set_defaults(func=run_track4)

    gallery = sub.add_parser('gallery', help='a project gallery with group_id + a query CSV')
    gallery.add_argument('gallery', metavar='GALLERY', help='gallery folder (with gallery.csv)')
    gallery.add_argument('--queries', metavar='QUERIES.csv',
                         help='CSV with columns query, group_id (optional platform)')
    _add_run_options(gallery,
                     tune_help='a query CSV searched in this gallery, or a gallery folder with '
                               'its own queries.csv (another town)')
    gallery.set_defaults(func=run_gallery)
    register_crossview(sub, gallery)  # university1652, sues200, gallery --image-queries

    compare = sub.add_parser('compare', help='print the deltas between two reports')
    compare.add_argument('a', metavar='A.json')
    compare.add_argument('b', metavar='B.json')
    compare.add_argument('--pair', action='append', metavar='A_METHOD:B_METHOD',
                         help='compare method A_METHOD of A with B_METHOD of B (repeatable; '
                              'default: the methods both reports have)')
    compare.add_argument('--json', action='store_true', help='print the rows as JSON')
    compare.set_defaults(func=run_compare)

    plot = sub.add_parser('plot', help='draw a saved report as PNG')
    plot.add_argument('report_file', metavar='REPORT.json')
    plot.add_argument('--out', required=True, metavar='OUT.png')
    plot.set_defaults(func=run_plot)
