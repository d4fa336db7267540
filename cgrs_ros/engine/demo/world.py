"""Procedural layout of the demo town, in local East-North metres around the datum.

The town is a perturbed street grid (main roads with centre markings, side streets,
roundabouts) crossed by a meandering river with bridges; each street block gets a land use
(houses, offices, a park with a pond, sports grounds, a parking lot, a plaza) and is filled
with features. Every feature keeps the attributes it was drawn with (colour names, shapes,
sizes), so the descriptions are written from what is actually in the pictures.

Everything here is hand-written: no library lays out synthetic towns. All randomness comes
from one ``numpy.random.Generator`` so a seed fixes the world.
"""

from dataclasses import dataclass, field
import math

import numpy as np

# Roof colours by the name the descriptions use. Common house colours come first.
ROOF_COLOURS = {
    'red': (166, 58, 46),
    'orange': (203, 116, 64),
    'brown': (121, 84, 62),
    'light grey': (172, 172, 170),
    'dark grey': (82, 84, 88),
    'white': (236, 235, 230),
    'blue': (58, 100, 170),
    'green': (74, 128, 84),
    'yellow': (218, 188, 84),
    'black': (40, 40, 43),
}
HOUSE_ROOFS = ('red', 'orange', 'brown', 'dark grey', 'light grey', 'red', 'orange', 'black')
OFFICE_ROOFS = ('white', 'light grey', 'dark grey', 'blue', 'green', 'black', 'red', 'yellow')
CAR_COLOURS = ((235, 235, 235), (30, 30, 32), (160, 162, 168), (150, 30, 30), (40, 70, 140),
               (90, 92, 96), (200, 200, 205))
COURT_COLOURS = {'blue': (62, 104, 160), 'green': (70, 135, 90), 'orange clay': (190, 100, 60)}
PLAZA_PAVING = {'beige': (214, 200, 170), 'grey': (186, 186, 182), 'reddish': (190, 150, 130)}

GRASS = (112, 146, 80)
LAWN = (104, 150, 78)
GARDEN = (124, 150, 92)
PAVED = (158, 156, 150)
ASPHALT = (86, 87, 90)
SIDEWALK = (188, 186, 180)
MARKING = (236, 236, 228)
WATER = (58, 98, 118)
POND_WATER = (64, 112, 136)
BANK = (132, 128, 96)
PATH = (206, 192, 158)
POOL = (70, 170, 210)
TRACK_RED = (178, 84, 64)
PITCH_GREEN = (84, 150, 70)
TREE_GREENS = ((58, 92, 48), (66, 104, 52), (50, 84, 46), (78, 110, 58))

# Drawing layers; the renderer draws shapes in this order (buildings and trees separately,
# with shadows or extrusion).
L_GROUND, L_WATER, L_SIDEWALK, L_ROAD, L_MARK, L_CAR = 0, 1, 2, 3, 4, 5


@dataclass
class Shape:
    """One drawing primitive: a filled polygon or a polyline of a given width (metres)."""

    op: str               # 'poly' or 'line'
    pts: np.ndarray       # (N, 2) east/north metres
    fill: tuple
    layer: int
    width: float = 0.0    # line width in metres (lines only)


@dataclass
class Feature:
    """A thing in the world: what it is, how it is drawn, and what it looks like in words."""

    fid: int
    kind: str
    centre: tuple
    shapes: list
    attrs: dict = field(default_factory=dict)
    bbox: tuple = None
    # Places worth naming as a retrieval target (a distinctive building, a pond, ...).
    anchor: bool = False

    def __post_init__(self):
        if self.bbox is None:
            footprint = [np.asarray(p) for p in self.attrs.get('footprint', ())]
            pts = [s.pts for s in self.shapes] + footprint
            allpts = np.concatenate(pts)
            pad = max([s.width / 2 for s in self.shapes] + [0.0])
            self.bbox = (float(allpts[:, 0].min() - pad), float(allpts[:, 1].min() - pad),
                         float(allpts[:, 0].max() + pad), float(allpts[:, 1].max() + pad))

    @property
    def size(self):
        """Return the larger side of the bounding box in metres."""
        return max(self.bbox[2] - self.bbox[0], self.bbox[3] - self.bbox[1])


@dataclass
class World:
    """The whole town: features plus the river centre line for 'north of the river'."""

    side: float
    features: list
    river: np.ndarray
    river_width: float
    sun_azimuth_deg: float

    def __post_init__(self):
        self.bboxes = np.array([f.bbox for f in self.features], dtype=float)

    def in_box(self, e0, n0, e1, n1):
        """Return the features whose bounding box meets the box [e0, e1] x [n0, n1]."""
        b = self.bboxes
        hit = (b[:, 0] <= e1) & (b[:, 2] >= e0) & (b[:, 1] <= n1) & (b[:, 3] >= n0)
        return [self.features[i] for i in np.flatnonzero(hit)]


# ---- geometry helpers ------------------------------------------------------------------

def rect(cx, cy, w, h, angle=0.0):
    """Return the corners of a w x h rectangle centred at (cx, cy), rotated by angle rad."""
    c, s = math.cos(angle), math.sin(angle)
    corners = np.array([[-w / 2, -h / 2], [w / 2, -h / 2], [w / 2, h / 2], [-w / 2, h / 2]])
    rot = np.array([[c, -s], [s, c]])
    return corners @ rot.T + (cx, cy)


def ellipse(cx, cy, rx, ry, angle=0.0, n=40, wobble=None):
    """Return a polygon approximating an ellipse; ``wobble`` (per-vertex radius factors)."""
    t = np.linspace(0, 2 * math.pi, n, endpoint=False)
    r = np.ones(n) if wobble is None else wobble
    x, y = rx * r * np.cos(t), ry * r * np.sin(t)
    c, s = math.cos(angle), math.sin(angle)
    return np.stack([cx + c * x - s * y, cy + s * x + c * y], axis=1)


def point_polyline_distance(point, line):
    """Return (distance, closest point) from a point to a polyline, both in metres."""
    a, b = line[:-1], line[1:]
    ab = b - a
    t = np.clip(np.einsum('ij,ij->i', point - a, ab) / np.maximum(
        np.einsum('ij,ij->i', ab, ab), 1e-12), 0.0, 1.0)
    proj = a + t[:, None] * ab
    d = np.hypot(*(proj - point).T)
    i = int(np.argmin(d))
    return float(d[i]), proj[i]


def polyline_distances(points, line):
    """Return the distance (m) from each of (N, 2) points to a polyline, vectorised."""
    a, b = line[:-1], line[1:]
    ab = b - a
    length2 = np.maximum(np.einsum('ij,ij->i', ab, ab), 1e-12)
    rel = points[:, None, :] - a[None, :, :]
    t = np.clip(np.einsum('nij,ij->ni', rel, ab) / length2, 0.0, 1.0)
    proj = a[None] + t[..., None] * ab[None]
    return np.min(np.hypot(*(proj - points[:, None, :]).transpose(2, 0, 1)), axis=1)


def _segment_polyline_crossings(p, q, line):
    """Return the points where segment p-q crosses the polyline, ordered from p."""
    a, b = line[:-1], line[1:]
    r = q - p
    s = b - a
    denom = r[0] * s[:, 1] - r[1] * s[:, 0]
    ok = np.abs(denom) > 1e-12
    qp = a - p
    t = np.where(ok, (qp[:, 0] * s[:, 1] - qp[:, 1] * s[:, 0]) / np.where(ok, denom, 1), -1)
    u = np.where(ok, (qp[:, 0] * r[1] - qp[:, 1] * r[0]) / np.where(ok, denom, 1), -1)
    hit = ok & (t >= 0) & (t <= 1) & (u >= 0) & (u <= 1)
    return [p + t[i] * r for i in sorted(np.flatnonzero(hit), key=lambda i: t[i])]


def _dashes(p, q, dash, gap):
    """Split segment p-q into dash segments (for road centre markings)."""
    length = float(np.hypot(*(q - p)))
    out, pos = [], gap
    while pos + dash < length - gap:
        out.append(np.array([p + (q - p) * pos / length, p + (q - p) * (pos + dash) / length]))
        pos += dash + gap
    return out


# ---- the builder -----------------------------------------------------------------------

class _Builder:
    def __init__(self, rng, side):
        self.rng = rng
        self.side = side
        self.features = []

    def add(self, kind, centre, shapes, anchor=False, **attrs):
        feature = Feature(len(self.features), kind, (float(centre[0]), float(centre[1])),
                          shapes, attrs, anchor=anchor)
        self.features.append(feature)
        return feature

    def choice(self, options, p=None):
        return options[int(self.rng.choice(len(options), p=p))]

    def uniform(self, lo, hi):
        return float(self.rng.uniform(lo, hi))

    # -- river ----------------------------------------------------------------------------
    def river(self):
        half = self.side / 2 + 200.0
        x = np.linspace(-half, half, 160)
        amp = self.side * self.uniform(0.06, 0.1)
        phase = self.uniform(0, 2 * math.pi)
        wave = self.side / self.uniform(1.2, 1.8)
        offset = self.uniform(-0.15, 0.15) * self.side
        y = (offset + amp * np.sin(2 * math.pi * x / wave + phase)
             + 0.35 * amp * np.sin(2 * math.pi * x / (wave / 2.7) + 2 * phase))
        line = np.stack([x, y], axis=1)
        # Flowing roughly west-east or south-north, chosen by the seed.
        if self.rng.random() < 0.5:
            line = line[:, ::-1].copy()
        width = self.uniform(22.0, 30.0)
        shapes = [Shape('line', line, BANK, L_WATER, width + 8.0),
                  Shape('line', line, WATER, L_WATER, width)]
        self.add('river', (0.0, 0.0), shapes, width=width)
        return line, width

    # -- streets --------------------------------------------------------------------------
    def grid(self):
        half = self.side / 2 + 120.0

        def lines():
            pos = [-half]
            while pos[-1] < half:
                pos.append(pos[-1] + self.uniform(135.0, 190.0))
            return np.array(pos)

        return lines(), lines()

    def streets(self, xs, ys, river, river_width):
        rng = self.rng
        main_x = {i for i in range(len(xs)) if i % 3 == 1}
        main_y = {j for j in range(len(ys)) if j % 3 == 1}
        # Merge some neighbouring cells into superblocks by dropping the street between them.
        dropped = set()
        for i in range(1, len(xs) - 1):
            if i in main_x:
                continue
            for j in range(len(ys) - 1):
                if rng.random() < 0.12 and ('v', i - 1, j) not in dropped:
                    dropped.add(('v', i, j))
        segments = []
        for i, x in enumerate(xs):
            width = 13.0 if i in main_x else 8.0
            for j in range(len(ys) - 1):
                if ('v', i, j) not in dropped:
                    segments.append((np.array([x, ys[j]]), np.array([x, ys[j + 1]]), width,
                                     i in main_x))
        for j, y in enumerate(ys):
            width = 13.0 if j in main_y else 8.0
            for i in range(len(xs) - 1):
                segments.append((np.array([xs[i], y]), np.array([xs[i + 1], y]), width,
                                 j in main_y))
        for p, q, width, main in segments:
            length = float(np.hypot(*(q - p)))
            samples = p + (q - p) * np.linspace(0, 1, max(2, int(length / 5)))[:, None]
            wet = int(np.sum(polyline_distances(samples, river) < river_width / 2 + 2.0))
            if wet * length / len(samples) > 2.5 * river_width:
                # A street would run along the river bed here: leave it out.
                continue
            shapes = [Shape('line', np.array([p, q]), SIDEWALK, L_SIDEWALK, width + 5.0),
                      Shape('line', np.array([p, q]), ASPHALT, L_ROAD, width)]
            if main:
                shapes += [Shape('line', d, MARKING, L_MARK, 0.35)
                           for d in _dashes(p, q, 3.0, 6.0)]
            horizontal = abs(q[1] - p[1]) < 1e-9
            self.add('road', (p + q) / 2, shapes, width=width, main=main,
                     axis='east-west' if horizontal else 'north-south',
                     line=np.array([p, q]))
            for crossing in _segment_polyline_crossings(p, q, river):
                self.bridge(p, q, crossing, width, river_width)
        # Roundabouts at some full four-way junctions, well apart.
        placed = []
        for i in range(1, len(xs) - 1):
            for j in range(1, len(ys) - 1):
                if (('v', i, j) in dropped or ('v', i, j - 1) in dropped
                        or rng.random() > 0.22):
                    continue
                c = np.array([xs[i], ys[j]])
                if any(np.hypot(*(c - o)) < 320.0 for o in placed):
                    continue
                if point_polyline_distance(c, river)[0] < river_width + 40.0:
                    continue
                placed.append(c)
                self.roundabout(c, main=(i in main_x or j in main_y))
        return dropped

    def bridge(self, p, q, crossing, width, river_width):
        direction = (q - p) / np.hypot(*(q - p))
        normal = np.array([-direction[1], direction[0]])
        half_len = river_width / 2 + 8.0
        shapes = [Shape('poly', rect(crossing[0], crossing[1],
                                     *((2 * half_len, width + 3.0) if abs(direction[0]) > 0.5
                                       else (width + 3.0, 2 * half_len))), (120, 118, 112),
                        L_ROAD)]
        shapes.append(Shape('line', np.array([crossing - direction * half_len,
                                              crossing + direction * half_len]),
                            ASPHALT, L_ROAD, width))
        for sign in (-1, 1):
            edge = crossing + sign * normal * (width / 2 + 1.0)
            shapes.append(Shape('line', np.array([edge - direction * half_len,
                                                  edge + direction * half_len]),
                                (222, 220, 212), L_MARK, 0.8))
        self.add('bridge', crossing, shapes, anchor=True, width=width)

    def roundabout(self, c, main):
        radius = self.uniform(15.0, 19.0) if main else self.uniform(12.0, 15.0)
        island = radius - (8.0 if main else 6.5)
        centre_tree = self.rng.random() < 0.5
        shapes = [Shape('poly', ellipse(c[0], c[1], radius + 2.5, radius + 2.5), SIDEWALK,
                        L_SIDEWALK),
                  Shape('poly', ellipse(c[0], c[1], radius, radius), ASPHALT, L_ROAD),
                  Shape('poly', ellipse(c[0], c[1], island + 0.8, island + 0.8), MARKING,
                        L_MARK),
                  Shape('poly', ellipse(c[0], c[1], island, island), LAWN, L_MARK)]
        self.add('roundabout', c, shapes, anchor=True, radius=radius,
                 island='a tree' if centre_tree else 'grass')
        if centre_tree:
            self.tree(c[0], c[1], r=min(island - 0.5, self.uniform(3.5, 5.0)))

    # -- small things ---------------------------------------------------------------------
    def tree(self, x, y, r=None):
        r = r or self.uniform(2.2, 4.8)
        colour = self.choice(TREE_GREENS)
        wobble = 1.0 + 0.12 * self.rng.standard_normal(12)
        crown = ellipse(x, y, r, r, n=12, wobble=wobble)
        light = tuple(min(255, v + 22) for v in colour)
        shapes = [Shape('poly', crown, colour, 0),
                  Shape('poly', ellipse(x - 0.25 * r, y - 0.25 * r, 0.5 * r, 0.5 * r, n=10),
                        light, 0)]
        return self.add('tree', (x, y), shapes, radius=r, height=2.2 * r + 3.0)

    def trees_along(self, p, q, spacing, jitter=1.0):
        length = float(np.hypot(*(q - p)))
        for k in range(int(length // spacing) + 1):
            pt = p + (q - p) * (k * spacing / max(length, 1e-9))
            self.tree(pt[0] + self.uniform(-jitter, jitter), pt[1] + self.uniform(-jitter, jitter))

    def scatter_trees(self, box, count, avoid=()):
        x0, y0, x1, y1 = box
        if x1 <= x0 or y1 <= y0:
            return
        for _ in range(count):
            x, y = self.uniform(x0, x1), self.uniform(y0, y1)
            if any(b[0] - 3 <= x <= b[2] + 3 and b[1] - 3 <= y <= b[3] + 3 for b in avoid):
                continue
            self.tree(x, y)

    def ground(self, box, colour, kind='ground', **attrs):
        x0, y0, x1, y1 = box
        poly = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]])
        return self.add(kind, ((x0 + x1) / 2, (y0 + y1) / 2),
                        [Shape('poly', poly, colour, L_GROUND)], **attrs)

    def cars(self, stalls, fill):
        """Park cars in some of the stall rectangles (centre, angle); return how many."""
        n = 0
        for (cx, cy, angle) in stalls:
            if self.rng.random() < fill:
                colour = self.choice(CAR_COLOURS)
                self.add('car', (cx, cy), [Shape('poly', rect(cx, cy, 4.4, 1.9, angle), colour,
                                                 L_CAR)])
                n += 1
        return n

    # -- buildings ------------------------------------------------------------------------
    def building(self, box, shape, colour, roof='flat', height=None, anchor=True,
                 solar=False, use='building'):
        """Draw a building of the given shape filling ``box`` (x0, y0, x1, y1)."""
        x0, y0, x1, y1 = box
        w, h = x1 - x0, y1 - y0
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        rgb = ROOF_COLOURS[colour]
        edge = tuple(int(v * 0.78) for v in rgb)
        height = height or self.uniform(7.0, 22.0)
        shapes, footprint, holes = [], [], []
        if shape == 'circular':
            r = min(w, h) / 2
            outer = ellipse(cx, cy, r, r, n=48)
            footprint = [outer]
            shapes = [Shape('poly', outer, edge, 0),
                      Shape('poly', ellipse(cx, cy, r - 1.2, r - 1.2, n=48), rgb, 0),
                      Shape('poly', ellipse(cx, cy, 0.45 * r, 0.45 * r, n=40),
                            tuple(min(255, int(v * 1.12) + 8) for v in rgb), 0)]
        elif shape == 'courtyard':
            ring = max(7.0, 0.28 * min(w, h))
            outer = rect(cx, cy, w, h)
            inner = rect(cx, cy, w - 2 * ring, h - 2 * ring)
            footprint, holes = [outer], [inner]
            yard = self.choice((LAWN, PAVED))
            shapes = [Shape('poly', outer, edge, 0),
                      Shape('poly', rect(cx, cy, w - 2.0, h - 2.0), rgb, 0),
                      Shape('poly', rect(cx, cy, w - 2 * ring + 2.0, h - 2 * ring + 2.0),
                            edge, 0),
                      Shape('poly', inner, yard, 0)]
        elif shape == 'L-shaped':
            arm_w = max(7.0, 0.42 * w)
            arm_h = max(7.0, 0.42 * h)
            # Which corner the L wraps around; the open corner faces that direction.
            corner = int(self.rng.integers(4))
            sx = -1 if corner in (0, 3) else 1
            sy = -1 if corner in (0, 1) else 1
            vert = rect(cx + sx * (w - arm_w) / 2, cy, arm_w, h)
            hori = rect(cx, cy + sy * (h - arm_h) / 2, w, arm_h)
            footprint = [vert, hori]
            for part in footprint:
                shapes.append(Shape('poly', part, edge, 0))
            shapes += self._roof_parts([(cx + sx * (w - arm_w) / 2, cy, arm_w, h),
                                        (cx, cy + sy * (h - arm_h) / 2, w, arm_h)], rgb, roof)
        else:
            outer = rect(cx, cy, w, h)
            footprint = [outer]
            shapes = [Shape('poly', outer, edge, 0)]
            shapes += self._roof_parts([(cx, cy, w, h)], rgb, roof)
        if roof == 'flat' and shape != 'circular' and not solar:
            # Rooftop plant boxes make flat roofs read as roofs.
            for _ in range(int(self.rng.integers(1, 4))):
                bw, bh = self.uniform(1.5, 3.5), self.uniform(1.5, 3.0)
                px = self.uniform(x0 + 2 + bw, x1 - 2 - bw)
                py = self.uniform(y0 + 2 + bh, y1 - 2 - bh)
                if shape == 'courtyard' and abs(px - cx) < w / 2 - ring and \
                        abs(py - cy) < h / 2 - ring:
                    continue
                shapes.append(Shape('poly', rect(px, py, bw, bh), (140, 140, 138), 0))
        if solar:
            sw, sh = 1.7, 1.0
            fx0, fx1 = x0 + 3, (x1 - 3) if shape == 'rectangular' else cx
            fy0, fy1 = y0 + 3, (y1 - 3) if shape == 'rectangular' else cy
            for px in np.arange(fx0, fx1 - sw, sw + 0.4):
                for py in np.arange(fy0, fy1 - sh, sh + 0.8):
                    shapes.append(Shape('poly', rect(px + sw / 2, py + sh / 2, sw, sh),
                                        (34, 46, 86), 0))
        area = sum(abs(_area(p)) for p in footprint) - sum(abs(_area(p)) for p in holes)
        if shape == 'L-shaped':
            overlap = (max(7.0, 0.42 * w)) * (max(7.0, 0.42 * h))
            area -= overlap
        size = 'small' if area < 250 else ('large' if area > 1400 else 'medium')
        return self.add('building', (cx, cy), shapes, anchor=anchor, shape=shape,
                        colour=colour, roof=roof, height=height, footprint=footprint,
                        holes=holes, size=size, solar=solar, use=use,
                        wall=tuple(int(v * 0.62) + 30 for v in (200, 196, 186)))

    def _roof_parts(self, parts, rgb, roof):
        shapes = []
        for (cx, cy, w, h) in parts:
            if roof == 'gabled':
                # Two roof planes either side of a ridge along the long side: one lit, one not.
                lit = tuple(min(255, int(v * 1.1) + 6) for v in rgb)
                dark = tuple(int(v * 0.8) for v in rgb)
                if w >= h:
                    shapes.append(Shape('poly', rect(cx, cy + h / 4, w - 0.8, h / 2 - 0.4), lit,
                                        0))
                    shapes.append(Shape('poly', rect(cx, cy - h / 4, w - 0.8, h / 2 - 0.4), dark,
                                        0))
                    shapes.append(Shape('line', np.array([[cx - w / 2 + 0.4, cy],
                                                          [cx + w / 2 - 0.4, cy]]),
                                        tuple(int(v * 0.65) for v in rgb), 0, 0.4))
                else:
                    shapes.append(Shape('poly', rect(cx - w / 4, cy, w / 2 - 0.4, h - 0.8), lit,
                                        0))
                    shapes.append(Shape('poly', rect(cx + w / 4, cy, w / 2 - 0.4, h - 0.8), dark,
                                        0))
                    shapes.append(Shape('line', np.array([[cx, cy - h / 2 + 0.4],
                                                          [cx, cy + h / 2 - 0.4]]),
                                        tuple(int(v * 0.65) for v in rgb), 0, 0.4))
            else:
                shapes.append(Shape('poly', rect(cx, cy, w - 1.6, h - 1.6), rgb, 0))
        return shapes

    # -- land uses --------------------------------------------------------------------------
    def residential(self, box):
        x0, y0, x1, y1 = box
        self.ground(box, GARDEN, kind='gardens')
        occupied = []
        for edge in ('south', 'north'):
            x = x0 + 2.0
            while x < x1 - 14.0:
                lot = self.uniform(17.0, 24.0)
                if x + lot > x1:
                    break
                hw, hh = self.uniform(9.0, min(14.0, lot - 4)), self.uniform(8.0, 12.0)
                hx = x + lot / 2
                hy = (y0 + 5.0 + hh / 2) if edge == 'south' else (y1 - 5.0 - hh / 2)
                shape = 'L-shaped' if self.rng.random() < 0.22 else 'rectangular'
                colour = self.choice(HOUSE_ROOFS)
                if self.rng.random() < 0.08:
                    colour = self.choice(('blue', 'green', 'yellow', 'white'))
                house = (hx - hw / 2, hy - hh / 2, hx + hw / 2, hy + hh / 2)
                pool = self.rng.random() < 0.14 and (y1 - y0) > 60
                feature = self.building(house, shape, colour, roof='gabled',
                                        height=self.uniform(6.0, 10.0), anchor=False,
                                        use='house')
                occupied.append(house)
                if pool:
                    py = hy + (hh / 2 + 6.0) * (1 if edge == 'south' else -1)
                    pw, ph = self.uniform(4.0, 7.0), self.uniform(3.0, 4.5)
                    self.add('pool', (hx, py), [
                        Shape('poly', rect(hx, py, pw + 1.2, ph + 1.2), (226, 222, 210),
                              L_MARK),
                        Shape('poly', rect(hx, py, pw, ph), POOL, L_MARK)])
                    occupied.append((hx - pw, py - ph, hx + pw, py + ph))
                    feature.attrs['pool'] = True
                    feature.anchor = True
                elif colour in ('blue', 'green', 'yellow', 'white') or shape == 'L-shaped':
                    # Unusual houses are worth naming as places too.
                    feature.anchor = self.rng.random() < 0.6
                x += lot
        self.scatter_trees((x0 + 3, y0 + 3, x1 - 3, y1 - 3), int((x1 - x0) * (y1 - y0) / 500),
                           avoid=occupied)

    def offices(self, box):
        x0, y0, x1, y1 = box
        self.ground(box, PAVED, kind='paving')
        w, h = x1 - x0, y1 - y0
        # Split along the long side: building parcel(s) and a parking parcel.
        along_x = w >= h
        n = int(self.rng.integers(2, 4))
        cuts = np.sort(self.rng.uniform(0.3, 0.7, n - 1)) if n > 2 else np.array([0.55])
        edges = np.concatenate([[0.0], cuts, [1.0]])
        uses = ['building'] * (len(edges) - 1)
        uses[int(self.rng.integers(len(uses)))] = self.choice(('parking', 'lawn', 'building'))
        occupied = []
        for k, use in enumerate(uses):
            if along_x:
                sub = (x0 + w * edges[k], y0, x0 + w * edges[k + 1], y1)
            else:
                sub = (x0, y0 + h * edges[k], x1, y0 + h * edges[k + 1])
            sub = (sub[0] + 4, sub[1] + 4, sub[2] - 4, sub[3] - 4)
            sw, sh = sub[2] - sub[0], sub[3] - sub[1]
            if sw < 20 or sh < 20:
                continue
            if use == 'parking':
                self.parking_lot(sub)
            elif use == 'lawn':
                self.ground(sub, LAWN, kind='lawn')
                self.scatter_trees(sub, int(sw * sh / 220))
            else:
                shape = self.choice(('rectangular', 'L-shaped', 'courtyard', 'circular',
                                     'rectangular', 'L-shaped'))
                if shape == 'courtyard' and min(sw, sh) < 40:
                    shape = 'rectangular'
                bw = min(sw, self.uniform(28.0, 70.0))
                bh = min(sh, self.uniform(24.0, 60.0))
                if shape == 'circular':
                    bw = bh = min(bw, bh, self.uniform(24.0, 50.0))
                bx = self.uniform(sub[0] + bw / 2, sub[2] - bw / 2)
                by = self.uniform(sub[1] + bh / 2, sub[3] - bh / 2)
                b = (bx - bw / 2, by - bh / 2, bx + bw / 2, by + bh / 2)
                self.building(b, shape, self.choice(OFFICE_ROOFS),
                              solar=shape in ('rectangular', 'L-shaped')
                              and self.rng.random() < 0.25)
                occupied.append(b)
                self.trees_along(np.array([sub[0], sub[1] - 1]), np.array([sub[2], sub[1] - 1]),
                                 self.uniform(9.0, 14.0))
        return occupied

    def parking_lot(self, box, anchor=True):
        x0, y0, x1, y1 = box
        # Lots are kept to a size one satellite tile can show; the rest is a planted strip.
        if x1 - x0 > 90.0:
            self.ground((x0 + 90.0, y0, x1, y1), LAWN, kind='lawn')
            self.scatter_trees((x0 + 93.0, y0 + 3, x1 - 3, y1 - 3),
                               int((x1 - x0 - 90) * (y1 - y0) / 250))
            x1 = x0 + 90.0
        if y1 - y0 > 90.0:
            self.ground((x0, y0 + 90.0, x1, y1), LAWN, kind='lawn')
            self.scatter_trees((x0 + 3, y0 + 93.0, x1 - 3, y1 - 3),
                               int((x1 - x0) * (y1 - y0 - 90) / 250))
            y1 = y0 + 90.0
        w, h = x1 - x0, y1 - y0
        shapes = [Shape('poly', rect((x0 + x1) / 2, (y0 + y1) / 2, w, h), (100, 101, 104),
                        L_ROAD)]
        stalls = []
        along_x = w >= h
        span, depth = (w, h) if along_x else (h, w)
        # Double rows of 5 m stalls, 2.6 m wide, with 6 m aisles.
        rows = max(1, int((depth - 4) // 16))
        n = int((span - 4) // 2.6)
        for r in range(rows):
            base = 4 + r * 16
            for k in range(n + 1):
                # One divider line serves both stalls of a double row.
                at = 2 + k * 2.6
                pts = np.array([[at, base], [at, base + 10.0]])
                if along_x:
                    pts = pts + (x0, y0)
                else:
                    pts = pts[:, ::-1] + (x0, y0)
                shapes.append(Shape('line', pts, (210, 210, 204), L_MARK, 0.3))
            for off in (base + 2.5, base + 7.5):
                for k in range(n):
                    a = 2 + k * 2.6 + 1.3
                    if along_x:
                        stalls.append((x0 + a, y0 + off, math.pi / 2))
                    else:
                        stalls.append((x0 + off, y0 + a, 0.0))
        fill = self.choice((0.15, 0.45, 0.8))
        lot = self.add('parking', ((x0 + x1) / 2, (y0 + y1) / 2), shapes, anchor=anchor,
                       capacity=len(stalls))
        lot.attrs['cars'] = self.cars(stalls, fill)
        return lot

    def retail(self, box):
        """Lay out a big-box store with its parking lot (and a row of trees between)."""
        x0, y0, x1, y1 = box
        w, h = x1 - x0, y1 - y0
        split = self.uniform(0.4, 0.55)
        store_first = self.rng.random() < 0.5
        if w >= h:
            cut = x0 + w * (split if store_first else 1 - split)
            store, lot = ((x0 + 3, y0 + 3, cut - 3, y1 - 3), (cut + 3, y0, x1, y1))
            if not store_first:
                store, lot = (cut + 3, y0 + 3, x1 - 3, y1 - 3), (x0, y0, cut - 3, y1)
        else:
            cut = y0 + h * (split if store_first else 1 - split)
            store, lot = ((x0 + 3, y0 + 3, x1 - 3, cut - 3), (x0, cut + 3, x1, y1))
            if not store_first:
                store, lot = (x0 + 3, cut + 3, x1 - 3, y1 - 3), (x0, y0, x1, cut - 3)
        self.ground(box, PAVED, kind='paving')
        sw, sh = store[2] - store[0], store[3] - store[1]
        bw, bh = min(sw, self.uniform(40, 80)), min(sh, self.uniform(35, 70))
        bx, by = (store[0] + store[2]) / 2, (store[1] + store[3]) / 2
        self.building((bx - bw / 2, by - bh / 2, bx + bw / 2, by + bh / 2), 'rectangular',
                      self.choice(('white', 'light grey', 'dark grey', 'blue', 'red')),
                      height=self.uniform(7.0, 11.0), solar=self.rng.random() < 0.3,
                      use='store')
        self.parking_lot(lot)

    def park(self, box, pond=True):
        x0, y0, x1, y1 = box
        self.ground(box, GRASS, kind='park')
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        w, h = x1 - x0, y1 - y0
        avoid = []
        if pond and min(w, h) > 50:
            rx = self.uniform(0.15, 0.3) * w
            ry = self.uniform(0.15, 0.3) * h
            px = cx + self.uniform(-0.15, 0.15) * w
            py = cy + self.uniform(-0.15, 0.15) * h
            kind = self.choice(('round', 'oval', 'irregular'))
            if kind == 'round':
                ry = rx = min(rx, ry)
            wobble = None
            if kind == 'irregular':
                wobble = 1.0 + 0.2 * np.sin(np.linspace(0, 2 * math.pi, 40, endpoint=False)
                                            * int(self.rng.integers(2, 4))
                                            + self.uniform(0, 6))
            angle = self.uniform(0, math.pi) if kind != 'round' else 0.0
            island = kind != 'round' and self.rng.random() < 0.3 and min(rx, ry) > 14
            shapes = [Shape('poly', ellipse(px, py, rx + 2.0, ry + 2.0, angle, wobble=wobble),
                            BANK, L_WATER),
                      Shape('poly', ellipse(px, py, rx, ry, angle, wobble=wobble), POND_WATER,
                            L_WATER)]
            if island:
                shapes.append(Shape('poly', ellipse(px, py, 0.25 * rx, 0.25 * ry, angle),
                                    GRASS, L_WATER))
            self.add('pond', (px, py), shapes, anchor=True, shape=kind,
                     size='large' if rx * ry > 700 else 'small', island=island,
                     radius=max(rx, ry))
            if island:
                self.tree(px, py, r=min(0.2 * min(rx, ry), 4.0))
            avoid.append((px - rx - 4, py - ry - 4, px + rx + 4, py + ry + 4))
        # A path crossing the park, bending round the pond.
        path = np.array([[x0, y0 + self.uniform(0.2, 0.8) * h], [cx, y1 - 6.0],
                         [x1, y0 + self.uniform(0.2, 0.8) * h]])
        self.add('path', (cx, cy), [Shape('line', path, PATH, L_SIDEWALK, 3.0)])
        self.scatter_trees((x0 + 3, y0 + 3, x1 - 3, y1 - 3), int(w * h / 180), avoid=avoid)

    def sports(self, box):
        x0, y0, x1, y1 = box
        self.ground(box, GRASS, kind='sports ground')
        w, h = x1 - x0, y1 - y0
        along_x = w >= h
        pl, pw = (min(72.0, w - 40.0), min(46.0, h - 16.0)) if along_x else \
            (min(72.0, h - 40.0), min(46.0, w - 16.0))
        if pl < 40 or pw < 25:
            self.courts(box)
            return
        long_side = w if along_x else h
        track = (self.rng.random() < 0.5 and pw + 10 < (h if along_x else w) - 6
                 and pl + pw + 10 < long_side - 8)
        # Length the pitch (with its track, if any) takes along the block.
        span = pl + (pw + 10 if track else 16)
        px = x0 + 4 + span / 2 if along_x else (x0 + x1) / 2
        py = (y0 + y1) / 2 if along_x else y0 + 4 + span / 2
        a = 0.0 if along_x else math.pi / 2
        shapes = []
        if track:
            tw = pw + 10.0
            stadium = _stadium(px, py, pl + tw, tw, a)
            inner = _stadium(px, py, pl + tw - 8.0, tw - 8.0, a)
            shapes += [Shape('poly', stadium, TRACK_RED, L_ROAD),
                       Shape('poly', inner, PITCH_GREEN, L_ROAD)]
        lw, lh = (pl, pw) if along_x else (pw, pl)
        shapes += [Shape('poly', rect(px, py, lw, lh), PITCH_GREEN, L_ROAD),
                   Shape('poly', rect(px, py, lw, lh), MARKING, L_MARK)]
        shapes += [Shape('poly', rect(px, py, lw - 1.0, lh - 1.0), (92, 158, 76), L_MARK)]
        # Halfway line, centre circle and both penalty boxes.
        if along_x:
            shapes.append(Shape('line', np.array([[px, py - lh / 2], [px, py + lh / 2]]),
                                MARKING, L_MARK, 0.5))
        else:
            shapes.append(Shape('line', np.array([[px - lw / 2, py], [px + lw / 2, py]]),
                                MARKING, L_MARK, 0.5))
        circle = ellipse(px, py, 7.0, 7.0)
        shapes.append(Shape('line', np.vstack([circle, circle[:1]]), MARKING, L_MARK, 0.5))
        for sign in (-1, 1):
            if along_x:
                box_pts = rect(px + sign * (lw / 2 - 6.5), py, 13, 30)
            else:
                box_pts = rect(px, py + sign * (lh / 2 - 6.5), 30, 13)
            shapes.append(Shape('line', np.vstack([box_pts, box_pts[:1]]), MARKING, L_MARK,
                                0.5))
        self.add('football pitch', (px, py), shapes, anchor=True, track=track,
                 axis='east-west' if along_x else 'north-south')
        # Tennis courts or a clubhouse in the rest of the block.
        rest = (x0 + span + 8, y0, x1, y1) if along_x else (x0, y0 + span + 8, x1, y1)
        if (rest[2] - rest[0]) > 22 and (rest[3] - rest[1]) > 22:
            self.courts(rest)

    def courts(self, box):
        x0, y0, x1, y1 = box
        colour = self.choice(tuple(COURT_COLOURS))
        rgb = COURT_COLOURS[colour]
        cw, ch = 18.0, 36.0  # tennis court with run-off
        along_x = (x1 - x0) >= (y1 - y0)
        if along_x:
            n = int(min(4, (x1 - x0 - 4) // (cw + 2)))
        else:
            n = int(min(4, (y1 - y0 - 4) // (cw + 2)))
        if n < 1 or min(x1 - x0, y1 - y0) < ch + 2:
            self.scatter_trees(box, int((x1 - x0) * (y1 - y0) / 300))
            return
        shapes = []
        centres = []
        for k in range(n):
            if along_x:
                cx, cy, w, h = x0 + 3 + cw / 2 + k * (cw + 2), (y0 + y1) / 2, cw, ch
            else:
                cx, cy, w, h = (x0 + x1) / 2, y0 + 3 + cw / 2 + k * (cw + 2), ch, cw
            centres.append((cx, cy))
            shapes += [Shape('poly', rect(cx, cy, w, h), rgb, L_ROAD),
                       Shape('poly', rect(cx, cy, w - 6, h - 12 if h > w else h - 6), MARKING,
                             L_MARK),
                       Shape('poly', rect(cx, cy, w - 6.6, (h - 12.6) if h > w else h - 6.6),
                             rgb, L_MARK)]
            if h > w:
                shapes.append(Shape('line', np.array([[cx - w / 2 + 2, cy], [cx + w / 2 - 2, cy]]),
                                    (240, 240, 240), L_MARK, 0.5))
            else:
                shapes.append(Shape('line', np.array([[cx, cy - h / 2 + 2], [cx, cy + h / 2 - 2]]),
                                    (240, 240, 240), L_MARK, 0.5))
        c = np.mean(np.array(centres), axis=0)
        self.add('tennis courts', c, shapes, anchor=True, count=n, colour=colour)

    def plaza(self, box):
        x0, y0, x1, y1 = box
        w, h = x1 - x0, y1 - y0
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        self.ground(box, GARDEN, kind='gardens')
        paving = self.choice(tuple(PLAZA_PAVING))
        rgb = PLAZA_PAVING[paving]
        form = self.choice(('square', 'circular'))
        side = min(w, h) * self.uniform(0.55, 0.7)
        if form == 'circular':
            outline = ellipse(cx, cy, side / 2, side / 2, n=56)
        else:
            outline = rect(cx, cy, side, side)
        shapes = [Shape('poly', outline, rgb, L_SIDEWALK)]
        # Paving pattern lines make it read as a paved square rather than bare ground.
        grid = tuple(int(v * 0.9) for v in rgb)
        for k in np.arange(-side / 2 + 6, side / 2 - 3, 6.0):
            half = side / 2 if form == 'square' else math.sqrt(max(side ** 2 / 4 - k ** 2, 0))
            shapes.append(Shape('line', np.array([[cx + k, cy - half], [cx + k, cy + half]]),
                                grid, L_SIDEWALK, 0.3))
            shapes.append(Shape('line', np.array([[cx - half, cy + k], [cx + half, cy + k]]),
                                grid, L_SIDEWALK, 0.3))
        centre = self.choice(('fountain', 'statue', 'trees'))
        if centre == 'fountain':
            r = self.uniform(5.0, 8.0)
            shapes += [Shape('poly', ellipse(cx, cy, r + 1.0, r + 1.0), (230, 228, 220), L_MARK),
                       Shape('poly', ellipse(cx, cy, r, r), POOL, L_MARK),
                       Shape('poly', ellipse(cx, cy, 1.2, 1.2), (235, 240, 245), L_MARK)]
        elif centre == 'statue':
            shapes += [Shape('poly', rect(cx, cy, 5.0, 5.0), (120, 116, 108), L_MARK),
                       Shape('poly', ellipse(cx, cy, 1.3, 1.3), (60, 60, 58), L_MARK)]
        self.add('plaza', (cx, cy), shapes, anchor=True, form=form, paving=paving,
                 middle=centre)
        if centre == 'trees':
            for dx in (-1, 1):
                for dy in (-1, 1):
                    self.tree(cx + dx * side / 6, cy + dy * side / 6)
        # Trees around the square, and a civic building on one side when there is room.
        ring = side / 2 + 5.0
        for k in range(int(2 * math.pi * ring / 11.0)):
            t = 2 * math.pi * k / int(2 * math.pi * ring / 11.0)
            if form == 'circular':
                self.tree(cx + ring * math.cos(t), cy + ring * math.sin(t))
        free = h - side - 10
        if free > 30:
            by1 = y1 - 3
            by0 = max(cy + side / 2 + 8, by1 - 30)
            if by1 - by0 > 12:
                self.building((cx - side / 2, by0, cx + side / 2, by1), 'rectangular',
                              self.choice(OFFICE_ROOFS), anchor=False, use='building')

    def campus(self, box):
        x0, y0, x1, y1 = box
        self.ground(box, LAWN, kind='lawn')
        w, h = x1 - x0, y1 - y0
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        shape = self.choice(('courtyard', 'circular', 'L-shaped'))
        bw, bh = min(w - 30, self.uniform(50, 80)), min(h - 30, self.uniform(45, 70))
        if shape == 'circular':
            bw = bh = min(bw, bh)
        b = (cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2)
        self.building(b, shape, self.choice(OFFICE_ROOFS), height=self.uniform(12, 28))
        self.scatter_trees((x0 + 3, y0 + 3, x1 - 3, y1 - 3), int(w * h / 260), avoid=[b])


def _area(poly):
    x, y = poly[:, 0], poly[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


def _stadium(cx, cy, length, width, angle):
    """Return a running-track outline: a rectangle with semicircular ends."""
    r = width / 2
    straight = length - width
    t1 = np.linspace(-math.pi / 2, math.pi / 2, 20)
    t2 = np.linspace(math.pi / 2, 3 * math.pi / 2, 20)
    right = np.stack([straight / 2 + r * np.cos(t1), r * np.sin(t1)], axis=1)
    left = np.stack([-straight / 2 + r * np.cos(t2), r * np.sin(t2)], axis=1)
    pts = np.vstack([right, left])
    c, s = math.cos(angle), math.sin(angle)
    return pts @ np.array([[c, -s], [s, c]]).T + (cx, cy)


LAND_USES = ('residential', 'offices', 'park', 'sports', 'parking', 'plaza', 'campus')


def build_world(rng, side):
    """Lay out a town of ``side`` x ``side`` metres centred on the datum."""
    b = _Builder(rng, side)
    river, river_width = b.river()
    xs, ys = b.grid()
    dropped = b.streets(xs, ys, river, river_width)
    blocks = []
    for i in range(len(xs) - 1):
        j = 0
        while j < len(ys) - 1:
            blocks.append((i, j))
            j += 1
    # Merge cells across dropped vertical streets into one block.
    merged = {}
    for i, j in blocks:
        root = i
        while ('v', root, j) in dropped:
            root -= 1
        merged.setdefault((root, j), []).append(i)
    rects = []
    for (root, j), cols in sorted(merged.items()):
        i_max = max(cols)
        x0, x1 = xs[root], xs[i_max + 1]
        y0, y1 = ys[j], ys[j + 1]
        rects.append((x0 + 9.5, y0 + 9.5, x1 - 9.5, y1 - 9.5))
    # Land uses: the rare kinds get a guaranteed share, the rest is mostly houses and offices.
    order = rng.permutation(len(rects))
    quota = ['sports', 'parking', 'plaza', 'park', 'campus', 'offices']
    uses = {}
    for k, idx in enumerate(order):
        if k < len(quota) * max(1, len(rects) // 22):
            uses[int(idx)] = quota[k % len(quota)]
        else:
            uses[int(idx)] = LAND_USES[int(rng.choice(len(LAND_USES),
                                                      p=[0.42, 0.26, 0.08, 0.06, 0.07, 0.05,
                                                         0.06]))]
    for idx, box in enumerate(rects):
        use = uses[idx]
        centre = np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2])
        half_diag = math.hypot(box[2] - box[0], box[3] - box[1]) / 2
        dist, _ = point_polyline_distance(centre, river)
        if dist < half_diag + river_width / 2 + 4:
            # The river runs through this block: leave it as a riverside park.
            b.ground(box, GRASS, kind='riverside park')
            b.scatter_trees(box, int((box[2] - box[0]) * (box[3] - box[1]) / 400),
                            avoid=[])
            continue
        getattr(b, {'residential': 'residential', 'offices': 'offices', 'park': 'park',
                    'sports': 'sports', 'parking': 'retail', 'plaza': 'plaza',
                    'campus': 'campus'}[use])(box)
    # Trees may have been scattered over the river: drop those.
    trees = [f for f in b.features if f.kind == 'tree']
    dist = polyline_distances(np.array([f.centre for f in trees]), river)
    wet = {f.fid for f, d in zip(trees, dist) if d < river_width / 2 + 5 + f.attrs['radius']}
    keep = [f for f in b.features if f.fid not in wet]
    for k, f in enumerate(keep):
        f.fid = k
    return World(side=side, features=keep, river=river, river_width=river_width,
                 sun_azimuth_deg=float(rng.uniform(140.0, 220.0)))
