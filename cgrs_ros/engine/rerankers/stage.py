"""The reranking stage inside a query: score the top ``k``, fuse, re-sort, within a budget.

After the coarse search and the caption channel have ranked the candidates, the reranker
scores the first ``reranker.k`` of them, ``batch_size`` at a time, best first. Between model
calls the stage reports progress (the node turns it into action feedback "rerank 3/10"), lets
the caller abandon the query (a cancelled goal), and checks the per-query budget
``reranker.timeout_ms``. The candidates scored by then (a prefix of the list) are re-sorted
among themselves by

    final = (1 - weight) * minmax(fused over the scored prefix) + weight * P(match)

and the rest keep their place after them, so a budget that runs out can only reorder what was
looked at. A candidate the model could not score (unreadable image, a failed request) keeps
``P(match)`` equal to its own normalized fused score: it is neither helped nor pushed down.

Why a convex mix with the earlier score rather than P(match) alone: published zero-shot VLM
rerankers sometimes lower R@1 (pointwise yes/no probabilities are badly calibrated across
candidates); keeping part of the earlier evidence and choosing ``weight`` on validation
(``cgrs eval --tune-weights``) bounds the harm, and ``weight: 0`` turns the stage into a no-op.
"""

import dataclasses
import logging
import time

from cgrs_ros.engine.gallery import decode_image
from cgrs_ros.engine.rerank import minmax
import numpy as np

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class StageOutcome:
    """What the stage did to one query's ranking.

    ``order`` is the new order of the input positions; ``rerank`` holds P(match) per input
    position (NaN where not scored); ``final`` the fused score of the re-sorted prefix (NaN
    elsewhere); ``scored`` how many candidates the model saw; ``budget_hit`` whether the time
    budget stopped it early.
    """

    order: np.ndarray
    rerank: np.ndarray
    final: np.ndarray
    scored: int
    considered: int
    budget_hit: bool = False
    errors: list = dataclasses.field(default_factory=list)


def load_candidate_image(path):
    """Decode a candidate image for the reranker, or None when it cannot be read."""
    try:
        return decode_image(path)
    except Exception as exc:  # noqa: B902 - PIL raises many types for a corrupt file
        logger.warning('reranker: cannot read %s (%s); the candidate keeps its place', path, exc)
        return None


def run_stage(reranker, settings, query, fused, paths, platforms, captions,
              on_progress=None, clock=time.monotonic, coarse=None, caption=None,
              query_image=None, query_platform='drone'):
    """Rerank candidates already sorted best first; return a :class:`StageOutcome`.

    ``fused`` are their scores before this stage (descending), ``paths`` their image files,
    ``platforms`` and ``captions`` their platform names and captions (None without);
    ``coarse`` and ``caption`` the channel scores (None when a channel did not run), passed
    to rerankers that read them (``uses_priors``). Images are decoded only for rerankers
    that look at pixels (``needs_images``, the default). ``query_image`` (an image goal, for
    rerankers that compare two images) goes to every call with its ``query_platform``.
    ``on_progress(done, total)`` is called before each model call and once at the end; it
    may raise to abandon the query.
    """
    n = len(fused)
    k = min(settings.k, n)
    rerank = np.full(n, np.nan)
    deadline = (clock() + settings.timeout_ms / 1e3) if settings.timeout_ms else None
    progress = on_progress or (lambda done, total: None)
    scored, budget_hit, errors = 0, False, []
    step = max(1, int(getattr(reranker, 'batch_size', 1) or 1))
    needs_images = getattr(reranker, 'needs_images', True)
    uses_priors = getattr(reranker, 'uses_priors', False)
    while scored < k:
        progress(scored, k)
        if deadline is not None and clock() >= deadline:
            budget_hit = True
            break
        batch = range(scored, min(k, scored + step))
        sl = slice(batch.start, batch.stop)
        images = [load_candidate_image(paths[i]) if needs_images else None for i in batch]
        extra = {}
        if query_image is not None:
            extra.update(query_image=query_image, query_platform=query_platform)
        if uses_priors:
            extra['priors'] = {'fused': fused[sl],
                               'coarse': None if coarse is None else coarse[sl],
                               'caption': None if caption is None else caption[sl]}
        probs = np.asarray(reranker.score(query, images, [platforms[i] for i in batch],
                                          [captions[i] for i in batch], **extra),
                           dtype=np.float64)
        if probs.shape != (len(batch),):
            raise RuntimeError(f'reranker {reranker.identity} returned {probs.shape} scores '
                               f'for {len(batch)} candidates')
        rerank[sl] = probs
        errors.extend(getattr(reranker, 'last_errors', None) or [])
        scored = batch.stop
    progress(scored, k)
    if scored and np.isnan(rerank[:scored]).all():
        logger.warning('reranker %s could not score any of the %d candidates (%s); the '
                       'ranking is the one before the stage', reranker.identity, scored,
                       '; '.join(errors[:2]) or 'see the log above')
    order, final = stage_order(fused, rerank, scored, settings.weight)
    return StageOutcome(order=order, rerank=rerank, final=final, scored=scored,
                        considered=k, budget_hit=budget_hit, errors=errors)


def stage_order(fused, rerank, scored, weight):
    """Return ``(order, final)``: the stage's arithmetic over the scored prefix, nothing else.

    ``fused`` (descending) and ``rerank`` (P(match), NaN where not scored) are per input
    position; the first ``scored`` are re-sorted by the convex mix of the module docstring,
    the rest keep their place. Pure, so ``cgrs eval --tune-weights`` re-fuses P(match) scored
    once at every grid weight with exactly the arithmetic a query uses.
    """
    n = len(fused)
    order = np.arange(n)
    final = np.full(n, np.nan)
    if scored:
        prior = np.nan_to_num(minmax(fused[:scored]), nan=0.0)
        probs = np.where(np.isfinite(rerank[:scored]), rerank[:scored], prior)
        final[:scored] = (1.0 - weight) * prior + weight * probs
        order[:scored] = np.argsort(-final[:scored], kind='stable')
    return order, final
