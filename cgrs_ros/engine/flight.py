"""A kinematic multirotor: flies a point in the ``map`` frame (ENU metres) to a goal.

No dynamics, no rclpy: position, velocity, yaw and yaw rate, integrated with limits on speed,
acceleration and yaw rate. The simulated drone node (``cgrs_ros.nodes.sim_drone``) steps it
from a timer; tests step it directly.

The speed along the way follows a braking profile: at distance ``d`` from the goal the
commanded speed is the largest ``v`` with ``v*h + v**2 / (2*a) <= d`` (``h`` the internal
step, ``a`` the acceleration limit). That is the discrete-time form of the usual
``sqrt(2*a*d)`` profile (written here by hand; no library offers it). With it, and the
velocity update applied before the position update, the drone

- never needs to brake harder than ``a`` to follow the profile, and
- never moves further than ``d`` in one step,

so from rest (or any state on or below the profile) it stops at the goal without
overshooting. Integration runs at a fixed internal step (``step_s``) whatever ``dt`` the
caller passes, because the guarantee needs the same step in the profile and the update;
the leftover of a ``dt`` that is not a multiple of it is carried to the next call.
A goal changed mid-flight keeps the current velocity, so the drone turns within its
acceleration limit (and may have to pass the new goal and come back, as a real one would).
"""

from dataclasses import dataclass
import math
from typing import Optional

from cgrs_ros.engine.errors import ConfigError
from cgrs_ros.engine.geo import wrap_angle
import numpy as np

# Yaw within this of the goal's yaw counts as facing it (part of "arrived").
YAW_TOLERANCE_RAD = math.radians(3.0)
# Below this horizontal speed the direction of travel is too noisy to steer the nose by.
_HEADING_FROM_TRAVEL_MIN_SPEED = 0.5


@dataclass(frozen=True)
class FlightLimits:
    """Limits and tolerances of the simulated drone (SI units, radians)."""

    max_speed: float = 10.0               # m/s, norm of the 3-D velocity
    max_acceleration: float = 3.0         # m/s^2, norm of the change of velocity
    max_yaw_rate: float = math.radians(90.0)  # rad/s
    cruise_altitude: float = 30.0         # m above the map origin; lower goals are raised
    arrival_tolerance: float = 1.0        # m from the goal (3-D) that counts as there
    settle_speed: float = 0.5             # m/s; arrived only once slower than this
    step_s: float = 0.01                  # s, internal integration step

    def __post_init__(self):
        positive = ('max_speed', 'max_acceleration', 'max_yaw_rate', 'arrival_tolerance',
                    'settle_speed', 'step_s')
        for name in positive + ('cruise_altitude',):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value):
                raise ConfigError(f'flight limit {name}={value!r} is not a finite number; '
                                  'give it in SI units (m, s, rad)')
            if name in positive and value <= 0:
                raise ConfigError(f'flight limit {name}={value!r} must be above zero')


@dataclass(frozen=True)
class FlightGoal:
    """Where the drone was told to go, and the hover point it flies to."""

    x: float
    y: float
    z: float
    yaw: Optional[float]                  # rad ENU; None = keep the heading of travel
    target: tuple                         # (x, y, max(z, cruise_altitude))


def braking_speed(distance, max_acceleration, step_s):
    """Return the fastest speed from which the drone still stops within ``distance``.

    Largest ``v`` with ``v*h + v**2/(2*a) <= d``; written as ``2d / (h + sqrt(h^2 + 2d/a))``
    so it stays exact for tiny distances (where it tends to ``d/h``).
    """
    if distance <= 0.0:
        return 0.0
    h, a = step_s, max_acceleration
    return 2.0 * distance / (h + math.sqrt(h * h + 2.0 * distance / a))


def _clip_norm(vector, limit):
    norm = float(np.linalg.norm(vector))
    return vector if norm <= limit else vector * (limit / norm)


class Flight:
    """State and integration of the kinematic drone.

    ``position`` and ``velocity`` are numpy arrays (x east, y north, z up, in the map frame);
    ``yaw`` is ENU yaw in radians (0 = east, counter-clockwise), ``yaw_rate`` its rate.
    """

    def __init__(self, limits=None, position=(0.0, 0.0, 0.0), yaw=0.0):
        self.limits = limits or FlightLimits()
        self.position = np.array(position, dtype=float)
        if self.position.shape != (3,) or not np.all(np.isfinite(self.position)):
            raise ConfigError(f'start position {position!r} must be three finite numbers '
                              '(x, y, z in metres)')
        self.velocity = np.zeros(3)
        self.yaw = wrap_angle(float(yaw))
        self.yaw_rate = 0.0
        self.goal = None
        self.time = 0.0                   # s integrated so far
        self._carry = 0.0                 # s of the last dt not integrated yet

    # ---- goals ------------------------------------------------------------------------
    def set_goal(self, x, y, z, yaw=None):
        """Fly to (x, y, z) in the map frame, at least at cruise altitude; return the goal.

        ``yaw`` (rad ENU) is the heading to hold on arrival; None keeps the last heading.
        Raises ValueError for a non-finite coordinate.
        """
        values = (x, y, z) + (() if yaw is None else (yaw,))
        if not all(math.isfinite(float(v)) for v in values):
            raise ValueError(f'goal ({x}, {y}, {z}, yaw {yaw}) has a coordinate that is not a '
                             'finite number')
        target = (float(x), float(y), max(float(z), self.limits.cruise_altitude))
        self.goal = FlightGoal(float(x), float(y), float(z),
                               None if yaw is None else wrap_angle(float(yaw)), target)
        return self.goal

    def clear_goal(self):
        """Forget the goal: the drone brakes to a hover where it is."""
        self.goal = None

    # ---- derived state ----------------------------------------------------------------
    @property
    def speed(self):
        """Return the norm of the velocity (m/s)."""
        return float(np.linalg.norm(self.velocity))

    def distance_to_goal(self):
        """Return the 3-D distance (m) to the goal's hover point, or None without a goal."""
        if self.goal is None:
            return None
        return float(np.linalg.norm(np.asarray(self.goal.target) - self.position))

    @property
    def arrived(self):
        """Whether the drone is at the goal: within tolerance, settled, facing its yaw."""
        distance = self.distance_to_goal()
        if distance is None or distance > self.limits.arrival_tolerance:
            return False
        if self.speed > self.limits.settle_speed:
            return False
        return self.goal.yaw is None or \
            abs(wrap_angle(self.goal.yaw - self.yaw)) <= YAW_TOLERANCE_RAD

    # ---- integration ------------------------------------------------------------------
    def step(self, dt):
        """Advance the simulation by ``dt`` seconds (in whole internal steps; see module)."""
        if not math.isfinite(dt) or dt < 0.0:
            raise ValueError(f'time step {dt!r} must be a finite number of seconds >= 0')
        h = self.limits.step_s
        self._carry += dt
        # The small epsilon keeps 0.05 s from becoming 4 steps of 0.01 s plus a remainder.
        steps = int(math.floor(self._carry / h + 1e-9))
        self._carry = max(0.0, self._carry - steps * h)
        for _ in range(steps):
            self._substep(h)
        return steps

    def _substep(self, h):
        limits = self.limits
        if self.goal is None:
            wanted = np.zeros(3)
        else:
            offset = np.asarray(self.goal.target) - self.position
            distance = float(np.linalg.norm(offset))
            if distance < 1e-12:
                wanted = np.zeros(3)
            else:
                speed = min(limits.max_speed,
                            braking_speed(distance, limits.max_acceleration, h))
                wanted = offset * (speed / distance)
        # Velocity first, then position (semi-implicit Euler): the braking profile assumes it.
        self.velocity = self.velocity + _clip_norm(wanted - self.velocity,
                                                   limits.max_acceleration * h)
        self.velocity = _clip_norm(self.velocity, limits.max_speed)
        self.position = self.position + self.velocity * h
        self._turn(h)
        self.time += h

    def _wanted_yaw(self):
        horizontal = math.hypot(self.velocity[0], self.velocity[1])
        near = self.goal is not None and \
            self.distance_to_goal() <= self.limits.arrival_tolerance
        if near and self.goal.yaw is not None:
            return self.goal.yaw
        if horizontal >= _HEADING_FROM_TRAVEL_MIN_SPEED and not near:
            return math.atan2(self.velocity[1], self.velocity[0])  # nose where it flies
        return self.yaw

    def _turn(self, h):
        error = wrap_angle(self._wanted_yaw() - self.yaw)
        turn = max(-self.limits.max_yaw_rate * h, min(self.limits.max_yaw_rate * h, error))
        self.yaw = wrap_angle(self.yaw + turn)
        self.yaw_rate = turn / h
