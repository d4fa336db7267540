"""Words for what was drawn: three descriptions per image and held-out queries per place.

Descriptions are built from the features that are actually inside an image's footprint and
the attributes they were drawn with. Queries use other templates and synonyms (the
'query' register), so evaluating with them does not reward copying the manifest text.
Satellite descriptions place things by compass direction (tiles are north-up); drone
descriptions use the image's left/right/foreground/background, as a person looking at the
rotated photo would.
"""

from dataclasses import dataclass
import math

from cgrs_ros.engine.demo.render import points_in_view
from cgrs_ros.engine.demo.world import point_polyline_distance
import numpy as np

COMPASS8 = ('north', 'north-east', 'east', 'south-east', 'south', 'south-west', 'west',
            'north-west')

# Canonical words (descriptions) and their held-out synonyms (queries).
COLOUR_WORDS = {
    'red': ('red', ('reddish', 'brick-red')),
    'orange': ('orange', ('terracotta', 'clay-coloured')),
    'brown': ('brown', ('brownish', 'chocolate-brown')),
    'light grey': ('light grey', ('pale gray', 'silver-gray')),
    'dark grey': ('dark grey', ('charcoal', 'slate-gray')),
    'white': ('white', ('off-white', 'whitish')),
    'blue': ('blue', ('bluish', 'navy')),
    'green': ('green', ('greenish', 'moss-green')),
    'yellow': ('yellow', ('yellowish', 'mustard')),
    'black': ('black', ('jet-black', 'blackish')),
}
SHAPE_WORDS = {
    'rectangular': (('rectangular', 'box-like'), ('oblong', 'rectangular')),
    'L-shaped': (('L-shaped',), ('L-shaped', 'shaped like the letter L', 'two-winged')),
    'circular': (('circular', 'round'), ('cylindrical', 'round')),
    'courtyard': (('courtyard',), ('hollow-square', 'atrium')),
}
NOUNS = {
    # kind: (description nouns, query nouns)
    'house': (('house', 'home', 'detached house'), ('residence', 'cottage', 'dwelling')),
    'building': (('building', 'office building', 'block'), ('structure', 'office block')),
    'store': (('store', 'supermarket', 'large shop'), ('retail warehouse', 'big-box shop')),
    'parking': (('parking lot', 'car park'), ('parking area', 'lot for cars')),
    'pond': (('pond',), ('small lake', 'pool of water', 'lake')),
    'roundabout': (('roundabout',), ('traffic circle', 'rotary')),
    'bridge': (('bridge', 'road bridge'), ('river crossing', 'crossing')),
    'football pitch': (('football pitch', 'football field'), ('soccer field', 'soccer pitch')),
    'tennis courts': (('tennis courts',), ('tennis facility', 'tennis club courts')),
    'plaza': (('plaza', 'pedestrian plaza'), ('town square', 'piazza', 'public square')),
    'river': (('the river',), ('the stream', 'the waterway', 'the canal')),
}
NUMBER_WORDS = {1: 'one', 2: 'two', 3: 'three', 4: 'four', 5: 'five'}


@dataclass
class Relation:
    """A visible neighbour of the anchor: what, how far (m), and which way."""

    kind: str
    feature: object
    distance: float
    bearing_deg: float      # compass bearing from the anchor to the neighbour
    local: tuple            # (right, forward) metres in the view, from the anchor


def _bearing(vec):
    return math.degrees(math.atan2(vec[0], vec[1])) % 360.0


def compass(bearing_deg):
    """Return the 8-way compass word of a bearing in degrees."""
    return COMPASS8[int(round(bearing_deg / 45.0)) % 8]


def _samples(feature):
    """Return points standing for a feature when testing what an image shows."""
    pts = [np.array([feature.centre])]
    for s in feature.shapes[:3]:
        if s.op == 'line':
            seg = s.pts
            for a, b in zip(seg[:-1], seg[1:]):
                k = max(2, int(np.hypot(*(b - a)) / 4.0))
                pts.append(a + (b - a) * np.linspace(0, 1, k)[:, None])
        else:
            pts.append(s.pts)
    return np.concatenate(pts)


def visible_relations(world, view, anchor):
    """Return the features shown in ``view`` around ``anchor``, nearest first."""
    poly = view.footprint_polygon()
    e0, n0 = poly.min(axis=0)
    e1, n1 = poly.max(axis=0)
    right, forward = view.axes
    a_centre = np.array(anchor.centre)
    a_radius = anchor.size / 2
    out = []
    for f in world.in_box(e0, n0, e1, n1):
        if f is anchor or f.kind in ('car', 'ground', 'gardens', 'paving', 'lawn', 'park',
                                     'sports ground', 'riverside park'):
            continue
        if f.kind == 'tree' or f.kind == 'building' or f.kind == 'pool':
            pts = np.array([f.centre])
        else:
            pts = _samples(f)
        inside = points_in_view(view, pts, margin=2.0)
        if not inside.any():
            continue
        pts = pts[inside]
        d = np.hypot(*(pts - a_centre).T)
        k = int(np.argmin(d))
        vec = pts[k] - a_centre
        if f.kind in ('road', 'river'):
            dist = max(0.0, float(d[k]) - a_radius)
        else:
            dist = max(0.0, float(np.hypot(*(np.array(f.centre) - a_centre))) - a_radius
                       - f.size / 2)
        out.append(Relation(f.kind, f, dist, _bearing(vec),
                            (float(vec @ right), float(vec @ forward))))
    out.sort(key=lambda r: (r.distance, r.feature.fid))
    return out


# ---- phrases ---------------------------------------------------------------------------

def _pick(rng, options):
    return options[int(rng.integers(len(options)))]


def _article(phrase):
    # 'an L-shaped ...': the letter is read 'el'.
    vowel = phrase[:1].lower() in 'aeiou' or phrase.startswith('L-')
    return ('an ' if vowel else 'a ') + phrase


def noun_for(feature, register, rng):
    """Return a noun for a feature in the 'desc' or 'query' register."""
    key = feature.attrs.get('use', feature.kind) if feature.kind == 'building' else feature.kind
    options = NOUNS[key][0 if register == 'desc' else 1]
    return _pick(rng, options)


def colour_word(name, register, rng):
    """Return the word for a roof colour in the given register."""
    canonical, synonyms = COLOUR_WORDS[name]
    return canonical if register == 'desc' else _pick(rng, synonyms)


def anchor_phrase(feature, register, rng, detail=2):
    """Return a noun phrase (with article) for the anchor; more ``detail``, more attributes."""
    a = feature.attrs
    kind = feature.kind
    noun = noun_for(feature, register, rng)
    if kind == 'building':
        colour = colour_word(a['colour'], register, rng)
        shapes = SHAPE_WORDS[a['shape']][0 if register == 'desc' else 1]
        shape = _pick(rng, shapes)
        size = a['size'] if detail >= 2 and a['use'] != 'house' else ''
        roof = 'flat' if a['roof'] == 'flat' else (
            'pitched' if register == 'desc' else 'sloped')
        if a['shape'] == 'courtyard':
            if register == 'desc':
                core = f'{size} {noun} with {_article(colour)} roof around an inner courtyard'
            else:
                core = f'{size} {shape} {noun} with {_article(colour)} roof and an open middle'
        elif register == 'query' and ' ' in shape:
            core = f'{size} {colour}-roofed {noun} {shape}'
        elif rng.random() < 0.5:
            core = f'{size} {shape} {noun} with {_article(colour + " " + roof)} roof'
        else:
            core = f'{size} {colour}-roofed {shape} {noun}'
        extras = []
        if a.get('solar'):
            extras.append('solar panels on the roof' if register == 'desc'
                          else 'photovoltaic panels on top')
        if a.get('pool'):
            extras.append('a swimming pool in the garden' if register == 'desc'
                          else 'a backyard pool')
        phrase = _article(' '.join(core.split()))
        if extras and detail >= 1:
            phrase += (' and ' if ' with ' in phrase else ' with ') + ' and '.join(extras)
        return phrase
    if kind == 'pond':
        shape = {'round': ('round', 'circular'), 'oval': ('oval', 'egg-shaped'),
                 'irregular': ('irregular', 'odd-shaped')}[a['shape']]
        word = shape[0] if register == 'desc' else shape[1]
        size = a['size'] if detail >= 2 else ''
        phrase = _article(' '.join(f'{size} {word} {noun}'.split()))
        if a.get('island'):
            phrase += (' with a small island and a tree' if register == 'desc'
                       else ' that has a tiny wooded island')
        return phrase
    if kind == 'roundabout':
        middle = a['island']
        if register == 'desc':
            inner = 'a single tree' if middle == 'a tree' else 'a grassy island'
            return _article(f'{noun} with {inner} in the middle')
        inner = 'one tree' if middle == 'a tree' else 'a lawn'
        return f'the {noun} with {inner} at its centre'
    if kind == 'bridge':
        if register == 'desc':
            return _article(f'{noun} across the river' if noun == 'road bridge'
                            else f'{noun} carrying a road over the river')
        return f'the {noun} where a street goes over the water'
    if kind == 'football pitch':
        axis = a['axis'] if detail >= 1 else ''
        if register == 'desc':
            lead = _article(f'{noun} laid out {axis}' if axis else noun)
            if a.get('track'):
                return f'{lead} and surrounded by a red running track' if axis else \
                    f'{lead} surrounded by a red running track'
            return f'{lead} with white lines on green grass'
        lead = f'the {noun} running {axis}' if axis else f'the {noun}'
        return f'{lead} inside an athletics track' if a.get('track') else \
            f'{lead} with no running track'
    if kind == 'tennis courts':
        n = NUMBER_WORDS.get(a['count'], str(a['count']))
        colour = a['colour']
        if register == 'desc':
            return f'{"a row of " + n if a["count"] > 1 else "a single"} {colour} ' \
                   f'tennis court{"s" if a["count"] > 1 else ""}'
        return f'{n} {colour} tennis court{"s" if a["count"] > 1 else ""} side by side'
    if kind == 'parking':
        fill = a['cars'] / max(1, a['capacity'])
        if register == 'desc':
            state = ('an almost empty' if fill < 0.3 else
                     'a half-full' if fill < 0.65 else 'a busy')
            return f'{state} {noun} with about {_round(a["cars"])} cars'
        state = ('mostly empty' if fill < 0.3 else
                 'about half occupied' if fill < 0.65 else 'nearly full')
        return f'the {noun} that is {state}'
    if kind == 'plaza':
        middle = {'fountain': ('a round fountain', 'a circular water basin'),
                  'statue': ('a statue', 'a monument'),
                  'trees': ('four trees', 'a small group of trees')}[a['middle']]
        form = {'square': ('square', 'four-sided'), 'circular': ('circular', 'round')}[a['form']]
        if register == 'desc':
            return _article(f'{form[0]} {noun} paved in {a["paving"]} with '
                            f'{middle[0]} in the middle')
        return f'the {form[1]} {noun} with {middle[1]} at its centre'
    return _article(kind)


def _round(n):
    return n if n < 10 else int(round(n / 5.0) * 5)


def neighbour_phrase(rel, register, rng):
    """Return a short noun phrase for a neighbouring feature."""
    f = rel.feature
    if f.kind == 'building':
        colour = colour_word(f.attrs['colour'], register, rng)
        shape = {'L-shaped': 'L-shaped ', 'circular': 'round ', 'courtyard': 'courtyard '}.get(
            f.attrs['shape'], '')
        noun = noun_for(f, register, rng)
        return _article(f'{colour}-roofed {shape}{noun}')
    if f.kind == 'road':
        if register == 'desc':
            return 'a main road' if f.attrs['main'] else 'a street'
        return 'a big road' if f.attrs['main'] else 'a side street'
    if f.kind == 'river':
        return NOUNS['river'][0 if register == 'desc' else 1][0]
    if f.kind == 'pool':
        return 'a swimming pool' if register == 'desc' else 'a small pool'
    if f.kind == 'path':
        return 'a footpath' if register == 'desc' else 'a walking trail'
    if f.kind in NOUNS:
        noun = noun_for(f, register, rng)
        return noun if noun.endswith('courts') else _article(noun)
    return _article(f.kind)


def _tree_phrase(n, register):
    if register == 'desc':
        return ('a few trees' if n <= 4 else 'several trees' if n <= 12 else 'many trees')
    return ('a couple of trees' if n <= 4 else 'a handful of trees' if n <= 12
            else 'dense greenery')


def _where(rel, platform, register):
    """Where a neighbour is, in compass words (north-up tiles) or image words (drone)."""
    if platform == 'satellite':
        word = compass(rel.bearing_deg)
        return f'to the {word}' if register == 'desc' else f'on the {word} side'
    x, y = rel.local
    if abs(x) >= abs(y):
        return 'on the left' if x < 0 else 'on the right'
    return 'in the background' if y > 0 else 'in the foreground'


def river_side(world, anchor):
    """Return the compass side of the river the anchor is on, or None when far from it."""
    d, closest = point_polyline_distance(np.array(anchor.centre), world.river)
    if d > 170.0 or anchor.kind == 'bridge':
        return None
    vec = np.array(anchor.centre) - closest
    bearing = _bearing(vec)
    return ('north', 'east', 'south', 'west')[int(round(bearing / 90.0)) % 4]


@dataclass
class Context:
    """The facts one image's descriptions are written from."""

    anchor: object
    relations: list
    trees_near: int
    road_side: str
    river_side: str
    platform: str


def context_for(world, view, anchor, platform):
    """Collect the neighbours, nearby trees, nearest road side and river side of a view."""
    rels = visible_relations(world, view, anchor)
    trees = sum(1 for r in rels if r.kind == 'tree' and r.distance < 25.0)
    road_side = None
    for r in rels:
        if r.kind == 'road' and r.distance < 25.0:
            if platform == 'satellite':
                road_side = ('north', 'east', 'south', 'west')[
                    int(round(r.bearing_deg / 90.0)) % 4]
            else:
                road_side = _where(r, platform, 'desc')
            break
    river_visible = any(r.kind == 'river' for r in rels)
    side = river_side(world, anchor) if (river_visible or platform == 'satellite') else None
    others = [r for r in rels if r.kind not in ('tree', 'road', 'river')
              # The anchor's own pool is already part of its description.
              and not (r.kind == 'pool' and anchor.attrs.get('pool') and r.distance < 12.0)]
    # Keep the nearest of each kind, so the text names varied neighbours.
    seen, named = set(), []
    for r in others:
        key = (r.kind, r.feature.attrs.get('colour'))
        if key in seen or r.distance > 60.0:
            continue
        seen.add(key)
        named.append(r)
    return Context(anchor, named[:4], trees, road_side, side, platform)


def _clause(rel, platform, register, rng):
    phrase = neighbour_phrase(rel, register, rng)
    where = _where(rel, platform, register)
    if register == 'desc':
        near = 'next to' if rel.distance < 20 else 'near'
        verb = 'lie' if phrase.endswith('courts') else 'lies'
        return _pick(rng, (f'{phrase} {where}', f'{near} {phrase} {where}',
                           f'{phrase} {verb} {where}'))
    return _pick(rng, (f'{phrase} {where}', f'close to {phrase}'))


def _sentence(text):
    text = ' '.join(text.split())
    return text[:1].upper() + text[1:].rstrip('.') + '.'


def describe(ctx, rng):
    """Return three different descriptions of one image."""
    a = ctx.anchor
    frame = {'satellite': ('A satellite image of', 'An overhead view of', 'Seen from above,'),
             'drone': ('A drone photo of', 'An oblique aerial view of',
                       'Seen from a drone,')}[ctx.platform]
    rels = list(ctx.relations)
    order = rng.permutation(len(rels)) if rels else []
    shuffled = [rels[int(i)] for i in order]
    tree_text = _tree_phrase(ctx.trees_near, 'desc') if ctx.trees_near else None
    river = f'{ctx.river_side} of the river' if ctx.river_side else None

    # 1: the anchor with all its attributes, and the river side when known.
    first = f'{_pick(rng, frame[:2])} {anchor_phrase(a, "desc", rng, detail=2)}'
    if river:
        first += f', {river}'
    elif tree_text:
        first += f', {tree_text} around it'
    # 2: the anchor plus its nearest neighbours.
    second = anchor_phrase(a, 'desc', rng, detail=1)
    clauses = [_clause(r, ctx.platform, 'desc', rng) for r in rels[:2]]
    if ctx.road_side and a.kind not in ('roundabout', 'bridge'):
        clauses.append(f'a road runs along its {ctx.road_side} side'
                       if ctx.platform == 'satellite' else
                       f'a road passes {ctx.road_side}')
    if not clauses and tree_text:
        clauses.append(f'{tree_text} stand around it')
    if not clauses and river:
        clauses.append(f'it lies {river}')
    if clauses:
        second += '; ' + ', and '.join(clauses) if len(clauses) <= 2 else \
            '; ' + ', '.join(clauses[:-1]) + ', and ' + clauses[-1]
    else:
        second += ' filling most of the picture'
    # 3: framed differently, other neighbours, trees.
    third = f'{frame[2]} {anchor_phrase(a, "desc", rng, detail=0)}'
    extra = shuffled[:1] if shuffled else []
    if extra:
        third += f' with {neighbour_phrase(extra[0], "desc", rng)} ' \
                 f'{_where(extra[0], ctx.platform, "desc")}'
    if tree_text:
        third += f', and {tree_text} nearby' if extra or ' with ' in third else \
            f' with {tree_text} nearby'
    if river and rng.random() < 0.5:
        third += f', on the {ctx.river_side} bank'
    texts = [_sentence(first), _sentence(second), _sentence(third)]
    if len(set(texts)) < 3:
        texts[2] = _sentence(f'{texts[2][:-1]} in the {ctx.platform} image')
    return texts


QUERY_OPENERS = ('Fly to', 'Take me to', 'Go to', 'Head over to', 'Navigate to',
                 'I want to get to', 'Please go to', 'Can you fly over to')


def queries(ctx, rng, count=2):
    """Return ``count`` held-out spoken-style queries for a place (query register)."""
    a = ctx.anchor
    out = []
    openers = list(QUERY_OPENERS)
    for k in range(count):
        opener = openers.pop(int(rng.integers(len(openers))))
        target = anchor_phrase(a, 'query', rng, detail=1 if k == 0 else 2)
        if target.startswith(('a ', 'an ')):
            target = 'the ' + target.split(' ', 1)[1]
        parts = [f'{opener} {target}']
        if k == 0 and ctx.river_side:
            parts.append(f'on the {ctx.river_side} bank of {NOUNS["river"][1][0]}'
                         if rng.random() < 0.5 else
                         f'{ctx.river_side} of the {_pick(rng, ("stream", "waterway"))}')
        elif ctx.relations:
            rel = ctx.relations[min(k, len(ctx.relations) - 1)]
            parts.append(_clause(rel, 'satellite', 'query', rng))
        elif ctx.trees_near:
            parts.append(f'surrounded by {_tree_phrase(ctx.trees_near, "query")}')
        elif ctx.road_side:
            parts.append(f'with a street on its {ctx.road_side} edge')
        out.append(_sentence(', '.join(parts)))
    return out
