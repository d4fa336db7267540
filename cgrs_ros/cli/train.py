"""``cgrs train dual`` / ``cgrs train reranker``: train models the engine loads by path.

    cgrs train dual GALLERY [GALLERY ...] [--val GALLERY_OR_QUERIES ...] --config train.yaml
                    --out DIR [--seed N] [--device cuda] [--epochs N] [--restart]
    cgrs train dual --geotext train.json --images ROOT --out DIR ...
    cgrs train reranker GALLERY [GALLERY ...] --engine-config STAGE_BEFORE.yaml
                    [--val GALLERY ...] [--config train_reranker.yaml] --out DIR

The output folder holds the model (``backend: learned`` for the offline towers, an open_clip
``local-dir`` folder for open_clip), ``model_card.md``/``.json`` and ``checkpoints/``; run the
same command again after an interruption to resume from the last epoch.
"""

import json
import sys


def run_dual(args):
    """Load the data, train, print where the model is and how to use it."""
    from cgrs_ros.engine.learning.config import load_train_config
    from cgrs_ros.engine.learning.data import load_query_set, load_training_pairs
    from cgrs_ros.engine.learning.trainer import train_dual
    from cgrs_ros.engine.errors import CgrsError

    if not args.galleries and not args.geotext:
        raise CgrsError('name at least one training GALLERY (a folder with a described '
                        'manifest) or --geotext ANN.json --images ROOT')
    overrides = {}
    if args.seed is not None:
        overrides['train.seed'] = args.seed
    if args.device:
        overrides['train.device'] = args.device
    if args.epochs:
        overrides['train.epochs'] = args.epochs
    cfg = load_train_config(args.config, overrides)
    pairs = load_training_pairs(args.galleries, args.geotext, args.images)
    val_sets = [load_query_set(v) for v in args.val or ()]
    for problem in pairs.problems[:20]:
        print(f'skipped: {problem}', file=sys.stderr)
    if len(pairs.problems) > 20:
        print(f'skipped: ... and {len(pairs.problems) - 20} more rows', file=sys.stderr)
    print(f'training data: {len(pairs.image_paths)} images, {len(pairs.texts)} texts, '
          f'{len(pairs.groups)} places; validation: '
          f'{", ".join(q.name for q in val_sets) or "none"}', file=sys.stderr, flush=True)
    result = train_dual(pairs, cfg, args.out, val_sets, cache_root=args.cache,
                        restart=args.restart, progress=not args.quiet)
    if args.json:
        print(json.dumps(result.card, indent=2))
        return 0
    print(f'model: {result.out_dir} (epoch {result.best_epoch} of {result.epochs}; card: '
          f'{result.out_dir}/model_card.md)')
    for name, v in result.card['val'].items():
        print(f'  val {name}: R@1 {v["r1"]}  R@5 {v["r5"]}  R@10 {v["r10"]}')
    if cfg.model.backend == 'open_clip':
        print(f"use it: image_encoder: {{backend: open_clip, model: 'local-dir:"
              f"{result.out_dir}'}}")
    else:
        print(f'use it: image_encoder: {{backend: learned, model: {result.out_dir}}}')
    return 0


def run_reranker(args):
    """Build the stage-before lists, train the cross-encoder, print how to use it."""
    from cgrs_ros.engine.config import load_config
    from cgrs_ros.engine.learning.rerank_trainer import load_rerank_config, train_reranker

    overrides = {}
    if args.seed is not None:
        overrides['train.seed'] = args.seed
    if args.epochs:
        overrides['train.epochs'] = args.epochs
    cfg = load_rerank_config(args.config, overrides)
    engine = load_config(args.engine_config)
    result = train_reranker(args.galleries, engine, cfg, args.out, args.val or (),
                            restart=args.restart, progress=not args.quiet)
    card = result.card
    if args.json:
        print(json.dumps(card, indent=2))
        return 0
    print(f'reranker: {result.out_dir} (epoch {card["exported_epoch"]}; card: '
          f'{result.out_dir}/model_card.md)')
    weight = card['suggested_weight']
    for name, v in card['val'].items():
        before, after = v['before'], v[f'w{weight:g}']
        print(f'  val {name}: R@1 {before["r1"]} -> {after["r1"]}  R@5 {before["r5"]} -> '
              f'{after["r5"]}  R@10 {before["r10"]} -> {after["r10"]}')
    print(f'use it: reranker: {{backend: trained, model: {result.out_dir}, k: '
          f'{cfg.train.k}, weight: {weight}}}')
    return 0


def register(subparsers):
    """Add the ``train`` subcommand and its ``dual`` action."""
    parser = subparsers.add_parser('train', help='train models on described galleries',
                                   description='Train models on galleries with descriptions.')
    actions = parser.add_subparsers(dest='action', metavar='ACTION')
    dual = actions.add_parser(
        'dual', help='train a text-image dual encoder (coarse stage)',
        description='Train a text-image dual encoder with group-aware contrastive learning; '
                    'the engine loads the result by path. Re-running resumes from the last '
                    'epoch checkpoint.')
    dual.add_argument('galleries', nargs='*', metavar='GALLERY',
                      help='gallery folders whose manifest has descriptions')
    dual.add_argument('--geotext', metavar='ANN.json', help='GeoText-1652 train annotation')
    dual.add_argument('--images', metavar='ROOT', help='image root of --geotext')
    dual.add_argument('--val', action='append', metavar='GALLERY_OR_QUERIES',
                      help='validation gallery (its queries.csv, else its descriptions) or a '
                           'queries.csv beside a gallery.csv; repeatable')
    dual.add_argument('--config', metavar='FILE', help='train config YAML (config/train.yaml)')
    dual.add_argument('--out', required=True, metavar='DIR', help='model output folder')
    dual.add_argument('--seed', type=int, help='override train.seed')
    dual.add_argument('--device', help='override train.device (cpu, cuda, cuda:1)')
    dual.add_argument('--epochs', type=int, help='override train.epochs')
    dual.add_argument('--cache', metavar='DIR',
                      help='frozen-feature cache (default ~/.cache/cgrs/train-features)')
    dual.add_argument('--restart', action='store_true',
                      help='ignore a checkpoint in --out and start over')
    dual.add_argument('--json', action='store_true', help='print the model card as JSON')
    dual.add_argument('--quiet', action='store_true', help='no progress output')
    dual.set_defaults(func=run_dual)

    rr = actions.add_parser(
        'reranker', help='train the cross-encoder of the trained reranker stage',
        description='Train a cross-encoder reranker on the candidate lists that the stage '
                    'before it (--engine-config) returns for the descriptions of the training '
                    'galleries; validation uses held-out queries of other galleries.')
    rr.add_argument('galleries', nargs='+', metavar='GALLERY',
                    help='gallery folders whose manifest has descriptions')
    rr.add_argument('--engine-config', required=True, metavar='FILE',
                    help='engine config of the stage before (coarse model and captions)')
    rr.add_argument('--val', action='append', metavar='GALLERY',
                    help='validation gallery (its queries.csv, else its descriptions)')
    rr.add_argument('--config', metavar='FILE',
                    help='reranker train config YAML (config/train_reranker.yaml)')
    rr.add_argument('--out', required=True, metavar='DIR', help='model output folder')
    rr.add_argument('--seed', type=int, help='override train.seed')
    rr.add_argument('--epochs', type=int, help='override train.epochs')
    rr.add_argument('--restart', action='store_true',
                    help='ignore a checkpoint in --out and start over')
    rr.add_argument('--json', action='store_true', help='print the model card as JSON')
    rr.add_argument('--quiet', action='store_true', help='no progress output')
    rr.set_defaults(func=run_reranker)
    parser.set_defaults(func=lambda args: parser.print_help() or 2)
