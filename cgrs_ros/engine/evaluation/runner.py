"""Run a benchmark through the real engine: index once, then every query per method.

Methods are query-time settings over ONE index (the gallery is embedded and captioned once):

- ``coarse``: image-embedding search only (the caption channel does not run);
- ``rerank``: the coarse top ``coarse_k`` re-ordered by fusing query-caption similarity (CGRS);
- ``hybrid``: the caption channel also searches the whole gallery and the two lists are fused;
- ``config``: the config file as it is, no override.

Benchmarks whose images carry no manifest (GeoText-1652, Track 4) get an evaluation gallery
folder: a ``gallery.csv`` written for the images and an ``images`` symlink to the user's image
root, so nothing is written into the dataset. That manifest has no descriptions: annotation
captions are the queries, and putting them in the gallery would hand the benchmark its answers.
The images carry no geo-reference either, so lat/lon are 0 there.
"""

import hashlib
import os
from pathlib import Path
import sys
import time

from cgrs_ros.engine.errors import GalleryError, QueryError
from cgrs_ros.engine.evaluation import datasets
from cgrs_ros.engine.evaluation import report as report_mod
from cgrs_ros.engine.evaluation.metrics import CURVE_MAX_K, evaluate_ranked_ids

METHOD_OVERRIDES = {
    'coarse': {'retrieval.caption_weight': 0.0},
    'rerank': {'retrieval.caption_channel': 'rerank'},
    'hybrid': {'retrieval.caption_channel': 'hybrid'},
    'config': {},
}
IMAGES_LINK = 'images'
# Benchmark images have no platform in Track 4 and sometimes an unrecognised file name in
# GeoText; the manifest needs one, and drone is what most of GeoText-1652 is (51k of 55k test
# images). Per-platform figures use the platform parsed from the annotation, not this default.
DEFAULT_PLATFORM = 'drone'


def parse_methods(text):
    """Return the method names of a comma-separated list, checked against the known ones."""
    names = [part.strip() for part in (text or '').split(',') if part.strip()]
    if not names:
        raise QueryError('--methods is empty; name one or more of '
                         f'{", ".join(METHOD_OVERRIDES)}')
    unknown = [n for n in names if n not in METHOD_OVERRIDES]
    if unknown:
        raise QueryError(f'unknown method(s) {", ".join(unknown)} in --methods; use '
                         f'{", ".join(METHOD_OVERRIDES)}')
    return list(dict.fromkeys(names))


def default_work_dir(benchmark, *inputs):
    """Return the evaluation folder used when no --state-dir is given.

    It lives in the user's cache (``$XDG_CACHE_HOME/cgrs/eval`` or ``~/.cache/cgrs/eval``),
    named after the benchmark and a hash of the absolute input paths, so a second run on the
    same files reuses the index and captions of the first.
    """
    base = Path(os.environ.get('XDG_CACHE_HOME') or Path.home() / '.cache') / 'cgrs' / 'eval'
    key = '\0'.join(str(Path(p).resolve()) for p in inputs if p)
    return base / f'{benchmark}-{hashlib.sha1(key.encode("utf-8")).hexdigest()[:12]}'


def _link_images(work_dir, images_root):
    link = Path(work_dir) / IMAGES_LINK
    target = Path(images_root).resolve()
    if link.is_symlink():
        if Path(os.readlink(link)) == target:
            return link
        link.unlink()
    elif link.exists():
        raise GalleryError(f'{link} exists and is not a symlink; pass another --state-dir')
    os.symlink(target, link, target_is_directory=True)
    return link


def write_eval_gallery(work_dir, images_root, images, resolve):
    """Write ``work_dir/gallery.csv`` for benchmark ``images`` found under ``images_root``.

    ``resolve(image)`` returns the image file or None. Returns ``(gallery_dir, kept images,
    problems)``; images whose file is missing are left out and listed.
    """
    from cgrs_ros.engine.gallery import GalleryItem, write_manifest

    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    _link_images(work_dir, images_root)
    root = Path(images_root).resolve()
    items, kept, problems = [], [], []
    for image in images:
        found = resolve(image)
        if found is None:
            problems.append(f'image {image.image_id}: file not found under {images_root}; left '
                            f'out of the gallery')
            continue
        rel = Path(found).resolve().relative_to(root)
        items.append(GalleryItem(
            image_id=image.image_id, path=str(Path(IMAGES_LINK) / rel), lat=0.0, lon=0.0,
            alt=0.0, heading_deg=0.0, platform=image.platform or DEFAULT_PLATFORM,
            group_id=image.group_id, descriptions=()))
        kept.append(image)
    if not items:
        raise GalleryError(f'none of the {len(images)} annotated images was found under '
                           f'{images_root}; point --images at the folder the annotation paths '
                           f'are relative to')
    write_manifest(work_dir, items)
    return work_dir, kept, problems


def _say(progress, message):
    if progress:
        print(message, file=sys.stderr, flush=True)


def _encoders(config, stats):
    image = config.image_encoder
    image_name = f'{image.backend}:{image.model}'
    if image.backend == 'none':
        image_name = 'none (caption channel only)'
    elif image.pretrained:
        image_name += f' ({image.pretrained})'
    return {
        'image_encoder': stats.get('image_encoder') or image_name,
        'text_encoder': stats.get('text_encoder') or config.text_encoder.model,
        'captioner': config.captioner.backend,
    }


def run_methods(gallery_dir, queries, methods, config_path=None, state_dir=None,
                progress=True, max_k=CURVE_MAX_K):
    """Index the gallery once, then run every query with every method.

    Returns ``(runs, base_config, stats, index_summary)`` where ``runs[method]`` is
    ``(ranked ids per query, timings per query)``. Each method answers one untimed warm-up
    query first (the first query's text), so one-off costs such as lazy allocations in torch
    do not land on the first measured query.
    """
    from cgrs_ros.engine.config import load_config
    from cgrs_ros.engine.indexer import index_gallery
    from cgrs_ros.engine.retriever import Retriever

    base = load_config(config_path)
    _say(progress, f'indexing {gallery_dir} ...')
    summary = index_gallery(gallery_dir, base, state_dir=state_dir, progress=progress)
    runs, stats = {}, {}
    for method in methods:
        overrides = dict(METHOD_OVERRIDES[method])
        overrides['retrieval.top_k'] = max(max_k, base.retrieval.top_k)
        config = load_config(config_path, overrides=overrides)
        retriever = Retriever.open(gallery_dir, config, state_dir=state_dir)
        stats = retriever.stats()
        ranked, timings = [], []
        _say(progress, f'{method}: {len(queries)} queries ...')
        if queries:
            retriever.query(queries[0].text, top_k=max_k)
        for query in queries:
            start = time.perf_counter()
            result = retriever.query(query.text, top_k=max_k)
            wall_ms = (time.perf_counter() - start) * 1000.0
            ranked.append([c.image_id for c in result.candidates])
            stage_ms = dict(result.timings_ms or {})
            stage_ms.setdefault('total', wall_ms)
            timings.append(stage_ms)
        runs[method] = (ranked, timings)
        close = getattr(retriever, 'close', None)
        if close:
            close()
    return runs, base, stats, summary


def _report(benchmark, eval_set, label_of, runs, methods, base, stats, summary, inputs,
            problems, notes=(), challenge_score=False):
    notes = list(notes)
    entries, absent = {}, []
    platforms = [q.platform for q in eval_set.queries]
    use_platforms = platforms if any(platforms) else None
    relevant = [q.relevant for q in eval_set.queries]
    for method in methods:
        ranked, timings = runs[method]
        result = evaluate_ranked_ids(ranked, relevant, label_of, 't2i',
                                     query_platforms=use_platforms)
        absent = [eval_set.queries[i].query_id for i in result.absent]
        entries[method] = report_mod.method_entry(result, timings, METHOD_OVERRIDES[method],
                                                  challenge_score=challenge_score)
    groups = {label for label in label_of.values() if label is not None}
    counts = {'queries': len(eval_set.queries), 'gallery_images': len(label_of),
              'groups': len(groups), 'absent_queries': len(absent)}
    if 'captioned' in stats:
        counts['captioned'] = stats['captioned']
        if not stats['captioned'] and set(methods) & {'rerank', 'hybrid'}:
            where = inputs.get('work_dir') or inputs.get('gallery')
            notes.append(f'no image has a caption from captioner {base.captioner.backend}: '
                         f'rerank and hybrid fall back to the coarse order; caption the '
                         f'gallery {where} with a VLM captioner and run again')
    problems = list(problems) + [str(s) for s in summary.skipped]
    report = report_mod.build_report(
        benchmark, entries, counts, config=base.model_dump(mode='json'),
        encoders=_encoders(base, stats), inputs=inputs, absent_query_ids=absent,
        problems=problems, notes=notes)
    report['index'] = {key: getattr(summary, key) for key in (
        'indexed', 'unchanged', 'images_embedded', 'captions_embedded', 'state_dir',
        'elapsed_s')}
    report['index']['skipped'] = len(summary.skipped)
    return report


def _limit(eval_set, limit):
    if limit is not None:
        if limit < 1:
            raise QueryError(f'--limit must be at least 1, got {limit}')
        eval_set.queries = eval_set.queries[:limit]
    return eval_set


def evaluate_geotext(ann_path, images_root, config_path=None,
                     methods=('coarse', 'rerank', 'hybrid'), state_dir=None, limit=None,
                     progress=True):
    """Evaluate a GeoText-1652 annotation file: every caption is a text->image query."""
    eval_set = _limit(datasets.load_geotext(ann_path), limit)
    work_dir = Path(state_dir) if state_dir else default_work_dir('geotext', ann_path,
                                                                  images_root)
    _say(progress, f'evaluation folder: {work_dir}')
    gallery_dir, kept, missing = write_eval_gallery(
        work_dir, images_root, eval_set.images,
        lambda image: datasets.resolve_geotext_image(images_root, image))
    label_of = {image.image_id: image.group_id for image in kept}
    runs, base, stats, summary = run_methods(gallery_dir, eval_set.queries, methods,
                                             config_path, progress=progress)
    notes = ['GeoText-1652 images carry no geo-reference: the evaluation manifest has lat/lon '
             '0; annotation captions are used as queries only, never as gallery descriptions.']
    return _report('geotext', eval_set, label_of, runs, methods, base, stats, summary,
                   {'ann': str(ann_path), 'images': str(images_root), 'work_dir': str(work_dir),
                    'config': str(config_path) if config_path else None},
                   eval_set.problems + missing, notes)


def evaluate_track4(queries_path, gallery_dir, gt_path=None, submission_path=None,
                    config_path=None, methods=('config',), state_dir=None, limit=None,
                    progress=True):
    """Run RoboSense Track 4 queries; write the submission of the first method; score if GT."""
    eval_set = _limit(datasets.load_track4(queries_path, gallery_dir, gt_path), limit)
    work_dir = Path(state_dir) if state_dir else default_work_dir('track4', gallery_dir)
    _say(progress, f'evaluation folder: {work_dir}')
    images_dir = Path(gallery_dir)
    eval_gallery, kept, missing = write_eval_gallery(
        work_dir, images_dir, eval_set.images,
        lambda image: images_dir / image.path if (images_dir / image.path).is_file() else None)
    label_of = {image.image_id: image.image_id for image in kept}
    runs, base, stats, summary = run_methods(eval_gallery, eval_set.queries, methods,
                                             config_path, progress=progress)
    if submission_path:
        ranked = runs[methods[0]][0]
        datasets.write_track4_submission(
            submission_path, [(q.query_id, ids) for q, ids in zip(eval_set.queries, ranked)])
    notes = [f'submission written from method {methods[0]}' if submission_path else
             'no submission written (pass --submission)']
    if not gt_path:
        notes.append('no ground truth given: recall figures are 0 and mean nothing')
    report = _report('track4', eval_set, label_of, runs, methods, base, stats, summary,
                     {'queries': str(queries_path), 'gallery': str(gallery_dir),
                      'gt': str(gt_path) if gt_path else None,
                      'submission': str(submission_path) if submission_path else None,
                      'work_dir': str(work_dir),
                      'config': str(config_path) if config_path else None},
                     eval_set.problems + missing, notes, challenge_score=bool(gt_path))
    return report


def score_track4_submission(submission_path, gt_path, queries_path=None):
    """Score an existing Track 4 submission file against ground truth (no model runs).

    Queries are those of ``queries_path`` when given, else those of the ground truth; a
    query absent from the submission is a miss.
    """
    submission = datasets.read_track4_submission(submission_path)
    gt = datasets.read_track4_ground_truth(gt_path)
    if queries_path:
        keys = [datasets.submission_query_id(q) for q, _ in
                datasets.read_track4_queries(queries_path)]
    else:
        keys = sorted(gt, key=lambda k: int(k[1:]))
    if not keys:
        raise QueryError(f'no queries to score in {queries_path}')
    problems = [f'query {k} is not in the submission; scored as a miss' for k in keys
                if k not in submission]
    long_lines = [k for k, ids in submission.items() if len(ids) != datasets.SUBMISSION_TOP_K]
    if long_lines:
        problems.append(f'{len(long_lines)} submission line(s) do not list exactly '
                        f'{datasets.SUBMISSION_TOP_K} ids (first: {long_lines[0]})')
    ranked = [submission.get(k, [])[:CURVE_MAX_K] for k in keys]
    relevant = [gt.get(k, frozenset()) for k in keys]
    everything = set().union(*relevant, *ranked) if keys else set()
    label_of = {i: i for i in everything}
    result = evaluate_ranked_ids(ranked, relevant, label_of, 't2i')
    entry = report_mod.method_entry(result, (), challenge_score=True)
    counts = {'queries': len(keys), 'gallery_images': None, 'groups': None,
              'absent_queries': len(result.absent)}
    return report_mod.build_report(
        'track4', {'submission': entry}, counts,
        inputs={'submission': str(submission_path), 'gt': str(gt_path),
                'queries': str(queries_path) if queries_path else None},
        absent_query_ids=[keys[i] for i in result.absent], problems=problems,
        notes=['scored from a submission file; no latency measured'])


def evaluate_gallery(gallery_dir, queries_path, config_path=None,
                     methods=('coarse', 'rerank', 'hybrid'), state_dir=None, limit=None,
                     progress=True):
    """Evaluate a project gallery whose manifest has group_id on a (query, group_id) CSV."""
    from cgrs_ros.engine.gallery import load_gallery

    eval_set = _limit(datasets.read_gallery_queries(queries_path), limit)
    gallery = load_gallery(gallery_dir, check_images='exists')
    label_of = {item.image_id: item.group_id for item in gallery.items}
    if not any(label_of.values()):
        raise GalleryError(f'the manifest of {gallery_dir} has no group_id values; add a '
                           f'group_id column naming the building or place of each image')
    runs, base, stats, summary = run_methods(gallery_dir, eval_set.queries, methods,
                                             config_path, state_dir=state_dir,
                                             progress=progress)
    problems = eval_set.problems + [str(p) for p in gallery.problems]
    return _report('gallery', eval_set, label_of, runs, methods, base, stats, summary,
                   {'gallery': str(gallery_dir), 'queries': str(queries_path),
                    'state_dir': str(state_dir) if state_dir else None,
                    'config': str(config_path) if config_path else None}, problems)
