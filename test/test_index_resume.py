"""``cgrs index`` killed with SIGKILL mid-embedding resumes from its last checkpoint.

A real ``cgrs index`` process (tiny open_clip model loaded from disk, real FAISS) is killed as
soon as the image embedding store shows a committed checkpoint. The rerun must embed only the
images the killed run did not commit, and end in the same state as one uninterrupted run.
"""

import json
from pathlib import Path
import shutil
import signal
import subprocess
import sys
import time

from cgrs_ros.engine.config import load_config
from cgrs_ros.engine.encoders import image_encoder_identity
from cgrs_ros.engine.gallery import PLATFORMS
from cgrs_ros.engine.storage import EmbeddingStore, read_json
import faiss
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
HEADER = 'image_id,path,lat,lon,alt,heading_deg,platform\n'
CHECKPOINT = 4   # image_encoder.checkpoint_every in the test config
BATCH = 2        # divides CHECKPOINT, so every checkpoint holds exactly CHECKPOINT images
SMALL = 8        # small images first: the first checkpoints come quickly
# Then large images: decoding them (~10-20 ms each) keeps the run busy for a second or more
# after its first checkpoint, long enough for the poll below to kill it mid-embedding.
LARGE = 72
LARGE_SIDE = 960
N = SMALL + LARGE


def _write_gallery(root, make_png):
    rows = [HEADER]
    for i in range(N):
        size = (40, 32) if i < SMALL else (LARGE_SIDE, LARGE_SIDE)
        make_png(root / 'img' / f'{i:03d}.png', i, size=size)
        rows.append(f'p{i:03d},img/{i:03d}.png,{47 + i / 1000},8.5,400,{i % 360},'
                    f'{PLATFORMS[i % len(PLATFORMS)]}\n')
    (root / 'gallery.csv').write_text(''.join(rows))


def _cgrs_index(gallery, config):
    """Run ``cgrs index --json`` to completion and return its summary."""
    done = subprocess.run([sys.executable, '-m', 'cgrs_ros.cli', 'index', str(gallery),
                           '--config', str(config), '--json'], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _vectors(store):
    keys, matrix = store.load()
    assert len(keys) == len(set(keys)), 'a key is stored twice'
    return dict(zip(keys, matrix))


def _faiss_state(state):
    meta = read_json(state / 'index' / 'image.json')
    index = faiss.read_index(str(state / 'index' / meta['faiss_file']))
    meta['row_items'] = np.load(state / 'index' / meta['rows_file'])[:, 0].tolist()
    return index, meta, index.reconstruct_n(0, index.ntotal)


def test_sigkill_mid_embedding_then_rerun_embeds_only_the_rest(tmp_path, make_png,
                                                               tiny_open_clip_dir):
    gallery, clean = tmp_path / 'gallery', tmp_path / 'clean'
    _write_gallery(gallery, make_png)
    shutil.copytree(gallery, clean)  # the same bytes, for the uninterrupted reference run
    config = tmp_path / 'engine.yaml'
    config.write_text(f'image_encoder:\n  model: "local-dir:{tiny_open_clip_dir}"\n'
                      f'  pretrained: null\n  batch_size: {BATCH}\n  threads: 1\n'
                      f'  checkpoint_every: {CHECKPOINT}\n')
    identity = image_encoder_identity(load_config(config).image_encoder)
    store = EmbeddingStore.for_encoder(gallery / '.cgrs', 'image', identity)

    log = tmp_path / 'killed.log'
    with open(log, 'w') as out:
        proc = subprocess.Popen([sys.executable, '-m', 'cgrs_ros.cli', 'index', str(gallery),
                                 '--config', str(config), '--json'], cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        # The store's meta.json names a segment only once that checkpoint is fully written.
        while not (store.root / 'meta.json').exists() or not store.keys():
            assert proc.poll() is None, f'cgrs index ended before a checkpoint:\n{log.read_text()}'
            assert time.monotonic() < deadline, 'cgrs index never committed a checkpoint'
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL, (
            f'cgrs index finished before it could be killed:\n{log.read_text()}')
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    committed = len(store.keys())
    print(f'killed after {committed} of {N} images were committed')
    # Killed mid-embedding: some checkpoints committed, whole ones only, no index written yet.
    assert 0 < committed < N and committed % CHECKPOINT == 0
    assert not (gallery / '.cgrs' / 'index' / 'image.json').exists()

    resumed = _cgrs_index(gallery, config)
    assert resumed['skipped'] == [] and resumed['models_loaded'] == [identity]
    assert resumed['images_embedded'] == N - committed
    assert (resumed['indexed'], resumed['unchanged']) == (N - committed, committed)
    assert resumed['files_hashed'] == 0  # the killed run's file hashes were kept too

    reference = _cgrs_index(clean, config)
    assert (reference['images_embedded'], reference['indexed'], reference['unchanged']) == (
        N, N, 0)

    # Same ids and the same vectors as the uninterrupted run, each key once.
    got = _vectors(store)
    want = _vectors(EmbeddingStore.for_encoder(clean / '.cgrs', 'image', identity))
    assert len(got) == N and set(got) == set(want)
    for key, vector in want.items():
        np.testing.assert_allclose(got[key], vector, atol=1e-6)

    # The FAISS index holds every gallery item exactly once, with the reference's vectors.
    index, meta, rows = _faiss_state(gallery / '.cgrs')
    ref_index, ref_meta, ref_rows = _faiss_state(clean / '.cgrs')
    assert index.ntotal == ref_index.ntotal == N
    assert sorted(meta['row_items']) == list(range(N))
    assert meta['row_items'] == ref_meta['row_items']
    assert meta['fingerprint'] == ref_meta['fingerprint']
    np.testing.assert_allclose(rows, ref_rows, atol=1e-6)

    # Nothing half-written is left: no temp files, no segment files meta.json does not name.
    assert [p for p in gallery.rglob('*') if p.name.endswith('.tmp')] == []
    named = {f'{seg["name"]}{suffix}' for seg in read_json(store.root / 'meta.json')['segments']
             for suffix in ('.npy', '.keys.json')}
    assert {p.name for p in store.root.glob('seg-*')} == named

    # And a further run has nothing left to do.
    again = _cgrs_index(gallery, config)
    assert (again['indexed'], again['unchanged'], again['models_loaded']) == (0, N, [])


def test_next_write_removes_what_a_killed_writer_left(tmp_path):
    # The files a writer killed mid-checkpoint leaves (seen when killing real `cgrs index` runs
    # at random moments): a temp file of the segment being written, and a finished segment that
    # meta.json does not name yet (killed before meta.json was replaced).
    store = EmbeddingStore(tmp_path / 'store', 'enc')
    rng = np.random.default_rng(0)
    first = rng.standard_normal((3, 8)).astype(np.float32)
    assert store.add(['a', 'b', 'c'], first) == 3
    leftovers = [store.root / '.seg-000002.npy.k1ll3d.tmp', store.root / 'seg-000002.npy',
                 store.root / 'seg-000002.keys.json', store.root / '.meta.json.x9.tmp']
    for path in leftovers:
        path.write_bytes(b'half-written')

    second = rng.standard_normal((2, 8)).astype(np.float32)
    assert store.add(['c', 'd', 'e'], np.concatenate([first[2:], second])) == 2
    keys, matrix = store.load()
    assert keys == ['a', 'b', 'c', 'd', 'e']
    np.testing.assert_array_equal(matrix, np.concatenate([first, second]))
    assert [p for p in store.root.iterdir() if p.name.endswith('.tmp')] == []
    assert sorted(p.name for p in store.root.glob('seg-*')) == [
        'seg-000001.keys.json', 'seg-000001.npy', 'seg-000002.keys.json', 'seg-000002.npy']

    (store.root / '.seg-000003.npy.again.tmp').write_bytes(b'half-written')
    store.compact()  # compaction sweeps too
    assert sorted(p.name for p in store.root.glob('*')) == [
        '.lock', 'meta.json', 'seg-000003.keys.json', 'seg-000003.npy']
    assert store.load()[0] == keys
