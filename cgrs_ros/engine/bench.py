"""Benchmarks: query latency against its floor, memory per item, index vs re-index time.

Query latency (:func:`bench_query`) runs on a synthetic gallery of N items: random unit vectors
stand in for image and caption embeddings (search cost depends on N and the dimension, not on
what the vectors mean), and real-size encoders with random weights (open_clip ViT-B-32 built
with ``pretrained=None``) or real ones (MiniLM) give the real encode cost. The query path is
the production one (:meth:`Retriever.query`).

The floor is measured in the same run, query by query, interleaved with the real queries so
machine load affects both alike: one text forward per encoder plus the bare FAISS search of
each index the mode uses. ``ratio_p50_to_floor`` = p50(query) / p50(floor); the target at 100k
items is <= 1.5.

Index time (:func:`bench_index`) indexes a folder of generated JPEGs twice through
``index_gallery``: the first run embeds everything, the second (nothing changed) should do no
model work; target: at least 20x faster.
"""

import gc
import os
from pathlib import Path
import shutil
import statistics
import tempfile
import time

from cgrs_ros.engine.config import load_config
from cgrs_ros.engine.encoders import OpenClipEncoder, SentenceTransformerEncoder
from cgrs_ros.engine.gallery import Gallery, GalleryItem, PLATFORMS, write_manifest
from cgrs_ros.engine.index import VectorIndex
from cgrs_ros.engine.query_norm import has_orientation_words
import numpy as np

# Operator-style descriptions; about a third carry orientation words, as spoken goals do.
QUERIES = (
    'the red-roofed building beside the circular plaza, south of the river',
    'a football stadium with floodlights',
    'the white church with a tall spire',
    'a long bridge with arches crossing the river',
    'the parking lot next to the supermarket',
    'a harbour with small boats along a pier',
    'the tall glass office tower at the crossroads',
    'a park with a pond and many trees',
    'the school building on the north side of the main road',
    'a roundabout with a fountain in the middle',
    'the warehouse with a grey flat roof near the railway',
    'a row of terraced houses with brown roofs',
    'the hospital to the left of the big car park',
    'a tennis court surrounded by trees',
    'the train station with a curved roof',
    'the blue building in the upper right corner of the block',
    'a wind farm on a green hill',
    'an apple orchard in neat rows',
    'the museum east of the old town square',
    'a swimming pool behind a hotel',
    'the lighthouse on a rocky cape',
    'a gas station at a junction',
    'the university campus with a large lawn',
    'the castle on the hill west of the village',
)
PLATFORM_SHARE = (0.1, 0.7, 0.2)  # satellite, drone, ground (GeoText-1652 is mostly drone)
_WORDS = ('red', 'white', 'grey', 'brown', 'flat', 'gabled', 'tall', 'low', 'round', 'long')
_THINGS = ('roof', 'tower', 'plaza', 'road', 'river', 'park', 'car park', 'bridge', 'church')


def _rss_bytes():
    with open('/proc/self/statm') as handle:
        return int(handle.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


class ClusteredVectors:
    """N synthetic L2-normalized embeddings, generated block by block on demand.

    Embeddings of real images are clustered (similar places lie close) and occupy far fewer
    dimensions than they are given (the intrinsic dimension of CLIP-style embeddings is
    reported in the tens), which is what makes approximate search work; uniformly random
    vectors have no neighbours to find and would measure nothing useful. Row ``i`` is a
    point of a 64-d latent space (one of ``n / 100`` place centres plus Gaussian spread,
    cosine about 0.8 with its centre), mapped into ``dim`` dimensions by a fixed random
    projection, plus a little isotropic noise (5 % of the norm), normalized. These are
    assumptions, not measurements: recall on a real gallery is what ``cgrs index`` prints.

    Any slice or sorted index array can be read; each block of 65536 rows comes from its own
    seed, so a 10M x 512 gallery (20 GB as float32) is never held at once and reads the same
    every time.
    """

    BLOCK = 65536
    LATENT = 64

    def __init__(self, n, dim, seed=0, per_cluster=100):
        """Describe the vectors (only the centres and the projection are generated now)."""
        self.shape = (int(n), int(dim))
        self.dtype = np.dtype(np.float32)
        self.seed = seed
        rng = np.random.default_rng([seed, 0])
        latent = min(self.LATENT, dim)
        self.centres = rng.standard_normal((max(1, n // per_cluster), latent), dtype=np.float32)
        self.projection = np.linalg.qr(rng.standard_normal((dim, latent)))[0].T.astype(
            np.float32)
        self._cache = (None, None)

    def __len__(self):
        return self.shape[0]

    def block(self, b):
        """Return rows ``b * BLOCK`` onward (one block) as float32."""
        if self._cache[0] == b:
            return self._cache[1]
        lo = b * self.BLOCK
        count = min(self.BLOCK, self.shape[0] - lo)
        rng = np.random.default_rng([self.seed, 1, b])
        latent = self.centres[rng.integers(0, len(self.centres), count)]
        latent += rng.standard_normal(latent.shape, dtype=np.float32) * np.float32(0.75)
        rows = latent @ self.projection
        rows /= np.linalg.norm(rows, axis=1, keepdims=True)
        rows += rng.standard_normal(rows.shape, dtype=np.float32) * np.float32(
            0.05 / np.sqrt(self.shape[1]))
        rows /= np.linalg.norm(rows, axis=1, keepdims=True)
        self._cache = (b, rows)
        return rows

    def __getitem__(self, rows):
        """Return the rows of a slice or of a sorted int array (float32)."""
        if isinstance(rows, slice):
            rows = np.arange(*rows.indices(self.shape[0]))
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.shape[1]), dtype=np.float32)
        blocks = rows // self.BLOCK
        for b in np.unique(blocks):
            take = np.flatnonzero(blocks == b)
            out[take] = self.block(int(b))[rows[take] - b * self.BLOCK]
        return out


class SyntheticGallery(Gallery):
    """A gallery of N synthetic items held as columns, items made when a result names them.

    (10M GalleryItem objects would take about 10 GB.)

    Items are sorted by platform (so vectors are read in order while the index is built) and
    spread over a square whose side grows with sqrt(N) (0.1 degree at 100k items: about
    1,300 images per km2, a dense multi-platform gallery at any size).
    """

    def __init__(self, n, seed=0):  # noqa: D107 (documented on the class)
        rng = np.random.default_rng(seed)
        self.root = Path('/nonexistent-synthetic-gallery')
        self.problems, self.manifest = [], None
        self.codes = np.sort(rng.choice(len(PLATFORMS), size=n, p=PLATFORM_SHARE)).astype(
            np.int8)
        side = 0.1 * np.sqrt(n / 100_000)
        self.lat = 47.0 + rng.random(n) * side
        self.lon = 8.0 + rng.random(n) * side
        self.items = _LazyItems(self)
        self.n = n

    def __len__(self):
        return self.n

    def coordinates(self):
        """Return (lat, lon) arrays (area.py reads these instead of the items)."""
        return self.lat, self.lon

    def platform_codes(self):
        """Return the platform codes (retriever.py reads these instead of the items)."""
        return self.codes

    def item(self, i):
        """Return item ``i`` as a GalleryItem."""
        return GalleryItem(f'img{i:08d}', f'images/{i:08d}.jpg', float(self.lat[i]),
                           float(self.lon[i]), 400.0, float(i % 360),
                           PLATFORMS[self.codes[i]], f'b{i // 50:06d}', (), i + 2)

    def get(self, image_id):
        """Return the item with this id, or None."""
        i = int(image_id[3:]) if image_id.startswith('img') and image_id[3:].isdigit() else -1
        return self.item(i) if 0 <= i < self.n else None


class _LazyItems:
    def __init__(self, gallery):
        self.gallery = gallery

    def __len__(self):
        return self.gallery.n

    def __getitem__(self, i):
        return self.gallery.item(int(i))

    def __iter__(self):
        return (self.gallery.item(i) for i in range(self.gallery.n))


def synthetic_captions(n, seed=0):
    """Return ``n`` operator-style captions (for the caption channel of a synthetic gallery)."""
    rng = np.random.default_rng(seed)
    words = rng.integers(0, len(_WORDS), (n, 3))
    things = rng.integers(0, len(_THINGS), (n, 3))
    return [f'a {_WORDS[w[0]]} {_THINGS[t[0]]} next to a {_WORDS[w[1]]} {_THINGS[t[1]]}, '
            f'with a {_WORDS[w[2]]} {_THINGS[t[2]]} behind it.' for w, t in zip(words, things)]


def load_bench_encoders(image_model='ViT-B-32', text_model='all-MiniLM-L6-v2', threads=0):
    """Image encoder (real-size random weights for an architecture name) and text encoder."""
    image = None
    if image_model.startswith('learned:'):
        from cgrs_ros.engine.encoders import LearnedDualEncoder
        image = LearnedDualEncoder(image_model[len('learned:'):], threads=threads)
    elif image_model != 'none':
        if image_model.startswith(('local-dir:', 'hf-hub:')):
            image = OpenClipEncoder(image_model, threads=threads)
        else:
            image = OpenClipEncoder(image_model, pretrained=None, allow_random_init=True,
                                    threads=threads)
    text = SentenceTransformerEncoder(text_model, threads=threads)
    return image, text


def _pct(values, q):
    return float(np.percentile(np.asarray(values), q)) if values else None


def bench_query(gallery_size, image_encoder, text_encoder, n_queries=50, retrieval=None,
                seed=0, warmup=3, query_threads=1, index=None, captions=True,
                radii=(), log=None):
    """Measure query latency, its floor and memory per item on a synthetic gallery.

    ``index``: the ``index`` config section for the image index (type, breadth, ...);
    ``captions``: give every item a caption (a flat 384-d caption index: 1.5 kB an item, so
    off for the 10M runs); ``radii``: also time queries restricted to that many metres around
    a random gallery position (``near``), interleaved with unrestricted ones.
    """
    from cgrs_ros.engine.area import area_filter_for, SearchArea
    from cgrs_ros.engine.retriever import Retriever
    overrides = {'retrieval': dict(retrieval or {}),
                 'image_encoder': {'query_threads': query_threads},
                 'text_encoder': {'query_threads': query_threads},
                 'index': dict(index or {})}
    if image_encoder is None:
        overrides['image_encoder']['backend'] = 'none'
    config = load_config(None, overrides)
    cfg = config.retrieval
    threads = query_threads
    gc.collect()
    rss_before = _rss_bytes()
    gallery = SyntheticGallery(gallery_size, seed)
    texts = synthetic_captions(gallery_size, seed) if captions else None
    image_vectors = (ClusteredVectors(gallery_size, image_encoder.dim, seed + 1)
                     if image_encoder is not None else None)
    caption_vectors = (ClusteredVectors(gallery_size, text_encoder.dim, seed + 2)[:]
                       if captions else None)
    retriever = Retriever.from_arrays(gallery, config, text_encoder=text_encoder,
                                      caption_texts=texts, caption_vectors=caption_vectors)
    build_s = open_s = None
    if image_vectors is not None:
        # Built, saved and opened memory-mapped, as `cgrs index` and a node do.
        start = time.perf_counter()
        built = VectorIndex.build(image_vectors, np.arange(gallery_size),
                                  gallery.platform_codes(), gallery_size, settings=config.index,
                                  log=log)
        build_s = time.perf_counter() - start
        folder = Path(tempfile.mkdtemp(prefix='cgrs-bench-index-'))
        try:
            built.save(folder / 'image', {})
            del built
            gc.collect()
            start = time.perf_counter()
            retriever._image_index = VectorIndex.load(folder / 'image', gallery_size, {},
                                                      settings=config.index)
            open_s = time.perf_counter() - start
            retriever._image_encoder = image_encoder
        finally:
            shutil.rmtree(folder, ignore_errors=True)  # the mapping stays valid until closed
    del image_vectors, caption_vectors
    area = area_filter_for(gallery)  # built once per gallery, as a node does on its first area
    gc.collect()
    bytes_per_item = (_rss_bytes() - rss_before) / gallery_size
    image_index = retriever._image_index
    caption_index = retriever._captions.index
    index_bytes = ((image_index.nbytes() if image_index is not None else 0)
                   + (caption_index.nbytes() if caption_index is not None else 0))
    k = max(cfg.coarse_k, cfg.top_k)

    def floor(text):
        start = time.perf_counter()
        if image_encoder is not None:
            image_index.index.search(image_encoder.encode_texts([text], threads=threads), k)
        if caption_index is not None and (image_encoder is None
                                          or cfg.caption_channel == 'hybrid'):
            caption_index.index.search(text_encoder.encode_texts([text], threads=threads), k)
        elif caption_index is not None:
            text_encoder.encode_texts([text], threads=threads)
        return (time.perf_counter() - start) * 1e3

    def query(text, near=None):
        start = time.perf_counter()
        result = retriever.query(text, near=near)
        wall = (time.perf_counter() - start) * 1e3
        return wall, result

    for text in QUERIES[:warmup]:
        floor(text)
        query(text)
    rng = np.random.default_rng(seed + 3)
    totals, floors, stages, oriented = [], [], {'encode': [], 'coarse': [], 'captions': []}, []
    filtered = {radius: {'total': [], 'coarse': [], 'inside': [], 'plain': []}
                for radius in radii}
    for i in range(n_queries):
        text = QUERIES[i % len(QUERIES)]
        # Alternate which runs first so caches and load spikes favour neither.
        if i % 2:
            wall, result = query(text)
            floors.append(floor(text))
        else:
            floors.append(floor(text))
            wall, result = query(text)
        totals.append(wall)
        oriented.append(has_orientation_words(text))
        for name in stages:
            stages[name].append(result.timings_ms[name])
        for radius, figures in filtered.items():
            centre = int(rng.integers(gallery_size))
            near = (gallery.lat[centre], gallery.lon[centre], float(radius))
            wall, result = query(text, near)
            figures['total'].append(wall)
            figures['coarse'].append(result.timings_ms['coarse'])
            figures['inside'].append(len(area.items_within(SearchArea.parse(near))))
            figures['plain'].append(query(text)[0])  # the same query unrestricted, right after
    plain = [t for t, o in zip(totals, oriented) if not o]
    with_words = [t for t, o in zip(totals, oriented) if o]
    p50, floor_p50 = statistics.median(totals), statistics.median(floors)
    info = image_index.info if image_index is not None else {}
    return {
        'gallery_size': gallery_size,
        'queries': n_queries,
        'p50_ms': p50,
        'p95_ms': _pct(totals, 95),
        'floor_ms': floor_p50,
        'floor_p95_ms': _pct(floors, 95),
        'ratio_p50_to_floor': p50 / floor_p50,
        'p50_minus_floor_ms': p50 - floor_p50,
        'bytes_per_item': bytes_per_item,
        'index_bytes_per_item': index_bytes / gallery_size,
        'area_filter_bytes_per_item': area.nbytes() / gallery_size,
        'stages_ms': {name: {'p50': _pct(v, 50), 'p95': _pct(v, 95)}
                      for name, v in stages.items()},
        'index_type': info.get('type'),
        'index_factory': info.get('factory'),
        'recall_at_10': info.get('recall_at_10'),
        'recall_queries': info.get('recall_queries'),
        'search_breadth': {info.get('breadth_name'): info.get('breadth')},
        'index_build_s': build_s,
        'index_open_s': open_s,
        'index_train_s': info.get('train_s'),
        'radius_queries': {str(radius): {
            'p50_ms': _pct(f['total'], 50), 'p95_ms': _pct(f['total'], 95),
            'coarse_p50_ms': _pct(f['coarse'], 50),
            'unfiltered_p50_ms': _pct(f['plain'], 50),
            'items_inside_p50': _pct(f['inside'], 50)} for radius, f in filtered.items()},
        'captions': bool(captions),
        'p50_ms_plain_queries': _pct(plain, 50),
        'p50_ms_orientation_queries': _pct(with_words, 50),
        'orientation_query_share': len(with_words) / n_queries,
        'image_encoder': image_encoder.identity if image_encoder is not None else None,
        'text_encoder': text_encoder.identity,
        'caption_channel': cfg.caption_channel,
        'fusion': cfg.fusion,
        'remove_orientation_words': cfg.remove_orientation_words,
        'coarse_k': cfg.coarse_k,
        'query_threads': query_threads,
    }


def _write_jpegs(folder, n, seed=0, size=256):
    from PIL import Image
    rng = np.random.default_rng(seed)
    items = []
    for i in range(n):
        blocks = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        pixels = np.kron(blocks, np.ones((size // 8, size // 8, 1), dtype=np.uint8))
        pixels = np.clip(pixels + rng.integers(-20, 20, pixels.shape), 0, 255).astype(np.uint8)
        rel = f'images/{i:06d}.jpg'
        (folder / 'images').mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / rel, quality=90)
        platform = PLATFORMS[i % len(PLATFORMS)]
        items.append(GalleryItem(f'img{i:06d}', rel, 47 + i * 1e-4, 8 + i * 1e-4, 400.0,
                                 float(i % 360), platform, f'b{i // 5}',
                                 (f'a {_WORDS[i % 10]} {_THINGS[i % 9]} near a '
                                  f'{_WORDS[(i // 10) % 10]} {_THINGS[(i // 9) % 9]}',)))
    write_manifest(folder, items)


def save_random_open_clip(folder, arch='ViT-B-32', seed=0):
    """Save a real-size open_clip architecture with random weights as a ``local-dir:`` folder."""
    import json

    from cgrs_ros.engine.torch_compat import ensure_torchvision
    ensure_torchvision()
    import open_clip
    from safetensors.torch import save_file
    import torch
    torch.manual_seed(seed)
    config = open_clip.get_model_config(arch)
    model = open_clip.create_model(arch, pretrained=None)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / 'open_clip_config.json').write_text(json.dumps({'model_cfg': config}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(folder / 'open_clip_model.safetensors'))
    return folder


def bench_index(n_images, image_model_dir, threads=0, work_dir=None, progress=False):
    """Index ``n_images`` generated JPEGs twice; return both times and their ratio."""
    from cgrs_ros.engine.indexer import index_gallery
    own = work_dir is None
    work = Path(work_dir or tempfile.mkdtemp(prefix='cgrs-bench-index-'))
    try:
        gallery = work / 'gallery'
        _write_jpegs(gallery, n_images)
        config = load_config(None, {
            'image_encoder': {'model': f'local-dir:{image_model_dir}', 'pretrained': None,
                              'threads': threads},
            'text_encoder': {'threads': threads}})
        first = index_gallery(gallery, config, progress=progress)
        second = index_gallery(gallery, config, progress=progress)
        return {
            'index_images': n_images,
            'first_index_s': first.elapsed_s,
            'second_index_s': second.elapsed_s,
            'reindex_speedup': first.elapsed_s / max(second.elapsed_s, 1e-9),
            'first_images_embedded': first.images_embedded,
            'second_images_embedded': second.images_embedded,
            'second_models_loaded': len(second.models_loaded),
        }
    finally:
        if own:
            shutil.rmtree(work, ignore_errors=True)
