"""Recall@K with group-level hits, from score matrices or from ranked id lists.

Conventions (the same for every benchmark this package reads):

- A query is relevant to a set of labels. For GeoText-1652 and project galleries the label is
  the building / place id (``group_id``) and a query has exactly one; for RoboSense Track 4 the
  label is the image id itself and a query may have several.
- A query counts as a hit at K when ANY of its top-K retrieved items carries one of its labels.
  Recall@K is the share of queries that hit, in percent (the unit the published tables use).
- Every query is in the denominator. A query whose labels appear nowhere in the gallery cannot
  be hit; it counts as a miss and is also listed separately (``absent``) so a broken gallery is
  visible rather than silently excluded.
- Ties in a score matrix are broken deterministically: by score, highest first, then by gallery
  position, lowest first (a stable sort). NaN scores rank last.
- Metric names say the direction: ``t2i_r1`` is text->image Recall@1, ``i2t_r5`` image->text
  Recall@5, ``d2s_r1`` drone->satellite and ``s2d_r1`` satellite->drone Recall@1 (cross-view
  image queries, where ``d2s_ap`` is the mean average precision, :func:`average_precision`).
  Every item of the gallery carries its own label; we do not reproduce the official
  GeoText-1652 script, which gives the first image of each building the previous building's id.
"""

from dataclasses import dataclass, field

import numpy as np

# Cross-view image queries: <query platform initial>2<gallery platform initial>.
CROSS_VIEW_DIRECTIONS = ('d2s', 's2d', 'g2s', 's2g', 'g2d', 'd2g')
DIRECTIONS = ('t2i', 'i2t') + CROSS_VIEW_DIRECTIONS
HEADLINE_KS = (1, 5, 10)
CURVE_MAX_K = 10
UNKNOWN_PLATFORM = 'unknown'


def metric_name(direction, k):
    """Return the report name of Recall@``k`` in ``direction`` (e.g. ``t2i_r10``)."""
    if direction not in DIRECTIONS:
        raise ValueError(f'direction must be one of {DIRECTIONS}, got {direction!r}')
    return f'{direction}_r{int(k)}'


def stable_ranking(scores, top_k=None):
    """Rank gallery columns of a (queries x gallery) score matrix, best first.

    Ties keep gallery order (stable sort on the negated scores), NaN ranks last. Returns an
    int array of shape (queries, top_k) of gallery indices.
    """
    matrix = np.asarray(scores, dtype=np.float64)
    if matrix.ndim != 2:
        raise ValueError(f'scores must be a 2-D (queries x gallery) matrix, got shape '
                         f'{matrix.shape}')
    matrix = np.where(np.isnan(matrix), -np.inf, matrix)
    order = np.argsort(-matrix, axis=1, kind='stable')
    if top_k is not None:
        order = order[:, :int(top_k)]
    return order


def _as_label_set(relevant):
    if relevant is None:
        return frozenset()
    if isinstance(relevant, (str, bytes, int, np.integer)):
        return frozenset([relevant])
    return frozenset(relevant)


def first_hit_ranks(ranked_labels, relevant):
    """Return the 1-based rank of each query's first relevant item, 0 when none is listed.

    ``ranked_labels[q]`` is the label of every retrieved item of query ``q``, best first;
    ``relevant[q]`` a label or a collection of labels.
    """
    if len(ranked_labels) != len(relevant):
        raise ValueError(f'{len(ranked_labels)} ranked lists for {len(relevant)} queries')
    ranks = np.zeros(len(ranked_labels), dtype=np.int64)
    for q, (labels, wanted) in enumerate(zip(ranked_labels, relevant)):
        wanted = _as_label_set(wanted)
        for position, label in enumerate(labels, start=1):
            if label in wanted:
                ranks[q] = position
                break
    return ranks


def recall_curve(hit_ranks, max_k=CURVE_MAX_K):
    """Return Recall@K in percent for K = 1..max_k from 1-based first-hit ranks (0 = miss)."""
    ranks = np.asarray(hit_ranks, dtype=np.int64)
    if ranks.size == 0:
        return [0.0] * int(max_k)
    hit = ranks > 0
    return [float(100.0 * np.mean(hit & (ranks <= k))) for k in range(1, int(max_k) + 1)]


@dataclass
class RecallResult:
    """Recall of one direction over one set of queries.

    ``curve[k - 1]`` is Recall@k in percent; ``hit_ranks`` the 1-based rank of each query's
    first hit (0 = not within the ranked list); ``absent`` the indices of queries whose labels
    are nowhere in the gallery (they are misses, and also counted here); ``shortest_list`` the
    length of the shortest ranked list (Recall@K for K above it is a lower bound).
    """

    direction: str
    n_queries: int
    curve: list
    hit_ranks: np.ndarray
    absent: list = field(default_factory=list)
    shortest_list: int = 0
    by_platform: dict = field(default_factory=dict)
    ap: float = None               # mean average precision in percent, when computed
    ap_per_query: np.ndarray = None

    def recall(self, k):
        """Return Recall@k in percent (0 for k beyond the curve, which was not computed)."""
        if k < 1 or k > len(self.curve):
            raise ValueError(f'Recall@{k} was not computed (curve goes to K={len(self.curve)})')
        return self.curve[k - 1]

    def metrics(self, ks=HEADLINE_KS):
        """Return ``{'t2i_r1': ..., 't2i_r5': ..., 't2i_r10': ...}`` in percent.

        With average precision computed (full rankings), ``'<direction>_ap'`` too.
        """
        out = {metric_name(self.direction, k): self.recall(k) for k in ks
               if k <= len(self.curve)}
        if self.ap is not None:
            out[f'{self.direction}_ap'] = self.ap
        return out

    def summary(self, ks=HEADLINE_KS):
        """Return a JSON-ready dict: counts, headline metrics, curve and per-platform figures."""
        out = {
            'n_queries': self.n_queries,
            'n_absent': len(self.absent),
            **{name: round(value, 4) for name, value in self.metrics(ks).items()},
            'curve': [round(v, 4) for v in self.curve],
        }
        if self.shortest_list < len(self.curve):
            out['shortest_list'] = self.shortest_list
        if self.by_platform:
            out['by_platform'] = {name: {'n_queries': sub.n_queries,
                                         'n_absent': len(sub.absent),
                                         **{m: round(v, 4) for m, v in sub.metrics(ks).items()}}
                                  for name, sub in sorted(self.by_platform.items())}
        return out


def evaluate_ranked_labels(ranked_labels, relevant, gallery_labels, direction='t2i',
                           max_k=CURVE_MAX_K, query_platforms=None):
    """Compute Recall@1..max_k from each query's ranked labels.

    ``gallery_labels`` is every label present in the gallery (any iterable); it decides which
    queries are ``absent``. ``query_platforms`` (optional, one per query) adds a per-platform
    breakdown; queries with no platform are grouped under ``'unknown'``.
    """
    metric_name(direction, 1)  # validates the direction
    present = set(gallery_labels)
    relevant = [_as_label_set(r) for r in relevant]
    ranks = first_hit_ranks(ranked_labels, relevant)
    absent = [q for q, wanted in enumerate(relevant) if not (wanted & present)]
    shortest = min((len(labels) for labels in ranked_labels), default=0)
    result = RecallResult(direction=direction, n_queries=len(relevant),
                          curve=recall_curve(ranks, max_k), hit_ranks=ranks, absent=absent,
                          shortest_list=shortest)
    if query_platforms is not None:
        if len(query_platforms) != len(relevant):
            raise ValueError(f'{len(query_platforms)} platforms for {len(relevant)} queries')
        names = [p or UNKNOWN_PLATFORM for p in query_platforms]
        absent_set = set(absent)
        for name in sorted(set(names)):
            idx = [q for q, p in enumerate(names) if p == name]
            sub_ranks = ranks[idx]
            result.by_platform[name] = RecallResult(
                direction=direction, n_queries=len(idx), curve=recall_curve(sub_ranks, max_k),
                hit_ranks=sub_ranks, absent=[q for q in idx if q in absent_set],
                shortest_list=min((len(ranked_labels[q]) for q in idx), default=0))
    return result


def evaluate_ranked_ids(ranked_ids, relevant, label_of, direction='t2i', max_k=CURVE_MAX_K,
                        query_platforms=None):
    """Compute Recall@K from ranked gallery item ids (what a retriever returns).

    ``label_of`` maps every gallery item id to its label (group id, or the id itself for
    image-level benchmarks). An id that is not in ``label_of`` is an error in the caller.
    """
    ranked_labels = []
    for ids in ranked_ids:
        try:
            ranked_labels.append([label_of[i] for i in ids])
        except KeyError as exc:
            raise ValueError(f'ranked id {exc.args[0]!r} is not in the gallery') from None
    return evaluate_ranked_labels(ranked_labels, relevant, label_of.values(), direction,
                                  max_k, query_platforms)


def evaluate_scores(scores, query_labels, gallery_labels, direction='t2i', max_k=CURVE_MAX_K,
                    query_platforms=None):
    """Compute Recall@K from a (queries x gallery) score matrix, higher = more similar.

    ``query_labels[q]`` is a label or collection of labels; ``gallery_labels[g]`` the label of
    gallery column ``g``. Ties are broken by gallery position (see :func:`stable_ranking`).
    """
    matrix = np.asarray(scores, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape != (len(query_labels), len(gallery_labels)):
        raise ValueError(f'scores have shape {matrix.shape}, expected '
                         f'({len(query_labels)}, {len(gallery_labels)})')
    order = stable_ranking(matrix, top_k=max_k)
    gallery_labels = list(gallery_labels)
    ranked_labels = [[gallery_labels[g] for g in row] for row in order]
    return evaluate_ranked_labels(ranked_labels, query_labels, gallery_labels, direction, max_k,
                                  query_platforms)


def t2i_from_scores(text_image_scores, text_groups, image_groups, max_k=CURVE_MAX_K,
                    text_platforms=None):
    """Text->image Recall@K from a (texts x images) score matrix with group-level hits."""
    return evaluate_scores(text_image_scores, text_groups, image_groups, 't2i', max_k,
                           text_platforms)


def i2t_from_scores(text_image_scores, text_groups, image_groups, max_k=CURVE_MAX_K,
                    image_platforms=None):
    """Image->text Recall@K from the same (texts x images) matrix, read column-wise."""
    matrix = np.asarray(text_image_scores, dtype=np.float64)
    return evaluate_scores(matrix.T, image_groups, text_groups, 'i2t', max_k, image_platforms)


def average_precision(hit_positions, n_relevant=None):
    """Return the average precision (0..1) of one query's complete ranking.

    ``hit_positions`` are the 1-based positions of the relevant gallery items in the ranking of
    the WHOLE gallery, ascending; ``n_relevant`` how many relevant items the gallery holds
    (default: as many as listed; relevant items missing from the list add nothing).

    Defined as University-1652's evaluation defines it (the Market-1501 re-identification
    convention), for benchmarks where one query has several correct gallery images (all drone
    views of its building, s2d): each relevant item adds ``1 / n_relevant`` of recall, and the
    precision over that step is the mean of the precision just before the i-th relevant item,
    ``(i - 1) / (p_i - 1)`` (1 when it is at position 1), and just after it, ``i / p_i``. That
    is the trapezoid-rule area under the precision-recall curve; it is slightly higher than the
    step-wise AP (the mean of ``i / p_i``) whenever a relevant item is not at the top. With one
    relevant item (d2s: one satellite tile per building) at position p it is 1 for p = 1 and
    ``(0 + 1/p) / 2 = 1 / (2 p)`` otherwise. A query with no relevant item scores 0.
    """
    positions = np.asarray(hit_positions, dtype=np.float64)
    n = len(positions) if n_relevant is None else int(n_relevant)
    if n <= 0 or not len(positions):
        return 0.0
    if len(positions) > n:
        raise ValueError(f'{len(positions)} hit positions for {n} relevant items')
    if (np.diff(positions) <= 0).any() or positions[0] < 1:
        raise ValueError('hit positions must be 1-based and strictly ascending')
    found = np.arange(1, len(positions) + 1, dtype=np.float64)
    after = found / positions
    before = np.where(positions > 1, (found - 1) / np.maximum(positions - 1, 1), 1.0)
    return float(np.sum((before + after) / 2.0) / n)


def hit_positions(scores, relevant):
    """Return the 1-based positions of the ``relevant`` columns in one row's full ranking.

    ``scores`` is one query's score per gallery item, ``relevant`` a boolean mask over the
    same items. The ranking is :func:`stable_ranking`'s (ties by gallery position, NaN last).
    """
    order = stable_ranking(np.asarray(scores, dtype=np.float64).reshape(1, -1))[0]
    return np.flatnonzero(np.asarray(relevant, dtype=bool)[order]) + 1


def full_ranking_hits(scores, query_codes, gallery_codes):
    """Return ``(first-hit ranks, APs)`` of queries ranked against a whole gallery.

    ``scores`` is (queries x gallery); ``query_codes[q]`` the integer label of query ``q``
    (-1: none in the gallery), ``gallery_codes[g]`` the label of gallery column ``g``. A rank
    is 0 and an AP 0.0 for a query without a relevant item. Callers with large galleries pass
    the score matrix in row chunks and concatenate.
    """
    matrix = np.asarray(scores, dtype=np.float64)
    gallery_codes = np.asarray(gallery_codes)
    ranks = np.zeros(len(matrix), dtype=np.int64)
    aps = np.zeros(len(matrix), dtype=np.float64)
    for q, (row, code) in enumerate(zip(matrix, query_codes)):
        if code < 0:
            continue
        positions = hit_positions(row, gallery_codes == code)
        if len(positions):
            ranks[q] = positions[0]
            aps[q] = average_precision(positions)
    return ranks, aps


def full_ranking_result(ranks, aps, direction, absent=(), max_k=CURVE_MAX_K, n_gallery=None):
    """Return a :class:`RecallResult` with Recall@1..max_k and mean AP (both percent).

    ``ranks`` / ``aps`` as :func:`full_ranking_hits` returns them; every query counts in both
    means (a query without a relevant item is a miss with AP 0, as University-1652 counts it).
    """
    metric_name(direction, 1)
    aps = np.asarray(aps, dtype=np.float64)
    return RecallResult(direction=direction, n_queries=len(aps),
                        curve=recall_curve(ranks, max_k), hit_ranks=np.asarray(ranks),
                        absent=list(absent), shortest_list=(
                            max_k if n_gallery is None else min(int(n_gallery), max_k)),
                        ap=float(100.0 * aps.mean()) if len(aps) else 0.0, ap_per_query=aps)


def evaluate_full_rankings(scores, query_labels, gallery_labels, direction,
                           max_k=CURVE_MAX_K):
    """Recall@K and AP of a (queries x gallery) score matrix ranked in full (one label each)."""
    gallery_labels = list(gallery_labels)
    code_of = {label: code for code, label in enumerate(dict.fromkeys(gallery_labels))}
    gallery_codes = np.array([code_of[label] for label in gallery_labels], dtype=np.int64)
    query_codes = np.array([code_of.get(label, -1) for label in query_labels], dtype=np.int64)
    ranks, aps = full_ranking_hits(scores, query_codes, gallery_codes)
    absent = [q for q, code in enumerate(query_codes) if code < 0]
    return full_ranking_result(ranks, aps, direction, absent, max_k, len(gallery_labels))


def track4_score(result):
    """Return the RoboSense Track 4 challenge score, (R@1 + R@10) / 2, in percent."""
    return (result.recall(1) + result.recall(10)) / 2.0


def latency_summary(samples_ms):
    """Return ``{'n', 'mean', 'p50', 'p95', 'max'}`` in milliseconds for one stage."""
    values = np.asarray([v for v in samples_ms if v is not None], dtype=np.float64)
    if values.size == 0:
        return {'n': 0, 'mean': None, 'p50': None, 'p95': None, 'max': None}
    return {
        'n': int(values.size),
        'mean': round(float(values.mean()), 4),
        'p50': round(float(np.percentile(values, 50)), 4),
        'p95': round(float(np.percentile(values, 95)), 4),
        'max': round(float(values.max()), 4),
    }
