"""sim_drone: a simulated drone that flies to ``/goal_pose`` (the loop closed without hardware).

A kinematic multirotor (:mod:`cgrs_ros.engine.flight`: speed, acceleration and yaw-rate
limits, a braking profile that stops at the goal) stepped by a timer on the node clock, so
``use_sim_time`` works as for any ROS node.

Topics (relative names live in the node's namespace, ``cgrs`` in the launch file):

- sub ``/goal_pose`` (geometry_msgs/PoseStamped) in ``map_frame``; other frames are refused
  with a log line (there is no TF here to transform them). A goal lower than
  ``cruise_altitude`` is flown to at that height, straight above the place.
- pub ``odom`` (nav_msgs/Odometry): pose in ``map_frame``, twist in ``base_frame`` (REP-105).
- pub ``fix`` (sensor_msgs/NavSatFix): the same position in WGS84 via the datum.
- pub ``status`` (std_msgs/String, JSON, latched): ``state`` idle | flying | arrived,
  ``goal_seq``, ``goal``, ``target``, ``distance_m``, position and fix. Published when a goal
  is accepted, on arrival, and every ``status_period`` seconds.
- pub ``imu`` (sensor_msgs/Imu): orientation (ENU yaw, what an autopilot's attitude estimate
  gives without GNSS; ``imu.yaw_stddev_deg`` adds compass noise) and yaw rate; acceleration
  not provided (covariance[0] = -1, as the message defines).
- pub ``camera/image`` (sensor_msgs/Image rgb8) + ``camera/camera_info`` at ``camera_rate`` Hz
  (0 = off, the default): a downward camera drawn from the demo world (``world``, the
  ``world.json`` of a ``cgrs gallery demo`` gallery) at the drone's TRUE pose: position,
  height above the ground and heading (the image's up is the drone's forward direction, as
  for a body-fixed camera). ``camera/image/compressed`` (JPEG) too when
  ``camera.jpeg_quality`` > 0, ``camera_oblique/image`` + ``camera_info`` when
  ``camera.oblique_tilt`` > 0 (the demo's oblique look, one height ahead).
  Frames are drawn off the simulation thread; a frame that is due while the last one is still
  being drawn is skipped.
"""

import json
import math
from pathlib import Path
import threading

from cgrs_ros.engine import geo
from cgrs_ros.engine.errors import ConfigError
from cgrs_ros.engine.flight import Flight, FlightLimits
from cgrs_ros.nodes import image_msgs
from cgrs_ros.nodes.datum import DATUM_PARAMETERS, gallery_items, resolve_datum
from cgrs_ros.nodes.parameters import declare_parameters, Param
from cgrs_ros.nodes.spin import spin_node
from geometry_msgs.msg import PoseStamped, Quaternion
from nav_msgs.msg import Odometry
import numpy as np
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, Imu, NavSatFix, NavSatStatus
from std_msgs.msg import String


def _not_blank(name):
    return lambda v: None if v.strip() else f'{name} must not be empty'


PARAMETERS = (
    Param('gallery_dir', '', 'Gallery folder; only read to derive a datum left at NaN.',
          read_only=True),
    *DATUM_PARAMETERS,  # shared with retrieval_node: both must put map at one place
    Param('map_frame', 'map', 'Frame of goals and odometry (ENU around the datum).',
          check=_not_blank('map_frame')),
    Param('base_frame', 'base_link', 'Child frame of the odometry; frame of the fix.',
          check=_not_blank('base_frame')),
    Param('rate', 20.0, 'Simulation and publishing rate, Hz (node clock).',
          minimum=1.0, maximum=1000.0, read_only=True),
    Param('max_speed', 10.0, 'Top speed, m/s.', minimum=0.1, maximum=200.0),
    Param('max_acceleration', 3.0, 'Largest change of velocity, m/s^2.',
          minimum=0.1, maximum=100.0),
    Param('max_yaw_rate', math.radians(90.0), 'Fastest turn, rad/s.',
          minimum=0.01, maximum=20.0),
    Param('cruise_altitude', 30.0,
          'Height above the map origin (m) the drone flies at; lower goals are raised to it.',
          minimum=-1000.0, maximum=10000.0),
    Param('arrival_tolerance', 1.0, 'Distance to the goal (m) that counts as arrived.',
          minimum=0.01, maximum=1000.0),
    Param('settle_speed', 0.5, 'Arrived only once slower than this, m/s.',
          minimum=0.001, maximum=100.0),
    Param('initial.x', 0.0, 'Start position east of the datum, m.', read_only=True),
    Param('initial.y', 0.0, 'Start position north of the datum, m.', read_only=True),
    Param('initial.z', 0.0, 'Start height above the datum, m (0 = on the ground).',
          read_only=True),
    Param('initial.yaw', 0.0, 'Start yaw, rad ENU (0 = facing east).', read_only=True),
    Param('status_period', 1.0, 'Seconds between status messages besides state changes.',
          minimum=0.05, maximum=3600.0),
    Param('imu.yaw_stddev_deg', 0.0, 'Standard deviation of the compass noise added to the '
          'imu orientation, degrees (0 = the true yaw).', minimum=0.0, maximum=180.0),
    Param('world', '', 'Demo world the camera draws: a `cgrs gallery demo` folder or its '
          'world.json; empty = gallery_dir.', read_only=True),
    Param('camera_rate', 0.0, 'Camera frames per second (node clock); 0 = no camera.',
          minimum=0.0, maximum=30.0, read_only=True),
    Param('camera.size', 256, 'Width and height of the square camera image, pixels.',
          minimum=16, maximum=2048, read_only=True),
    Param('camera.fov_deg', 90.0, 'Field of view across the image, degrees.',
          minimum=5.0, maximum=150.0, read_only=True),
    Param('camera.frame', 'camera_optical_frame', 'frame_id of the images and camera_info.',
          check=_not_blank('camera.frame')),
    Param('camera.jpeg_quality', 0, 'Also publish camera/image/compressed as JPEG of this '
          'quality; 0 = raw only.', minimum=0, maximum=100, read_only=True),
    Param('camera.oblique_tilt', 0.0, 'Also publish an oblique camera (camera_oblique/...) '
          'with this tilt (0.1-0.45, the demo drone views); 0 = none.', minimum=0.0,
          maximum=0.45, read_only=True),
)

_LIMIT_NAMES = ('max_speed', 'max_acceleration', 'max_yaw_rate', 'cruise_altitude',
                'arrival_tolerance', 'settle_speed')
# A paused or starved process must not make the simulation jump (or spin for long catching up).
_MAX_DT_S = 1.0


def _yaw_of(q):
    """Return ENU yaw of a quaternion, or None for the all-zero 'no orientation' quaternion."""
    norm = math.sqrt(q.x * q.x + q.y * q.y + q.z * q.z + q.w * q.w)
    if not math.isfinite(norm) or norm < 1e-6:
        return None
    x, y, z, w = q.x / norm, q.y / norm, q.z / norm, q.w / norm
    return math.atan2(2.0 * (w * z + x * y), 1.0 - 2.0 * (y * y + z * z))


def _xyz(values):
    return {'x': float(values[0]), 'y': float(values[1]), 'z': float(values[2])}


class SimDrone(Node):
    """Flies the kinematic model to each accepted goal and reports where it is."""

    def __init__(self, **kwargs):
        super().__init__('sim_drone', **kwargs)
        self.params = declare_parameters(self, PARAMETERS, on_change=self._on_parameter)
        self.datum = resolve_datum(self.params, lambda: gallery_items(self.params['gallery_dir']),
                                   self.get_logger())
        p = self.params
        self.flight = Flight(self._limits(), position=(p['initial.x'], p['initial.y'],
                                                       p['initial.z']), yaw=p['initial.yaw'])
        self._goal_seq = 0
        self._state = 'idle'
        self._last_tick = None
        self._last_status = None

        latched = QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL,
                             reliability=ReliabilityPolicy.RELIABLE)
        self._odom_pub = self.create_publisher(Odometry, 'odom', 10)
        self._fix_pub = self.create_publisher(NavSatFix, 'fix', 10)
        self._status_pub = self.create_publisher(String, 'status', latched)
        self.create_subscription(PoseStamped, '/goal_pose', self._on_goal, 10)
        # create_timer uses the node clock: with use_sim_time it follows /clock.
        self._imu_pub = self.create_publisher(Imu, 'imu', 10)
        self._imu_rng = np.random.default_rng()
        # The flight model is stepped by the tick and read by the camera thread.
        self._state_lock = threading.Lock()
        self.create_timer(1.0 / p['rate'], self._tick)
        self._camera = None
        if p['camera_rate'] > 0:
            self._camera = _Camera(self)
            self.create_timer(1.0 / p['camera_rate'], self._camera.capture,
                              callback_group=MutuallyExclusiveCallbackGroup())
        self.get_logger().info(
            f'sim_drone ready at ({p["initial.x"]:.1f}, {p["initial.y"]:.1f}, '
            f'{p["initial.z"]:.1f}) m in {p["map_frame"]}; datum lat {self.datum.lat:.7f}, '
            f'lon {self.datum.lon:.7f}, alt {self.datum.alt:.2f} m; max speed '
            f'{p["max_speed"]} m/s')

    # ---- parameters -------------------------------------------------------------------
    def _limits(self):
        return FlightLimits(**{name: self.params[name] for name in _LIMIT_NAMES})

    def _on_parameter(self, name, value):
        self.params[name] = float(value) if isinstance(self.params.get(name), float) else value
        if name in _LIMIT_NAMES:
            self.flight.limits = self._limits()
        elif name.startswith('datum.'):
            self.datum = resolve_datum(
                self.params, lambda: gallery_items(self.params['gallery_dir']),
                self.get_logger())

    # ---- goals ------------------------------------------------------------------------
    def _on_goal(self, msg):
        frame = msg.header.frame_id.lstrip('/')
        wanted = self.params['map_frame']
        if frame != wanted:
            self.get_logger().warning(
                f'goal refused: its frame is {frame!r}, not {wanted!r}; sim_drone has no TF to '
                f'transform it, so publish /goal_pose in {wanted!r}')
            return
        position = msg.pose.position
        # Bring the simulation up to now under the old goal, so the new one counts from the
        # moment it arrived rather than from the last timer tick.
        self._advance(self.get_clock().now())
        try:
            with self._state_lock:
                goal = self.flight.set_goal(position.x, position.y, position.z,
                                            _yaw_of(msg.pose.orientation))
        except ValueError as exc:
            self.get_logger().warning(f'goal refused: {exc}; send finite coordinates in metres')
            return
        self._goal_seq += 1
        self._state = 'flying'
        self.get_logger().info(
            f'goal {self._goal_seq}: flying to ({goal.target[0]:.1f}, {goal.target[1]:.1f}, '
            f'{goal.target[2]:.1f}) m, {self.flight.distance_to_goal():.1f} m away')
        self._publish_status(self.get_clock().now())

    # ---- simulation -------------------------------------------------------------------
    def _advance(self, now):
        """Integrate the flight from the last step to ``now`` (node clock)."""
        if self._last_tick is None or now < self._last_tick:  # first call, or time reset
            self._last_tick = now
            return
        dt = (now - self._last_tick).nanoseconds * 1e-9
        self._last_tick = now
        if dt > _MAX_DT_S:
            self.get_logger().warning(f'{dt:.2f} s since the last step; simulating '
                                      f'{_MAX_DT_S} s of it', throttle_duration_sec=10.0)
            dt = _MAX_DT_S
        with self._state_lock:
            self.flight.step(dt)

    def pose_now(self):
        """Return (stamp, map position (x, y, z), ENU yaw) of the drone now, consistently."""
        with self._state_lock:
            return (self.get_clock().now(), tuple(map(float, self.flight.position)),
                    float(self.flight.yaw))

    def _tick(self):
        now = self.get_clock().now()
        self._advance(now)
        self._publish_state(now)

    def _publish_state(self, now):
        stamp = now.to_msg()
        self._odom_pub.publish(self._odometry(stamp))
        self._fix_pub.publish(self._fix(stamp))
        self._imu_pub.publish(self._imu(stamp))
        changed = False
        if self._state == 'flying' and self.flight.arrived:
            self._state, changed = 'arrived', True
            self.get_logger().info(
                f'goal {self._goal_seq}: arrived, {self.flight.distance_to_goal():.2f} m from '
                'the goal')
        due = self._last_status is None or \
            (now - self._last_status).nanoseconds * 1e-9 >= self.params['status_period']
        if changed or due:
            self._publish_status(now)

    def _odometry(self, stamp):
        flight = self.flight
        odom = Odometry()
        odom.header.stamp = stamp
        odom.header.frame_id = self.params['map_frame']
        odom.child_frame_id = self.params['base_frame']
        pose = odom.pose.pose
        pose.position.x, pose.position.y, pose.position.z = map(float, flight.position)
        x, y, z, w = geo.yaw_to_quaternion(flight.yaw)
        pose.orientation = Quaternion(x=x, y=y, z=z, w=w)
        # nav_msgs/Odometry gives the twist in the child frame: rotate map velocity by -yaw.
        vx, vy, vz = map(float, flight.velocity)
        cos, sin = math.cos(flight.yaw), math.sin(flight.yaw)
        odom.twist.twist.linear.x = cos * vx + sin * vy
        odom.twist.twist.linear.y = -sin * vx + cos * vy
        odom.twist.twist.linear.z = vz
        odom.twist.twist.angular.z = float(flight.yaw_rate)
        return odom

    def _imu(self, stamp):
        imu = Imu()
        imu.header.stamp = stamp
        imu.header.frame_id = self.params['base_frame']
        stddev = math.radians(self.params['imu.yaw_stddev_deg'])
        yaw = self.flight.yaw + (self._imu_rng.normal(0.0, stddev) if stddev > 0 else 0.0)
        x, y, z, w = geo.yaw_to_quaternion(yaw)
        imu.orientation = Quaternion(x=x, y=y, z=z, w=w)
        # Level flight: roll and pitch are known to be 0 (a small variance), yaw to stddev.
        imu.orientation_covariance[0] = imu.orientation_covariance[4] = 1e-4
        imu.orientation_covariance[8] = max(stddev, math.radians(0.5)) ** 2
        imu.angular_velocity.z = float(self.flight.yaw_rate)
        imu.angular_velocity_covariance[8] = 1e-4
        imu.linear_acceleration_covariance[0] = -1.0  # not provided
        return imu

    def _geodetic(self):
        return geo.enu_to_geodetic(*map(float, self.flight.position), self.datum)

    def _fix(self, stamp):
        lat, lon, alt = self._geodetic()
        fix = NavSatFix(latitude=lat, longitude=lon, altitude=alt,
                        position_covariance_type=NavSatFix.COVARIANCE_TYPE_UNKNOWN)
        fix.header.stamp = stamp
        fix.header.frame_id = self.params['base_frame']
        fix.status.status = NavSatStatus.STATUS_FIX
        fix.status.service = NavSatStatus.SERVICE_GPS
        return fix

    def _publish_status(self, now):
        self._last_status = now
        flight, goal = self.flight, self.flight.goal
        lat, lon, alt = self._geodetic()
        distance = flight.distance_to_goal()
        status = {
            'state': self._state,
            'arrived': self._state == 'arrived',
            'goal_seq': self._goal_seq,
            'goal': None if goal is None else {**_xyz((goal.x, goal.y, goal.z)),
                                               'yaw': goal.yaw},
            'target': None if goal is None else _xyz(goal.target),
            'distance_m': distance,
            'position': _xyz(flight.position),
            'yaw': flight.yaw,
            'speed_mps': flight.speed,
            'latitude': lat, 'longitude': lon, 'altitude': alt,
            'frame_id': self.params['map_frame'],
            'stamp': now.nanoseconds * 1e-9,
        }
        self._status_pub.publish(String(data=json.dumps(status)))


class _Camera:
    """The simulated cameras: frames of the demo world at the drone's true pose."""

    def __init__(self, node):
        from cgrs_ros.engine.demo.scene import load_scene
        p = node.params
        source = p['world'] or p['gallery_dir']
        if not source.strip():
            raise ConfigError('camera_rate > 0 needs a demo world to draw: set world (a `cgrs '
                              'gallery demo` folder or its world.json) or gallery_dir')
        self.node = node
        self.scene = load_scene(Path(source))
        self.rng = np.random.default_rng()
        self.busy = threading.Lock()
        self.skipped = 0
        size, fov = p['camera.size'], p['camera.fov_deg']
        self.streams = [('camera', 0.0)]
        if p['camera.oblique_tilt'] > 0:
            self.streams.append(('camera_oblique', p['camera.oblique_tilt']))
        self.pubs = {name: (node.create_publisher(Image, f'{name}/image', 2),
                            node.create_publisher(CameraInfo, f'{name}/camera_info', 2))
                     for name, _ in self.streams}
        self.compressed = None
        if p['camera.jpeg_quality'] > 0:
            self.compressed = node.create_publisher(CompressedImage, 'camera/image/compressed',
                                                    2)
        self.info = camera_info(size, fov)
        node.get_logger().info(
            f'camera: {size}x{size} px, {fov:g} deg, {p["camera_rate"]:g} Hz, world '
            f'{source} (seed {self.scene.seed}, {self.scene.size} places)'
            + (f', oblique tilt {p["camera.oblique_tilt"]:g}' if len(self.streams) > 1 else ''))

    def capture(self):
        """Draw and publish one frame per camera (skipped while the last is being drawn)."""
        if not self.busy.acquire(blocking=False):
            self.skipped += 1
            return
        try:
            self._capture()
        finally:
            self.busy.release()

    def _capture(self):
        from cgrs_ros.engine.demo.scene import render_camera
        node, p = self.node, self.node.params
        now, (x, y, z), yaw = node.pose_now()
        lat, lon, alt = geo.enu_to_geodetic(x, y, z, node.datum)
        e, n, u = self.scene.enu(lat, lon, alt)
        heading = geo.enu_yaw_to_heading(yaw)
        stamp = now.to_msg()
        for name, tilt in self.streams:
            image = render_camera(self.scene, e, n, u, heading, p['camera.size'],
                                  p['camera.fov_deg'], tilt, self.rng)
            msg = image_msgs.pil_to_image_msg(image, stamp, p['camera.frame'])
            info = self.info
            info.header.stamp, info.header.frame_id = stamp, p['camera.frame']
            image_pub, info_pub = self.pubs[name]
            image_pub.publish(msg)
            info_pub.publish(info)
            if name == 'camera' and self.compressed is not None:
                self.compressed.publish(image_msgs.pil_to_compressed_msg(
                    image, 'jpeg', p['camera.jpeg_quality'], stamp, p['camera.frame']))


def camera_info(size, fov_deg):
    """Return the CameraInfo of a square pinhole camera without distortion."""
    focal = size / 2.0 / math.tan(math.radians(fov_deg) / 2.0)
    centre = size / 2.0
    info = CameraInfo(width=size, height=size, distortion_model='plumb_bob')
    info.d = [0.0] * 5
    info.k = [focal, 0.0, centre, 0.0, focal, centre, 0.0, 0.0, 1.0]
    info.r = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    info.p = [focal, 0.0, centre, 0.0, 0.0, focal, centre, 0.0, 0.0, 0.0, 1.0, 0.0]
    return info


def main(args=None):
    """Run sim_drone until Ctrl-C or shutdown."""
    # Two threads: the camera draws frames while the flight keeps being stepped.
    return spin_node(SimDrone, 'sim_drone', threads=2, args=args)


if __name__ == '__main__':
    raise SystemExit(main())
