"""The kinematic drone model (cgrs_ros.engine.flight): plain pytest, no ROS."""

import math

from cgrs_ros.engine.errors import ConfigError
from cgrs_ros.engine.flight import braking_speed, Flight, FlightLimits, YAW_TOLERANCE_RAD
from cgrs_ros.engine.geo import wrap_angle
import numpy as np
import pytest

LIMITS = FlightLimits(max_speed=12.0, max_acceleration=4.0, max_yaw_rate=math.radians(60.0),
                      cruise_altitude=20.0, arrival_tolerance=0.5, settle_speed=0.3)


def fly(flight, dt=0.05, max_time=300.0, until_arrived=True, on_tick=None):
    """Step ``flight`` with the node's timer period; return the samples (t, pos, vel, yaw)."""
    samples = [(flight.time, flight.position.copy(), flight.velocity.copy(), flight.yaw)]
    while flight.time < max_time:
        flight.step(dt)
        samples.append((flight.time, flight.position.copy(), flight.velocity.copy(),
                        flight.yaw))
        if on_tick is not None:
            on_tick(flight)
        if until_arrived and flight.arrived:
            break
    return samples


def fly_substeps(flight, seconds):
    """Step one internal step at a time so every velocity change is seen."""
    h = flight.limits.step_s
    samples = [(flight.position.copy(), flight.velocity.copy(), flight.yaw)]
    for _ in range(int(round(seconds / h))):
        flight.step(h)
        samples.append((flight.position.copy(), flight.velocity.copy(), flight.yaw))
    return samples


def assert_within_limits(samples, limits):
    h = limits.step_s
    for (p0, v0, y0), (p1, v1, y1) in zip(samples, samples[1:]):
        assert np.linalg.norm(v1) <= limits.max_speed + 1e-9
        assert np.linalg.norm(v1 - v0) <= limits.max_acceleration * h + 1e-9
        assert abs(wrap_angle(y1 - y0)) <= limits.max_yaw_rate * h + 1e-9
        assert np.allclose(p1, p0 + v1 * h)  # positions follow the velocities


def trapezoid_time(distance, v_max, a_max):
    """Shortest time to cover ``distance`` from rest to rest (continuous time)."""
    if distance * a_max <= v_max * v_max:
        return 2.0 * math.sqrt(distance / a_max)
    return distance / v_max + v_max / a_max


@pytest.mark.parametrize('goal', [
    (400.0, 0.0, 20.0),        # long enough to cruise at max speed
    (-30.0, 45.0, 20.0),       # never reaches max speed
    (0.3, -0.2, 20.0),         # a hair away
    (120.0, -80.0, 65.0),      # climbing above cruise altitude
])
def test_reaches_the_goal_from_rest_without_overshoot(goal):
    flight = Flight(LIMITS, position=(0.0, 0.0, 20.0))
    start = flight.position.copy()
    flight.set_goal(*goal)
    target = np.array(goal)
    total = float(np.linalg.norm(target - start))
    direction = (target - start) / total
    samples = fly(flight)
    assert flight.arrived
    assert np.linalg.norm(flight.position - target) <= LIMITS.arrival_tolerance
    distances = []
    for _, position, _, _ in samples:
        along = float(np.dot(position - start, direction))
        assert along <= total + 1e-9, 'passed the goal'
        across = position - start - along * direction
        assert np.linalg.norm(across) < 1e-9, 'left the straight line'
        distances.append(np.linalg.norm(target - position))
    assert all(b <= a + 1e-12 for a, b in zip(distances, distances[1:])), 'moved away'
    # Not dawdling: within a second of the shortest rest-to-rest time (plus settling).
    assert flight.time <= trapezoid_time(total, LIMITS.max_speed, LIMITS.max_acceleration) + 1.0


def test_speed_acceleration_and_yaw_rate_limits_hold_every_step():
    flight = Flight(LIMITS, position=(0.0, 0.0, 20.0), yaw=math.pi)  # facing away
    flight.set_goal(300.0, 200.0, 35.0, yaw=-math.pi / 2)
    samples = fly_substeps(flight, 60.0)
    assert_within_limits(samples, LIMITS)
    speeds = [np.linalg.norm(v) for _, v, _ in samples]
    assert max(speeds) == pytest.approx(LIMITS.max_speed)  # it does use the full speed
    assert flight.arrived


def test_nose_follows_the_travel_then_turns_to_the_goal_heading():
    flight = Flight(LIMITS, position=(0.0, 0.0, 20.0), yaw=0.0)
    flight.set_goal(0.0, 200.0, 20.0, yaw=math.pi)  # fly north, then face west
    fly_substeps(flight, 10.0)
    assert flight.yaw == pytest.approx(math.pi / 2, abs=1e-6)  # pointing north while flying
    fly(flight)
    assert flight.arrived
    assert abs(wrap_angle(flight.yaw - math.pi)) <= YAW_TOLERANCE_RAD


def test_arrival_waits_for_the_heading():
    slow_turn = FlightLimits(max_yaw_rate=math.radians(5.0), arrival_tolerance=0.5,
                             cruise_altitude=0.0)
    flight = Flight(slow_turn, yaw=0.0)
    flight.set_goal(0.2, 0.0, 0.0, yaw=math.pi / 2)  # close by, but a quarter turn away
    flight.step(5.0)
    assert flight.distance_to_goal() < 0.01 and flight.speed < 0.01
    assert not flight.arrived  # 25 degrees turned, 90 needed
    flight.step(14.0)
    assert flight.arrived


def test_retargeting_mid_flight_turns_within_limits_and_reaches_the_new_goal():
    flight = Flight(LIMITS, position=(0.0, 0.0, 20.0))
    flight.set_goal(500.0, 0.0, 20.0)
    samples = fly_substeps(flight, 10.0)
    assert flight.velocity[0] == pytest.approx(LIMITS.max_speed)  # full speed east
    x_turn = flight.position[0]
    flight.set_goal(-100.0, 50.0, 20.0)  # now somewhere behind it
    samples += fly_substeps(flight, 90.0)[1:]
    assert_within_limits(samples, LIMITS)
    assert flight.arrived
    assert np.linalg.norm(flight.position - (-100.0, 50.0, 20.0)) <= LIMITS.arrival_tolerance
    # It could not turn on the spot: it carried on east for its braking distance v^2 / 2a.
    braking = LIMITS.max_speed ** 2 / (2 * LIMITS.max_acceleration)
    assert max(p[0] for p, _, _ in samples) - x_turn == pytest.approx(braking, rel=0.02)


def test_retargeting_to_the_goal_ahead_keeps_flying():
    flight = Flight(LIMITS, position=(0.0, 0.0, 20.0))
    flight.set_goal(200.0, 0.0, 20.0)
    fly(flight, max_time=5.0, until_arrived=False)
    speed_before = flight.speed
    flight.set_goal(300.0, 0.0, 20.0)
    flight.step(0.05)
    assert flight.speed >= speed_before  # no stop at the old goal
    fly(flight)
    assert flight.arrived and flight.position[0] <= 300.0 + 1e-9


def test_low_goals_are_flown_to_at_cruise_altitude():
    flight = Flight(LIMITS, position=(0.0, 0.0, 0.0))  # on the ground
    goal = flight.set_goal(50.0, 20.0, 0.5)
    assert goal.target == (50.0, 20.0, LIMITS.cruise_altitude)
    assert (goal.x, goal.y, goal.z) == (50.0, 20.0, 0.5)  # what was asked is kept
    fly(flight)
    assert flight.position[2] == pytest.approx(LIMITS.cruise_altitude, abs=0.5)
    high = flight.set_goal(50.0, 20.0, 80.0)
    assert high.target[2] == 80.0


def test_uneven_timer_periods_integrate_the_same_time():
    flight = Flight(LIMITS, position=(0.0, 0.0, 20.0))
    flight.set_goal(100.0, 0.0, 20.0)
    rng = np.random.default_rng(3)
    periods = rng.uniform(0.0, 0.12, 400)
    steps = sum(flight.step(float(dt)) for dt in periods)
    assert steps * LIMITS.step_s == pytest.approx(flight.time)
    assert abs(flight.time - periods.sum()) < LIMITS.step_s
    assert flight.arrived and flight.position[0] <= 100.0 + 1e-9


def test_clearing_the_goal_brakes_to_a_hover():
    flight = Flight(LIMITS, position=(0.0, 0.0, 20.0))
    flight.set_goal(500.0, 0.0, 20.0)
    fly(flight, max_time=8.0, until_arrived=False)
    flight.clear_goal()
    samples = fly_substeps(flight, 5.0)
    assert_within_limits(samples, LIMITS)
    assert flight.speed == pytest.approx(0.0, abs=1e-9)
    assert flight.distance_to_goal() is None and not flight.arrived


def test_braking_speed_stops_within_the_distance():
    h, a = 0.01, 3.0
    for distance in (1e-6, 0.01, 1.0, 50.0, 2000.0):
        v = braking_speed(distance, a, h)
        travelled, speed = 0.0, v
        while speed > 0.0:  # brake as hard as allowed, step by step
            travelled += speed * h
            speed = max(0.0, speed - a * h)
        assert travelled <= distance * (1 + 1e-9)
    assert braking_speed(0.0, a, h) == 0.0


@pytest.mark.parametrize('kwargs, message', [
    ({'max_speed': 0.0}, 'max_speed'),
    ({'max_acceleration': -1.0}, 'max_acceleration'),
    ({'arrival_tolerance': float('nan')}, 'arrival_tolerance'),
    ({'cruise_altitude': float('inf')}, 'cruise_altitude'),
])
def test_bad_limits_are_named(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        FlightLimits(**kwargs)


def test_bad_goals_and_steps_are_refused():
    flight = Flight(LIMITS)
    with pytest.raises(ValueError, match='finite'):
        flight.set_goal(1.0, float('nan'), 0.0)
    with pytest.raises(ValueError, match='time step'):
        flight.step(-0.1)
    with pytest.raises(ConfigError, match='start position'):
        Flight(LIMITS, position=(0.0, 1.0))
