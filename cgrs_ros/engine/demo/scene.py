"""The demo town as a scene to look at again: a simulated camera and an orthophoto of it.

A demo gallery's ``world.json`` holds the seed and the number of places; the town is rebuilt
from them exactly as ``cgrs gallery demo`` built it (:func:`generate.layout_town`), so the
simulated drone's camera (``sim_drone``) and an orthophoto for localization draw the same
streets, roofs and trees as the gallery's images. The ground is flat at the datum altitude.

- :func:`render_camera`: what a camera at a position, height and compass heading sees; the
  image's up is the camera's forward direction (body-fixed), its ground resolution follows
  from the height and the field of view. ``tilt`` > 0 gives the oblique look of the demo's
  drone views (a plausible look, as in render.py, not a calibrated perspective).
- :func:`write_orthophoto`: the whole town as a north-up GeoTIFF (a transverse Mercator grid
  centred on the datum), drawn in chunks so memory stays small. ``cgrs gallery from-geotiff``
  cuts it into the dense satellite tiles a localizer matches camera frames against.
"""

from dataclasses import dataclass
import json
import math
from pathlib import Path

from cgrs_ros.engine.demo.generate import layout_town, SATELLITE_M_PER_PX
from cgrs_ros.engine.demo.render import render_view, View
from cgrs_ros.engine.errors import GalleryError
from cgrs_ros.engine.geo import Datum, geodetic_to_enu
import numpy as np

MIN_CAMERA_HEIGHT_M = 1.0
ORTHOPHOTO_CHUNK_PX = 512


@dataclass
class DemoScene:
    """A rebuilt demo town: the vector world and the datum its east/north metres are around."""

    world: object
    datum: Datum
    seed: int
    size: int
    side_m: float

    def enu(self, lat, lon, alt):
        """Return the scene's (east, north, up) metres of a WGS84 position."""
        return geodetic_to_enu(lat, lon, alt, self.datum)


def world_json_path(path):
    """Return the world.json of a demo gallery folder (or the file itself)."""
    path = Path(path).expanduser()
    return path / 'world.json' if path.is_dir() else path


def load_scene(path):
    """Rebuild the town of a demo gallery (its folder or its world.json); GalleryError if not one.

    Takes about a second for the default 160 places.
    """
    source = world_json_path(path)
    try:
        meta = json.loads(source.read_text())
        seed, size = int(meta['seed']), int(meta['size'])
        datum = Datum(float(meta['datum']['lat']), float(meta['datum']['lon']),
                      float(meta['datum']['alt']))
        side_m = float(meta['side_m'])
    except FileNotFoundError:
        raise GalleryError(f'{source} does not exist; point at a gallery written by '
                           '`cgrs gallery demo` (it writes world.json)') from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise GalleryError(f'{source} is not a demo world.json ({type(exc).__name__}: {exc}); '
                           'regenerate it with `cgrs gallery demo`') from None
    world, _, side = layout_town(seed, size)
    if abs(side - side_m) > 0.01:
        raise GalleryError(f'{source} says the town is {side_m} m wide, but seed {seed} with '
                           f'{size} places lays out {side:.3f} m: it was written by another '
                           'version of the generator; regenerate it with `cgrs gallery demo`')
    return DemoScene(world=world, datum=datum, seed=seed, size=size, side_m=side)


def camera_m_per_px(height_m, fov_deg, size):
    """Return the ground metres per pixel of a nadir camera (square image, horizontal FOV)."""
    height = max(float(height_m), MIN_CAMERA_HEIGHT_M)
    return 2.0 * height * math.tan(math.radians(fov_deg) / 2.0) / int(size)


def render_camera(scene, e, n, height_m, heading_deg, size=256, fov_deg=90.0, tilt=0.0,
                  rng=None):
    """Return the PIL RGB image a camera at scene (e, n), ``height_m`` above ground, sees.

    ``heading_deg`` is the compass direction of the image's up (0 = north, clockwise). A nadir
    camera (``tilt`` 0) looks straight down at (e, n); an oblique one (``tilt`` 0.1-0.45) looks
    ahead, its ground centre one height in front of the drone.
    """
    if not 0.0 <= float(tilt) < 0.5:
        raise ValueError(f'tilt {tilt} must be in [0, 0.5) (0 = straight down)')
    m_per_px = camera_m_per_px(height_m, fov_deg, size)
    if tilt > 0:
        ahead = max(float(height_m), MIN_CAMERA_HEIGHT_M)
        h = math.radians(heading_deg)
        e, n = e + ahead * math.sin(h), n + ahead * math.cos(h)
    view = View(float(e), float(n), float(heading_deg) % 360.0, m_per_px, int(size),
                float(tilt))
    return render_view(scene.world, view, rng if rng is not None else np.random.default_rng(0))


def write_orthophoto(scene, out_path, m_per_px=SATELLITE_M_PER_PX, seed=0,
                     chunk_px=ORTHOPHOTO_CHUNK_PX):
    """Write the whole town as a north-up RGB GeoTIFF at ``m_per_px``; return its size (w, h).

    The CRS is a transverse Mercator centred on the datum (metres east/north of it, within a
    few millimetres of the map frame's ENU across a town), so each pixel's WGS84 position comes
    from the GeoTIFF itself, as for any orthophoto.
    """
    import pyproj
    import rasterio
    from rasterio.transform import Affine
    from rasterio.windows import Window

    if not 0.05 <= float(m_per_px) <= 10.0:
        raise GalleryError(f'orthophoto resolution {m_per_px} m/px must be within 0.05-10')
    side_px = int(math.ceil(scene.side_m / m_per_px))
    half = side_px * m_per_px / 2.0
    datum = scene.datum
    crs = pyproj.CRS.from_proj4(
        f'+proj=tmerc +lat_0={datum.lat!r} +lon_0={datum.lon!r} +k=1 +x_0=0 +y_0=0 '
        '+ellps=WGS84 +units=m +no_defs')
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + '.tmp')
    profile = {'driver': 'GTiff', 'width': side_px, 'height': side_px, 'count': 3,
               'dtype': 'uint8', 'crs': rasterio.crs.CRS.from_wkt(crs.to_wkt()),
               'transform': Affine(m_per_px, 0.0, -half, 0.0, -m_per_px, half),
               'compress': 'deflate', 'tiled': True, 'blockxsize': 256, 'blockysize': 256,
               'photometric': 'RGB'}
    with rasterio.open(tmp, 'w', **profile) as ds:
        for row in range(0, side_px, chunk_px):
            for col in range(0, side_px, chunk_px):
                width, height = min(chunk_px, side_px - col), min(chunk_px, side_px - row)
                centre_e = -half + (col + chunk_px / 2.0) * m_per_px
                centre_n = half - (row + chunk_px / 2.0) * m_per_px
                image = render_view(scene.world,
                                    View(centre_e, centre_n, 0.0, m_per_px, chunk_px, 0.0),
                                    np.random.default_rng([seed, 5, row, col]))
                pixels = np.asarray(image)[:height, :width].transpose(2, 0, 1)
                ds.write(pixels, window=Window(col, row, width, height))
    tmp.replace(out_path)
    return side_px, side_px


def satellite_tiles(demo_dir, out_dir, m_per_px=SATELLITE_M_PER_PX, overlap=0.75,
                    tile_px=256, force=False):
    """Write a dense satellite gallery of a demo town: its orthophoto cut into tiles.

    What a localizer matches camera frames against (the demo gallery itself has one tile per
    place). Same as ``cgrs gallery demo --orthophoto`` then ``cgrs gallery from-geotiff
    ORTHO OUT --overlap 0.75 --alt ALT``. Returns the ``TileSummary``.
    """
    from cgrs_ros.engine.orthomosaic import tile_geotiff
    scene = load_scene(demo_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ortho = out / 'orthophoto.tif'
    write_orthophoto(scene, ortho, m_per_px=m_per_px, seed=scene.seed)
    return tile_geotiff(ortho, out, tile_size=tile_px, overlap=overlap, alt=scene.datum.alt,
                        force=force)
