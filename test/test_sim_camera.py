"""sim_drone's cameras over DDS: images of the configured size at the configured rate, drawn from
the demo world at the drone's true pose, with camera_info, a JPEG stream, an oblique camera and
an IMU heading.

The expected picture is drawn here with the engine's renderer at the pose sim_drone reports on
odom; only the sensor noise (random per frame) differs from what arrives.
"""

import math
import subprocess
import time

from cgrs_ros.engine import geo
from cgrs_ros.engine.demo import generate_demo_world
from cgrs_ros.engine.demo.scene import load_scene, render_camera
from cgrs_ros.nodes import image_msgs, stack
from nav_msgs.msg import Odometry
import numpy as np
import pytest
from rclpy.qos import qos_profile_sensor_data
from ros_probe import RosProbe
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, Imu

pytestmark = pytest.mark.ros

DATUM = (47.3977, 8.5456, 488.0)
RATE = 4.0
SIZE = 128
START = (40.0, -30.0, 60.0, math.radians(30.0))   # x, y, z, yaw (ENU): heading 60 deg


@pytest.fixture(scope='module')
def camera(tmp_path_factory, module_ros_domain):
    folder = tmp_path_factory.mktemp('sim_camera')
    generate_demo_world(folder / 'town', seed=11, size=2, drone_views=0)
    params = folder / 'params.yaml'
    values = {'datum.latitude': DATUM[0], 'datum.longitude': DATUM[1],
              'datum.altitude': DATUM[2], 'world': str(folder / 'town'), 'camera_rate': RATE,
              'camera.size': SIZE, 'camera.fov_deg': 80.0, 'camera.jpeg_quality': 85,
              'camera.oblique_tilt': 0.3, 'initial.x': START[0], 'initial.y': START[1],
              'initial.z': START[2], 'initial.yaw': START[3], 'imu.yaw_stddev_deg': 0.0}
    lines = ['/**/sim_drone:', '  ros__parameters:']
    lines += [f'    {k}: "{v}"' if isinstance(v, str) else f'    {k}: {v!r}'
              for k, v in values.items()]
    params.write_text('\n'.join(lines) + '\n')
    spec = [s for s in stack.node_specs(stack.resolve_arguments(
        {'params_file': str(params), 'sim': 'true', 'captioning': 'false'}))
        if s.name == 'sim_drone'][0]
    log = folder / 'sim_drone.log'
    with open(log, 'w') as out:
        proc = subprocess.Popen(stack.command(spec), stdout=out, stderr=subprocess.STDOUT)
    probe = RosProbe('sim_camera_probe')
    for key, msg_type, topic in (
            ('image', Image, '/cgrs/camera/image'),
            ('info', CameraInfo, '/cgrs/camera/camera_info'),
            ('jpeg', CompressedImage, '/cgrs/camera/image/compressed'),
            ('oblique', Image, '/cgrs/camera_oblique/image'), ('imu', Imu, '/cgrs/imu'),
            ('odom', Odometry, '/cgrs/odom')):
        probe.listen(key, msg_type, topic, qos_profile_sensor_data)
    try:
        probe.wait_for(lambda h: len(h['image']) >= 12 and h['jpeg'] and h['oblique'],
                       60.0, 'a dozen camera frames', proc, log)
        yield {'probe': probe, 'scene': load_scene(folder / 'town'), 'log': log}
    finally:
        probe.close()
        proc.send_signal(2)
        try:
            code = proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert code == 0, log.read_text()


def _stamp(msg):
    return msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9


def test_frames_have_the_size_and_rate_asked_for(camera):
    with camera['probe'].lock:
        images = list(camera['probe'].heard['image'])
        infos = list(camera['probe'].heard['info'])
    for msg in images:
        assert (msg.width, msg.height, msg.encoding, msg.step) == (SIZE, SIZE, 'rgb8', SIZE * 3)
        assert msg.header.frame_id == 'camera_optical_frame'
    stamps = np.array([_stamp(m) for m in images])
    assert np.all(np.diff(stamps) > 0)
    period = np.median(np.diff(stamps))
    assert period == pytest.approx(1.0 / RATE, rel=0.1)
    info = infos[-1]
    focal = SIZE / 2 / math.tan(math.radians(40.0))
    assert (info.width, info.height) == (SIZE, SIZE)
    assert list(info.k) == pytest.approx([focal, 0, SIZE / 2, 0, focal, SIZE / 2, 0, 0, 1])
    assert {_stamp(i) for i in infos} & set(stamps.tolist())  # info stamped like its image


def test_frame_is_the_world_seen_from_the_true_pose(camera):
    probe, scene = camera['probe'], camera['scene']
    with probe.lock:
        frame = image_msgs.msg_to_pil(probe.heard['image'][-1])
        odom = probe.heard['odom'][-1]
        imu = probe.heard['imu'][-1]
    p = odom.pose.pose.position
    assert (p.x, p.y, p.z) == pytest.approx(START[:3], abs=1e-6)  # hovering where it started
    lat, lon, alt = geo.enu_to_geodetic(p.x, p.y, p.z, geo.Datum(*DATUM))
    e, n, u = scene.enu(lat, lon, alt)
    heading = 90.0 - math.degrees(START[3])
    expected = render_camera(scene, e, n, u, heading, SIZE, 80.0)
    elsewhere = render_camera(scene, e + 80.0, n - 40.0, u, heading, SIZE, 80.0)
    turned = render_camera(scene, e, n, u, heading + 90.0, SIZE, 80.0)

    def diff(a):
        return float(np.abs(np.asarray(frame, np.int16) - np.asarray(a, np.int16)).mean())
    # Two draws of the sensor noise (illumination, grain) differ by about 5-6 on average;
    # another place or heading by about 25.
    assert diff(expected) < 9.0
    assert diff(elsewhere) > diff(expected) + 12.0
    assert diff(turned) > diff(expected) + 12.0      # the picture turns with the heading
    # The IMU gives the same heading (REP-103 yaw, no noise configured).
    q = imu.orientation
    assert math.atan2(2 * q.w * q.z, 1 - 2 * q.z * q.z) == pytest.approx(START[3], abs=1e-6)
    assert imu.linear_acceleration_covariance[0] == -1.0


def test_jpeg_and_oblique_streams(camera):
    probe = camera['probe']
    with probe.lock:
        jpeg, oblique = probe.heard['jpeg'][-1], probe.heard['oblique'][-1]
        raw = {_stamp(m): m for m in probe.heard['image']}
    assert jpeg.format == 'jpeg' and bytes(jpeg.data[:2]) == b'\xff\xd8'
    decoded = image_msgs.msg_to_pil(jpeg)
    assert decoded.size == (SIZE, SIZE)
    if _stamp(jpeg) in raw:  # the same frame, lossy
        same = np.asarray(image_msgs.msg_to_pil(raw[_stamp(jpeg)]), np.int16)
        assert np.abs(np.asarray(decoded, np.int16) - same).mean() < 6.0
    assert (oblique.width, oblique.height) == (SIZE, SIZE)
    # Oblique frames are hazy toward the top (far) edge: brighter there than at the bottom.
    pixels = np.asarray(image_msgs.msg_to_pil(oblique), float)
    assert pixels[:8].mean() > pixels[-8:].mean()


def test_camera_off_by_default(tmp_path, ros_domain):
    params = tmp_path / 'params.yaml'
    params.write_text('/**/sim_drone:\n  ros__parameters:\n'
                      f'    datum: {{latitude: {DATUM[0]}, longitude: {DATUM[1]}, '
                      f'altitude: {DATUM[2]}}}\n')
    spec = [s for s in stack.node_specs(stack.resolve_arguments(
        {'params_file': str(params), 'sim': 'true', 'captioning': 'false'}))
        if s.name == 'sim_drone'][0]
    log = tmp_path / 'log'
    with open(log, 'w') as out:
        proc = subprocess.Popen(stack.command(spec), stdout=out, stderr=subprocess.STDOUT)
    probe = RosProbe('sim_camera_off_probe')
    probe.listen('image', Image, '/cgrs/camera/image', qos_profile_sensor_data)
    probe.listen('imu', Imu, '/cgrs/imu', qos_profile_sensor_data)
    try:
        probe.wait_for(lambda h: len(h['imu']) > 20, 30.0, 'imu messages', proc, log)
        time.sleep(0.5)
        assert probe.count('image') == 0
        assert 'camera:' not in log.read_text()
    finally:
        probe.close()
        proc.send_signal(2)
        assert proc.wait(timeout=20) == 0
