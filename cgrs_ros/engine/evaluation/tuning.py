"""``cgrs eval --tune-weights``: choose the fusion weights on validation queries, cheaply.

Two weights decide how the stages' evidence is mixed: ``retrieval.caption_weight`` (coarse vs
caption channel, rerank.py) and ``reranker.weight`` (the earlier score vs the reranker's
P(match), rerankers/stage.py). Published caption and VLM rerankers help on one benchmark and
hurt on another, so both are chosen on a validation set, by Recall@1 (ties: Recall@5, then the
configured value, then the smaller weight), and never on the queries that are reported.

Cost: no query is run per grid point. Each validation query's candidate pool is built once
with both channels (:meth:`Retriever.candidates`) and re-fused at every caption weight with
the same function a query uses (``fuse_candidates``). The reranker scores each query's
candidates once: a pointwise reranker (P(match) depends on the query and the candidate only)
scores the union of the top ``reranker.k`` over all caption weights in one stage run; a
reranker that reads the earlier scores (``uses_priors``, the trained cross-encoder) is run once
per caption weight, because its input changes with it. Every reranker weight is then a
re-sort of those probabilities by ``stage_order``, the stage's own arithmetic. The stage's
time budget (``reranker.timeout_ms``) is not applied while tuning: every candidate the stage
would look at is scored.
"""

import dataclasses

from cgrs_ros.engine.errors import QueryError
from cgrs_ros.engine.evaluation.metrics import CURVE_MAX_K, evaluate_ranked_ids
from cgrs_ros.engine.rerankers.stage import run_stage, stage_order
from cgrs_ros.engine.retriever import fuse_candidates
import numpy as np

CAPTION_WEIGHTS = tuple(round(0.1 * i, 1) for i in range(11))
RERANKER_WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclasses.dataclass
class Tuning:
    """The outcome of a grid search on validation queries.

    ``caption_weight`` / ``reranker_weight`` are the chosen values (``reranker_weight`` None
    without a reranker); ``tuned`` names the config keys the search could change (a weight
    that cannot change the ranking, e.g. caption_weight with no captions, is left as
    configured); ``grid`` has one row per point with its validation recall.
    """

    caption_weight: float
    reranker_weight: float
    tuned: list
    grid: list
    n_queries: int
    n_absent: int
    chosen: dict
    configured: dict
    notes: list = dataclasses.field(default_factory=list)
    problems: list = dataclasses.field(default_factory=list)

    def overrides(self):
        """Return the config overrides that apply the chosen weights (tuned keys only)."""
        out = {}
        if 'retrieval.caption_weight' in self.tuned:
            out['retrieval.caption_weight'] = self.caption_weight
        if 'reranker.weight' in self.tuned:
            out['reranker.weight'] = self.reranker_weight
        return out

    def config_lines(self):
        """Return the YAML lines to paste into the engine config."""
        lines = []
        if 'retrieval.caption_weight' in self.tuned:
            lines += ['retrieval:', f'  caption_weight: {self.caption_weight:g}']
        if 'reranker.weight' in self.tuned:
            lines += ['reranker:', f'  weight: {self.reranker_weight:g}']
        return lines

    def to_dict(self):
        """Return the ``tuning`` section of the report."""
        out = dataclasses.asdict(self)
        out['config_yaml'] = '\n'.join(self.config_lines()) + '\n'
        return out


def _grid(configured, grid, tunable):
    if not tunable:
        return (configured,)
    return tuple(sorted(set(grid) | {configured}))


def _pool_rankings(retriever, reranker, pool, caption_grid, reranker_grid, max_k):
    """Ranked gallery positions (top ``max_k``) of one pool at every grid point."""
    cfg = retriever.config
    views = {}
    for weight in caption_grid:
        items, coarse, caption = pool.channels(weight)
        fused, order = fuse_candidates(coarse, caption, cfg.retrieval, weight)
        views[weight] = (items[order], fused[order],
                         None if coarse is None else coarse[order],
                         None if caption is None else caption[order])
    if reranker is None:
        return {(w, None): view[0][:max_k] for w, view in views.items()}
    settings = cfg.reranker.model_copy(update={'timeout_ms': None})
    gallery = retriever.gallery

    def stage(items, fused, k, coarse=None, caption=None):
        rows = [gallery.items[i] for i in items]
        return run_stage(reranker, settings.model_copy(update={'k': k}), pool.said, fused,
                         [gallery.path_of(row) for row in rows], [row.platform for row in rows],
                         [pool.captions.texts[i] for i in items], coarse=coarse,
                         caption=caption)

    prob_of = None
    if not getattr(reranker, 'uses_priors', False):
        union = np.array(list(dict.fromkeys(
            int(i) for view in views.values() for i in view[0][:settings.k])), dtype=np.int64)
        # Pointwise: the fused values do not reach the model, only the final arithmetic,
        # which is redone below per grid point.
        outcome = stage(union, np.zeros(len(union)), len(union))
        prob_of = dict(zip(union.tolist(), outcome.rerank.tolist()))
    out = {}
    for weight, (ranked, fused, coarse, caption) in views.items():
        if prob_of is None:
            outcome = stage(ranked, fused, settings.k, coarse, caption)
            probs, scored = outcome.rerank, outcome.scored
        else:
            scored = min(settings.k, len(ranked))
            probs = np.full(len(ranked), np.nan)
            probs[:scored] = [prob_of[int(i)] for i in ranked[:scored]]
        for rw in reranker_grid:
            order, _ = stage_order(fused, probs, scored, rw)
            out[(weight, rw)] = ranked[order][:max_k]
    return out


def tune_weights(retriever, reranker, queries, label_of, max_k=CURVE_MAX_K, say=None):
    """Grid-search caption_weight and reranker.weight on ``queries``; return a :class:`Tuning`.

    ``retriever`` is open on the configuration to tune (its reranker stage set aside);
    ``reranker`` the configured reranker or None; ``queries`` the validation EvalQuery list;
    ``label_of`` maps gallery image ids to the labels their ``relevant`` sets hold.
    """
    cfg = retriever.config
    pools, kept, problems = [], [], []
    for query in queries:
        try:
            pools.append(retriever.candidates(query.text, top_k=max_k, with_captions=True))
            kept.append(query)
        except QueryError as exc:
            problems.append(f'validation query {query.query_id}: {exc}; skipped')
    if not pools:
        raise QueryError('no validation query could be run; check the --tune-weights file')
    notes = []
    has_coarse = any(p.coarse is not None for p in pools)
    has_caption = any(p.caption is not None for p in pools)
    tunable_caption = has_coarse and has_caption
    if not tunable_caption:
        notes.append('retrieval.caption_weight not tuned: ' + (
            'no image has a caption' if has_coarse else
            'without an image encoder the caption channel ranks alone'))
    if not tunable_caption and reranker is None:
        raise QueryError('--tune-weights has nothing to tune: caption_weight cannot change the '
                         'ranking here (' + notes[0].split(': ', 1)[1] + ') and no reranker '
                         'is configured (reranker.backend is none)')
    configured = {'caption_weight': cfg.retrieval.caption_weight,
                  'reranker_weight': cfg.reranker.weight if reranker is not None else None}
    caption_grid = _grid(configured['caption_weight'], CAPTION_WEIGHTS, tunable_caption)
    reranker_grid = (_grid(configured['reranker_weight'], RERANKER_WEIGHTS, True)
                     if reranker is not None else (None,))
    if say:
        say(f'tuning weights on {len(pools)} validation queries: {len(caption_grid)} caption '
            f'weights x {len(reranker_grid)} reranker weights ...')
    rankings = {(w, rw): [] for w in caption_grid for rw in reranker_grid}
    ids = [item.image_id for item in retriever.gallery.items]
    for pool in pools:
        for point, ranked in _pool_rankings(retriever, reranker, pool, caption_grid,
                                            reranker_grid, max_k).items():
            rankings[point].append([ids[i] for i in ranked])
    relevant = [q.relevant for q in kept]
    grid, absent = [], []
    for (w, rw), ranked in rankings.items():
        result = evaluate_ranked_ids(ranked, relevant, label_of, 't2i')
        absent = result.absent
        grid.append({'caption_weight': w, 'reranker_weight': rw,
                     **{k: round(v, 4) for k, v in result.metrics((1, 5, 10)).items()}})
    if len(absent) == len(kept):
        raise QueryError(f'none of the {len(kept)} validation queries has its place in the '
                         'evaluation gallery; the --tune-weights queries must name places of '
                         'this gallery')

    def distance(row):
        far = abs(row['caption_weight'] - configured['caption_weight'])
        if configured['reranker_weight'] is not None:
            far += abs(row['reranker_weight'] - configured['reranker_weight'])
        return far

    best = max(grid, key=lambda row: (row['t2i_r1'], row['t2i_r5'], -distance(row)))
    tuned = (['retrieval.caption_weight'] if tunable_caption else []) + (
        ['reranker.weight'] if reranker is not None else [])
    return Tuning(caption_weight=best['caption_weight'], reranker_weight=best['reranker_weight'],
                  tuned=tuned, grid=grid, n_queries=len(kept), n_absent=len(absent),
                  chosen=dict(best), configured=configured, notes=notes, problems=problems)
