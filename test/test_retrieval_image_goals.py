"""Image goals of retrieval_node over DDS: "go where this photo was taken".

The stack runs under `cgrs launch` on a small demo gallery with the demo's engine config (the
learned image tower); a probe publishes gallery photos as sensor_msgs/Image and as JPEG
CompressedImage, and sends them in the retrieve action. A photo of a gallery image must come
back with that image first (its embedding is the same up to JPEG loss) and its pose on
/goal_pose, computed here with PROJ from the manifest. Corrupt images are answered with
STATUS_INVALID_GOAL and a reason, and the node answers the next goal.
"""

import csv
import math
from pathlib import Path

from cgrs_ros.action import Retrieve
from cgrs_ros.engine.demo import generate_demo_world
from cgrs_ros.msg import RetrievalResult
from cgrs_ros.nodes import image_msgs
from diagnostic_msgs.msg import DiagnosticArray
from geometry_msgs.msg import PoseStamped
from PIL import Image
import pyproj
import pytest
from rclpy.action import ActionClient
from ros_probe import launched_stack, RosProbe
from sensor_msgs.msg import CompressedImage
from sensor_msgs.msg import Image as ImageMsg
from std_msgs.msg import String

pytestmark = pytest.mark.ros

ROOT = Path(__file__).resolve().parents[1]
DATUM = (47.3977, 8.5456, 488.0)


@pytest.fixture(scope='module')
def gallery(tmp_path_factory):
    root = tmp_path_factory.mktemp('image_goals') / 'town'
    generate_demo_world(root, seed=5, size=3, drone_views=1)
    with open(root / 'gallery.csv') as handle:
        rows = {row['image_id']: row for row in csv.DictReader(handle)}
    params = root.parent / 'params.yaml'
    params.write_text(
        '/**/retrieval_node:\n  ros__parameters:\n'
        f'    gallery_dir: "{root}"\n    config: "{ROOT / "config" / "demo_engine.yaml"}"\n'
        f'    datum: {{latitude: {DATUM[0]}, longitude: {DATUM[1]}, altitude: {DATUM[2]}}}\n'
        '    top_k: 4\n    caption_poll_period: 0.0\n')
    return {'root': root, 'rows': rows, 'params': params}


class Probe(RosProbe):
    """Publishes image goals and records results and poses."""

    def __init__(self):
        super().__init__('image_goal_probe')
        self.listen('result', RetrievalResult, '/cgrs/result', 100)
        self.listen('pose', PoseStamped, '/goal_pose', 100)
        self.listen('diag', DiagnosticArray, '/diagnostics')
        self.raw_pub = self.node.create_publisher(ImageMsg, '/cgrs/goal_image', 10)
        self.jpeg_pub = self.node.create_publisher(CompressedImage,
                                                   '/cgrs/goal_image/compressed', 10)
        self.text_pub = self.node.create_publisher(String, '/cgrs/goal_text', 10)
        self.action = ActionClient(self.node, Retrieve, '/cgrs/retrieve')

    def publish_and_wait(self, publisher, msg, timeout=60.0):
        """Publish a goal and return the next result and the poses published since."""
        seen, poses = self.count('result'), self.count('pose')
        publisher.publish(msg)
        result = self.wait_for(lambda h: h['result'][seen:], timeout, 'a result')[0]
        with self.lock:
            return result, list(self.heard['pose'][poses:])

    def send_goal(self, goal):
        assert self.action.wait_for_server(timeout_sec=30.0), 'retrieve action not found'
        handle = self.wait_future(self.action.send_goal_async(goal))
        assert handle.accepted
        return self.wait_future(handle.get_result_async(), 60.0, 'the action result')


@pytest.fixture(scope='module')
def stack(gallery, tmp_path_factory, module_ros_domain):
    log = tmp_path_factory.mktemp('log') / 'launch.log'
    with launched_stack(gallery['params'], log, Probe, ready_timeout=240.0) as (probe, proc):
        probe.wait_for(lambda h: probe.raw_pub.get_subscription_count() > 0
                       and probe.jpeg_pub.get_subscription_count() > 0, 30.0,
                       'goal_image subscriptions', proc)
        yield {'probe': probe, 'proc': proc, 'log': log}


def _photo(gallery, image_id):
    return Image.open(gallery['root'] / gallery['rows'][image_id]['path']).convert('RGB')


def _expected_enu(row):
    pipeline = pyproj.Transformer.from_pipeline(
        '+proj=pipeline +step +proj=cart +ellps=WGS84 '
        f'+step +proj=topocentric +ellps=WGS84 +lat_0={DATUM[0]} +lon_0={DATUM[1]} '
        f'+h_0={DATUM[2]}')
    return pipeline.transform(float(row['lon']), float(row['lat']), float(row['alt']))


def _assert_found(result, poses, row):
    assert result.status == RetrievalResult.STATUS_OK, result.error
    assert len(result.candidates) == 4
    best = result.candidates[0]
    assert best.image_id == row['image_id']
    assert best.coarse_score > 0.97 and math.isnan(best.caption_score)  # no captions for images
    assert [c.rank for c in result.candidates] == [1, 2, 3, 4]
    assert poses, 'no /goal_pose for an image goal'
    e, n, u = _expected_enu(row)
    p = poses[-1].pose.position
    assert (p.x, p.y, p.z) == pytest.approx((e, n, u), abs=1e-3)


def test_raw_image_goal_finds_the_place_and_publishes_its_pose(stack, gallery):
    msg = image_msgs.pil_to_image_msg(_photo(gallery, 'p0002_sat'), frame_id='camera')
    result, poses = stack['probe'].publish_and_wait(stack['probe'].raw_pub, msg)
    _assert_found(result, poses, gallery['rows']['p0002_sat'])
    assert result.query == '[image goal: 256x256 rgb8]'


def test_compressed_image_goal_finds_the_drone_photo(stack, gallery):
    msg = image_msgs.pil_to_compressed_msg(_photo(gallery, 'p0003_drone1'), 'jpeg', 92)
    result, poses = stack['probe'].publish_and_wait(stack['probe'].jpeg_pub, msg)
    _assert_found(result, poses, gallery['rows']['p0003_drone1'])
    assert result.query.startswith('[image goal: jpeg, ')


def test_corrupt_images_are_invalid_goals_and_the_node_answers_the_next(stack, gallery):
    probe = stack['probe']
    bad = CompressedImage(format='jpeg')
    bad.data = b'\xff\xd8\xff garbage, not a JPEG'
    result, poses = probe.publish_and_wait(probe.jpeg_pub, bad)
    assert result.status == RetrievalResult.STATUS_INVALID_GOAL
    assert 'could not be decoded' in result.error and not poses
    short = image_msgs.pil_to_image_msg(_photo(gallery, 'p0001_sat'))
    short.data = bytes(short.data)[:1000]
    result, poses = probe.publish_and_wait(probe.raw_pub, short)
    assert result.status == RetrievalResult.STATUS_INVALID_GOAL
    assert 'holds 1000 bytes' in result.error and not poses
    weird = image_msgs.pil_to_image_msg(_photo(gallery, 'p0001_sat'))
    weird.encoding = 'yuv422'
    result, _ = probe.publish_and_wait(probe.raw_pub, weird)
    assert 'unknown image encoding' in result.error
    # Alive: the next image goal and a text goal are answered.
    ok, poses = probe.publish_and_wait(probe.raw_pub, image_msgs.pil_to_image_msg(
        _photo(gallery, 'p0001_sat')))
    _assert_found(ok, poses, gallery['rows']['p0001_sat'])
    text, _ = probe.publish_and_wait(probe.text_pub, String(data='a building'))
    assert text.status in (RetrievalResult.STATUS_OK, RetrievalResult.STATUS_NO_MATCH)


def test_action_goal_with_an_image(stack, gallery):
    probe = stack['probe']
    goal = Retrieve.Goal(top_k=2, platform='satellite',
                         image=image_msgs.pil_to_compressed_msg(
                             _photo(gallery, 'p0003_sat'), 'png'))
    answer = probe.send_goal(goal)
    assert answer.status == 4  # GoalStatus.STATUS_SUCCEEDED
    result = answer.result.result
    assert result.status == RetrievalResult.STATUS_OK
    assert [c.platform for c in result.candidates] == ['satellite', 'satellite']
    assert result.candidates[0].image_id == 'p0003_sat' and result.platform_filter == 'satellite'
    bad = Retrieve.Goal(description='ignored', image=CompressedImage(format='png', data=b'xx'))
    answer = probe.send_goal(bad)
    assert answer.status == 6  # GoalStatus.STATUS_ABORTED
    assert answer.result.result.status == RetrievalResult.STATUS_INVALID_GOAL
    assert 'could not be decoded' in answer.result.result.error


def test_image_platform_parameter_filters_topic_image_goals(stack, gallery):
    probe = stack['probe']
    assert probe.set_param('/cgrs/retrieval_node', 'image_platform', 'satellite').successful
    try:
        msg = image_msgs.pil_to_image_msg(_photo(gallery, 'p0002_drone1'))
        result, _ = probe.publish_and_wait(probe.raw_pub, msg)
        assert result.status == RetrievalResult.STATUS_OK
        assert {c.platform for c in result.candidates} == {'satellite'}
        assert result.platform_filter == 'satellite'
        refused = probe.set_param('/cgrs/retrieval_node', 'image_platform', 'aerial')
        assert not refused.successful and 'aerial' in refused.reason
    finally:
        probe.set_param('/cgrs/retrieval_node', 'image_platform', '')
