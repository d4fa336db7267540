"""Geodesy against an independent implementation (PROJ through pyproj) and known angles."""

from dataclasses import dataclass
import math

from cgrs_ros.engine.errors import ConfigError, GalleryError
from cgrs_ros.engine.geo import (
    Datum, datum_from_items, enu_to_geodetic, enu_yaw_to_heading, geodetic_to_enu,
    heading_to_enu_yaw, wrap_angle, yaw_to_quaternion)
import numpy as np
import pyproj
import pytest

DATUMS = [
    Datum(47.3977, 8.5456, 488.0),      # Zurich
    Datum(-33.8568, 151.2153, 5.0),     # Sydney, southern + eastern hemisphere
    Datum(64.1466, -21.9426, 60.0),     # Reykjavik, high latitude, west
    Datum(0.0, -179.9995, -20.0),       # equator next to the antimeridian, below ellipsoid
]


def _proj_topocentric(datum):
    """PROJ's own geodetic -> ECEF -> topocentric (ENU) pipeline, independent of pymap3d."""
    return pyproj.Transformer.from_pipeline(
        '+proj=pipeline +step +proj=cart +ellps=WGS84 '
        f'+step +proj=topocentric +ellps=WGS84 +lat_0={datum.lat!r} +lon_0={datum.lon!r} '
        f'+h_0={datum.alt!r}')


@pytest.mark.parametrize('datum', DATUMS, ids=lambda d: f'{d.lat},{d.lon}')
def test_geodetic_to_enu_matches_proj_to_the_millimetre(datum):
    rng = np.random.default_rng(7)
    # Points up to ~5 km away and 300 m up/down; wrap longitudes across the antimeridian.
    lat = datum.lat + rng.uniform(-0.045, 0.045, 50)
    lon = (datum.lon + rng.uniform(-0.06, 0.06, 50) + 180.0) % 360.0 - 180.0
    alt = datum.alt + rng.uniform(-300.0, 300.0, 50)
    e, n, u = geodetic_to_enu(lat, lon, alt, datum)
    pe, pn, pu = _proj_topocentric(datum).transform(lon, lat, alt)
    np.testing.assert_allclose(e, pe, atol=1e-3, rtol=0)
    np.testing.assert_allclose(n, pn, atol=1e-3, rtol=0)
    np.testing.assert_allclose(u, pu, atol=1e-3, rtol=0)
    # And a scalar call returns plain floats with the same values.
    se, sn, su = geodetic_to_enu(float(lat[0]), float(lon[0]), float(alt[0]), datum)
    assert type(se) is float and type(sn) is float and type(su) is float
    assert se == pytest.approx(pe[0], abs=1e-3) and sn == pytest.approx(pn[0], abs=1e-3)


@pytest.mark.parametrize('datum', DATUMS, ids=lambda d: f'{d.lat},{d.lon}')
def test_enu_to_geodetic_matches_proj_and_round_trips(datum):
    rng = np.random.default_rng(11)
    e = rng.uniform(-3000.0, 3000.0, 40)
    n = rng.uniform(-3000.0, 3000.0, 40)
    u = rng.uniform(-100.0, 400.0, 40)
    lat, lon, alt = enu_to_geodetic(e, n, u, datum)
    plon, plat, palt = _proj_topocentric(datum).transform(e, n, u, direction='INVERSE')
    # 1e-8 deg is ~1 mm on the ground.
    np.testing.assert_allclose(lat, plat, atol=1e-8, rtol=0)
    dlon = (np.asarray(lon) - plon + 180.0) % 360.0 - 180.0
    np.testing.assert_allclose(dlon, 0.0, atol=1e-8)
    np.testing.assert_allclose(alt, palt, atol=1e-3, rtol=0)
    back = geodetic_to_enu(lat, lon, alt, datum)
    np.testing.assert_allclose(np.stack(back), np.stack([e, n, u]), atol=1e-6, rtol=0)


def test_enu_axes_point_east_north_up():
    datum = DATUMS[0]
    e, n, u = geodetic_to_enu(datum.lat + 0.001, datum.lon, datum.alt, datum)
    assert n == pytest.approx(111.2, abs=0.3) and abs(e) < 1e-6  # ~111 m per milli-degree
    e, n, u = geodetic_to_enu(datum.lat, datum.lon + 0.001, datum.alt, datum)
    assert e > 70.0 and abs(n) < 0.01  # east, shrunk by cos(latitude)
    e, n, u = geodetic_to_enu(datum.lat, datum.lon, datum.alt + 10.0, datum)
    assert u == pytest.approx(10.0, abs=1e-6)


@pytest.mark.parametrize('heading, yaw', [
    (0.0, math.pi / 2), (90.0, 0.0), (180.0, -math.pi / 2), (270.0, math.pi),
    (45.0, math.pi / 4), (315.0, 3 * math.pi / 4), (360.0, math.pi / 2), (-90.0, math.pi),
    (720.0 + 90.0, 0.0),
])
def test_heading_to_enu_yaw(heading, yaw):
    got = heading_to_enu_yaw(heading)
    assert got == pytest.approx(yaw, abs=1e-12)
    assert -math.pi < got <= math.pi


@pytest.mark.parametrize('heading', [0.0, 12.5, 90.0, 179.9, 180.0, 270.0, 359.5])
def test_heading_yaw_round_trip(heading):
    assert enu_yaw_to_heading(heading_to_enu_yaw(heading)) == pytest.approx(heading, abs=1e-9)


def test_wrap_angle_keeps_pi_and_drops_minus_pi():
    assert wrap_angle(-math.pi) == math.pi
    assert wrap_angle(3 * math.pi) == pytest.approx(math.pi)
    assert wrap_angle(-3 * math.pi / 2) == pytest.approx(math.pi / 2)


@pytest.mark.parametrize('yaw', [0.0, math.pi / 2, -math.pi / 2, math.pi, 0.3])
def test_yaw_to_quaternion(yaw):
    x, y, z, w = yaw_to_quaternion(yaw)
    assert (x, y) == (0.0, 0.0)
    assert x * x + y * y + z * z + w * w == pytest.approx(1.0)
    # Rotating the unit x axis by the quaternion must give (cos yaw, sin yaw, 0).
    rx = 1 - 2 * (y * y + z * z)
    ry = 2 * (x * y + w * z)
    assert (rx, ry) == pytest.approx((math.cos(yaw), math.sin(yaw)), abs=1e-12)
    assert yaw_to_quaternion(math.pi / 2) == pytest.approx(
        (0.0, 0.0, math.sqrt(0.5), math.sqrt(0.5)))


@dataclass
class _Pos:
    lat: float
    lon: float
    alt: float


def test_datum_from_items_is_the_centre():
    items = [_Pos(47.39, 8.54, 480.0), _Pos(47.41, 8.54, 490.0),
             _Pos(47.39, 8.56, 500.0), _Pos(47.41, 8.56, 510.0)]
    datum = datum_from_items(items)
    assert datum.lat == pytest.approx(47.40, abs=1e-4)
    assert datum.lon == pytest.approx(8.55, abs=1e-9)
    assert datum.alt == pytest.approx(495.0)
    # The four corners sit symmetrically around the datum in ENU.
    e, n, _ = geodetic_to_enu(np.array([p.lat for p in items]),
                              np.array([p.lon for p in items]), 0.0, datum)
    assert abs(float(np.mean(e))) < 0.01 and abs(float(np.mean(n))) < 15.0


def test_datum_from_items_across_the_antimeridian():
    datum = datum_from_items([_Pos(-17.0, 179.99, 0.0), _Pos(-17.0, -179.99, 0.0)])
    assert abs(datum.lon) == pytest.approx(180.0, abs=1e-6)
    assert datum.lat == pytest.approx(-17.0, abs=1e-4)


def test_datum_errors_name_the_problem():
    with pytest.raises(GalleryError, match='empty gallery'):
        datum_from_items([])
    with pytest.raises(ConfigError, match='latitude 95'):
        Datum(95.0, 8.0)
    with pytest.raises(ConfigError, match='longitude'):
        Datum(47.0, 200.0)
    with pytest.raises(ConfigError, match='finite'):
        Datum(float('nan'), 8.0)
    assert Datum(47, 8).alt == 0.0 and isinstance(Datum(47, 8).lat, float)
