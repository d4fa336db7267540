"""Gallery manifests: every bad row is reported with its line and the rest still loads."""

import json

from cgrs_ros.engine.errors import GalleryError
from cgrs_ros.engine.gallery import GalleryItem, load_gallery, write_manifest
import pytest

HEADER = 'image_id,path,lat,lon,alt,heading_deg,platform,group_id,description\n'


@pytest.fixture
def gallery_dir(tmp_path, make_png):
    for i in range(3):
        make_png(tmp_path / 'img' / f'{i}.png', i)
    (tmp_path / 'img' / 'junk.png').write_bytes(b'this is not an image at all')
    return tmp_path


def _problems(gallery):
    return {p.line: p.message for p in gallery.problems}


def test_bad_rows_are_reported_with_line_numbers_and_the_rest_loads(gallery_dir):
    (gallery_dir / 'gallery.csv').write_text(
        HEADER
        + 'a,img/0.png,47.1,8.5,410,90,satellite,g1,red roof || next to a plaza\n'   # 2 ok
        + 'b,img/missing.png,47.1,8.5,410,0,drone,g1,\n'                              # 3
        + 'c,img/junk.png,47.1,8.5,410,0,drone,g1,\n'                                 # 4
        + 'd,img/1.png,91.0,8.5,410,0,drone,g1,\n'                                    # 5
        + 'e,img/1.png,47.0,-181,410,0,drone,g1,\n'                                   # 6
        + 'a,img/1.png,47.0,8.5,410,0,drone,g1,\n'                                    # 7
        + 'f,../outside.png,47.0,8.5,410,0,drone,g1,\n'                               # 8
        + 'g,/etc/passwd,47.0,8.5,410,0,drone,g1,\n'                                  # 9
        + 'h,img/1.png,47.0,8.5,410,0,boat,g1,\n'                                     # 10
        + 'i,img/1.png,north,8.5,410,0,drone,g1,\n'                                   # 11
        + 'j,img/2.png,-33.9,151.2,,,Ground,,"a kiosk, by the sea"\n'                # 12 ok
        + '\n'                                                                        # 13
        + 'k,img/2.png,1,2,0,0,drone,,"two\nlines"\n'                                  # 14-15
        + 'l,img/2.png,1,2,0,0,drone,,\n'                                             # 16
        + 'k,img/2.png,1,2,0,0,drone,,\n')                                            # 17
    gallery = load_gallery(gallery_dir)
    assert [item.image_id for item in gallery.items] == ['a', 'j', 'k', 'l']
    problems = _problems(gallery)
    assert sorted(problems) == list(range(3, 12)) + [17]
    assert 'first used on line 14' in problems[17]  # lines count blank and multi-line rows
    assert 'not found' in problems[3] and 'img/missing.png' in problems[3]
    assert 'not a readable image' in problems[4]
    assert 'lat 91.0 is out of range' in problems[5]
    assert 'lon -181.0 is out of range' in problems[6]
    assert 'duplicate image_id (first used on line 2)' in problems[7]
    assert 'outside the gallery folder' in problems[8]
    assert 'outside the gallery folder' in problems[9]
    assert "platform 'boat' is not one of" in problems[10]
    assert "lat 'north' is not a number" in problems[11]
    assert str(gallery.problems[0]).startswith("line 3 (image_id 'b'): ")

    first, last = gallery.items[:2]
    assert first.descriptions == ('red roof', 'next to a plaza')
    assert (first.lat, first.lon, first.alt, first.heading_deg) == (47.1, 8.5, 410.0, 90.0)
    assert first.group_id == 'g1' and first.line == 2
    assert gallery.path_of(first) == gallery_dir / 'img' / '0.png'
    # Optional columns default: alt 0, heading 0, no group; platform is case-insensitive.
    assert (last.alt, last.heading_deg, last.group_id) == (0.0, 0.0, None)
    assert last.platform == 'ground'
    assert last.descriptions == ('a kiosk, by the sea',)


def test_jsonl_manifest_with_description_lists(gallery_dir):
    rows = [
        {'image_id': 'a', 'path': 'img/0.png', 'lat': 1, 'lon': 2, 'platform': 'drone',
         'description': ['one', 'two']},
        'not json',
        {'image_id': 'b', 'path': 'img/1.png', 'lat': 1, 'lon': 2, 'platform': 'drone',
         'heading_deg': 370},
    ]
    (gallery_dir / 'gallery.jsonl').write_text(
        '\n'.join(r if isinstance(r, str) else json.dumps(r) for r in rows) + '\n')
    gallery = load_gallery(gallery_dir)
    assert [i.image_id for i in gallery.items] == ['a', 'b']
    assert gallery.items[0].descriptions == ('one', 'two')
    assert gallery.items[1].heading_deg == 10.0  # wrapped into [0, 360)
    assert gallery.problems[0].line == 2 and 'not valid JSON' in gallery.problems[0].message


def test_missing_manifest_or_columns_is_one_clear_error(tmp_path):
    with pytest.raises(GalleryError, match='no gallery.csv or gallery.jsonl'):
        load_gallery(tmp_path)
    with pytest.raises(GalleryError, match='does not exist'):
        load_gallery(tmp_path / 'nope')
    (tmp_path / 'gallery.csv').write_text('image_id,path,lat\n')
    with pytest.raises(GalleryError, match='lacks column.*lon, platform'):
        load_gallery(tmp_path)


def test_image_checks_can_be_relaxed_for_readers(gallery_dir):
    (gallery_dir / 'gallery.csv').write_text(
        HEADER + 'a,img/junk.png,1,2,0,0,drone,,\n' + 'b,img/gone.png,1,2,0,0,drone,,\n')
    assert [i.image_id for i in load_gallery(gallery_dir, check_images='exists').items] == ['a']
    assert len(load_gallery(gallery_dir, check_images='none').items) == 2


def test_write_manifest_round_trip(gallery_dir):
    items = [
        GalleryItem('x', 'img/0.png', 47.123456789, 8.5, 400.25, 271.5, 'drone', 'b7',
                    ('red roof', 'beside a "round" plaza, south')),
        GalleryItem('y', 'img/1.png', -1.0, -2.0, 0.0, 0.0, 'satellite'),
    ]
    write_manifest(gallery_dir, items)
    loaded = load_gallery(gallery_dir)
    assert not loaded.problems
    assert [(i.image_id, i.path, i.lat, i.lon, i.alt, i.heading_deg, i.platform, i.group_id,
             i.descriptions) for i in loaded.items] == [
        (i.image_id, i.path, i.lat, i.lon, i.alt, i.heading_deg, i.platform, i.group_id,
         i.descriptions) for i in items]
    with pytest.raises(GalleryError, match='separates descriptions'):
        write_manifest(gallery_dir, [GalleryItem('z', 'img/0.png', 0, 0, 0, 0, 'drone', None,
                                                 ('a || b',))])
