"""Orientation-word removal for satellite candidates."""

from cgrs_ros.engine.query_norm import has_orientation_words, remove_orientation_words
import pytest


@pytest.mark.parametrize('query, expected', [
    ('the red roof north of the river', 'the red roof the river'),
    ('a white tower on the left side of the road', 'a white tower the road'),
    ('the northeastern corner of the park', 'the park'),
    ('a building to the north-west of the stadium', 'a building the stadium'),
    ('a church, upper right corner, next to a lake', 'a church, next to a lake'),
    ('a field in the bottom-left, with trees', 'a field, with trees'),
    ('a mill south west of the bridge', 'a mill the bridge'),
    ('head eastward along the canal', 'head along the canal'),
    ('the Top Left part of the image shows a car park', 'the image shows a car park'),
])
def test_orientation_phrases_are_removed(query, expected):
    assert remove_orientation_words(query) == expected
    assert has_orientation_words(query)


@pytest.mark.parametrize('query', [
    'a rooftop garden beside a round plaza',
    'the upper floors of a tall glass building',
    'top of the hill with a radio tower',
    'a west-facing facade with red shutters',
    'a northernmost',  # not a word we know: left alone
])
def test_descriptive_words_stay(query):
    assert remove_orientation_words(query) == query
    assert not has_orientation_words(query)


def test_a_query_of_only_orientation_words_is_kept():
    assert remove_orientation_words('north   west') == 'north west'
