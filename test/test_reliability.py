"""Bad rows never abort a run; configs cannot explode (issue 16, items 1, 2 and 5).

Each case failed on main before: a decompression-bomb PNG aborted `cgrs index` with a PIL
traceback, a long manifest field aborted it with `_csv.Error`, `alt=1e308` and Arabic-Indic
digits were accepted, and a billion-laughs YAML took minutes and gigabytes.
"""

import json
import subprocess
import sys
import time

from cgrs_ros.engine.config import load_config
from cgrs_ros.engine.errors import ConfigError
from cgrs_ros.engine.gallery import decode_image, load_gallery, MAX_DECODED_SIDE
from cgrs_ros.engine.learning.config import load_train_config
from hostile_inputs import png_claiming
from PIL import Image
import pytest

HEADER = 'image_id,path,lat,lon,alt,heading_deg,platform,group_id,description\n'


def _row(image_id, lat='47.0', alt='400', extra=''):
    return f'{image_id},images/{image_id}.png,{lat},8.0,{alt},0,satellite,{image_id},{extra}\n'


@pytest.fixture
def gallery(tmp_path, make_png):
    folder = tmp_path / 'g'
    for i in range(3):
        make_png(folder / 'images' / f'ok{i}.png', i)
    png_claiming(folder / 'images' / 'bomb.png', 30000, 30000)   # 900 Mpx: PIL's own limit
    png_claiming(folder / 'images' / 'big.png', 12000, 12000)    # 144 Mpx: our budget
    for name in ('huge_field', 'high', 'arabic'):
        make_png(folder / 'images' / f'{name}.png', 9)
    (folder / 'gallery.csv').write_text(
        HEADER + _row('ok0') + _row('bomb') + _row('ok1') + _row('big')
        + _row('huge_field', extra='"' + 'a red roof ' * 20000 + '"')
        + _row('high', alt='1e308') + _row('arabic', lat='\u0664\u0667') + _row('ok2'))
    return folder


def test_bad_rows_are_skipped_with_their_line_and_the_rest_indexes(
        gallery, tiny_open_clip_dir, tmp_path):
    loaded = load_gallery(gallery)
    assert [item.image_id for item in loaded.items] == ['ok0', 'ok1', 'ok2']
    reasons = {p.line: p.message for p in loaded.problems}
    assert 'over the pixel budget' in reasons[3]
    assert '12000 x 12000 = 144 Mpx, over the pixel budget of 100 Mpx' in reasons[5]
    assert 'field description is 220000 characters' in reasons[6]
    assert 'alt 1e+308 is out of range' in reasons[7]
    assert 'not a number written with ASCII digits' in reasons[8]
    # Through the CLI, with a real image encoder: the run finishes and says why per row.
    config = tmp_path / 'engine.yaml'
    config.write_text(json.dumps({
        'image_encoder': {'model': f'local-dir:{tiny_open_clip_dir}', 'pretrained': None},
        'captioner': {'backend': 'none'}}))
    proc = subprocess.run([sys.executable, '-m', 'cgrs_ros.cli', 'index', str(gallery),
                           '--config', str(config), '--json'], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary['indexed'] == 3 and summary['images_embedded'] == 3
    assert sorted(s['line'] for s in summary['skipped']) == [3, 5, 6, 7, 8]


def test_decoded_images_are_shrunk_to_a_bounded_size(tmp_path):
    path = tmp_path / 'wide.png'
    Image.new('RGB', (5000, 1000), (200, 30, 30)).save(path)
    image = decode_image(path)
    assert image.size == (MAX_DECODED_SIDE, 410) and image.mode == 'RGB'
    with pytest.raises(ValueError, match='pixel budget'):
        decode_image(png_claiming(tmp_path / 'big.png', 12000, 12000))


LAUGHS = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + ''.join(
    f'{b}: &{b} [{",".join([f"*{a}"] * 9)}]\n' for a, b in zip('abcdefgh', 'bcdefghi'))


@pytest.mark.parametrize('section', ['captioner', 'retrieval'])
def test_yaml_aliases_that_explode_are_refused_at_once(tmp_path, section):
    path = tmp_path / 'engine.yaml'
    path.write_text(f'{section}:\n' + ''.join('  ' + line + '\n'
                                              for line in LAUGHS.splitlines()))
    start = time.perf_counter()
    with pytest.raises(ConfigError, match='more than 100000 YAML nodes'):
        load_config(path)
    train = tmp_path / 'train.yaml'
    train.write_text('model:\n' + ''.join('  ' + line + '\n' for line in LAUGHS.splitlines()))
    with pytest.raises(ConfigError, match='more than 100000 YAML nodes'):
        load_train_config(train)
    assert time.perf_counter() - start < 5  # refused before anything is built
    # Ordinary aliases still work.
    path.write_text('retrieval: &r {top_k: 3}\n')
    assert load_config(path).retrieval.top_k == 3
