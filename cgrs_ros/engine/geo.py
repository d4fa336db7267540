"""Geodesy: WGS84 geodetic <-> local ENU around a datum, compass heading <-> ROS yaw.

The ``map`` frame of REP-105 is taken as an East-North-Up tangent plane at a datum
(lat, lon, alt on the WGS84 ellipsoid, as ``sensor_msgs/NavSatFix`` reports altitude).
The conversions are pymap3d's; this module only fixes the ellipsoid, validates inputs and
translates between the gallery's compass headings (0 = north, clockwise) and REP-103 yaw
(0 = east, counter-clockwise).
"""

from dataclasses import dataclass
import math

from cgrs_ros.engine.errors import ConfigError, GalleryError
import numpy as np
import pymap3d
import pyproj

# Every conversion names the ellipsoid explicitly so a change of pymap3d's default cannot
# silently move the map frame.
WGS84 = pymap3d.Ellipsoid.from_name('wgs84')
_GEOD = pyproj.Geod(ellps='WGS84')


@dataclass(frozen=True)
class Datum:
    """Origin of the local ENU ``map`` frame: degrees and metres above the WGS84 ellipsoid."""

    lat: float
    lon: float
    alt: float = 0.0

    def __post_init__(self):
        for name in ('lat', 'lon', 'alt'):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(
                    f'datum {name} {value!r} is not a finite number; '
                    'give the datum as decimal degrees and metres (WGS84).')
            object.__setattr__(self, name, float(value))
        if not -90.0 <= self.lat <= 90.0:
            raise ConfigError(
                f'datum latitude {self.lat} is outside [-90, 90]; '
                'give the latitude in decimal degrees (did you swap lat and lon?).')
        if not -180.0 <= self.lon <= 180.0:
            raise ConfigError(
                f'datum longitude {self.lon} is outside [-180, 180]; '
                'give the longitude in decimal degrees.')


def _plain(value):
    """Return a Python float for a scalar result and an ndarray for an array result."""
    array = np.asarray(value, dtype=float)
    return float(array) if array.ndim == 0 else array


def geodetic_to_enu(lat, lon, alt, datum):
    """Convert WGS84 latitude/longitude (degrees) and altitude (m) to ENU metres at ``datum``.

    Scalars give floats; arrays (broadcast like numpy) give arrays.
    """
    e, n, u = pymap3d.geodetic2enu(
        lat, lon, alt, datum.lat, datum.lon, datum.alt, ell=WGS84, deg=True)
    return _plain(e), _plain(n), _plain(u)


def enu_to_geodetic(e, n, u, datum):
    """Convert ENU metres at ``datum`` to WGS84 (latitude deg, longitude deg, altitude m)."""
    lat, lon, alt = pymap3d.enu2geodetic(
        e, n, u, datum.lat, datum.lon, datum.alt, ell=WGS84, deg=True)
    return _plain(lat), _plain(lon), _plain(alt)


def wrap_angle(angle):
    """Wrap an angle in radians to (-pi, pi]."""
    wrapped = math.remainder(angle, 2.0 * math.pi)
    # remainder() returns [-pi, pi]; the ROS convention used here keeps +pi, not -pi.
    return math.pi if wrapped <= -math.pi else wrapped


def heading_to_enu_yaw(heading_deg):
    """Convert a compass heading (deg, 0 = north, clockwise) to ENU yaw (rad, 0 = east, CCW).

    North (0) gives pi/2, east (90) gives 0, south (180) gives -pi/2, west (270) gives pi.
    """
    return wrap_angle(math.pi / 2.0 - math.radians(heading_deg))


def enu_yaw_to_heading(yaw):
    """Convert ENU yaw (rad, 0 = east, CCW) to a compass heading in degrees in [0, 360)."""
    heading = math.degrees(math.pi / 2.0 - yaw) % 360.0
    # The modulo of a value a hair below 0 rounds to exactly 360.0; fold it back to 0.
    return 0.0 if heading >= 360.0 else heading


def yaw_to_quaternion(yaw):
    """Return the (x, y, z, w) unit quaternion of a rotation by ``yaw`` rad about +z (up)."""
    half = 0.5 * yaw
    return (0.0, 0.0, math.sin(half), math.cos(half))


def datum_from_items(items):
    """Return a datum at the centre of a gallery's positions (anything with lat, lon, alt).

    The horizontal centre is the mean of the positions taken on the ellipsoid surface in
    Earth-centred coordinates (so a gallery across the antimeridian is handled), pushed back
    to the surface; the altitude is the mean altitude.
    """
    items = list(items)
    if not items:
        raise GalleryError(
            'cannot derive a datum from an empty gallery; add images or set the datum '
            'explicitly.')
    lat = np.array([item.lat for item in items], dtype=float)
    lon = np.array([item.lon for item in items], dtype=float)
    alt = np.array([item.alt for item in items], dtype=float)
    x, y, z = pymap3d.geodetic2ecef(lat, lon, np.zeros_like(lat), ell=WGS84, deg=True)
    centre_lat, centre_lon, _ = pymap3d.ecef2geodetic(
        float(np.mean(x)), float(np.mean(y)), float(np.mean(z)), ell=WGS84, deg=True)
    return Datum(float(centre_lat), float(centre_lon), float(np.mean(alt)))


def geodesic_distance_m(lat, lon, lats, lons):
    """Return the WGS84 geodesic distances (m) from (lat, lon) to every (lats[i], lons[i]).

    pyproj's ``Geod.inv`` (Karney's algorithm): exact on the ellipsoid, at the poles and
    across the antimeridian alike. Returns a float64 array shaped like ``lats``.
    """
    lats = np.asarray(lats, dtype=float)
    lons = np.asarray(lons, dtype=float)
    if not lats.size:
        return np.zeros(lats.shape)
    _, _, dist = _GEOD.inv(np.full(lats.shape, float(lon)), np.full(lats.shape, float(lat)),
                           lons, lats)
    return np.asarray(dist, dtype=float)


def surface_ecef(lat, lon):
    """Return Earth-centred (x, y, z) metres of positions on the WGS84 ellipsoid surface.

    Arrays in, an (n, 3) array out. The straight-line (chord) distance between two such
    points is never more than their geodesic distance, which makes it a cheap, safe prefilter
    for "within R metres" before the exact :func:`geodesic_distance_m`.
    """
    lat = np.atleast_1d(np.asarray(lat, dtype=float))
    lon = np.atleast_1d(np.asarray(lon, dtype=float))
    x, y, z = pymap3d.geodetic2ecef(lat, lon, np.zeros_like(lat), ell=WGS84, deg=True)
    return np.stack([np.asarray(x, dtype=float), np.asarray(y, dtype=float),
                     np.asarray(z, dtype=float)], axis=1)
