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
"""

import json
import math

from cgrs_ros.engine import geo
from cgrs_ros.engine.flight import Flight, FlightLimits
from cgrs_ros.nodes.datum import DATUM_PARAMETERS, gallery_items, resolve_datum
from cgrs_ros.nodes.parameters import declare_parameters, Param
from cgrs_ros.nodes.spin import spin_node
from geometry_msgs.msg import PoseStamped, Quaternion
from nav_msgs.msg import Odometry
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import NavSatFix, NavSatStatus
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
        self.create_timer(1.0 / p['rate'], self._tick)
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
        self.flight.step(dt)

    def _tick(self):
        now = self.get_clock().now()
        self._advance(now)
        self._publish_state(now)

    def _publish_state(self, now):
        stamp = now.to_msg()
        self._odom_pub.publish(self._odometry(stamp))
        self._fix_pub.publish(self._fix(stamp))
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


def main(args=None):
    """Run sim_drone until Ctrl-C or shutdown."""
    return spin_node(SimDrone, 'sim_drone', args=args)


if __name__ == '__main__':
    raise SystemExit(main())
