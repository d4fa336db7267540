"""The operator console and confirmation, as an operator meets them.

The stack (retrieval_node, sim_drone, console_node) runs as processes started by `cgrs launch`;
a headless Chromium (Debian's, driven by Playwright) uses the page, and a probe node in the test
process checks over DDS what reaches /goal_pose. Expected values are computed independently
(pyproj for positions and distances, the logistic formula for the confidence).
"""

import http.client
import json
import math
import os
from pathlib import Path
import re
import shutil
import subprocess
import sys
import time
import wave

from cgrs_ros.action import Retrieve
from cgrs_ros.msg import AudioData, RetrievalResult
from cgrs_ros.srv import Confirm
from diagnostic_msgs.msg import DiagnosticArray
from geometry_msgs.msg import PointStamped, PoseStamped
import numpy as np
from PIL import Image
import pyproj
import pytest
from rclpy.action import ActionClient
from ros_probe import launched_stack, RosProbe

pytestmark = pytest.mark.ros

DATUM = (47.3977, 8.5456, 488.0)
POND = 'a small round pond of blue water surrounded by tall green trees'
PLACES = [
    # image_id, d_east, d_north, group, description (every row a satellite tile, for the map)
    ('pond_a', -300.0, 250.0, 'g_pond_a', POND),
    ('pond_b', 350.0, -200.0, 'g_pond_b', POND),   # the same words: a tie for any pond goal
    ('field', 60.0, -240.0, 'g_field', 'a football pitch with white lines next to a running '
     'track'),
    ('roof_red', 120.0, 80.0, 'g_roof', 'a building with a bright red roof beside a circular '
     'plaza paved in grey stone'),
    ('roof_red2', -400.0, -350.0, 'g_roof2', 'a building with a bright red roof beside a small '
     'car park'),
    ('parking', -90.0, -60.0, 'g_parking', 'a large parking lot full of cars by a supermarket'),
]
# The test config's calibration: confidence = sigmoid(-1 + 20 * margin + 1 * top).
CALIBRATION = {'intercept': -1.0, 'weights': {'margin': 20.0, 'top': 1.0}}
GEOD = pyproj.Geod(ellps='WGS84')
CHROMIUM = shutil.which('chromium') or shutil.which('chromium-browser')
ESPEAK = shutil.which('espeak-ng')


def _place_latlon(d_east, d_north):
    lon, lat, _ = GEOD.fwd(DATUM[1], DATUM[0], math.degrees(math.atan2(d_east, d_north)),
                           math.hypot(d_east, d_north))
    return lat, lon


def _enu(lat, lon):
    """Map-frame east/north of a position, by PROJ (independent of the engine)."""
    pipeline = pyproj.Transformer.from_pipeline(
        '+proj=pipeline +step +proj=cart +ellps=WGS84 '
        f'+step +proj=topocentric +ellps=WGS84 +lat_0={DATUM[0]!r} +lon_0={DATUM[1]!r} '
        f'+h_0={DATUM[2]!r}')
    e, n, _ = pipeline.transform(lon, lat, DATUM[2])
    return e, n


@pytest.fixture(scope='module')
def gallery(tmp_path_factory):
    root = tmp_path_factory.mktemp('console_gallery')
    (root / 'images').mkdir()
    outside = tmp_path_factory.mktemp('outside') / 'secret.png'
    Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(outside)
    # A manifest row whose image is a symlink out of the gallery: the console must refuse it.
    (root / 'images' / 'leak.png').symlink_to(outside)
    rng = np.random.default_rng(0)
    rows = ['image_id,path,lat,lon,alt,heading_deg,platform,group_id,description']
    for image_id, de, dn, group, text in PLACES:
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(
            root / 'images' / f'{image_id}.png')
        lat, lon = _place_latlon(de, dn)
        rows.append(f'{image_id},images/{image_id}.png,{lat!r},{lon!r},{DATUM[2]},0,satellite,'
                    f'{group},"{text}"')
    lat, lon = _place_latlon(500.0, 500.0)
    rows.append(f'leak,images/leak.png,{lat!r},{lon!r},{DATUM[2]},0,satellite,g_leak,'
                '"a grey square of concrete"')
    (root / 'gallery.csv').write_text('\n'.join(rows) + '\n')
    engine = root / 'engine.yaml'
    engine.write_text('image_encoder: {backend: none}\ncaptioner: {backend: manifest}\n'
                      f'confidence: {json.dumps(CALIBRATION)}\n')
    datum = f'{{latitude: {DATUM[0]}, longitude: {DATUM[1]}, altitude: {DATUM[2]}}}'
    params = root / 'params.yaml'
    params.write_text(
        '/**/retrieval_node:\n  ros__parameters:\n'
        f'    gallery_dir: "{root}"\n    config: "{engine}"\n    datum: {datum}\n'
        '    top_k: 3\n    caption_poll_period: 0.0\n'
        '    min_confidence: 0.5\n    min_margin: 0.02\n'
        '/**/console_node:\n  ros__parameters:\n'
        f'    gallery_dir: "{root}"\n    datum: {datum}\n    console: {{port: 0}}\n'
        '/**/sim_drone:\n  ros__parameters:\n'
        f'    gallery_dir: "{root}"\n    datum: {datum}\n    max_speed: 40.0\n'
        # The console's push-to-talk recordings in, spoken goals out on goal_text.
        '/**/voice_node:\n  ros__parameters:\n'
        f'    gallery_dir: "{root}"\n    config: "{engine}"\n    audio_source: topic\n')
    return {'root': root, 'params': params, 'engine': engine}


class Probe(RosProbe):
    """Listens to /goal_pose and results; sends action goals, confirmations, clicks."""

    def __init__(self):
        super().__init__('cgrs_console_probe')
        self.listen('pose', PoseStamped, '/goal_pose')
        self.listen('result', RetrievalResult, '/cgrs/result', 100)
        self.listen('diag', DiagnosticArray, '/diagnostics')
        self.listen('audio', AudioData, '/cgrs/audio', 100)
        self.action = ActionClient(self.node, Retrieve, '/cgrs/retrieve')
        self.confirm = self.node.create_client(Confirm, '/cgrs/retrieval_node/confirm')
        self.clicks = self.node.create_publisher(PointStamped, '/clicked_point', 10)

    def retrieve(self, **goal):
        """Send a Retrieve goal and return its RetrievalResult."""
        assert self.action.wait_for_server(timeout_sec=30.0), 'retrieve action not found'
        handle = self.wait_future(self.action.send_goal_async(Retrieve.Goal(**goal)))
        assert handle.accepted
        return self.wait_future(handle.get_result_async(), 60.0, 'the result').result.result


@pytest.fixture(scope='module')
def stack(gallery, tmp_path_factory, module_ros_domain):
    log = tmp_path_factory.mktemp('log') / 'launch.log'
    with launched_stack(gallery['params'], log, Probe,
                        args=('console:=true', 'sim:=true', 'voice:=true')) as (probe, proc):
        deadline = time.monotonic() + 60.0
        port = None
        while port is None and time.monotonic() < deadline:
            found = re.search(r'console at http://127\.0\.0\.1:(\d+)/', log.read_text())
            port = int(found.group(1)) if found else time.sleep(0.2)
        assert port, f'console_node did not report its address: {log.read_text()}'
        yield {'probe': probe, 'proc': proc, 'log': log, 'port': port, 'gallery': gallery}


def _http(port, method, path, body=None, headers=None):
    """One raw HTTP request to the console (paths are sent exactly as given)."""
    conn = http.client.HTTPConnection('127.0.0.1', port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _poses_since(probe, seen):
    with probe.lock:
        return list(probe.heard['pose'][seen:])


def _same_xy(pose, candidate, tol=0.05):
    return (abs(pose.pose.position.x - candidate.pose.position.x) < tol
            and abs(pose.pose.position.y - candidate.pose.position.y) < tol)


def _wait_js(page, expression, what, timeout=30.0):
    """Poll a JS expression until truthy (the page's CSP forbids wait_for_function's eval)."""
    deadline = time.monotonic() + timeout
    while not page.evaluate(expression):
        assert time.monotonic() < deadline, f'timed out waiting for {what}: ' + str(
            page.evaluate("() => [...document.querySelectorAll('img')].map(i => [i.src, "
                          'i.complete, i.naturalWidth])'))
        time.sleep(0.1)


def _sigmoid(z):
    return 1.0 / (1.0 + math.exp(-z))


def test_page_shows_candidates_and_confirms_the_second(stack, tmp_path):
    if CHROMIUM is None:
        pytest.skip('Debian chromium is not installed: run `make setup` as root (it installs '
                    'chromium and chromium-driver), or apt-get install chromium')
    from playwright.sync_api import sync_playwright
    probe, port = stack['probe'], stack['port']
    goal = 'a building with a bright red roof'
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                     args=['--no-sandbox'])
        try:
            page = browser.new_page(viewport={'width': 1400, 'height': 900})
            errors = []
            page.on('pageerror', lambda exc: errors.append(str(exc)))
            page.goto(f'http://127.0.0.1:{port}/')
            page.wait_for_selector('#connection.ok', timeout=30_000)
            page.fill('#goal-text', goal)
            page.select_option('#policy', 'confirm')   # nothing flies before the operator picks
            seen_results, seen_poses = probe.count('result'), probe.count('pose')
            page.click('#send')
            page.wait_for_selector('#candidates .candidate[data-rank="3"]', timeout=60_000)
            result = probe.wait_for(lambda h: [r for r in h['result'][seen_results:]
                                               if r.query == goal], 30, 'the result')[-1]
            assert result.status == RetrievalResult.STATUS_AWAITING_CONFIRMATION
            assert page.text_content('#result-status') == 'awaiting confirmation'
            shown = page.eval_on_selector_all(
                '#candidates .candidate', 'els => els.map(e => e.dataset.imageId)')
            assert shown == [c.image_id for c in result.candidates]
            captions = page.eval_on_selector_all('#candidates .caption',
                                                 'els => els.map(e => e.textContent)')
            assert captions == [c.caption for c in result.candidates]
            assert 'confidence' in page.text_content('#confidence')
            # Every thumbnail decoded (served from the gallery), except the symlink out of it.
            _wait_js(page, "() => [...document.querySelectorAll('img.thumb')].every("
                     'i => i.complete)', 'the thumbnails')
            loaded = page.eval_on_selector_all('img.thumb', 'els => els.map(i => [i.alt, '
                                               'i.naturalWidth])')
            assert all((width > 0) == (alt != 'leak') for alt, width in loaded), loaded
            assert _poses_since(probe, seen_poses) == [], 'a pose was sent before confirming'

            page.click('#candidates .candidate[data-rank="2"] .send-candidate')
            second = result.candidates[1]
            pose = probe.wait_for(lambda h: h['pose'][seen_poses:], 30,
                                  '/goal_pose after confirming #2')[0]
            assert _same_xy(pose, second), (pose.pose.position, second.pose.position)
            assert not _same_xy(pose, result.candidates[0])
            page.wait_for_selector('#candidates .candidate.selected[data-rank="2"]',
                                   timeout=30_000)
            # The drone (sim_drone) is on its way: the page shows its live state.
            _wait_js(page, "() => /flying|arrived/.test(document.querySelector('#drone-status')"
                     '.textContent)', 'the drone state on the page')
            assert page.locator('#history li').count() >= 2

            # A click on the map near roof_red2 narrows the next goal to prior_radius_m (300 m).
            meta = json.loads(_http(port, 'GET', '/api/map')[1])
            box = page.locator('#map-overlay').bounding_box()
            x, y = _enu(*_place_latlon(-380.0, -330.0))
            page.click('#map-overlay', position={
                'x': (x - meta['x_min']) / (meta['x_max'] - meta['x_min']) * box['width'],
                'y': (meta['y_max'] - y) / (meta['y_max'] - meta['y_min']) * box['height']})
            page.wait_for_selector('#clear-prior:not([hidden])', timeout=30_000)
            assert '300 m around' in page.text_content('#prior-text')
            page.select_option('#policy', 'auto')
            seen_results = probe.count('result')
            page.click('#send')
            # (The confirmation of #2 repeats the earlier result_id; it may still be arriving.)
            narrow = probe.wait_for(lambda h: [r for r in h['result'][seen_results:]
                                               if r.query == goal
                                               and r.result_id != result.result_id],
                                    30, 'the narrowed goal')[-1]
            assert narrow.area_radius_m == pytest.approx(300.0)
            assert [c.image_id for c in narrow.candidates] == ['roof_red2']
            page.click('#clear-prior')
            page.wait_for_selector('#clear-prior[hidden]', state='attached', timeout=30_000)
            artifacts = Path(os.environ.get('CGRS_TEST_ARTIFACTS',
                                            Path(__file__).parents[1] / 'build' /
                                            'test-artifacts'))
            artifacts.mkdir(parents=True, exist_ok=True)
            shot = artifacts / 'console.png'
            page.screenshot(path=str(shot), full_page=True)
            assert errors == [], f'JavaScript errors on the page: {errors}'
        finally:
            browser.close()
    pixels = np.asarray(Image.open(shot).convert('RGB'))
    assert pixels.shape[0] >= 800 and pixels.shape[1] >= 1300
    colours = len(np.unique(pixels.reshape(-1, 3)[::7], axis=0))
    assert pixels.std() > 20 and colours > 200, (pixels.std(), colours)


def test_push_to_talk_speaks_a_goal_through_voice_node(stack, tmp_path):
    if CHROMIUM is None or ESPEAK is None:
        pytest.skip('Debian chromium and espeak-ng are needed: run `make setup` as root (it '
                    'installs both)')
    from playwright.sync_api import sync_playwright
    probe, port = stack['probe'], stack['port']
    spoken = 'a football pitch with white lines next to a running track'
    wav = tmp_path / 'goal.wav'
    subprocess.run([ESPEAK, '-v', 'en-us', '-s', '150', '-w', str(wav), spoken], check=True,
                   capture_output=True)
    seconds = wave.open(str(wav)).getnframes() / wave.open(str(wav)).getframerate()
    with sync_playwright() as pw:
        # Chromium's fake microphone plays the spoken goal (once), as an operator would say it.
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            '--no-sandbox', '--use-fake-device-for-media-stream',
            '--use-fake-ui-for-media-stream', f'--use-file-for-fake-audio-capture={wav}%noloop'])
        try:
            page = browser.new_page()
            errors = []
            page.on('pageerror', lambda exc: errors.append(str(exc)))
            page.goto(f'http://127.0.0.1:{port}/')
            # The button is offered because voice_node subscribes to audio.
            page.wait_for_selector('#talk:not([hidden])', timeout=60_000)
            seen_audio, seen_results = probe.count('audio'), probe.count('result')
            page.hover('#talk')
            page.mouse.down()
            page.wait_for_selector('#talk.recording', timeout=30_000)
            time.sleep(seconds + 1.5)   # the goal, then silence that ends the utterance
            page.mouse.up()
            result = probe.wait_for(lambda h: h['result'][seen_results:], 90,
                                    'a result of the spoken goal')[-1]
            deadline = time.monotonic() + 30.0
            while result.query not in page.text_content('#query-line'):
                assert time.monotonic() < deadline, 'the page did not show the spoken goal'
                time.sleep(0.1)
            assert page.locator('#candidates .candidate').count() == len(result.candidates)
            assert errors == [], errors
        finally:
            browser.close()
    with probe.lock:
        chunks = probe.heard['audio'][seen_audio:]
    rate = chunks[0].sample_rate
    assert all(c.encoding == AudioData.ENCODING_S16LE and c.channels == 1 and
               c.sample_rate == rate for c in chunks)
    assert all(len(c.data) / 2 / rate <= 0.2 for c in chunks)   # 10-200 ms chunks
    samples = np.frombuffer(b''.join(bytes(c.data) for c in chunks), dtype='<i2')
    assert len(samples) / rate >= seconds
    # voice_node heard the goal: its transcript is the goal retrieval_node ranked.
    heard = set(result.query.lower().split())
    assert len(heard & {'football', 'pitch', 'white', 'lines', 'running', 'track'}) >= 3, (
        result.query)
    assert result.candidates[0].image_id == 'field', result.query


def test_confirm_below_holds_a_near_tie_until_confirmed(stack):
    probe = stack['probe']
    seen = probe.count('pose')
    tie = probe.retrieve(description='a small round pond surrounded by tall trees',
                         goal_policy='confirm_below')
    assert tie.status == RetrievalResult.STATUS_AWAITING_CONFIRMATION, tie.error
    assert {c.image_id for c in tie.candidates[:2]} == {'pond_a', 'pond_b'}
    # The margin to the next place: the two ponds share one description.
    assert tie.margin == pytest.approx(0.0, abs=1e-4)
    best = tie.candidates[0]
    assert tie.confidence == pytest.approx(
        _sigmoid(-1.0 + 20.0 * 0.0 + 1.0 * best.fused_score), abs=1e-3)
    assert tie.selected_rank == 0 and tie.result_id
    time.sleep(1.0)  # the result is published after any pose would have been
    assert _poses_since(probe, seen) == []

    # Confirmed by rank through the service: now the pose is sent.
    answer = probe.call(probe.confirm, Confirm.Request(result_id=tie.result_id, rank=2))
    assert answer.success, answer.message
    assert answer.result.status == RetrievalResult.STATUS_OK
    assert answer.result.selected_rank == 2
    pose = probe.wait_for(lambda h: h['pose'][seen:], 30, '/goal_pose after ~/confirm')[0]
    assert _same_xy(pose, tie.candidates[1])
    # Out-of-range ranks and unknown results are refused with the reason.
    bad = probe.call(probe.confirm, Confirm.Request(result_id=tie.result_id, rank=9))
    assert not bad.success and 'out of range' in bad.message
    unknown = probe.call(probe.confirm, Confirm.Request(result_id='nope', rank=1))
    assert not unknown.success and 'no recent result' in unknown.message

    # A clear goal under the same policy goes straight through, with its confidence.
    seen = probe.count('pose')
    clear = probe.retrieve(description='a football pitch with white lines and a running track',
                           goal_policy='confirm_below')
    assert clear.status == RetrievalResult.STATUS_OK, clear.error
    assert clear.candidates[0].image_id == 'field' and clear.selected_rank == 1
    first, second = clear.candidates[0], clear.candidates[1]
    margin = first.fused_score - second.fused_score
    assert clear.margin == pytest.approx(margin, abs=1e-4)
    assert clear.confidence == pytest.approx(
        _sigmoid(-1.0 + 20.0 * margin + first.fused_score), abs=1e-3)
    assert clear.confidence >= 0.5 and clear.margin >= 0.02
    pose = probe.wait_for(lambda h: h['pose'][seen:], 30, 'the clear goal pose')[0]
    assert _same_xy(pose, first)

    # The action can confirm too: a held ranking, then confirm_id / confirm_rank.
    held = probe.retrieve(description=POND, goal_policy='confirm')
    assert held.status == RetrievalResult.STATUS_AWAITING_CONFIRMATION
    seen = probe.count('pose')
    done = probe.retrieve(confirm_id=held.result_id, confirm_rank=1)
    assert done.status == RetrievalResult.STATUS_OK and done.selected_rank == 1
    pose = probe.wait_for(lambda h: h['pose'][seen:], 30, 'the pose confirmed by action')[0]
    assert _same_xy(pose, held.candidates[0])


def test_a_clicked_point_narrows_the_search_to_its_radius(stack):
    probe = stack['probe']
    goal = 'a building with a bright red roof'
    wide = probe.retrieve(description=goal)
    assert {'roof_red', 'roof_red2'} <= {c.image_id for c in wide.candidates}
    assert wide.area_radius_m == 0.0

    assert probe.set_param('/cgrs/retrieval_node', 'prior_radius_m', 150.0).successful
    lat, lon = _place_latlon(-380.0, -330.0)   # 28 m from roof_red2, far from the rest
    x, y = _enu(lat, lon)
    click = PointStamped()
    click.header.frame_id = 'map'
    click.point.x, click.point.y = x, y
    seen = probe.count('result')
    deadline = time.monotonic() + 30.0
    narrow = None
    while time.monotonic() < deadline:  # the click may arrive after the first goal
        probe.clicks.publish(click)
        narrow = probe.retrieve(description=goal)
        if narrow.area_radius_m > 0:
            break
        time.sleep(0.3)
    assert narrow.area_radius_m == pytest.approx(150.0)
    assert narrow.area_latitude == pytest.approx(lat, abs=1e-7)
    assert narrow.area_longitude == pytest.approx(lon, abs=1e-7)
    assert [c.image_id for c in narrow.candidates] == ['roof_red2']
    for c in narrow.candidates:
        _, _, dist = GEOD.inv(lon, lat, c.longitude, c.latitude)
        assert dist <= 150.0
    assert probe.count('result') > seen

    # An action goal's own area wins over the prior; radius 0 falls back to the prior.
    plat, plon = _place_latlon(120.0, 80.0)
    own = probe.retrieve(description=goal, near_latitude=plat, near_longitude=plon,
                         near_radius_m=60.0)
    assert [c.image_id for c in own.candidates] == ['roof_red']
    bad = probe.retrieve(description=goal, near_latitude=plat, near_longitude=plon,
                         near_radius_m=-5.0)
    assert bad.status == RetrievalResult.STATUS_INVALID_GOAL and 'near_radius_m' in bad.error

    # Clearing the prior (as the console's button does) searches everything again.
    assert probe.set_param('/cgrs/retrieval_node', 'prior.latitude', math.nan).successful
    again = probe.retrieve(description=goal)
    assert again.area_radius_m == 0.0 and len(again.candidates) == 3


def test_console_refuses_traversal_foreign_hosts_and_other_origins(stack):
    port = stack['port']
    status, body = _http(port, 'GET', '/thumb/roof_red')
    assert status == 200 and body[:2] == b'\xff\xd8'   # a JPEG thumbnail
    manifest = (stack['gallery']['root'] / 'gallery.csv').read_bytes()[:40]
    for path in ('/thumb/..%2Fgallery.csv', '/thumb/../gallery.csv', '/static/../gallery.csv',
                 '/static/..%2F..%2F..%2Fgallery.csv', '/static/%2e%2e/%2e%2e/web.py',
                 '/thumb/%2e%2e%2f%2e%2e%2fetc%2fpasswd'):
        status, body = _http(port, 'GET', path)
        assert status in (403, 404), (path, status)
        assert manifest not in body and b'root:' not in body and b'import' not in body
    status, body = _http(port, 'GET', '/thumb/leak')   # a symlink out of the gallery
    assert status == 403, body
    status, body = _http(port, 'GET', '/api/map')     # nor is it drawn on the map
    assert status == 200 and json.loads(body)['tiles'] == len(PLACES)
    status, _ = _http(port, 'GET', '/', headers={'Host': f'attacker.example:{port}'})
    assert status == 421
    goal = json.dumps({'text': 'a parking lot'})
    status, _ = _http(port, 'POST', '/api/goal', goal, {
        'Content-Type': 'application/json', 'Origin': 'http://attacker.example'})
    assert status == 403
    status, _ = _http(port, 'POST', '/api/goal', goal, {'Content-Type': 'text/plain'})
    assert status == 415
    status, body = _http(port, 'GET', '/')
    assert status == 200 and b'cgrs console' in body
    assert b'http' not in body.replace(b'http-equiv', b'')   # every asset from the package


def _start_console(gallery, *params):
    args = [sys.executable, '-m', 'cgrs_ros.nodes.console_node', '--ros-args',
            '-p', f'gallery_dir:={gallery}']
    for param in params:
        args += ['-p', param]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED='1'))


def test_non_local_bind_needs_a_token(gallery, ros_domain):
    proc = _start_console(gallery['root'], 'console.host:=0.0.0.0', 'console.port:=0')
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2, out
    assert 'console.token' in out and '127.0.0.1' in out

    # With a token every request must carry it (here on the loopback).
    proc = _start_console(gallery['root'], 'console.port:=0', 'console.token:=s3cret-token')
    try:
        port, lines = None, []
        deadline = time.monotonic() + 60.0
        while port is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            lines.append(line)
            found = re.search(r'console at http://127\.0\.0\.1:(\d+)/', line)
            port = int(found.group(1)) if found else None
            assert proc.poll() is None, ''.join(lines)
        assert port, ''.join(lines)
        assert _http(port, 'GET', '/')[0] == 401
        # Nothing listens on audio in this domain: no push-to-talk offered.
        status, body = _http(port, 'GET', '/api/state?token=s3cret-token')
        assert status == 200 and json.loads(body)['voice'] is False
        assert _http(port, 'GET', '/?token=wrong')[0] == 401
        assert _http(port, 'GET', '/?token=s3cret-token')[0] == 200
        assert _http(port, 'GET', '/api/map',
                     headers={'Authorization': 'Bearer s3cret-token'})[0] == 200
    finally:
        proc.send_signal(2)
        proc.wait(timeout=30)


def test_cgrs_goal_holds_and_confirms_from_the_command_line(stack):
    probe = stack['probe']

    def cgrs_goal(*args):
        return subprocess.run([sys.executable, '-m', 'cgrs_ros.cli', 'goal', *args],
                              capture_output=True, text=True, timeout=120)

    held = cgrs_goal('--policy', 'confirm', '--json', POND)
    assert held.returncode == 4, held.stderr
    result = json.loads(held.stdout)
    assert result['status'] == RetrievalResult.STATUS_AWAITING_CONFIRMATION
    assert result['selected_rank'] == 0 and 0.0 <= result['confidence'] <= 1.0
    seen = probe.count('pose')
    sent = cgrs_goal('--confirm', result['result_id'], '--rank', '2')
    assert sent.returncode == 0, sent.stderr
    assert 'sent candidate 2' in sent.stdout
    pose = probe.wait_for(lambda h: h['pose'][seen:], 30, 'the pose sent by cgrs goal')[0]
    second = result['candidates'][1]['map_pose']
    assert (pose.pose.position.x, pose.pose.position.y) == pytest.approx(
        (second['x'], second['y']), abs=0.05)
    lat, lon = _place_latlon(120.0, 80.0)
    near = cgrs_goal('--json', '--near', str(lat), str(lon), '--radius', '60',
                     'a building with a bright red roof')
    assert near.returncode == 0, near.stderr
    assert [c['image_id'] for c in json.loads(near.stdout)['candidates']] == ['roof_red']


def test_console_is_a_launch_argument():
    from cgrs_ros.nodes import stack
    names = [spec.name for spec in stack.node_specs(stack.resolve_arguments({}))]
    assert 'console_node' not in names
    specs = stack.node_specs(stack.resolve_arguments({'console': 'true'}))
    console = [spec for spec in specs if spec.name == 'console_node']
    assert console and console[0].module == 'cgrs_ros.nodes.console_node'
    assert stack.resolve_arguments({'console': 'true'})['console'] == 'true'
