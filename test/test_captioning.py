"""``cgrs caption`` and the resumable captioning run, with real captioners and a real store.

Captioners are real: a tiny BLIP built from a config, saved to a temp dir and loaded through the
transformers backend; and the openai backend talking HTTP to ``model_factories.ChatServer`` on
127.0.0.1, which answers with each uploaded image's dominant colour and size, so every caption
is known in advance. Crash safety is tested with a real ``kill -9`` of a ``cgrs caption``
process, stopped at a known point by the server (no sleeps).
"""

import json
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time

from cgrs_ros.cli import main
from cgrs_ros.engine.captioning import caption_status, run_captioning
from cgrs_ros.engine.captions import caption_store_path
from cgrs_ros.engine.config import load_config
from cgrs_ros.engine.encoders import text_encoder_identity
from cgrs_ros.engine.indexer import index_gallery
from cgrs_ros.engine.retriever import Retriever
from cgrs_ros.engine.storage import EmbeddingStore, sha256_text
from PIL import Image
import pytest
import yaml

HEADER = 'image_id,path,lat,lon,alt,heading_deg,platform,group_id,description\n'
COLOURS = ('red', 'green', 'blue')
PLATFORM_CYCLE = ('drone', 'satellite', 'ground', 'satellite')


def _colour_gallery(root, n, platforms=PLATFORM_CYCLE):
    """Write n distinct solid-colour images without descriptions; return {image_id: caption}.

    The caption is what ChatServer answers for the image: its dominant colour and its size.
    """
    (root / 'img').mkdir(parents=True, exist_ok=True)
    rows, expected = [], {}
    for i in range(n):
        rgb = [20, 20, 20]
        rgb[i % 3] = 150 + i
        size = (24 + i, 20)
        image_id = f'im{i:02d}'
        Image.new('RGB', size, tuple(rgb)).save(root / 'img' / f'{image_id}.png')
        expected[image_id] = f'a {COLOURS[i % 3]} roof, {size[0]}x{size[1]}'
        rows.append(f'{image_id},img/{image_id}.png,{47 + i / 1000},{8 + i / 1000},400,0,'
                    f'{platforms[i % len(platforms)]},g{i},\n')
    (root / 'gallery.csv').write_text(HEADER + ''.join(rows))
    return expected


def _append_row(root, image_id, platform='satellite'):
    with open(root / 'gallery.csv', 'a') as handle:
        handle.write(f'{image_id},img/{image_id}.png,47.5,8.5,400,0,{platform},gx,\n')


def _config_file(path, captioner, **sections):
    data = {'image_encoder': {'backend': 'none'}, 'text_encoder': {'threads': 1},
            'captioner': captioner, **sections}
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _openai(server, **extra):
    return {'backend': 'openai', 'model': 'tiny-vlm', 'base_url': server.url, 'timeout_s': 20,
            'max_retries': 0, 'retry_backoff_s': 0.01, 'concurrency': 2, 'batch_size': 2,
            'api_key_env': None, **extra}


def _cli_json(capsys, *argv):
    capsys.readouterr()
    code = main(['caption', *map(str, argv), '--json'])
    out = capsys.readouterr()
    assert code == 0, out.err
    return json.loads(out.out)


def _rows(gallery, captioner=None):
    """Rows of the caption store (read directly with sqlite3), and its integrity check."""
    conn = sqlite3.connect(str(caption_store_path(gallery / '.cgrs')))
    try:
        sql = 'SELECT content_hash, captioner, prompt_version, status, text, error FROM captions'
        rows = conn.execute(sql + (' WHERE captioner = ?' if captioner else ''),
                            (captioner,) if captioner else ()).fetchall()
        integrity = conn.execute('PRAGMA integrity_check').fetchone()[0]
    finally:
        conn.close()
    return rows, integrity


def _captions_by_id(gallery, captioner):
    """{image_id: caption} of ok rows, mapped through the images' content hashes."""
    from cgrs_ros.engine.storage import sha256_file
    lines = (gallery / 'gallery.csv').read_text().splitlines()[1:]
    hash_of = {line.split(',')[0]: sha256_file(gallery / line.split(',')[1]) for line in lines}
    rows, _ = _rows(gallery, captioner)
    text_of = {row[0]: row[4] for row in rows if row[3] == 'ok'}
    return {image_id: text_of[h] for image_id, h in hash_of.items() if h in text_of}


def _text_store_keys(gallery, config):
    identity = text_encoder_identity(config.text_encoder)
    store = EmbeddingStore.for_encoder(gallery / '.cgrs', 'text', identity)
    keys, matrix = store.load()
    return keys, matrix


# ---------------------------------------------------------------------------------------------


def test_tiny_transformers_model_from_disk_captions_through_cgrs_caption(
        tiny_blip_dir, tmp_path, capsys):
    gallery = tmp_path / 'g'
    _colour_gallery(gallery, 5)
    section = {'backend': 'transformers', 'model': tiny_blip_dir, 'device': 'cpu',
               'max_new_tokens': 8, 'batch_size': 2}
    config = _config_file(tmp_path / 'engine.yaml', section)
    identity = f'transformers:{tiny_blip_dir}:greedy:max_new_tokens=8'

    # --status reads the model's config and processor, never its weights: it works with the
    # weights file gone.
    no_weights = tmp_path / 'blip-no-weights'
    shutil.copytree(tiny_blip_dir, no_weights)
    for weights in no_weights.glob('*.safetensors'):
        weights.unlink()
    status_config = _config_file(tmp_path / 'status.yaml', dict(section, model=str(no_weights)))
    light = _cli_json(capsys, gallery, '--config', status_config, '--status')
    assert (light['total'], light['captioned'], light['pending']) == (5, 0, 5)

    before = _cli_json(capsys, gallery, '--config', config, '--status')
    assert {k: before[k] for k in ('total', 'captioned', 'failed', 'pending', 'captioner')} == \
        {'total': 5, 'captioned': 0, 'failed': 0, 'pending': 5, 'captioner': identity}
    assert before['prompt_version'] == light['prompt_version']

    summary = _cli_json(capsys, gallery, '--config', config)
    assert (summary['attempted'], summary['new_captions'], summary['new_failures']) == (5, 5, 0)
    assert (summary['captioned'], summary['pending']) == (5, 0)
    assert summary['models_loaded'][0] == identity

    rows, integrity = _rows(gallery)
    assert integrity == 'ok'
    # The status (no model loaded) named exactly the identity and prompt version the loaded
    # model wrote its captions under.
    assert {(r[1], r[2], r[3]) for r in rows} == {(identity, before['prompt_version'], 'ok')}
    captions = [r[4] for r in rows]
    assert all(text and text == text.strip() for text in captions)
    assert len(set(captions)) > 1  # generated from the images, not a constant
    keys, matrix = _text_store_keys(gallery, load_config(config))
    assert {sha256_text(text) for text in captions} <= set(keys)
    assert matrix.shape[1] == 384  # MiniLM

    after = _cli_json(capsys, gallery, '--config', config, '--status')
    assert (after['captioned'], after['failed'], after['pending']) == (5, 0, 0)


def test_openai_end_to_end_batches_by_platform_and_an_unchanged_gallery_does_no_work(
        chat_server, tmp_path, capsys):
    gallery = tmp_path / 'g'
    expected = _colour_gallery(gallery, 7)
    config = _config_file(tmp_path / 'engine.yaml', _openai(chat_server, concurrency=1))

    capsys.readouterr()
    assert main(['caption', str(gallery), '--config', config, '--progress']) == 0
    out = capsys.readouterr()
    assert 'captioned 7, failed 0 of 7 images' in out.out
    assert 'img/s' in out.err and 'captioning' in out.err  # the tqdm bar, with its rate

    identity = 'openai:tiny-vlm:greedy:max_tokens=96:max_side=1024'
    assert _captions_by_id(gallery, identity) == expected
    # Sorted by platform (satellite, drone, ground), so each batch shares one prompt.
    prompts = [r['body']['messages'][1]['content'][0]['text'] for r in chat_server.requests]
    kinds = [next(k for k in ('satellite', 'drone', 'street') if k in p) for p in prompts]
    assert kinds == ['satellite'] * 3 + ['drone'] * 2 + ['street'] * 2
    keys, _ = _text_store_keys(gallery, load_config(config))
    assert {sha256_text(text) for text in expected.values()} <= set(keys)

    sent = len(chat_server.requests)
    again = _cli_json(capsys, gallery, '--config', config)
    assert len(chat_server.requests) == sent
    assert (again['attempted'], again['new_captions'], again['captions_embedded']) == (0, 0, 0)
    assert again['models_loaded'] == []
    assert (again['captioned'], again['pending']) == (7, 0)

    # A new image is the only work of the next run.
    Image.new('RGB', (50, 20), (10, 10, 240)).save(gallery / 'img' / 'new.png')
    _append_row(gallery, 'new', 'drone')
    third = _cli_json(capsys, gallery, '--config', config)
    assert (third['attempted'], third['new_captions'], third['captioned']) == (1, 1, 8)
    assert len(chat_server.requests) == sent + 1
    assert _captions_by_id(gallery, identity)['new'] == 'a blue roof, 50x20'


def test_failures_are_recorded_listed_and_only_endpoint_failures_are_retried(
        chat_server, tmp_path, capsys):
    gallery = tmp_path / 'g'
    expected = _colour_gallery(gallery, 4, platforms=('satellite',))
    noisy = Image.effect_noise((128, 128), 60).convert('RGB')
    noisy.save(gallery / 'img' / 'cut.png')
    data = (gallery / 'img' / 'cut.png').read_bytes()
    (gallery / 'img' / 'cut.png').write_bytes(data[:len(data) // 2])  # header ok, pixels cut
    (gallery / 'img' / 'junk.png').write_bytes(b'this is not an image at all')
    _append_row(gallery, 'cut')
    _append_row(gallery, 'junk')
    config = _config_file(tmp_path / 'engine.yaml', _openai(chat_server, concurrency=1))
    chat_server.plan = ['ok', 400]  # the endpoint refuses the second image

    capsys.readouterr()
    assert main(['caption', str(gallery), '--config', config]) == 0
    text = capsys.readouterr().out
    assert 'failed 3 of 6 images' in text
    assert "failed line 6 (image_id 'cut', img/cut.png): cannot decode image" in text
    assert "failed line 7 (image_id 'junk', img/junk.png): cannot decode image" in text
    assert "(image_id 'im01', img/im01.png): HTTP 400" in text
    assert len(chat_server.requests) == 4  # the undecodable files never reach the endpoint

    status = _cli_json(capsys, gallery, '--config', config, '--status')
    assert (status['total'], status['captioned'], status['failed'], status['pending']) == \
        (6, 3, 3, 0)
    reasons = {f['image_id']: f['reason'] for f in status['failures']}
    assert set(reasons) == {'cut', 'junk', 'im01'}
    assert 'UnidentifiedImageError' in reasons['junk'] and 'HTTP 400' in reasons['im01']

    # Rerun: the endpoint failure is retried, the undecodable files are not (unchanged).
    again = _cli_json(capsys, gallery, '--config', config)
    assert (again['attempted'], again['new_captions'], again['failed']) == (1, 1, 2)
    assert len(chat_server.requests) == 5
    assert _captions_by_id(gallery, 'openai:tiny-vlm:greedy:max_tokens=96:max_side=1024') == \
        expected
    # A repaired file has new content, so it is captioned.
    Image.new('RGB', (30, 30), (0, 200, 0)).save(gallery / 'img' / 'cut.png')
    fixed = _cli_json(capsys, gallery, '--config', config)
    assert (fixed['attempted'], fixed['new_captions'], fixed['failed']) == (1, 1, 1)
    assert [f['image_id'] for f in fixed['failures']] == ['junk']


def test_changed_prompt_version_recaptions_and_keeps_the_old_captions(chat_server, tmp_path,
                                                                      capsys):
    gallery = tmp_path / 'g'
    _colour_gallery(gallery, 3)
    v1 = _config_file(tmp_path / 'v1.yaml', _openai(chat_server, prompt_version='v1'))
    v2 = _config_file(tmp_path / 'v2.yaml', _openai(chat_server, prompt_version='v2'))
    edited = _config_file(tmp_path / 'edited.yaml', _openai(
        chat_server, prompts={'drone': 'Describe the roof colour.'}))

    assert _cli_json(capsys, gallery, '--config', v1)['new_captions'] == 3
    assert _cli_json(capsys, gallery, '--config', v1)['attempted'] == 0
    second = _cli_json(capsys, gallery, '--config', v2)
    assert (second['prompt_version'], second['new_captions']) == ('v2', 3)
    # An edited prompt without a label changes the hashed prompt version: captioned again.
    third = _cli_json(capsys, gallery, '--config', edited)
    assert third['prompt_version'].startswith('sha256:') and third['new_captions'] == 3
    assert len(chat_server.requests) == 9
    rows, integrity = _rows(gallery)
    assert integrity == 'ok' and len(rows) == 9
    assert _cli_json(capsys, gallery, '--config', v1, '--status')['captioned'] == 3


def test_progress_stop_limit_and_force(chat_server, tmp_path):
    gallery = tmp_path / 'g'
    _colour_gallery(gallery, 9)
    config = load_config(_config_file(tmp_path / 'engine.yaml', _openai(chat_server)))
    seen, stop = [], threading.Event()

    def progress(p):
        seen.append(p)
        if p.done >= 4:
            stop.set()  # as the node's shutdown does: checked before the next batch

    first = run_captioning(gallery, config, progress=progress, stop=stop, batch_size=2)
    assert first.stopped and (first.attempted, first.new_captions, first.pending) == (9, 4, 5)
    assert [(p.done, p.total, p.failed) for p in seen] == [(0, 9, 0), (2, 9, 0), (4, 9, 0)]
    assert seen[0].rate == 0.0 and seen[0].eta_s is None
    assert all(p.rate > 0 and p.eta_s >= 0 for p in seen[1:])
    assert [p.captioned for p in seen] == [0, 2, 4]

    limited = run_captioning(gallery, config, limit=3)
    assert (limited.attempted, limited.new_captions, limited.pending) == (3, 3, 2)
    rest = run_captioning(gallery, config)
    assert (rest.attempted, rest.captioned, rest.pending, rest.stopped) == (2, 9, 0, False)
    forced = run_captioning(gallery, config, force=True, limit=4)
    assert (forced.attempted, forced.new_captions, forced.captioned) == (4, 4, 9)
    rows, integrity = _rows(gallery)
    assert integrity == 'ok' and len(rows) == 9  # recaptioning replaces, never duplicates
    assert len(chat_server.requests) == 13


def test_kill_9_mid_run_loses_only_the_batch_in_flight(chat_server, tmp_path, capsys):
    gallery = tmp_path / 'g'
    expected = _colour_gallery(gallery, 40)
    config = _config_file(tmp_path / 'engine.yaml', _openai(chat_server))
    gate = threading.Event()
    # Three batches of two go through; the fourth batch's requests hang until the gate opens.
    chat_server.plan = ['ok'] * 6 + [('barrier', gate)] * 2
    log = tmp_path / 'caption.log'
    with open(log, 'w') as out:
        proc = subprocess.Popen(
            [sys.executable, '-m', 'cgrs_ros.cli', 'caption', str(gallery), '--config', config,
             '--batch-size', '2', '--json'], stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        # Batch 4 is only sent after batch 3 is committed: its first request is the signal.
        while len(chat_server.requests) < 7:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, 'the captioning run never reached batch 4'
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        gate.set()
        if proc.poll() is None:
            proc.kill()

    identity = 'openai:tiny-vlm:greedy:max_tokens=96:max_side=1024'
    rows, integrity = _rows(gallery, identity)
    assert integrity == 'ok'
    assert len(rows) == 6 and all(r[3] == 'ok' for r in rows)
    status = _cli_json(capsys, gallery, '--config', config, '--status')
    assert (status['captioned'], status['failed'], status['pending']) == (6, 0, 34)

    rerun = _cli_json(capsys, gallery, '--config', config)
    assert (rerun['attempted'], rerun['new_captions'], rerun['new_failures']) == (34, 34, 0)
    assert (rerun['captioned'], rerun['pending']) == (40, 0)
    rows, integrity = _rows(gallery)
    assert integrity == 'ok'
    assert len(rows) == 40 and len({r[0] for r in rows}) == 40  # no duplicates
    assert _captions_by_id(gallery, identity) == expected
    keys, matrix = _text_store_keys(gallery, load_config(config))
    assert len(keys) == len(set(keys)) == 40 and matrix.shape == (40, 384)
    # 6 + 2 (the killed batch) + 34 requests: only the batch in flight was done twice.
    assert len(chat_server.requests) == 42


def test_new_captions_reach_a_running_retriever_and_change_its_ranking(
        chat_server, tiny_open_clip_dir, tmp_path):
    gallery = tmp_path / 'g'
    expected = _colour_gallery(gallery, 6)
    config = load_config(_config_file(
        tmp_path / 'engine.yaml', _openai(chat_server),
        image_encoder={'backend': 'open_clip', 'model': f'local-dir:{tiny_open_clip_dir}',
                       'pretrained': None, 'threads': 1},
        retrieval={'caption_weight': 0.8, 'top_k': 6}))
    index_gallery(gallery, config, progress=False)
    retriever = Retriever.open(gallery, config)
    try:
        before = {c: retriever.query(f'a {c} roof').candidates for c in COLOURS}
        assert all(cand.caption_score is None for cands in before.values() for cand in cands)

        summary = run_captioning(gallery, config)
        assert summary.new_captions == 6 and summary.captions_embedded == 6

        assert retriever.refresh_captions() == 6
        assert retriever.stats()['captioned'] == 6
        after = {c: retriever.query(f'a {c} roof').candidates for c in COLOURS}
    finally:
        retriever.close()
    changed = 0
    for colour in COLOURS:
        top = after[colour][0]
        assert top.caption_score is not None and top.caption == expected[top.image_id]
        assert colour in top.caption  # the caption channel put a matching image first
        changed += [c.image_id for c in after[colour]] != [c.image_id for c in before[colour]]
    assert changed >= 1


def test_manifest_backend_and_bad_arguments_are_one_line_errors(tmp_path, capsys):
    gallery = tmp_path / 'g'
    _colour_gallery(gallery, 2)
    assert main(['caption', str(gallery)]) == 2
    err = capsys.readouterr().err
    assert 'captioner.backend is manifest' in err and len(err.strip().splitlines()) == 1
    assert main(['caption', str(tmp_path / 'nowhere'), '--status']) == 2
    assert 'cgrs caption: error:' in capsys.readouterr().err
    with pytest.raises(Exception, match='captioner.backend is manifest'):
        caption_status(gallery, load_config(None))


def test_a_broken_endpoint_ends_the_run_early_and_the_next_run_retries(
        chat_server, tmp_path, capsys):
    gallery = tmp_path / 'g'
    expected = _colour_gallery(gallery, 14)
    config = _config_file(tmp_path / 'engine.yaml', _openai(chat_server))
    chat_server.plan = [503] * 10  # five whole batches fail, then the server recovers

    capsys.readouterr()
    assert main(['caption', str(gallery), '--config', config, '--json']) == 1
    summary = json.loads(capsys.readouterr().out)
    assert 'failed every image of 5 batches in a row' in summary['aborted']
    assert 'HTTP 503' in summary['aborted']
    assert (summary['attempted'], summary['new_failures'], summary['new_captions']) == (14, 10, 0)
    assert (summary['failed'], summary['pending']) == (10, 4)
    assert len(chat_server.requests) == 10

    again = _cli_json(capsys, gallery, '--config', config)
    assert (again['attempted'], again['new_captions'], again['captioned']) == (14, 14, 14)
    assert again['failures'] == [] and again['aborted'] is None
    assert _captions_by_id(gallery, 'openai:tiny-vlm:greedy:max_tokens=96:max_side=1024') == \
        expected


def test_a_second_run_on_the_same_state_is_refused_while_one_works(
        chat_server, tmp_path, capsys):
    gallery = tmp_path / 'g'
    _colour_gallery(gallery, 4)
    config = _config_file(tmp_path / 'engine.yaml', _openai(chat_server))
    gate = threading.Event()
    chat_server.plan = [('barrier', gate)] * 2
    results = []
    worker = threading.Thread(target=lambda: results.append(
        run_captioning(gallery, load_config(config))))
    worker.start()
    try:
        deadline = time.monotonic() + 60
        while not chat_server.requests:  # the first run is inside its first batch
            assert time.monotonic() < deadline and worker.is_alive()
            time.sleep(0.01)
        assert main(['caption', str(gallery), '--config', config]) == 2
        assert 'another captioning run' in capsys.readouterr().err
        status = _cli_json(capsys, gallery, '--config', config, '--status')  # reading is fine
        assert status['pending'] == 4
    finally:
        gate.set()
        worker.join(timeout=60)
    assert results[0].new_captions == 4
    assert _cli_json(capsys, gallery, '--config', config)['attempted'] == 0  # lock released
    assert not (tmp_path / 'typo').exists()
    assert main(['caption', str(tmp_path / 'typo'), '--config', config]) == 2
    assert not (tmp_path / 'typo').exists()  # no state folder made for a wrong path
