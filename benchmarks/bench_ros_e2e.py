"""End-to-end latency of the ROS stack vs the engine's own query time, for the same goals.

    .venv/bin/python benchmarks/bench_ros_e2e.py [--goals 100] [--world demo/world] [--json]

1. In process: Retriever.query for each goal (the engine's time).
2. Over DDS: a probe node publishes each goal on /cgrs/goal_text and waits for /goal_pose from
   retrieval_node running in another process (started by `cgrs launch`); one goal at a time.
The ratio of the two p50s is the ROS overhead (serialization, DDS, executor, conversions).
"""

import argparse
import json
import os
from pathlib import Path
import random
import subprocess
import sys
import threading
import time

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / 'config' / 'demo_engine.yaml'


def _percentiles(samples):
    array = np.asarray(samples)
    return {'p50_ms': float(np.percentile(array, 50)), 'p95_ms': float(np.percentile(array, 95)),
            'mean_ms': float(array.mean()), 'n': int(array.size)}


def _goals(world, count):
    import csv
    with open(world / 'queries.csv', newline='') as handle:
        queries = [row['query'] for row in csv.DictReader(handle)]
    random.Random(0).shuffle(queries)
    return (queries * (count // len(queries) + 1))[:count]


def engine_times(world, goals):
    """Milliseconds per goal for Retriever.query in this process (after one warm-up)."""
    from cgrs_ros.engine.config import load_config
    from cgrs_ros.engine.indexer import index_gallery
    from cgrs_ros.engine.retriever import Retriever
    config = load_config(CONFIG)
    index_gallery(world, config, progress=False)
    retriever = Retriever.open(world, config)
    retriever.query(goals[0])
    times = []
    for goal in goals:
        start = time.perf_counter()
        retriever.query(goal)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def ros_times(world, goals, timeout=60.0):
    """Milliseconds from publishing each goal to receiving /goal_pose in this process."""
    import rclpy
    from geometry_msgs.msg import PoseStamped
    from std_msgs.msg import String

    env = dict(os.environ, ROS_AUTOMATIC_DISCOVERY_RANGE='LOCALHOST')
    env.setdefault('ROS_DOMAIN_ID', str(random.randint(1, 100)))
    os.environ.update(env)
    stack = subprocess.Popen(
        [sys.executable, '-m', 'cgrs_ros.cli', 'launch', f'gallery_dir:={world}',
         f'config:={CONFIG}', 'captioning:=false', 'log_level:=warn'],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    context = rclpy.Context()
    rclpy.init(context=context)
    node = rclpy.create_node('cgrs_bench_probe', context=context)
    arrived = threading.Event()
    node.create_subscription(PoseStamped, '/goal_pose', lambda msg: arrived.set(), 10)
    publisher = node.create_publisher(String, '/cgrs/goal_text', 10)
    executor = rclpy.executors.SingleThreadedExecutor(context=context)
    executor.add_node(node)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()
    times = []
    try:
        # Wait for the node: the first goal may arrive before it has loaded; resend until
        # a pose comes back (this warm-up is not timed).
        deadline = time.monotonic() + 300
        while not arrived.is_set():
            if stack.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError('the stack did not answer a warm-up goal')
            publisher.publish(String(data=goals[0]))
            arrived.wait(2.0)
        for goal in goals:
            arrived.clear()
            start = time.perf_counter()
            publisher.publish(String(data=goal))
            if not arrived.wait(timeout):
                raise RuntimeError(f'no /goal_pose within {timeout} s for {goal!r}')
            times.append((time.perf_counter() - start) * 1e3)
    finally:
        executor.shutdown()
        node.destroy_node()
        rclpy.shutdown(context=context)
        stack.send_signal(2)
        stack.wait(timeout=60)
    return times


def main():
    """Run both measurements on the same goals and print them with their ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--goals', type=int, default=100)
    parser.add_argument('--world', type=Path, default=ROOT / 'demo' / 'world')
    parser.add_argument('--json', action='store_true')
    args = parser.parse_args()
    if not (args.world / 'gallery.csv').is_file():
        subprocess.run([sys.executable, '-m', 'cgrs_ros.cli', 'gallery', 'demo',
                        str(args.world)], check=True)
    goals = _goals(args.world, args.goals)
    engine = _percentiles(engine_times(args.world, goals))
    ros = _percentiles(ros_times(args.world, goals))
    report = {'goals': len(goals), 'engine': engine, 'ros_end_to_end': ros,
              'ratio_p50': ros['p50_ms'] / engine['p50_ms'],
              'overhead_p50_ms': ros['p50_ms'] - engine['p50_ms']}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f'{len(goals)} goals on {args.world}')
        for name, row in (('engine query (in process)', engine),
                          ('goal_text -> /goal_pose (DDS)', ros)):
            print(f'  {name:32s} p50 {row["p50_ms"]:7.1f} ms   p95 {row["p95_ms"]:7.1f} ms')
        print(f'  ratio p50 {report["ratio_p50"]:.2f}x, ROS overhead p50 '
              f'{report["overhead_p50_ms"]:.1f} ms')


if __name__ == '__main__':
    main()
