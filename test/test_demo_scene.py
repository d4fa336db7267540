"""The demo town seen again: the rebuilt scene draws what the gallery holds, the orthophoto sits
where its GeoTIFF says, and a body-fixed camera frame turned north-up matches a north-up view.
"""

import csv
import math

from cgrs_ros.engine import geo
from cgrs_ros.engine.demo import generate_demo_world
from cgrs_ros.engine.demo.scene import camera_m_per_px, load_scene, render_camera
from cgrs_ros.engine.demo.scene import write_orthophoto
from cgrs_ros.engine.errors import GalleryError
from cgrs_ros.engine.localization import rectify
import numpy as np
from PIL import Image
import pytest


@pytest.fixture(scope='module')
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp('demo')
    generate_demo_world(out, seed=7, size=2, drone_views=0)
    with open(out / 'gallery.csv') as handle:
        rows = list(csv.DictReader(handle))
    return out, rows


def _diff(a, b):
    return float(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).mean())


def test_camera_at_a_tile_draws_the_tile(demo):
    out, rows = demo
    scene = load_scene(out)
    row = rows[0]
    e, n, _ = scene.enu(float(row['lat']), float(row['lon']), scene.datum.alt)
    height = 0.5 * 256 / 2 / math.tan(math.radians(45.0))  # 0.5 m/px with a 90 deg camera
    assert camera_m_per_px(height, 90.0, 256) == pytest.approx(0.5)
    # The generator's sensor noise for place 1, first image: same pixels but for the ~mm
    # rounding of the manifest's lat/lon.
    frame = render_camera(scene, e, n, height, 0.0, 256, 90.0,
                          rng=np.random.default_rng([7, 3, 1, 0]))
    tile = Image.open(out / row['path']).convert('RGB')
    assert frame.size == (256, 256)
    assert _diff(frame, tile) < 1.0
    # Elsewhere in town the picture differs.
    assert _diff(render_camera(scene, e + 150, n, height, 0.0, 256, 90.0), tile) > 10.0


def test_rectify_turns_a_body_fixed_frame_north_up(demo):
    scene = load_scene(demo[0])
    north_up = render_camera(scene, 10.0, -20.0, 60.0, 0.0, 256, 90.0)
    crop = rectify(north_up, 0.0)
    assert crop.size == (181, 181)
    for heading in (90.0, 217.0):
        turned = render_camera(scene, 10.0, -20.0, 60.0, heading, 256, 90.0)
        right = _diff(rectify(turned, heading), crop)
        assert right < 12.0  # resampling, not content
        assert _diff(rectify(turned, heading + 90.0), crop) > right + 5.0


def test_orthophoto_is_geo_referenced_like_the_tiles(demo, tmp_path):
    import rasterio
    out, rows = demo
    scene = load_scene(out)
    width, height = write_orthophoto(scene, tmp_path / 'ortho.tif')
    assert width == height == math.ceil(scene.side_m / 0.5)
    row = rows[0]
    lat, lon = float(row['lat']), float(row['lon'])
    with rasterio.open(tmp_path / 'ortho.tif') as ds:
        import pyproj
        x, y = pyproj.Transformer.from_crs('EPSG:4326', ds.crs, always_xy=True).transform(
            lon, lat)
        col, row_px = ~ds.transform @ (x, y)
        pixels = ds.read().transpose(1, 2, 0)
    tile = np.asarray(Image.open(out / rows[0]['path']).convert('RGB'))

    def crop(shift):
        left, top = int(round(col)) - 128 + shift, int(round(row_px)) - 128
        return pixels[top:top + 256, left:left + 256]
    # Same place: only the sensor noise (and a sub-pixel offset) differs; 8 px off is worse.
    assert _diff(crop(0), tile) < 10.0
    assert _diff(crop(8), tile) > _diff(crop(0), tile) + 3.0
    # The map frame and the GeoTIFF agree: the tile centre's ENU is its grid position.
    e, n, _ = geo.geodetic_to_enu(lat, lon, scene.datum.alt, scene.datum)
    assert (col * 0.5 - width * 0.25, height * 0.25 - row_px * 0.5) == pytest.approx(
        (e, n), abs=0.05)


def test_load_scene_names_a_folder_without_a_world(tmp_path):
    with pytest.raises(GalleryError, match='world.json does not exist'):
        load_scene(tmp_path)
    (tmp_path / 'world.json').write_text('{"seed": 1}')
    with pytest.raises(GalleryError, match='not a demo world.json'):
        load_scene(tmp_path)
