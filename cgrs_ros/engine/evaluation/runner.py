"""Run a benchmark through the real engine: index once, then every query per method.

Methods are query-time settings over ONE index (the gallery is embedded and captioned once):

- ``coarse``: image-embedding search only (the caption channel does not run);
- ``rerank``: the coarse top ``coarse_k`` re-ordered by fusing query-caption similarity (CGRS);
- ``hybrid``: the caption channel also searches the whole gallery and the two lists are fused;
- ``config``: the config file as it is, no override.

Stages on and off in one run: when the config names a reranker (``reranker.backend`` not
``none``), every method is run twice on the same open retriever, without the reranker stage
(``hybrid``) and with it (``hybrid+reranker``). The reranker is loaded once for the whole run
and lent to each method's retriever; the cheap stages (encode, coarse, captions) simply run
again, so both variants' per-stage latencies are measured, not inferred.

Every stage the config names runs: when ``captioner.backend`` is a VLM (transformers, openai,
learned) the evaluation gallery is captioned first, by the resumable captioning run of
``cgrs caption`` (captions are committed per batch, so a killed evaluation resumes them).

``--tune-weights VAL`` chooses ``retrieval.caption_weight`` and ``reranker.weight`` on
validation queries (tuning.py) before the evaluation queries are run with them. What VAL is:
``gallery``: a query CSV searched in the evaluation gallery, or a gallery folder with its own
``queries.csv`` (another town: indexed and captioned like the evaluation gallery);
``geotext``: an annotation JSON of the same format whose captions are searched in the
evaluation gallery (a split of the test captions); ``track4``: a query file of the same format
with its own ground truth (``--tune-gt``), searched in the evaluation gallery. The evaluation
queries are never read for tuning, and a VAL that is the evaluation query file is refused.

Benchmarks whose images carry no manifest (GeoText-1652, Track 4) get an evaluation gallery
folder: a ``gallery.csv`` written for the images and an ``images`` symlink to the user's image
root, so nothing is written into the dataset. That manifest has no descriptions: annotation
captions are the queries, and putting them in the gallery would hand the benchmark its answers.
The images carry no geo-reference either, so lat/lon are 0 there.
"""

import dataclasses
import hashlib
import os
from pathlib import Path
import sys
import time

from cgrs_ros.engine.errors import CgrsError, GalleryError, QueryError
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
# Captioner backends that write captions from pixels (cgrs caption); manifest / none do not.
VLM_CAPTIONERS = ('transformers', 'openai', 'learned')
# Suffix of the method name whose run has the reranker stage on.
WITH_RERANKER = '+reranker'


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


def _encoders(config, stats, reranker=None):
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
        'reranker': reranker or 'none',
    }


@dataclasses.dataclass
class ValidationSet:
    """Validation queries for ``--tune-weights`` and the gallery they are searched in.

    ``gallery_dir`` None: the evaluation gallery; otherwise another gallery (its default
    state folder). ``label_of`` maps that gallery's image ids to labels.
    """

    source: str
    queries: list
    label_of: dict = None
    gallery_dir: str = None
    problems: list = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class MethodRuns:
    """What :func:`run_methods` measured.

    ``runs[name]`` is ``(ranked ids per query, timings per query)`` and ``overrides[name]``
    the config overrides that made the run, for every method and, with a reranker,
    ``<method>+reranker``; ``index`` the IndexSummary, ``captioning`` the CaptionSummary of
    the captioning run (None without a VLM captioner), ``tuning`` the Tuning (None without
    ``--tune-weights``), ``reranker`` the reranker identity.
    """

    runs: dict
    overrides: dict
    base: object
    stats: dict
    index: object
    captioning: object = None
    tuning: object = None
    reranker: str = None


def caption_eval_gallery(gallery_dir, config, state_dir=None, progress=True,
                         caption_progress=None):
    """Caption a gallery with the configured VLM captioner before it is indexed.

    The resumable run of ``cgrs caption`` (captioning.py): only images without a caption from
    this captioner are captioned, each batch is committed, so a second evaluation captions
    nothing and a killed one resumes. Returns its CaptionSummary, or None when the captioner
    is not a VLM (manifest descriptions, none). Raises CgrsError when the run gave up (the
    captioner failed batch after batch): recall without captions would measure the outage.
    """
    if config.captioner.backend not in VLM_CAPTIONERS:
        return None
    from cgrs_ros.engine.captioning import run_captioning

    _say(progress, f'captioning {gallery_dir} with captioner {config.captioner.backend} '
                   '(resumable) ...')
    try:
        summary = run_captioning(gallery_dir, config, state_dir=state_dir,
                                 progress=caption_progress)
    finally:
        close = getattr(caption_progress, 'close', None)
        if close:
            close()
    if summary.aborted:
        raise CgrsError(f'captioning the evaluation gallery {gallery_dir} gave up: '
                        f'{summary.aborted}; the captions written so far are kept')
    _say(progress, f'captions: {summary.new_captions} new this run, {summary.captioned} of '
                   f'{summary.total} images captioned, {summary.failed} failed')
    return summary


def _open(gallery_dir, config_path, overrides, state_dir):
    """Open a retriever with ``overrides``; its own reranker stays off (the shared one is lent)."""
    from cgrs_ros.engine.config import load_config
    from cgrs_ros.engine.retriever import Retriever

    config = load_config(config_path, overrides={**overrides, 'reranker.backend': 'none'})
    return Retriever.open(gallery_dir, config, state_dir=state_dir)


def _run_queries(retriever, queries, max_k):
    """Answer every query; return (ranked ids per query, stage timings per query)."""
    ranked, timings = [], []
    if queries:
        retriever.query(queries[0].text, top_k=max_k)  # untimed warm-up
    for query in queries:
        start = time.perf_counter()
        result = retriever.query(query.text, top_k=max_k)
        wall_ms = (time.perf_counter() - start) * 1000.0
        ranked.append([c.image_id for c in result.candidates])
        stage_ms = dict(result.timings_ms or {})
        stage_ms.setdefault('total', wall_ms)
        timings.append(stage_ms)
    return ranked, timings


def _tune(validation, gallery_dir, config_path, base, state_dir, reranker, max_k, progress,
          caption_progress):
    """Run the grid search of tuning.py on the validation set; return its Tuning."""
    from cgrs_ros.engine.evaluation.tuning import tune_weights
    from cgrs_ros.engine.indexer import index_gallery

    if validation.gallery_dir is not None:
        gallery_dir, state_dir = validation.gallery_dir, None
        caption_eval_gallery(gallery_dir, base, None, progress, caption_progress)
        _say(progress, f'indexing the validation gallery {gallery_dir} ...')
        index_gallery(gallery_dir, base, progress=progress)
    retriever = _open(gallery_dir, config_path, {}, state_dir)
    try:
        return tune_weights(retriever, reranker, validation.queries, validation.label_of,
                            max_k, say=lambda message: _say(progress, message))
    finally:
        retriever.close()


def run_methods(gallery_dir, queries, methods, config_path=None, state_dir=None,
                progress=True, max_k=CURVE_MAX_K, validation=None, caption_progress=None):
    """Caption and index the gallery once, then run every query with every method.

    Returns a :class:`MethodRuns`. With a reranker configured each method runs twice on one
    open retriever: stage off (``method``), then on (``method+reranker``), with the one
    reranker loaded for the whole run. With ``validation`` (a :class:`ValidationSet`) the
    fusion weights are tuned on it first and every method runs with the chosen ones. Each run
    answers one untimed warm-up query first (the first query's text), so one-off costs such
    as lazy allocations in torch do not land on the first measured query.
    """
    from cgrs_ros.engine.config import load_config
    from cgrs_ros.engine.indexer import index_gallery
    from cgrs_ros.engine.rerankers import make_reranker

    base = load_config(config_path)
    captioning = caption_eval_gallery(gallery_dir, base, state_dir, progress, caption_progress)
    _say(progress, f'indexing {gallery_dir} ...')
    summary = index_gallery(gallery_dir, base, state_dir=state_dir, progress=progress)
    out = MethodRuns(runs={}, overrides={}, base=base, stats={}, index=summary,
                     captioning=captioning)
    top_k = {'retrieval.top_k': max(max_k, base.retrieval.top_k)}
    reranker = make_reranker(base.reranker)  # once: every method's retriever borrows it
    try:
        if reranker is not None:
            out.reranker = reranker.identity
        tuned = {}
        if validation is not None:
            out.tuning = _tune(validation, gallery_dir, config_path, base, state_dir, reranker,
                               max_k, progress, caption_progress)
            tuned = out.tuning.overrides()
        for method in methods:
            overrides = {**tuned, **METHOD_OVERRIDES[method]}
            retriever = _open(gallery_dir, config_path, {**overrides, **top_k}, state_dir)
            try:
                out.stats = retriever.stats()
                _say(progress, f'{method}: {len(queries)} queries ...')
                out.runs[method] = _run_queries(retriever, queries, max_k)
                out.overrides[method] = (dict(overrides, **{'reranker.backend': 'none'})
                                         if reranker is not None else overrides)
                if reranker is not None:
                    name = method + WITH_RERANKER
                    _say(progress, f'{name}: {len(queries)} queries ...')
                    retriever.use_reranker(reranker)
                    try:
                        out.runs[name] = _run_queries(retriever, queries, max_k)
                    finally:
                        retriever.reranker = None  # shared: closed once, below
                    out.overrides[name] = overrides
            finally:
                retriever.close()
    finally:
        if reranker is not None:
            reranker.close()
    return out


def _report(benchmark, eval_set, label_of, runs, methods, inputs, problems, notes=(),
            challenge_score=False, validation=None):
    """Assemble the report of a :class:`MethodRuns` over ``eval_set``."""
    notes = list(notes)
    entries, absent = {}, []
    queries = eval_set.queries
    platforms = [q.platform for q in queries]
    use_platforms = platforms if any(platforms) else None
    relevant = [q.relevant for q in queries]
    query_ids = [q.query_id for q in queries]
    for name, (ranked, timings) in runs.runs.items():
        result = evaluate_ranked_ids(ranked, relevant, label_of, 't2i',
                                     query_platforms=use_platforms)
        absent = [queries[i].query_id for i in result.absent]
        per_query = report_mod.per_query_rows(
            query_ids, [[label_of[i] for i in ids] for ids in ranked], result.hit_ranks)
        entries[name] = report_mod.method_entry(result, timings, runs.overrides[name],
                                                challenge_score=challenge_score,
                                                per_query=per_query)
    groups = {label for label in label_of.values() if label is not None}
    counts = {'queries': len(queries), 'gallery_images': len(label_of),
              'groups': len(groups), 'absent_queries': len(absent)}
    stats, base = runs.stats, runs.base
    if 'captioned' in stats:
        counts['captioned'] = stats['captioned']
        if not stats['captioned'] and set(methods) & {'rerank', 'hybrid'}:
            where = inputs.get('work_dir') or inputs.get('gallery')
            notes.append(f'no image has a caption from captioner {base.captioner.backend} '
                         f'in {where}: rerank and hybrid fall back to the coarse order; set '
                         'captioner.backend to a VLM (transformers, openai, learned) and cgrs '
                         'eval captions the gallery first')
    captioning = runs.captioning
    if captioning is not None and captioning.failed:
        notes.append(f'{captioning.failed} of {captioning.total} gallery images have no caption '
                     f'from {captioning.captioner} (failed; a later run retries them)')
    problems = list(problems) + [str(s) for s in runs.index.skipped]
    report = report_mod.build_report(
        benchmark, entries, counts, config=base.model_dump(mode='json'),
        encoders=_encoders(base, stats, runs.reranker), inputs=inputs,
        absent_query_ids=absent, problems=problems, notes=notes)
    report['queries'] = [{'query_id': q.query_id, 'relevant': sorted(q.relevant)}
                         for q in queries]
    report['index'] = {key: getattr(runs.index, key) for key in (
        'indexed', 'unchanged', 'images_embedded', 'captions_embedded', 'state_dir',
        'elapsed_s')}
    report['index']['skipped'] = len(runs.index.skipped)
    if captioning is not None:
        report['captioning'] = {key: getattr(captioning, key) for key in (
            'captioner', 'prompt_version', 'total', 'captioned', 'failed', 'pending',
            'new_captions', 'new_failures', 'elapsed_s')}
    if runs.tuning is not None:
        tuning = runs.tuning.to_dict()
        tuning['validation'] = validation.source
        tuning['validation_gallery'] = validation.gallery_dir
        same = {q.text for q in validation.queries} & {q.text for q in queries}
        if same and validation.gallery_dir is None:
            tuning['notes'].append(f'{len(same)} validation queries have the same text as an '
                                   'evaluation query; the figures are optimistic by that much')
        report['tuning'] = tuning
        report['notes'].extend(f'tuning: {note}' for note in tuning['notes'])
        report['problems'].extend(f'validation: {p}' for p in
                                  (validation.problems + tuning['problems'])[:20])
    return report


def _refuse_evaluation_queries(tune_path, queries_path):
    """Raise QueryError when the validation file is the evaluation query file itself."""
    if Path(tune_path).resolve() == Path(queries_path).resolve():
        raise QueryError(f'--tune-weights names the evaluation queries {queries_path}; pass a '
                         'separate validation set (weights tuned on the queries they are '
                         'reported on overstate recall)')


def gallery_validation(tune_path, gallery_dir, queries_path, label_of):
    """Read ``--tune-weights`` for ``cgrs eval gallery`` into a :class:`ValidationSet`.

    A CSV file: queries searched in the evaluation gallery. A folder: its ``queries.csv``,
    searched in that folder's own gallery when it has a manifest and is another gallery.
    """
    from cgrs_ros.engine.gallery import find_manifest, load_gallery

    path, other = Path(tune_path), None
    if path.is_dir():
        try:
            find_manifest(path)
            if path.resolve() != Path(gallery_dir).resolve():
                other = path
        except GalleryError:
            pass
        path = path / 'queries.csv'
    _refuse_evaluation_queries(path, queries_path)
    val = datasets.read_gallery_queries(path)
    if other is not None:
        gallery = load_gallery(other, check_images='exists')
        label_of = {item.image_id: item.group_id for item in gallery.items}
    return ValidationSet(str(tune_path), val.queries, label_of,
                         str(other) if other is not None else None, val.problems)


def _limit(eval_set, limit):
    if limit is not None:
        if limit < 1:
            raise QueryError(f'--limit must be at least 1, got {limit}')
        eval_set.queries = eval_set.queries[:limit]
    return eval_set


def evaluate_geotext(ann_path, images_root, config_path=None,
                     methods=('coarse', 'rerank', 'hybrid'), state_dir=None, limit=None,
                     progress=True, tune_path=None, caption_progress=None):
    """Evaluate a GeoText-1652 annotation file: every caption is a text->image query.

    ``tune_path``: an annotation JSON of the same format whose captions tune the weights,
    searched in this evaluation gallery (see the module docstring).
    """
    eval_set = _limit(datasets.load_geotext(ann_path), limit)
    validation_set = None
    if tune_path:
        _refuse_evaluation_queries(tune_path, ann_path)
        validation_set = datasets.load_geotext(tune_path)
    work_dir = Path(state_dir) if state_dir else default_work_dir('geotext', ann_path,
                                                                  images_root)
    _say(progress, f'evaluation folder: {work_dir}')
    gallery_dir, kept, missing = write_eval_gallery(
        work_dir, images_root, eval_set.images,
        lambda image: datasets.resolve_geotext_image(images_root, image))
    label_of = {image.image_id: image.group_id for image in kept}
    validation = None
    if validation_set is not None:
        validation = ValidationSet(str(tune_path), validation_set.queries, label_of,
                                   problems=validation_set.problems)
    runs = run_methods(gallery_dir, eval_set.queries, methods, config_path, progress=progress,
                       validation=validation, caption_progress=caption_progress)
    notes = ['GeoText-1652 images carry no geo-reference: the evaluation manifest has lat/lon '
             '0; annotation captions are used as queries only, never as gallery descriptions.']
    return _report('geotext', eval_set, label_of, runs, methods,
                   {'ann': str(ann_path), 'images': str(images_root), 'work_dir': str(work_dir),
                    'config': str(config_path) if config_path else None,
                    'tune_weights': str(tune_path) if tune_path else None},
                   eval_set.problems + missing, notes, validation=validation)


def evaluate_track4(queries_path, gallery_dir, gt_path=None, submission_path=None,
                    config_path=None, methods=('config',), state_dir=None, limit=None,
                    progress=True, tune_path=None, tune_gt_path=None, caption_progress=None):
    """Run RoboSense Track 4 queries; write the submission of the first method; score if GT.

    The submission comes from the first method with every configured stage on (its
    ``+reranker`` run when a reranker is configured). ``tune_path`` / ``tune_gt_path``: a
    query file and its ground truth that tune the weights (see the module docstring).
    """
    if tune_path and not tune_gt_path:
        raise QueryError('--tune-weights for track4 needs --tune-gt, the ground truth of the '
                         'validation queries (same format as --gt)')
    eval_set = _limit(datasets.load_track4(queries_path, gallery_dir, gt_path), limit)
    validation_set = None
    if tune_path:
        _refuse_evaluation_queries(tune_path, queries_path)
        validation_set = datasets.load_track4(tune_path, gallery_dir, tune_gt_path)
    work_dir = Path(state_dir) if state_dir else default_work_dir('track4', gallery_dir)
    _say(progress, f'evaluation folder: {work_dir}')
    images_dir = Path(gallery_dir)
    eval_gallery, kept, missing = write_eval_gallery(
        work_dir, images_dir, eval_set.images,
        lambda image: images_dir / image.path if (images_dir / image.path).is_file() else None)
    label_of = {image.image_id: image.image_id for image in kept}
    validation = None
    if validation_set is not None:
        validation = ValidationSet(str(tune_path), validation_set.queries, label_of,
                                   problems=validation_set.problems)
    runs = run_methods(eval_gallery, eval_set.queries, methods, config_path,
                       progress=progress, validation=validation,
                       caption_progress=caption_progress)
    first = methods[0] + WITH_RERANKER if methods[0] + WITH_RERANKER in runs.runs \
        else methods[0]
    if submission_path:
        ranked = runs.runs[first][0]
        datasets.write_track4_submission(
            submission_path, [(q.query_id, ids) for q, ids in zip(eval_set.queries, ranked)])
    notes = [f'submission written from method {first}' if submission_path else
             'no submission written (pass --submission)']
    if not gt_path:
        notes.append('no ground truth given: recall figures are 0 and mean nothing')
    report = _report('track4', eval_set, label_of, runs, methods,
                     {'queries': str(queries_path), 'gallery': str(gallery_dir),
                      'gt': str(gt_path) if gt_path else None,
                      'submission': str(submission_path) if submission_path else None,
                      'work_dir': str(work_dir),
                      'config': str(config_path) if config_path else None,
                      'tune_weights': str(tune_path) if tune_path else None,
                      'tune_gt': str(tune_gt_path) if tune_gt_path else None},
                     eval_set.problems + missing, notes, challenge_score=bool(gt_path),
                     validation=validation)
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
                     progress=True, tune_path=None, caption_progress=None):
    """Evaluate a project gallery whose manifest has group_id on a (query, group_id) CSV.

    ``tune_path``: a query CSV, or a gallery folder with ``queries.csv``, that tunes the
    weights (see :func:`gallery_validation`).
    """
    from cgrs_ros.engine.gallery import load_gallery

    eval_set = _limit(datasets.read_gallery_queries(queries_path), limit)
    gallery = load_gallery(gallery_dir, check_images='exists')
    label_of = {item.image_id: item.group_id for item in gallery.items}
    if not any(label_of.values()):
        raise GalleryError(f'the manifest of {gallery_dir} has no group_id values; add a '
                           f'group_id column naming the building or place of each image')
    validation = (gallery_validation(tune_path, gallery_dir, queries_path, label_of)
                  if tune_path else None)
    runs = run_methods(gallery_dir, eval_set.queries, methods, config_path,
                       state_dir=state_dir, progress=progress, validation=validation,
                       caption_progress=caption_progress)
    problems = eval_set.problems + [str(p) for p in gallery.problems]
    return _report('gallery', eval_set, label_of, runs, methods,
                   {'gallery': str(gallery_dir), 'queries': str(queries_path),
                    'state_dir': str(state_dir) if state_dir else None,
                    'config': str(config_path) if config_path else None,
                    'tune_weights': str(tune_path) if tune_path else None},
                   problems, validation=validation)
