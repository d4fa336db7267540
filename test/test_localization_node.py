"""localization_node over DDS on a flown sim route: camera frames in, fixes out, GNSS unused.

sim_drone (camera + imu) and localization_node run as separate processes started from their
stack NodeSpecs (as `cgrs launch sim:=true localization:=true` starts them); the probe flies a
route through a small demo town by /goal_pose and compares every localization fix with
sim_drone's true ``fix`` of the same instant (paired by stamp). The frames travel as JPEG
(``image_transport: compressed``); raw frames are covered by the figures script and the
decoding tests.

The bound is measured, not hoped for: the demo's coarse model (models/demo_dual) was trained
text -> image, never image -> image, and the gallery is a 32 m grid of overlapping 128 m
tiles. On this route (about 400 m, 72-77 frames with the hovering at both ends) four runs gave
a median error of 17-24 m, a 95th percentile of 69-73 m and fixes on 72-82 % of the frames;
the same route flown offline through the engine gives 20 m / 66 m / 96 %. The bounds below
sit above those with room for a loaded machine (frames dropped, frames matched late), not for
a worse matcher: a median error over 35 m, fewer than 85 % of the fixes within 100 m (93-100 %
in these runs; 93 % in one where the anchor sat on a look-alike for a stretch, p95 158 m) or
fixes on under 60 % of the frames is a regression. See tools/localization_figures.py.
"""

import math
from pathlib import Path
import subprocess
import time

from cgrs_ros.engine.demo import generate_demo_world
from cgrs_ros.engine.demo.scene import satellite_tiles
from cgrs_ros.nodes import stack
from diagnostic_msgs.msg import DiagnosticArray
from geometry_msgs.msg import PoseStamped, PoseWithCovarianceStamped
import numpy as np
import pyproj
import pytest
from rclpy.qos import qos_profile_sensor_data
from ros_probe import RosProbe
from sensor_msgs.msg import CompressedImage, NavSatFix
import yaml

pytestmark = pytest.mark.ros

ROOT = Path(__file__).resolve().parents[1]
DATUM = (47.3977, 8.5456, 488.0)
ALTITUDE = 90.0
START = (-110.0, -90.0)
ROUTE = [(110.0, -90.0), (110.0, 100.0)]
GEOD = pyproj.Geod(ellps='WGS84')
# Measured on this route (see the module docstring); the bounds leave room for the frames a
# loaded machine drops, not for a worse matcher.
MEDIAN_ERROR_M = 35.0
MIN_WITHIN_100_M = 0.85   # share of fixes within 100 m of the truth (measured 0.93-1.0)
MIN_AVAILABILITY = 0.6


def _params(folder, town, tiles):
    datum = {'datum.latitude': DATUM[0], 'datum.longitude': DATUM[1],
             'datum.altitude': DATUM[2]}
    lon, lat, _ = GEOD.fwd(DATUM[1], DATUM[0], math.degrees(math.atan2(*START)),
                           math.hypot(*START))
    sections = {
        'sim_drone': {**datum, 'world': str(town), 'camera_rate': 2.0, 'camera.size': 384,
                      'camera.jpeg_quality': 90, 'initial.x': START[0], 'initial.y': START[1],
                      'initial.z': ALTITUDE, 'cruise_altitude': ALTITUDE, 'max_speed': 12.0,
                      'max_acceleration': 4.0},
        'localization_node': {**datum, 'config': str(ROOT / 'config' / 'demo_engine.yaml'),
                              'image_transport': 'compressed', 'heading_source': 'imu',
                              'rate': 2.0, 'prior.latitude': lat, 'prior.longitude': lon,
                              'prior.radius_m': 100.0},
    }
    path = folder / 'params.yaml'
    path.write_text(yaml.safe_dump({f'/**/{node}': {'ros__parameters': values}
                                    for node, values in sections.items()}, sort_keys=False))
    return path


def _localization_values(heard):
    """Return the key/values of the newest localization diagnostics in ``heard``."""
    for array in reversed(heard['diag']):
        for status in array.status:
            if status.name.endswith(': localization'):
                return {kv.key: kv.value for kv in status.values}
    return {}


class Probe(RosProbe):
    """Flies the drone and records truth, fixes, poses and diagnostics."""

    def __init__(self):
        super().__init__('localization_probe')
        self.listen('truth', NavSatFix, '/cgrs/fix', 100)
        self.listen('fix', NavSatFix, '/cgrs/localization/fix', 100)
        self.listen('pose', PoseWithCovarianceStamped, '/cgrs/localization/pose', 100)
        self.listen('diag', DiagnosticArray, '/diagnostics', 100)
        self.goal_pub = self.node.create_publisher(PoseStamped, '/goal_pose', 10)
        self.frame_pub = self.node.create_publisher(
            CompressedImage, '/cgrs/camera/image/compressed', qos_profile_sensor_data)

    def localization_values(self):
        """Return the key/values of the newest localization diagnostics ({} if none)."""
        with self.lock:
            return _localization_values(self.heard)

    def fly_to(self, x, y):
        msg = PoseStamped()
        msg.header.frame_id = 'map'
        msg.pose.position.x, msg.pose.position.y, msg.pose.position.z = x, y, ALTITUDE
        self.goal_pub.publish(msg)


def _start(spec, log):
    with open(log, 'w') as out:
        return subprocess.Popen(stack.command(spec), stdout=out, stderr=subprocess.STDOUT)


def _stop(proc):
    proc.send_signal(2)
    try:
        return proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


@pytest.fixture(scope='module')
def flight(tmp_path_factory, module_ros_domain):
    folder = tmp_path_factory.mktemp('localization')
    town, tiles = folder / 'town', folder / 'tiles'
    generate_demo_world(town, seed=3, size=4, drone_views=0)
    satellite_tiles(town, tiles)
    values = stack.resolve_arguments({
        'params_file': str(_params(folder, town, tiles)), 'sim': 'true',
        'localization': 'true', 'localization_gallery': str(tiles), 'captioning': 'false'})
    specs = {s.name: s for s in stack.node_specs(values)}
    logs = {name: folder / f'{name}.log' for name in ('sim_drone', 'localization_node')}
    procs = {name: _start(specs[name], logs[name]) for name in logs}
    probe = Probe()
    try:
        loc_proc, loc_log = procs['localization_node'], logs['localization_node']
        probe.wait_for(lambda h: _localization_values(h).get('engine') == 'ready', 240.0,
                       'localization_node ready', loc_proc, loc_log)
        probe.wait_for(lambda h: h['fix'], 60.0, 'the first fix at the start', loc_proc,
                       loc_log)
        probe.wait_for(lambda h: probe.goal_pub.get_subscription_count() > 0, 30.0,
                       'sim_drone on /goal_pose', procs['sim_drone'], logs['sim_drone'])
        started = probe.count('fix')
        for x, y in ROUTE:
            probe.fly_to(x, y)
            probe.wait_for(lambda h: h['truth'] and _distance_m(h['truth'][-1], x, y) < 3.0,
                           120.0, f'arrival at ({x}, {y})', loc_proc, loc_log)
        yield {'probe': probe, 'procs': procs, 'logs': logs, 'route_from': started}
    finally:
        probe.close()
        codes = {name: _stop(proc) for name, proc in procs.items()}
    assert codes == {'sim_drone': 0, 'localization_node': 0}, \
        {name: log.read_text()[-3000:] for name, log in logs.items()}


def _distance_m(fix, x, y):
    lon, lat, _ = GEOD.fwd(DATUM[1], DATUM[0], math.degrees(math.atan2(x, y)), math.hypot(x, y))
    return GEOD.inv(fix.longitude, fix.latitude, lon, lat)[2]


def _stamp(msg):
    return msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9


def _errors(probe):
    """Return (errors m of the fixes paired with the truth of their stamp, frames processed)."""
    with probe.lock:
        truth = sorted(probe.heard['truth'], key=_stamp)
        fixes = list(probe.heard['fix'])
    stamps = np.array([_stamp(t) for t in truth])
    errors = []
    for fix in fixes:
        i = int(np.argmin(np.abs(stamps - _stamp(fix))))
        assert abs(stamps[i] - _stamp(fix)) < 0.06, 'a fix whose frame time has no truth'
        errors.append(GEOD.inv(fix.longitude, fix.latitude, truth[i].longitude,
                               truth[i].latitude)[2])
    return np.array(errors)


def test_fixes_follow_the_true_position_within_the_measured_bound(flight):
    probe = flight['probe']
    errors = _errors(probe)
    values = probe.localization_values()
    processed = int(values['frames_processed'])
    availability = int(values['fixes']) / processed
    within = float(np.mean(errors <= 100.0))
    figures = (f'{len(errors)} fixes of {processed} frames (availability {availability:.2f}), '
               f'error median {np.median(errors):.1f} m, p95 {np.percentile(errors, 95):.1f} '
               f'm, max {errors.max():.1f} m, {within:.0%} within 100 m')
    print(f'localization over DDS: {figures}')
    assert processed >= 30, figures  # the route is ~400 m at 12 m/s, frames at 2 Hz
    assert np.median(errors) <= MEDIAN_ERROR_M, figures
    # Not the p95: one stretch where the anchor sits on a look-alike (the failure mode the
    # README describes) moves it by hundreds of metres; most fixes must still be near.
    assert within >= MIN_WITHIN_100_M, figures
    assert availability >= MIN_AVAILABILITY, figures


def test_fix_and_pose_carry_the_frame_stamp_and_say_what_is_unknown(flight):
    probe = flight['probe']
    with probe.lock:
        fix, pose = probe.heard['fix'][-1], probe.heard['pose'][-1]
        poses = {_stamp(p): p for p in probe.heard['pose']}
    assert fix.header.frame_id == 'base_link' and pose.header.frame_id == 'map'
    assert _stamp(fix) in poses  # one frame, one fix and one pose, same stamp
    assert math.isnan(fix.altitude)
    assert fix.position_covariance_type == NavSatFix.COVARIANCE_TYPE_APPROXIMATED
    cov = np.array(fix.position_covariance).reshape(3, 3)
    assert cov[0, 0] >= 64.0 and cov[1, 1] >= 64.0  # min_sigma_m 8 m
    assert np.allclose(cov[:2, :2], cov[:2, :2].T) and cov[2, 2] == 1e6
    assert fix.status.service == 0  # not a GNSS receiver
    # Satellite tiles are north-up: the heading is unknown, so identity and a huge variance.
    q = pose.pose.pose.orientation
    assert (q.x, q.y, q.z, q.w) == (0.0, 0.0, 0.0, 1.0)
    pcov = np.array(pose.pose.covariance).reshape(6, 6)
    assert pcov[5, 5] == 1e6 and pcov[2, 2] == 1e6
    # The map pose is the fix in the datum's ENU (PROJ, not the engine).
    east, north, _ = pyproj.Transformer.from_pipeline(
        '+proj=pipeline +step +proj=cart +ellps=WGS84 +step +proj=topocentric +ellps=WGS84 '
        f'+lat_0={DATUM[0]} +lon_0={DATUM[1]} +h_0={DATUM[2]}').transform(
            fix.longitude, fix.latitude, DATUM[2])
    match = poses[_stamp(fix)].pose.pose.position
    assert (match.x, match.y) == pytest.approx((east, north), abs=0.01)
    assert pcov[0, 0] == pytest.approx(cov[0, 0]) and pcov[1, 1] == pytest.approx(cov[1, 1])


def test_diagnostics_count_frames_at_the_configured_rate(flight):
    values = flight['probe'].localization_values()
    assert values['engine'] == 'ready'
    assert int(values['frames_received']) >= int(values['frames_processed'])
    assert float(values['frames_per_s']) <= 2.0 * 1.1
    assert values['last_mode'] in ('local', 'local+global', 'global')


def test_a_corrupt_frame_is_reported_and_the_node_keeps_localizing(flight):
    probe = flight['probe']
    bad = CompressedImage(format='jpeg')
    bad.data = b'\xff\xd8 this is not a jpeg'
    seen = probe.count('diag')

    def reported(heard):
        for array in heard['diag'][seen:]:
            for status in array.status:
                values = {kv.key: kv.value for kv in status.values}
                if 'frame not decoded' in values.get('last_reason', ''):
                    return True
        probe.frame_pub.publish(bad)  # until one is taken instead of a camera frame
        time.sleep(0.05)
        return False
    probe.wait_for(reported, 30.0, 'the corrupt frame in diagnostics',
                   flight['procs']['localization_node'], flight['logs']['localization_node'])
    fixes = probe.count('fix')
    probe.wait_for(lambda h: len(h['fix']) > fixes, 30.0, 'a fix after the corrupt frame',
                   flight['procs']['localization_node'], flight['logs']['localization_node'])


@pytest.mark.parametrize('override, words', [
    ('image_transport:=h264', 'image_transport'),
    ('search_radius_m:=0.0', 'search_radius_m out of range'),
    ('heading_source:=compass', 'heading_source'),
])
def test_invalid_parameters_stop_the_node_with_the_reason(tmp_path, ros_domain, override,
                                                          words):
    spec = [s for s in stack.node_specs(stack.resolve_arguments(
        {'localization': 'true', 'localization_gallery': str(tmp_path), 'captioning': 'false'}))
        if s.name == 'localization_node'][0]
    command = stack.command(spec)
    command[command.index('--log-level'):command.index('--log-level')] = ['-p', override]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr
    assert 'invalid parameter' in done.stdout and words in done.stdout
