"""Cross-view evaluation: AP by hand, the University-1652 / SUES-200 readers, end-to-end runs.

The dataset trees are written by the tests in the published layouts (tiny PNG files under the
datasets' own file names); the end-to-end runs use the tiny random open_clip model of
conftest, with each place's drone view a byte copy of its satellite tile so that the right
answer is known (cosine 1) whatever the random weights.
"""

import json
import shutil

from cgrs_ros.cli import main
from cgrs_ros.engine.errors import GalleryError, QueryError
from cgrs_ros.engine.evaluation.crossview import load_sues200, load_university1652
from cgrs_ros.engine.evaluation.metrics import (average_precision, evaluate_full_rankings,
                                                hit_positions)
from conftest import write_png
import numpy as np
import pytest

# ------------------------------------------------------------------ average precision by hand


def test_average_precision_of_hand_made_rankings():
    # Relevant items at positions 1, 3 and 6 of the full ranking (3 relevant in all).
    # Step i: recall grows by 1/3; precision just before the hit (i-1)/(p-1), just after i/p.
    by_hand = (1.0 + (1 / 2 + 2 / 3) / 2 + (2 / 5 + 3 / 6) / 2) / 3
    assert by_hand == pytest.approx(0.677778, abs=1e-6)
    assert average_precision([1, 3, 6]) == pytest.approx(by_hand)
    # One relevant item (one satellite tile per building): 1 at the top, else 1 / (2 p).
    assert average_precision([1]) == 1.0
    assert average_precision([4]) == pytest.approx(0.125)
    # All relevant items first: 1 whatever their number.
    assert average_precision([1, 2, 3, 4]) == pytest.approx(1.0)
    # A relevant item the list never reaches adds nothing: (0 + 1/2) / 2 of 2 relevant.
    assert average_precision([2], n_relevant=2) == pytest.approx(0.125)
    assert average_precision([]) == 0.0
    with pytest.raises(ValueError):
        average_precision([3, 2])


def test_full_ranking_recall_and_ap_from_a_score_matrix():
    gallery = ['a', 'b', 'a', 'c', 'b']
    scores = np.array([
        [0.9, 0.8, 0.1, 0.5, 0.7],   # ranking 0 1 4 3 2 -> 'a' at positions 1 and 5
        [0.9, 0.8, 0.1, 0.5, 0.8],   # tie 1/4 kept in gallery order: 0 1 4 3 2 -> 'b' at 2, 3
        [0.1, 0.2, 0.3, 0.4, 0.5],   # ranking 4 3 2 1 0 -> 'c' at 2
        [0.5, 0.5, 0.5, 0.5, 0.5],   # 'z' is in no gallery item: a miss, listed as absent
    ])
    assert list(hit_positions(scores[1], np.array(gallery) == 'b')) == [2, 3]
    result = evaluate_full_rankings(scores, ['a', 'b', 'c', 'z'], gallery, 'd2s')
    aps = [(1 + (1 / 4 + 2 / 5) / 2) / 2, ((0 + 1 / 2) / 2 + (1 / 2 + 2 / 3) / 2) / 2,
           1 / 4, 0.0]
    assert result.ap_per_query == pytest.approx(aps)
    assert result.ap == pytest.approx(100 * sum(aps) / 4)
    assert list(result.hit_ranks) == [1, 2, 2, 0] and result.absent == [3]
    metrics = result.metrics()
    assert metrics['d2s_r1'] == 25.0 and metrics['d2s_r5'] == 75.0
    assert metrics['d2s_ap'] == pytest.approx(result.ap)


# ------------------------------------------------------------------ dataset readers

def _university_tree(root, buildings=('0001', '0002', '0003'), extra_gallery=('0009',),
                     drone_views=2):
    """University-1652's test folders; drone view 1 of a building is its tile's bytes."""
    test = root / 'test'
    for b, building in enumerate(buildings + extra_gallery):
        tile = write_png(test / 'gallery_satellite' / building / f'{building}.jpg', 100 + b)
        drones = [test / 'gallery_drone' / building / f'image-{k:02d}.jpeg'
                  for k in range(1, drone_views + 1)]
        drones[0].parent.mkdir(parents=True)
        shutil.copyfile(tile, drones[0])
        for k, path in enumerate(drones[1:], start=2):
            write_png(path, 1000 + 10 * b + k)
        if building in buildings:
            shutil.copytree(tile.parent, test / 'query_satellite' / building)
            shutil.copytree(drones[0].parent, test / 'query_drone' / building)
    (test / 'query_drone' / buildings[0] / 'Thumbs.db').write_bytes(b'not an image')
    return root


def test_university1652_reader(tmp_path):
    root = _university_tree(tmp_path / 'University-Release')
    data = load_university1652(root)
    assert data.root == root / 'test'
    assert data.directions() == ['d2s', 's2d']
    assert [(i.path.name, i.group) for i in data.views['query_drone']][:2] == [
        ('image-01.jpeg', '0001'), ('image-02.jpeg', '0001')]
    assert len(data.views['query_drone']) == 6           # Thumbs.db left out
    assert {i.group for i in data.views['gallery_satellite']} == {'0001', '0002', '0003',
                                                                  '0009'}
    assert len(data.views['gallery_drone']) == 8
    assert load_university1652(root / 'test').views.keys() == data.views.keys()
    with pytest.raises(GalleryError, match='University-1652 layout'):
        load_university1652(tmp_path)


def _sues_tree(root, places=5, heights=('150', '200'), height_first=False):
    for p in range(1, places + 1):
        place = f'{p:04d}'
        tile = write_png(root / 'satellite-view' / place / '0.png', p)
        for height in heights:
            folder = (root / 'drone-view' / height / place if height_first
                      else root / 'drone-view' / place / height)
            folder.mkdir(parents=True)
            shutil.copyfile(tile, folder / '0.jpg')
            write_png(folder / '1.jpg', 50 * p + int(height))
    return root


@pytest.mark.parametrize('height_first', [False, True])
def test_sues200_reader_makes_the_published_test_split(tmp_path, height_first):
    root = _sues_tree(tmp_path / 'SUES-200-512x512', height_first=height_first)
    data = load_sues200(root, 150)
    # 5 places sorted: the first int(5 * 0.6) = 3 train, queries from 0004 and 0005.
    assert {i.group for i in data.views['query_drone']} == {'0004', '0005'}
    assert {i.group for i in data.views['query_satellite']} == {'0004', '0005'}
    assert {i.group for i in data.views['gallery_satellite']} == {f'{p:04d}' for p in
                                                                  range(1, 6)}
    folders = {i.path.parent.relative_to(root / 'drone-view').as_posix()
               for i in data.views['query_drone']}
    assert folders == ({'150/0004', '150/0005'} if height_first else {'0004/150', '0005/150'})
    assert len(data.views['gallery_drone']) == 10
    with pytest.raises(QueryError, match='height 120'):
        load_sues200(root, 120)
    with pytest.raises(GalleryError, match='no drone views at height 300'):
        load_sues200(root, 300)


def test_sues200_reader_takes_the_split_script_layout(tmp_path):
    split = tmp_path / 'Dataset' / 'Testing' / '200'
    for view, places in (('query_drone', ('0161',)), ('gallery_satellite', ('0001', '0161')),
                         ('query_satellite', ('0161',)), ('gallery_drone', ('0001', '0161'))):
        for p, place in enumerate(places):
            write_png(split / view / place / ('0.png' if 'satellite' in view else '3.jpg'), p)
    for root in (tmp_path, tmp_path / 'Dataset' / 'Testing', split):
        data = load_sues200(root, 200)
        assert data.root == split and data.directions() == ['d2s', 's2d']
        assert [i.group for i in data.views['gallery_drone']] == ['0001', '0161']


# ------------------------------------------------------------------ end to end

@pytest.fixture
def config_file(tmp_path, tiny_open_clip_dir):
    path = tmp_path / 'engine.yaml'
    path.write_text(f'image_encoder:\n  model: "local-dir:{tiny_open_clip_dir}"\n'
                    '  pretrained: null\n  threads: 1\n  batch_size: 8\ntext_encoder:\n'
                    '  threads: 1\n')
    return path


def test_cgrs_eval_university1652_reports_recall_and_ap_per_direction(tmp_path, config_file,
                                                                      capsys):
    root = _university_tree(tmp_path / 'U1652')
    report_path = tmp_path / 'report.json'
    assert main(['eval', 'university1652', str(root), '--config', str(config_file),
                 '--state-dir', str(tmp_path / 'work'), '--json', '--report',
                 str(report_path)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report == json.loads(report_path.read_text())
    assert report['benchmark'] == 'university1652' and report['query_kind'] == 'image'
    metrics = report['methods']['image']['metrics']
    assert set(metrics) == {f'{d}_{m}' for d in ('d2s', 's2d')
                            for m in ('r1', 'r5', 'r10', 'ap')}
    # d2s: 6 drone queries, 4 tiles; image-01 of each building is its tile (cosine 1).
    assert report['methods']['image']['by_direction'] == {
        'd2s': {'n_queries': 6, 'n_absent': 0, 'gallery_images': 4},
        's2d': {'n_queries': 3, 'n_absent': 0, 'gallery_images': 8}}
    assert metrics['d2s_r10'] == 100.0 and metrics['d2s_r1'] >= 50.0
    # s2d: each tile finds its byte copy first; the second drone view lands anywhere.
    assert metrics['s2d_r1'] == 100.0 and 50.0 < metrics['s2d_ap'] <= 100.0
    assert report['engine_check'] == {'d2s': {'top_k': 4, 'same_ranking': True},
                                      's2d': {'top_k': 8, 'same_ranking': True}}
    assert report['counts']['gallery_images'] == 12 and report['counts']['groups'] == 4
    assert set(report['methods']['image']['latency_ms']) == {'encode', 'coarse', 'total'}

    # Human-readable table, one direction, a second run reusing the index.
    assert main(['eval', 'university1652', str(root), '--config', str(config_file),
                 '--state-dir', str(tmp_path / 'work'), '--direction', 's2d', '--limit',
                 '2']) == 0
    out = capsys.readouterr().out
    assert 's2d_r1' in out and 's2d_ap' in out and 'd2s_r1' not in out


def test_cgrs_eval_sues200_at_one_height(tmp_path, config_file, capsys):
    root = _sues_tree(tmp_path / 'SUES-200')
    assert main(['eval', 'sues200', str(root), '--height', '150', '--config',
                 str(config_file), '--state-dir', str(tmp_path / 'work'), '--json']) == 0
    report = json.loads(capsys.readouterr().out)
    assert report['inputs']['height_m'] == 150
    by_direction = report['methods']['image']['by_direction']
    assert by_direction['d2s'] == {'n_queries': 4, 'n_absent': 0, 'gallery_images': 5}
    assert by_direction['s2d'] == {'n_queries': 2, 'n_absent': 0, 'gallery_images': 10}
    assert report['methods']['image']['metrics']['s2d_r1'] == 100.0
    assert any('split' in note for note in report['notes'])


def test_cgrs_eval_gallery_image_queries(tmp_path, config_file, capsys):
    gallery = tmp_path / 'town'
    rows = ['image_id,path,lat,lon,alt,heading_deg,platform,group_id,description']
    for p in range(4):
        tile = write_png(gallery / 'images' / f'p{p}_sat.png', p)
        shutil.copyfile(tile, gallery / 'images' / f'p{p}_drone1.png')
        write_png(gallery / 'images' / f'p{p}_drone2.png', 40 + p)
        for name, platform in (('sat', 'satellite'), ('drone1', 'drone'), ('drone2', 'drone')):
            rows.append(f'p{p}_{name},images/p{p}_{name}.png,{47 + p / 1000},8,400,0,'
                        f'{platform},p{p},')
    rows.append('lone,images/p0_drone2.png,47,8,400,0,drone,,')  # no group: not a query
    (gallery / 'gallery.csv').write_text('\n'.join(rows) + '\n')
    assert main(['eval', 'gallery', str(gallery), '--image-queries', '--config',
                 str(config_file), '--json']) == 0
    report = json.loads(capsys.readouterr().out)
    assert report['benchmark'] == 'gallery'
    assert report['inputs']['from'] == 'drone' and report['inputs']['to'] == 'satellite'
    entry = report['methods']['image']
    assert entry['by_direction'] == {'d2s': {'n_queries': 8, 'n_absent': 0,
                                             'gallery_images': 4}}
    assert entry['metrics']['d2s_r1'] >= 50.0 and entry['metrics']['d2s_r10'] == 100.0

    assert main(['eval', 'gallery', str(gallery), '--image-queries', '--from', 'satellite',
                 '--to', 'drone', '--config', str(config_file), '--json']) == 0
    entry = json.loads(capsys.readouterr().out)['methods']['image']
    assert entry['metrics']['s2d_r1'] == 100.0


def test_eval_argument_mistakes_are_one_line_exit_2(tmp_path, config_file, capsys):
    for argv in (['gallery', str(tmp_path)],
                 ['gallery', str(tmp_path), '--queries', 'q.csv', '--image-queries'],
                 ['gallery', str(tmp_path), '--from', 'drone'],
                 ['university1652', str(tmp_path), '--config', str(config_file)]):
        assert main(['eval'] + argv) == 2
        err = capsys.readouterr().err
        assert err.startswith('cgrs eval: error: ') and len(err.strip().splitlines()) == 1
