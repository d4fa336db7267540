"""The ``cgrs`` command line.

Each subcommand lives in its own module of this package and exposes
``register(subparsers)``, which adds its parser and sets ``func(args) -> int``.
Modules are imported lazily by name so ``cgrs --help`` stays fast and one broken optional
dependency does not take the other subcommands down.
"""

import argparse
import errno
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
    'index',
    'query',
    'bench',
    'caption',
    'train',
    'calibrate',
)


def build_parser():
    """Return the top-level argument parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog='cgrs',
        description='Caption-guided retrieval for sending a drone somewhere in plain words.')
    parser.add_argument('--version', action='version', version=f'cgrs {__version__}')
    subparsers = parser.add_subparsers(dest='command', metavar='COMMAND')
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(f'{__name__}.{name}')
        except ImportError as exc:
            _register_unavailable(subparsers, name, exc)
        else:
            module.register(subparsers)
    return parser


def _register_unavailable(subparsers, name, exc):
    """Keep a subcommand whose module cannot be imported visible, saying why when run."""
    parser = subparsers.add_parser(name, help=f'(unavailable: {exc})', add_help=False)
    parser.add_argument('rest', nargs=argparse.REMAINDER)

    def unavailable(args):
        raise CgrsError(f'this subcommand cannot be imported ({type(exc).__name__}: {exc}); '
                        'run `make setup` (or reinstall cgrs_ros) to install what it needs')
    parser.set_defaults(func=unavailable)


# A full disk, a quota or a file-size limit: the user's to fix, not a bug to trace back.
OUT_OF_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


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
    except OSError as exc:
        if exc.errno not in OUT_OF_SPACE:
            raise
        # Stores and indexes are written atomically and checkpointed: nothing finished is lost.
        print(f'cgrs {args.command}: error: cannot write {exc.filename or "a file"} '
              f'({exc.strerror}); free disk space (or raise the file-size limit) and run the '
              'same command again: finished work is kept and the run resumes', file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f'cgrs {args.command}: interrupted', file=sys.stderr)
        return 130


if __name__ == '__main__':
    sys.exit(main())
