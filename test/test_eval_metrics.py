"""Recall@K on hand-made score matrices whose answers are worked out by hand."""

from cgrs_ros.engine.evaluation import metrics
from cgrs_ros.engine.evaluation.metrics import (
    evaluate_ranked_ids, first_hit_ranks, i2t_from_scores, metric_name, recall_curve,
    stable_ranking, t2i_from_scores, track4_score)
import numpy as np
import pytest

# Gallery of 5 images: building A has images 0 and 1, B has 2 and 3, C has one image (4).
GALLERY_GROUPS = ['A', 'A', 'B', 'B', 'C']


def test_stable_ranking_breaks_ties_by_gallery_position_and_puts_nan_last():
    scores = np.array([[0.5, 0.9, 0.5, np.nan, 0.9]])
    assert stable_ranking(scores).tolist() == [[1, 4, 0, 2, 3]]
    assert stable_ranking(scores, top_k=2).tolist() == [[1, 4]]


def test_t2i_recall_with_known_answers():
    scores = np.array([
        # query 0 (A): best is image 2 (B), then image 0 (A) -> first hit at rank 2
        [0.8, 0.1, 0.9, 0.2, 0.0],
        # query 1 (C, single-image building): image 4 is ranked first -> rank 1
        [0.1, 0.2, 0.3, 0.4, 0.5],
        # query 2 (B): B images are last -> rank 4
        [0.9, 0.8, 0.1, 0.0, 0.7],
        # query 3 (D): building D is not in the gallery -> absent, a miss
        [0.9, 0.8, 0.7, 0.6, 0.5],
    ])
    result = t2i_from_scores(scores, ['A', 'C', 'B', 'D'], GALLERY_GROUPS, max_k=5)
    assert result.hit_ranks.tolist() == [2, 1, 4, 0]
    assert result.absent == [3]
    assert result.curve == [25.0, 50.0, 50.0, 75.0, 75.0]
    assert result.metrics(ks=(1, 5)) == {'t2i_r1': 25.0, 't2i_r5': 75.0}


def test_ties_resolve_to_the_lower_gallery_index():
    # Every image scores the same: the stable order is 0, 1, 2, 3, 4.
    scores = np.zeros((3, 5))
    result = t2i_from_scores(scores, ['A', 'B', 'C'], GALLERY_GROUPS, max_k=5)
    assert result.hit_ranks.tolist() == [1, 3, 5]
    # Reversing the gallery reverses the outcome: ties are decided by position, not luck.
    reversed_result = t2i_from_scores(scores, ['A', 'B', 'C'], GALLERY_GROUPS[::-1], max_k=5)
    assert reversed_result.hit_ranks.tolist() == [4, 2, 1]


def test_every_image_carries_its_own_building_id():
    # The official GeoText script gives the first image of each building the previous
    # building's id. Here image 2 (first of B) must count for B and never for A.
    scores = np.array([[0.0, 0.0, 1.0, 0.0, 0.0]] * 2)
    result = t2i_from_scores(scores, ['B', 'A'], GALLERY_GROUPS, max_k=1)
    assert result.hit_ranks.tolist() == [1, 0]


def test_i2t_reads_the_same_matrix_column_wise():
    # texts x images; text groups A, B; images A, B, C.
    scores = np.array([[0.9, 0.1, 0.5],
                       [0.2, 0.8, 0.6]])
    result = i2t_from_scores(scores, ['A', 'B'], ['A', 'B', 'C'], max_k=2)
    assert result.direction == 'i2t'
    # image A: text 0 (A) first; image B: text 1 (B) first; image C: no text of C -> absent.
    assert result.hit_ranks.tolist() == [1, 1, 0]
    assert result.absent == [2]
    assert result.metrics(ks=(1,)) == {'i2t_r1': pytest.approx(200 / 3)}


def test_per_platform_breakdown_counts_each_query_once():
    scores = np.array([[1.0, 0, 0, 0, 0],
                       [0, 0, 0, 0, 1.0],
                       [1.0, 0, 0, 0, 0]])
    result = t2i_from_scores(scores, ['A', 'C', 'B'], GALLERY_GROUPS, max_k=1,
                             text_platforms=['drone', 'satellite', None])
    assert sorted(result.by_platform) == ['drone', 'satellite', 'unknown']
    assert result.by_platform['drone'].curve == [100.0]
    assert result.by_platform['satellite'].curve == [100.0]
    assert result.by_platform['unknown'].curve == [0.0]
    summary = result.summary(ks=(1,))
    assert summary['by_platform']['unknown'] == {'n_queries': 1, 'n_absent': 0, 't2i_r1': 0.0}


def test_ranked_ids_with_several_relevant_images_and_short_lists():
    label_of = {f'image_{i}': f'image_{i}' for i in range(4)}
    ranked = [['image_3', 'image_1'], ['image_0', 'image_2'], ['image_2']]
    relevant = [{'image_1', 'image_0'}, {'image_9'}, {'image_2'}]
    result = evaluate_ranked_ids(ranked, relevant, label_of, max_k=3)
    assert result.hit_ranks.tolist() == [2, 0, 1]
    assert result.absent == [1]
    assert result.shortest_list == 1
    assert result.summary(ks=(1,))['shortest_list'] == 1
    with pytest.raises(ValueError, match='image_7'):
        evaluate_ranked_ids([['image_7']], [{'image_1'}], label_of)


def test_track4_score_is_the_mean_of_r1_and_r10():
    result = metrics.evaluate_ranked_labels(
        [['a'] + ['x'] * 9, ['x'] * 9 + ['b'], ['x'] * 10, ['x'] * 10],
        ['a', 'b', 'c', 'd'], ['a', 'b', 'c', 'd', 'x'])
    assert result.recall(1) == 25.0
    assert result.recall(10) == 50.0
    assert track4_score(result) == 37.5


def test_helpers_reject_bad_input():
    with pytest.raises(ValueError):
        metric_name('txt', 1)
    with pytest.raises(ValueError):
        t2i_from_scores(np.zeros((2, 3)), ['A'], ['A', 'B', 'C'])
    with pytest.raises(ValueError):
        first_hit_ranks([['a']], ['a', 'b'])
    assert recall_curve([], max_k=3) == [0.0, 0.0, 0.0]
    assert metrics.latency_summary([]) == {'n': 0, 'mean': None, 'p50': None, 'p95': None,
                                           'max': None}
    stats = metrics.latency_summary([1.0, 2.0, 3.0, 4.0])
    assert stats['p50'] == 2.5 and stats['mean'] == 2.5 and stats['max'] == 4.0
