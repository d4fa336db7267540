"""Search areas: only gallery images within a radius of a point are candidates.

Why: a drone that roughly knows where it is (its last fix, a mission prior) or an operator
pointing at a map should not be sent across the town by a look-alike place far away. And the
area must restrict the search itself, not the list it returns: a top-k list filtered afterwards
can hold none of the images inside the area, while the same rows handed to FAISS as a selector
(``VectorIndex.search(rows=...)``) still give k candidates whenever k images lie inside.

Distances are WGS84 geodesics (pyproj, :func:`cgrs_ros.engine.geo.geodesic_distance_m`). A
gallery can hold ten million images, so an area query never visits them all: the images'
Earth-centred positions sit in a k-d tree (scipy's cKDTree, about 40 bytes an image), which
returns the images whose straight-line (chord) distance through the Earth is within the radius;
the chord is never longer than the geodesic, so this drops no image that belongs to the area.
Of those, an image whose great-circle distance (from the chord) is clearly inside or outside
the radius (a 1 % margin, twice the spherical model's worst error) is decided at once, and
only the images in that band get Karney's exact geodesic: an area holding a million images
costs milliseconds, not a second of pyproj.
"""

import dataclasses
import math
import threading
import weakref

from cgrs_ros.engine.errors import QueryError
from cgrs_ros.engine.geo import geodesic_distance_m, surface_ecef
import numpy as np
from scipy.spatial import cKDTree

# A search area wider than this is not a local search: refuse it rather than scan for nothing.
MAX_RADIUS_M = 20_000_000.0
MEAN_EARTH_RADIUS_M = 6_371_008.8
# Relative margin around the great-circle distance inside which the exact geodesic decides.
SPHERE_MARGIN = 0.01


@dataclasses.dataclass(frozen=True)
class SearchArea:
    """A circle on the WGS84 ellipsoid: centre in degrees, radius in metres."""

    lat: float
    lon: float
    radius_m: float

    @classmethod
    def parse(cls, near):
        """Return a SearchArea from None, a SearchArea or ``(lat, lon, radius_m)``.

        Returns None for None; raises QueryError naming the bad value otherwise.
        """
        if near is None or isinstance(near, cls):
            return near
        try:
            lat, lon, radius = (float(v) for v in near)
        except (TypeError, ValueError):
            raise QueryError(f'near {near!r} must be (lat, lon, radius_m): three numbers, '
                             'degrees and metres') from None
        if not all(math.isfinite(v) for v in (lat, lon, radius)):
            raise QueryError(f'near {near!r} holds a value that is not a finite number')
        if not -90.0 <= lat <= 90.0:
            raise QueryError(f'near latitude {lat} is outside [-90, 90]; give decimal degrees '
                             '(did you swap lat and lon?)')
        if not -180.0 <= lon <= 180.0:
            raise QueryError(f'near longitude {lon} is outside [-180, 180]; give decimal '
                             'degrees')
        if not 0.0 < radius <= MAX_RADIUS_M:
            raise QueryError(f'near radius {radius:g} m must be above 0 and at most '
                             f'{MAX_RADIUS_M:.0f} m')
        return cls(lat, lon, radius)

    def describe(self):
        """Return the area in words, e.g. ``'250 m of (47.001000, 8.002000)'``."""
        return f'{self.radius_m:g} m of ({self.lat:.6f}, {self.lon:.6f})'

    def to_dict(self):
        """Return ``{'lat', 'lon', 'radius_m'}`` (for reports and JSON results)."""
        return dataclasses.asdict(self)


class AreaFilter:
    """The positions of a gallery's items, ready for "which items lie in this area"."""

    def __init__(self, items=(), lat=None, lon=None):
        """Index the positions of ``items`` (or the ``lat``, ``lon`` arrays, degrees)."""
        if lat is None:
            lat, lon = [item.lat for item in items], [item.lon for item in items]
        self.lat = np.asarray(lat, dtype=float)
        self.lon = np.asarray(lon, dtype=float)
        self._tree = None
        if len(self.lat):
            ecef = np.empty((len(self.lat), 3))
            for lo in range(0, len(self.lat), 1 << 20):  # bounded temporaries at 10M items
                ecef[lo:lo + (1 << 20)] = surface_ecef(self.lat[lo:lo + (1 << 20)],
                                                       self.lon[lo:lo + (1 << 20)])
            self._tree = cKDTree(ecef, leafsize=32, balanced_tree=False, compact_nodes=False)

    @classmethod
    def for_gallery(cls, gallery):
        """Return the filter of a gallery (columns from ``gallery.coordinates()`` if it has it)."""
        coordinates = getattr(gallery, 'coordinates', None)
        if coordinates is not None:
            lat, lon = coordinates()
            return cls(lat=lat, lon=lon)
        return cls(gallery.items)

    def nbytes(self):
        """Bytes held: positions and the k-d tree (its copy of the points and its index)."""
        tree = 0 if self._tree is None else self._tree.data.nbytes + self._tree.indices.nbytes
        return int(self.lat.nbytes + self.lon.nbytes + tree)

    def items_within(self, area):
        """Return the sorted indices of the items at most ``area.radius_m`` from its centre."""
        if self._tree is None:
            return np.zeros(0, dtype=np.int64)
        centre = surface_ecef(area.lat, area.lon)[0]
        near = np.asarray(self._tree.query_ball_point(centre, area.radius_m,
                                                      return_sorted=False), dtype=np.int64)
        if not len(near):
            return near
        chord = np.linalg.norm(self._tree.data[near] - centre, axis=1)
        arc = 2 * MEAN_EARTH_RADIUS_M * np.arcsin(np.minimum(chord / (2 * MEAN_EARTH_RADIUS_M),
                                                             1.0))
        inside = arc <= area.radius_m * (1 - SPHERE_MARGIN)
        band = np.flatnonzero(~inside & (arc <= area.radius_m * (1 + SPHERE_MARGIN)))
        if len(band):
            dist = geodesic_distance_m(area.lat, area.lon, self.lat[near[band]],
                                       self.lon[near[band]])
            inside[band] = dist <= area.radius_m
        return np.sort(near[inside])


_filters = weakref.WeakKeyDictionary()
_filters_lock = threading.Lock()


def area_filter_for(gallery):
    """Return the (cached) :class:`AreaFilter` of a loaded gallery."""
    with _filters_lock:
        found = _filters.get(gallery)
        if found is None:
            found = _filters[gallery] = AreaFilter.for_gallery(gallery)
        return found


def items_within(gallery, near):
    """Return the sorted item indices of ``gallery`` inside ``near`` (None when near is None)."""
    area = SearchArea.parse(near)
    return None if area is None else area_filter_for(gallery).items_within(area)
