"""Localize camera frames against a geo-tagged (satellite) gallery.

One frame costs one or two image queries (``Retriever.query_image``):

1. local: when the localizer has an anchor (the median of its recent estimates, or a prior
   given by the caller) it searches only the gallery images within ``search_radius_m`` of it
   (the ``near`` area is applied inside the FAISS search). The radius grows by
   ``radius_growth_mps`` for every second since the anchor's fix: without fixes the vehicle
   keeps moving;
2. global: when there is no anchor, nothing lies in the area, or the local best score is under
   ``min_score``, it searches the whole gallery (recovery after a jump, a kidnapping, or a
   long stretch without fixes). With ``global_check`` (default) the whole gallery is searched
   on every frame too, and a place outside the area scoring ``min_margin`` above the local
   best takes over. Measured on the demo towns, this is what keeps a localizer whose anchor
   drifted onto a look-alike from staying there: the cosine scores of right and wrong
   matches overlap, so a wrong area still offers a confident-looking best match.
   A fix from a global search that lies outside the local area is a jump: it is published
   only once ``confirm_jumps`` frames in a row put it at one place (a single look-alike
   elsewhere does not move the vehicle hundreds of metres).

The estimate from the ranked matches:

- refused (no fix, with the reason) when the best score is under ``min_score`` or the match is
  ambiguous: the best match and the best-scoring match of ANOTHER place (farther than
  ``ambiguity_radius_m`` from it; overlapping tiles of one place are not rivals) score within
  ``min_margin`` of each other;
- position: the score-weighted mean of the matches within ``ambiguity_radius_m`` of the best
  (overlapping tiles interpolate), weights ``exp((score - best) / temperature)``;
- covariance (east/north, m^2): the weighted spread of ALL top matches around that position
  (a look-alike far away with a high weight widens it) plus ``min_sigma_m`` squared (a tile
  match cannot be sharper than the tile grid);
- heading: the best match's ``heading_deg`` when its platform is not satellite (a drone photo
  was taken facing somewhere). Satellite tiles are north-up by construction: their heading says
  nothing about the camera, so the heading is unknown (None) for them.

Body-fixed cameras turn with the drone while satellite tiles are north-up, and the image tower
is not rotation-invariant: :func:`rectify` turns a frame north-up (rotate by the compass
heading, keep the inscribed square, so no black corners reach the encoder) when the heading
is known from elsewhere (an IMU/compass keeps working when GNSS is jammed).
"""

import collections
from dataclasses import dataclass, field
import math
import time
from typing import Optional

from cgrs_ros.engine.geo import Datum, enu_to_geodetic, geodetic_to_enu
import numpy as np
from PIL import Image


@dataclass
class LocalizerSettings:
    """How frames are matched and when a match is good enough for a fix (module docstring)."""

    top_k: int = 8                    # matches per query (the spread is computed over them)
    search_radius_m: float = 90.0     # local search radius around the anchor
    min_score: float = 0.7            # cosine: local best under this -> global; global -> refuse
    min_margin: float = 0.05          # best vs the best other place: closer -> ambiguous
    ambiguity_radius_m: float = 130.0  # nearer matches are the same place (~ a tile's width)
    temperature: float = 0.02         # score -> weight softness (cosine units)
    min_sigma_m: float = 8.0          # floor of the position standard deviation
    anchor_window: int = 5            # the anchor is the median of the last fixes (outliers)
    radius_growth_mps: float = 10.0   # the local radius grows this fast while there is no fix
    global_check: bool = True         # also search globally; a clearly better place wins
    confirm_jumps: int = 2            # frames in a row a fix far from the anchor must agree
    platform: str = 'satellite'       # gallery rows matched against ('' = all)
    query_platform: str = 'drone'     # the frames' platform (the encoder's expert, if any)

    def check(self):
        """Raise ValueError naming the first setting out of range."""
        if not 1 <= int(self.top_k) <= 1000:
            raise ValueError(f'top_k {self.top_k} must be 1-1000')
        if not 1 <= int(self.confirm_jumps) <= 100:
            raise ValueError(f'confirm_jumps {self.confirm_jumps} must be 1-100 frames')
        if not 1 <= int(self.anchor_window) <= 1000:
            raise ValueError(f'anchor_window {self.anchor_window} must be 1-1000 fixes')
        for name in ('search_radius_m', 'ambiguity_radius_m', 'temperature'):
            if not getattr(self, name) > 0:
                raise ValueError(f'{name} {getattr(self, name)} must be above 0')
        for name in ('min_margin', 'min_sigma_m', 'radius_growth_mps'):
            if not getattr(self, name) >= 0:
                raise ValueError(f'{name} {getattr(self, name)} must be 0 or more')
        if not -1.0 <= self.min_score <= 1.0:
            raise ValueError(f'min_score {self.min_score} is a cosine: give -1 to 1')
        return self


@dataclass
class Estimate:
    """A position fix: WGS84, east/north covariance (m^2), heading when the match gives one."""

    lat: float
    lon: float
    alt: float                        # the matched image's altitude (the ground, for tiles)
    covariance_en: tuple              # ((ee, en), (ne, nn)) m^2
    heading_deg: Optional[float]      # compass heading from the match; None = unknown
    score: float                      # best match's cosine
    margin: float                     # best minus the best other place (inf: no rival)
    image_id: str                     # best match
    cluster: int                      # matches averaged into the position

    @property
    def sigma_m(self):
        """Return the standard deviation along the covariance's major axis, metres."""
        return math.sqrt(max(np.linalg.eigvalsh(np.array(self.covariance_en)).max(), 0.0))


@dataclass
class Outcome:
    """What one frame gave: an estimate or the reason there is none, and how it was searched."""

    estimate: Optional[Estimate]
    reason: str                       # '' with an estimate
    modes: list = field(default_factory=list)   # 'local', 'global' in the order run
    best_score: float = math.nan
    latency_ms: float = 0.0
    result: object = None             # the last QueryResult

    @property
    def mode(self):
        """Return how the answer was found: 'local', 'global' or 'local+global'."""
        return '+'.join(self.modes)


def rectify(image, heading_deg):
    """Return a body-fixed frame turned north-up and cut to its inscribed square.

    ``heading_deg`` is the compass direction of the image's up (0 = north, clockwise). The
    rotation leaves the corners empty; the central square of side min(w, h) / sqrt(2) has
    none, so only real pixels reach the encoder (the footprint shrinks by that factor).
    """
    if not math.isfinite(heading_deg):
        raise ValueError(f'heading {heading_deg} is not a finite number of degrees')
    rotated = image.rotate(-float(heading_deg), resample=Image.Resampling.BILINEAR)
    width, height = image.size
    side = int(min(width, height) / math.sqrt(2.0))
    left, top = (width - side) // 2, (height - side) // 2
    return rotated.crop((left, top, left + side, top + side))


class Localizer:
    """Matches frames against a retriever's gallery, remembering where it last was."""

    def __init__(self, retriever, settings=None, prior=None):
        """Match with ``retriever.query_image``; ``prior`` = (lat, lon, radius_m) or None."""
        self.retriever = retriever
        self.settings = (settings or LocalizerSettings()).check()
        self._anchor = None
        self._anchor_time = None      # frame time (s) of the fix the anchor comes from
        self._jump = None             # (lat, lon, frames) of a far fix awaiting confirmation
        self._recent = collections.deque(maxlen=int(self.settings.anchor_window))
        if prior is not None:
            self.set_prior(*prior)

    @property
    def anchor(self):
        """Return where the next local search is centred: (lat, lon, radius_m) or None."""
        return self._anchor

    def search_area(self, stamp=None):
        """Return the local search area for a frame taken at ``stamp`` (s), or None.

        The anchor's radius plus ``radius_growth_mps`` for every second since the fix it comes
        from: without fixes the vehicle keeps moving, so where it can be keeps widening.
        """
        if self._anchor is None:
            return None
        lat, lon, radius = self._anchor
        if stamp is not None and self._anchor_time is not None:
            radius += self.settings.radius_growth_mps * max(0.0, stamp - self._anchor_time)
        return lat, lon, radius

    def set_prior(self, lat, lon, radius_m=None):
        """Search within ``radius_m`` (default search_radius_m) of (lat, lon) next."""
        radius = float(radius_m if radius_m is not None else self.settings.search_radius_m)
        if not (math.isfinite(lat) and math.isfinite(lon) and radius > 0):
            raise ValueError(f'prior ({lat}, {lon}, {radius} m) needs finite degrees and a '
                             'radius above 0')
        self._anchor = (float(lat), float(lon), radius)
        self._anchor_time = self._jump = None
        self._recent.clear()

    def forget(self):
        """Drop the anchor: the next frame is searched over the whole gallery."""
        self._anchor = self._anchor_time = self._jump = None
        self._recent.clear()

    def _confirm_jump(self, estimate, area):
        """Return '' when ``estimate`` may be taken, else why it waits for confirmation.

        A fix outside the local area is a jump; it is taken once ``confirm_jumps`` frames in a
        row put it at one place (within ``ambiguity_radius_m``), and the anchor restarts there.
        """
        s = self.settings
        if area is None or s.confirm_jumps <= 1:
            return ''
        ref = Datum(area[0], area[1], 0.0)
        east, north, _ = geodetic_to_enu(estimate.lat, estimate.lon, 0.0, ref)
        if math.hypot(east, north) <= area[2]:
            self._jump = None
            return ''
        count = 1
        if self._jump is not None:
            east, north, _ = geodetic_to_enu(estimate.lat, estimate.lon, 0.0,
                                             Datum(self._jump[0], self._jump[1], 0.0))
            if math.hypot(east, north) <= s.ambiguity_radius_m:
                count = self._jump[2] + 1
        if count >= s.confirm_jumps:
            self._jump = None
            self._recent.clear()  # the old place's fixes must not pull the anchor back
            return ''
        self._jump = (estimate.lat, estimate.lon, count)
        return (f'a fix {estimate.image_id} outside the local area awaits confirmation '
                f'({count} of {s.confirm_jumps} frames)')

    def _move_anchor(self, estimate, stamp):
        """Centre the next local search on the median of the recent fixes."""
        self._recent.append((estimate.lat, estimate.lon))
        lat, lon = np.median(np.array(self._recent), axis=0)
        self._anchor = (float(lat), float(lon), self.settings.search_radius_m)
        self._anchor_time = stamp

    def _query(self, frame, near):
        s = self.settings
        return self.retriever.query_image(frame, top_k=s.top_k, platform=s.platform or None,
                                          near=near, query_platform=s.query_platform)

    def locate(self, image, heading_deg=None, stamp=None):
        """Return the :class:`Outcome` of one frame (PIL image); rectified when heading given.

        ``stamp`` is the frame time in seconds (any clock, used for differences only); without
        it the local radius does not grow. A fix moves the anchor to the median of the recent
        estimates, radius ``search_radius_m``.
        """
        start = time.perf_counter()
        s = self.settings
        frame = image if heading_deg is None else rectify(image, heading_deg)
        modes, result, local_note = [], None, ''
        area = self.search_area(stamp)
        if area is not None:
            modes.append('local')
            result = self._query(frame, area)
            best = result.candidates[0].coarse_score if result.candidates else None
            if best is None:
                local_note = f'nothing indexed within {area[2]:.0f} m of the anchor'
                result = None
            elif best < s.min_score:
                local_note = f'local best score {best:.3f} under min_score {s.min_score}'
                result = None
        if result is None:
            modes.append('global')
            result = self._query(frame, None)
        elif s.global_check:
            # A local search centred on a wrong anchor keeps finding the best of a wrong area
            # (scores do not tell): a place elsewhere scoring clearly higher takes over.
            modes.append('global')
            wider = self._query(frame, None)
            if wider.candidates and wider.candidates[0].coarse_score >= \
                    result.candidates[0].coarse_score + s.min_margin:
                local_note = (f'a place outside the local area scores '
                              f'{wider.candidates[0].coarse_score:.3f} against '
                              f'{result.candidates[0].coarse_score:.3f} inside it')
                result = wider
            else:
                modes.pop()
        estimate, reason = self.estimate(result.candidates)
        if estimate is not None and 'global' in modes:
            reason = self._confirm_jump(estimate, area)
            if reason:
                estimate, local_note = None, ''
        if estimate is not None:
            self._move_anchor(estimate, stamp)
        elif local_note:
            reason = f'{reason} (after a global search; {local_note})'
        best = result.candidates[0].coarse_score if result.candidates else math.nan
        return Outcome(estimate=estimate, reason=reason, modes=modes, best_score=float(best),
                       latency_ms=(time.perf_counter() - start) * 1e3, result=result)

    def estimate(self, candidates):
        """Return ``(Estimate, '')`` from ranked candidates, or ``(None, reason)``."""
        s = self.settings
        if not candidates:
            return None, 'no gallery image to match against (empty gallery or platform filter)'
        best = candidates[0]
        scores = np.array([c.coarse_score for c in candidates], dtype=float)
        if not scores[0] >= s.min_score:
            return None, (f'the best match {best.image_id} scores {scores[0]:.3f}, under '
                          f'min_score {s.min_score}: the frame matches nothing well')
        ref = Datum(best.lat, best.lon, best.alt)
        east, north, _ = geodetic_to_enu(np.array([c.lat for c in candidates], float),
                                         np.array([c.lon for c in candidates], float),
                                         np.array([c.alt for c in candidates], float), ref)
        points = np.stack([np.atleast_1d(east), np.atleast_1d(north)], axis=1)
        distance = np.hypot(points[:, 0], points[:, 1])
        rivals = np.flatnonzero(distance > s.ambiguity_radius_m)
        margin = math.inf
        if len(rivals):
            rival = int(rivals[0])
            margin = float(scores[0] - scores[rival])
            if margin < s.min_margin:
                return None, (
                    f'ambiguous: {best.image_id} ({scores[0]:.3f}) and '
                    f'{candidates[rival].image_id} ({scores[rival]:.3f}), '
                    f'{distance[rival]:.0f} m apart, score within min_margin {s.min_margin}')
        weights = np.exp((scores - scores[0]) / s.temperature)
        same = distance <= s.ambiguity_radius_m
        mean = weights[same] @ points[same] / weights[same].sum()
        offsets = points - mean
        covariance = np.einsum('i,ij,ik->jk', weights, offsets, offsets) / weights.sum()
        covariance += np.eye(2) * s.min_sigma_m ** 2
        lat, lon, _ = enu_to_geodetic(float(mean[0]), float(mean[1]), 0.0, ref)
        heading = None if best.platform == 'satellite' else float(best.heading_deg)
        return Estimate(lat=float(lat), lon=float(lon), alt=float(best.alt),
                        covariance_en=tuple(tuple(float(v) for v in row) for row in covariance),
                        heading_deg=heading, score=float(scores[0]), margin=margin,
                        image_id=best.image_id, cluster=int(same.sum())), ''
