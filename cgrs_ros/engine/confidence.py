"""How sure a ranking is: the margin to the next place and a calibrated confidence.

Why: a drone should not fly to the best candidate when the second place scores nearly as well.
Raw fused scores do not say how likely the best candidate is right (the weighted fusion
min-max normalizes over each query's candidates, so the best is often exactly 1.0), so the
confidence is a logistic function of a few numbers of the ranking, fitted on validation
queries with known answers (``cgrs calibrate``) and stored in the engine config's
``confidence`` section:

- ``top``: the ranking score of the best candidate (``final`` when the reranker scored it,
  else ``fused``);
- ``margin``: ``top`` minus the ranking score of the best candidate of ANOTHER place. Two
  candidates are the same place when both have a ``group_id`` and they are equal, or else
  when they lie within ``same_place_m`` of each other (three views of one building are not
  a tie);
- ``caption`` / ``coarse``: the best candidate's raw cosine in each channel (0 when the
  channel did not score it).

``confidence = 1 / (1 + exp(-(intercept + sum(weights[f] * f))))`` estimates P(the best
candidate is the intended place) for goals like the validation queries. It is NaN when the
config carries no calibration (``intercept: null``); it is only as good as the match between
the validation queries and real goals.
"""

import dataclasses
import math

from cgrs_ros.engine.geo import geodesic_distance_m

FEATURES = ('top', 'margin', 'caption', 'coarse')


@dataclasses.dataclass(frozen=True)
class Assessment:
    """How sure one ranking is: the features and the calibrated confidence (NaN: none)."""

    confidence: float
    margin: float
    features: dict

    def to_dict(self):
        """Return the JSON shape (NaN as None)."""
        def plain(value):
            return None if value is None or math.isnan(value) else float(value)
        return {'confidence': plain(self.confidence), 'margin': plain(self.margin),
                'features': {k: plain(v) for k, v in self.features.items()}}


def ranking_score(candidate):
    """Return the score a candidate was ranked by: ``final`` when reranked, else ``fused``."""
    final = getattr(candidate, 'final_score', None)
    if final is not None and not math.isnan(final):
        return float(final)
    return float(candidate.fused_score)


def same_place(a, b, same_place_m):
    """Whether two candidates show one place (equal group_id, or within ``same_place_m``)."""
    if a.group_id and b.group_id:
        return a.group_id == b.group_id
    return float(geodesic_distance_m(a.lat, a.lon, [b.lat], [b.lon])[0]) <= same_place_m


def place_margin(candidates, same_place_m):
    """Return the best score minus that of the best candidate of another place.

    Candidates are engine candidates (rank order, ``lat``/``lon``/``group_id``). When the list
    holds no other place, every other place scores at most the last candidate, so the margin
    to it is returned (a lower bound); with one candidate only, the margin to 0.
    """
    if not candidates:
        return math.nan
    best = candidates[0]
    for other in candidates[1:]:
        if not same_place(best, other, same_place_m):
            return ranking_score(best) - ranking_score(other)
    last = candidates[-1] if len(candidates) > 1 else None
    return ranking_score(best) - (ranking_score(last) if last is not None else 0.0)


def features_of(candidates, same_place_m):
    """Return the calibration features of a ranking (see the module docstring)."""
    best = candidates[0]

    def cosine(value):
        return 0.0 if value is None or math.isnan(value) else float(value)

    return {'top': ranking_score(best), 'margin': place_margin(candidates, same_place_m),
            'caption': cosine(best.caption_score), 'coarse': cosine(best.coarse_score)}


def logistic(intercept, weights, features):
    """Return the calibrated probability for ``features``; NaN when any is NaN or no fit."""
    if intercept is None:
        return math.nan
    z = float(intercept) + sum(float(weights.get(name, 0.0)) * features[name]
                               for name in FEATURES)
    if math.isnan(z):
        return math.nan
    return 1.0 / (1.0 + math.exp(-z)) if z > -700 else 0.0


def assess(candidates, section):
    """Return the :class:`Assessment` of a ranking under the config's ``confidence`` section."""
    if not candidates:
        return Assessment(math.nan, math.nan, {})
    features = features_of(candidates, section.same_place_m)
    return Assessment(logistic(section.intercept, section.weights, features),
                      features['margin'], features)


def should_hold(policy, assessment, min_confidence, min_margin):
    """Whether a ranking waits for an operator under ``policy`` (auto | confirm | confirm_below).

    ``confirm_below`` holds when the confidence is under ``min_confidence`` (an uncalibrated
    NaN confidence counts as under it when ``min_confidence`` > 0) or the margin is under
    ``min_margin``.
    """
    if policy == 'auto':
        return False
    if policy == 'confirm':
        return True
    low = min_confidence > 0 and not assessment.confidence >= min_confidence
    tied = assessment.margin < min_margin
    return low or tied


# ---------------------------------------------------------------- calibration (cgrs calibrate)

@dataclasses.dataclass(frozen=True)
class Observation:
    """One validation query: the ranking's features and whether its best candidate was right."""

    features: dict
    correct: bool


def observe(retriever, queries, pool_k):
    """Run ``queries`` (evaluation EvalQuery: text, relevant group ids); return Observations.

    A query whose ranking is empty is skipped (nothing to be confident about).
    """
    out = []
    for query in queries:
        candidates = retriever.query(query.text, top_k=pool_k).candidates
        if candidates:
            out.append(Observation(features_of(candidates, retriever.config.confidence
                                               .same_place_m),
                                   candidates[0].group_id in query.relevant))
    return out


def _matrix(observations):
    import numpy as np

    x = np.array([[o.features[name] for name in FEATURES] for o in observations], dtype=float)
    return x, np.array([o.correct for o in observations], dtype=int)


def fit(observations, regularization=1.0):
    """Fit the logistic calibration; return ``(intercept, {feature: weight})``.

    scikit-learn's LogisticRegression (L2, ``C = 1 / regularization``); a feature that is the
    same for every query (e.g. ``coarse`` without an image encoder) gets weight 0.
    """
    from sklearn.linear_model import LogisticRegression

    x, y = _matrix(observations)
    if len(set(y.tolist())) < 2:
        raise ValueError('the validation queries are all right or all wrong at rank 1; a '
                         'confidence cannot be fitted (use more or harder queries)')
    model = LogisticRegression(C=1.0 / regularization, max_iter=1000).fit(x, y)
    return float(model.intercept_[0]), {name: round(float(w), 6)
                                        for name, w in zip(FEATURES, model.coef_[0])}


def report(observations, intercept, weights, min_confidence=0.0, min_margin=0.0, bins=5):
    """Return how the calibration fares on ``observations`` (a dict for tables and JSON).

    ``r_at_1``: share right at rank 1; ``brier``: mean squared error of the confidence;
    ``reliability``: per confidence bin, queries, mean confidence and share right;
    ``held`` and ``r_at_1_passed``: the share confirm_below holds at the thresholds and the
    rank-1 accuracy of the queries it lets through.
    """
    import numpy as np

    conf = np.array([logistic(intercept, weights, o.features) for o in observations])
    right = np.array([o.correct for o in observations], dtype=float)
    held = np.array([should_hold('confirm_below', Assessment(c, o.features['margin'], {}),
                                 min_confidence, min_margin)
                     for c, o in zip(conf, observations)])
    table = []
    edges = np.linspace(0.0, 1.0, bins + 1)
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (conf >= lo) & ((conf < hi) | (hi == 1.0))
        if inside.any():
            table.append({'bin': f'{lo:.1f}-{hi:.1f}', 'queries': int(inside.sum()),
                          'mean_confidence': float(conf[inside].mean()),
                          'share_right': float(right[inside].mean())})
    passed = ~held
    return {'queries': len(observations), 'r_at_1': float(right.mean()),
            'brier': float(np.nanmean((conf - right) ** 2)), 'reliability': table,
            'min_confidence': min_confidence, 'min_margin': min_margin,
            'held': float(held.mean()),
            'r_at_1_passed': float(right[passed].mean()) if passed.any() else math.nan,
            'r_at_1_held': float(right[held].mean()) if held.any() else math.nan}
