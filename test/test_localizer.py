"""The localizer's search policy and estimate, against a scripted retriever.

Positions are set in metres around a datum and converted with pyproj (independent of the
engine's geo module); the expected means and spreads are computed by hand here.
"""

import math

from cgrs_ros.engine.localization import Localizer, LocalizerSettings
from cgrs_ros.engine.retriever import Candidate, QueryResult
from PIL import Image
import pyproj
import pytest

DATUM = (47.3977, 8.5456)
GEOD = pyproj.Geod(ellps='WGS84')


def _latlon(east, north):
    if east == north == 0:
        return DATUM
    lon, lat, _ = GEOD.fwd(DATUM[1], DATUM[0], math.degrees(math.atan2(east, north)),
                           math.hypot(east, north))
    return lat, lon


def _metres(lat, lon):
    azimuth, _, dist = GEOD.inv(DATUM[1], DATUM[0], lon, lat)
    return dist * math.sin(math.radians(azimuth)), dist * math.cos(math.radians(azimuth))


def _candidates(rows):
    """rows: (image_id, east, north, score[, platform, heading]) best first."""
    out = []
    for rank, row in enumerate(rows, start=1):
        image_id, east, north, score = row[:4]
        platform, heading = (row[4], row[5]) if len(row) > 4 else ('satellite', 0.0)
        lat, lon = _latlon(east, north)
        out.append(Candidate(rank=rank, image_id=image_id, platform=platform, lat=lat, lon=lon,
                             alt=488.0, heading_deg=heading, caption='', group_id='',
                             coarse_score=score, caption_score=None, fused_score=score))
    return out


class ScriptedRetriever:
    """Answers query_image from a function of ``near``; records every call."""

    def __init__(self, answer):
        self.answer = answer
        self.calls = []

    def query_image(self, image, top_k=None, platform=None, on_stage=None, near=None,
                    query_platform='drone'):
        self.calls.append({'size': image.size, 'top_k': top_k, 'platform': platform,
                           'near': near, 'query_platform': query_platform})
        return QueryResult(query='image', normalized_query='image',
                           candidates=self.answer(near)[:top_k], timings_ms={})


FRAME = Image.new('RGB', (64, 64))
SETTINGS = LocalizerSettings(top_k=5, search_radius_m=100.0, min_score=0.6, min_margin=0.05,
                             ambiguity_radius_m=40.0, temperature=0.05, min_sigma_m=3.0,
                             global_check=False)


def test_global_fix_is_the_weighted_mean_of_the_best_place_and_moves_the_anchor():
    rows = [('a', 100.0, 0.0, 0.90), ('b', 120.0, 0.0, 0.85), ('far', -300.0, 0.0, 0.70)]
    retriever = ScriptedRetriever(lambda near: _candidates(rows))
    localizer = Localizer(retriever, SETTINGS)
    outcome = localizer.locate(FRAME)
    assert outcome.mode == 'global' and outcome.reason == ''
    call = retriever.calls[0]
    assert call['near'] is None and call['platform'] == 'satellite' and call['top_k'] == 5
    assert call['query_platform'] == 'drone'
    fix = outcome.estimate
    w_b = math.exp(-0.05 / 0.05)
    east, north = _metres(fix.lat, fix.lon)
    assert east == pytest.approx((100.0 + 120.0 * w_b) / (1 + w_b), abs=0.05)
    assert north == pytest.approx(0.0, abs=0.05)
    assert fix.cluster == 2 and fix.image_id == 'a' and fix.score == pytest.approx(0.90)
    assert fix.margin == pytest.approx(0.20)
    # Spread over all three, the far look-alike included, plus the floor.
    weights = [1.0, w_b, math.exp(-0.20 / 0.05)]
    xs = [100.0, 120.0, -300.0]
    mean = (100.0 + 120.0 * w_b) / (1 + w_b)
    var = sum(w * (x - mean) ** 2 for w, x in zip(weights, xs)) / sum(weights)
    assert fix.covariance_en[0][0] == pytest.approx(var + 9.0, rel=1e-3)
    assert fix.covariance_en[1][1] == pytest.approx(9.0, rel=1e-3)
    assert fix.heading_deg is None  # satellite tiles are north-up: no heading from them
    lat, lon, radius = localizer.anchor
    assert (lat, lon) == pytest.approx((fix.lat, fix.lon)) and radius == 100.0


def test_prior_is_searched_locally_first_and_failure_falls_back_to_global():
    local = [('weak', 10.0, 10.0, 0.5)]
    world = [('strong', 400.0, 0.0, 0.95)]
    retriever = ScriptedRetriever(lambda near: _candidates(local if near else world))
    prior = _latlon(0.0, 0.0)
    localizer = Localizer(retriever, SETTINGS, prior=(*prior, 250.0))
    outcome = localizer.locate(FRAME)
    assert [c['near'] for c in retriever.calls] == [(*prior, 250.0), None]
    # 400 m from the prior is a jump: taken once two frames in a row agree (confirm_jumps).
    assert outcome.mode == 'local+global' and outcome.estimate is None
    assert outcome.reason == ('a fix strong outside the local area awaits confirmation '
                              '(1 of 2 frames)')
    outcome = localizer.locate(FRAME)
    assert outcome.estimate.image_id == 'strong'
    # The next frame searches around the new estimate with search_radius_m.
    localizer.locate(FRAME)
    assert retriever.calls[4]['near'][2] == 100.0
    assert _metres(*retriever.calls[4]['near'][:2]) == pytest.approx((400.0, 0.0), abs=0.1)


def test_a_jump_is_confirmed_by_frames_agreeing_on_one_place():
    places = iter([400.0, -400.0, -390.0, 0.0])
    retriever = ScriptedRetriever(lambda near: _candidates(
        [('weak', 0.0, 0.0, 0.1)] if near else [('far', next(places), 0.0, 0.95)]))
    localizer = Localizer(retriever, SETTINGS, prior=(*_latlon(0, 0), 100.0))
    assert localizer.locate(FRAME).estimate is None       # 400 m east: 1 of 2
    assert localizer.locate(FRAME).estimate is None       # 400 m west: another place, 1 of 2
    fix = localizer.locate(FRAME).estimate                # 390 m west: agrees, taken
    assert _metres(fix.lat, fix.lon)[0] == pytest.approx(-390.0, abs=0.1)
    at_once = Localizer(ScriptedRetriever(lambda near: _candidates(
        [('weak', 0.0, 0.0, 0.1)] if near else [('far', 400.0, 0.0, 0.95)])),
        LocalizerSettings(**{**SETTINGS.__dict__, 'confirm_jumps': 1}),
        prior=(*_latlon(0, 0), 100.0))
    assert at_once.locate(FRAME).estimate is not None


def test_nothing_in_range_searches_globally_and_says_so_when_that_fails_too():
    retriever = ScriptedRetriever(lambda near: [] if near else _candidates(
        [('dim', 0.0, 0.0, 0.3)]))
    localizer = Localizer(retriever, SETTINGS, prior=(*_latlon(0, 0), 50.0))
    outcome = localizer.locate(FRAME)
    assert outcome.estimate is None and outcome.mode == 'local+global'
    assert 'under min_score 0.6' in outcome.reason
    assert 'nothing indexed within 50 m' in outcome.reason
    assert localizer.anchor[2] == 50.0  # no fix: the anchor stays


def test_local_success_needs_no_global_search():
    retriever = ScriptedRetriever(lambda near: _candidates([('here', 5.0, 5.0, 0.8)]))
    localizer = Localizer(retriever, SETTINGS, prior=(*_latlon(0, 0), 50.0))
    assert localizer.locate(FRAME).mode == 'local'
    assert len(retriever.calls) == 1


def test_global_check_lets_a_clearly_better_place_outside_the_area_take_over():
    inside = [('inside', 10.0, 0.0, 0.80)]
    settings = LocalizerSettings(**{**SETTINGS.__dict__, 'global_check': True})

    def answer(near):
        return _candidates(inside if near else [('outside', 500.0, 0.0, best_outside[0])])
    best_outside = [0.84]  # within min_margin of the local best: the local answer stands
    retriever = ScriptedRetriever(answer)
    localizer = Localizer(retriever, settings, prior=(*_latlon(0, 0), 50.0))
    outcome = localizer.locate(FRAME)
    assert outcome.mode == 'local' and outcome.estimate.image_id == 'inside'
    assert [c['near'] is None for c in retriever.calls] == [False, True]
    best_outside[0] = 0.90
    outcome = localizer.locate(FRAME)
    assert outcome.mode == 'local+global' and 'awaits confirmation' in outcome.reason
    outcome = localizer.locate(FRAME)
    assert outcome.mode == 'local+global' and outcome.estimate.image_id == 'outside'


def test_the_local_radius_grows_with_the_time_since_the_last_fix():
    answers = iter([[('a', 0.0, 0.0, 0.9)], [('weak', 0.0, 0.0, 0.1)]])
    retriever = ScriptedRetriever(lambda near: _candidates(
        [('weak', 0.0, 0.0, 0.1)] if near else next(answers)))
    settings = LocalizerSettings(**{**SETTINGS.__dict__, 'radius_growth_mps': 10.0})
    localizer = Localizer(retriever, settings)
    assert localizer.locate(FRAME, stamp=100.0).estimate is not None  # global: no anchor yet
    assert localizer.search_area(103.5)[2] == pytest.approx(135.0)
    localizer.locate(FRAME, stamp=103.5)
    assert retriever.calls[1]['near'][2] == pytest.approx(135.0)
    assert localizer.search_area(None)[2] == 100.0  # without stamps it does not grow


def test_two_places_scoring_alike_are_ambiguous_but_neighbouring_tiles_are_not():
    rows = [('a', 0.0, 0.0, 0.90), ('a2', 30.0, 0.0, 0.899), ('b', 200.0, 0.0, 0.88)]
    localizer = Localizer(ScriptedRetriever(lambda near: _candidates(rows)), SETTINGS)
    outcome = localizer.locate(FRAME)
    assert outcome.estimate is None
    assert outcome.reason.startswith('ambiguous: a (0.900) and b (0.880), 200 m apart')
    assert localizer.anchor is None
    # Same scores, the rival beyond the margin: a fix, its covariance widened by the rival.
    rows[2] = ('b', 200.0, 0.0, 0.80)
    fix = localizer.locate(FRAME).estimate
    assert fix is not None and fix.margin == pytest.approx(0.10)
    assert fix.sigma_m > 30.0


def test_heading_comes_from_a_drone_photo_match():
    rows = [('photo', 0.0, 0.0, 0.9, 'drone', 135.0)]
    localizer = Localizer(ScriptedRetriever(lambda near: _candidates(rows)),
                          LocalizerSettings(platform=''))
    fix = localizer.locate(FRAME).estimate
    assert fix.heading_deg == 135.0


def test_a_heading_rectifies_the_frame_before_matching():
    retriever = ScriptedRetriever(lambda near: _candidates([('a', 0.0, 0.0, 0.9)]))
    Localizer(retriever, SETTINGS).locate(Image.new('RGB', (100, 80)), heading_deg=30.0)
    assert retriever.calls[0]['size'] == (56, 56)  # the inscribed square of the 80 px side


def test_the_anchor_is_the_median_of_recent_fixes_so_one_outlier_does_not_move_it():
    positions = iter([0.0, 4.0, 8.0, 300.0, 12.0])
    retriever = ScriptedRetriever(lambda near: _candidates([('t', next(positions), 0.0, 0.9)]))
    settings = LocalizerSettings(search_radius_m=500.0, min_score=0.5, anchor_window=5,
                                 global_check=False)
    localizer = Localizer(retriever, settings)
    for _ in range(4):
        localizer.locate(FRAME)
    assert _metres(*localizer.anchor[:2])[0] == pytest.approx(6.0, abs=0.1)  # median(0,4,8,300)
    localizer.forget()
    assert localizer.anchor is None


@pytest.mark.parametrize('change, words', [
    ({'top_k': 0}, 'top_k'), ({'search_radius_m': 0.0}, 'search_radius_m'),
    ({'min_score': 2.0}, 'cosine'), ({'min_margin': -1.0}, 'min_margin'),
    ({'anchor_window': 0}, 'anchor_window'), ({'radius_growth_mps': -1.0}, 'radius_growth'),
    ({'confirm_jumps': 0}, 'confirm_jumps')])
def test_settings_out_of_range_are_named(change, words):
    with pytest.raises(ValueError, match=words):
        LocalizerSettings(**change).check()
