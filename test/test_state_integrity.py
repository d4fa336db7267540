"""Corrupt engine state is detected, named and repaired (issue 16, item 3).

Each case damages one state file of an indexed gallery the way a disk, a crash or a careless
restore does, then, through the real CLI: ``cgrs query`` refuses with one sentence naming the
file and ``cgrs index GALLERY`` (the FAISS index, derived data, is rebuilt in memory with a
warning naming it instead); ``cgrs index`` repairs the damage, says so, counts no item as
unchanged, and the ranking afterwards equals the one from the clean state.

On main before this change every case failed: a traceback (garbage meta.json, keys file,
state.sqlite, captions.sqlite), a silently different ranking (flipped bytes in image.faiss, a
truncated captions.sqlite, a caption store that lost rows), or an index run that reported all
items unchanged and repaired nothing (truncated segment, damaged image.faiss).
"""

import json
import os

from cgrs_ros.cli import main
from cgrs_ros.engine.captions import CaptionRecord, CaptionStore
from cgrs_ros.engine.errors import StateError
from cgrs_ros.engine.storage import EmbeddingStore, read_json
import numpy as np
import pytest
from test_cli_engine import ROWS, setup  # noqa: F401 (the indexed-gallery fixture)

QUERY = 'the church with a tall spire'


def _index(gallery, config, capsys):
    assert main(['index', str(gallery), '--config', str(config), '--json']) == 0
    return json.loads(capsys.readouterr().out)


def _ranking(gallery, config, capsys):
    """Return [(image_id, coarse, caption, fused)] of every candidate of QUERY."""
    assert main(['query', str(gallery), QUERY, '--config', str(config), '--top-k', '4',
                 '--json']) == 0
    result = json.loads(capsys.readouterr().out)
    return [(c['image_id'], c['scores']['coarse'], c['scores']['caption'], c['scores']['fused'])
            for c in result['candidates']]


def _same(ranking, clean):
    assert [row[0] for row in ranking] == [row[0] for row in clean]
    for got, want in zip(ranking, clean):
        assert got[1:] == pytest.approx(want[1:], abs=1e-5)


def _refused(gallery, config, capsys, path):
    """Check that `cgrs query` refuses with one sentence naming ``path`` and the fix."""
    assert main(['query', str(gallery), QUERY, '--config', str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith('cgrs query: error: state file '), err
    assert f'{path} is damaged' in err and f'run `cgrs index {gallery}` to repair it' in err
    return err


def _repaired(summary, *paths):
    """Check an index summary reports repairs naming ``paths`` and no item as unchanged."""
    told = '\n'.join(summary['repairs'])
    for path in paths:
        assert str(path) in told, told
    assert summary['unchanged'] == 0 and summary['indexed'] + summary['repaired'] == len(ROWS)
    return told


@pytest.fixture
def indexed(setup, capsys):  # noqa: F811 (the fixture imported above)
    """An indexed gallery with both channels and the clean ranking of QUERY."""
    gallery, config = setup
    first = _index(gallery, config, capsys)
    assert first['indexed'] == len(ROWS) and first['repairs'] == []
    return gallery, config, gallery / '.cgrs', _ranking(gallery, config, capsys)


def _store_dir(state, kind):
    (folder,) = (state / 'embeddings').glob(f'{kind}-*')
    return folder


def _segment(state, kind, suffix):
    (path,) = _store_dir(state, kind).glob(f'seg-*{suffix}')
    return path


def test_truncated_segments_are_dropped_and_embedded_again(indexed, capsys):
    gallery, config, state, clean = indexed
    text_npy, image_npy = _segment(state, 'text', '.npy'), _segment(state, 'image', '.npy')
    for path in (text_npy, image_npy):
        data = path.read_bytes()
        path.write_bytes(data[:len(data) // 2])

    _refused(gallery, config, capsys, text_npy)  # the image store is not read: its index is

    summary = _index(gallery, config, capsys)
    told = _repaired(summary, text_npy, image_npy)
    assert 'dropped its 4 vectors' in told
    assert (summary['images_embedded'], summary['captions_embedded']) == (4, 4)
    _same(_ranking(gallery, config, capsys), clean)


def test_garbage_meta_json_is_rebuilt_from_the_segments(indexed, capsys):
    gallery, config, state, clean = indexed
    metas = [_store_dir(state, kind) / 'meta.json' for kind in ('text', 'image')]
    for path in metas:
        path.write_bytes(b'\x00garbage{')

    _refused(gallery, config, capsys, metas[0])

    summary = _index(gallery, config, capsys)
    told = _repaired(summary, *metas)
    assert 'rebuilt it from the 1 intact segment file pair(s) on disk (4 vectors)' in told
    # Nothing was lost, so nothing is embedded again: the items are counted as repaired.
    assert (summary['images_embedded'], summary['captions_embedded']) == (0, 0)
    assert summary['repaired'] == len(ROWS)
    _same(_ranking(gallery, config, capsys), clean)
    assert all('sha256' in seg for seg in read_json(metas[0])['segments'])


def test_garbage_keys_file_is_dropped_and_embedded_again(indexed, capsys):
    gallery, config, state, clean = indexed
    keys = _segment(state, 'text', '.keys.json')
    keys.write_bytes(os.urandom(keys.stat().st_size))  # same size: only the checksum tells

    _refused(gallery, config, capsys, keys)

    summary = _index(gallery, config, capsys)
    _repaired(summary, keys)
    assert summary['captions_embedded'] == 4
    _same(_ranking(gallery, config, capsys), clean)


def _flip_signs(data):
    """Negate the last vector stored in a FAISS IndexFlat file (its codes come last)."""
    data = bytearray(data)
    for i in range(len(data) - 16 * 4, len(data), 4):  # 16-d float32, little-endian
        data[i + 3] ^= 0x80
    return bytes(data)


@pytest.mark.parametrize('damage', ['truncated', 'flipped', 'garbage'])
def test_damaged_faiss_index_is_rebuilt(indexed, capsys, caplog, damage):
    gallery, config, state, clean = indexed
    path = state / 'index' / read_json(state / 'index' / 'image.json')['faiss_file']
    data = path.read_bytes()
    path.write_bytes({'truncated': data[:len(data) // 2], 'flipped': _flip_signs(data),
                      'garbage': os.urandom(len(data))}[damage])

    # Derived data: the query ranks as before, from the stored embeddings, and says why.
    _same(_ranking(gallery, config, capsys), clean)
    warned = [r.getMessage() for r in caplog.records if r.levelname == 'WARNING']
    assert any(f'{path} is damaged' in m and f'`cgrs index {gallery}`' in m for m in warned)

    summary = _index(gallery, config, capsys)
    assert 'rebuilt the image index from the stored embeddings' in _repaired(summary, path)
    assert summary['images_embedded'] == 0
    caplog.clear()
    _same(_ranking(gallery, config, capsys), clean)
    assert not [r for r in caplog.records if r.levelname == 'WARNING']


def test_garbage_file_hash_cache_is_moved_aside_and_files_hashed_again(indexed, capsys):
    gallery, config, state, clean = indexed
    path = state / 'state.sqlite'
    path.write_bytes(os.urandom(8192))

    _refused(gallery, config, capsys, path)

    assert main(['index', str(gallery), '--config', str(config)]) == 0
    out = capsys.readouterr().out
    assert 'indexed 0, unchanged 0, skipped 1, repaired 4' in out
    assert f'  repaired: {path} was damaged (not a readable SQLite database' in out
    assert 'the gallery files are hashed again' in out
    assert len(list(state.glob('state.sqlite.corrupt-*'))) == 1
    _same(_ranking(gallery, config, capsys), clean)


@pytest.mark.parametrize('damage', ['garbage', 'truncated', 'emptied'])
def test_damaged_caption_store_is_moved_aside_and_salvaged(indexed, capsys, damage):
    gallery, config, state, clean = indexed
    path = state / 'captions.sqlite'
    data = path.read_bytes()
    assert not (state / 'captions.sqlite-wal').exists()  # checkpointed when the run closed it
    # Truncated: to its first two pages (SQLite finds the rest missing). Emptied: truncated to
    # nothing, which SQLite reads as a fresh empty database; on main the query then ranked
    # without captions (a different top-1) and said nothing.
    path.write_bytes({'garbage': os.urandom(len(data)), 'truncated': data[:8192],
                      'emptied': b''}[damage])

    err = _refused(gallery, config, capsys, path)

    summary = _index(gallery, config, capsys)
    told = _repaired(summary, path)
    if damage == 'emptied':
        assert 'rows 0 < 4' in err and '4 rows were lost from captions.sqlite' in told
    else:
        assert 'moved it to captions.sqlite.corrupt-' in told
        assert len(list(state.glob('captions.sqlite.corrupt-*'))) == 1
    assert 'manifest captions are written again' in told
    assert summary['captions_written'] == 4
    _same(_ranking(gallery, config, capsys), clean)


def test_cgrs_caption_names_this_gallery_in_the_fix(indexed, capsys):
    gallery, config, state, _ = indexed
    path = state / 'captions.sqlite'
    path.write_bytes(os.urandom(len(path.read_bytes())))
    vlm = config.parent / 'vlm.yaml'  # `cgrs caption` needs a VLM captioner; none is called
    vlm.write_text(config.read_text() + '\ncaptioner: {backend: openai, model: m, '
                   'base_url: "http://127.0.0.1:9/v1"}\n')
    assert main(['caption', str(gallery), '--config', str(vlm), '--status']) == 2
    err = capsys.readouterr().err.strip()
    assert f'{path} is damaged' in err and f'run `cgrs index {gallery}` to repair it' in err


def test_caption_store_restored_from_an_older_copy_is_refused(setup, capsys):  # noqa: F811
    gallery, config = setup
    state = gallery / '.cgrs'
    manifest = gallery / 'gallery.csv'
    full = manifest.read_text()
    # First run: only two rows have descriptions.
    lines = full.splitlines(keepends=True)
    manifest.write_text(''.join([lines[0]] + [line.rsplit(',', 1)[0] + ',\n' if i > 2 else line
                                              for i, line in enumerate(lines[1:], 1)]))
    _index(gallery, config, capsys)
    older = (state / 'captions.sqlite').read_bytes()
    # Second run: every row has its description; two more caption rows are written.
    manifest.write_text(full)
    assert _index(gallery, config, capsys)['captions_written'] == 2
    clean = _ranking(gallery, config, capsys)

    (state / 'captions.sqlite').write_bytes(older)  # a backup restored over the store
    err = _refused(gallery, config, capsys, state / 'captions.sqlite')
    assert 'rows 2 < 4' in err and 'rows were lost' in err

    summary = _index(gallery, config, capsys)
    told = _repaired(summary, state / 'captions.sqlite')
    assert '2 rows were lost from captions.sqlite' in told
    assert f'need `cgrs caption {gallery}` again' in told
    assert summary['captions_written'] == 2
    _same(_ranking(gallery, config, capsys), clean)


def test_caption_rows_lost_with_the_wal_file_are_refused(indexed, capsys):
    # Committed rows live in captions.sqlite-wal until a checkpoint; losing that file (a copy
    # of the main file alone, a crash that deleted it) loses them.
    gallery, config, state, clean = indexed
    path = state / 'captions.sqlite'
    store = CaptionStore(path)
    try:
        store.put_many([CaptionRecord(f'h{i}', 'vlm', 'v1', 'ok', text=f'caption {i}')
                        for i in range(3)])
        assert (state / 'captions.sqlite-wal').stat().st_size > 0
        main_file_only = path.read_bytes()
    finally:
        store.close()
    path.write_bytes(main_file_only)

    err = _refused(gallery, config, capsys, path)
    assert 'rows 4 < 7' in err

    summary = _index(gallery, config, capsys)
    assert '3 rows were lost from captions.sqlite' in _repaired(summary, path)
    _same(_ranking(gallery, config, capsys), clean)


def test_garbage_rows_record_is_named_and_rewritten(indexed, capsys):
    gallery, config, state, clean = indexed
    record = state / 'captions.rows.json'
    record.write_text('{"figures": "many"}')

    _refused(gallery, config, capsys, record)

    _repaired(_index(gallery, config, capsys), record)
    assert read_json(record)['figures']['rows'] == 4
    _same(_ranking(gallery, config, capsys), clean)


def test_store_checksums_sizes_and_old_meta(tmp_path):
    store = EmbeddingStore(tmp_path / 'store', 'enc')
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((5, 8)).astype(np.float32)
    store.add(list('abcde'), vectors)
    assert store.verify() == 5
    (seg,) = read_json(store.root / 'meta.json')['segments']
    npy = store.root / f'{seg["name"]}.npy'

    # One flipped bit: same size, a readable array; only the checksum knows.
    data = bytearray(npy.read_bytes())
    data[-1] ^= 0x01
    npy.write_bytes(bytes(data))
    assert store.keys() == set('abcde')  # cheap reads check sizes and headers only
    for read in (store.verify, store.load):
        with pytest.raises(StateError, match='SHA-256 differs'):
            read()
    notes, _ = store.repair()
    assert len(notes) == 1 and str(npy) in notes[0]
    assert store.load()[0] == [] and not npy.exists()

    # A meta.json written before checksums existed stays readable; repair records them.
    store.add(list('abc'), vectors[:3])
    meta = read_json(store.root / 'meta.json')
    for key in ('bytes', 'sha256', 'keys_bytes', 'keys_sha256'):
        del meta['segments'][0][key]
    (store.root / 'meta.json').write_text(json.dumps(meta))
    np.testing.assert_array_equal(store.load()[1], vectors[:3])
    assert store.repair() == ([], set())
    assert 'sha256' in read_json(store.root / 'meta.json')['segments'][0]
    # ...and a truncated segment under such a meta is still caught, by its .npy header.
    (store.root / 'meta.json').write_text(json.dumps(meta))
    npy = store.root / f'{meta["segments"][0]["name"]}.npy'
    npy.write_bytes(npy.read_bytes()[:-8])
    with pytest.raises(StateError, match='header needs'):
        store.lookup({'a'})


def test_the_fix_names_the_state_folder_given(setup, tmp_path, capsys):  # noqa: F811
    gallery, config = setup
    state = tmp_path / 'elsewhere'
    assert main(['index', str(gallery), '--config', str(config), '--state', str(state),
                 '--quiet']) == 0
    (state / 'state.sqlite').write_bytes(b'\x01' * 4096)
    capsys.readouterr()
    assert main(['query', str(gallery), QUERY, '--config', str(config), '--state',
                 str(state)]) == 2
    err = capsys.readouterr().err
    assert f'run `cgrs index {gallery} --state {state}` to repair it' in err
