"""Readers and writers for the benchmark files the evaluation understands.

- GeoText-1652 annotation JSON (the RoboSense 2025 Track 4 data): a list of
  ``{image_id: '0839/image-43.jpeg', image: 'test/0839/image-43.jpeg', caption, sentences,
  bboxes}``. ``caption`` is a string in train and a list of strings in test. The building id is
  the first 4 characters of ``image_id``; the platform comes from the file name: drone
  ``image-NN.jpeg``, satellite ``<building id>.jpg``, ground (street) ``<n>.jpg``. Only
  ``caption`` texts become queries; ``sentences`` are box-level phrases and are not used.
- RoboSense Track 4: queries ``q_00001<TAB>text``; the gallery a flat folder of
  ``image_<8 hex>.jpeg``; ground truth ``q_00001<TAB>image_<hex>`` with several ids allowed,
  separated by spaces or tabs; the submission ``q1 id1 ... id10``.
- Project galleries: a query CSV with columns ``query`` and ``group_id`` (optional
  ``query_id`` and ``platform``), scored against the gallery manifest's ``group_id``.

Annotation captions are queries only: nothing here turns them into gallery descriptions.
"""

import csv
from dataclasses import dataclass, field
import json
import os
from pathlib import Path
import re

from cgrs_ros.engine.errors import GalleryError, QueryError
from cgrs_ros.engine.storage import atomic_write_text

IMAGE_EXTENSIONS = ('.jpeg', '.jpg', '.png', '.bmp', '.tif', '.tiff', '.webp')
SUBMISSION_TOP_K = 10

_DRONE_NAME = re.compile(r'^image-\d+\.jpe?g$', re.IGNORECASE)
_TRACK4_QUERY_ID = re.compile(r'^q_?(\d+)$')
_TRACK4_IMAGE_NAME = re.compile(r'^image_[0-9a-f]+$', re.IGNORECASE)


@dataclass(frozen=True)
class EvalImage:
    """One gallery image of a benchmark: its id, its path under the image root, its label."""

    image_id: str
    path: str
    platform: str = None
    group_id: str = None


@dataclass(frozen=True)
class EvalQuery:
    """One text query with the labels that count as a hit (group ids, or image ids)."""

    query_id: str
    text: str
    relevant: frozenset
    platform: str = None
    source_image: str = None


@dataclass
class EvalSet:
    """A benchmark read from disk: gallery images (may be empty), queries and what was skipped.

    ``hit_level`` is ``'group'`` when a query's ``relevant`` holds group ids and ``'image'``
    when it holds image ids. ``problems`` lists skipped entries, one sentence each.
    """

    name: str
    queries: list
    images: list = field(default_factory=list)
    hit_level: str = 'group'
    problems: list = field(default_factory=list)


# --------------------------------------------------------------------------- GeoText-1652

def geotext_building_id(image_id):
    """Return the building id of a GeoText-1652 ``image_id`` (its first 4 characters)."""
    return image_id[:4]


def geotext_platform(file_name, building_id):
    """Return 'drone', 'satellite', 'ground' or None from a GeoText-1652 image file name."""
    name = os.path.basename(file_name)
    stem = os.path.splitext(name)[0]
    if _DRONE_NAME.match(name):
        return 'drone'
    if stem == building_id:
        return 'satellite'
    if stem.isdigit():
        return 'ground'
    return None


def load_geotext(ann_path):
    """Read a GeoText-1652 annotation JSON into an :class:`EvalSet` (one query per caption).

    Entries without a usable ``image_id`` or caption are skipped and listed in ``problems``;
    an image listed twice keeps one gallery entry and gains the second entry's captions.
    """
    path = Path(ann_path)
    try:
        with open(path, encoding='utf-8') as handle:
            entries = json.load(handle)
    except FileNotFoundError:
        raise GalleryError(f'annotation file {path} does not exist; pass the GeoText-1652 '
                           f'test JSON with --ann') from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise GalleryError(f'annotation file {path} is not valid JSON ({exc}); pass the '
                           f'GeoText-1652 annotation JSON unchanged') from None
    if not isinstance(entries, list):
        raise GalleryError(f'annotation file {path} holds a JSON {type(entries).__name__}, not '
                           f'the list of image entries GeoText-1652 uses')
    images = {}
    queries = []
    problems = []
    caption_counts = {}
    for index, entry in enumerate(entries):
        where = f'entry {index}'
        if not isinstance(entry, dict):
            problems.append(f'{where}: not a JSON object; skipped')
            continue
        image_id = entry.get('image_id')
        if not isinstance(image_id, str) or len(image_id) < 5:
            problems.append(f'{where}: image_id {image_id!r} is not like "0839/image-43.jpeg"; '
                            f'skipped')
            continue
        captions = entry.get('caption')
        if isinstance(captions, str):
            captions = [captions]
        if not isinstance(captions, list):
            problems.append(f'{where} ({image_id}): caption is neither a string nor a list; '
                            f'skipped')
            continue
        captions = [c.strip() for c in captions if isinstance(c, str) and c.strip()]
        if not captions:
            problems.append(f'{where} ({image_id}): no non-empty caption; skipped')
            continue
        building = geotext_building_id(image_id)
        platform = geotext_platform(image_id, building)
        rel_path = entry.get('image') if isinstance(entry.get('image'), str) else image_id
        if image_id not in images:
            images[image_id] = EvalImage(image_id=image_id, path=rel_path, platform=platform,
                                         group_id=building)
        for caption in captions:
            n = caption_counts.get(image_id, 0)
            caption_counts[image_id] = n + 1
            queries.append(EvalQuery(query_id=f'{image_id}#{n}', text=caption,
                                     relevant=frozenset([building]), platform=platform,
                                     source_image=image_id))
    if not queries:
        raise GalleryError(f'annotation file {path} has no usable entry '
                           f'({len(problems)} skipped); check it is GeoText-1652 JSON')
    return EvalSet(name='geotext', queries=queries, images=list(images.values()),
                   hit_level='group', problems=problems)


def resolve_geotext_image(images_root, image):
    """Return the file of ``image`` under ``images_root``, trying ``image`` then ``image_id``.

    The annotation's ``image`` field carries a split prefix (``test/0839/...``) that may or
    may not be part of the folder the user points at; both layouts are accepted.
    """
    root = Path(images_root)
    candidates = [image.path, image.image_id]
    parts = Path(image.path).parts
    if len(parts) > 1:
        candidates.append(str(Path(*parts[1:])))
    for candidate in candidates:
        full = root / candidate
        if full.is_file():
            return full
    return None


# ----------------------------------------------------------------------- RoboSense Track 4

def submission_query_id(query_id):
    """Return the submission form of a Track 4 query id: ``q_00001`` -> ``q1``.

    This follows the official ``generate_sub.py``: the digits after ``q_`` with leading
    zeros removed. Ids already written as ``q1`` are kept.
    """
    match = _TRACK4_QUERY_ID.match(query_id.strip())
    if not match:
        raise QueryError(f'query id {query_id!r} is not like q_00001; fix the query file')
    return f'q{int(match.group(1))}'


def strip_image_extension(image_id):
    """Return an image id without a trailing image extension (``image_ab12.jpeg`` -> ...)."""
    stem, ext = os.path.splitext(image_id)
    return stem if ext.lower() in IMAGE_EXTENSIONS else image_id


def _read_lines(path, what, error_type, flag):
    try:
        with open(path, encoding='utf-8') as handle:
            return handle.read().splitlines()
    except FileNotFoundError:
        raise error_type(f'{what} {path} does not exist; pass it with {flag}') from None
    except UnicodeDecodeError:
        raise error_type(f'{what} {path} is not UTF-8 text; pass the file unchanged') from None


def read_track4_queries(path):
    """Read ``q_00001<TAB>text`` lines into a list of ``(query_id, text)`` in file order."""
    out = []
    seen = set()
    for lineno, line in enumerate(_read_lines(path, 'query file', QueryError, '--queries'), 1):
        if not line.strip():
            continue
        query_id, sep, text = line.partition('\t')
        query_id = query_id.strip()
        if not sep or not text.strip() or not _TRACK4_QUERY_ID.match(query_id):
            raise QueryError(f'{path} line {lineno} is not "q_00001<TAB>text"; fix that line')
        key = submission_query_id(query_id)
        if key in seen:
            raise QueryError(f'{path} line {lineno} repeats query {query_id}; keep one line '
                             f'per query')
        seen.add(key)
        out.append((query_id, text.strip()))
    if not out:
        raise QueryError(f'query file {path} has no queries; expected q_00001<TAB>text lines')
    return out


def list_track4_gallery(gallery_dir):
    """List a flat Track 4 gallery folder as :class:`EvalImage` (id = file name stem).

    Each image is its own group (Track 4 hits are image-level). Names other than
    ``image_<hex>`` are accepted; sub-folders are ignored, as the official layout is flat.
    """
    root = Path(gallery_dir)
    if not root.is_dir():
        raise GalleryError(f'gallery folder {root} does not exist; pass the folder of '
                           f'image_<hex>.jpeg files with --gallery')
    images = []
    seen = {}
    for entry in sorted(root.iterdir()):
        if not entry.is_file() or entry.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        image_id = entry.stem
        if image_id in seen:
            raise GalleryError(f'gallery images {seen[image_id]} and {entry.name} share the id '
                               f'{image_id}; rename one of them')
        seen[image_id] = entry.name
        images.append(EvalImage(image_id=image_id, path=entry.name, platform=None,
                                group_id=image_id))
    if not images:
        raise GalleryError(f'gallery folder {root} has no images; expected image_<hex>.jpeg '
                           f'files directly in it')
    return images


def read_track4_ground_truth(path):
    """Read ``q_00001<TAB>image_<hex> [image_<hex> ...]`` into ``{'q1': frozenset(ids)}``.

    Keys are the submission form of the query id, so ground truth written with either
    ``q_00001`` or ``q1`` matches; ids lose any image extension.
    """
    out = {}
    for lineno, line in enumerate(_read_lines(path, 'ground-truth file', QueryError, '--gt'),
                                  1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) < 2 or not _TRACK4_QUERY_ID.match(fields[0]):
            raise QueryError(f'{path} line {lineno} is not "q_00001<TAB>image_<hex>"; fix that '
                             f'line')
        key = submission_query_id(fields[0])
        ids = frozenset(strip_image_extension(f) for f in fields[1:])
        out[key] = out.get(key, frozenset()) | ids
    if not out:
        raise QueryError(f'ground-truth file {path} is empty; expected q_00001<TAB>image_<hex> '
                         f'lines')
    return out


def load_track4(queries_path, gallery_dir, gt_path=None):
    """Read a Track 4 query file, gallery folder and optional ground truth into an EvalSet.

    Without ground truth every query's ``relevant`` set is empty (nothing to score, but a
    submission can still be written). Queries missing from the ground truth are listed in
    ``problems`` and likewise have no relevant ids.
    """
    raw = read_track4_queries(queries_path)
    images = list_track4_gallery(gallery_dir)
    gt = read_track4_ground_truth(gt_path) if gt_path else None
    problems = []
    queries = []
    for query_id, text in raw:
        relevant = frozenset()
        if gt is not None:
            relevant = gt.get(submission_query_id(query_id), frozenset())
            if not relevant:
                problems.append(f'query {query_id} has no ground-truth line; scored as a miss')
        queries.append(EvalQuery(query_id=query_id, text=text, relevant=relevant))
    odd = [i.path for i in images if not _TRACK4_IMAGE_NAME.match(i.image_id)]
    if odd:
        problems.append(f'{len(odd)} gallery file(s) are not named image_<hex>.jpeg '
                        f'(first: {odd[0]}); their stems are used as ids')
    return EvalSet(name='track4', queries=queries, images=images, hit_level='image',
                   problems=problems)


def format_submission_line(query_id, image_ids, top_k=SUBMISSION_TOP_K):
    """Return one submission line, ``q1 id1 ... id10``, ids without their extension."""
    ids = [strip_image_extension(i) for i in list(image_ids)[:top_k]]
    return ' '.join([submission_query_id(query_id)] + ids)


def write_track4_submission(path, rankings, top_k=SUBMISSION_TOP_K):
    """Write the official submission file from ``[(query_id, ranked_image_ids), ...]``.

    Lines follow the order given; ids beyond ``top_k`` are dropped. The file is written
    atomically. Returns the number of lines written.
    """
    lines = [format_submission_line(qid, ids, top_k) for qid, ids in rankings]
    atomic_write_text(path, '\n'.join(lines) + '\n')
    return len(lines)


def read_track4_submission(path):
    """Read a submission file into ``{'q1': [id1, ..., id10]}`` (file order kept per line)."""
    out = {}
    for lineno, line in enumerate(_read_lines(path, 'submission file', QueryError,
                                              '--from-submission'), 1):
        fields = line.split()
        if not fields:
            continue
        if not _TRACK4_QUERY_ID.match(fields[0]):
            raise QueryError(f'{path} line {lineno} does not start with a query id like q1; '
                             f'fix that line')
        key = submission_query_id(fields[0])
        if key in out:
            raise QueryError(f'{path} line {lineno} repeats query {fields[0]}; keep one line '
                             f'per query')
        out[key] = [strip_image_extension(f) for f in fields[1:]]
    return out


# ----------------------------------------------------------------------- project galleries

def read_gallery_queries(path):
    """Read a project query CSV into an :class:`EvalSet` scored at group level.

    Columns: ``query`` (or ``text``) and ``group_id``; optional ``query_id`` and ``platform``.
    Rows with an empty query or group id are skipped and listed in ``problems``.
    """
    path = Path(path)
    try:
        with open(path, encoding='utf-8', newline='') as handle:
            reader = csv.DictReader(handle)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            rows = list(reader)
    except FileNotFoundError:
        raise QueryError(f'query file {path} does not exist; pass a CSV with columns query,'
                         f'group_id with --queries') from None
    except UnicodeDecodeError:
        raise QueryError(f'query file {path} is not UTF-8 text; save it as UTF-8 CSV') from None
    text_column = 'query' if 'query' in columns else ('text' if 'text' in columns else None)
    if text_column is None or 'group_id' not in columns:
        raise QueryError(f'query file {path} has columns {columns}; it needs a header with '
                         f'query and group_id')
    queries = []
    problems = []
    for lineno, row in enumerate(rows, 2):
        row = {(k or '').strip(): (v or '').strip() if isinstance(v, str) else v
               for k, v in row.items()}
        text = row.get(text_column) or ''
        group = row.get('group_id') or ''
        if not text or not group:
            problems.append(f'{path} line {lineno}: empty {text_column} or group_id; skipped')
            continue
        queries.append(EvalQuery(query_id=row.get('query_id') or f'line{lineno}', text=text,
                                 relevant=frozenset([group]),
                                 platform=row.get('platform') or None))
    if not queries:
        raise QueryError(f'query file {path} has no usable rows ({len(problems)} skipped)')
    return EvalSet(name='gallery', queries=queries, images=[], hit_level='group',
                   problems=problems)
