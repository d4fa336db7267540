"""Rasterise views of the demo town: nadir satellite tiles and tilted drone views.

Each view is drawn from the vector world with Pillow at twice the output resolution and
reduced (anti-aliasing). Satellite tiles are north-up orthophotos with sun shadows; drone
views are rotated to the camera heading, buildings and trees are extruded away from the
camera and the ground is warped by a homography to mimic a tilted camera, with a little haze.
The perspective model is a plausible look, not a calibrated camera (hand-written: no library
renders vector maps as oblique photos).
"""

from dataclasses import dataclass
import math

import numpy as np
from PIL import Image, ImageDraw

SUPERSAMPLE = 2
BASE_GROUND = (122, 136, 94)


@dataclass(frozen=True)
class View:
    """What a camera sees: ground centre (east, north m), heading, metres per pixel, tilt."""

    e: float
    n: float
    heading_deg: float = 0.0
    m_per_px: float = 0.5
    size: int = 256
    tilt: float = 0.0   # 0 = nadir; 0.2-0.4 = oblique drone look

    @property
    def axes(self):
        """Return (right, forward) unit vectors of the image in east/north metres."""
        h = math.radians(self.heading_deg)
        return np.array([math.cos(h), -math.sin(h)]), np.array([math.sin(h), math.cos(h)])

    def ground_quad(self):
        """Return the ground footprint (4, 2) in view-local metres (x right, y forward).

        Order: top-left, top-right, bottom-right, bottom-left of the image.
        """
        half = self.size * self.m_per_px / 2
        far, near = 1.0 + self.tilt, 1.0 - self.tilt
        return np.array([[-half * far, half * far], [half * far, half * far],
                         [half * near, -half * near], [-half * near, -half * near]])

    def footprint_polygon(self):
        """Return the ground footprint as a (4, 2) array of world east/north metres."""
        right, forward = self.axes
        quad = self.ground_quad()
        return (np.array([self.e, self.n]) + quad[:, :1] * right[None, :]
                + quad[:, 1:] * forward[None, :])


def points_in_view(view, pts, margin=0.0):
    """Return a boolean mask of the (N, 2) world points inside the view's footprint."""
    poly = view.footprint_polygon()
    inside = np.ones(len(pts), dtype=bool)
    for k in range(4):
        a, b = poly[k], poly[(k + 1) % 4]
        edge = b - a
        # Footprint corners go clockwise on the ground, so inside is to the right of each edge.
        cross = edge[0] * (pts[:, 1] - a[1]) - edge[1] * (pts[:, 0] - a[0])
        length = math.hypot(*edge)
        inside &= cross <= -margin * length
    return inside


def _homography(src, dst):
    """Solve the 8 perspective coefficients mapping src (x, y) points to dst (u, v) points."""
    rows, rhs = [], []
    for (x, y), (u, v) in zip(src, dst):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        rhs += [u, v]
    return np.linalg.solve(np.array(rows, float), np.array(rhs, float))


class _Canvas:
    """A top-down supersampled canvas aligned with the view's heading."""

    def __init__(self, view):
        self.view = view
        half = view.size * view.m_per_px / 2 * (1.0 + view.tilt) * 1.04
        self.mpp = view.m_per_px / SUPERSAMPLE
        self.px = int(math.ceil(2 * half / self.mpp))
        self.half = self.px * self.mpp / 2
        self.right, self.forward = view.axes
        self.image = Image.new('RGB', (self.px, self.px), BASE_GROUND)
        self.draw = ImageDraw.Draw(self.image)

    def to_px(self, pts, shift=(0.0, 0.0)):
        d = pts - (self.view.e, self.view.n)
        x = d @ self.right
        y = d @ self.forward
        return np.stack([self.px / 2 + x / self.mpp + shift[0],
                         self.px / 2 - y / self.mpp + shift[1]], axis=1)

    def local_to_px(self, quad):
        return np.stack([self.px / 2 + quad[:, 0] / self.mpp,
                         self.px / 2 - quad[:, 1] / self.mpp], axis=1)

    def shift_px(self, offset):
        """Return the pixel shift of a ground offset (east, north metres)."""
        return np.array([offset @ self.right / self.mpp, -(offset @ self.forward) / self.mpp])

    def project(self, arrays):
        """Project many (N, 2) world arrays to pixels in one numpy call."""
        if not arrays:
            return []
        px = self.to_px(np.concatenate(arrays))
        return np.split(px, np.cumsum([len(a) for a in arrays])[:-1])

    def shape(self, shape, pts, fill=None):
        """Draw one shape whose vertices are already in pixels."""
        fill = fill if fill is not None else shape.fill
        if shape.op == 'poly':
            self.draw.polygon(pts.ravel().tolist(), fill=fill)
            return
        width = max(1, int(round(shape.width / self.mpp)))
        for run in self._visible_runs(pts, width):
            self.draw.line(run.ravel().tolist(), fill=fill, width=width,
                           joint='curve' if len(run) > 2 else None)
            if width > 3:
                # Round caps, so street ends meet without notches at junctions.
                r = width / 2
                for x, y in (run[0], run[-1]):
                    self.draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)

    def _visible_runs(self, pts, width):
        """Split a long polyline into the runs near the canvas (the river spans the town)."""
        if len(pts) <= 8:
            return [pts]
        margin = width + 2
        near = ((pts[:, 0] > -margin) & (pts[:, 0] < self.px + margin)
                & (pts[:, 1] > -margin) & (pts[:, 1] < self.px + margin))
        # Keep each vertex next to a visible one, so segments crossing the edge stay whole.
        keep = near.copy()
        keep[1:] |= near[:-1]
        keep[:-1] |= near[1:]
        runs, start = [], None
        for i, flag in enumerate(keep):
            if flag and start is None:
                start = i
            elif not flag and start is not None:
                runs.append(pts[start:i])
                start = None
        if start is not None:
            runs.append(pts[start:])
        return [run for run in runs if len(run) >= 2]


def render_view(world, view, rng):
    """Draw ``view`` of ``world``; ``rng`` only adds sensor noise. Returns a PIL RGB image."""
    canvas = _Canvas(view)
    reach = canvas.half * math.sqrt(2) + 40.0
    features = world.in_box(view.e - reach, view.n - reach, view.e + reach, view.n + reach)
    flat, standing = [], []
    for f in features:
        (standing if f.kind in ('building', 'tree') else flat).append(f)
    shapes = [s for _, _, _, s in sorted(
        ((s.layer, f.fid, k, s) for f in flat for k, s in enumerate(f.shapes)),
        key=lambda t: t[:3])]
    for s, pts in zip(shapes, canvas.project([s.pts for s in shapes])):
        canvas.shape(s, pts)
    oblique = view.tilt > 0
    if oblique:
        # Far things first so nearer ones hide them.
        standing.sort(key=lambda f: (-(np.subtract(f.centre, (view.e, view.n)) @
                                       canvas.forward), f.fid))
    else:
        standing.sort(key=lambda f: (f.kind == 'tree', f.fid))
    bases = [_base(f) for f in standing]
    flat_bases = canvas.project([p for polys in bases for p in polys])
    it = iter(flat_bases)
    base_px = [[next(it) for _ in polys] for polys in bases]
    roofs = canvas.project([s.pts for f in standing for s in f.shapes])
    it = iter(roofs)
    roof_px = [[next(it) for _ in f.shapes] for f in standing]
    _shadows(canvas, world, standing, base_px)
    for f, base, roof in zip(standing, base_px, roof_px):
        _standing(canvas, f, base, roof, oblique)
    image = canvas.image
    out_px = view.size * SUPERSAMPLE
    if oblique:
        quad = canvas.local_to_px(view.ground_quad())
        corners = [(0, 0), (out_px, 0), (out_px, out_px), (0, out_px)]
        coeffs = _homography(corners, quad)
        # Bilinear is enough: the result is reduced 2x right after.
        image = image.transform((out_px, out_px), Image.Transform.PERSPECTIVE,
                                tuple(coeffs.tolist()), Image.Resampling.BILINEAR)
    else:
        off = (canvas.px - out_px) // 2
        image = image.crop((off, off, off + out_px, off + out_px))
    image = image.reduce(SUPERSAMPLE)
    return _sensor(image, view, rng)


def _base(f):
    """Return the ground outline polygons of a building or tree (what casts the shadow)."""
    return f.attrs.get('footprint') or [f.shapes[0].pts]


def _shadows(canvas, world, standing, base_px):
    """Darken the ground under the sun shadows of buildings and trees."""
    if not standing:
        return
    mask = Image.new('L', canvas.image.size, 0)
    draw = ImageDraw.Draw(mask)
    azimuth = math.radians(world.sun_azimuth_deg + 180.0)
    direction = np.array([math.sin(azimuth), math.cos(azimuth)])
    for f, polys in zip(standing, base_px):
        shift = canvas.shift_px(direction * 0.55 * f.attrs['height'])
        steps = 6 if f.kind == 'building' else 2
        for k in range(1, steps + 1):
            for pts in polys:
                draw.polygon((pts + shift * k / steps).ravel().tolist(), fill=255)
    shade = Image.eval(canvas.image, lambda v: int(v * 0.55))
    canvas.image.paste(shade, (0, 0), mask)


def _standing(canvas, f, base, roof, oblique):
    """Draw a building or tree; in oblique views extrude it away from the camera."""
    lift = 0.0
    if oblique:
        lift = f.attrs['height'] * 0.9 * canvas.view.tilt / canvas.mpp
    if f.kind == 'building' and lift > 0:
        wall = f.attrs['wall']
        steps = max(2, int(lift / 2))
        for k in range(steps + 1):
            shade = 0.75 + 0.25 * k / steps
            fill = tuple(int(v * shade) for v in wall)
            for pts in base:
                canvas.draw.polygon((pts - (0.0, lift * k / steps)).ravel().tolist(),
                                    fill=fill)
    elif f.kind == 'tree' and lift > 0:
        trunk = canvas.to_px(np.array([f.centre]))[0]
        canvas.draw.line([trunk[0], trunk[1], trunk[0], trunk[1] - lift * 0.6],
                         fill=(70, 56, 40), width=max(1, int(0.5 / canvas.mpp)))
        lift *= 0.6
    for s, pts in zip(f.shapes, roof):
        canvas.shape(s, pts - (0.0, lift))


def _sensor(image, view, rng):
    """Add gentle illumination variation and pixel noise, plus haze for oblique views."""
    arr = np.asarray(image, dtype=np.float32)
    size = view.size
    coarse = rng.normal(0.0, 1.0, (6, 6)).astype(np.float32)
    low = Image.fromarray(np.uint8(np.clip(128 + 40 * coarse, 0, 255)), 'L')
    low = np.asarray(low.resize((size, size), Image.Resampling.BICUBIC), np.float32)
    arr *= (1.0 + 0.06 * (low - 128.0) / 40.0)[:, :, None]
    # Luminance-only grain: looks like sensor noise and keeps the PNGs small.
    arr += rng.normal(0.0, 1.5, (size, size, 1)).astype(np.float32)
    if view.tilt > 0:
        rows = np.linspace(1.0, 0.0, size, dtype=np.float32) ** 2 * (0.9 * view.tilt)
        arr = arr * (1 - rows[:, None, None]) + np.float32([196, 206, 216]) * rows[:, None, None]
    return Image.fromarray(np.uint8(np.clip(np.rint(arr), 0, 255)), 'RGB')
