"""Entry point of the demo world generator (the code lives in :mod:`cgrs_ros.engine.demo`)."""

from cgrs_ros.engine.demo import (
    DEFAULT_DATUM, DEFAULT_DRONE_VIEWS, DEFAULT_SIZE, DemoSummary, generate_demo_world)

__all__ = ['DEFAULT_DATUM', 'DEFAULT_DRONE_VIEWS', 'DEFAULT_SIZE', 'DemoSummary',
           'generate_demo_world']
