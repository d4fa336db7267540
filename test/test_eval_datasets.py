"""Benchmark file readers and writers on small files written in the published formats."""

import json

from cgrs_ros.engine.errors import GalleryError, QueryError
from cgrs_ros.engine.evaluation import datasets
import pytest


def _geotext_entries():
    # Same field layout as the published GeoText-1652 test JSON (caption is a list in test,
    # a string in train; sentences and bboxes are box-level and not used as queries).
    return [
        {'image_id': '0839/image-43.jpeg', 'image': 'test/0839/image-43.jpeg',
         'caption': ['A large office building with a flat roof.', 'A grey block by a road.'],
         'sentences': ['The object in the center is a building.'],
         'bboxes': [[0.4, 0.6, 0.3, 0.6]]},
        {'image_id': '0839/0839.jpg', 'image': 'test/0839/0839.jpg',
         'caption': 'Satellite view of a flat roof beside a parking lot.',
         'sentences': [], 'bboxes': []},
        {'image_id': '0840/3.jpg', 'image': 'test/0840/3.jpg',
         'caption': ['A street view of a red brick hall.'], 'sentences': [], 'bboxes': []},
        {'image_id': '0840/image-01.jpeg', 'image': 'test/0840/image-01.jpeg',
         'caption': [], 'sentences': [], 'bboxes': []},
        {'image_id': 'x', 'caption': 'too short an id'},
        'not an object',
    ]


def test_geotext_parser_reads_the_published_format(tmp_path):
    ann = tmp_path / 'test.json'
    ann.write_text(json.dumps(_geotext_entries()))
    data = datasets.load_geotext(ann)
    assert data.name == 'geotext' and data.hit_level == 'group'
    # one query per caption, from entries with captions only
    assert [q.text for q in data.queries] == [
        'A large office building with a flat roof.', 'A grey block by a road.',
        'Satellite view of a flat roof beside a parking lot.',
        'A street view of a red brick hall.']
    assert [q.query_id for q in data.queries][:2] == ['0839/image-43.jpeg#0',
                                                      '0839/image-43.jpeg#1']
    assert [sorted(q.relevant) for q in data.queries] == [['0839'], ['0839'], ['0839'],
                                                          ['0840']]
    assert [q.platform for q in data.queries] == ['drone', 'drone', 'satellite', 'ground']
    assert [(i.image_id, i.group_id, i.platform) for i in data.images] == [
        ('0839/image-43.jpeg', '0839', 'drone'), ('0839/0839.jpg', '0839', 'satellite'),
        ('0840/3.jpg', '0840', 'ground')]
    # the caption-less image, the short id and the non-object are skipped with a reason
    assert len(data.problems) == 3
    assert any('0840/image-01.jpeg' in p for p in data.problems)


def test_geotext_platform_from_file_name():
    assert datasets.geotext_platform('0001/image-07.jpeg', '0001') == 'drone'
    assert datasets.geotext_platform('0001/0001.jpg', '0001') == 'satellite'
    assert datasets.geotext_platform('0001/12.jpg', '0001') == 'ground'
    assert datasets.geotext_platform('0001/other.png', '0001') is None


def test_geotext_images_resolve_with_or_without_the_split_prefix(tmp_path):
    image = datasets.EvalImage('0839/image-43.jpeg', 'test/0839/image-43.jpeg', 'drone', '0839')
    (tmp_path / '0839').mkdir()
    (tmp_path / '0839' / 'image-43.jpeg').write_bytes(b'x')
    assert datasets.resolve_geotext_image(tmp_path, image) == tmp_path / '0839/image-43.jpeg'
    assert datasets.resolve_geotext_image(tmp_path / 'nowhere', image) is None


def test_geotext_parser_errors_name_the_file(tmp_path):
    with pytest.raises(GalleryError, match='does not exist'):
        datasets.load_geotext(tmp_path / 'missing.json')
    bad = tmp_path / 'bad.json'
    bad.write_text('{"image_id": 1}')
    with pytest.raises(GalleryError, match='not the list'):
        datasets.load_geotext(bad)
    bad.write_text('[{"image_id": "0001/1.jpg", "caption": []}]')
    with pytest.raises(GalleryError, match='no usable entry'):
        datasets.load_geotext(bad)


def _track4_files(tmp_path):
    gallery = tmp_path / 'Track_4_Images'
    gallery.mkdir()
    ids = ['image_0a0bb9e5', 'image_7e591aa3', 'image_df1ee1e1']
    for image_id in ids:
        (gallery / f'{image_id}.jpeg').write_bytes(b'jpeg')
    (gallery / 'notes.txt').write_text('not an image')
    queries = tmp_path / 'test_queries.txt'
    queries.write_text('q_00001\tA large historic campus building.\n'
                       'q_00002\tA building with a white roof.\n\n'
                       'q_00010\tA college campus with trees.\n')
    gt = tmp_path / 'gt.txt'
    gt.write_text('q_00001\timage_7e591aa3\n'
                  'q_00002\timage_0a0bb9e5 image_df1ee1e1.jpeg\n')
    return gallery, queries, gt, ids


def test_track4_round_trip(tmp_path):
    gallery, queries, gt, ids = _track4_files(tmp_path)
    data = datasets.load_track4(queries, gallery, gt)
    assert data.hit_level == 'image'
    assert [q.query_id for q in data.queries] == ['q_00001', 'q_00002', 'q_00010']
    assert [i.image_id for i in data.images] == sorted(ids)
    assert data.queries[1].relevant == frozenset({'image_0a0bb9e5', 'image_df1ee1e1'})
    # q_00010 has no ground-truth line: scored as a miss and reported
    assert data.queries[2].relevant == frozenset()
    assert any('q_00010' in p for p in data.problems)

    rankings = [(q.query_id, [f'{i}.jpeg' for i in ids] * 4) for q in data.queries]
    out = tmp_path / 'submission.txt'
    assert datasets.write_track4_submission(out, rankings) == 3
    lines = out.read_text().splitlines()
    # official format: q1 then exactly ten ids without the extension, space separated
    assert lines[0].split()[0] == 'q1' and lines[2].split()[0] == 'q10'
    assert {len(line.split()) for line in lines} == {11}
    assert lines[0].split()[1:4] == ids
    assert '.jpeg' not in out.read_text()
    back = datasets.read_track4_submission(out)
    assert list(back) == ['q1', 'q2', 'q10']
    assert back['q2'] == (ids * 4)[:10]


def test_track4_query_ids_map_like_the_official_script():
    assert datasets.submission_query_id('q_00001') == 'q1'
    assert datasets.submission_query_id('q_00120') == 'q120'
    assert datasets.submission_query_id('q7') == 'q7'
    with pytest.raises(QueryError):
        datasets.submission_query_id('query1')


def test_track4_malformed_files_raise_with_the_line(tmp_path):
    bad = tmp_path / 'q.txt'
    bad.write_text('q_00001 text with a space instead of a tab\n')
    with pytest.raises(QueryError, match='line 1'):
        datasets.read_track4_queries(bad)
    bad.write_text('q_00001\tone\nq_0001\ttwo\n')
    with pytest.raises(QueryError, match='repeats'):
        datasets.read_track4_queries(bad)
    bad.write_text('q_00001\n')
    with pytest.raises(QueryError, match='line 1'):
        datasets.read_track4_ground_truth(bad)
    with pytest.raises(GalleryError, match='no images'):
        datasets.list_track4_gallery(tmp_path)


def test_gallery_query_csv(tmp_path):
    path = tmp_path / 'queries.csv'
    path.write_text('query,group_id,platform\n'
                    'the red-roofed hall by the plaza,b01,drone\n'
                    '"the tower, north of the river",b02,\n'
                    ',b03,\n')
    data = datasets.read_gallery_queries(path)
    assert [q.text for q in data.queries] == ['the red-roofed hall by the plaza',
                                              'the tower, north of the river']
    assert [q.relevant for q in data.queries] == [frozenset({'b01'}), frozenset({'b02'})]
    assert [q.platform for q in data.queries] == ['drone', None]
    assert len(data.problems) == 1 and 'line 4' in data.problems[0]
    path.write_text('text,place\nx,y\n')
    with pytest.raises(QueryError, match='group_id'):
        datasets.read_gallery_queries(path)
