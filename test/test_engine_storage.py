"""State on disk: atomic files, embedding stores, the hash cache and the caption store."""

import json
import sqlite3

from cgrs_ros.engine.captions import (caption_source_for, CaptionRecord, CaptionStore,
                                      manifest_caption)
from cgrs_ros.engine.config import load_config
from cgrs_ros.engine.gallery import GalleryItem
from cgrs_ros.engine.storage import (atomic_save_npy, atomic_write_json, EmbeddingStore,
                                     FileHashCache, load_npy)
import numpy as np
import pytest


def _unit(rng, n, d=8):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_atomic_writes_leave_no_temp_files(tmp_path):
    atomic_write_json(tmp_path / 'a.json', {'x': 1})
    atomic_save_npy(tmp_path / 'v.npy', np.arange(6, dtype=np.float32).reshape(2, 3))
    atomic_write_json(tmp_path / 'a.json', {'x': 2})
    assert json.loads((tmp_path / 'a.json').read_text()) == {'x': 2}
    assert load_npy(tmp_path / 'v.npy').tolist() == [[0, 1, 2], [3, 4, 5]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ['a.json', 'v.npy']


def test_npy_with_pickled_objects_is_refused(tmp_path):
    np.save(tmp_path / 'evil.npy', np.array([{'a': 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError):
        load_npy(tmp_path / 'evil.npy')


def test_embedding_store_appends_segments_ignores_duplicates_and_compacts(tmp_path):
    rng = np.random.default_rng(0)
    store = EmbeddingStore.for_encoder(tmp_path, 'image', 'enc:A')
    vecs = _unit(rng, 5)
    assert store.add(['a', 'b', 'c'], vecs[:3]) == 3
    assert store.add(['c', 'd', 'd', 'e'], vecs[[2, 3, 3, 4]]) == 2  # c known, d once
    assert store.keys() == {'a', 'b', 'c', 'd', 'e'}
    keys, matrix = store.load()
    assert keys == ['a', 'b', 'c', 'd', 'e']
    np.testing.assert_allclose(matrix, vecs)
    found, sub = store.lookup({'e', 'b', 'zz'})
    assert found == ['b', 'e']
    np.testing.assert_allclose(sub, vecs[[1, 4]])
    # A second handle (another process) sees the same data; compaction drops dead keys.
    other = EmbeddingStore.for_encoder(tmp_path, 'image', 'enc:A')
    other.compact(keep={'a', 'e'})
    keys, matrix = store.load()
    assert keys == ['a', 'e']
    np.testing.assert_allclose(matrix, vecs[[0, 4]])
    assert len(list(store.root.glob('seg-*.npy'))) == 1
    # Another encoder identity never shares the folder.
    assert EmbeddingStore.for_encoder(tmp_path, 'image', 'enc:B').root != store.root
    with pytest.raises(RuntimeError, match='holds 8-d vectors'):
        store.add(['f'], _unit(rng, 1, d=4))


def test_embedding_store_merges_many_segments(tmp_path):
    rng = np.random.default_rng(1)
    store = EmbeddingStore.for_encoder(tmp_path, 'text', 'enc')
    vecs = _unit(rng, EmbeddingStore.MAX_SEGMENTS + 3)
    for i, vec in enumerate(vecs):
        store.add([f'k{i}'], vec[None])
    keys, matrix = store.load()
    assert keys == [f'k{i}' for i in range(len(vecs))]
    np.testing.assert_allclose(matrix, vecs)
    assert len(list(store.root.glob('seg-*.npy'))) <= EmbeddingStore.MAX_SEGMENTS


def test_file_hash_cache_rehashes_only_changed_files(tmp_path):
    for name in 'ab':
        (tmp_path / name).write_bytes(name.encode() * 100)
    files = [(n, tmp_path / n) for n in 'ab']
    cache = FileHashCache(tmp_path / 'state')
    first, hashed = cache.update(files)
    assert hashed == 2 and first['a'] != first['b']
    again, hashed = cache.update(files)
    assert hashed == 0 and again == first
    (tmp_path / 'a').write_bytes(b'different content')
    third, hashed = cache.update(files)
    assert hashed == 1 and third['a'] != first['a'] and third['b'] == first['b']
    cache.mark_undecodable({third['a']: 'broken'})
    assert cache.undecodable() == {third['a']: 'broken'}
    cache.close()


def test_caption_store_keys_status_and_sequence(tmp_path):
    path = tmp_path / 'captions.sqlite'
    with CaptionStore(path) as store:
        assert store.last_seq() == 0
        store.put_many([CaptionRecord('h1', 'vlm:a', 'p1', 'ok', text='a red roof'),
                        CaptionRecord('h2', 'vlm:a', 'p1', 'failed', error='timeout')])
        seq = store.last_seq()
        rec = store.get('h2', 'vlm:a', 'p1')
        assert (rec.status, rec.text, rec.error) == ('failed', None, 'timeout')
        assert rec.created_at > 0
        assert store.done('vlm:a', 'p1') == {'h1': 'ok', 'h2': 'failed'}
        assert store.done('vlm:a', 'p1', include_failed=False) == {'h1': 'ok'}
        assert store.failures('vlm:a', 'p1') == {'h2': 'timeout'}
        # A newer caption of the same image by another VLM wins; manifest rows are separate.
        store.put_ok('h1', 'vlm:b', 'p9', 'a red tiled roof')
        store.put_ok('h1', 'manifest', 'descriptions-v1', 'from the manifest')
        vlm = caption_source_for(load_config(None, {'captioner.backend': 'openai'}).captioner)
        rows, newest = store.ok_captions(vlm)
        assert rows == {'h1': ('a red tiled roof', 'vlm:b')}
        manifest = caption_source_for(load_config(None).captioner)
        assert store.ok_captions(manifest)[0] == {'h1': ('from the manifest', 'manifest')}
        # Only rows after a sequence number come back, which is how readers poll.
        assert store.ok_captions(vlm, since_seq=newest) == ({}, newest)
        assert newest > seq
        with pytest.raises(ValueError, match='no text'):
            store.put_ok('h3', 'vlm:a', 'p1', '  ')
    # The schema is what other tools can read with plain SQL.
    columns = [r[1] for r in sqlite3.connect(path).execute('PRAGMA table_info(captions)')]
    assert columns == ['content_hash', 'captioner', 'prompt_version', 'status', 'text', 'error',
                       'created_at', 'seq']


def test_manifest_caption_joins_descriptions():
    item = GalleryItem('a', 'a.png', 0, 0, 0, 0, 'drone', None,
                       ('A red roof', 'next to a plaza!', ' a river to the south '))
    assert manifest_caption(item) == 'A red roof. next to a plaza! a river to the south.'
    assert manifest_caption(GalleryItem('b', 'b.png', 0, 0, 0, 0, 'drone')) is None
