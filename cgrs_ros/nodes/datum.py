"""The ``datum.*`` parameters shared by the nodes that use the ``map`` frame.

retrieval_node (goal poses) and sim_drone (odometry, fix) must put ``map`` at the same
place, so both declare these parameters from here and resolve them the same way: a value
that is NaN is taken from the gallery (centre of the images that exist, mean altitude).
"""

import math

from cgrs_ros.engine import geo
from cgrs_ros.engine.errors import ConfigError
from cgrs_ros.nodes.parameters import Param

DATUM_PARAMETERS = (
    Param('datum.latitude', math.nan, 'Datum latitude, WGS84 degrees; NaN = gallery centre.',
          minimum=-90.0, maximum=90.0, allow_nan=True),
    Param('datum.longitude', math.nan, 'Datum longitude, WGS84 degrees; NaN = gallery centre.',
          minimum=-180.0, maximum=180.0, allow_nan=True),
    Param('datum.altitude', math.nan,
          'Datum altitude, metres above the WGS84 ellipsoid; NaN = gallery mean.',
          minimum=-1000.0, maximum=20000.0, allow_nan=True),
)


def gallery_items(gallery_dir):
    """Return the gallery images the datum is derived from (those whose file exists).

    Loads the manifest as the retriever does (``check_images='exists'``), so every node
    derives the same datum from the same gallery.
    """
    from cgrs_ros.engine.gallery import load_gallery
    if not str(gallery_dir).strip():
        raise ConfigError('the datum is not set and gallery_dir is empty, so there is nothing '
                          'to derive it from; set datum.latitude, datum.longitude and '
                          'datum.altitude, or gallery_dir')
    return load_gallery(gallery_dir, check_images='exists').items


def resolve_datum(params, items, logger=None):
    """Return the :class:`geo.Datum` for ``params`` (a ``{name: value}`` dict).

    ``items`` is a callable returning the gallery items; it is called only when a datum
    value is NaN. ``logger`` (optional) is told when the datum comes from the gallery.
    """
    lat, lon, alt = (params[f'datum.{key}'] for key in ('latitude', 'longitude', 'altitude'))
    if math.isnan(lat) or math.isnan(lon) or math.isnan(alt):
        derived = geo.datum_from_items(items())
        if math.isnan(lat) or math.isnan(lon):
            lat, lon = derived.lat, derived.lon
            if logger is not None:
                logger.info(f'datum derived from the gallery centre: lat {lat:.7f}, '
                            f'lon {lon:.7f}')
        if math.isnan(alt):
            alt = derived.alt
    return geo.Datum(lat, lon, alt)
