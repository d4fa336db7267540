"""The ``cgrs`` command line.

Each subcommand lives in its own module of this package and exposes
``register(subparsers)``, which adds its parser and sets ``func(args) -> int``.
Modules are imported lazily by name so ``cgrs --help`` stays fast and one broken optional
dependency does not take the other subcommands down.
"""

import argparse
import importlib
import sys

from cgrs_ros import __version__
from cgrs_ros.engine.errors import CgrsError

# Subcommand modules, in the order --help lists them.
SUBCOMMAND_MODULES = (
    'info',
    'eval',
    'launch',
    'goal',
    'gallery',
)


def build_parser():
    """Return the top-level argument parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog='cgrs',
        description='Caption-guided retrieval for sending a drone somewhere in plain words.')
    parser.add_argument('--version', action='version', version=f'cgrs {__version__}')
    subparsers = parser.add_subparsers(dest='command', metavar='COMMAND')
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(f'{__name__}.{name}').register(subparsers)
    return parser


def main(argv=None):
    """Entry point of the ``cgrs`` console script; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, 'func', None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except CgrsError as exc:
        print(f'cgrs {args.command}: error: {exc}', file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f'cgrs {args.command}: interrupted', file=sys.stderr)
        return 130


if __name__ == '__main__':
    sys.exit(main())
