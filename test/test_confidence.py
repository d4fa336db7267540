"""The confidence of a ranking (engine/confidence.py): margin, calibration, the hold rule."""

import math

from cgrs_ros.engine import confidence
from cgrs_ros.engine.config import load_config
from cgrs_ros.engine.errors import ConfigError
from cgrs_ros.engine.retriever import Candidate
import numpy as np
import pyproj
import pytest

GEOD = pyproj.Geod(ellps='WGS84')


def _cand(rank, score, group='', east_m=0.0, final=None, caption=None, coarse=None):
    lon, lat, _ = GEOD.fwd(8.5, 47.4, 90.0, east_m) if east_m else (8.5, 47.4, 0)
    return Candidate(rank=rank, image_id=f'i{rank}', platform='satellite', lat=lat, lon=lon,
                     alt=0.0, heading_deg=0.0, caption='', group_id=group,
                     coarse_score=coarse, caption_score=caption, fused_score=score,
                     final_score=final)


def test_margin_skips_views_of_the_same_place():
    # Same group id: not a competitor; the next group is.
    ranked = [_cand(1, 0.9, 'a'), _cand(2, 0.88, 'a'), _cand(3, 0.7, 'b')]
    assert confidence.place_margin(ranked, 30.0) == pytest.approx(0.2)
    # No group ids: within same_place_m of the best is the same place, farther is another.
    ranked = [_cand(1, 0.9), _cand(2, 0.85, east_m=20.0), _cand(3, 0.6, east_m=200.0)]
    assert confidence.place_margin(ranked, 30.0) == pytest.approx(0.3)
    assert confidence.place_margin(ranked, 10.0) == pytest.approx(0.05)
    # Only one place: the margin to the last candidate (a lower bound), or to 0 alone.
    assert confidence.place_margin(ranked[:2], 30.0) == pytest.approx(0.05)
    assert confidence.place_margin(ranked[:1], 30.0) == pytest.approx(0.9)
    assert math.isnan(confidence.place_margin([], 30.0))


def test_reranked_candidates_are_compared_by_their_final_score():
    ranked = [_cand(1, 0.5, 'a', final=0.95), _cand(2, 0.9, 'b', final=0.4)]
    assert confidence.place_margin(ranked, 30.0) == pytest.approx(0.55)


def test_confidence_is_the_logistic_of_the_features():
    section = load_config(None, {'confidence.intercept': -2.0,
                                 'confidence.weights': {'margin': 10.0, 'caption': 3.0}}
                          ).confidence
    ranked = [_cand(1, 0.8, 'a', caption=0.6, coarse=0.3), _cand(2, 0.7, 'b')]
    sure = confidence.assess(ranked, section)
    assert sure.margin == pytest.approx(0.1)
    assert sure.confidence == pytest.approx(1 / (1 + math.exp(-(-2.0 + 1.0 + 1.8))))
    assert sure.features == pytest.approx({'top': 0.8, 'margin': 0.1, 'caption': 0.6,
                                           'coarse': 0.3})
    # Uncalibrated (the default config): the confidence is NaN, the margin still known.
    plain = confidence.assess(ranked, load_config(None).confidence)
    assert math.isnan(plain.confidence) and plain.margin == pytest.approx(0.1)
    with pytest.raises(ConfigError, match='confidence'):
        load_config(None, {'confidence.weights': {'loudness': 1.0}})


def test_hold_rule_of_each_policy():
    sure = confidence.Assessment(0.8, 0.2, {})
    unsure = confidence.Assessment(0.3, 0.2, {})
    tie = confidence.Assessment(0.8, 0.001, {})
    uncalibrated = confidence.Assessment(math.nan, 0.2, {})
    assert not confidence.should_hold('auto', unsure, 0.5, 0.05)
    assert confidence.should_hold('confirm', sure, 0.5, 0.05)
    assert not confidence.should_hold('confirm_below', sure, 0.5, 0.05)
    assert confidence.should_hold('confirm_below', unsure, 0.5, 0.05)
    assert confidence.should_hold('confirm_below', tie, 0.5, 0.05)
    assert confidence.should_hold('confirm_below', uncalibrated, 0.5, 0.0)
    assert not confidence.should_hold('confirm_below', uncalibrated, 0.0, 0.05)


def test_fit_learns_that_a_wide_margin_is_right_more_often():
    rng = np.random.default_rng(0)
    observations = []
    for _ in range(400):
        margin = float(rng.uniform(0.0, 0.5))
        right = bool(rng.random() < 1 / (1 + math.exp(-(-2.0 + 12.0 * margin))))
        observations.append(confidence.Observation(
            {'top': 1.0, 'margin': margin, 'caption': 0.5, 'coarse': 0.0}, right))
    intercept, weights = confidence.fit(observations, regularization=0.01)
    assert weights['margin'] > 5.0
    report = confidence.report(observations, intercept, weights, min_confidence=0.5)
    assert report['queries'] == 400
    # The let-through goals are right more often than all goals, the held ones less.
    assert report['r_at_1_passed'] > report['r_at_1'] > report['r_at_1_held']
    for row in report['reliability']:  # calibrated: each bin's confidence near its hit rate
        if row['queries'] >= 40:
            assert abs(row['mean_confidence'] - row['share_right']) < 0.15, row
    with pytest.raises(ValueError, match='all right or all wrong'):
        confidence.fit([confidence.Observation(
            {'top': 1.0, 'margin': 0.1, 'caption': 0.0, 'coarse': 0.0}, True)] * 3)
