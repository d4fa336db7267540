"""``cgrs info``: versions and whether the ROS interfaces and model backends import."""

import importlib
import json


def _probe(module):
    try:
        mod = importlib.import_module(module)
    except Exception as exc:  # report, never crash: this command is for diagnosing
        return f'unavailable ({type(exc).__name__}: {exc})'
    return getattr(mod, '__version__', 'ok')


def run(args):
    """Print what this installation can do."""
    report = {
        'cgrs_ros': _probe('cgrs_ros'),
        'interfaces': _probe('cgrs_ros.msg'),
        'rclpy': _probe('rclpy'),
        'faiss': _probe('faiss'),
        'numpy': _probe('numpy'),
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for key, value in report.items():
            print(f'{key:12s} {value}')
    return 0


def register(subparsers):
    """Add the ``info`` subcommand."""
    parser = subparsers.add_parser('info', help='show versions and available backends')
    parser.add_argument('--json', action='store_true', help='print JSON')
    parser.set_defaults(func=run)
