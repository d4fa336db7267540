"""Command-line arguments that several ``cgrs`` subcommands share."""

import argparse


def add_engine_arguments(parser):
    """Add the --config and --state options every engine subcommand takes."""
    parser.add_argument('--config', metavar='FILE',
                        help='engine config YAML (default: built-in defaults, see '
                             'config/engine.yaml)')
    parser.add_argument('--state', '--state-dir', dest='state', metavar='DIR',
                        help='state folder (default: GALLERY/.cgrs)')


def add_ray_arguments(parser, what):
    """Add --ray ADDRESS and the actor sizes (cgrs index, cgrs caption)."""
    group = parser.add_argument_group('cluster runs (Ray)')
    group.add_argument('--ray', metavar='ADDRESS',
                       help=f'{what} on the Ray cluster at ADDRESS (e.g. 10.0.0.5:6379 or auto); '
                            'results are written to the local stores as they come, so a killed '
                            'run resumes. The gallery must be at the same path on every node.')
    group.add_argument('--ray-actors', type=positive_int, default=2, metavar='N',
                       help='actors, each holding one model (default: 2)')
    group.add_argument('--ray-gpus', type=float, default=0.0, metavar='G',
                       help="GPUs per actor (default: 0; set the section's device: cuda)")
    group.add_argument('--ray-cpus', type=float, default=1.0, metavar='C',
                       help='CPUs per actor (default: 1)')


def ray_job(args):
    """Return the cluster.RayJob the --ray arguments ask for, or None without --ray."""
    if not args.ray:
        return None
    from cgrs_ros.engine.cluster import RayJob
    return RayJob(args.ray, args.ray_actors, args.ray_gpus, args.ray_cpus)


def positive_int(text):
    """Argparse type: a positive integer (``1e5`` is accepted as 100000)."""
    try:
        value = float(text)
    except ValueError:
        value = 0
    if value < 1 or value != int(value):
        raise argparse.ArgumentTypeError(f'{text!r} is not a positive integer')
    return int(value)
