"""``cgrs index|caption --ray ADDRESS`` on a real local Ray cluster produce a local run's stores.

A Ray head is started for this module with ``ray start --head --block`` on 127.0.0.1 (free
ports, 2 CPUs, a 100 MB object store, no dashboard) and stopped by its process group. The
``cgrs`` commands run as real processes that connect to it; the encoder and the captioner run
in Ray actors (a tiny open_clip model and a tiny BLIP saved to disk, loaded by the actors from
those folders). Each run is compared with a local run over a copy of the same gallery.
"""

import json
import os
from pathlib import Path
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

from cgrs_ros.engine.captions import caption_store_path, CaptionStore
from cgrs_ros.engine.config import load_config
from cgrs_ros.engine.encoders import image_encoder_identity, text_encoder_identity
from cgrs_ros.engine.gallery import PLATFORMS
from cgrs_ros.engine.storage import EmbeddingStore, FileHashCache
import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
RAY = Path(sys.executable).with_name('ray')
N_IMAGES = 40


def _free_port():
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


@pytest.fixture(scope='module')
def ray_head():
    """Start a Ray head on 127.0.0.1; yield its address; stop it (its process group only)."""
    temp = tempfile.mkdtemp(prefix='cgrs-ray-', dir='/tmp')  # Ray's socket paths are short
    port = _free_port()
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED='0', HF_HUB_OFFLINE='1',
               TRANSFORMERS_OFFLINE='1', RAY_enable_metrics_collection='0')
    command = [str(RAY), 'start', '--head', '--block', f'--port={port}',
               '--node-ip-address=127.0.0.1', '--num-cpus=2', '--num-gpus=0',
               '--object-store-memory=100000000', '--include-dashboard=false',
               '--disable-usage-stats', f'--temp-dir={temp}',
               f'--dashboard-agent-listen-port={_free_port()}',
               f'--dashboard-agent-grpc-port={_free_port()}',
               f'--runtime-env-agent-port={_free_port()}',
               f'--metrics-export-port={_free_port()}']
    log = open(Path(temp) / 'head.log', 'w')
    head = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    address = f'127.0.0.1:{port}'
    try:
        deadline = time.monotonic() + 180
        while subprocess.run([str(RAY), 'health-check', '--address', address],
                             capture_output=True, env=env).returncode != 0:
            assert head.poll() is None, (Path(temp) / 'head.log').read_text()
            assert time.monotonic() < deadline, 'the Ray head did not come up in 180 s'
            time.sleep(1)
        yield address
    finally:
        with_group = os.getpgid(head.pid) if head.poll() is None else None
        if with_group is not None:
            os.killpg(with_group, signal.SIGTERM)  # the head and the processes it started
            try:
                head.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(with_group, signal.SIGKILL)
                head.wait()
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def _cgrs(*args, timeout=600):
    env = dict(os.environ, HF_HUB_OFFLINE='1', TRANSFORMERS_OFFLINE='1')
    done = subprocess.run([sys.executable, '-m', 'cgrs_ros.cli', *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout)


def _gallery(root, make_png, n=N_IMAGES):
    rows = ['image_id,path,lat,lon,alt,heading_deg,platform,description\n']
    for i in range(n):
        make_png(root / 'img' / f'{i:03d}.png', i)
        rows.append(f'p{i:03d},img/{i:03d}.png,{47 + i / 1000},8.5,400,{i % 360},'
                    f'{PLATFORMS[i % len(PLATFORMS)]},a place number {i}\n')
    make_png(root / 'img' / 'broken.png', n)
    data = (root / 'img' / 'broken.png').read_bytes()
    (root / 'img' / 'broken.png').write_bytes(data[:len(data) // 2])  # header intact: it
    # passes the manifest check and fails to decode, in the actor as it does locally
    rows.append('broken,img/broken.png,47.5,8.5,400,0,drone,\n')
    (root / 'gallery.csv').write_text(''.join(rows))


def _vectors(state, kind, identity):
    keys, matrix = EmbeddingStore.for_encoder(state, kind, identity).load()
    assert len(keys) == len(set(keys)), 'a key is stored twice'
    return dict(zip(keys, matrix))


def _same_vectors(got, want):
    assert set(got) == set(want)
    for key, vector in want.items():
        np.testing.assert_allclose(got[key], vector, atol=1e-5)


def test_index_on_ray_writes_the_stores_a_local_run_writes(ray_head, tmp_path, make_png,
                                                           tiny_open_clip_dir):
    ray_gallery, local_gallery = tmp_path / 'ray', tmp_path / 'local'
    _gallery(ray_gallery, make_png)
    shutil.copytree(ray_gallery, local_gallery)
    config = tmp_path / 'engine.yaml'
    config.write_text(yaml.safe_dump({
        'image_encoder': {'model': f'local-dir:{tiny_open_clip_dir}', 'pretrained': None,
                          'batch_size': 4, 'threads': 1, 'checkpoint_every': 8},
        'text_encoder': {'threads': 1}}))
    identity = image_encoder_identity(load_config(config).image_encoder)

    on_ray = _cgrs('index', ray_gallery, '--config', config, '--json', '--ray', ray_head,
                   '--ray-actors', 2)
    local = _cgrs('index', local_gallery, '--config', config, '--json')
    for key in ('indexed', 'unchanged', 'images_embedded', 'captions_embedded', 'captioned'):
        assert on_ray[key] == local[key], key
    assert on_ray['images_embedded'] == N_IMAGES and on_ray['models_loaded'][0] == identity
    assert [s['image_id'] for s in on_ray['skipped']] == ['broken']
    assert on_ray['skipped'][0]['reason'] == local['skipped'][0]['reason'].replace(
        str(local_gallery), str(ray_gallery))
    assert on_ray['image_index']['rows'] == local['image_index']['rows'] == N_IMAGES

    ray_state, local_state = ray_gallery / '.cgrs', local_gallery / '.cgrs'
    _same_vectors(_vectors(ray_state, 'image', identity),
                  _vectors(local_state, 'image', identity))
    text = text_encoder_identity(load_config(config).text_encoder)
    _same_vectors(_vectors(ray_state, 'text', text), _vectors(local_state, 'text', text))
    caches = [FileHashCache(state) for state in (ray_state, local_state)]
    try:
        assert caches[0].undecodable() == caches[1].undecodable() != {}
    finally:
        for cache in caches:
            cache.close()

    # Both galleries rank alike, and a second Ray run has nothing left to do.
    query = ['query', None, 'a place', '--config', config, '--json', '--top-k', 5]
    ranked = [[c['image_id'] for c in _cgrs(*[g if a is None else a for a in query])[
        'candidates']] for g in (ray_gallery, local_gallery)]
    assert ranked[0] == ranked[1] and len(ranked[0]) == 5
    again = _cgrs('index', ray_gallery, '--config', config, '--json', '--ray', ray_head)
    assert again['images_embedded'] == 0 and again['models_loaded'] == []


def test_caption_on_ray_writes_the_captions_a_local_run_writes(ray_head, tmp_path, make_png,
                                                               tiny_blip_dir):
    ray_gallery, local_gallery = tmp_path / 'ray', tmp_path / 'local'
    _gallery(ray_gallery, make_png, n=6)
    shutil.copytree(ray_gallery, local_gallery)
    config = tmp_path / 'engine.yaml'
    config.write_text(yaml.safe_dump({
        'image_encoder': {'backend': 'none'}, 'text_encoder': {'threads': 1},
        'captioner': {'backend': 'transformers', 'model': str(tiny_blip_dir), 'device': 'cpu',
                      'max_new_tokens': 8, 'batch_size': 2}}))

    on_ray = _cgrs('caption', ray_gallery, '--config', config, '--json', '--ray', ray_head,
                   '--ray-actors', 1)
    local = _cgrs('caption', local_gallery, '--config', config, '--json')
    for key in ('attempted', 'new_captions', 'new_failures', 'captioned', 'failed', 'pending',
                'captions_embedded'):
        assert on_ray[key] == local[key], key
    assert on_ray['new_captions'] == 6 and on_ray['new_failures'] == 1  # the broken file

    def rows(gallery):
        with CaptionStore(caption_store_path(gallery / '.cgrs')) as store:
            return store.done(on_ray['captioner'], on_ray['prompt_version']), \
                store.failures(on_ray['captioner'], on_ray['prompt_version'])

    assert rows(ray_gallery) == rows(local_gallery)
    text = text_encoder_identity(load_config(config).text_encoder)
    _same_vectors(_vectors(ray_gallery / '.cgrs', 'text', text),
                  _vectors(local_gallery / '.cgrs', 'text', text))
