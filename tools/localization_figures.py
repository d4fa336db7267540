"""Fly a route in the demo world with GNSS "off" and measure camera localization.

    .venv/bin/python tools/localization_figures.py [--seed 0] [--size 16] [--speed 10]

What runs: the demo town (``cgrs gallery demo``), its orthophoto cut into 256 px satellite
tiles at 0.5 m/px with 87.5 % overlap (a 16 m grid; --overlap), indexed with
config/demo_engine.yaml (the demo's learned image tower). Then sim_drone (downward camera +
IMU) and localization_node run as separate ROS processes, started from the stack's NodeSpecs
as ``cgrs launch sim:=true localization:=true`` starts them, on a ROS domain of their own;
this script flies a lawnmower route by /goal_pose. localization_node never sees a GNSS
message: sim_drone's ``fix`` is read here only as the ground truth, paired with each
localization fix by the camera frame's stamp.

Printed (and written to OUT/figures.json): localization error (median, 95th percentile, max;
metres, fixes against the true position at the frame's time), availability (share of matched
frames that gave a fix), frames matched per second (and the camera rate they were offered at),
and the match latency.

``--offline`` runs the same route through the engine only (no ROS): frames drawn at the route
positions and matched one after the other; faster, and shows what the matcher does without
frame drops.
"""

import argparse
import json
import math
import os
from pathlib import Path
import random
import subprocess
import sys
import tempfile
import threading
import time

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _args():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--out', default=None, help='work folder (default: a temp folder)')
    parser.add_argument('--seed', type=int, default=0, help='demo town seed (default 0)')
    parser.add_argument('--size', type=int, default=16,
                        help='places in the town (default 16: a ~600 m town; 160 = the full '
                             'demo, ~1.9 km and ~3000 tiles to embed)')
    parser.add_argument('--altitude', type=float, default=90.0, help='flight height, m')
    parser.add_argument('--speed', type=float, default=10.0, help='cruise speed, m/s')
    parser.add_argument('--rate', type=float, default=2.0, help='camera and matching rate, Hz')
    parser.add_argument('--camera-size', type=int, default=384, help='camera image side, px')
    parser.add_argument('--fov', type=float, default=90.0, help='camera field of view, deg')
    parser.add_argument('--transport', choices=('raw', 'compressed'), default='raw')
    parser.add_argument('--yaw-noise', type=float, default=0.0,
                        help='IMU compass noise, degrees (standard deviation)')
    parser.add_argument('--margin', type=float, default=120.0,
                        help='route distance from the town edge, m')
    parser.add_argument('--config', default=str(ROOT / 'config' / 'demo_engine.yaml'),
                        help='engine config whose image encoder matches (default: '
                             'config/demo_engine.yaml, the demo config)')
    parser.add_argument('--min-score', type=float, default=None,
                        help='localizer min_score (default 0.7, the node default, calibrated '
                             'for models/demo_dual; other encoders score on other scales)')
    parser.add_argument('--set', dest='settings', action='append', default=[],
                        metavar='NAME=VALUE',
                        help='a localizer setting (a localization_node parameter of the same '
                             'name), e.g. --set temperature=0.01; repeatable')
    parser.add_argument('--overlap', type=float, default=0.875,
                        help='overlap of the 128 m satellite tiles (default 0.875: a 16 m grid; '
                             '0.75: a 32 m grid, a quarter of the tiles)')
    parser.add_argument('--offline', action='store_true',
                        help='engine only: no ROS, frames matched one after the other')
    return parser.parse_args()


def state_dir(tiles, config):
    """Return the tiles' state folder for one engine config (one index per encoder)."""
    return tiles / f'.cgrs-{Path(config).stem}'


def localizer_settings(args):
    """Return the localizer settings given on the command line ({name: typed value})."""
    from dataclasses import fields
    from cgrs_ros.engine.localization import LocalizerSettings
    types = {f.name: type(f.default) for f in fields(LocalizerSettings)}
    chosen = {} if args.min_score is None else {'min_score': args.min_score}
    for item in args.settings:
        name, _, value = item.partition('=')
        if name not in types or not value:
            raise SystemExit(f'--set {item}: expected NAME=VALUE with NAME one of '
                             f'{", ".join(types)}')
        kind = types[name]
        chosen[name] = value.lower() == 'true' if kind is bool else kind(value)
    return chosen


def tiles_dir(out, overlap):
    """Return the folder of the satellite tiles cut with ``overlap``."""
    return out / ('tiles' if overlap == 0.75 else f'tiles-{overlap:g}')


def prepare(out, seed, size, config, overlap):
    """Write the demo town and its satellite tiles, index the tiles; return (town, tiles)."""
    from cgrs_ros.engine.config import load_config
    from cgrs_ros.engine.demo import generate_demo_world
    from cgrs_ros.engine.demo.scene import satellite_tiles
    from cgrs_ros.engine.indexer import index_gallery

    town, tiles = out / 'town', tiles_dir(out, overlap)
    if not (town / 'world.json').exists():
        generate_demo_world(town, seed=seed, size=size, drone_views=0, force=True)
    if not (tiles / 'gallery.csv').exists():
        summary = satellite_tiles(town, tiles, overlap=overlap, force=True)
        print(f'{summary.tiles} satellite tiles (stride {summary.stride} px = '
              f'{summary.stride * 0.5:g} m) in {tiles}')
    started = time.monotonic()
    index_gallery(tiles, load_config(config), state_dir=state_dir(tiles, config),
                  progress=False)
    print(f'tiles indexed in {time.monotonic() - started:.0f} s')
    return town, tiles


def lawnmower(side_m, margin):
    """Return the route's waypoints (east, north m): three passes across the town."""
    a = side_m / 2.0 - margin
    return [(-a, -a), (a, -a), (a, 0.0), (-a, 0.0), (-a, a), (a, a)]


def summarize(errors, frames, fixes, seconds, latencies):
    """Return the figures as a dict (errors in metres)."""
    import numpy as np
    errors = np.asarray(errors, float)
    return {
        'frames_matched': int(frames), 'fixes': int(fixes),
        'availability': fixes / frames if frames else 0.0,
        'error_median_m': float(np.median(errors)) if len(errors) else math.nan,
        'error_p95_m': float(np.percentile(errors, 95)) if len(errors) else math.nan,
        'error_max_m': float(errors.max()) if len(errors) else math.nan,
        'fixes_within_m': {str(d): float(np.mean(errors <= d)) if len(errors) else 0.0
                           for d in (25, 50, 100)},
        'frames_per_s': frames / seconds if seconds else 0.0,
        'latency_median_ms': float(np.median(latencies)) if len(latencies) else math.nan,
    }


# ---- offline: the engine alone -----------------------------------------------------------

def run_offline(args, town, tiles):
    """Draw frames along the route and match them one by one; return the figures."""
    from cgrs_ros.engine import geo
    from cgrs_ros.engine.config import load_config
    from cgrs_ros.engine.demo.scene import load_scene, render_camera
    from cgrs_ros.engine.localization import Localizer, LocalizerSettings
    from cgrs_ros.engine.retriever import Retriever
    import numpy as np

    scene = load_scene(town)
    retriever = Retriever.open(tiles, load_config(args.config),
                               state_dir=state_dir(tiles, args.config))
    route = lawnmower(scene.side_m, args.margin)
    step = args.speed / args.rate
    lat, lon, _ = geo.enu_to_geodetic(*route[0], 0.0, scene.datum)
    settings = LocalizerSettings(**localizer_settings(args))
    localizer = Localizer(retriever, settings, prior=(lat, lon, 100.0))
    rng = np.random.default_rng(0)
    errors, latencies, frames, fixes, t = [], [], 0, 0, 0.0
    started = time.perf_counter()
    for (e0, n0), (e1, n1) in zip(route[:-1], route[1:]):
        length = math.hypot(e1 - e0, n1 - n0)
        heading = math.degrees(math.atan2(e1 - e0, n1 - n0)) % 360.0
        for k in range(max(1, int(length / step))):
            e, n = e0 + (e1 - e0) * k * step / length, n0 + (n1 - n0) * k * step / length
            frame = render_camera(scene, e, n, args.altitude, heading, args.camera_size,
                                  args.fov, 0.0, rng)
            told = heading + (rng.normal(0.0, args.yaw_noise) if args.yaw_noise else 0.0)
            outcome = localizer.locate(frame, told, t)
            t += 1.0 / args.rate
            frames += 1
            latencies.append(outcome.latency_ms)
            if outcome.estimate is not None:
                fixes += 1
                fe, fn, _ = scene.enu(outcome.estimate.lat, outcome.estimate.lon,
                                      scene.datum.alt)
                errors.append(math.hypot(fe - e, fn - n))
    return summarize(errors, frames, fixes, time.perf_counter() - started, latencies)


# ---- closed loop over ROS -----------------------------------------------------------------

def _params_file(out, args, town, start):
    from cgrs_ros.engine.demo.scene import load_scene
    scene = load_scene(town)
    datum = {'datum.latitude': scene.datum.lat, 'datum.longitude': scene.datum.lon,
             'datum.altitude': scene.datum.alt}
    from cgrs_ros.engine import geo
    lat, lon, _ = geo.enu_to_geodetic(start[0], start[1], 0.0, scene.datum)
    sections = {
        'sim_drone': {**datum, 'world': str(town), 'camera_rate': args.rate,
                      'camera.size': args.camera_size, 'camera.fov_deg': args.fov,
                      'camera.jpeg_quality': 90 if args.transport == 'compressed' else 0,
                      'imu.yaw_stddev_deg': args.yaw_noise, 'initial.x': start[0],
                      'initial.y': start[1], 'initial.z': args.altitude,
                      'cruise_altitude': args.altitude, 'max_speed': args.speed},
        'localization_node': {**datum, 'config': str(Path(args.config).resolve()),
                              'state_dir': str(state_dir(tiles_dir(out, args.overlap),
                                                         args.config)),
                              'image_transport': args.transport, 'heading_source': 'imu',
                              'rate': args.rate, 'prior.latitude': lat,
                              'prior.longitude': lon, 'prior.radius_m': 100.0},
    }
    sections['localization_node'].update(localizer_settings(args))
    path = out / 'params.yaml'
    path.write_text(yaml.safe_dump({f'/**/{node}': {'ros__parameters': values}
                                    for node, values in sections.items()}, sort_keys=False))
    return path, scene


class _Recorder:
    """A probe node: flies the route and records truth, fixes and diagnostics."""

    def __init__(self):
        import rclpy
        from rclpy.executors import SingleThreadedExecutor
        from diagnostic_msgs.msg import DiagnosticArray
        from geometry_msgs.msg import PoseStamped
        from sensor_msgs.msg import NavSatFix

        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        self.node = rclpy.create_node('localization_figures', context=self.context)
        self.lock = threading.Lock()
        self.truth, self.fixes, self.diag, self.latencies = [], [], {}, []
        self.node.create_subscription(NavSatFix, '/cgrs/fix', self._keep(self.truth), 100)
        self.node.create_subscription(NavSatFix, '/cgrs/localization/fix',
                                      self._keep(self.fixes), 100)
        self.node.create_subscription(DiagnosticArray, '/diagnostics', self._on_diag, 10)
        self.goal_pub = self.node.create_publisher(PoseStamped, '/goal_pose', 10)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self.thread = threading.Thread(target=self.executor.spin, daemon=True)
        self.thread.start()

    def _keep(self, bucket):
        def callback(msg):
            with self.lock:
                bucket.append(msg)
        return callback

    def _on_diag(self, msg):
        for status in msg.status:
            if status.name.endswith(': localization'):
                with self.lock:
                    self.diag = {kv.key: kv.value for kv in status.values}
                    latency = float(self.diag.get('last_latency_ms', 'nan'))
                    if math.isfinite(latency):
                        self.latencies.append(latency)

    def wait(self, predicate, timeout, what, procs):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in procs.items():
                if proc.poll() is not None:
                    raise SystemExit(f'{name} exited ({proc.returncode}) before {what}')
            with self.lock:
                if predicate():
                    return
            time.sleep(0.05)
        raise SystemExit(f'timed out after {timeout:.0f} s waiting for {what}')

    def fly_to(self, x, y, z):
        from geometry_msgs.msg import PoseStamped
        msg = PoseStamped()
        msg.header.frame_id = 'map'
        msg.pose.position.x, msg.pose.position.y, msg.pose.position.z = x, y, z
        self.goal_pub.publish(msg)

    def close(self):
        import rclpy
        self.executor.shutdown()
        self.node.destroy_node()
        rclpy.shutdown(context=self.context)


def _distance(geod, fix, lat, lon):
    return geod.inv(fix.longitude, fix.latitude, lon, lat)[2]


def run_ros(args, out, town):
    """Fly the route with sim_drone + localization_node over DDS; return the figures."""
    from cgrs_ros.engine import geo
    from cgrs_ros.nodes import stack
    import numpy as np
    import pyproj

    os.environ.setdefault('ROS_DOMAIN_ID', str(random.randint(1, 100)))
    os.environ['ROS_AUTOMATIC_DISCOVERY_RANGE'] = 'LOCALHOST'
    os.environ.setdefault('ROS_LOG_DIR', tempfile.mkdtemp(prefix='cgrs-roslog-'))
    os.environ['HF_HUB_OFFLINE'] = '1'
    from cgrs_ros.engine.demo.scene import load_scene
    route = lawnmower(load_scene(town).side_m, args.margin)
    params, scene = _params_file(out, args, town, route[0])
    values = stack.resolve_arguments({
        'params_file': str(params), 'sim': 'true', 'localization': 'true',
        'localization_gallery': str(tiles_dir(out, args.overlap)), 'captioning': 'false'})
    specs = {s.name: s for s in stack.node_specs(values)}
    procs = {}
    for name in ('sim_drone', 'localization_node'):
        with open(out / f'{name}.log', 'w') as log:
            procs[name] = subprocess.Popen(stack.command(specs[name]), stdout=log,
                                           stderr=subprocess.STDOUT)
    recorder = _Recorder()
    geod = pyproj.Geod(ellps='WGS84')
    try:
        recorder.wait(lambda: recorder.diag.get('engine') == 'ready', 600.0,
                      'localization_node ready', procs)
        recorder.wait(lambda: recorder.goal_pub.get_subscription_count() > 0, 60.0,
                      'sim_drone', procs)
        with recorder.lock:
            frames0 = int(recorder.diag.get('frames_processed', 0))
            fixes0 = int(recorder.diag.get('fixes', 0))
            dropped0 = int(recorder.diag.get('frames_dropped', 0))
            recorder.fixes.clear()
            recorder.latencies.clear()
        started = time.monotonic()
        for x, y in route[1:]:
            lat, lon, _ = geo.enu_to_geodetic(x, y, 0.0, scene.datum)
            recorder.fly_to(x, y, args.altitude)
            recorder.wait(lambda: recorder.truth and _distance(
                geod, recorder.truth[-1], lat, lon) < 3.0, 900.0, f'arrival at ({x}, {y})',
                procs)
        seconds = time.monotonic() - started
        time.sleep(1.5)  # the last frame's fix, and a diagnostics message after it
        with recorder.lock:
            truth = sorted(recorder.truth, key=_stamp)
            fixes = list(recorder.fixes)
            diag = dict(recorder.diag)
            latencies = list(recorder.latencies)
    finally:
        recorder.close()
        for proc in procs.values():
            proc.send_signal(2)
        for proc in procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    stamps = np.array([_stamp(t) for t in truth])
    errors, outliers = [], []
    for fix in fixes:
        i = int(np.argmin(np.abs(stamps - _stamp(fix))))
        errors.append(geod.inv(fix.longitude, fix.latitude, truth[i].longitude,
                               truth[i].latitude)[2])
        if errors[-1] > 100.0:  # where the large errors happen (map metres)
            true_en = scene.enu(truth[i].latitude, truth[i].longitude, scene.datum.alt)[:2]
            fix_en = scene.enu(fix.latitude, fix.longitude, scene.datum.alt)[:2]
            outliers.append({'t_s': round(_stamp(fix) - stamps[0], 2),
                             'error_m': round(errors[-1], 1),
                             'true_en': [round(float(v), 1) for v in true_en],
                             'fix_en': [round(float(v), 1) for v in fix_en]})
    frames = int(diag.get('frames_processed', 0)) - frames0
    figures = summarize(errors, frames, int(diag.get('fixes', 0)) - fixes0, seconds, latencies)
    figures['frames_dropped'] = int(diag.get('frames_dropped', 0)) - dropped0
    figures['fixes_over_100m'] = outliers
    figures['flight_s'] = seconds
    return figures


def _stamp(msg):
    return msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9


def main():
    """Prepare the town, fly the route, print and save the figures."""
    args = _args()
    from cgrs_ros.engine.torch_compat import ensure_torchvision
    ensure_torchvision()
    out = Path(args.out or tempfile.mkdtemp(prefix='cgrs-localization-')).resolve()
    out.mkdir(parents=True, exist_ok=True)
    town, tiles = prepare(out, args.seed, args.size, args.config, args.overlap)
    figures = run_offline(args, town, tiles) if args.offline else run_ros(args, out, town)
    figures.update({'mode': 'offline (engine only)' if args.offline else 'ROS closed loop',
                    'seed': args.seed, 'size': args.size, 'altitude_m': args.altitude,
                    'speed_mps': args.speed, 'rate_hz': args.rate,
                    'camera_px': args.camera_size, 'transport': args.transport,
                    'yaw_noise_deg': args.yaw_noise, 'config': args.config,
                    'localizer': localizer_settings(args), 'tile_overlap': args.overlap,
                    'cpus': os.cpu_count()})
    (out / 'figures.json').write_text(json.dumps(figures, indent=1) + '\n')
    print(f'localization, {figures["mode"]}, demo town seed {args.seed} ({args.size} places), '
          f'{args.altitude:g} m, {args.speed:g} m/s, camera {args.camera_size} px at '
          f'{args.rate:g} Hz ({args.transport}), GNSS unused:')
    print(f'  error median {figures["error_median_m"]:.1f} m, p95 '
          f'{figures["error_p95_m"]:.1f} m, max {figures["error_max_m"]:.1f} m')
    within = figures['fixes_within_m']
    print(f'  fixes within 25 / 50 / 100 m of the truth: {within["25"]:.0%} / '
          f'{within["50"]:.0%} / {within["100"]:.0%}')
    print(f'  availability {figures["availability"]:.0%} ({figures["fixes"]} fixes of '
          f'{figures["frames_matched"]} frames matched)')
    print(f'  {figures["frames_per_s"]:.2f} frames/s matched'
          + (f' ({figures["frames_dropped"]} frames dropped while busy)'
             if 'frames_dropped' in figures else '')
          + f'; match latency {figures["latency_median_ms"]:.0f} ms (at most '
          f'{1000.0 / figures["latency_median_ms"]:.1f} frames/s back to back)')
    print(f'figures: {out / "figures.json"}')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
