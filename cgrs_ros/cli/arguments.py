"""Command-line arguments that several ``cgrs`` subcommands share."""

import argparse


def add_engine_arguments(parser):
    """Add the --config and --state options every engine subcommand takes."""
    parser.add_argument('--config', metavar='FILE',
                        help='engine config YAML (default: built-in defaults, see '
                             'config/engine.yaml)')
    parser.add_argument('--state', '--state-dir', dest='state', metavar='DIR',
                        help='state folder (default: GALLERY/.cgrs)')


def positive_int(text):
    """Argparse type: a positive integer (``1e5`` is accepted as 100000)."""
    try:
        value = float(text)
    except ValueError:
        value = 0
    if value < 1 or value != int(value):
        raise argparse.ArgumentTypeError(f'{text!r} is not a positive integer')
    return int(value)
