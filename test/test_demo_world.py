"""The demo world: deterministic bytes, a valid manifest, words that match the pixels."""

import csv
import json
from pathlib import Path

from cgrs_ros.cli import main
from cgrs_ros.engine.demo import DEFAULT_DATUM, DEFAULT_DRONE_VIEWS, DEFAULT_SIZE
from cgrs_ros.engine.demo.world import ROOF_COLOURS
from cgrs_ros.engine.demo_world import generate_demo_world
from cgrs_ros.engine.errors import GalleryError
from cgrs_ros.engine.gallery import load_gallery
from cgrs_ros.engine.geo import Datum, geodetic_to_enu
import numpy as np
from PIL import Image
import pytest

SIZE = 12


def _files(root):
    return {str(p.relative_to(root)): p.read_bytes()
            for p in sorted(Path(root).rglob('*')) if p.is_file()}


@pytest.fixture(scope='module')
def worlds(tmp_path_factory):
    """Two runs with seed 3 and one with seed 4, small enough to be quick."""
    base = tmp_path_factory.mktemp('demo')
    out = {}
    for name, seed in (('a', 3), ('b', 3), ('c', 4)):
        summary = generate_demo_world(base / name, seed=seed, size=SIZE)
        out[name] = (base / name, summary)
    return out


def test_same_seed_gives_byte_identical_gallery(worlds):
    a, b = _files(worlds['a'][0]), _files(worlds['b'][0])
    assert sorted(a) == sorted(b)
    assert len([k for k in a if k.endswith('.png')]) == SIZE * (1 + DEFAULT_DRONE_VIEWS)
    for name in a:
        assert a[name] == b[name], f'{name} differs between two runs with the same seed'


def test_other_seed_gives_another_world(worlds):
    a, c = _files(worlds['a'][0]), _files(worlds['c'][0])
    assert a['gallery.csv'] != c['gallery.csv']
    differing = [k for k in a if k.endswith('.png') and a[k] != c.get(k)]
    assert len(differing) == SIZE * (1 + DEFAULT_DRONE_VIEWS)


def test_manifest_loads_cleanly_with_expected_content(worlds):
    root, summary = worlds['a']
    gallery = load_gallery(root)
    assert gallery.problems == []
    assert len(gallery) == summary.images == SIZE * (1 + DEFAULT_DRONE_VIEWS)
    groups = {}
    for item in gallery:
        groups.setdefault(item.group_id, []).append(item)
        assert len(item.descriptions) == 3 and len(set(item.descriptions)) == 3
        assert all(len(text.split()) >= 4 for text in item.descriptions)
        with Image.open(gallery.path_of(item)) as image:
            assert image.size == (256, 256) and image.mode == 'RGB'
        e, n, _ = geodetic_to_enu(item.lat, item.lon, item.alt, DEFAULT_DATUM)
        assert abs(e) < summary.side_m / 2 and abs(n) < summary.side_m / 2
        assert item.alt == DEFAULT_DATUM.alt
    assert len(groups) == SIZE
    for members in groups.values():
        platforms = sorted(item.platform for item in members)
        assert platforms == ['drone'] * DEFAULT_DRONE_VIEWS + ['satellite']
        sat = [item for item in members if item.platform == 'satellite'][0]
        assert sat.heading_deg == 0.0
    headings = {item.heading_deg for item in gallery if item.platform == 'drone'}
    assert len(headings) > SIZE  # drone views look in varied directions


def test_world_json_places_match_the_manifest(worlds):
    root, _ = worlds['a']
    world = json.loads((root / 'world.json').read_text())
    assert world['seed'] == 3 and world['size'] == SIZE
    assert Datum(**world['datum']) == DEFAULT_DATUM
    gallery = load_gallery(root)
    for place in world['places']:
        members = [item for item in gallery if item.group_id == place['group_id']]
        # Drone views are centred on the place; the satellite tile within a few metres.
        for item in members:
            e, n, _ = geodetic_to_enu(item.lat, item.lon, item.alt, DEFAULT_DATUM)
            limit = 12.0 if item.platform == 'satellite' else 0.01
            assert np.hypot(e - place['e'], n - place['n']) < limit


def test_default_world_is_big_enough():
    assert DEFAULT_SIZE >= 150  # at least 150 satellite tiles by default (one per place)
    assert DEFAULT_DRONE_VIEWS >= 1


SHAPE_WORDS = {'rectangular': ('rectangular', 'box-like'), 'L-shaped': ('L-shaped',),
               'circular': ('circular', 'round'), 'courtyard': ('courtyard',)}


def _satellite(gallery, group):
    return [i for i in gallery if i.group_id == group and i.platform == 'satellite'][0]


def test_descriptions_name_what_was_drawn(worlds):
    root, _ = worlds['a']
    gallery = load_gallery(root)
    places = json.loads((root / 'world.json').read_text())['places']
    kinds = set()
    for place in places:
        attrs = place['attributes']
        kinds.add(place['kind'])
        for item in [i for i in gallery if i.group_id == place['group_id']]:
            first = item.descriptions[0]
            text = ' '.join(item.descriptions)
            if place['kind'] in ('building', 'house'):
                assert attrs['colour'] in first, (attrs, first)
                assert any(w in first for w in SHAPE_WORDS[attrs['shape']]), (attrs, first)
                if attrs.get('pool'):
                    assert 'swimming pool' in first
                if attrs.get('solar'):
                    assert 'solar panels' in first
            elif place['kind'] == 'pond':
                assert 'pond' in first and attrs['shape'] in first
            elif place['kind'] == 'roundabout':
                assert 'roundabout' in first
            elif place['kind'] == 'bridge':
                assert 'bridge' in text and 'river' in text
            elif place['kind'] == 'tennis courts':
                assert attrs['colour'] in first and 'tennis court' in first
            elif place['kind'] == 'football pitch':
                assert ('running track' in first) == attrs['track']
            elif place['kind'] == 'plaza':
                assert attrs['paving'] in first
            elif place['kind'] == 'parking':
                assert f'about {attrs["cars"]} cars' in first or 'cars' in first
    assert len(kinds) >= 4  # even a small world mixes kinds of places


def test_roof_colour_in_description_is_in_the_pixels(worlds):
    """The named roof colour really is painted where the place is in the satellite tile."""
    root, _ = worlds['a']
    gallery = load_gallery(root)
    places = json.loads((root / 'world.json').read_text())['places']
    checked = 0
    for place in places:
        if place['kind'] not in ('building', 'house'):
            continue
        item = _satellite(gallery, place['group_id'])
        e, n, _ = geodetic_to_enu(item.lat, item.lon, item.alt, DEFAULT_DATUM)
        # 0.5 m per pixel, north up: the place's centre relative to the tile's centre.
        px = 128 + (place['e'] - e) / 0.5
        py = 128 - (place['n'] - n) / 0.5
        rgb = np.asarray(Image.open(gallery.path_of(item)), dtype=float)
        yy, xx = np.mgrid[0:256, 0:256]
        near = np.hypot(xx - px, yy - py) <= place['radius_m'] / 0.5
        base = np.array(ROOF_COLOURS[place['attributes']['colour']], dtype=float)
        # Gabled roofs are drawn with a lit and a shaded plane.
        shades = [base, np.minimum(255, base * 1.1 + 6), base * 0.8]
        dist = np.min([np.linalg.norm(rgb[near] - s, axis=1) for s in shades], axis=0)
        assert (dist < 25).sum() >= 20, place
        checked += 1
    assert checked >= 3


def test_queries_are_held_out_phrasings(worlds):
    root, _ = worlds['a']
    with open(root / 'queries.csv', newline='') as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == ['query', 'group_id']
        rows = list(reader)
    gallery = load_gallery(root)
    descriptions = {d.lower().rstrip('.') for item in gallery for d in item.descriptions}
    assert {row['group_id'] for row in rows} == {item.group_id for item in gallery}
    for row in rows:
        assert row['query'].lower().rstrip('.') not in descriptions
        assert len(row['query'].split()) >= 4


def test_cli_demo_refuses_to_overwrite_without_force(tmp_path, capsys):
    out = tmp_path / 'g'
    assert main(['gallery', 'demo', str(out), '--size', '3', '--seed', '9',
                 '--drone-views', '1']) == 0
    assert 'wrote 6 images of 3 places' in capsys.readouterr().out
    assert main(['gallery', 'demo', str(out), '--size', '3']) == 2
    assert '--force' in capsys.readouterr().err
    assert main(['gallery', 'demo', str(out), '--size', '2', '--force', '--datum', '-33.86',
                 '151.21', '5']) == 0
    gallery = load_gallery(out)
    # The smaller run replaced the larger one; no stale images were left behind.
    assert len(gallery) == 6 and len(list((out / 'images').iterdir())) == 6
    assert all(abs(item.lat + 33.86) < 0.02 for item in gallery)


def test_bad_size_is_a_user_error(tmp_path):
    with pytest.raises(GalleryError, match='--size'):
        generate_demo_world(tmp_path / 'x', size=0)
