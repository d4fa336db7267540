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
from cgrs_ros.engine.gallery import GalleryItem, PLATFORMS, write_manifest
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


def _unit_rows(rng, n, dim, chunk=65536):
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, chunk):
        block = rng.standard_normal((min(chunk, n - start), dim), dtype=np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        out[start:start + len(block)] = block
    return out


def synthetic_gallery(n, seed=0):
    """Return (Gallery, captions) of ``n`` synthetic items (no image files)."""
    from cgrs_ros.engine.gallery import Gallery
    rng = np.random.default_rng(seed)
    platforms = rng.choice(len(PLATFORMS), size=n, p=PLATFORM_SHARE)
    lat = 47.0 + rng.random(n) * 0.1
    lon = 8.0 + rng.random(n) * 0.1
    items, captions = [], []
    for i in range(n):
        items.append(GalleryItem(f'img{i:08d}', f'images/{i:08d}.jpg', float(lat[i]),
                                 float(lon[i]), 400.0, float(i % 360),
                                 PLATFORMS[platforms[i]], f'b{i // 50:06d}', (), i + 2))
        words = rng.choice(len(_WORDS), 3)
        things = rng.choice(len(_THINGS), 3)
        captions.append(f'a {_WORDS[words[0]]} {_THINGS[things[0]]} next to a '
                        f'{_WORDS[words[1]]} {_THINGS[things[1]]}, with a {_WORDS[words[2]]} '
                        f'{_THINGS[things[2]]} behind it.')
    return Gallery('/nonexistent-synthetic-gallery', items, []), captions


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
                seed=0, warmup=3, query_threads=1):
    """Measure query latency, its floor and memory per item on a synthetic gallery."""
    from cgrs_ros.engine.retriever import Retriever
    overrides = {'retrieval': dict(retrieval or {}),
                 'image_encoder': {'query_threads': query_threads},
                 'text_encoder': {'query_threads': query_threads}}
    if image_encoder is None:
        overrides['image_encoder']['backend'] = 'none'
    config = load_config(None, overrides)
    cfg = config.retrieval
    threads = query_threads
    gc.collect()
    rss_before = _rss_bytes()
    gallery, captions = synthetic_gallery(gallery_size, seed)
    rng = np.random.default_rng(seed + 1)
    image_vectors = (_unit_rows(rng, gallery_size, image_encoder.dim)
                     if image_encoder is not None else None)
    caption_vectors = _unit_rows(rng, gallery_size, text_encoder.dim)
    retriever = Retriever.from_arrays(gallery, config, image_encoder=image_encoder,
                                      image_vectors=image_vectors, text_encoder=text_encoder,
                                      caption_texts=captions, caption_vectors=caption_vectors)
    del image_vectors, caption_vectors
    gc.collect()
    bytes_per_item = (_rss_bytes() - rss_before) / gallery_size
    image_index = retriever._image_index
    caption_index = retriever._captions.index
    index_bytes = ((image_index.nbytes() if image_index is not None else 0)
                   + caption_index.nbytes())
    k = max(cfg.coarse_k, cfg.top_k)

    def floor(text):
        start = time.perf_counter()
        if image_encoder is not None:
            image_index.index.search(image_encoder.encode_texts([text], threads=threads), k)
        if image_encoder is None or cfg.caption_channel == 'hybrid':
            caption_index.index.search(text_encoder.encode_texts([text], threads=threads), k)
        else:
            text_encoder.encode_texts([text], threads=threads)
        return (time.perf_counter() - start) * 1e3

    def query(text):
        start = time.perf_counter()
        result = retriever.query(text)
        wall = (time.perf_counter() - start) * 1e3
        return wall, result.timings_ms

    for text in QUERIES[:warmup]:
        floor(text)
        query(text)
    totals, floors, stages, oriented = [], [], {'encode': [], 'coarse': [], 'captions': []}, []
    for i in range(n_queries):
        text = QUERIES[i % len(QUERIES)]
        # Alternate which runs first so caches and load spikes favour neither.
        if i % 2:
            wall, timings = query(text)
            floors.append(floor(text))
        else:
            floors.append(floor(text))
            wall, timings = query(text)
        totals.append(wall)
        oriented.append(has_orientation_words(text))
        for name in stages:
            stages[name].append(timings[name])
    plain = [t for t, o in zip(totals, oriented) if not o]
    with_words = [t for t, o in zip(totals, oriented) if o]
    p50, floor_p50 = statistics.median(totals), statistics.median(floors)
    return {
        'gallery_size': gallery_size,
        'queries': n_queries,
        'p50_ms': p50,
        'p95_ms': _pct(totals, 95),
        'floor_ms': floor_p50,
        'floor_p95_ms': _pct(floors, 95),
        'ratio_p50_to_floor': p50 / floor_p50,
        'bytes_per_item': bytes_per_item,
        'index_bytes_per_item': index_bytes / gallery_size,
        'stages_ms': {name: {'p50': _pct(v, 50), 'p95': _pct(v, 95)}
                      for name, v in stages.items()},
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
