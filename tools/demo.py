"""`make demo`: the whole loop on the demo world, words in, a drone at the place out.

1. Generates the demo world if it is missing (deterministic; into demo/world by default).
2. Starts the stack as `ros2 launch cgrs_ros navigation.launch.py sim:=true` would, through
   `cgrs launch`, with config/demo_engine.yaml (offline: the learned dual encoder of
   models/demo_dual looks at the pixels, manifest captions rerank; --config
   config/demo_pixels.yaml for pixels only) and a fast simulated drone; the map datum is the
   world's datum. It prints the coarse-stage model the retrieval node reports.
3. Sends a few spoken-style goals from queries.csv (phrasings held out from the captions)
   to the `retrieve` action, waits for the drone to report its arrival, and prints per goal:
   the query, the retrieved image and its group, whether that is the intended place, and the
   distance from the drone's final fix to the intended place (computed here from world.json
   with the engine's geodesy, not taken from the nodes).
4. Stops the stack with Ctrl-C, as a user would.

Exits 1 if the loop breaks (the stack dies, no result, no arrival in time), 0 otherwise:
a wrong place is a retrieval miss to report, not a broken loop.
"""

import argparse
import csv
import json
import math
import os
from pathlib import Path
import signal
import subprocess
import sys
import threading
import time

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from cgrs_ros.engine import geo  # noqa: E402
import yaml  # noqa: E402

# One goal per kind of place, in this order, so the demo flies to varied scenery.
KINDS = ('pond', 'football pitch', 'bridge', 'building', 'roundabout', 'plaza', 'parking',
         'tennis courts', 'house')


class Broken(Exception):
    """The loop broke: the demo cannot go on (the message says where and why)."""


def parse_args(argv=None):
    """Return the command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--world', type=Path, default=ROOT / 'demo' / 'world',
                        help='demo world folder (generated when missing)')
    parser.add_argument('--size', type=int, default=None,
                        help='places when generating the world (default 160)')
    parser.add_argument('--out', type=Path, default=ROOT / 'demo',
                        help='folder for the demo params file and the stack log')
    parser.add_argument('--goals', type=int, default=4, help='goals to send (default 4)')
    parser.add_argument('--speed', type=float, default=40.0,
                        help='simulated drone top speed, m/s (default 40)')
    parser.add_argument('--acceleration', type=float, default=8.0,
                        help='simulated drone acceleration limit, m/s^2 (default 8)')
    parser.add_argument('--ready-timeout', type=float, default=600.0,
                        help='seconds to wait for the stack (indexing on the first run)')
    parser.add_argument('--goal-timeout', type=float, default=180.0,
                        help='seconds to wait for each result and arrival')
    parser.add_argument('--config', type=Path, default=ROOT / 'config' / 'demo_engine.yaml',
                        help='engine config (default config/demo_engine.yaml; '
                             'config/demo_pixels.yaml: from pixels alone)')
    return parser.parse_args(argv)


# ---- the world ------------------------------------------------------------------------
def ensure_world(world, size):
    """Generate the demo world into ``world`` unless it already holds one."""
    if (world / 'gallery.csv').is_file() and (world / 'world.json').is_file():
        return
    extra = [] if size is None else ['--size', str(size)]
    print(f'==> generating the demo world into {world} (first run only)', flush=True)
    subprocess.run([sys.executable, '-m', 'cgrs_ros.cli', 'gallery', 'demo', str(world),
                    *extra], check=True)


def load_world(world):
    """Return (datum, places by group_id, [(query, group_id)]) of a demo world."""
    info = json.loads((world / 'world.json').read_text())
    datum = geo.Datum(**info['datum'])
    places = {place['group_id']: place for place in info['places']}
    with open(world / 'queries.csv', newline='', encoding='utf-8') as handle:
        queries = [(row['query'], row['group_id']) for row in csv.DictReader(handle)]
    return datum, places, queries


def pick_goals(places, queries, count):
    """Pick ``count`` queries: the first one of each kind of place in KINDS, then cycle."""
    chosen, used = [], set()
    while len(chosen) < count:
        added = False
        for kind in KINDS:
            for text, group in queries:
                if group not in used and places[group]['kind'] == kind:
                    chosen.append((text, group))
                    used.add(group)
                    added = True
                    break
            if len(chosen) == count:
                break
        if not added:
            break  # fewer places than goals asked for
    return chosen


def ground_distance(lat, lon, place):
    """Return the horizontal distance (m) from (lat, lon) to a world.json place."""
    e, n, _ = geo.geodetic_to_enu(lat, lon, place['alt'],
                                  geo.Datum(place['lat'], place['lon'], place['alt']))
    return math.hypot(e, n)


def write_params(path, datum, args):
    """Write the demo's params file: config/navigation.yaml with the world's datum and drone."""
    params = yaml.safe_load((ROOT / 'config' / 'navigation.yaml').read_text())
    point = {'latitude': datum.lat, 'longitude': datum.lon, 'altitude': datum.alt}
    for node in ('/**/retrieval_node', '/**/sim_drone'):
        params[node]['ros__parameters']['datum'] = dict(point)
    params['/**/sim_drone']['ros__parameters'].update({
        'max_speed': args.speed, 'max_acceleration': args.acceleration,
        'cruise_altitude': 40.0, 'arrival_tolerance': 1.0})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('# Written by tools/demo.py from config/navigation.yaml.\n'
                    + yaml.safe_dump(params, sort_keys=False))
    return path


# ---- talking to the stack -------------------------------------------------------------
class Operator:
    """The demo's ROS node: sends goals by action and listens to the drone."""

    def __init__(self, namespace='cgrs'):
        import rclpy
        from rclpy.action import ActionClient
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.qos import DurabilityPolicy, QoSProfile

        from cgrs_ros.action import Retrieve
        from diagnostic_msgs.msg import DiagnosticArray
        from sensor_msgs.msg import NavSatFix
        from std_msgs.msg import String

        self.rclpy, self.Retrieve = rclpy, Retrieve
        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        self.node = rclpy.create_node('cgrs_demo_operator', context=self.context)
        self.lock = threading.Lock()
        self.engine, self.image_encoder = None, None
        self.statuses, self.fix = [], None
        ns = f'/{namespace}'
        self.node.create_subscription(DiagnosticArray, '/diagnostics', self._on_diagnostics, 10)
        self.node.create_subscription(
            String, f'{ns}/status', self._on_status,
            QoSProfile(depth=10, durability=DurabilityPolicy.TRANSIENT_LOCAL))
        self.node.create_subscription(NavSatFix, f'{ns}/fix', self._on_fix, 10)
        self.action = ActionClient(self.node, Retrieve, f'{ns}/retrieve')
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self.thread = threading.Thread(target=self.executor.spin, daemon=True)
        self.thread.start()

    def _on_diagnostics(self, msg):
        for status in msg.status:
            for value in status.values:
                if value.key == 'engine':
                    with self.lock:
                        self.engine = (value.value, status.message)
                elif value.key == 'image_encoder':
                    with self.lock:
                        self.image_encoder = value.value

    def _on_status(self, msg):
        with self.lock:
            self.statuses.append(json.loads(msg.data))

    def _on_fix(self, msg):
        with self.lock:
            self.fix = msg

    def wait(self, predicate, timeout, what, stack):
        """Wait until ``predicate()`` is truthy; raise Broken on timeout or a dead stack."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if stack.poll() is not None:
                raise Broken(f'the stack exited ({stack.returncode}) while waiting for {what}')
            with self.lock:
                value = predicate()
            if value:
                return value
            time.sleep(0.05)
        raise Broken(f'no {what} within {timeout:.0f} s')

    def retrieve(self, text, timeout, stack):
        """Send ``text`` to the retrieve action; return its RetrievalResult."""
        if not self.action.wait_for_server(timeout_sec=timeout):
            raise Broken('the retrieve action server did not appear')
        future = self.action.send_goal_async(self.Retrieve.Goal(description=text))
        handle = self.wait(lambda: future.done() and future.result(), timeout,
                           'answer to the goal', stack)
        if not handle.accepted:
            raise Broken(f'the retrieve action refused {text!r}')
        result_future = handle.get_result_async()
        response = self.wait(lambda: result_future.done() and result_future.result(),
                             timeout, 'retrieval result', stack)
        return response.result.result

    def close(self):
        """Stop spinning and shut the node down."""
        self.executor.shutdown()
        self.node.destroy_node()
        self.rclpy.shutdown(context=self.context)


def start_stack(params, world, log_path, config):
    """Start `cgrs launch ... sim:=true` writing its output to ``log_path``."""
    command = [sys.executable, '-m', 'cgrs_ros.cli', 'launch', f'params_file:={params}',
               f'gallery_dir:={world}', f'config:={config.resolve()}',
               'sim:=true', 'captioning:=false']
    print(f'==> starting the stack: cgrs launch {" ".join(command[4:])}', flush=True)
    print(f'    (node output: {log_path})', flush=True)
    log = open(log_path, 'w')
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                            env=dict(os.environ, PYTHONUNBUFFERED='1'))


def stop_stack(stack):
    """Ctrl-C the stack (it stops its nodes in turn); return its exit code."""
    if stack.poll() is None:
        stack.send_signal(signal.SIGINT)
        try:
            stack.wait(timeout=60)
        except subprocess.TimeoutExpired:
            stack.kill()
            stack.wait()
    return stack.returncode


def _matches(status, pose, seq):
    goal = status.get('goal')
    return (status['goal_seq'] > seq and status['arrived'] and goal is not None
            and math.dist((goal['x'], goal['y'], goal['z']),
                          (pose.position.x, pose.position.y, pose.position.z)) < 1e-3)


def fly_goal(op, stack, number, total, text, intended, places, timeout):
    """Send one goal, wait for the drone to arrive, print the outcome; return a row."""
    from cgrs_ros.msg import RetrievalResult

    print(f'\n[{number}/{total}] "{text}"', flush=True)
    with op.lock:
        seq = op.statuses[-1]['goal_seq'] if op.statuses else 0
    started = time.monotonic()
    result = op.retrieve(text, timeout, stack)
    if result.status != RetrievalResult.STATUS_OK or not result.candidates:
        raise Broken(f'retrieval failed for {text!r}: status {result.status} {result.error}')
    best = result.candidates[0]
    hit = best.group_id == intended
    target = places.get(best.group_id, {})
    print(f'      retrieved {best.image_id} ({best.platform}), group {best.group_id} '
          f'({target.get("kind", "?")}); intended {intended} ({places[intended]["kind"]}): '
          f'{"MATCH" if hit else "MISS"}  [{result.total_ms:.0f} ms]', flush=True)
    arrival = op.wait(lambda: [s for s in op.statuses if _matches(s, best.pose, seq)],
                      timeout, f'arrival for goal {number}', stack)[-1]
    flown = time.monotonic() - started
    with op.lock:
        fix = op.fix
    lat, lon, alt = fix.latitude, fix.longitude, fix.altitude
    to_intended = ground_distance(lat, lon, places[intended])
    print(f'      drone arrived after {flown:.1f} s at {lat:.6f}, {lon:.6f}, '
          f'{alt - places[intended]["alt"]:.0f} m above the ground; '
          f'{to_intended:.1f} m from the intended place'
          + (f' (its image is centred {ground_distance(best.latitude, best.longitude, target):.1f}'
             ' m from the place centre)' if hit else
             f' ({ground_distance(lat, lon, target):.1f} m from the retrieved one)'
             if target else ''), flush=True)
    return {'query': text, 'image_id': best.image_id, 'group': best.group_id,
            'intended': intended, 'match': hit, 'distance_m': to_intended,
            'seconds': flown, 'goal_seq': arrival['goal_seq']}


def run(args):
    """Run the demo; return the process exit code."""
    began = time.monotonic()
    world = args.world.resolve()
    ensure_world(world, args.size)
    datum, places, queries = load_world(world)
    goals = pick_goals(places, queries, args.goals)
    if not goals:
        print(f'demo: {world}/queries.csv has no queries; regenerate the world', flush=True)
        return 1
    params = write_params(args.out / 'demo_params.yaml', datum, args)
    stack = start_stack(params, world, args.out / 'stack.log', args.config)
    op, rows, code = None, [], 0
    try:
        op = Operator()
        print(f'==> waiting for the stack (the first run indexes {world.name})', flush=True)
        state = op.wait(lambda: op.engine and op.engine[0] != 'loading' and op.engine,
                        args.ready_timeout, 'retrieval engine', stack)
        if state[0] != 'ready':
            raise Broken(f'the retrieval engine did not load: {state[1]}')
        op.wait(lambda: op.statuses and op.fix, args.ready_timeout, 'simulated drone', stack)
        encoder = op.wait(lambda: op.image_encoder, args.ready_timeout,
                          "the engine's diagnostics", stack)
        print(f'==> coarse stage (retrieval_node diagnostics): {encoder}', flush=True)
        print(f'==> stack ready after {time.monotonic() - began:.0f} s; drone at the datum '
              f'({datum.lat}, {datum.lon}); {len(goals)} goals', flush=True)
        for number, (text, intended) in enumerate(goals, start=1):
            rows.append(fly_goal(op, stack, number, len(goals), text, intended, places,
                                 args.goal_timeout))
    except Broken as exc:
        print(f'\ndemo: the loop broke: {exc}', flush=True)
        code = 1
    finally:
        if op is not None:
            op.close()
        stopped = stop_stack(stack)
        print(f'==> stack stopped (exit {stopped})', flush=True)
    if code:
        tail = (args.out / 'stack.log').read_text(errors='replace').splitlines()[-25:]
        print('    last lines of the stack log:\n      ' + '\n      '.join(tail), flush=True)
        return code
    hits = sum(row['match'] for row in rows)
    print(f'\n==> {len(rows)} goals flown, {hits} to the intended place; '
          f'demo took {time.monotonic() - began:.0f} s', flush=True)
    print(f'    Models here are trained offline on other towns ({args.config.name} says which);'
          ' recall\n    over all held-out queries of this world:\n'
          f'      cgrs eval gallery {world} --queries {world / "queries.csv"} '
          f'--config {args.config} --methods coarse,rerank,hybrid', flush=True)
    return 0


def main(argv=None):
    """Entry point of `make demo` (and `python tools/demo.py --help`)."""
    return run(parse_args(argv))


if __name__ == '__main__':
    sys.exit(main())
