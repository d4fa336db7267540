"""``cgrs calibrate GALLERY...``: fit the confidence of rankings on validation queries.

Each gallery needs a ``queries.csv`` (query, group_id) of goals with known answers. Every query
is ranked with the engine config; the features of each ranking (engine/confidence.py) and
whether its best candidate was the intended place are fitted with a logistic regression, and
the ``confidence:`` section to paste into the engine config is printed. ``--check GALLERY``
scores the fit on galleries it never saw, with the share of goals ``confirm_below`` would hold
at ``--min-confidence`` / ``--min-margin`` and the rank-1 accuracy of those it lets through.
"""

import json
from pathlib import Path
import sys

from cgrs_ros.cli.arguments import add_engine_arguments
from cgrs_ros.engine.errors import CgrsError


def observe_gallery(gallery, config_path, state_dir=None, limit=None, progress=True):
    """Index ``gallery`` with the config and return the confidence Observations of its queries."""
    from cgrs_ros.engine import confidence
    from cgrs_ros.engine.config import load_config
    from cgrs_ros.engine.evaluation.datasets import read_gallery_queries
    from cgrs_ros.engine.indexer import index_gallery
    from cgrs_ros.engine.retriever import Retriever

    config = load_config(config_path)
    queries = read_gallery_queries(Path(gallery) / 'queries.csv').queries[:limit]
    if progress:
        print(f'indexing {gallery} ...', file=sys.stderr)
    index_gallery(gallery, config, state_dir=state_dir, progress=False)
    retriever = Retriever.open(gallery, config, state_dir=state_dir)
    try:
        if progress:
            print(f'ranking {len(queries)} queries of {gallery} ...', file=sys.stderr)
        return confidence.observe(retriever, queries, config.confidence.pool_k)
    finally:
        retriever.close()


def section_yaml(intercept, weights, fitted_on):
    """Return the ``confidence:`` YAML section for an engine config."""
    lines = ['confidence:', f'  intercept: {intercept:.6f}', '  weights:']
    lines += [f'    {name}: {weight:.6f}' for name, weight in weights.items()]
    lines.append(f'  fitted_on: {json.dumps(fitted_on)}')
    return '\n'.join(lines)


def _print_report(name, rep):
    print(f'{name}: {rep["queries"]} queries, R@1 {rep["r_at_1"]:.3f}, Brier '
          f'{rep["brier"]:.3f}; confirm_below (min_confidence {rep["min_confidence"]:g}, '
          f'min_margin {rep["min_margin"]:g}) holds {rep["held"]:.1%}, R@1 of the rest '
          f'{rep["r_at_1_passed"]:.3f}')
    for row in rep['reliability']:
        print(f'  confidence {row["bin"]}: {row["queries"]:4d} queries, mean '
              f'{row["mean_confidence"]:.2f}, right {row["share_right"]:.2f}')


def run(args):
    """Fit on the galleries, score on --check galleries, print the config section."""
    from cgrs_ros.engine import confidence

    fit_obs = []
    for gallery in args.galleries:
        fit_obs += observe_gallery(gallery, args.config, args.state, args.limit,
                                   not args.json)
    try:
        intercept, weights = confidence.fit(fit_obs)
    except ValueError as exc:
        raise CgrsError(str(exc)) from None
    names = ', '.join(Path(g).name for g in args.galleries)
    fitted_on = (f'{len(fit_obs)} queries of {names} with {Path(args.config).name}'
                 if args.config else f'{len(fit_obs)} queries of {names}')
    thresholds = (args.min_confidence, args.min_margin)
    out = {'intercept': intercept, 'weights': weights, 'fitted_on': fitted_on,
           'fit': confidence.report(fit_obs, intercept, weights, *thresholds), 'check': {}}
    for gallery in args.check or ():
        obs = observe_gallery(gallery, args.config, None, args.limit, not args.json)
        out['check'][gallery] = confidence.report(obs, intercept, weights, *thresholds)
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    _print_report('fit', out['fit'])
    for gallery, rep in out['check'].items():
        _print_report(f'check {gallery}', rep)
    print('\n# add to the engine config:')
    print(section_yaml(intercept, weights, fitted_on))
    return 0


def register(subparsers):
    """Add the ``calibrate`` subcommand."""
    parser = subparsers.add_parser(
        'calibrate', help='fit the confidence of rankings on validation queries (confirm_below)')
    parser.add_argument('galleries', nargs='+', metavar='GALLERY',
                        help='galleries with a queries.csv (query, group_id) to fit on')
    add_engine_arguments(parser)
    parser.add_argument('--check', action='append', metavar='GALLERY',
                        help='also score the fit on this gallery (repeatable; never fitted on)')
    parser.add_argument('--min-confidence', type=float, default=0.5,
                        help='confirm_below threshold the report applies (default 0.5)')
    parser.add_argument('--min-margin', type=float, default=0.0,
                        help='confirm_below margin threshold the report applies (default 0)')
    parser.add_argument('--limit', type=int, default=None, help='at most N queries per gallery')
    parser.add_argument('--json', action='store_true', help='print JSON')
    parser.set_defaults(func=run)
