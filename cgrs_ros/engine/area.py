"""Search areas: only gallery images within a radius of a point are candidates.

Why: a drone that roughly knows where it is (its last fix, a mission prior) or an operator
pointing at a map should not be sent across the town by a look-alike place far away. And the
area must restrict the search itself, not the list it returns: a top-k list filtered afterwards
can hold none of the images inside the area, while the same rows handed to FAISS as a selector
(``VectorIndex.search(rows=...)``) still give k candidates whenever k images lie inside.

Distances are WGS84 geodesics (pyproj, :func:`cgrs_ros.engine.geo.geodesic_distance_m`). A
gallery can hold a million images, so the exact distance is computed only for the images whose
straight-line (chord) distance through the Earth is within the radius: the chord is never
longer than the geodesic, so the prefilter drops no image that belongs to the area.
"""

import dataclasses
import math
import threading
import weakref

from cgrs_ros.engine.errors import QueryError
from cgrs_ros.engine.geo import geodesic_distance_m, surface_ecef
import numpy as np

# A search area wider than this is not a local search: refuse it rather than scan for nothing.
MAX_RADIUS_M = 20_000_000.0


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

    def __init__(self, items):
        """Precompute the items' surface ECEF positions (one pass over the gallery)."""
        self.lat = np.array([item.lat for item in items], dtype=float)
        self.lon = np.array([item.lon for item in items], dtype=float)
        self._ecef = surface_ecef(self.lat, self.lon) if len(self.lat) else np.zeros((0, 3))

    def items_within(self, area):
        """Return the sorted indices of the items at most ``area.radius_m`` from its centre."""
        if not len(self.lat):
            return np.zeros(0, dtype=np.int64)
        centre = surface_ecef(area.lat, area.lon)[0]
        chord2 = np.einsum('ij,ij->i', self._ecef - centre, self._ecef - centre)
        near = np.flatnonzero(chord2 <= area.radius_m * area.radius_m)
        if not len(near):
            return near.astype(np.int64)
        dist = geodesic_distance_m(area.lat, area.lon, self.lat[near], self.lon[near])
        return near[dist <= area.radius_m].astype(np.int64)


_filters = weakref.WeakKeyDictionary()
_filters_lock = threading.Lock()


def area_filter_for(gallery):
    """Return the (cached) :class:`AreaFilter` of a loaded gallery."""
    with _filters_lock:
        found = _filters.get(gallery)
        if found is None:
            found = _filters[gallery] = AreaFilter(gallery.items)
        return found


def items_within(gallery, near):
    """Return the sorted item indices of ``gallery`` inside ``near`` (None when near is None)."""
    area = SearchArea.parse(near)
    return None if area is None else area_filter_for(gallery).items_within(area)
