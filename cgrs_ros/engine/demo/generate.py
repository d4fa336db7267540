"""Write the demo gallery: pick places in the town, render their views, describe them.

Output folder layout::

    gallery.csv      the manifest (engine format, three descriptions per image)
    queries.csv      held-out spoken-style queries (query, group_id), at least one per place
    world.json       datum, seed, size and every place (group_id, kind, lat, lon, e, n)
    images/          p0001_sat.png, p0001_drone1.png, ...

Same seed and size give byte-identical files: all randomness comes from numpy Generators
seeded from (seed, purpose, index), PNGs are written with fixed settings and no timestamps.
"""

import csv
from dataclasses import dataclass
import io
import math
from pathlib import Path
import re

from cgrs_ros.engine.demo.describe import context_for, describe, queries
from cgrs_ros.engine.demo.render import render_view, View
from cgrs_ros.engine.demo.world import build_world
from cgrs_ros.engine.errors import GalleryError
from cgrs_ros.engine.gallery import GalleryItem, write_manifest
from cgrs_ros.engine.geo import Datum, enu_to_geodetic
from cgrs_ros.engine.storage import atomic_write_bytes, atomic_write_json, atomic_write_text
import numpy as np

# A real-looking default place: Zurich-Oerlikon, WGS84 ellipsoidal altitude.
DEFAULT_DATUM = Datum(47.3977, 8.5456, 488.0)
DEFAULT_SIZE = 160
DEFAULT_DRONE_VIEWS = 2
TILE_PX = 256
SATELLITE_M_PER_PX = 0.5
MIN_PLACE_SPACING_M = 35.0
IMAGE_NAME = re.compile(r'^p\d{4,}_(sat|drone\d+)\.png$')
# Categories taken in turn when picking places, so every kind of place is represented.
CATEGORIES = ('building', 'house', 'pond', 'roundabout', 'bridge', 'football pitch',
              'tennis courts', 'parking', 'plaza')


@dataclass
class DemoSummary:
    """What ``generate_demo_world`` wrote."""

    out_dir: Path
    places: int
    images: int
    queries: int
    side_m: float
    datum: Datum


def _category(feature):
    if feature.kind == 'building':
        return 'house' if feature.attrs['use'] == 'house' else 'building'
    return feature.kind


def _pick_places(world, count, rng):
    """Pick ``count`` well-separated anchors, cycling through categories; None if too few."""
    margin = world.side / 2 - 75.0
    pools = {c: [] for c in CATEGORIES}
    for f in world.features:
        if f.anchor and abs(f.centre[0]) < margin and abs(f.centre[1]) < margin \
                and f.size < 130.0:
            pools[_category(f)].append(f)
    for c in CATEGORIES:
        order = rng.permutation(len(pools[c]))
        pools[c] = [pools[c][int(i)] for i in order]
    chosen, centres = [], []

    def take(pool):
        while pool:
            f = pool.pop(0)
            c = np.array(f.centre)
            if all(math.hypot(*(c - o)) >= MIN_PLACE_SPACING_M for o in centres):
                chosen.append(f)
                centres.append(c)
                return True
        return False

    while len(chosen) < count:
        progressed = False
        for c in CATEGORIES:
            if len(chosen) >= count:
                break
            # Buildings are the bulk of a town; give them three turns per round.
            for _ in range(3 if c in ('building', 'house') else 1):
                if len(chosen) < count and take(pools[c]):
                    progressed = True
        if not progressed:
            return None
    return chosen


def layout_town(seed, size):
    """Lay out the town of a seed and number of places; return (world, places, side m).

    Deterministic: the demo gallery and anything that draws the same town later (the
    simulated camera, the orthophoto) call this with the seed and size in world.json.
    """
    # The town grows with the number of places (about 150 m x 150 m per place) and grows
    # further if a seed's layout has too few distinct places.
    side = max(450.0, 150.0 * math.sqrt(size))
    for _ in range(12):
        world = build_world(np.random.default_rng([seed, 0]), side)
        places = _pick_places(world, size, np.random.default_rng([seed, 1]))
        if places is not None:
            return world, places, side
        side *= 1.12
    raise GalleryError(f'could not lay out {size} places; use a smaller --size')


def _png_bytes(image):
    buffer = io.BytesIO()
    # Fixed settings and no metadata chunks, so the bytes depend on the pixels only.
    # Level 3 is ~4x faster than zlib's default 6 on these tiles for ~5% more bytes.
    image.save(buffer, format='PNG', compress_level=3, optimize=False)
    return buffer.getvalue()


def _check_out_dir(out, force):
    if (out / 'gallery.csv').exists() and not force:
        raise GalleryError(f'{out} already holds a gallery (gallery.csv); pass --force to '
                           'overwrite it or choose an empty folder')
    if out.exists() and not out.is_dir():
        raise GalleryError(f'{out} exists and is not a folder; choose a folder path')


def generate_demo_world(out_dir, seed=0, size=DEFAULT_SIZE, datum=DEFAULT_DATUM,
                        drone_views=DEFAULT_DRONE_VIEWS, force=False, progress=None):
    """Generate the demo gallery into ``out_dir``; returns a :class:`DemoSummary`.

    ``size`` is the number of places; each gets one north-up satellite tile and
    ``drone_views`` rotated oblique drone views. ``progress`` (optional) is called with the
    number of images written so far.
    """
    if int(size) < 1:
        raise GalleryError(f'--size {size} must be at least 1 (number of places)')
    if int(drone_views) < 0:
        raise GalleryError(f'drone views {drone_views} must be 0 or more')
    size, seed = int(size), int(seed)
    out = Path(out_dir)
    _check_out_dir(out, force)
    world, places, side = layout_town(seed, size)

    images_dir = out / 'images'
    images_dir.mkdir(parents=True, exist_ok=True)
    items, query_rows, place_rows, written = [], [], [], 0
    for index, anchor in enumerate(places, start=1):
        group = f'p{index:04d}'
        rng = np.random.default_rng([seed, 2, index])
        lat, lon, _ = enu_to_geodetic(anchor.centre[0], anchor.centre[1], 0.0, datum)
        views = []
        jitter = rng.uniform(-8.0, 8.0, 2)
        views.append(('sat', 'satellite', View(anchor.centre[0] + jitter[0],
                                               anchor.centre[1] + jitter[1], 0.0,
                                               SATELLITE_M_PER_PX, TILE_PX, 0.0)))
        m_per_px = float(np.clip(anchor.size * 1.6 / TILE_PX, 0.2, 0.45))
        for k in range(1, drone_views + 1):
            heading = float(np.round(rng.uniform(0.0, 360.0), 1))
            views.append((f'drone{k}', 'drone', View(
                anchor.centre[0], anchor.centre[1], heading,
                m_per_px * float(rng.uniform(0.9, 1.15)), TILE_PX,
                float(rng.uniform(0.18, 0.34)))))
        sat_context = None
        for suffix, platform, view in views:
            image_id = f'{group}_{suffix}'
            rel = f'images/{image_id}.png'
            view_rng = np.random.default_rng([seed, 3, index, len(items)])
            image = render_view(world, view, view_rng)
            atomic_write_bytes(out / rel, _png_bytes(image))
            ctx = context_for(world, view, anchor, platform)
            if platform == 'satellite':
                sat_context = ctx
            texts = describe(ctx, view_rng)
            vlat, vlon, _ = enu_to_geodetic(view.e, view.n, 0.0, datum)
            items.append(GalleryItem(
                image_id=image_id, path=rel, lat=round(float(vlat), 8),
                lon=round(float(vlon), 8), alt=float(datum.alt),
                heading_deg=float(view.heading_deg), platform=platform, group_id=group,
                descriptions=tuple(texts)))
            written += 1
            if progress:
                progress(written)
        for text in queries(sat_context, np.random.default_rng([seed, 4, index])):
            query_rows.append((text, group))
        place_rows.append({
            'group_id': group, 'kind': _category(anchor),
            'e': round(anchor.centre[0], 3), 'n': round(anchor.centre[1], 3),
            'lat': round(float(lat), 8), 'lon': round(float(lon), 8), 'alt': float(datum.alt),
            'radius_m': round(anchor.size / 2, 2), 'attributes': _plain_attrs(anchor.attrs)})
    _remove_stale_images(images_dir, {Path(item.path).name for item in items})
    write_manifest(out, items)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator='\n')
    writer.writerow(('query', 'group_id'))
    writer.writerows(query_rows)
    atomic_write_text(out / 'queries.csv', buffer.getvalue())
    atomic_write_json(out / 'world.json', {
        'generator': 'cgrs gallery demo', 'format': 1, 'seed': seed, 'size': size,
        'drone_views': drone_views, 'side_m': round(side, 3),
        'datum': {'lat': datum.lat, 'lon': datum.lon, 'alt': datum.alt},
        'satellite_m_per_px': SATELLITE_M_PER_PX, 'tile_px': TILE_PX,
        'places': place_rows})
    return DemoSummary(out, len(places), len(items), len(query_rows), side, datum)


def _plain_attrs(attrs):
    """Return the JSON-friendly drawn attributes of a place (colour, shape, counts...)."""
    out = {}
    for key, value in sorted(attrs.items()):
        if isinstance(value, (bool, int, str)):
            out[key] = value
        elif isinstance(value, float):
            out[key] = round(value, 3)
    return out


def _remove_stale_images(images_dir, keep):
    """Drop demo images of an earlier, larger run (only files named like ours)."""
    for path in sorted(images_dir.iterdir()):
        if IMAGE_NAME.match(path.name) and path.name not in keep:
            path.unlink()
