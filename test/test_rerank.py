"""Fusion maths on hand-computed numbers."""

import math

from cgrs_ros.engine.rerank import fuse, fuse_rrf, fuse_weighted, minmax, ranks_desc
import numpy as np
import pytest

NAN = float('nan')


def test_minmax_over_the_candidate_set():
    assert minmax([0.2, 0.3, 0.25]).tolist() == pytest.approx([0.0, 1.0, 0.5])
    assert minmax([0.4, 0.4]).tolist() == [1.0, 1.0]  # no preference: everyone gets full marks
    out = minmax([0.1, NAN, 0.3])
    assert out[0] == 0.0 and math.isnan(out[1]) and out[2] == 1.0


def test_ranks_are_one_based_and_ties_share_the_better_rank():
    assert ranks_desc([0.1, 0.9, 0.5, 0.9]).tolist() == [4, 1, 3, 1]
    out = ranks_desc([0.2, NAN, 0.7])
    assert out[0] == 2 and math.isnan(out[1]) and out[2] == 1


def test_weighted_fusion_by_hand():
    coarse = [0.30, 0.20, 0.25]   # normalized: 1, 0, 0.5
    caption = [0.10, 0.50, 0.40]  # normalized: 0, 1, 0.75
    fused = fuse_weighted(coarse, caption, caption_weight=0.5)
    assert fused.tolist() == pytest.approx([0.5, 0.5, 0.625])
    fused = fuse_weighted(coarse, caption, caption_weight=0.8)
    assert fused.tolist() == pytest.approx([0.2, 0.8, 0.7])
    # A missing caption counts as the caption channel's minimum.
    fused = fuse_weighted(coarse, [0.10, NAN, 0.40], caption_weight=0.5)
    assert fused.tolist() == pytest.approx([0.5, 0.0, 0.75])


def test_rrf_by_hand():
    coarse = [0.30, 0.20, 0.25]   # ranks 1, 3, 2
    caption = [0.10, 0.50, 0.40]  # ranks 3, 1, 2
    fused = fuse_rrf(coarse, caption, caption_weight=0.5, k=60)
    expected = [0.5 / 61 + 0.5 / 63, 0.5 / 63 + 0.5 / 61, 0.5 / 62 + 0.5 / 62]
    assert fused.tolist() == pytest.approx(expected)
    # At w = 0.5 the order is the textbook RRF order (sum of 1 / (k + rank)).
    textbook = [1 / 61 + 1 / 63, 1 / 63 + 1 / 61, 2 / 62]
    assert np.argsort(fused).tolist() == np.argsort(textbook).tolist()
    # A missing score contributes nothing.
    fused = fuse_rrf(coarse, [0.10, NAN, 0.40], caption_weight=0.25, k=10)
    assert fused.tolist() == pytest.approx([0.75 / 11 + 0.25 / 12, 0.75 / 13,
                                            0.75 / 12 + 0.25 / 11])


def test_fusion_can_reorder_the_coarse_list():
    coarse = [0.31, 0.30, 0.10]
    caption = [0.20, 0.70, 0.30]
    for method in ('weighted', 'rrf'):
        order = np.argsort(-fuse(coarse, caption, method, caption_weight=0.6)).tolist()
        assert order[0] == 1, method


def test_single_channel_passes_raw_scores_through():
    assert fuse([0.3, 0.1], None).tolist() == [0.3, 0.1]
    assert fuse(None, [0.2, 0.4], 'rrf').tolist() == [0.2, 0.4]
    with pytest.raises(ValueError):
        fuse(None, None)
    with pytest.raises(ValueError, match='unknown fusion'):
        fuse([0.1], [0.2], 'max')
