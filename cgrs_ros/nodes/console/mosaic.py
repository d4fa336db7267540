"""The console's pictures: a map mosaic of the gallery's satellite tiles, and thumbnails.

The map is drawn once at start: every satellite tile is pasted at its position (north up, in
the ``map`` frame around the datum), scaled to its ground size. A manifest has no ground size,
so a tile covers ``tile_m`` metres (0 = the median distance between neighbouring satellite
tiles, which is right for a tiled orthophoto and close for a town of separate places).
"""

import dataclasses
import io

from cgrs_ros.engine import geo
import numpy as np
from PIL import Image

THUMB_SIDE = 256
MARGIN_M = 80.0


@dataclasses.dataclass(frozen=True)
class MapMeta:
    """Where the mosaic lies in the map frame: x (east) and y (north) bounds in metres."""

    x_min: float
    x_max: float
    y_min: float
    y_max: float
    width: int
    height: int
    tiles: int
    tile_m: float

    def to_dict(self):
        """Return the JSON shape the page reads."""
        return dataclasses.asdict(self)


def _auto_tile_m(xy):
    """Median nearest-neighbour distance of the tile centres, kept within 20-150 m."""
    if len(xy) < 2:
        return 100.0
    d = np.sqrt(((xy[:, None, :] - xy[None, :, :]) ** 2).sum(-1))
    np.fill_diagonal(d, np.inf)
    return float(np.clip(np.median(d.min(axis=1)), 20.0, 150.0))


def render_mosaic(gallery, datum, path_of, max_side=1600, tile_m=0.0):
    """Return ``(jpeg bytes, MapMeta)``: the satellite tiles of ``gallery`` placed in ``map``.

    The extent is every image of the gallery (all platforms) plus a margin. ``path_of(item)``
    returns the file to draw, or None for one the console may not serve; those and images
    that cannot be decoded are left out.
    """
    items = list(gallery.items)
    xy = np.array([geo.geodetic_to_enu(i.lat, i.lon, i.alt, datum)[:2] for i in items]
                  ).reshape(-1, 2)
    sats = [k for k, item in enumerate(items) if item.platform == 'satellite']
    tile_m = tile_m or _auto_tile_m(xy[sats])
    if len(xy):
        lo, hi = xy.min(axis=0) - MARGIN_M - tile_m / 2, xy.max(axis=0) + MARGIN_M + tile_m / 2
    else:
        lo, hi = np.array([-500.0, -500.0]), np.array([500.0, 500.0])
    scale = max_side / float(max(hi - lo))          # pixels per metre
    width, height = (max(int(round(v * scale)), 1) for v in (hi - lo))
    canvas = Image.new('RGB', (width, height), (38, 42, 48))
    side = max(int(round(tile_m * scale)), 1)
    pasted = 0
    for k in sats:
        path = path_of(items[k])
        if path is None:
            continue
        try:
            with Image.open(path) as image:
                tile = image.convert('RGB').resize((side, side))
        except (OSError, ValueError):
            continue
        x, y = xy[k]
        canvas.paste(tile, (int(round((x - lo[0]) * scale - side / 2)),
                            int(round((hi[1] - y) * scale - side / 2))))
        pasted += 1
    out = io.BytesIO()
    canvas.save(out, 'JPEG', quality=82)
    meta = MapMeta(float(lo[0]), float(hi[0]), float(lo[1]), float(hi[1]), width, height,
                   pasted, float(tile_m))
    return out.getvalue(), meta


def thumbnail(path, side=THUMB_SIDE):
    """Return JPEG bytes of the image at ``path``, shrunk to ``side`` pixels at most."""
    with Image.open(path) as image:
        image.draft('RGB', (side, side))
        image = image.convert('RGB')
        image.thumbnail((side, side))
        out = io.BytesIO()
        image.save(out, 'JPEG', quality=85)
        return out.getvalue()
