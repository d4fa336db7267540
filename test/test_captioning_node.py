"""captioning_node over real DDS, alone and with retrieval_node in a `cgrs launch` stack.

The captioner is the openai backend talking to ``model_factories.ChatServer`` on 127.0.0.1 (a
thread of this test process), which answers with each image's dominant colour. The server
holds chosen requests until the test opens a gate, so "a run is in progress" is a state the
test controls, not a race against a timer.
"""

import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time

from diagnostic_msgs.msg import DiagnosticArray
from PIL import Image
import pytest
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from ros_probe import RosProbe
from std_msgs.msg import String, UInt32
from std_srvs.srv import Trigger
import yaml

pytestmark = pytest.mark.ros

HEADER = 'image_id,path,lat,lon,alt,heading_deg,platform,group_id,description\n'
COLOURS = ('red', 'green', 'blue')
IDENTITY = 'openai:tiny-vlm:greedy:max_tokens=96:max_side=1024'
LATCHED = QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL,
                     reliability=ReliabilityPolicy.RELIABLE)


def _add_images(root, first, count):
    """Add solid-colour images (no descriptions) to the gallery manifest."""
    (root / 'img').mkdir(parents=True, exist_ok=True)
    manifest = root / 'gallery.csv'
    rows = manifest.read_text() if manifest.exists() else HEADER
    for i in range(first, first + count):
        rgb = [20, 20, 20]
        rgb[i % 3] = 150 + i
        Image.new('RGB', (24 + i, 20), tuple(rgb)).save(root / 'img' / f'im{i:02d}.png')
        rows += (f'im{i:02d},img/im{i:02d}.png,{47.39 + i / 2000},{8.54 + i / 2000},488,0,'
                 f'{("satellite", "drone")[i % 2]},g{i},\n')
    manifest.write_text(rows)


def _engine_yaml(path, server, **sections):
    data = {'image_encoder': {'backend': 'none'}, 'text_encoder': {'threads': 1},
            'captioner': {'backend': 'openai', 'model': 'tiny-vlm', 'base_url': server.url,
                          'timeout_s': 60, 'max_retries': 0, 'concurrency': 2,
                          'api_key_env': None},
            **sections}
    path.write_text(yaml.safe_dump(data))
    return path


def _store_rows(gallery):
    conn = sqlite3.connect(str(gallery / '.cgrs' / 'captions.sqlite'))
    try:
        return conn.execute('SELECT content_hash, status, text FROM captions WHERE captioner = ?',
                            (IDENTITY,)).fetchall()
    finally:
        conn.close()


class Probe(RosProbe):
    """Listens to the captioning node and calls its services."""

    def __init__(self, namespace='cgrs'):
        super().__init__('cgrs_caption_probe')
        ns = self.ns = f'/{namespace}'
        self.listen('progress', String, f'{ns}/captioning_node/progress', LATCHED,
                    lambda m: json.loads(m.data))
        self.listen('updated', UInt32, f'{ns}/captions_updated', LATCHED, lambda m: m.data)
        self.listen('diag', DiagnosticArray, '/diagnostics')
        self.rescan_client = self.node.create_client(Trigger, f'{ns}/captioning_node/rescan')

    def progress(self, predicate, what, proc=None, timeout=60.0):
        return self.wait_for(lambda h: [p for p in h['progress'] if predicate(p)],
                             timeout, what, proc)[-1]

    def rescan(self):
        return self.call(self.rescan_client, Trigger.Request())

    def set_param(self, name, value):
        return super().set_param(f'{self.ns}/captioning_node', name, value)


class Output:
    """Collects a child process's output lines in a thread, so a test can wait for one."""

    def __init__(self, proc):
        self.lines = []
        self._thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self._thread.start()

    def _read(self, proc):
        for line in proc.stdout:
            self.lines.append(line)

    def text(self):
        return ''.join(self.lines)

    def wait_for(self, needle, timeout=60.0):
        deadline = time.monotonic() + timeout
        while needle not in self.text():
            assert time.monotonic() < deadline, f'no {needle!r} in the output:\n{self.text()}'
            time.sleep(0.02)


def _start_node(*params):
    args = [sys.executable, '-m', 'cgrs_ros.nodes.captioning_node', '--ros-args',
            '-r', '__ns:=/cgrs']
    for param in params:
        args += ['-p', param]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED='1'))
    return proc, Output(proc)


def _stop(proc, output):
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise AssertionError(f'the node ignored Ctrl-C:\n{output.text()}')


@pytest.fixture(scope='module')
def served():
    """One chat server for the module (the running node keeps talking to it)."""
    from model_factories import ChatServer
    server = ChatServer()
    yield server
    server.close()


@pytest.fixture(scope='module')
def node(served, tmp_path_factory, module_ros_domain):
    """A captioning node over a 6-image gallery whose third and fourth requests are held."""
    root = tmp_path_factory.mktemp('node')
    gallery = root / 'gallery'
    _add_images(gallery, 0, 6)
    config = _engine_yaml(root / 'engine.yaml', served)
    gate = threading.Event()
    served.plan = ['ok', 'ok', ('barrier', gate), ('barrier', gate)]
    proc, output = _start_node(f'gallery_dir:={gallery}', f'config:={config}', 'batch_size:=2')
    probe = Probe()
    try:
        yield {'probe': probe, 'proc': proc, 'output': output, 'gallery': gallery,
               'gate': gate, 'server': served}
    finally:
        gate.set()
        probe.close()
        _stop(proc, output)


def test_captions_on_start_reports_progress_and_refuses_a_rescan_while_busy(node):
    probe, proc = node['probe'], node['proc']
    first = probe.progress(lambda p: p['state'] == 'running' and p['done'] == 2,
                           'progress after the first batch', proc)
    assert (first['total'], first['failed'], first['captioned'], first['gallery']) == \
        (6, 0, 2, 6)
    assert first['rate'] > 0 and first['eta_s'] is not None
    assert probe.wait_for(lambda h: h['updated'], what='captions_updated')[-1] == 2

    # The second batch is held by the server: the run is in progress, the node responsive.
    busy = probe.rescan()
    assert not busy.success and 'already in progress (2/6 done)' in busy.message

    node['gate'].set()
    done = probe.progress(lambda p: p['state'] == 'done', 'the end of the run', proc)
    assert (done['done'], done['total'], done['failed']) == (6, 6, 0)
    assert (done['captioned'], done['gallery'], done['captioner']) == (6, 6, IDENTITY)
    assert probe.wait_for(lambda h: h['updated'] and h['updated'][-1] == 6,
                          what='captions_updated 6')
    rows = _store_rows(node['gallery'])
    assert len(rows) == 6 and {r[1] for r in rows} == {'ok'}
    assert sorted(r[2].split(',')[0] for r in rows) == ['a blue roof'] * 2 + \
        ['a green roof'] * 2 + ['a red roof'] * 2
    diag = probe.wait_for(lambda h: [s for d in h['diag'] for s in d.status
                                     if s.name.endswith('captioning')
                                     and any(kv.key == 'state' and kv.value == 'done'
                                             for kv in s.values)], what='diagnostics')[-1]
    assert {kv.key: kv.value for kv in diag.values}['captioned'] == '6'


def test_rescan_captions_new_images_and_then_has_nothing_to_do(node):
    probe, proc, server = node['probe'], node['proc'], node['server']
    probe.progress(lambda p: p['state'] == 'done' and p['run'] == 1, 'the first run', proc)
    _add_images(node['gallery'], 6, 3)
    started = probe.rescan()
    assert started.success, started.message
    done = probe.progress(lambda p: p['state'] == 'done' and p['run'] == 2, 'the rescan', proc)
    assert (done['done'], done['total'], done['captioned'], done['gallery']) == (3, 3, 9, 9)
    assert probe.wait_for(lambda h: h['updated'] and h['updated'][-1] == 9,
                          what='captions_updated 9')

    sent = len(server.requests)
    assert probe.rescan().success
    idle = probe.progress(lambda p: p['state'] == 'done' and p['run'] == 3, 'an empty run', proc)
    assert (idle['total'], idle['captioned']) == (0, 9)
    assert len(server.requests) == sent


def test_bad_parameter_values_are_refused_with_a_reason(node):
    probe = node['probe']
    refused = probe.set_param('batch_size', -1)
    assert not refused.successful and 'batch_size' in refused.reason and '-1' in refused.reason
    wrong_type = probe.set_param('batch_size', 'eight')
    assert not wrong_type.successful and wrong_type.reason
    read_only = probe.set_param('gallery_dir', '/elsewhere')
    assert not read_only.successful
    assert probe.set_param('batch_size', 3).successful


@pytest.mark.parametrize('param, reason', [
    ('gallery_dir:=/no/such/gallery', 'is not a folder'),
    ('config:=/no/such/engine.yaml', 'is not a file'),
])
def test_invalid_start_parameters_stop_the_node_with_a_reason(tmp_path, ros_domain, param,
                                                              reason):
    gallery = tmp_path / 'gallery'
    _add_images(gallery, 0, 1)
    params = [f'gallery_dir:={gallery}', param]
    proc = subprocess.run(
        [sys.executable, '-m', 'cgrs_ros.nodes.captioning_node', '--ros-args',
         *[arg for p in params for arg in ('-p', p)]],
        capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert 'invalid parameter' in out and reason in out, out


def test_manifest_config_idles_and_ctrl_c_stops_a_run_between_batches(
        chat_server, tmp_path, ros_domain):
    gallery = tmp_path / 'gallery'
    _add_images(gallery, 0, 6)
    # No captioner configured: the node says why it has nothing to do, and stays up.
    manifest_config = tmp_path / 'manifest.yaml'
    manifest_config.write_text('captioner: {backend: manifest}\n')
    proc, output = _start_node(f'gallery_dir:={gallery}', f'config:={manifest_config}')
    probe = Probe()
    try:
        idle = probe.progress(lambda p: p['state'] == 'idle' and 'manifest' in p['message'],
                              'the idle state', proc)
        assert idle['done'] == 0
        refused = probe.rescan()
        assert not refused.success and 'captioner.backend is manifest' in refused.message
    finally:
        _stop(proc, output)
    assert proc.returncode == 0, output.text()

    gate = threading.Event()
    chat_server.plan = ['ok', 'ok', ('barrier', gate), ('barrier', gate)]
    config = _engine_yaml(tmp_path / 'engine.yaml', chat_server)
    proc, output = _start_node(f'gallery_dir:={gallery}', f'config:={config}', 'batch_size:=2')
    try:
        probe.progress(lambda p: p['state'] == 'running' and p['done'] == 2 and p['run'] == 1
                       and p['gallery'] == 6, 'the first batch', proc)
        probe.wait_for(lambda h: len(h['updated']) >= 1, what='captions_updated')
        proc.send_signal(signal.SIGINT)  # the second batch is in flight (held by the server)
        output.wait_for('finishing the batch in flight')
        gate.set()
        assert proc.wait(timeout=60) == 0, output.text()
    finally:
        gate.set()
        probe.close()
        if proc.poll() is None:
            proc.kill()
    output.wait_for('captioning stopped')
    # The batch in flight was finished and committed; the third batch never started.
    rows = _store_rows(gallery)
    assert len(rows) == 4 and {r[1] for r in rows} == {'ok'}
    assert len(chat_server.requests) == 4


def test_stack_picks_up_new_captions_without_restart(chat_server, tiny_open_clip_dir, tmp_path,
                                                     ros_domain):
    """cgrs launch captioning:=true over a gallery without descriptions (coarse-only at first)."""
    from cgrs_ros.msg import RetrievalResult
    gallery = tmp_path / 'gallery'
    _add_images(gallery, 0, 6)
    config = _engine_yaml(
        tmp_path / 'engine.yaml', chat_server,
        image_encoder={'backend': 'open_clip', 'model': f'local-dir:{tiny_open_clip_dir}',
                       'pretrained': None, 'threads': 1},
        retrieval={'caption_weight': 0.8, 'top_k': 3})
    params = tmp_path / 'params.yaml'
    params.write_text(yaml.safe_dump({
        '/**/retrieval_node': {'ros__parameters': {
            'gallery_dir': str(gallery), 'config': str(config), 'caption_poll_period': 0.0}},
        '/**/captioning_node': {'ros__parameters': {
            'gallery_dir': str(gallery), 'config': str(config), 'batch_size': 2}},
    }))
    gate = threading.Event()
    chat_server.plan = [('barrier', gate)] * 6  # no caption until the test says so
    proc = subprocess.Popen(
        [sys.executable, '-m', 'cgrs_ros.cli', 'launch', f'params_file:={params}',
         'captioning:=true'], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=dict(os.environ, PYTHONUNBUFFERED='1'))
    output = Output(proc)
    try:
        probe = Probe()
    except BaseException:
        _stop(proc, output)
        raise
    goals = probe.node.create_publisher(String, '/cgrs/goal_text', 10)
    probe.listen('result', RetrievalResult, '/cgrs/result')

    def say(text):
        seen = probe.count('result')
        goals.publish(String(data=text))
        return probe.wait_for(lambda h: [r for r in h['result'][seen:] if r.query == text],
                              90.0, f'result of {text!r}', proc)[-1]

    def retrieval_diag(key, value):
        return probe.wait_for(
            lambda h: [s for d in h['diag'] for s in d.status if s.name.endswith('retrieval')
                       and any(kv.key == key and kv.value == value for kv in s.values)],
            180.0, f'retrieval_node {key}={value} (log:\n{output.text()})', proc)

    try:
        retrieval_diag('engine', 'ready')
        before = say('a red roof')
        assert before.status == RetrievalResult.STATUS_OK, before.error
        assert all(math.isnan(c.caption_score) for c in before.candidates)

        gate.set()
        probe.progress(lambda p: p['state'] == 'done' and p['captioned'] == 6,
                       'captioning done', proc)
        retrieval_diag('captioned', '6')  # picked up on captions_updated, no restart
        after = say('a red roof')
        assert after.status == RetrievalResult.STATUS_OK, after.error
        assert all(not math.isnan(c.caption_score) for c in after.candidates)
        assert after.candidates[0].caption.startswith('a red roof')
    finally:
        gate.set()
        probe.close()
        _stop(proc, output)
    assert proc.returncode == 0, output.text()
    text = output.text()
    assert 'picked up' in text and text.count('[retrieval_node] ') and \
        text.count('ready:') == 1, text  # refreshed in place, never restarted
