"""Cut a geo-referenced raster (an orthomosaic GeoTIFF) into a gallery of PNG tiles.

Each tile is read with a rasterio window, so rasters larger than memory work: memory use is
one tile plus a small decimated overview used to scale non-8-bit rasters. A tile's lat/lon is
its centre pixel taken through the raster's affine transform into the raster CRS and then
into WGS84 with pyproj; its heading is the compass direction of the tile's "up" (0 for a
north-up raster, slightly off for projected grids away from their central meridian).
Tiles that are mostly no-data (nodata value, per-dataset mask or alpha band) are skipped.
"""

from dataclasses import dataclass
import io
import math
from pathlib import Path
import re

from cgrs_ros.engine.errors import GalleryError
from cgrs_ros.engine.gallery import GalleryItem, PLATFORMS, write_manifest
from cgrs_ros.engine.storage import atomic_write_bytes, atomic_write_json
import numpy as np
from PIL import Image
import pyproj
import rasterio
from rasterio.enums import ColorInterp
from rasterio.errors import RasterioIOError
from rasterio.windows import Window

# A decimated read of at most this many pixels on the long side sets the 8-bit scaling of
# 16-bit or float rasters without reading the whole raster.
OVERVIEW_PX = 1024


@dataclass
class TileSummary:
    """What ``tile_geotiff`` wrote."""

    out_dir: Path
    tiles: int
    skipped_nodata: int
    crs: str
    tile_size: int
    stride: int


def tile_origins(length, tile_size, stride):
    """Return tile start offsets covering ``length`` pixels; the last tile ends at the edge."""
    if length <= tile_size:
        return [0]
    starts = list(range(0, length - tile_size + 1, stride))
    if starts[-1] != length - tile_size:
        starts.append(length - tile_size)
    return starts


def _validate(tile_size, overlap, platform, max_nodata):
    if int(tile_size) < 16:
        raise GalleryError(f'--tile-size {tile_size} is too small; use at least 16 pixels '
                           '(224-512 suit image encoders)')
    if not 0.0 <= float(overlap) < 0.95:
        raise GalleryError(f'--overlap {overlap} must be a fraction in [0, 0.95), e.g. 0.25')
    if platform not in PLATFORMS:
        raise GalleryError(f'--platform {platform!r} is not one of {", ".join(PLATFORMS)}')
    if not 0.0 <= float(max_nodata) <= 1.0:
        raise GalleryError(f'--max-nodata {max_nodata} must be a fraction in [0, 1]')


def _band_plan(ds):
    """Return (band indexes to read, colormap LUT or None) for an RGB rendering."""
    interp = list(ds.colorinterp)
    if all(c in interp for c in (ColorInterp.red, ColorInterp.green, ColorInterp.blue)):
        rgb = (ColorInterp.red, ColorInterp.green, ColorInterp.blue)
        return [interp.index(c) + 1 for c in rgb], None
    colour_bands = [i + 1 for i, c in enumerate(interp) if c != ColorInterp.alpha]
    if not colour_bands:
        raise GalleryError(f'{ds.name} has no colour bands (only alpha); pass an RGB or '
                           'grey-scale raster')
    if len(colour_bands) >= 3:
        return colour_bands[:3], None
    band = colour_bands[0]
    if interp[band - 1] == ColorInterp.palette:
        lut = np.zeros((256, 3), dtype=np.uint8)
        for value, rgba in ds.colormap(band).items():
            if 0 <= value < 256:
                lut[value] = rgba[:3]
        return [band], lut
    return [band], None


def _scaling(ds, bands):
    """Return (low, high) per band for 8-bit output, from a decimated read; None for uint8."""
    if all(ds.dtypes[b - 1] == 'uint8' for b in bands):
        return None
    factor = max(1.0, max(ds.width, ds.height) / OVERVIEW_PX)
    shape = (len(bands), max(1, int(ds.height / factor)), max(1, int(ds.width / factor)))
    sample = ds.read(bands, out_shape=shape, masked=True)
    lows, highs = [], []
    for k in range(len(bands)):
        valid = sample[k].compressed()
        valid = valid[np.isfinite(valid)]
        if valid.size == 0:
            lows.append(0.0)
            highs.append(1.0)
            continue
        lo, hi = np.percentile(valid, [2.0, 98.0])
        lows.append(float(lo))
        highs.append(float(hi) if hi > lo else float(lo) + 1.0)
    return np.array(lows)[:, None, None], np.array(highs)[:, None, None]


def _read_tile(ds, bands, col, row, tile_size, scaling, lut):
    """Read one tile window; return (RGB uint8 array, valid mask bool), padded at the edges."""
    window = Window(col, row, tile_size, tile_size)
    inside = window.intersection(Window(0, 0, ds.width, ds.height))
    h, w = int(inside.height), int(inside.width)
    data = ds.read(bands, window=inside)
    valid_part = ds.dataset_mask(window=inside) > 0
    if scaling is not None:
        lo, hi = scaling
        data = np.clip((data.astype(np.float64) - lo) / (hi - lo) * 255.0, 0, 255)
        data = np.nan_to_num(data, nan=0.0)
    data = data.astype(np.uint8)
    if lut is not None:
        rgb_part = lut[data[0]]
    elif data.shape[0] == 1:
        rgb_part = np.repeat(data[0][:, :, None], 3, axis=2)
    else:
        rgb_part = np.transpose(data, (1, 2, 0))
    rgb = np.zeros((tile_size, tile_size, 3), dtype=np.uint8)
    valid = np.zeros((tile_size, tile_size), dtype=bool)
    rgb[:h, :w] = rgb_part
    valid[:h, :w] = valid_part
    rgb[~valid] = 0
    return rgb, valid


def _heading(to_wgs84, geod, ds, cx, cy, tile_size):
    """Compass heading (deg) of the tile's up direction at its centre."""
    x0, y0 = ds.transform @ (cx, cy)
    x1, y1 = ds.transform @ (cx, cy - tile_size / 2)
    lon0, lat0 = to_wgs84.transform(x0, y0)
    lon1, lat1 = to_wgs84.transform(x1, y1)
    azimuth, _, _ = geod.inv(lon0, lat0, lon1, lat1)
    heading = round(azimuth % 360.0, 3)
    return 0.0 if heading >= 360.0 else heading


def tile_geotiff(src, out_dir, tile_size=256, overlap=0.0, platform='satellite', alt=0.0,
                 max_nodata=0.5, force=False, progress=None):
    """Cut ``src`` into PNG tiles plus ``gallery.csv`` in ``out_dir``; returns a summary.

    ``overlap`` is the fraction of a tile shared with its neighbour; ``max_nodata`` the
    largest no-data fraction a kept tile may have; ``alt`` the altitude (m, WGS84 ellipsoid)
    written for every tile. ``progress`` (optional) is called once per tile considered.
    """
    _validate(tile_size, overlap, platform, max_nodata)
    tile_size = int(tile_size)
    stride = max(1, int(round(tile_size * (1.0 - float(overlap)))))
    src = Path(src)
    out = Path(out_dir)
    if (out / 'gallery.csv').exists() and not force:
        raise GalleryError(f'{out} already holds a gallery (gallery.csv); pass --force to '
                           'overwrite it or choose an empty folder')
    if not src.is_file():
        raise GalleryError(f'raster {src} does not exist; pass the path of a GeoTIFF')
    try:
        ds = rasterio.open(src)
    except RasterioIOError as exc:
        raise GalleryError(f'cannot open {src} as a raster ({exc}); pass a GeoTIFF') from None
    with ds:
        if ds.crs is None:
            raise GalleryError(f'{src} has no coordinate reference system; geo-reference it '
                               '(e.g. gdal_edit.py -a_srs) before tiling')
        if ds.transform.is_identity:
            raise GalleryError(f'{src} has no geotransform; geo-reference it before tiling')
        bands, lut = _band_plan(ds)
        scaling = _scaling(ds, bands)
        to_wgs84 = pyproj.Transformer.from_crs(ds.crs, 'EPSG:4326', always_xy=True)
        geod = pyproj.Geod(ellps='WGS84')
        stem = re.sub(r'[^A-Za-z0-9_-]+', '-', src.stem).strip('-') or 'tile'
        (out / 'images').mkdir(parents=True, exist_ok=True)
        items, skipped = [], 0
        for row in tile_origins(ds.height, tile_size, stride):
            for col in tile_origins(ds.width, tile_size, stride):
                rgb, valid = _read_tile(ds, bands, col, row, tile_size, scaling, lut)
                if progress:
                    progress()
                if 1.0 - valid.mean() > max_nodata or not valid.any():
                    skipped += 1
                    continue
                cx, cy = col + tile_size / 2, row + tile_size / 2
                x, y = ds.transform @ (cx, cy)
                lon, lat = to_wgs84.transform(x, y)
                if not (math.isfinite(lat) and math.isfinite(lon)):
                    raise GalleryError(f'tile centre of {src} at pixel ({cx}, {cy}) does not '
                                       f'map to WGS84; check the raster CRS {ds.crs}')
                image_id = f'{stem}_r{row:06d}_c{col:06d}'
                rel = f'images/{image_id}.png'
                buffer = io.BytesIO()
                Image.fromarray(rgb, 'RGB').save(buffer, format='PNG', compress_level=6)
                atomic_write_bytes(out / rel, buffer.getvalue())
                items.append(GalleryItem(
                    image_id=image_id, path=rel, lat=float(lat), lon=float(lon),
                    alt=float(alt), heading_deg=_heading(to_wgs84, geod, ds, cx, cy, tile_size),
                    platform=platform))
        if not items:
            raise GalleryError(f'every tile of {src} is more than {max_nodata:.0%} no-data; '
                               'check the nodata value or raise --max-nodata')
        keep = {Path(item.path).name for item in items}
        pattern = re.compile(re.escape(stem) + r'_r\d+_c\d+\.png$')
        for path in sorted((out / 'images').iterdir()):
            # Tiles of an earlier run with other settings would otherwise linger unlisted.
            if pattern.match(path.name) and path.name not in keep:
                path.unlink()
        write_manifest(out, items)
        atomic_write_json(out / 'orthomosaic.json', {
            'source': str(src.resolve()), 'crs': ds.crs.to_string(), 'width': ds.width,
            'height': ds.height, 'tile_size': tile_size, 'overlap': float(overlap),
            'stride': stride, 'tiles': len(items), 'skipped_nodata': skipped,
            'max_nodata': float(max_nodata)})
        return TileSummary(out, len(items), skipped, ds.crs.to_string(), tile_size, stride)


def count_tiles(src, tile_size=256, overlap=0.0):
    """Return how many tile windows ``tile_geotiff`` will consider (for a progress bar)."""
    stride = max(1, int(round(int(tile_size) * (1.0 - float(overlap)))))
    with rasterio.open(src) as ds:
        return (len(tile_origins(ds.height, int(tile_size), stride))
                * len(tile_origins(ds.width, int(tile_size), stride)))
