"""The gallery: a folder of geo-referenced images described by a manifest.

Manifest ``gallery.csv`` (or ``gallery.jsonl``), one row per image:

=============  ============================================================================
image_id       unique id (required)
path           image path relative to the gallery folder (required)
lat, lon       WGS84 degrees (required)
alt            metres above the WGS84 ellipsoid (optional, default 0)
heading_deg    compass heading of the camera, 0 = north, clockwise (optional, default 0)
platform       satellite | drone | ground (required)
group_id       building / place id used by evaluation (optional)
description    caption(s) that ship with the data (optional); several descriptions of one
               image are separated by `` || `` in CSV and given as a list in JSONL
=============  ============================================================================

Every row is validated; a bad row becomes a :class:`ManifestProblem` with its line number and
the rest of the gallery still loads.
"""

import csv
import dataclasses
import io
import json
import math
import os
from pathlib import Path
import warnings

from cgrs_ros.engine.errors import GalleryError
from cgrs_ros.engine.storage import atomic_write_text
from PIL import Image, UnidentifiedImageError

PLATFORMS = ('satellite', 'drone', 'ground')
MANIFEST_NAMES = ('gallery.csv', 'gallery.jsonl')
COLUMNS = ('image_id', 'path', 'lat', 'lon', 'alt', 'heading_deg', 'platform', 'group_id',
           'description')
REQUIRED_COLUMNS = ('image_id', 'path', 'lat', 'lon', 'platform')
DESCRIPTION_SEPARATOR = ' || '
# Limits a row must keep (a bad row is skipped with its line, the rest loads):
# - images over MAX_IMAGE_PIXELS are refused: a decompression bomb, or a raster to tile first
#   (`cgrs gallery from-geotiff`); decoded images are shrunk to MAX_DECODED_SIDE on their
#   longer side, more than any encoder or captioner here looks at, so a batch's memory is
#   bounded whatever the files hold;
# - a field longer than MAX_FIELD_CHARS (a description is a few hundred characters);
# - alt within ALT_RANGE_M metres of the WGS84 ellipsoid (below the Dead Sea shore to far above
#   any drone's ceiling).
MAX_IMAGE_PIXELS = 100_000_000
MAX_DECODED_SIDE = 2048
MAX_FIELD_CHARS = 100_000
ALT_RANGE_M = (-1000.0, 20000.0)
# The csv module's own limit (128 kB) would abort the whole manifest on one long field; parse
# up to this size and refuse the row ourselves, with its line number.
csv.field_size_limit(max(csv.field_size_limit(), 256 * 1024 * 1024))


@dataclasses.dataclass(frozen=True, slots=True)  # slots: ~40% less memory per item
class GalleryItem:
    """One gallery image and where it was taken; ``path`` is relative to the gallery root."""

    image_id: str
    path: str
    lat: float
    lon: float
    alt: float
    heading_deg: float
    platform: str
    group_id: str = None
    descriptions: tuple = ()
    line: int = 0

    def absolute_path(self, root):
        """Return the image's absolute path inside gallery folder ``root``."""
        return Path(root) / self.path


@dataclasses.dataclass(frozen=True)
class ManifestProblem:
    """A manifest row that was skipped, and why (``line`` is 1-based, the header is line 1)."""

    line: int
    image_id: str
    message: str

    def __str__(self):
        who = f' (image_id {self.image_id!r})' if self.image_id else ''
        return f'line {self.line}{who}: {self.message}'


class Gallery:
    """A loaded gallery: its root folder, the valid items in manifest order, and the problems."""

    def __init__(self, root, items, problems, manifest=None):
        self.root = Path(root)
        self.items = tuple(items)
        self.problems = list(problems)
        self.manifest = Path(manifest) if manifest else None
        self._by_id = {item.image_id: item for item in self.items}

    def __len__(self):
        return len(self.items)

    def __iter__(self):
        return iter(self.items)

    def get(self, image_id):
        """Return the item with this id, or None."""
        return self._by_id.get(image_id)

    def path_of(self, item):
        """Return the absolute path of an item's image."""
        return item.absolute_path(self.root)


def find_manifest(gallery_dir):
    """Return the manifest path of a gallery folder, or raise GalleryError naming the fix."""
    root = Path(gallery_dir)
    if not root.is_dir():
        raise GalleryError(f'gallery folder {root} does not exist; pass the folder that holds '
                           'gallery.csv')
    for name in MANIFEST_NAMES:
        if (root / name).is_file():
            return root / name
    raise GalleryError(f'{root} has no gallery.csv or gallery.jsonl; create one with columns '
                       f'{", ".join(COLUMNS)}')


def _number(raw, name, default=None):
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        if default is None:
            raise ValueError(f'{name} is empty')
        return default
    if isinstance(raw, str) and not raw.isascii():
        # float() reads other scripts' digits ("١٢" is 12.0); a manifest number is ASCII.
        raise ValueError(f'{name} {raw!r} is not a number written with ASCII digits')
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise ValueError(f'{name} {raw!r} is not a number') from None
    if not math.isfinite(value):
        raise ValueError(f'{name} {raw!r} is not a finite number')
    return value


def _descriptions(raw):
    if raw is None:
        return ()
    if isinstance(raw, str):
        parts = raw.split(DESCRIPTION_SEPARATOR.strip())
    elif isinstance(raw, (list, tuple)):
        parts = raw
    else:
        raise ValueError('description must be text or a list of texts')
    out = []
    for part in parts:
        if not isinstance(part, str):
            raise ValueError('description must be text or a list of texts')
        part = ' '.join(part.split())
        if part:
            out.append(part)
    return tuple(out)


def _inside(rel):
    """Lexical check that ``rel`` stays inside the gallery (symlinks the user placed are fine)."""
    if os.path.isabs(rel):
        return False
    norm = os.path.normpath(rel)
    return norm != '..' and not norm.startswith('..' + os.sep) and norm != '.'


def _check_image(path, rel, check_images):
    if check_images == 'none':
        return
    if not path.is_file():
        raise ValueError(f'image file {rel!r} not found in the gallery folder; fix the path or '
                         'remove the row')
    if not os.access(path, os.R_OK):
        raise ValueError(f'image file {rel!r} is not readable; fix its permissions')
    if check_images == 'header':
        # Image.open reads only the header, so this stays cheap for large galleries; a file
        # whose pixels are corrupt is caught later by the indexer and skipped with a reason.
        try:
            with _open_quietly(path) as image:
                width, height = image.size
        except Image.DecompressionBombError as exc:
            raise ValueError(f'image file {rel!r} is over the pixel budget ({exc}); tile or '
                             'downscale it, or remove the row') from None
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise ValueError(f'image file {rel!r} is not a readable image ({exc}); replace the '
                             'file or remove the row') from None
        if not width or not height:
            raise ValueError(f'image file {rel!r} has no pixels; replace the file or remove '
                             'the row')
        _check_pixels(width, height, rel)


def _open_quietly(path):
    """Image.open without PIL's bomb warning: the pixel budget is checked here instead."""
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', Image.DecompressionBombWarning)
        return Image.open(path)


def _check_pixels(width, height, rel):
    if width * height > MAX_IMAGE_PIXELS:
        raise ValueError(
            f'image file {rel!r} is {width} x {height} = {width * height / 1e6:.0f} Mpx, over '
            f'the pixel budget of {MAX_IMAGE_PIXELS / 1e6:.0f} Mpx; tile it (e.g. `cgrs gallery '
            'from-geotiff`) or downscale it, or remove the row')


def decode_image(path, max_side=MAX_DECODED_SIDE):
    """Decode an image fully as RGB within the pixel budget, shrunk to ``max_side``.

    Raises ValueError for an image over :data:`MAX_IMAGE_PIXELS` and the decoder's own errors
    for corrupt data. JPEGs are decoded at a reduced scale when that is enough (``draft``).
    """
    return _decode(path, str(path), max_side)


def decode_image_bytes(data, max_side=MAX_DECODED_SIDE, name='the image'):
    """Decode encoded image bytes (JPEG, PNG, ...) like :func:`decode_image` decodes a file.

    For images that arrive over the wire (a ROS CompressedImage, an upload): the same pixel
    budget and shrinking apply. ``name`` is how errors refer to the data.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f'{name} must be bytes, not {type(data).__name__}')
    if not len(data):
        raise ValueError(f'{name} is empty (0 bytes)')
    return _decode(io.BytesIO(bytes(data)), name, max_side)


def _decode(source, name, max_side):
    try:
        image = _open_quietly(source)
    except Image.DecompressionBombError as exc:
        raise ValueError(f'{name} is over the pixel budget ({exc})') from None
    with image:
        _check_pixels(*image.size, name)
        image.draft('RGB', (max_side, max_side))
        image.load()
        image = image.convert('RGB')
    if max(image.size) > max_side:
        image.thumbnail((max_side, max_side), Image.BICUBIC)
    return image


def _parse_row(row, root, check_images):
    image_id = str(row.get('image_id') or '').strip()
    if not image_id:
        raise ValueError('image_id is empty')
    rel = str(row.get('path') or '').strip()
    if not rel:
        raise ValueError('path is empty')
    if not _inside(rel):
        raise ValueError(f'path {rel!r} points outside the gallery folder; use a path relative '
                         'to the folder that holds the manifest')
    for name, value in row.items():
        if isinstance(value, str) and len(value) > MAX_FIELD_CHARS:
            raise ValueError(f'field {name} is {len(value)} characters, more than '
                             f'{MAX_FIELD_CHARS}; shorten it')
    lat = _number(row.get('lat'), 'lat')
    lon = _number(row.get('lon'), 'lon')
    if not -90.0 <= lat <= 90.0:
        raise ValueError(f'lat {lat} is out of range [-90, 90]')
    if not -180.0 <= lon <= 180.0:
        raise ValueError(f'lon {lon} is out of range [-180, 180]')
    alt = _number(row.get('alt'), 'alt', default=0.0)
    if not ALT_RANGE_M[0] <= alt <= ALT_RANGE_M[1]:
        raise ValueError(f'alt {alt} is out of range [{ALT_RANGE_M[0]:.0f}, '
                         f'{ALT_RANGE_M[1]:.0f}] m (WGS84 ellipsoidal height)')
    heading = _number(row.get('heading_deg'), 'heading_deg', default=0.0) % 360.0
    platform = str(row.get('platform') or '').strip().lower()
    if platform not in PLATFORMS:
        raise ValueError(f'platform {row.get("platform")!r} is not one of '
                         f'{", ".join(PLATFORMS)}')
    group = row.get('group_id')
    group = str(group).strip() if group is not None and str(group).strip() else None
    descriptions = _descriptions(row.get('description'))
    _check_image(root / rel, rel, check_images)
    return image_id, {'image_id': image_id, 'path': os.path.normpath(rel), 'lat': lat,
                      'lon': lon, 'alt': alt, 'heading_deg': heading, 'platform': platform,
                      'group_id': group, 'descriptions': descriptions}


def _csv_rows(text):
    reader = csv.DictReader(io.StringIO(text))
    header = [name.strip() for name in (reader.fieldnames or [])]
    missing = [name for name in REQUIRED_COLUMNS if name not in header]
    if missing:
        raise GalleryError(f'manifest header lacks column(s) {", ".join(missing)}; the first '
                           f'line must name the columns {", ".join(COLUMNS)}')
    reader.fieldnames = header
    for row in reader:
        # line_num is the row's last line; a quoted field may span several lines.
        spans = sum(v.count('\n') for v in row.values() if isinstance(v, str))
        yield reader.line_num - spans, row


def _jsonl_rows(text):
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            yield number, ValueError(f'not valid JSON ({exc.msg})')
            continue
        if not isinstance(row, dict):
            yield number, ValueError('a JSONL row must be an object')
            continue
        yield number, row


def load_gallery(gallery_dir, check_images='header'):
    """Read and validate a gallery's manifest; bad rows become problems, the rest loads.

    ``check_images`` is ``'header'`` (file exists and its image header parses), ``'exists'``
    (file exists and is readable) or ``'none'`` (trust the manifest; used by readers of an
    already indexed gallery).
    """
    manifest = find_manifest(gallery_dir)
    root = Path(gallery_dir)
    try:
        text = manifest.read_text(encoding='utf-8-sig')
    except (OSError, UnicodeDecodeError) as exc:
        raise GalleryError(f'cannot read manifest {manifest} ({exc}); save it as UTF-8 '
                           'text') from None
    rows = _jsonl_rows(text) if manifest.suffix == '.jsonl' else _csv_rows(text)
    items, problems, first_line = [], [], {}
    for line, row in rows:
        if isinstance(row, Exception):
            problems.append(ManifestProblem(line, None, str(row)))
            continue
        raw_id = str(row.get('image_id') or '').strip() or None
        try:
            image_id, fields = _parse_row(row, root, check_images)
        except ValueError as exc:
            problems.append(ManifestProblem(line, raw_id, str(exc)))
            continue
        if image_id in first_line:
            problems.append(ManifestProblem(
                line, image_id, f'duplicate image_id (first used on line {first_line[image_id]});'
                ' give every image its own id'))
            continue
        first_line[image_id] = line
        items.append(GalleryItem(line=line, **fields))
    return Gallery(root, items, problems, manifest)


def write_manifest(gallery_dir, items):
    """Write ``items`` as ``gallery_dir/gallery.csv`` (atomically); returns the path."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator='\n')
    writer.writerow(COLUMNS)
    for item in items:
        for text in item.descriptions:
            if DESCRIPTION_SEPARATOR.strip() in text:
                raise GalleryError(f'description of {item.image_id!r} contains "||", which '
                                   'separates descriptions in gallery.csv; remove it')
        writer.writerow([item.image_id, item.path, repr(float(item.lat)), repr(float(item.lon)),
                         repr(float(item.alt)), repr(float(item.heading_deg)), item.platform,
                         item.group_id or '', DESCRIPTION_SEPARATOR.join(item.descriptions)])
    path = Path(gallery_dir) / 'gallery.csv'
    atomic_write_text(path, buffer.getvalue())
    return path
