"""``cgrs caption GALLERY``: caption gallery images with a VLM (resumable, incremental)."""

import json
import signal
import sys
import threading

from cgrs_ros.cli.arguments import add_engine_arguments, add_ray_arguments, ray_job

MAX_LISTED = 50


def _listed(lines, label, entries):
    for entry in entries[:MAX_LISTED]:
        lines.append(f'  {label} {entry}')
    if len(entries) > MAX_LISTED:
        lines.append(f'  ... and {len(entries) - MAX_LISTED} more (see --json)')


def format_status(summary, run_lines=(), extra=()):
    """Return the human-readable lines of a status (and, for a run, what it did)."""
    lines = [f'captioner: {summary.captioner} (prompt version {summary.prompt_version})',
             *run_lines,
             f'images: {summary.total}, captioned {summary.captioned}, failed {summary.failed}, '
             f'pending {summary.pending}']
    _listed(lines, 'failed', summary.failures)
    _listed(lines, 'skipped', summary.skipped)
    lines += extra
    lines.append(f'state: {summary.state_dir}')
    return lines


def format_summary(summary):
    """Return the human-readable lines of a run's summary."""
    if summary.attempted:
        run_lines = [f'this run: captioned {summary.new_captions}, failed '
                     f'{summary.new_failures} of {summary.attempted} images '
                     f'({summary.elapsed_s:.1f} s, {summary.rate:.2f} images/s)']
    else:
        run_lines = [f'this run: nothing to caption ({summary.elapsed_s:.1f} s)']
    if summary.stopped:
        run_lines.append('stopped before the end; run again to continue')
    if summary.aborted:
        run_lines.append(f'gave up: {summary.aborted}')
    extra = []
    if summary.captions_embedded:
        extra.append(f'caption embeddings stored: {summary.captions_embedded} '
                     f'({summary.text_encoder})')
    if summary.embedding_error:
        extra.append(f'warning: {summary.embedding_error}')
    return format_status(summary, run_lines, extra)


class _Bar:
    """A tqdm bar fed by run_captioning's progress callback (tqdm shows rate and ETA)."""

    def __init__(self, enabled):
        self.enabled = enabled
        self.bar = None

    def __call__(self, progress):
        if not self.enabled:
            return
        from tqdm import tqdm
        if self.bar is None:
            self.bar = tqdm(total=progress.total, desc='captioning', unit='img',
                            file=sys.stderr, dynamic_ncols=True)
        self.bar.update(progress.done - self.bar.n)
        self.bar.set_postfix(failed=progress.failed, refresh=False)
        self.bar.refresh()

    def close(self):
        if self.bar is not None:
            self.bar.close()


def run(args):
    """Caption the gallery (or print its status) and print the summary."""
    from cgrs_ros.engine.errors import StateError

    try:
        return _run(args)
    except StateError as exc:  # name this gallery (and --state) in the repair command
        raise exc.for_gallery(args.gallery, args.state) from None


def _run(args):
    from cgrs_ros.engine.captioning import caption_status, run_captioning
    from cgrs_ros.engine.config import load_config
    from cgrs_ros.engine.errors import ConfigError

    config = load_config(args.config)
    if args.status:
        summary = caption_status(args.gallery, config, state_dir=args.state)
        if args.json:
            print(json.dumps(summary.status_dict(), indent=2))
        else:
            print('\n'.join(format_status(summary)))
        return 0
    if args.limit is not None and args.limit < 0:
        raise ConfigError(f'--limit {args.limit} is negative; give a number of images >= 0')
    if args.batch_size is not None and args.batch_size < 1:
        raise ConfigError(f'--batch-size {args.batch_size} must be at least 1')

    # First Ctrl-C: finish the batch in flight, commit it, stop. Second: abort at once.
    stop = threading.Event()

    def on_sigint(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        print('\ncgrs caption: stopping after the batch in flight (Ctrl-C again to abort it)',
              file=sys.stderr, flush=True)

    previous = signal.signal(signal.SIGINT, on_sigint)
    bar = _Bar(not args.quiet and (sys.stderr.isatty() or args.progress))
    try:
        summary = run_captioning(args.gallery, config, state_dir=args.state, limit=args.limit,
                                 force=args.force, batch_size=args.batch_size, progress=bar,
                                 stop=stop, ray=ray_job(args))
    finally:
        bar.close()
        signal.signal(signal.SIGINT, previous)
    if args.json:
        print(json.dumps(summary.to_dict(), indent=2))
    else:
        print('\n'.join(format_summary(summary)))
    return 1 if summary.aborted else 0


def register(subparsers):
    """Add the ``caption`` subcommand."""
    parser = subparsers.add_parser(
        'caption', help='caption gallery images with a VLM (resumable)',
        description='Caption every gallery image that has no caption yet from the configured '
                    'captioner (captioner section of --config: transformers or openai). '
                    'Captions are keyed by image content, captioner and prompt version and '
                    'committed per batch: an interrupted run resumes where it stopped, an '
                    'unchanged image is never captioned twice. Images whose captioning failed '
                    'are retried on the next run, unless their file cannot be decoded. Their '
                    'text embeddings are stored too, so queries use new captions at once.')
    parser.add_argument('gallery', metavar='GALLERY', help='folder holding gallery.csv')
    add_engine_arguments(parser)
    add_ray_arguments(parser, 'caption the images')
    parser.add_argument('--limit', type=int, metavar='N',
                        help='caption at most N pending images (in manifest order) this run')
    parser.add_argument('--force', action='store_true',
                        help='caption every image again, even those with a caption')
    parser.add_argument('--batch-size', type=int, metavar='N',
                        help='images per batch (default: captioner.batch_size)')
    parser.add_argument('--status', action='store_true',
                        help='print how many images are captioned, failed and pending, and '
                             'exit (loads no model)')
    parser.add_argument('--json', action='store_true', help='print the summary as JSON')
    parser.add_argument('--quiet', action='store_true', help='no progress bar')
    parser.add_argument('--progress', action='store_true',
                        help='progress bar even when stderr is not a terminal')
    parser.set_defaults(func=run)
