"""Reproduce the demo's learned dual encoder (models/demo_dual) from scratch.

Generates the training towns (seeds 1000..1000+N-1) and validation towns (2000, 2001) with
the demo generator into a cache folder, then runs `cgrs train dual` with
config/train_demo.yaml. The demo town (seed 0) and the evaluation town (seed 3000) are never
generated here: they stay unseen. Deterministic: the same seeds give the same towns, and the
training is seeded.

    .venv/bin/python tools/train_demo_model.py [--towns 30] [--out models/demo_dual]

Takes about 25 minutes on 2 cores from nothing (towns ~13 s each, image features ~30 ms per
image, training a few minutes); towns and features are cached, so a second run only trains.
"""

import argparse
import os
from pathlib import Path
import subprocess
import sys

ROOT = Path(__file__).resolve().parents[1]
TRAIN_SEEDS = range(1000, 2000)
VAL_SEEDS = (2000, 2001)


def cgrs(*args):
    """Run the cgrs CLI of this environment; stop on failure."""
    subprocess.run([sys.executable, '-m', 'cgrs_ros.cli', *map(str, args)], check=True)


def town(cache, seed):
    """Generate town ``seed`` into the cache (once) and return its folder."""
    folder = cache / f's{seed}'
    if not (folder / 'world.json').is_file():
        cgrs('gallery', 'demo', folder, '--seed', seed, '--force')
    return folder


def default_cache():
    """Return the folder generated towns are kept in (``$XDG_CACHE_HOME/cgrs/towns``)."""
    base = Path(os.environ.get('XDG_CACHE_HOME') or Path.home() / '.cache')
    return base / 'cgrs' / 'towns'


def with_rotated_tiles(folder, angles):
    """Return a copy of town ``folder`` whose places also have their tiles turned by ``angles``.

    The copy (``<folder>-rot<angles>``, images hard-linked, nothing re-rendered) adds, per
    satellite tile, one satellite row per angle with the tile's place and no description: only
    the cross-view term sees them, and it learns that a place seen from any heading is one
    place (the drone views come at any heading; the tiles are north-up). Made once, cached.
    """
    from cgrs_ros.engine.gallery import load_gallery, write_manifest
    from PIL import Image
    import dataclasses
    out = folder.with_name(f'{folder.name}-rot{"-".join(map(str, angles))}')
    if (out / 'gallery.csv').is_file():
        return out
    gallery = load_gallery(folder)
    work = out.with_name(out.name + '.partial')
    (work / 'images').mkdir(parents=True, exist_ok=True)
    items = []
    for item in gallery.items:
        source, target = gallery.path_of(item), work / item.path
        if not target.exists():
            os.link(source, target)
        items.append(item)
        if item.platform != 'satellite':
            continue
        with Image.open(source) as tile:
            for angle in angles:
                name = f'images/{item.image_id}_r{angle}.png'
                tile.rotate(angle).save(work / name)
                items.append(dataclasses.replace(
                    item, image_id=f'{item.image_id}_r{angle}', path=name,
                    heading_deg=float(angle), descriptions=()))
    write_manifest(work, items)
    work.rename(out)
    return out


def main():
    """Generate the towns and train."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--towns', type=int, default=30, help='training towns (default 30)')
    parser.add_argument('--config', type=Path, default=ROOT / 'config' / 'train_demo.yaml')
    parser.add_argument('--out', type=Path, default=ROOT / 'models' / 'demo_dual')
    parser.add_argument('--cache', type=Path, default=default_cache(),
                        help='where the generated towns are kept')
    parser.add_argument('--restart', action='store_true', help='ignore checkpoints in --out')
    parser.add_argument('--tile-rotations', default='',
                        help='also train on the satellite tiles turned by these angles, e.g. '
                             '90,180,270 (extra views of the place for the cross-view term)')
    args = parser.parse_args()
    if not 1 <= args.towns <= len(TRAIN_SEEDS):
        parser.error(f'--towns must be 1..{len(TRAIN_SEEDS)}')
    train = [town(args.cache, seed) for seed in TRAIN_SEEDS[:args.towns]]
    if args.tile_rotations:
        angles = [int(a) for a in args.tile_rotations.split(',')]
        train = [with_rotated_tiles(folder, angles) for folder in train]
    val = [town(args.cache, seed) for seed in VAL_SEEDS]
    extra = ['--restart'] if args.restart else []
    cgrs('train', 'dual', *train, *[a for v in val for a in ('--val', v)],
         '--config', args.config, '--out', args.out, *extra)
    return 0


if __name__ == '__main__':
    sys.exit(main())
