"""`cgrs index`, `cgrs query` and `cgrs bench` through the real command-line entry point."""

import json

from cgrs_ros.cli import main
import pytest

HEADER = 'image_id,path,lat,lon,alt,heading_deg,platform,group_id,description\n'
ROWS = [
    ('house', 'satellite', 'a red-roofed house beside a circular plaza'),
    ('stadium', 'drone', 'a football stadium with floodlights'),
    ('church', 'ground', 'a gothic church with a tall spire'),
    ('harbour', 'drone', 'a harbour with sailing boats along a pier'),
]


@pytest.fixture
def setup(tmp_path, make_png, tiny_open_clip_dir):
    gallery = tmp_path / 'gallery'
    lines = [HEADER]
    for i, (name, platform, text) in enumerate(ROWS):
        make_png(gallery / f'{name}.png', i)
        lines.append(f'{name},{name}.png,{47 + i / 100},8.5,400,{i * 90},{platform},g{i},{text}\n')
    lines.append('lost,lost.png,47,8,400,0,drone,,\n')
    (gallery / 'gallery.csv').write_text(''.join(lines))
    config = tmp_path / 'engine.yaml'
    config.write_text(f'image_encoder:\n  model: "local-dir:{tiny_open_clip_dir}"\n'
                      '  pretrained: null\n  threads: 1\ntext_encoder:\n  threads: 1\n'
                      'retrieval:\n  top_k: 3\n')
    return gallery, config


def test_index_then_query(setup, capsys):
    gallery, config = setup
    assert main(['index', str(gallery), '--config', str(config), '--quiet']) == 0
    out = capsys.readouterr().out
    assert 'indexed 4, unchanged 0, skipped 1' in out
    assert "line 6 (image_id 'lost'): image file 'lost.png' not found" in out
    assert f'state: {gallery / ".cgrs"}' in out

    assert main(['index', str(gallery), '--config', str(config), '--json']) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary['indexed'], summary['unchanged'], summary['models_loaded']) == (0, 4, [])
    assert summary['skipped'][0]['line'] == 6

    assert main(['query', str(gallery), 'the church with a tall spire', '--config', str(config),
                 '--json']) == 0
    result = json.loads(capsys.readouterr().out)
    assert result['query'] == 'the church with a tall spire'
    assert len(result['candidates']) == 3  # retrieval.top_k from the config file
    assert set(result['candidates'][0]['scores']) == {'coarse', 'caption', 'fused', 'rerank',
                                                      'final'}
    assert set(result['timings_ms']) == {'encode', 'coarse', 'captions', 'rerank', 'total'}

    assert main(['query', str(gallery), 'boats north of the pier', '--config', str(config),
                 '--top-k', '2', '--platform', 'drone']) == 0
    out = capsys.readouterr().out
    assert 'normalized (satellite): boats the pier' in out
    table = [line for line in out.splitlines() if line[:2].strip().isdigit()]
    assert len(table) == 2 and all(' drone ' in line for line in table)


def test_state_elsewhere(setup, tmp_path, capsys):
    gallery, config = setup
    state = tmp_path / 'state'
    assert main(['index', str(gallery), '--config', str(config), '--state', str(state),
                 '--quiet']) == 0
    assert (state / 'captions.sqlite').is_file() and not (gallery / '.cgrs').exists()
    capsys.readouterr()
    assert main(['query', str(gallery), 'a stadium', '--config', str(config), '--state',
                 str(state), '--json']) == 0
    assert json.loads(capsys.readouterr().out)['candidates']


def test_user_errors_are_one_line_exit_2(setup, tmp_path, capsys):
    gallery, config = setup
    assert main(['query', str(gallery), 'a house', '--config', str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith('cgrs query: error: ') and 'run `cgrs index' in err
    assert len(err.splitlines()) == 1
    bad = tmp_path / 'bad.yaml'
    bad.write_text('retrieval:\n  fusion: maximum\n')
    assert main(['index', str(gallery), '--config', str(bad)]) == 2
    assert 'retrieval.fusion' in capsys.readouterr().err
    assert main(['index', str(tmp_path / 'nowhere')]) == 2
    assert 'does not exist' in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(['query', str(gallery), 'x', '--top-k', '0'])


def test_bench_reports_the_figures(tiny_open_clip_dir, capsys):
    assert main(['bench', '--gallery-size', '300', '--queries', '4', '--image-model',
                 f'local-dir:{tiny_open_clip_dir}', '--threads', '1', '--query-threads', '1',
                 '--index-images', '3',
                 '--caption-channel', 'hybrid', '--json']) == 0
    result = json.loads(capsys.readouterr().out)
    for key in ('gallery_size', 'p50_ms', 'p95_ms', 'floor_ms', 'ratio_p50_to_floor',
                'bytes_per_item', 'stages_ms', 'first_index_s', 'second_index_s',
                'reindex_speedup'):
        assert key in result, key
    assert result['gallery_size'] == 300 and result['caption_channel'] == 'hybrid'
    assert result['ratio_p50_to_floor'] == pytest.approx(result['p50_ms'] / result['floor_ms'])
    # float32 vectors of both channels + per index three int64 row tables (item, row, item
    # digest) and an int8 one (platform)
    assert result['index_bytes_per_item'] == 4 * (32 + 384) + 2 * (3 * 8 + 1)
    assert result['first_images_embedded'] == 3 and result['second_images_embedded'] == 0
    assert result['second_models_loaded'] == 0
