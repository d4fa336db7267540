"""retrieval_node as users meet it: started by `cgrs launch`, spoken to over real DDS.

The stack runs as separate processes; a probe node in the test process sends goals by topic
and by action and checks what comes back against values computed independently (pyproj
for the map-frame position, the manifest for lat/lon).
"""

import json
import math
import os
import subprocess
import sys
import time

from cgrs_ros.action import Retrieve
from cgrs_ros.msg import RetrievalResult
from diagnostic_msgs.msg import DiagnosticArray
from geometry_msgs.msg import PoseStamped
import numpy as np
from PIL import Image
import pyproj
import pytest
from rclpy.action import ActionClient
from rclpy.qos import DurabilityPolicy, QoSProfile
from ros_probe import launched_stack, RosProbe
from sensor_msgs.msg import NavSatFix
from std_msgs.msg import String
from visualization_msgs.msg import MarkerArray

pytestmark = pytest.mark.ros

DATUM = (47.3977, 8.5456, 488.0)
PLACES = [
    # image_id, platform, d_east, d_north, alt, heading, group, description
    ('roof_red', 'satellite', 120.0, 80.0, 489.0, 0.0, 'g1',
     'a building with a bright red roof beside a circular plaza paved in grey stone'),
    ('pond', 'satellite', -200.0, 150.0, 487.0, 0.0, 'g2',
     'a small round pond of blue water surrounded by tall green trees'),
    ('field', 'satellite', 60.0, -240.0, 488.5, 0.0, 'g3',
     'a football pitch with white lines next to a running track'),
    ('parking', 'drone', -90.0, -60.0, 520.0, 135.0, 'g4',
     'an oblique view of a large parking lot full of cars by a supermarket'),
    ('river', 'drone', 300.0, 10.0, 510.0, 270.0, 'g5',
     'a river with a stone bridge crossing it and boats moored at the bank'),
    ('church', 'ground', 10.0, 20.0, 489.5, 45.0, 'g6',
     'a white church with a tall pointed clock tower in a village square'),
]


def _expected_enu(lat, lon, alt, datum):
    """ENU in the datum's tangent plane, computed by PROJ (independent of the engine)."""
    pipeline = pyproj.Transformer.from_pipeline(
        '+proj=pipeline +step +proj=cart +ellps=WGS84 '
        f'+step +proj=topocentric +ellps=WGS84 +lat_0={datum[0]!r} +lon_0={datum[1]!r} '
        f'+h_0={datum[2]!r}')
    return pipeline.transform(lon, lat, alt)


def _place_latlon(d_east, d_north):
    geod = pyproj.Geod(ellps='WGS84')
    lon, lat, _ = geod.fwd(DATUM[1], DATUM[0], math.degrees(math.atan2(d_east, d_north)),
                           math.hypot(d_east, d_north))
    return lat, lon


@pytest.fixture(scope='module')
def gallery(tmp_path_factory):
    root = tmp_path_factory.mktemp('gallery')
    (root / 'images').mkdir()
    rows = ['image_id,path,lat,lon,alt,heading_deg,platform,group_id,description']
    rng = np.random.default_rng(0)
    rows_by_id = {}
    for image_id, platform, de, dn, alt, heading, group, text in PLACES:
        pixels = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / 'images' / f'{image_id}.png')
        lat, lon = _place_latlon(de, dn)
        rows.append(f'{image_id},images/{image_id}.png,{lat!r},{lon!r},{alt},{heading},'
                    f'{platform},{group},"{text}"')
        rows_by_id[image_id] = (lat, lon, alt, heading, platform)
    (root / 'gallery.csv').write_text('\n'.join(rows) + '\n')
    # Caption-only retrieval: no pretrained CLIP weights exist offline, MiniLM does.
    engine = root / 'engine.yaml'
    engine.write_text('image_encoder: {backend: none}\ncaptioner: {backend: manifest}\n')
    params = root / 'params.yaml'
    params.write_text(
        '/**/retrieval_node:\n  ros__parameters:\n'
        f'    gallery_dir: "{root}"\n    config: "{engine}"\n'
        f'    datum: {{latitude: {DATUM[0]}, longitude: {DATUM[1]}, altitude: {DATUM[2]}}}\n'
        '    top_k: 3\n    max_goal_length: 120\n    caption_poll_period: 0.0\n')
    return {'root': root, 'params': params, 'rows': rows_by_id}


class Probe(RosProbe):
    """Sends goals to the stack by topic and action and records what comes back."""

    def __init__(self, namespace='cgrs'):
        super().__init__('cgrs_test_probe')
        ns = f'/{namespace}'
        self.ns = ns
        self.listen('pose', PoseStamped, '/goal_pose')
        self.listen('fix', NavSatFix, f'{ns}/goal_fix')
        self.listen('result', RetrievalResult, f'{ns}/result', 100)
        self.listen('markers', MarkerArray, f'{ns}/candidates',
                    QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL))
        self.listen('diag', DiagnosticArray, '/diagnostics')
        self.goal_pub = self.node.create_publisher(String, f'{ns}/goal_text', 100)
        self.action = ActionClient(self.node, Retrieve, f'{ns}/retrieve')

    def results_for(self, query):
        with self.lock:
            return [r for r in self.heard['result'] if r.query == query]

    def say(self, text, timeout=30.0):
        """Publish a goal on the topic and return its result."""
        seen = self.count('result')
        self.goal_pub.publish(String(data=text))
        return self.wait_for(
            lambda h: [r for r in h['result'][seen:] if r.query == text.strip()],
            timeout, f'result of {text!r}')[-1]

    def send_goal(self, description, top_k=0, platform='', feedback=None):
        assert self.action.wait_for_server(timeout_sec=30.0), 'retrieve action not found'
        handle = self.wait_future(self.action.send_goal_async(
            Retrieve.Goal(description=description, top_k=top_k, platform=platform),
            feedback_callback=feedback))
        assert handle.accepted
        return handle

    def set_param(self, name, value):
        return super().set_param(f'{self.ns}/retrieval_node', name, value)


@pytest.fixture(scope='module')
def stack(gallery, tmp_path_factory, module_ros_domain):
    log = tmp_path_factory.mktemp('log') / 'launch.log'
    with launched_stack(gallery['params'], log, Probe) as (probe, proc):
        yield {'probe': probe, 'proc': proc, 'log': log, 'gallery': gallery}


def _yaw(q):
    return math.atan2(2.0 * (q.w * q.z + q.x * q.y), 1.0 - 2.0 * (q.y * q.y + q.z * q.z))


def test_topic_goal_publishes_pose_fix_markers_and_result(stack):
    probe, rows = stack['probe'], stack['gallery']['rows']
    poses_before = probe.count('pose')
    result = probe.say('a drone photo of the river with the bridge over it')
    assert result.status == RetrievalResult.STATUS_OK, result.error
    assert result.header.frame_id == 'map'
    assert len(result.candidates) == 3  # top_k from the params file, not the default 5
    assert [c.rank for c in result.candidates] == [1, 2, 3]
    scores = [c.fused_score for c in result.candidates]
    assert scores == sorted(scores, reverse=True)
    best = result.candidates[0]
    assert best.image_id == 'river'
    lat, lon, alt, heading, platform = rows['river']
    assert (best.latitude, best.longitude, best.altitude) == pytest.approx((lat, lon, alt))
    assert best.platform == platform and best.group_id == 'g5'
    assert math.isnan(best.coarse_score)  # no image encoder in this config

    pose = probe.wait_for(lambda h: h['pose'][poses_before:], what='/goal_pose')[-1]
    e, n, u = _expected_enu(lat, lon, alt, DATUM)
    assert pose.header.frame_id == 'map'
    assert (pose.pose.position.x, pose.pose.position.y, pose.pose.position.z) == \
        pytest.approx((e, n, u), abs=1e-3)
    assert (e, n) == pytest.approx((300.0, 10.0), abs=0.5)  # where the fixture put it
    # Compass 270 (facing west) is ENU yaw pi.
    assert abs(abs(_yaw(pose.pose.orientation)) - math.pi) < 1e-6

    fix = probe.wait_for(lambda h: h['fix'], what='goal_fix')[-1]
    assert (fix.latitude, fix.longitude, fix.altitude) == pytest.approx((lat, lon, alt))

    markers = probe.wait_for(lambda h: h['markers'], what='candidate markers')[-1].markers
    assert markers[0].action == markers[0].DELETEALL
    assert len(markers) == 1 + 2 * 3  # a sphere and a label per candidate
    spheres = [m for m in markers[1:] if m.ns == 'cgrs_candidates']
    assert spheres[0].scale.x > spheres[1].scale.x  # the best one stands out
    assert spheres[0].pose.position.x == pytest.approx(e, abs=1e-3)


def test_action_goal_with_feedback_top_k_and_platform_filter(stack):
    probe = stack['probe']
    stages = []
    handle = probe.send_goal('a white church tower', top_k=2, platform='satellite',
                             feedback=lambda fb: stages.append(fb.feedback.stage))
    response = probe.wait_future(handle.get_result_async())
    result = response.result.result
    assert response.status == 4, result.error  # GoalStatus.STATUS_SUCCEEDED
    assert len(result.candidates) == 2
    assert {c.platform for c in result.candidates} == {'satellite'}
    assert result.platform_filter == 'satellite'
    # Feedback and result travel on different channels, and rclpy drops the feedback of a goal
    # whose result it already holds: under load the last stages can be lost (seen in CI), so
    # what arrives is checked to be the stages in order, from the first.
    deadline = time.monotonic() + 2
    while 'done' not in stages and time.monotonic() < deadline:
        time.sleep(0.01)
    expected = ['queued', 'encode', 'coarse', 'captions', 'publish', 'done']
    assert stages and stages == expected[:len(stages)], stages


@pytest.mark.parametrize('text, reason', [
    ('', 'empty'), ('   \t ', 'empty'), ('x' * 500, 'max_goal_length'),
    ('\u200b', 'no letters or digits'), ('\x07', 'no letters or digits'),
    ('\U0001f681 \U0001f4cd', 'no letters or digits'),
])
def test_malformed_topic_goals_are_refused_and_the_node_lives_on(stack, text, reason):
    probe = stack['probe']
    poses_before = probe.count('pose')
    seen = probe.count('result')
    probe.goal_pub.publish(String(data=text))
    result = probe.wait_for(
        lambda h: [r for r in h['result'][seen:] if r.status == RetrievalResult.STATUS_INVALID_GOAL
                   and reason in r.error and r.query == text[:200]],
        what=f'error result ({reason})')[-1]
    assert result.candidates == []
    ok = probe.say('the round pond with trees')  # still serving
    assert ok.status == RetrievalResult.STATUS_OK and ok.candidates[0].image_id == 'pond'
    probe.wait_for(lambda h: len(h['pose']) > poses_before, what='/goal_pose')
    assert probe.count('pose') == poses_before + 1  # only the good goal moved the drone


def test_an_off_topic_goal_matches_nothing_and_sends_no_pose(stack):
    probe = stack['probe']
    poses_before = probe.count('pose')
    result = probe.say('set an alarm for seven tomorrow morning')
    assert result.status == RetrievalResult.STATUS_NO_MATCH
    assert 'under retrieval.min_caption_score' in result.error
    assert result.candidates  # shown to whoever asks, but nothing is flown to
    ok = probe.say('the round pond with trees')
    assert ok.status == RetrievalResult.STATUS_OK
    probe.wait_for(lambda h: len(h['pose']) > poses_before, what='/goal_pose')
    assert probe.count('pose') == poses_before + 1


def test_undecodable_goal_bytes_are_refused(stack):
    probe = stack['probe']
    bad = b'\xff\xfe\x80 not utf-8'
    # A serialized std_msgs/String (CDR little-endian) whose payload is not UTF-8.
    raw = b'\x00\x01\x00\x00' + (len(bad) + 1).to_bytes(4, 'little') + bad + b'\x00'
    seen = probe.count('result')
    probe.goal_pub.publish(raw)
    refused = probe.wait_for(
        lambda h: [r for r in h['result'][seen:] if 'decoded as UTF-8' in r.error],
        what='an error result for undecodable text')[-1]
    assert refused.status == RetrievalResult.STATUS_INVALID_GOAL
    assert refused.query == '??? not utf-8'
    assert probe.say('football pitch').candidates[0].image_id == 'field'


def test_invalid_action_goals_are_aborted_with_a_reason(stack):
    probe = stack['probe']
    handle = probe.send_goal('a pond', platform='submarine')
    response = probe.wait_future(handle.get_result_async())
    assert response.status == 6  # ABORTED
    assert response.result.result.status == RetrievalResult.STATUS_INVALID_GOAL
    assert 'submarine' in response.result.result.error
    # top_k is bounded like the parameter (it is a uint32 in the goal).
    handle = probe.send_goal('a pond', top_k=2**32 - 1)
    response = probe.wait_future(handle.get_result_async())
    assert response.status == 6
    assert response.result.result.status == RetrievalResult.STATUS_INVALID_GOAL
    assert 'top_k 4294967295 is more than 100' in response.result.result.error


def test_invalid_parameter_is_refused_with_a_reason(stack):
    probe = stack['probe']
    refused = probe.set_param('top_k', 0)
    assert not refused.successful and 'top_k' in refused.reason
    refused = probe.set_param('map_frame', '  ')
    assert not refused.successful and 'map_frame' in refused.reason
    assert probe.set_param('coarse_k', 2).successful
    assert probe.set_param('coarse_k', 20).successful
    accepted = probe.set_param('top_k', 4)
    assert accepted.successful
    assert len(probe.say('parking lot with cars').candidates) == 4
    assert probe.set_param('top_k', 3).successful


def test_flood_of_topic_goals_follows_the_busy_policy(stack):
    """Every goal is answered once; drops say BUSY; the latest instruction always runs."""
    probe = stack['probe']
    texts = [f'a red roof by the plaza, variant {i}' for i in range(20)]
    for text in texts:
        probe.goal_pub.publish(String(data=text))
    last = probe.wait_for(lambda h: [r for r in h['result'] if r.query == texts[-1]],
                          what='result of the last goal')[-1]
    assert last.status == RetrievalResult.STATUS_OK
    probe.wait_for(lambda h: all(any(r.query == t for r in h['result']) for t in texts),
                   what='a result for every goal')
    statuses = [[r.status for r in probe.results_for(t)] for t in texts]
    assert all(len(s) == 1 for s in statuses), 'every goal answered exactly once'
    flat = [s[0] for s in statuses]
    assert set(flat) <= {RetrievalResult.STATUS_OK, RetrievalResult.STATUS_BUSY}
    assert flat.count(RetrievalResult.STATUS_BUSY) >= 1
    # At most max_pending (1) waits behind the running goal, so of a burst of 20 only a few run;
    # which ones depends on when the worker picks them up, except the last, which always does.
    assert 1 <= flat.count(RetrievalResult.STATUS_OK) < len(texts)


def test_cancel_a_queued_action_goal(stack):
    probe = stack['probe']
    assert probe.set_param('max_pending', 60).successful
    try:
        texts = [f'stone bridge over the river, backlog {i}' for i in range(30)]
        for text in texts:
            probe.goal_pub.publish(String(data=text))
        handle = probe.send_goal('the parking lot')  # queued behind the backlog
        cancel = probe.wait_future(handle.cancel_goal_async())
        assert len(cancel.goals_canceling) == 1
        response = probe.wait_future(handle.get_result_async(), timeout=60)
        assert response.status == 5  # GoalStatus.STATUS_CANCELED
        assert response.result.result.status == RetrievalResult.STATUS_CANCELED
        probe.wait_for(lambda h: any(r.query == texts[-1] for r in h['result']),
                       what='the backlog to drain')
        assert not [r for r in probe.results_for('the parking lot')
                    if r.status == RetrievalResult.STATUS_OK]
    finally:
        assert probe.set_param('max_pending', 1).successful


def test_invalid_parameter_file_stops_the_node_with_a_reason(gallery, tmp_path, ros_domain):
    params = tmp_path / 'bad.yaml'
    params.write_text('/**/retrieval_node:\n  ros__parameters:\n'
                      f'    gallery_dir: "{gallery["root"]}"\n    top_k: -3\n')
    proc = subprocess.run(
        [sys.executable, '-m', 'cgrs_ros.nodes.retrieval_node', '--ros-args',
         '--params-file', str(params)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    out = proc.stdout + proc.stderr
    assert 'invalid parameter' in out and 'top_k' in out and '-3' in out, out


def test_ctrl_c_stops_the_stack_cleanly(gallery, tmp_path, ros_domain):
    proc = subprocess.Popen(
        [sys.executable, '-m', 'cgrs_ros.cli', 'launch', f'params_file:={gallery["params"]}',
         'captioning:=false'], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    deadline = time.monotonic() + 120
    for line in proc.stdout:
        lines.append(line)
        if 'ready:' in line or time.monotonic() > deadline:
            break
    proc.send_signal(2)
    out, _ = proc.communicate(timeout=60)
    text = ''.join(lines) + out
    assert proc.returncode == 0, text
    assert 'all nodes stopped' in text


def test_respawn_brings_a_killed_node_back(gallery, ros_domain):
    proc = subprocess.Popen(
        [sys.executable, '-m', 'cgrs_ros.cli', 'launch', f'params_file:={gallery["params"]}',
         'captioning:=false', 'respawn:=true', 'respawn_delay:=0.5',
         'respawn_max_retries:=1'],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, pids, readies = [], [], 0
    try:
        deadline = time.monotonic() + 240
        for line in proc.stdout:
            lines.append(line)
            if line.startswith('[cgrs launch] retrieval_node (pid '):
                pids.append(int(line.split('(pid ')[1].split(')')[0]))
            if 'ready:' in line:
                readies += 1
                if readies == 1:
                    os.kill(pids[-1], 9)  # a crash
                else:
                    break
            assert time.monotonic() < deadline, ''.join(lines)
        text = ''.join(lines)
        assert 'retrieval_node exited with -9; restarting in 0.5 s (restart 1 of 1)' in text
        assert len(pids) == 2 and readies == 2, text
        # The restarted node answers goals over DDS.
        goal = subprocess.run([sys.executable, '-m', 'cgrs_ros.cli', 'goal', '--json',
                               'the round pond with trees'], capture_output=True, text=True,
                              timeout=120)
        assert goal.returncode == 0, goal.stdout + goal.stderr
        assert json.loads(goal.stdout)['candidates'][0]['image_id'] == 'pond'
    finally:
        proc.send_signal(2)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, ''.join(lines) + out


def test_killing_the_launcher_does_not_orphan_the_nodes(gallery, ros_domain):
    proc = subprocess.Popen(
        [sys.executable, '-m', 'cgrs_ros.cli', 'launch', f'params_file:={gallery["params"]}',
         'captioning:=false'], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    node_pid = None
    for line in proc.stdout:
        if line.startswith('[cgrs launch] retrieval_node (pid '):
            node_pid = int(line.split('(pid ')[1].split(')')[0])
            break
    assert node_pid is not None
    proc.kill()  # SIGKILL: the launcher gets no chance to stop its nodes itself
    proc.wait(timeout=30)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.kill(node_pid, 0)
        except ProcessLookupError:
            return  # gone: the kernel told it its parent died
        time.sleep(0.1)
    os.kill(node_pid, 9)
    raise AssertionError('retrieval_node outlived a SIGKILLed cgrs launch')
