"""A RetrievalResult published in one process arrives intact in another, over real DDS."""

import os
import subprocess
import sys
import textwrap
import time

import pytest

pytestmark = pytest.mark.ros

PUBLISHER = textwrap.dedent("""
    import sys, time
    import rclpy
    from rclpy.qos import QoSProfile, DurabilityPolicy
    from geometry_msgs.msg import Pose
    from cgrs_ros.msg import Candidate, RetrievalResult

    rclpy.init()
    node = rclpy.create_node('cgrs_test_publisher')
    qos = QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL)
    pub = node.create_publisher(RetrievalResult, 'cgrs_test/result', qos)
    msg = RetrievalResult(query='the red roof by the round plaza', normalized_query='red roof',
                          platform_filter='', status=RetrievalResult.STATUS_OK, total_ms=12.5)
    msg.header.frame_id = 'map'
    for rank in range(1, 26):
        pose = Pose()
        pose.position.x, pose.position.y = float(rank), -2.0 * rank
        msg.candidates.append(Candidate(
            rank=rank, image_id=f'image_{rank:08x}', platform='satellite', group_id=str(rank),
            latitude=47.0 + rank * 1e-4, longitude=8.5, altitude=400.0 + rank,
            heading_deg=0.0, pose=pose, coarse_score=0.5, caption_score=0.25,
            fused_score=1.0 / rank, caption='roof ' * rank))
    pub.publish(msg)
    # Latched (transient local): a late subscriber still gets it. Stay up until told to stop.
    sys.stdout.write('published\\n'); sys.stdout.flush()
    sys.stdin.readline()
    node.destroy_node(); rclpy.shutdown()
""")


def test_result_crosses_processes(ros_domain):
    import rclpy
    from rclpy.qos import DurabilityPolicy, QoSProfile

    from cgrs_ros.msg import RetrievalResult

    proc = subprocess.Popen([sys.executable, '-c', PUBLISHER], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=dict(os.environ))
    context = rclpy.Context()
    rclpy.init(context=context)
    try:
        assert proc.stdout.readline().strip() == 'published'
        node = rclpy.create_node('cgrs_test_subscriber', context=context)
        received = []
        qos = QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL)
        node.create_subscription(RetrievalResult, 'cgrs_test/result', received.append, qos)
        executor = rclpy.executors.SingleThreadedExecutor(context=context)
        executor.add_node(node)
        deadline = time.monotonic() + 30.0  # discovery is usually < 1 s; be generous
        while not received and time.monotonic() < deadline:
            executor.spin_once(timeout_sec=0.1)
        assert received, 'no RetrievalResult received within 30 s'
        msg = received[0]
        assert msg.header.frame_id == 'map'
        assert msg.query == 'the red roof by the round plaza'
        assert msg.total_ms == pytest.approx(12.5)
        assert [c.rank for c in msg.candidates] == list(range(1, 26))
        last = msg.candidates[-1]
        assert last.image_id == 'image_00000019'
        assert last.latitude == pytest.approx(47.0025)
        assert last.pose.position.y == pytest.approx(-50.0)
        assert last.caption == 'roof ' * 25
        assert last.fused_score == pytest.approx(0.04)
        node.destroy_node()
    finally:
        rclpy.shutdown(context=context)
        proc.communicate('stop\n', timeout=30)
    assert proc.returncode == 0
