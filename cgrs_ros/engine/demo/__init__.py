"""The bundled demo world: a deterministic, geo-referenced synthetic town as a gallery.

``generate_demo_world(out_dir, seed, size)`` lays out a town (``world``), renders satellite
tiles and drone views of chosen places (``render``), writes three descriptions per image and
held-out queries from what was drawn (``describe``), and writes the gallery (``generate``).
"""

from cgrs_ros.engine.demo.generate import (
    DEFAULT_DATUM, DEFAULT_DRONE_VIEWS, DEFAULT_SIZE, DemoSummary, generate_demo_world)

__all__ = ['DEFAULT_DATUM', 'DEFAULT_DRONE_VIEWS', 'DEFAULT_SIZE', 'DemoSummary',
           'generate_demo_world']
