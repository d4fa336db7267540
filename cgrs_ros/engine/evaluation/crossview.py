"""Cross-view image-query evaluation: University-1652, SUES-200 and project galleries.

Why a runner of its own: the text benchmarks rank gallery images for sentences and report
Recall@K per retrieval method; the cross-view benchmarks rank satellite tiles for drone photos
(d2s) and drone photos for satellite tiles (s2d), and the papers report Recall@K and AP per
direction (AP because one satellite query has many correct drone views). The image queries run
through the engine: the gallery is indexed by ``cgrs index`` into an evaluation folder (the
dataset folder is only read), and each query photo is embedded by the image encoder exactly as
``Retriever.query_image`` embeds it (the expert of its own platform for the learned encoder).
To get AP the whole gallery must be ranked, not a top-k list, so queries are embedded in
batches and scored against every gallery row of the target platform with the same inner
product FAISS's flat index computes; the first query of each direction is also run through
``query_image`` and its top 10 compared with this ranking (``engine_check`` in the report).

Published layouts read here:

University-1652 (``ROOT`` is the dataset folder or its ``test`` folder)::

    test/query_drone/<building>/image-NN.jpeg     test/gallery_satellite/<building>/<building>.jpg
    test/query_satellite/<building>/<building>.jpg test/gallery_drone/<building>/image-NN.jpeg

SUES-200 (200 places, drone views at 150/200/250/300 m), either as distributed::

    drone-view/<place>/<height>/NN.jpg   (drone-view/<height>/<place>/ also read)
    satellite-view/<place>/0.png

or as the benchmark's split script writes it (``ROOT`` may be the dataset folder,
``Testing`` or ``Testing/<height>``)::

    Testing/<height>/query_drone/<place>/...   Testing/<height>/gallery_satellite/<place>/...
    Testing/<height>/query_satellite/<place>/  Testing/<height>/gallery_drone/<place>/...

From the distributed layout the test split is made as that script makes it: places sorted,
the first 60 % are training places, the queries come from the other 40 %, and the galleries
hold all places (the training places are distractors).
"""

import dataclasses
from pathlib import Path
import sys
import time

from cgrs_ros.engine.errors import ConfigError, GalleryError, QueryError
from cgrs_ros.engine.evaluation import report as report_mod
from cgrs_ros.engine.evaluation.metrics import (CURVE_MAX_K, full_ranking_hits,
                                                full_ranking_result, HEADLINE_KS,
                                                latency_summary)

IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff', '.webp')
VIEWS = ('query_drone', 'gallery_satellite', 'query_satellite', 'gallery_drone')
# direction -> (query view, gallery view, query platform, gallery platform)
DIRECTIONS = {
    'd2s': ('query_drone', 'gallery_satellite', 'drone', 'satellite'),
    's2d': ('query_satellite', 'gallery_drone', 'satellite', 'drone'),
}
SUES_HEIGHTS = ('150', '200', '250', '300')
SUES_TRAIN_SHARE = 0.6
METHOD = 'image'
QUERY_BATCH = 32
SCORE_CHUNK = 256
MAX_SAMPLES = report_mod.MAX_LATENCY_SAMPLES


@dataclasses.dataclass(frozen=True)
class ViewImage:
    """One benchmark image: its file (under the dataset root) and its place (building) id."""

    path: Path
    group: str


@dataclasses.dataclass
class CrossViewSet:
    """The test split of a cross-view benchmark: images per view, read from ``root``."""

    benchmark: str
    root: Path
    views: dict
    problems: list = dataclasses.field(default_factory=list)
    notes: list = dataclasses.field(default_factory=list)

    def directions(self):
        """Return the directions whose query and gallery views both have images."""
        return [name for name, (query, gallery, _, _) in DIRECTIONS.items()
                if self.views.get(query) and self.views.get(gallery)]


def _is_image(path):
    return path.is_file() and not path.name.startswith('.') and \
        path.suffix.lower() in IMAGE_SUFFIXES


def _subfolders(folder):
    return sorted(p for p in Path(folder).iterdir() if p.is_dir() and not p.name.startswith('.'))


def read_place_folders(folder, problems=None, places=None):
    """Return the images of ``folder/<place>/*`` (sorted), each labelled with its place.

    ``places`` (optional) keeps only those place folders. Files that are not images are left
    out; a place folder without images is listed in ``problems``.
    """
    out = []
    for place in _subfolders(folder):
        if places is not None and place.name not in places:
            continue
        images = sorted(p for p in place.iterdir() if _is_image(p))
        if not images and problems is not None:
            problems.append(f'{place}: no images (*{", *".join(IMAGE_SUFFIXES)}); left out')
        out.extend(ViewImage(path, place.name) for path in images)
    return out


def _views_from_split(folder, problems):
    return {view: read_place_folders(folder / view, problems)
            for view in VIEWS if (folder / view).is_dir()}


def _layout_error(name, root, expected):
    return GalleryError(f'{root} does not have the {name} layout: expected {expected}; pass the '
                        'folder the dataset was unpacked into')


def load_university1652(root):
    """Read University-1652's test split (``ROOT/test/query_drone/<building>/...``)."""
    root = Path(root)
    if not root.is_dir():
        raise GalleryError(f'University-1652 folder {root} does not exist')
    test = root / 'test' if (root / 'test').is_dir() else root
    problems = []
    views = _views_from_split(test, problems)
    data = CrossViewSet('university1652', test, views, problems)
    if not data.directions():
        raise _layout_error('University-1652', root, 'test/query_drone/<building>/*.jpeg with '
                            'test/gallery_satellite/<building>/*.jpg, or test/query_satellite '
                            'with test/gallery_drone')
    return data


def _sues_split_folder(root, height):
    for folder in (root / 'Testing' / height, root / 'Dataset' / 'Testing' / height,
                   root / height, root):
        if any((folder / view).is_dir() for view in VIEWS):
            return folder
    return None


def _sues_drone_folders(drone_root, height):
    """Return {place: folder of its drone views at ``height``} for either distributed order."""
    children = _subfolders(drone_root)
    if children and all(child.name in SUES_HEIGHTS for child in children):
        base = drone_root / height  # drone-view/<height>/<place>
        return {place.name: place for place in _subfolders(base)} if base.is_dir() else {}
    return {place.name: place / height for place in children if (place / height).is_dir()}


def _images_of(folder, group):
    return [ViewImage(p, group) for p in sorted(Path(folder).iterdir()) if _is_image(p)]


def load_sues200(root, height):
    """Read SUES-200's test split at one flight height (150, 200, 250 or 300 m)."""
    root = Path(root)
    height = str(height)
    if height not in SUES_HEIGHTS:
        raise QueryError(f'SUES-200 height {height} is not one of {", ".join(SUES_HEIGHTS)}')
    if not root.is_dir():
        raise GalleryError(f'SUES-200 folder {root} does not exist')
    problems = []
    split = _sues_split_folder(root, height)
    if split is not None:
        data = CrossViewSet('sues200', split, _views_from_split(split, problems), problems)
        data.notes.append(f'test split read from {split}')
    else:
        drone_root, sat_root = root / 'drone-view', root / 'satellite-view'
        if not drone_root.is_dir() or not sat_root.is_dir():
            raise _layout_error('SUES-200', root, 'drone-view/<place>/<height>/*.jpg and '
                                'satellite-view/<place>/0.png, or Testing/<height>/query_drone/'
                                '<place>/...')
        drones = _sues_drone_folders(drone_root, height)
        sats = {place.name: place for place in _subfolders(sat_root)}
        if not drones:
            raise GalleryError(f'{drone_root} has no drone views at height {height}; the '
                               f'heights are {", ".join(SUES_HEIGHTS)}')
        places = sorted(set(drones) | set(sats))
        test = set(places[int(len(places) * SUES_TRAIN_SHARE):])
        views = {view: [] for view in VIEWS}
        for place in places:
            drone = _images_of(drones[place], place) if place in drones else []
            sat = _images_of(sats[place], place) if place in sats else []
            if not drone:
                problems.append(f'place {place}: no drone views at {height} m')
            if not sat:
                problems.append(f'place {place}: no satellite image')
            views['gallery_drone'].extend(drone)
            views['gallery_satellite'].extend(sat)
            if place in test:
                views['query_drone'].extend(drone)
                views['query_satellite'].extend(sat)
        data = CrossViewSet('sues200', root, views, problems)
        data.notes.append(f'test split made from the distributed layout as the SUES-200 split '
                          f'script makes it: {len(places)} places sorted, queries from the last '
                          f'{len(test)}, galleries with all of them')
    if not data.directions():
        raise _layout_error('SUES-200', root, f'query and gallery views at height {height}')
    return data


# ------------------------------------------------------------------------------ running

def _say(progress, message):
    if progress:
        print(message, file=sys.stderr, flush=True)


def _strided(values, limit=MAX_SAMPLES):
    values = list(values)
    if len(values) <= limit:
        return values
    step = len(values) / float(limit)
    return [values[int(i * step)] for i in range(limit)]


def write_crossview_gallery(work_dir, data, directions):
    """Write ``work_dir/gallery.csv`` listing the gallery views the directions rank.

    Images are referenced through an ``images`` link to the dataset root (nothing is written
    into the dataset); ids are ``<view>/<path under the root>``, platform the view's, group the
    place id. Returns the work folder.
    """
    from cgrs_ros.engine.evaluation.runner import _link_images, IMAGES_LINK
    from cgrs_ros.engine.gallery import GalleryItem, write_manifest

    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    _link_images(work_dir, data.root)
    root = Path(data.root).absolute()
    items = []
    for direction in directions:
        _, view, _, platform = DIRECTIONS[direction]
        for image in data.views[view]:
            rel = Path(image.path).absolute().relative_to(root)
            items.append(GalleryItem(
                image_id=f'{view}/{rel.as_posix()}', path=str(Path(IMAGES_LINK) / rel),
                lat=0.0, lon=0.0, alt=0.0, heading_deg=0.0, platform=platform,
                group_id=image.group))
    write_manifest(work_dir, items)
    return work_dir


def _decode_batch(paths, problems):
    from cgrs_ros.engine.gallery import decode_image

    images, kept = [], []
    for i, path in enumerate(paths):
        try:
            images.append(decode_image(path))
            kept.append(i)
        except Exception as exc:  # noqa: B902 - PIL raises many types for a corrupt file
            problems.append(f'query image {path} cannot be read ({exc}); scored as a miss')
    return images, kept


def rank_direction(retriever, queries, query_platform, gallery_platform, direction,
                   problems, progress=False, max_k=CURVE_MAX_K):
    """Rank the whole ``gallery_platform`` part of the index for each query image.

    ``queries`` are (path, group) pairs. Returns ``(RecallResult with AP, per-query timings,
    engine check, gallery size)``; a query whose file cannot be decoded is a miss with AP 0
    (listed in ``problems``).
    """
    from cgrs_ros.engine.image_query import embed_query_images, platform_rows
    import numpy as np

    items, matrix = platform_rows(retriever, gallery_platform)
    if not len(items):
        raise GalleryError(f'no {gallery_platform} image of the gallery is indexed; the '
                           f'{direction} direction has nothing to rank')
    groups = [retriever.gallery.items[i].group_id for i in items]
    code_of = {group: code for code, group in enumerate(dict.fromkeys(groups))}
    gallery_codes = np.array([code_of[g] for g in groups], dtype=np.int64)
    ranks = np.zeros(len(queries), dtype=np.int64)
    aps = np.zeros(len(queries), dtype=np.float64)
    timings, check = [], None
    for start in range(0, len(queries), QUERY_BATCH):
        batch = queries[start:start + QUERY_BATCH]
        t0 = time.perf_counter()
        images, kept = _decode_batch([path for path, _ in batch], problems)
        vectors = embed_query_images(retriever, images, query_platform)
        t1 = time.perf_counter()
        scores = vectors @ matrix.T
        codes = np.array([code_of.get(batch[i][1], -1) for i in kept], dtype=np.int64)
        r, a = full_ranking_hits(scores, codes, gallery_codes)
        t2 = time.perf_counter()
        ranks[[start + i for i in kept]] = r
        aps[[start + i for i in kept]] = a
        n = max(len(kept), 1)
        timings.extend([{'encode': (t1 - t0) * 1e3 / n, 'coarse': (t2 - t1) * 1e3 / n,
                         'total': (t2 - t0) * 1e3 / n}] * len(kept))
        if check is None and kept:
            check = _engine_check(retriever, images[0], scores[0], items, query_platform,
                                  gallery_platform)
        _say(progress and start + QUERY_BATCH < len(queries),
             f'{direction}: {start + len(batch)}/{len(queries)} queries')
    absent = [q for q, (_, group) in enumerate(queries) if group not in code_of]
    result = full_ranking_result(ranks, aps, direction, absent, max_k, len(items))
    return result, timings, check, len(items)


def _engine_check(retriever, image, scores, items, query_platform, gallery_platform):
    """Compare one query's ranking here with ``Retriever.query_image`` (the engine path)."""
    import numpy as np

    k = min(CURVE_MAX_K, len(items))
    mine = [retriever.gallery.items[i].image_id for i in items[np.argsort(-scores,
                                                                          kind='stable')[:k]]]
    # The ranking here is the image tower's: compare with the engine's without a reranker.
    reranker, retriever.reranker = retriever.reranker, None
    try:
        result = retriever.query_image(image, top_k=k, platform=gallery_platform,
                                       query_platform=query_platform)
    finally:
        retriever.reranker = reranker
    engine = [c.image_id for c in result.candidates]
    mine_scores = np.sort(scores)[::-1][:k]
    engine_scores = np.array([c.coarse_score for c in result.candidates])
    same = mine == engine or np.allclose(mine_scores, engine_scores, atol=1e-5)
    return {'top_k': k, 'same_ranking': bool(same)}


def _entry(results, timings, sizes):
    """Return the report entry of the image method: metrics and curves per direction."""
    metrics, curves, by_direction = {}, {}, {}
    for direction, result in results.items():
        summary = result.summary(HEADLINE_KS)
        for name in [f'{direction}_r{k}' for k in HEADLINE_KS] + [f'{direction}_ap']:
            if name in summary:
                metrics[name] = summary[name]
        curves[direction] = summary['curve']
        by_direction[direction] = {'n_queries': result.n_queries,
                                   'n_absent': len(result.absent),
                                   'gallery_images': sizes[direction]}
    samples = report_mod.stage_samples(timings)
    return {
        'overrides': {},
        'metrics': metrics,
        'n_queries': sum(r.n_queries for r in results.values()),
        'n_absent': sum(len(r.absent) for r in results.values()),
        'curve': curves,
        'by_direction': by_direction,
        'latency_ms': {stage: latency_summary(v) for stage, v in samples.items()},
        'latency_samples_ms': {stage: [round(x, 3) for x in _strided(v)]
                               for stage, v in samples.items()},
    }


def _encoders(config, stats):
    image = config.image_encoder
    return {'image_encoder': stats.get('image_encoder') or f'{image.backend}:{image.model}'}


def run_crossview(gallery_dir, direction_queries, config_path=None, state_dir=None,
                  progress=True):
    """Index ``gallery_dir`` and rank every direction's queries; return the report parts.

    ``direction_queries`` maps a direction name (``d2s``...) to ``(queries, query platform,
    gallery platform)`` with queries as (path, group) pairs. Returns ``(entry, results,
    checks, problems, summary, config, stats)``.
    """
    from cgrs_ros.engine.config import load_config
    from cgrs_ros.engine.indexer import index_gallery
    from cgrs_ros.engine.retriever import Retriever

    config = load_config(config_path)
    if config.image_encoder.backend == 'none':
        raise ConfigError('image-query evaluation needs an image encoder and '
                          'image_encoder.backend is none; set it to open_clip, hf_clip or '
                          'learned in the config')
    _say(progress, f'indexing {gallery_dir} ...')
    summary = index_gallery(gallery_dir, config, state_dir=state_dir, progress=progress)
    retriever = Retriever.open(gallery_dir, config, state_dir=state_dir)
    results, sizes, timings, checks, problems = {}, {}, [], {}, []
    try:
        stats = retriever.stats()
        for direction, (queries, query_platform, gallery_platform) in direction_queries.items():
            _say(progress, f'{direction}: {len(queries)} queries ...')
            result, times, check, sizes[direction] = rank_direction(
                retriever, queries, query_platform, gallery_platform, direction, problems,
                progress)
            results[direction] = result
            timings.extend(times)
            checks[direction] = check
            if check and not check['same_ranking']:
                problems.append(f'{direction}: the first query ranks differently through '
                                'Retriever.query_image than here; report this as a bug')
    finally:
        retriever.close()
    return _entry(results, timings, sizes), results, checks, problems, summary, config, stats


def _limit(queries, limit):
    if limit is None:
        return queries
    if limit < 1:
        raise QueryError(f'--limit must be at least 1, got {limit}')
    return queries[:limit]


def _directions(wanted, available, where):
    wanted = list(wanted or available)
    unknown = [d for d in wanted if d not in DIRECTIONS]
    if unknown:
        raise QueryError(f'unknown direction(s) {", ".join(unknown)}; use d2s and/or s2d')
    missing = [d for d in wanted if d not in available]
    if missing:
        raise GalleryError(f'{where} has no query/gallery views for {", ".join(missing)} '
                           f'(it has {", ".join(available) or "none"})')
    return wanted


def _report(benchmark, parts, inputs, problems, notes, groups, n_gallery):
    entry, results, checks, run_problems, summary, config, stats = parts
    counts = {'queries': entry['n_queries'], 'gallery_images': n_gallery, 'groups': groups,
              'absent_queries': entry['n_absent']}
    report = report_mod.build_report(
        benchmark, {METHOD: entry}, counts, config=config.model_dump(mode='json'),
        encoders=_encoders(config, stats), inputs=inputs, problems=list(problems) + run_problems
        + [str(s) for s in summary.skipped], notes=notes)
    report['query_kind'] = 'image'
    report['engine_check'] = checks
    report['index'] = {key: getattr(summary, key) for key in (
        'indexed', 'unchanged', 'images_embedded', 'state_dir', 'elapsed_s')}
    report['index']['skipped'] = len(summary.skipped)
    return report


def evaluate_benchmark(data, directions=None, config_path=None, state_dir=None, limit=None,
                       progress=True, inputs=None):
    """Evaluate a :class:`CrossViewSet` (University-1652, SUES-200) through the engine."""
    from cgrs_ros.engine.evaluation.runner import default_work_dir

    directions = _directions(directions, data.directions(), data.root)
    work_dir = Path(state_dir) if state_dir else default_work_dir(data.benchmark, data.root)
    _say(progress, f'evaluation folder: {work_dir}')
    gallery_dir = write_crossview_gallery(work_dir, data, directions)
    wanted = {}
    for direction in directions:
        query_view, _, query_platform, gallery_platform = DIRECTIONS[direction]
        queries = [(image.path, image.group) for image in data.views[query_view]]
        wanted[direction] = (_limit(queries, limit), query_platform, gallery_platform)
    parts = run_crossview(gallery_dir, wanted, config_path, progress=progress)
    galleries = [data.views[DIRECTIONS[d][1]] for d in directions]
    groups = len({image.group for view in galleries for image in view})
    notes = list(data.notes) + [
        'image queries: Recall@K and AP (University-1652 definition, metrics.average_precision) '
        'over the full ranking of the gallery view; the benchmark images carry no '
        'geo-reference, lat/lon are 0 in the evaluation manifest']
    return _report(data.benchmark, parts,
                   dict(inputs or {}, root=str(data.root), work_dir=str(work_dir),
                        config=str(config_path) if config_path else None),
                   data.problems, notes, groups, sum(len(v) for v in galleries))


def evaluate_university1652(root, directions=None, config_path=None, state_dir=None,
                            limit=None, progress=True):
    """Read University-1652's test split and evaluate d2s and s2d (or ``directions``)."""
    return evaluate_benchmark(load_university1652(root), directions, config_path, state_dir,
                              limit, progress, inputs={'dataset': str(root)})


def evaluate_sues200(root, height, directions=None, config_path=None, state_dir=None,
                     limit=None, progress=True):
    """Read SUES-200's test split at ``height`` metres and evaluate d2s and s2d."""
    data = load_sues200(root, height)
    report = evaluate_benchmark(data, directions, config_path, state_dir, limit, progress,
                                inputs={'dataset': str(root), 'height_m': int(height)})
    return report


def evaluate_gallery_images(gallery_dir, source='drone', target='satellite', config_path=None,
                            state_dir=None, limit=None, progress=True):
    """Evaluate a project gallery's ``source`` images as queries against its ``target`` images.

    E.g. a demo town's drone views against its satellite tiles: a hit is a tile of the same
    place (``group_id``). The gallery is indexed in place (its usual state folder); queries are
    re-read from their files and embedded as ``Retriever.query_image`` embeds a photo, so the
    timings are those of real image queries.
    """
    from cgrs_ros.engine.gallery import load_gallery, PLATFORMS

    for name, value in (('--from', source), ('--to', target)):
        if value not in PLATFORMS:
            raise QueryError(f'{name} {value!r} is not one of {", ".join(PLATFORMS)}')
    if source == target:
        raise QueryError(f'--from and --to are both {source}; pick two platforms')
    direction = f'{source[0]}2{target[0]}'
    gallery = load_gallery(gallery_dir, check_images='exists')
    queries = [(gallery.path_of(item), item.group_id) for item in gallery.items
               if item.platform == source and item.group_id]
    if not queries:
        raise GalleryError(f'{gallery_dir} has no {source} image with a group_id to use as a '
                           'query; add group_id values naming the place of each image')
    targets = [item for item in gallery.items if item.platform == target]
    parts = run_crossview(gallery_dir, {direction: (_limit(queries, limit), source, target)},
                          config_path, state_dir=state_dir, progress=progress)
    notes = [f'image queries: every {source} image with a group_id ranks all {target} images; '
             'a hit is an image of the same group_id; AP as University-1652 defines it']
    return _report('gallery', parts,
                   {'gallery': str(gallery_dir), 'from': source, 'to': target,
                    'state_dir': str(state_dir) if state_dir else None,
                    'config': str(config_path) if config_path else None},
                   [str(p) for p in gallery.problems], notes,
                   len({item.group_id for item in targets if item.group_id}), len(targets))
