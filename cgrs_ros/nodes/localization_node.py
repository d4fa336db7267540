"""localization_node: where am I, from the downward camera, when GNSS is gone.

Matches camera frames against the satellite rows of a gallery (``cgrs_ros.engine.localization``
does the work: local search near the last estimate or a prior, global recovery, covariance,
ambiguity) and publishes the position. Thin: decoding, parameters, topics, a worker thread.

Topics (relative names live in the node's namespace, ``cgrs`` in the launch file):

- sub ``camera/image`` (sensor_msgs/Image; ``image_transport: raw``) or
  ``camera/image/compressed`` (sensor_msgs/CompressedImage; ``compressed``): the downward
  camera (``image_topic`` names the base topic).
- sub ``imu`` (sensor_msgs/Imu) when ``heading_source: imu``: the yaw of the message nearest
  the frame's stamp turns the frame north-up before matching (satellite tiles are north-up; a
  body-fixed camera turns with the drone).
- pub ``localization/fix`` (sensor_msgs/NavSatFix): latitude/longitude of the estimate,
  altitude NaN (a nadir image says where, not how high), ENU covariance (approximated; the
  vertical variance is 1e6, unknown). ``status.service`` is 0: not a GNSS receiver.
- pub ``localization/pose`` (geometry_msgs/PoseWithCovarianceStamped) in ``map_frame``: the same
  position (z = the matched ground), covariance x/y from the matches, z/roll/pitch unknown
  (1e6). Orientation: the match's heading when it gives one (a drone-photo row); satellite
  tiles are north-up by construction, so with them the heading is unknown: orientation
  identity and yaw variance 1e6 (a consumer such as robot_localization must not fuse it).
- pub ``/diagnostics``: engine state, frames received/processed/dropped, fixes, the reason
  of the last frame without a fix (ambiguous, low score, no heading), latency, frames/s.

Frames: the worker takes the newest frame at most ``rate`` times per second; frames that
arrive while it is busy replace the waiting one (counted as dropped). Every output carries
the stamp of the frame it came from.
"""

import collections
import math
import threading
import time

from cgrs_ros.engine.errors import CgrsError
from cgrs_ros.nodes import image_msgs
from cgrs_ros.nodes.datum import DATUM_PARAMETERS, resolve_datum
from cgrs_ros.nodes.engine_loader import open_retriever
from cgrs_ros.nodes.parameters import declare_parameters, Param
from cgrs_ros.nodes.spin import spin_node
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from geometry_msgs.msg import PoseWithCovarianceStamped, Quaternion
from rclpy.node import Node
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import CompressedImage, Image, Imu, NavSatFix, NavSatStatus

UNKNOWN_VARIANCE = 1e6
# Yaw standard deviation given to a heading read from a matched drone photo (its camera heading
# is the place's, the drone's may differ by the spread of the gallery's views).
MATCH_YAW_STDDEV_DEG = 20.0


def _not_blank(name):
    return lambda v: None if v.strip() else f'{name} must not be empty'


PARAMETERS = (
    Param('gallery_dir', '', 'Gallery whose satellite rows the frames are matched against '
          '(e.g. tiles of an orthophoto: cgrs gallery from-geotiff).', read_only=True,
          check=lambda v: None if v.strip() else 'gallery_dir is empty; set it to the '
          'satellite gallery, e.g. -p gallery_dir:=/data/tiles or localization_gallery:=...'),
    Param('config', '', 'Engine config YAML (the image encoder); empty = built-in defaults.',
          read_only=True),
    Param('state_dir', '', 'Where indexes live; empty = GALLERY/.cgrs.', read_only=True),
    Param('datum_gallery', '', 'Gallery whose centre is the map datum when datum.* are NaN; '
          'empty = gallery_dir. Set it (or the datum) to the gallery retrieval_node uses, so '
          'both put map at one place.', read_only=True),
    *DATUM_PARAMETERS,
    Param('map_frame', 'map', 'Frame of the published pose (ENU around the datum).',
          check=_not_blank('map_frame')),
    Param('frame_id', 'base_link', 'frame_id of the NavSatFix (the vehicle).',
          check=_not_blank('frame_id')),
    Param('image_topic', 'camera/image', 'Base topic of the downward camera.', read_only=True,
          check=_not_blank('image_topic')),
    Param('image_transport', 'raw', 'raw: sensor_msgs/Image on image_topic; compressed: '
          'sensor_msgs/CompressedImage on image_topic/compressed.',
          choices=('raw', 'compressed'), read_only=True),
    Param('heading_source', 'none', 'none: frames are matched as they come (north-up camera '
          'or gimbal); imu: the yaw of imu_topic turns each frame north-up first.',
          choices=('none', 'imu'), read_only=True),
    Param('imu_topic', 'imu', 'sensor_msgs/Imu topic read when heading_source is imu.',
          read_only=True, check=_not_blank('imu_topic')),
    Param('imu_max_age', 1.0, 'No IMU message within this of the frame stamp (s): no '
          'heading, the frame is skipped with the reason.', minimum=0.01,
          maximum=3600.0),
    Param('rate', 2.0, 'Most frames matched per second; frames arriving while busy are '
          'dropped (the newest waits).', minimum=0.01, maximum=100.0),
    Param('top_k', 8, 'Matches per query; the covariance is their spread.', minimum=1,
          maximum=100),
    Param('search_radius_m', 90.0, 'Local search radius around the recent estimates (m).',
          minimum=1.0, maximum=1e6),
    Param('radius_growth_mps', 10.0, 'The local radius grows by this for every second '
          'without a fix (m/s; about the top speed).', minimum=0.0, maximum=1000.0),
    Param('global_check', True, 'Search the whole gallery on every frame too; a place '
          'outside the local area scoring min_margin above the local best takes over.'),
    Param('confirm_jumps', 2, 'A fix outside the local area (from a global search) is '
          'published once this many frames in a row agree on it; 1 = at once.', minimum=1,
          maximum=100),
    Param('min_score', 0.7, 'Local best score under this -> global search; a global best '
          'under it -> no fix (cosine; depends on the encoder: 0.7 suits the demo model).',
          minimum=-1.0, maximum=1.0),
    Param('min_margin', 0.05, 'Best vs the best other place: a smaller score margin is '
          'ambiguous (no fix) when they are more than ambiguity_radius_m apart.',
          minimum=0.0, maximum=2.0),
    Param('ambiguity_radius_m', 130.0, 'Matches closer than this to the best are one place '
          '(averaged; about the width of a tile); farther ones are rivals.', minimum=1.0,
          maximum=1e6),
    Param('temperature', 0.02, 'Softness of the score weights (cosine units).', minimum=1e-4,
          maximum=10.0),
    Param('min_sigma_m', 8.0, 'Floor of the position standard deviation (m): a tile match '
          'is no sharper than the tile grid.', minimum=0.0, maximum=1e5),
    Param('anchor_window', 5, 'The local search is centred on the median of this many recent '
          'fixes (one outlier does not move it).', minimum=1, maximum=1000, read_only=True),
    Param('platform', 'satellite', 'Gallery rows matched against; empty = all platforms.',
          choices=('', 'satellite', 'drone', 'ground')),
    Param('query_platform', 'drone', 'Platform of the frames (the encoder expert, if any).',
          choices=('satellite', 'drone', 'ground')),
    Param('prior.latitude', math.nan, 'Prior position (WGS84 deg) searched first; NaN = none '
          '(the first frame is searched over the whole gallery).', minimum=-90.0,
          maximum=90.0, allow_nan=True),
    Param('prior.longitude', math.nan, 'Prior longitude, WGS84 degrees; NaN = none.',
          minimum=-180.0, maximum=180.0, allow_nan=True),
    Param('prior.radius_m', 300.0, 'Radius (m) searched around the prior.', minimum=1.0,
          maximum=1e7),
    Param('max_image_pixels', 16_000_000, 'Larger frames are refused before decoding.',
          minimum=1, maximum=400_000_000),
)

_SETTINGS = ('top_k', 'search_radius_m', 'radius_growth_mps', 'global_check', 'confirm_jumps',
             'min_score', 'min_margin', 'ambiguity_radius_m', 'temperature', 'min_sigma_m',
             'anchor_window', 'platform', 'query_platform')


def _stamp_s(stamp):
    return stamp.sec + stamp.nanosec * 1e-9


def _needs_image_encoder(config):
    """Refuse a config without an image encoder before anything is indexed."""
    from cgrs_ros.engine.errors import ConfigError
    if config.image_encoder.backend == 'none':
        raise ConfigError('localization matches images with the image encoder, and '
                          'image_encoder.backend is none in the config; give a config with an '
                          'image encoder (e.g. config/demo_engine.yaml)')


def imu_heading_deg(msg):
    """Return the compass heading (deg) of an Imu orientation, None when it has none."""
    q = msg.orientation
    norm = math.sqrt(q.x * q.x + q.y * q.y + q.z * q.z + q.w * q.w)
    if msg.orientation_covariance[0] == -1.0 or not math.isfinite(norm) or norm < 1e-6:
        return None
    x, y, z, w = q.x / norm, q.y / norm, q.z / norm, q.w / norm
    yaw = math.atan2(2.0 * (w * z + x * y), 1.0 - 2.0 * (y * y + z * z))
    return math.degrees(math.pi / 2.0 - yaw) % 360.0


class LocalizationNode(Node):
    """Matches the newest camera frame on a worker thread and publishes the fix."""

    def __init__(self, **kwargs):
        super().__init__('localization_node', **kwargs)
        self.params = declare_parameters(self, PARAMETERS, on_change=self._on_parameter)
        self._lock = threading.Condition()
        self._frame = None           # the newest frame not yet matched
        self._imu = collections.deque(maxlen=400)   # recent IMU messages (20 s at 20 Hz)
        self._imu_lock = threading.Lock()
        self._stop = False
        self._localizer = None
        self._datum = None
        self._engine_state, self._engine_error = 'loading', ''
        self._counts = collections.Counter()
        self._last = {'reason': '', 'mode': '', 'score': math.nan, 'sigma_m': math.nan,
                      'latency_ms': math.nan}
        self._processed_at = collections.deque(maxlen=20)

        self._fix_pub = self.create_publisher(NavSatFix, 'localization/fix', 10)
        self._pose_pub = self.create_publisher(PoseWithCovarianceStamped, 'localization/pose',
                                               10)
        self._diag_pub = self.create_publisher(DiagnosticArray, '/diagnostics', 10)
        topic = self.params['image_topic']
        if self.params['image_transport'] == 'compressed':
            self.create_subscription(CompressedImage, f'{topic}/compressed', self._on_frame,
                                     qos_profile_sensor_data)
        else:
            self.create_subscription(Image, topic, self._on_frame, qos_profile_sensor_data)
        if self.params['heading_source'] == 'imu':
            self.create_subscription(Imu, self.params['imu_topic'], self._on_imu,
                                     qos_profile_sensor_data)
        self.create_timer(1.0, self._publish_diagnostics)
        self._worker = threading.Thread(target=self._work, name='cgrs-localization',
                                        daemon=True)
        self._worker.start()

    # ---- parameters -------------------------------------------------------------------
    def _settings(self):
        from cgrs_ros.engine.localization import LocalizerSettings
        return LocalizerSettings(**{name: self.params[name] for name in _SETTINGS}).check()

    def _prior(self):
        lat, lon = self.params['prior.latitude'], self.params['prior.longitude']
        if math.isnan(lat) or math.isnan(lon):
            return None
        return lat, lon, self.params['prior.radius_m']

    def _on_parameter(self, name, value):
        self.params[name] = value
        if self._localizer is None:
            return
        if name in _SETTINGS:
            self._localizer.settings = self._settings()
        elif name.startswith('prior.') and self._prior() is not None:
            self._localizer.set_prior(*self._prior())
        elif name.startswith('datum.'):
            self._datum = None

    def _datum_now(self):
        if self._datum is None:
            from cgrs_ros.nodes.datum import gallery_items
            source = self.params['datum_gallery'] or self.params['gallery_dir']
            self._datum = resolve_datum(self.params, lambda: gallery_items(source),
                                        self.get_logger())
        return self._datum

    # ---- inputs ---------------------------------------------------------------------
    def _on_frame(self, msg):
        with self._lock:
            self._counts['frames_received'] += 1
            if self._frame is not None:
                self._counts['frames_dropped'] += 1
            self._frame = msg
            self._lock.notify_all()

    def _on_imu(self, msg):
        with self._imu_lock:
            self._imu.append(msg)

    def _heading_for(self, frame):
        """Return (heading deg or None, reason when a needed heading is missing)."""
        if self.params['heading_source'] != 'imu':
            return None, ''
        with self._imu_lock:
            history = list(self._imu)
        if not history:
            return None, f'no IMU message on {self.params["imu_topic"]} yet (heading_source imu)'
        # The IMU message nearest the frame's stamp, not the newest: a frame waits up to one
        # period for its turn, and the drone may be turning meanwhile.
        taken = _stamp_s(frame.header.stamp)
        imu = min(history, key=lambda m: abs(_stamp_s(m.header.stamp) - taken))
        age = abs(taken - _stamp_s(imu.header.stamp))
        if age > self.params['imu_max_age']:
            return None, (f'the nearest IMU heading is {age:.2f} s from the frame, more than '
                          f'imu_max_age {self.params["imu_max_age"]} s')
        heading = imu_heading_deg(imu)
        if heading is None:
            return None, 'the IMU message holds no orientation'
        return heading, ''

    # ---- the worker -----------------------------------------------------------------
    def _load(self):
        from cgrs_ros.engine.localization import Localizer
        retriever = open_retriever(self.params, self.get_logger(), adjust=_needs_image_encoder)
        self._localizer = Localizer(retriever, self._settings(), prior=self._prior())
        self._datum_now()
        self.get_logger().info(
            f'ready: {retriever.stats().get("gallery_size")} gallery images; '
            + ('no prior: the first frame is searched globally' if self._prior() is None
               else f'prior {self._prior()}'))

    def _work(self):
        try:
            self._load()
            self._engine_state = 'ready'
        except CgrsError as exc:
            self._engine_state, self._engine_error = 'failed', str(exc)
            self.get_logger().error(f'engine not loaded: {exc}')
            return
        except Exception as exc:  # keep the node alive and say why in diagnostics
            self._engine_state = 'failed'
            self._engine_error = f'{type(exc).__name__}: {exc}'
            self.get_logger().error(f'engine not loaded: {self._engine_error}')
            return
        next_slot = time.monotonic()
        while True:
            with self._lock:
                while self._frame is None and not self._stop:
                    self._lock.wait()
                if self._stop:
                    return
            # Wait for this frame's slot (rate), then take whatever is newest by then.
            delay = next_slot - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            with self._lock:
                if self._stop:
                    return
                frame, self._frame = self._frame, None
            next_slot = max(next_slot + 1.0 / self.params['rate'], time.monotonic())
            self._process(frame)

    def _process(self, frame):
        try:
            image = image_msgs.msg_to_pil(frame, self.params['max_image_pixels'])
        except ValueError as exc:
            self._no_fix(f'frame not decoded: {exc}')
            return
        heading, reason = self._heading_for(frame)
        if reason:
            self._no_fix(reason)
            return
        try:
            outcome = self._localizer.locate(image, heading, _stamp_s(frame.header.stamp))
        except Exception as exc:  # never take the node down for one frame
            self._no_fix(f'matching failed: {type(exc).__name__}: {exc}')
            return
        self._processed_at.append(time.monotonic())
        self._counts['frames_processed'] += 1
        self._last.update(mode=outcome.mode, score=outcome.best_score,
                          latency_ms=outcome.latency_ms)
        if outcome.estimate is None:
            self._no_fix(outcome.reason)
            return
        self._counts['fixes'] += 1
        self._last.update(reason='', sigma_m=outcome.estimate.sigma_m)
        self._publish(frame.header.stamp, outcome.estimate)

    def _no_fix(self, reason):
        self._counts['no_fix'] += 1
        self._last['reason'] = reason
        self.get_logger().warning(f'no fix: {reason}', throttle_duration_sec=5.0)

    def _publish(self, stamp, estimate):
        from cgrs_ros.engine import geo
        cov = estimate.covariance_en
        fix = NavSatFix(latitude=estimate.lat, longitude=estimate.lon, altitude=math.nan,
                        position_covariance_type=NavSatFix.COVARIANCE_TYPE_APPROXIMATED)
        fix.header.stamp = stamp
        fix.header.frame_id = self.params['frame_id']
        fix.status.status = NavSatStatus.STATUS_FIX
        fix.status.service = 0  # not from a satellite system
        fix.position_covariance = [cov[0][0], cov[0][1], 0.0, cov[1][0], cov[1][1], 0.0,
                                   0.0, 0.0, UNKNOWN_VARIANCE]
        self._fix_pub.publish(fix)

        e, n, u = geo.geodetic_to_enu(estimate.lat, estimate.lon, estimate.alt,
                                      self._datum_now())
        pose = PoseWithCovarianceStamped()
        pose.header.stamp = stamp
        pose.header.frame_id = self.params['map_frame']
        position = pose.pose.pose.position
        position.x, position.y, position.z = float(e), float(n), float(u)
        covariance = [0.0] * 36
        covariance[0], covariance[1] = cov[0][0], cov[0][1]
        covariance[6], covariance[7] = cov[1][0], cov[1][1]
        covariance[14] = covariance[21] = covariance[28] = UNKNOWN_VARIANCE
        if estimate.heading_deg is None:
            pose.pose.pose.orientation = Quaternion(w=1.0)
            covariance[35] = UNKNOWN_VARIANCE
        else:
            x, y, z, w = geo.yaw_to_quaternion(geo.heading_to_enu_yaw(estimate.heading_deg))
            pose.pose.pose.orientation = Quaternion(x=x, y=y, z=z, w=w)
            covariance[35] = math.radians(MATCH_YAW_STDDEV_DEG) ** 2
        pose.pose.covariance = covariance
        self._pose_pub.publish(pose)

    # ---- diagnostics ----------------------------------------------------------------
    def _publish_diagnostics(self):
        status = DiagnosticStatus(name=f'{self.get_fully_qualified_name()}: localization',
                                  hardware_id=self.params['gallery_dir'])
        counts = self._counts
        times = list(self._processed_at)
        fps = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and \
            times[-1] > times[0] else 0.0
        values = {'engine': self._engine_state,
                  'frames_received': counts['frames_received'],
                  'frames_processed': counts['frames_processed'],
                  'frames_dropped': counts['frames_dropped'], 'fixes': counts['fixes'],
                  'no_fix': counts['no_fix'], 'last_mode': self._last['mode'],
                  'last_reason': self._last['reason'],
                  'last_score': f'{self._last["score"]:.3f}',
                  'last_sigma_m': f'{self._last["sigma_m"]:.1f}',
                  'last_latency_ms': f'{self._last["latency_ms"]:.1f}',
                  'frames_per_s': f'{fps:.2f}'}
        if self._localizer is not None and self._localizer.anchor is not None:
            values['anchor'] = '{:.7f}, {:.7f}, {:g} m'.format(*self._localizer.anchor)
        if self._engine_state == 'failed':
            status.level, status.message = DiagnosticStatus.ERROR, self._engine_error
        elif self._engine_state != 'ready':
            status.level, status.message = DiagnosticStatus.WARN, 'loading models and index'
        elif not counts['frames_received']:
            status.level, status.message = DiagnosticStatus.WARN, 'waiting for camera frames'
        elif self._last['reason']:
            status.level = DiagnosticStatus.WARN
            status.message = f'no fix: {self._last["reason"]}'
        else:
            status.level, status.message = DiagnosticStatus.OK, 'localized'
        status.values = [KeyValue(key=k, value=str(v)) for k, v in values.items()]
        array = DiagnosticArray(status=[status])
        array.header.stamp = self.get_clock().now().to_msg()
        self._diag_pub.publish(array)

    def destroy_node(self):
        """Stop the worker, then destroy the node."""
        with self._lock:
            self._stop = True
            self._lock.notify_all()
        self._worker.join(timeout=5.0)
        return super().destroy_node()


def main(args=None):
    """Run localization_node until Ctrl-C or shutdown."""
    return spin_node(LocalizationNode, 'localization_node', threads=2, args=args)


if __name__ == '__main__':
    raise SystemExit(main())
