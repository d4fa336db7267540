"""Training and validation data: described galleries and GeoText-1652 as (text, image) pairs.

A :class:`PairSet` holds images (file, platform, place) and texts, each text describing one
image. Places ("groups") are the unit of a hit, as in the evaluation: every image of a place is
a positive for every text of that place. Several galleries can be joined; their places are
kept apart by prefixing the gallery (town) name, so two towns' ``p0001`` are different places.

Sources:

- a gallery folder whose manifest has descriptions (``cgrs gallery demo`` writes three per
  image); ``group_id`` names the place (an image without one is a place of its own);
- GeoText-1652 annotation JSON (``--geotext train.json --images ROOT``): the building id
  (first four characters of ``image_id``) is the place.

Validation (:class:`QuerySet`): a gallery with its ``queries.csv`` (held-out phrasings, as the
demo generator writes them) or, without one, the gallery's own descriptions as queries.
"""

import dataclasses
import math
from pathlib import Path
import re

from cgrs_ros.engine.errors import GalleryError
from cgrs_ros.engine.evaluation import datasets
from cgrs_ros.engine.gallery import load_gallery
from cgrs_ros.engine.geo import Datum, geodetic_to_enu
import numpy as np

QUERIES_FILE = 'queries.csv'
# Words that say how an image was taken or glue a sentence together, not what a place is;
# left out of the attribute sets that soft labels compare.
_STOP = frozenset("""a an the and or of in on at to by with from its it is are lies runs
around near nearby next beside along side there this that seen above view image photo
satellite drone aerial oblique overhead top down shot picture some several few one two three
four five""".split())
_WORD = re.compile(r'[a-z][a-z-]+')
_CLAUSE = re.compile(r';\s*')
_PIECE = re.compile(r',\s*(?:and\s+)?')


@dataclasses.dataclass
class PairSet:
    """Images, texts and places of one training set (possibly several galleries joined)."""

    image_paths: list = dataclasses.field(default_factory=list)
    image_platforms: list = dataclasses.field(default_factory=list)
    image_groups: list = dataclasses.field(default_factory=list)    # index into groups
    texts: list = dataclasses.field(default_factory=list)
    text_images: list = dataclasses.field(default_factory=list)     # index into images
    groups: list = dataclasses.field(default_factory=list)          # 'town/group_id'
    group_town: list = dataclasses.field(default_factory=list)
    group_en: list = dataclasses.field(default_factory=list)        # (east, north) m or None
    sources: list = dataclasses.field(default_factory=list)
    problems: list = dataclasses.field(default_factory=list)       # skipped rows, one line each

    @property
    def text_groups(self):
        """Place index of every text (numpy int64)."""
        return np.asarray(self.image_groups, dtype=np.int64)[
            np.asarray(self.text_images, dtype=np.int64)]

    def check(self):
        """Raise GalleryError when the set cannot train a contrastive model."""
        where = ', '.join(self.sources) or 'the training data'
        if not self.texts:
            raise GalleryError(
                f'{where} has no descriptions to learn from; add a description column to the '
                'manifest (or train on GeoText-1652 with --geotext), since a gallery without '
                'descriptions can be indexed but not trained on')
        if len(set(self.image_groups)) < 2:
            raise GalleryError(
                f'{where} has only one place (group_id); contrastive training needs at least '
                'two places to tell apart: add galleries or give images their group_id')

    def with_clause_views(self):
        """Return a copy where every text also appears as its clauses (see clause_views)."""
        texts, text_images = [], []
        for text, image in zip(self.texts, self.text_images):
            for view in clause_views(text):
                texts.append(view)
                text_images.append(image)
        return dataclasses.replace(self, texts=texts, text_images=text_images)

    def extend(self, other):
        """Append another set, re-indexing its images and places."""
        n_images, n_groups = len(self.image_paths), len(self.groups)
        self.image_paths += other.image_paths
        self.image_platforms += other.image_platforms
        self.image_groups += [g + n_groups for g in other.image_groups]
        self.texts += other.texts
        self.text_images += [i + n_images for i in other.text_images]
        self.groups += other.groups
        self.group_town += other.group_town
        self.group_en += other.group_en
        self.sources += other.sources
        self.problems += other.problems
        return self


def attribute_words(text):
    """Return the words of a description that say what a place is (stop words left out)."""
    return {w for w in _WORD.findall(text.lower()) if w not in _STOP}


def clause_views(text):
    """Return a description and its clauses of three words or more, without repeats.

    "A red house; a pond lies to the north, and a road runs along its east side." gives the
    whole text, "A red house", "a pond lies to the north" and "a road runs along its east
    side". A spoken goal names one or two of the things a description lists; training on the
    parts as well as the whole teaches the text head what each part contributes.
    """
    out = [text]
    for part in _CLAUSE.split(text.strip().rstrip('.')):
        if len(part.split()) >= 3:
            out.append(part.strip())
        for piece in _PIECE.split(part):
            if len(piece.split()) >= 3:
                out.append(piece.strip())
    return list(dict.fromkeys(out))


@dataclasses.dataclass
class QuerySet:
    """A validation (or evaluation) set: a gallery's images and text queries with their place."""

    name: str
    image_paths: list
    image_platforms: list
    image_groups: list      # place label per image (str)
    queries: list           # query texts
    query_groups: list      # place label per query (str)


def _town_name(folder, used):
    name = Path(folder).resolve().name or 'gallery'
    base, k = name, 2
    while name in used:
        name, k = f'{base}~{k}', k + 1
    used.add(name)
    return name


def pairs_from_gallery(gallery_dir, town=None):
    """Return the :class:`PairSet` of a described gallery (bad rows skipped, as indexing does)."""
    gallery = load_gallery(gallery_dir, check_images='header')
    if not gallery.items:
        raise GalleryError(f'no usable row in the manifest of {gallery_dir}; fix it first')
    town = town or Path(gallery_dir).resolve().name
    out = PairSet(sources=[str(gallery_dir)],
                  problems=[f'{gallery.manifest} {p}' for p in gallery.problems])
    group_index, positions = {}, {}
    datum = None
    for item in gallery.items:
        group = item.group_id or item.image_id
        if group not in group_index:
            group_index[group] = len(out.groups)
            out.groups.append(f'{town}/{group}')
            out.group_town.append(town)
            positions[group] = []
        if datum is None:
            datum = Datum(item.lat, item.lon, 0.0)
        e, n, _ = geodetic_to_enu(item.lat, item.lon, 0.0, datum)
        positions[group].append((float(e), float(n)))
        out.image_paths.append(str(gallery.path_of(item)))
        out.image_platforms.append(item.platform)
        out.image_groups.append(group_index[group])
        for text in item.descriptions:
            out.texts.append(text)
            out.text_images.append(len(out.image_paths) - 1)
    spread = np.ptp(np.array([p for ps in positions.values() for p in ps]), axis=0)
    located = bool(np.any(spread > 1.0))  # all images at one point: no usable positions
    for group in group_index:
        out.group_en.append(tuple(np.mean(positions[group], axis=0)) if located else None)
    return out


def pairs_from_geotext(ann_path, images_root):
    """Return the :class:`PairSet` of a GeoText-1652 annotation file (building = place)."""
    evalset = datasets.load_geotext(ann_path)
    out = PairSet(sources=[str(ann_path)])
    image_index, group_index = {}, {}
    missing = 0
    for image in evalset.images:
        found = datasets.resolve_geotext_image(images_root, image)
        if found is None:
            missing += 1
            continue
        if image.group_id not in group_index:
            group_index[image.group_id] = len(out.groups)
            out.groups.append(f'geotext/{image.group_id}')
            out.group_town.append('geotext')
            out.group_en.append(None)
        image_index[image.image_id] = len(out.image_paths)
        out.image_paths.append(str(found))
        out.image_platforms.append(image.platform or 'drone')
        out.image_groups.append(group_index[image.group_id])
    if not out.image_paths:
        raise GalleryError(f'none of the images of {ann_path} was found under {images_root}; '
                           'point --images at the folder the annotation paths are relative to')
    out.problems = list(evalset.problems)
    if missing:
        out.problems.append(f'{missing} images of {ann_path} were not found under '
                            f'{images_root}; their captions are left out')
    for query in evalset.queries:
        if query.source_image in image_index:
            out.texts.append(query.text)
            out.text_images.append(image_index[query.source_image])
    return out


def load_training_pairs(galleries=(), geotext=None, images_root=None):
    """Join described galleries (and a GeoText-1652 file) into one checked :class:`PairSet`."""
    pairs, used = PairSet(), set()
    for folder in galleries:
        pairs.extend(pairs_from_gallery(folder, _town_name(folder, used)))
    if geotext:
        if not images_root:
            raise GalleryError('--geotext needs --images, the folder its image paths are '
                               'relative to')
        pairs.extend(pairs_from_geotext(geotext, images_root))
    pairs.check()
    return pairs


def load_query_set(path):
    """Return the validation set of a gallery folder (or of its queries.csv).

    A gallery with ``queries.csv`` uses those queries (phrasings a model was not trained on);
    otherwise its descriptions serve as queries.
    """
    path = Path(path)
    folder = path.parent if path.is_file() and path.suffix == '.csv' else path
    query_file = path if path.is_file() and path.suffix == '.csv' else folder / QUERIES_FILE
    gallery = load_gallery(folder, check_images='exists')
    if not gallery.items:
        raise GalleryError(f'{folder} has no usable gallery rows to validate on')
    groups = [item.group_id or item.image_id for item in gallery.items]
    if query_file.is_file():
        qs = datasets.read_gallery_queries(query_file)
        queries = [q.text for q in qs.queries]
        query_groups = [next(iter(q.relevant)) for q in qs.queries]
    else:
        queries, query_groups = [], []
        for item, group in zip(gallery.items, groups):
            queries += list(item.descriptions)
            query_groups += [group] * len(item.descriptions)
        if not queries:
            raise GalleryError(f'{folder} has neither {QUERIES_FILE} nor descriptions; give '
                               'validation queries as a CSV with columns query,group_id')
    return QuerySet(name=folder.resolve().name,
                    image_paths=[str(gallery.path_of(item)) for item in gallery.items],
                    image_platforms=[item.platform for item in gallery.items],
                    image_groups=groups, queries=queries, query_groups=query_groups)


class GroupCredit:
    """Partial credit between places for soft labels: shared attributes or nearness.

    credit(a, b) = max(Jaccard of the places' description words when it reaches
    ``min_jaccard``, 1 - distance / radius_m for places of the same town within radius_m).
    Computed for the places of one batch at a time (the full matrix of thousands of places
    is never built).
    """

    def __init__(self, pairs, min_jaccard=0.5, radius_m=0.0):
        self.min_jaccard = float(min_jaccard)
        self.radius_m = float(radius_m)
        words = [set() for _ in pairs.groups]
        groups = pairs.text_groups
        for text, g in zip(pairs.texts, groups):
            words[g].update(attribute_words(text))
        vocab = {w: i for i, w in enumerate(sorted(set().union(*words)))}
        self._bits = np.zeros((len(words), max(1, len(vocab))), dtype=np.float32)
        for g, ws in enumerate(words):
            self._bits[g, [vocab[w] for w in ws]] = 1.0
        towns = {t: i for i, t in enumerate(sorted(set(pairs.group_town)))}
        self._town = np.array([towns[t] for t in pairs.group_town], dtype=np.int64)
        self._en = np.array([p if p is not None else (math.nan, math.nan)
                             for p in pairs.group_en], dtype=np.float64)

    def __call__(self, groups):
        """Return the (u, u) float32 credit matrix of place indices ``groups`` (diagonal 0)."""
        groups = np.asarray(groups, dtype=np.int64)
        bits = self._bits[groups]
        inter = bits @ bits.T
        sizes = bits.sum(axis=1)
        union = sizes[:, None] + sizes[None, :] - inter
        jaccard = np.where(union > 0, inter / np.maximum(union, 1), 0.0)
        credit = np.where(jaccard >= self.min_jaccard, jaccard, 0.0)
        if self.radius_m > 0:
            en = self._en[groups]
            dist = np.hypot(en[:, None, 0] - en[None, :, 0], en[:, None, 1] - en[None, :, 1])
            same_town = self._town[groups][:, None] == self._town[groups][None, :]
            near = np.where(same_town & (dist < self.radius_m),
                            1.0 - dist / self.radius_m, 0.0)
            credit = np.maximum(credit, np.nan_to_num(near, nan=0.0))
        np.fill_diagonal(credit, 0.0)
        return credit.astype(np.float32)
