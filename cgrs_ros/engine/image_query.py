"""Image queries: rank the gallery for a photo (drone -> satellite, satellite -> drone, ...).

Why a second kind of query: cross-view geo-localization (University-1652, SUES-200, SkyLink)
matches a drone photo against geo-tagged satellite tiles to find where it was taken. For a
drone that is the other half of the job: "go where this photo was taken", and "where am I"
from its downward camera when GNSS is lost (the localization node calls this per frame).

How it runs (:meth:`cgrs_ros.engine.retriever.Retriever.query_image` is the entry point):

- the query image goes through the configured image encoder's IMAGE tower, the same tower
  that embedded the gallery, so the coarse score is the cosine between two image embeddings;
  an encoder with platform experts (the ``learned`` backend) projects the query with the
  expert of its own platform (``query_platform``, ``drone`` by default) while every gallery
  row was projected by its platform's expert;
- the candidates are the exact FAISS top-k, restricted inside the search to one platform
  (``platform``) and to a search area (``near``, see area.py), so a filtered query still gets
  k results when k images pass the filters;
- the caption channel does not run (a caption describes an image for a text query; there is
  no text here), so ``caption_score`` is None and ``fused`` equals ``coarse``;
- the reranker stage runs for rerankers that compare two images (``compares_images``: the
  ``openai`` and ``transformers`` backends ask their VLM the same-place question
  ``reranker.image_prompt`` about the photo and each candidate); for the others it is
  skipped and says why in ``QueryResult.rerank['skipped']`` (they score a text against an
  image). Nothing on this
  machine can measure whether a VLM's same-place answers rank better than the image tower
  alone; ``reranker.weight`` (0 = no change) keeps that decision with the user.
"""

import time

from cgrs_ros.engine.area import items_within, SearchArea
from cgrs_ros.engine.errors import ConfigError, QueryError
from cgrs_ros.engine.gallery import MAX_DECODED_SIDE, MAX_IMAGE_PIXELS, PLATFORMS
from cgrs_ros.engine.index import ALL_PLATFORMS, PLATFORM_CODES
import numpy as np
from PIL import Image

DEFAULT_QUERY_PLATFORM = 'drone'


def describe_image(image, query_platform):
    """Return how a result names an image query, e.g. ``'image 640x480 (drone)'``."""
    width, height = image.size
    return f'image {width}x{height} ({query_platform})'


def prepare_image(image):
    """Return the query image as RGB within the decode budget (QueryError when unusable).

    Callers decode files and messages with ``gallery.decode_image`` / ``decode_image_bytes``,
    which already apply the budget; an image built in memory is checked the same way here.
    """
    if not isinstance(image, Image.Image):
        raise QueryError(f'the query image must be a decoded PIL image, not '
                         f'{type(image).__name__}; decode it with cgrs_ros.engine.gallery.'
                         'decode_image (a file) or decode_image_bytes (encoded bytes)')
    width, height = image.size
    if not width or not height:
        raise QueryError(f'the query image is {width}x{height} pixels; it has no pixels')
    if width * height > MAX_IMAGE_PIXELS:
        raise QueryError(f'the query image is {width}x{height} pixels, over the pixel budget of '
                         f'{MAX_IMAGE_PIXELS / 1e6:.0f} Mpx; downscale it')
    rgb = image.convert('RGB') if image.mode != 'RGB' else image
    if max(rgb.size) > MAX_DECODED_SIDE:
        rgb = rgb.copy()
        rgb.thumbnail((MAX_DECODED_SIDE, MAX_DECODED_SIDE), Image.BICUBIC)
    return rgb


def check_options(top_k, platform, query_platform):
    """Raise QueryError for a bad ``top_k``, candidate ``platform`` or ``query_platform``."""
    if top_k is not None and (isinstance(top_k, bool)
                              or not isinstance(top_k, (int, np.integer)) or top_k < 1):
        raise QueryError(f'top_k {top_k!r} must be a positive integer')
    if platform is not None and platform not in PLATFORMS:
        raise QueryError(f'platform {platform!r} is not one of {", ".join(PLATFORMS)}')
    if query_platform not in PLATFORMS:
        raise QueryError(f'query platform {query_platform!r} is not one of '
                         f'{", ".join(PLATFORMS)}')


def no_match_reason(platform, area):
    """Return the no_match sentence of an image query that found no candidate."""
    what = f'{platform} image' if platform else 'image'
    if area is not None:
        return (f'no indexed gallery {what} lies within {area.describe()}; widen the radius '
                'or search without an area')
    return f'the gallery has no indexed {what}; index one or search without the platform filter'


def skipped_rerank(config, reranker):
    """Return the ``QueryResult.rerank`` entry of an image query the reranker cannot score."""
    backend = getattr(config.reranker, 'backend', 'configured')
    return {'skipped': f'the {backend} reranker compares text with images only',
            'reranker': reranker.identity}


def _image_parts(retriever):
    config = retriever.config
    encoder, index = retriever._image_encoder, retriever._image_index
    if config.image_encoder.backend == 'none' or encoder is None:
        raise ConfigError('image queries need an image encoder, and image_encoder.backend is '
                          'none; set image_encoder.backend to open_clip, hf_clip or learned and '
                          'run `cgrs index GALLERY` with that config')
    if index is None:
        raise ConfigError('image queries need the image embeddings of the gallery and there are '
                          'none; run `cgrs index GALLERY` with this config')
    return encoder, index


def embed_query_images(retriever, images, query_platform=DEFAULT_QUERY_PLATFORM):
    """Embed query images exactly as :func:`run_image_query` does, as one batch.

    For evaluations that rank many photos; returns float32 (n, dim) L2-normalized rows.
    """
    encoder, _ = _image_parts(retriever)
    check_options(None, None, query_platform)
    return encoder.encode_images([prepare_image(image) for image in images],
                                 platforms=[query_platform] * len(images))


def platform_rows(retriever, platform):
    """Return ``(gallery item indices, their image embeddings)`` of one platform's rows."""
    _, index = _image_parts(retriever)
    rows = index.rows_of_platform(platform)
    return index.row_items[rows], index.vectors(rows)


def run_image_query(retriever, image, top_k=None, platform=None, on_stage=None, near=None,
                    query_platform=DEFAULT_QUERY_PLATFORM):
    """Rank ``retriever``'s gallery for a PIL image; return a QueryResult (module docstring)."""
    # Imported here: retriever.py imports this module for Retriever.query_image.
    from cgrs_ros.engine.retriever import Candidate, QueryResult

    start = time.perf_counter()
    stage = on_stage or (lambda name, progress: None)
    config = retriever.config
    encoder, index = _image_parts(retriever)
    check_options(top_k, platform, query_platform)
    area = SearchArea.parse(near)
    rgb = prepare_image(image)
    query = describe_image(image, query_platform)
    top_k = int(top_k or config.retrieval.top_k)

    stage('encode', 0.2)
    vector = encoder.encode_images([rgb], platforms=[query_platform],
                                   threads=config.image_encoder.query_threads)[0]
    t_encode = time.perf_counter()

    stage('coarse', 0.5)
    codes = (PLATFORM_CODES[platform],) if platform else ALL_PLATFORMS
    rows = None
    if area is not None:
        rows = index.rows_of_items(items_within(retriever.gallery, area))
    reranker = retriever.reranker
    pairs = reranker is not None and getattr(reranker, 'compares_images', False)
    k_search = max(top_k, config.reranker.k) if pairs else top_k
    items, scores = index.search([(vector, codes)], k_search, rows=rows)
    scores = scores.astype(np.float64)
    t_coarse = time.perf_counter()
    rerank, final, rerank_info = np.full(len(items), np.nan), np.full(len(items), np.nan), {}
    if pairs and len(items):
        outcome = _rerank_pairs(retriever, rgb, query_platform, query, items, scores, stage)
        rerank, final = outcome.rerank, outcome.final
        items, scores = items[outcome.order], scores[outcome.order]
        rerank, final = rerank[outcome.order], final[outcome.order]
        rerank_info = {'scored': outcome.scored, 'of': outcome.considered,
                       'failed': int(np.isnan(outcome.rerank[:outcome.scored]).sum()),
                       'budget_hit': outcome.budget_hit, 'reranker': reranker.identity}
    elif reranker is not None:
        rerank_info = skipped_rerank(config, reranker)
    items, scores = items[:top_k], scores[:top_k]
    t_rerank = time.perf_counter()

    texts = retriever._captions.texts
    candidates = []
    for rank, (item_index, score) in enumerate(zip(items, scores), start=1):
        item = retriever.gallery.items[item_index]
        candidates.append(Candidate(
            rank=rank, image_id=item.image_id, platform=item.platform, lat=item.lat,
            lon=item.lon, alt=item.alt, heading_deg=item.heading_deg,
            caption=texts[item_index], group_id=item.group_id, coarse_score=float(score),
            caption_score=None, fused_score=float(score),
            rerank_score=_finite(rerank[rank - 1]), final_score=_finite(final[rank - 1])))
    end = time.perf_counter()
    timings = {'encode': (t_encode - start) * 1e3, 'coarse': (t_coarse - t_encode) * 1e3,
               'captions': 0.0, 'rerank': (t_rerank - t_coarse) * 1e3,
               'total': (end - start) * 1e3}
    return QueryResult(query=query, normalized_query=query, candidates=candidates,
                       timings_ms=timings,
                       no_match='' if candidates else no_match_reason(platform, area),
                       rerank=rerank_info)


def _finite(value):
    return float(value) if np.isfinite(value) else None


def _rerank_pairs(retriever, photo, query_platform, query, items, scores, stage):
    """Run the reranker stage on (photo, candidate) pairs (rerankers/stage.py)."""
    from cgrs_ros.engine.rerankers.stage import run_stage

    rows = [retriever.gallery.items[i] for i in items]

    def progress(done, total):
        stage(f'rerank {done}/{total}', 0.7 + 0.2 * done / max(total, 1))

    return run_stage(retriever.reranker, retriever.config.reranker, query, scores,
                     [retriever.gallery.path_of(row) for row in rows],
                     [row.platform for row in rows], [None] * len(rows),
                     on_progress=progress, coarse=scores, query_image=photo,
                     query_platform=query_platform)
