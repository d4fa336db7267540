"""``cgrs index GALLERY``: embed new or changed images and captions (incremental)."""

import json
import sys

from cgrs_ros.cli.arguments import add_engine_arguments, add_ray_arguments, ray_job

MAX_LISTED = 50


def format_summary(summary):
    """Return the human-readable lines of an IndexSummary."""
    repaired = (f', repaired {summary.repaired}; {len(summary.repairs)} damaged state '
                f'file(s) repaired' if summary.repairs else '')
    lines = [f'indexed {summary.indexed}, unchanged {summary.unchanged}, '
             f'skipped {len(summary.skipped)}{repaired} ({summary.elapsed_s:.1f} s)']
    for repair in summary.repairs:
        lines.append(f'  repaired: {repair}')
    for skipped in summary.skipped[:MAX_LISTED]:
        lines.append(f'  skipped {skipped}')
    if len(summary.skipped) > MAX_LISTED:
        lines.append(f'  ... and {len(summary.skipped) - MAX_LISTED} more (see --json)')
    if summary.image_encoder:
        lines.append(f'images embedded: {summary.images_embedded} ({summary.image_encoder})')
    else:
        lines.append('images: no image encoder (caption-only retrieval)')
    if summary.text_encoder:
        lines.append(f'captions: {summary.captioned} images captioned, '
                     f'{summary.captions_embedded} embedded ({summary.text_encoder})')
    else:
        lines.append('captions: none (coarse-only retrieval)')
    if summary.image_index:
        lines.append(format_image_index(summary.image_index))
    lines.append(f'state: {summary.state_dir}')
    return lines


def format_image_index(report):
    """Return the line saying what image index ``cgrs index`` built (or kept) and its recall."""
    breadth = (f', {report["breadth_name"]} {report["breadth"]}' if report.get('breadth')
               else '')
    recall = report.get('recall_at_10')
    recall = 'exact' if report.get('type') == 'flat' else (
        f'recall@10 {recall:.3f} vs exact' if recall is not None else 'recall not measured')
    what = {'current': 'image index up to date', 'built': 'image index built',
            'added': 'image index extended', 'refused': 'image index NOT replaced'}[
                report['action']]
    line = (f'{what}: {report["type"]} ({report["factory"]}), {report["rows"]} rows, '
            f'{recall}{breadth}')
    return line + (f'; {report["note"]}' if report.get('note') else '')


def run(args):
    """Index the gallery and print the summary."""
    from cgrs_ros.engine.config import load_config
    from cgrs_ros.engine.indexer import index_gallery

    config = load_config(args.config)
    progress = not args.quiet and sys.stderr.isatty() or args.progress
    log = None if args.quiet else (lambda line: print(f'index: {line}', file=sys.stderr))
    summary = index_gallery(args.gallery, config, state_dir=args.state, progress=progress,
                            replace_index=args.replace_index, log=log, ray=ray_job(args))
    if args.json:
        print(json.dumps(summary.to_dict(), indent=2))
    else:
        print('\n'.join(format_summary(summary)))
    return 1 if summary.image_index.get('action') == 'refused' else 0


def register(subparsers):
    """Add the ``index`` subcommand."""
    parser = subparsers.add_parser(
        'index', help='embed new or changed gallery images and captions',
        description='Embed the images and captions of a gallery that are new or changed since '
                    'the last run (by content hash) and write the FAISS index. A run over an '
                    'unchanged gallery does no model work.')
    parser.add_argument('gallery', metavar='GALLERY', help='folder holding gallery.csv')
    add_engine_arguments(parser)
    add_ray_arguments(parser, 'embed the images')
    parser.add_argument('--replace-index', action='store_true',
                        help='write the new image index even when its recall@10 is lower '
                             'than the saved one (a change of index type or settings)')
    parser.add_argument('--json', action='store_true', help='print the summary as JSON')
    parser.add_argument('--quiet', action='store_true', help='no progress bars')
    parser.add_argument('--progress', action='store_true',
                        help='progress bars even when stderr is not a terminal')
    parser.set_defaults(func=run)
