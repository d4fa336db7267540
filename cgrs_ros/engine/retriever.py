"""Query time: coarse image-text search, caption channel, fusion.

One query costs: one text forward per encoder (two texts in one batch when the ``auto``
orientation mode needs the raw and the normalized query), one FAISS scan per channel, and a
few vectorized dot products and sorts over the candidates. Nothing at query time loops over
the gallery in Python; gallery-sized arrays are built once at open and at caption refresh.

Channels:

- coarse: image embeddings in an exact FAISS inner-product index; the query goes through the
  image encoder's text tower. Off when ``image_encoder.backend`` is ``none``.
- caption: caption text embeddings (MiniLM by default) of every captioned image.
  ``rerank`` (CGRS): score the coarse top ``coarse_k`` against their captions, fuse, re-sort.
  ``hybrid``: also search the caption index over the whole gallery and fuse the union (each
  candidate missing a channel's score gets it by a direct dot product). Off while no image
  has a caption, and skipped when ``caption_weight`` is 0 (it could not change the order).

Orientation words (``retrieval.remove_orientation_words``): ``true`` removes them from the
query everywhere, ``false`` never, ``auto`` only for satellite candidates: satellite rows are
scored (in both channels) with the normalized query, other rows with the query as said.
Before either, a leading spoken command ("fly to", "take me to") is dropped
(``retrieval.remove_command_words``, on by default).

Scores: cosine similarities (``coarse``, ``caption``) and the fused score (rerank.py).
"""

import dataclasses
import hashlib
import logging
from pathlib import Path
import threading
import time

from cgrs_ros.engine.area import items_within, SearchArea
from cgrs_ros.engine.captions import caption_source_for, caption_store_path, CaptionStore
from cgrs_ros.engine.encoders import (image_encoder_identity, load_image_encoder,
                                      load_text_encoder, text_encoder_identity)
from cgrs_ros.engine.errors import ConfigError, GalleryError, QueryError, StateError
from cgrs_ros.engine.gallery import load_gallery, PLATFORMS
from cgrs_ros.engine.image_query import (DEFAULT_QUERY_PLATFORM, no_match_reason,
                                         run_image_query)
from cgrs_ros.engine.index import IndexSettings, item_digests, PLATFORM_CODES, VectorIndex
from cgrs_ros.engine.query_norm import remove_command_words, remove_orientation_words
from cgrs_ros.engine.rerank import fuse
from cgrs_ros.engine.rerankers import make_reranker
from cgrs_ros.engine.rerankers.stage import run_stage
from cgrs_ros.engine.storage import (default_state_dir, EmbeddingStore, FileHashCache,
                                     sha256_text)
import numpy as np

logger = logging.getLogger(__name__)
SATELLITE = PLATFORM_CODES['satellite']
MAX_QUERY_CHARS = 2000
# Caption indexes (rebuilt in memory as captions arrive) and the in-memory stand-in for an
# out-of-date image index are exact: no training, built in moments.
FLAT = IndexSettings(type='flat')


@dataclasses.dataclass
class Candidate:
    """One ranked gallery image; a score is None when its channel did not score this image."""

    rank: int
    image_id: str
    platform: str
    lat: float
    lon: float
    alt: float
    heading_deg: float
    caption: str
    group_id: str
    coarse_score: float
    caption_score: float
    fused_score: float
    rerank_score: float = None   # P(match) from the reranker stage; None when not scored
    final_score: float = None    # (1 - w) * minmax(fused) + w * rerank, for the scored prefix

    def to_dict(self):
        """Return the candidate in the ``cgrs query --json`` shape."""
        return {
            'rank': self.rank, 'image_id': self.image_id, 'platform': self.platform,
            'lat': self.lat, 'lon': self.lon, 'alt': self.alt, 'heading_deg': self.heading_deg,
            'group_id': self.group_id, 'caption': self.caption,
            'scores': {'coarse': self.coarse_score, 'caption': self.caption_score,
                       'fused': self.fused_score, 'rerank': self.rerank_score,
                       'final': self.final_score},
        }


@dataclasses.dataclass
class QueryResult:
    """The answer to one query: ranked candidates and where the time went (milliseconds).

    ``no_match`` is empty, or the reason the query matches nothing in this gallery (the
    relevance floor, ``retrieval.min_caption_score``); the candidates are still listed.
    ``rerank`` says what the reranker stage did: how many candidates it scored of how many it
    was given (``scored``, ``of``), how many of those the model could not score (``failed``:
    unreadable image, failed request), whether the time budget stopped it (``budget_hit``),
    the reranker identity; empty when no stage ran.
    """

    query: str
    normalized_query: str
    candidates: list
    timings_ms: dict
    no_match: str = ''
    rerank: dict = dataclasses.field(default_factory=dict)

    def to_dict(self):
        """Return the ``cgrs query --json`` shape."""
        return {'query': self.query, 'normalized_query': self.normalized_query,
                'candidates': [c.to_dict() for c in self.candidates],
                'timings_ms': dict(self.timings_ms), 'no_match': self.no_match,
                'rerank': dict(self.rerank)}


@dataclasses.dataclass
class CandidatePool:
    """One query's candidates and each channel's score, before fusion (Retriever.candidates).

    ``items`` are gallery positions: the first ``n_coarse`` from the coarse search, the rest
    added by the caption channel's own search (hybrid). ``coarse`` / ``caption`` hold a score
    per item (NaN where the channel has none), or are None when the channel did not run.
    ``said`` is the query the reranker reads, ``reported`` the normalized query a result
    reports, ``captions`` the caption snapshot (``captions.texts[item]``), ``t_encode`` and
    ``t_coarse`` the ``perf_counter`` times the encode and coarse stages ended.
    """

    text: str
    said: str
    reported: str
    items: np.ndarray
    coarse: np.ndarray
    caption: np.ndarray
    n_coarse: int
    captions: object
    t_encode: float
    t_coarse: float

    def channels(self, caption_weight):
        """Return ``(items, coarse, caption)`` as a query at ``caption_weight`` fuses them.

        At weight 0 a query skips the caption channel when an image channel exists: only the
        coarse search's candidates, with no caption scores.
        """
        if caption_weight == 0.0 and self.coarse is not None and self.caption is not None:
            n = self.n_coarse
            return self.items[:n], self.coarse[:n], None
        return self.items, self.coarse, self.caption


def fuse_candidates(coarse, caption, retrieval, caption_weight=None):
    """Return ``(fused, order)`` of one query's candidates: rerank.fuse, then best first.

    ``retrieval`` is the retrieval config section; ``caption_weight`` overrides its weight.
    Ties keep candidate order (stable sort). Queries and ``cgrs eval --tune-weights`` both
    rank through here.
    """
    weight = retrieval.caption_weight if caption_weight is None else caption_weight
    fused = fuse(coarse, caption, retrieval.fusion, weight, retrieval.rrf_k)
    return fused, np.argsort(-fused, kind='stable')


def image_index_fingerprint(identity, items, hashes):
    """Hash of everything an image index depends on: encoder, item order, ids, contents."""
    digest = hashlib.sha256(identity.encode('utf-8'))
    for item, content in zip(items, hashes):
        digest.update(f'\n{item.image_id}\t{item.platform}\t{content or ""}'.encode('utf-8'))
    return digest.hexdigest()


def image_index_path(state_dir):
    """Return the base path (no suffix) of the persisted image index in a state folder."""
    return state_dir / 'index' / 'image'


def _none_if_nan(value):
    return None if value is None or not np.isfinite(value) else float(value)


@dataclasses.dataclass(frozen=True)
class _CaptionState:
    """Caption channel data, swapped as one object so queries never see half an update."""

    index: VectorIndex = None
    texts: tuple = ()          # caption per item (None without)
    by_hash: dict = None       # content hash -> caption text
    seq: int = 0               # caption store sequence number seen so far


class Retriever:
    """Text-to-image geo-retrieval over one indexed gallery (see the module docstring)."""

    def __init__(self, gallery, config, image_encoder=None, image_index=None,
                 text_encoder=None, captions=None, item_hashes=None, state_dir=None,
                 reranker=None):
        """Assemble a retriever; use :meth:`open` (or :meth:`from_arrays` for synthetic data)."""
        self.gallery = gallery
        self.reranker = reranker
        self.config = config
        self.state_dir = state_dir
        self._image_encoder = image_encoder
        self._image_index = image_index
        self._text_encoder = text_encoder
        self._captions = captions or _CaptionState(texts=(None,) * len(gallery), by_hash={})
        self._item_hashes = item_hashes
        self._codes = platform_codes(gallery)
        self._refresh_lock = threading.Lock()
        self._load_lock = threading.Lock()
        self._store = None
        self._text_store = None
        self._items_by_hash = {}
        if item_hashes is not None:
            for i, content in enumerate(item_hashes):
                if content:
                    self._items_by_hash.setdefault(content, []).append(i)

    # ------------------------------------------------------------------ construction

    @classmethod
    def open(cls, gallery_dir, config, state_dir=None):  # noqa: A003 (the contract's name)
        """Open an indexed gallery (run ``cgrs index`` first) with the encoders it needs.

        State files are checked as they are opened (storage.py, "Integrity"; nothing is
        checked per query): a damaged one raises StateError naming the file and the
        ``cgrs index`` command for this gallery, which repairs it.
        """
        try:
            return cls._open(gallery_dir, config, state_dir)
        except StateError as exc:
            raise exc.for_gallery(gallery_dir, state_dir) from None

    @classmethod
    def _open(cls, gallery_dir, config, state_dir):
        gallery = load_gallery(gallery_dir, check_images='exists')
        state_dir = Path(default_state_dir(gallery_dir) if state_dir is None else state_dir)
        if not (state_dir / 'state.sqlite').is_file():
            raise GalleryError(f'{gallery_dir} has not been indexed (no state in {state_dir}); '
                               f'run `cgrs index {gallery_dir}` first')
        hash_cache = FileHashCache(state_dir)
        recorded = hash_cache.recorded()
        hash_cache.close()
        hashes = [recorded.get(item.path) for item in gallery.items]
        image_index, image_encoder = None, None
        if config.image_encoder.backend != 'none':
            identity = image_encoder_identity(config.image_encoder)
            image_index = cls._load_image_index(state_dir, gallery, hashes, identity, config)
            if image_index is None or not len(image_index):
                raise GalleryError(
                    f'no image embeddings for {identity} in {state_dir}; run `cgrs index '
                    f'{gallery_dir}` with this config first')
            image_encoder = load_image_encoder(config.image_encoder)
        retriever = cls(gallery, config, image_encoder=image_encoder, image_index=image_index,
                        item_hashes=hashes, state_dir=state_dir)
        retriever._store = CaptionStore(caption_store_path(state_dir))
        try:
            retriever._sync_captions()
        except BaseException:
            retriever.close()
            raise
        if retriever._captions.index is not None:
            retriever._text_encoder_loaded()  # now, not on the first query
        if image_index is None and retriever._captions.index is None:
            retriever.close()
            raise ConfigError(
                f'nothing to search in {gallery_dir}: image_encoder.backend is none and no '
                'image has a caption; configure an image encoder, or add descriptions / run '
                '`cgrs caption` and `cgrs index`')
        try:
            retriever.use_reranker(make_reranker(config.reranker))
        except BaseException:
            retriever.close()
            raise
        return retriever

    @staticmethod
    def _load_image_index(state_dir, gallery, hashes, identity, config):
        expect = {'identity': identity,
                  'fingerprint': image_index_fingerprint(identity, gallery.items, hashes)}
        try:
            index = VectorIndex.load(image_index_path(state_dir), len(gallery), expect,
                                     settings=config.index)
        except StateError as exc:
            # Damaged, but derived data: rebuilt from the (checked) embeddings it came from,
            # the ranking is the same; `cgrs index` writes it again.
            custom = None if state_dir == default_state_dir(gallery.root) else state_dir
            logger.warning('%s; meanwhile the index is built in memory from the stored '
                           'embeddings', exc.for_gallery(gallery.root, custom))
        else:
            if index is not None:
                return index
            # The gallery changed since the last `cgrs index` (or the index file is gone):
            # build the index in memory from whatever embeddings exist; the next index run
            # persists it.
            logger.info('image index out of date; building it from stored embeddings')
        store = EmbeddingStore.for_encoder(state_dir, 'image', identity)
        keys, matrix = store.load()
        # Exact: built in moments (no training); `cgrs index` persists the configured type.
        return build_image_index(gallery, hashes, keys, matrix, FLAT)

    @classmethod
    def from_arrays(cls, gallery, config, image_encoder=None, image_vectors=None,
                    text_encoder=None, caption_texts=None, caption_vectors=None,
                    reranker=None, log=None):
        """Build a retriever from in-memory vectors aligned with ``gallery.items``.

        ``image_vectors`` (n, d) and ``caption_vectors`` (n, d_text) are L2-normalized rows;
        ``caption_texts`` has one caption or None per item (rows of items without a caption
        are ignored). The image index is of the type ``config.index`` asks for (``log``
        hears its build steps); the caption index is exact. Used by benchmarks and tests;
        :meth:`open` is the normal way in.
        """
        n = len(gallery)
        codes = platform_codes(gallery)
        image_index = None
        if image_vectors is not None:
            image_index = VectorIndex.build(image_vectors, np.arange(n), codes, n,
                                            settings=config.index, log=log)
        captions = None
        if caption_texts is not None:
            have = np.array([i for i, text in enumerate(caption_texts) if text], dtype=np.int64)
            index = (VectorIndex.build(np.asarray(caption_vectors)[have], have,
                                       np.asarray(codes)[have], n, settings=FLAT)
                     if len(have) else None)
            captions = _CaptionState(index=index, texts=tuple(caption_texts), by_hash={})
        return cls(gallery, config, image_encoder=image_encoder, image_index=image_index,
                   text_encoder=text_encoder, captions=captions, reranker=reranker)

    def use_reranker(self, reranker):
        """Set the reranker stage's model (None: no stage), preparing it for this gallery.

        A reranker with per-caption inputs (``prepare``) computes them for the gallery's
        captions now, once, instead of on the first queries that meet them.
        """
        self.reranker = reranker
        if reranker is not None and hasattr(reranker, 'prepare'):
            reranker.prepare(self._captions.texts)

    def close(self):
        """Release the caption store connection and the reranker."""
        if self.reranker is not None:
            self.reranker.close()
            self.reranker = None
        if self._store is not None:
            self._store.close()
            self._store = None

    # ------------------------------------------------------------------ captions

    def _text_encoder_loaded(self):
        if self._text_encoder is None:
            with self._load_lock:  # a query and a caption refresh may both get here first
                if self._text_encoder is None:
                    self._text_encoder = load_text_encoder(self.config.text_encoder)
        return self._text_encoder

    def _sync_captions(self):
        """Fold captions written to the store since the last sync in; return items changed."""
        old = self._captions
        source = caption_source_for(self.config.captioner)
        rows, newest = self._store.ok_captions(source, since_seq=old.seq)
        changed = {content: text for content, (text, _) in rows.items()
                   if content in self._items_by_hash and old.by_hash.get(content) != text}
        if not changed:
            self._captions = dataclasses.replace(old, seq=newest)
            return 0
        by_hash = dict(old.by_hash)
        by_hash.update(changed)
        texts = list(old.texts)
        changed_items = []
        for content, text in changed.items():
            for i in self._items_by_hash[content]:
                texts[i] = text
                changed_items.append(i)
        new_vectors = self._caption_vectors([texts[i] for i in changed_items])
        # Keep the vectors of unchanged captioned items, add or replace the changed ones.
        n = len(self.gallery)
        dim = new_vectors.shape[1]
        vectors = np.zeros((0, dim), dtype=np.float32)
        items = np.zeros(0, dtype=np.int64)
        if old.index is not None:
            keep = np.ones(n, dtype=bool)
            keep[changed_items] = False
            old_items = old.index.row_items[keep[old.index.row_items]]
            vectors = old.index.vectors(old.index.item_rows[old_items])
            items = old_items
        items = np.concatenate([items, np.asarray(changed_items, dtype=np.int64)])
        vectors = np.concatenate([vectors, new_vectors])
        index = VectorIndex.build(vectors, items, self._codes[items], n, settings=FLAT)
        self._captions = _CaptionState(index=index, texts=tuple(texts), by_hash=by_hash,
                                       seq=newest)
        return len(changed_items)

    def _caption_vectors(self, texts):
        """Vectors of caption texts: from the text embedding store, embedding what is missing."""
        identity = text_encoder_identity(self.config.text_encoder)
        if self._text_store is None:
            self._text_store = EmbeddingStore.for_encoder(self.state_dir, 'text', identity)
        keys = [sha256_text(text) for text in texts]
        found_keys, found = self._text_store.lookup(set(keys))
        vector_of = dict(zip(found_keys, found))
        missing = sorted({key for key in keys if key not in vector_of})
        if missing:
            # Captions written after the last `cgrs index` (e.g. by the captioning node).
            text_of = dict(zip(keys, texts))
            fresh = self._text_encoder_loaded().encode_texts([text_of[k] for k in missing])
            self._text_store.add(missing, fresh)
            vector_of.update(zip(missing, fresh))
        return np.ascontiguousarray(np.stack([vector_of[key] for key in keys]),
                                    dtype=np.float32)

    def refresh_captions(self):
        """Pick up captions added to the store since open; return how many images changed."""
        if self._store is None:
            return 0
        with self._refresh_lock:
            return self._sync_captions()

    # ------------------------------------------------------------------ queries

    def stats(self):
        """Return gallery size, how many images are indexed and captioned, encoder identities."""
        captions = self._captions
        captioned = len(captions.index) if captions.index is not None else 0
        n = len(self.gallery)
        return {
            'gallery_size': n,
            'indexed': len(self._image_index) if self._image_index is not None else 0,
            'captioned': captioned,
            'caption_coverage': captioned / n if n else 0.0,
            'image_encoder': self._image_encoder.identity if self._image_encoder else None,
            'text_encoder': (self._text_encoder.identity if self._text_encoder
                             else text_encoder_identity(self.config.text_encoder)),
        }

    def _check_query(self, text, top_k, platform):
        if not isinstance(text, str) or not text.strip():
            raise QueryError('the query text is empty; describe the place to go to')
        if not any(ch.isalnum() for ch in text):
            raise QueryError('the query has no letters or digits; describe the place to go to')
        if len(text) > MAX_QUERY_CHARS:
            raise QueryError(f'the query is {len(text)} characters long; keep it under '
                             f'{MAX_QUERY_CHARS}')
        if top_k is not None and (not isinstance(top_k, (int, np.integer)) or top_k < 1):
            raise QueryError(f'top_k {top_k!r} must be a positive integer')
        if platform is not None and platform not in PLATFORMS:
            raise QueryError(f'platform {platform!r} is not one of {", ".join(PLATFORMS)}')

    @staticmethod
    def _groups(vectors, platform):
        """(vector, platform codes) search groups: one per set of platforms sharing a vector.

        Platforms get different vectors in ``auto`` orientation mode (satellite) and with
        platform-expert encoders; platforms with the same vector are searched together.
        """
        if platform is not None:
            code = PLATFORM_CODES[platform]
            return [(vectors[code], (code,))]
        groups = []
        for code in range(len(PLATFORMS)):
            if groups and np.array_equal(groups[-1][0], vectors[code]):
                groups[-1] = (groups[-1][0], groups[-1][1] + (code,))
            else:
                groups.append((vectors[code], (code,)))
        return groups

    def _encode_query(self, encoder, threads, texts, sat_text, other_text):
        """Encode the distinct query texts in one batch; return one vector per platform code.

        Satellite rows get the satellite text, the others the other text; an image encoder
        with platform experts also projects the query by each platform's expert.
        """
        if getattr(encoder, 'platform_experts', False):  # image encoders with experts only
            encoded = encoder.encode_texts_per_platform(texts, threads=threads)
        else:
            encoded = np.broadcast_to(encoder.encode_texts(texts, threads=threads),
                                      (len(PLATFORMS), len(texts), encoder.dim))
        index = {text: i for i, text in enumerate(texts)}
        return [encoded[code][index[sat_text if code == SATELLITE else other_text]]
                for code in range(len(PLATFORMS))]

    def candidates(self, text, top_k=None, platform=None, on_stage=None, with_captions=False,
                   near=None):
        """Return a query's :class:`CandidatePool`: encode, coarse search, caption channel.

        The first half of :meth:`query` (arguments alike). The caption channel is skipped when
        ``caption_weight`` is 0 and an image channel exists, unless ``with_captions`` (``cgrs
        eval --tune-weights`` re-fuses one pool at several weights, 0 included).
        """
        stage = on_stage or (lambda name, progress: None)
        self._check_query(text, top_k, platform)
        area = items_within(self.gallery, near)  # item indices inside the area, or None
        cfg = self.config.retrieval
        top_k = int(top_k or cfg.top_k)
        image_index = self._image_index
        captions = self._captions  # one snapshot: a concurrent refresh swaps the whole object
        caption_index = captions.index
        if image_index is not None and cfg.caption_weight == 0.0 and not with_captions:
            caption_index = None  # the caption channel could not change the order: skip it
        if image_index is None and caption_index is None:
            raise ConfigError('nothing to search: no image embeddings and no captions; run '
                              '`cgrs index` with an image encoder or captions')
        text = ' '.join(text.split())
        said = remove_command_words(text) if cfg.remove_command_words else text
        normalized = remove_orientation_words(said)
        if cfg.remove_orientation_words == 'false':
            normalized = said
        sat_text = normalized
        other_text = normalized if cfg.remove_orientation_words == 'true' else said
        texts = list(dict.fromkeys([other_text, sat_text]))
        stage('encode', 0.2)
        image_q = (self._encode_query(self._image_encoder,
                                      self.config.image_encoder.query_threads, texts, sat_text,
                                      other_text) if image_index is not None else None)
        caption_q = (self._encode_query(self._text_encoder_loaded(),
                                        self.config.text_encoder.query_threads, texts, sat_text,
                                        other_text) if caption_index is not None else None)
        t_encode = time.perf_counter()

        k_search = max(cfg.coarse_k, top_k)
        coarse_scores = caption_scores = None
        stage('coarse', 0.5)
        if image_index is not None:
            items, coarse_scores = image_index.search(
                self._groups(image_q, platform), k_search,
                rows=None if area is None else image_index.rows_of_items(area))
            coarse_scores = coarse_scores.astype(np.float64)
        t_coarse = time.perf_counter()
        n_coarse = 0 if coarse_scores is None else len(items)

        stage('captions', 0.6)
        if caption_index is not None:
            if image_index is None or cfg.caption_channel == 'hybrid':
                cap_items, cap_scores = caption_index.search(
                    self._groups(caption_q, platform), k_search,
                    rows=None if area is None else caption_index.rows_of_items(area))
                if image_index is None:
                    items, caption_scores = cap_items, cap_scores.astype(np.float64)
                else:
                    # Union (coarse order first), then fill each candidate's missing score.
                    extra = cap_items[~np.isin(cap_items, items)]
                    items = np.concatenate([items, extra])
                    extra_q = np.stack(image_q)[self._codes[extra]]
                    coarse_scores = np.concatenate(
                        [coarse_scores, image_index.scores_for(extra, extra_q)])
            if caption_scores is None:
                caption_scores = caption_index.scores_for(
                    items, np.stack(caption_q)[self._codes[items]])
        reported = normalized if cfg.remove_orientation_words != 'false' else said
        return CandidatePool(text=text, said=said, reported=reported, items=items,
                             coarse=coarse_scores, caption=caption_scores, n_coarse=n_coarse,
                             captions=captions, t_encode=t_encode, t_coarse=t_coarse)

    def query(self, text, top_k=None, platform=None, on_stage=None, near=None):
        """Rank gallery images for a description; returns a :class:`QueryResult`.

        ``on_stage(stage, progress)``, when given, is called as each stage starts ('encode',
        'coarse', 'captions', and 'rerank i/k' before each reranker call; progress 0..1). It
        may raise to abandon the query (the ROS node does so when its action goal is
        cancelled). ``near`` = ``(lat, lon, radius_m)`` keeps only images within that
        geodesic radius, inside each channel's search (area.py), as :meth:`query_image` does.
        """
        start = time.perf_counter()
        stage = on_stage or (lambda name, progress: None)
        area = SearchArea.parse(near)
        pool = self.candidates(text, top_k, platform, stage, near=area)
        cfg = self.config.retrieval
        top_k = int(top_k or cfg.top_k)
        items, coarse_scores, caption_scores = pool.items, pool.coarse, pool.caption
        captions, said = pool.captions, pool.said
        t_encode, t_coarse = pool.t_encode, pool.t_coarse
        fused, order = fuse_candidates(coarse_scores, caption_scores, cfg)
        no_match = ''
        if caption_scores is not None and cfg.min_caption_score is not None:
            finite = caption_scores[np.isfinite(caption_scores)]
            best = float(finite.max()) if len(finite) else float('-inf')
            if best < cfg.min_caption_score:
                no_match = (f'nothing here matches the goal: the best caption similarity is '
                            f'{best:.2f}, under retrieval.min_caption_score '
                            f'{cfg.min_caption_score:g}; describe the place (what it is, its '
                            'colours, what is near it)')
        if area is not None and not len(items):
            no_match = no_match_reason(platform, area)
        t_captions = time.perf_counter()
        rerank, final, rerank_info = None, None, {}
        if self.reranker is not None:
            outcome = self._rerank(said, order, items, fused, captions, stage,
                                   coarse_scores, caption_scores)
            rerank, final = np.full(len(fused), np.nan), np.full(len(fused), np.nan)
            rerank[order], final[order] = outcome.rerank, outcome.final
            order = order[outcome.order]
            rerank_info = {'scored': outcome.scored, 'of': outcome.considered,
                           'failed': int(np.isnan(outcome.rerank[:outcome.scored]).sum()),
                           'budget_hit': outcome.budget_hit,
                           'reranker': self.reranker.identity}
        order = order[:top_k]
        candidates = []
        for rank, pos in enumerate(order, start=1):
            item = self.gallery.items[items[pos]]
            candidates.append(Candidate(
                rank=rank, image_id=item.image_id, platform=item.platform, lat=item.lat,
                lon=item.lon, alt=item.alt, heading_deg=item.heading_deg,
                caption=captions.texts[items[pos]], group_id=item.group_id,
                coarse_score=(_none_if_nan(coarse_scores[pos]) if coarse_scores is not None
                              else None),
                caption_score=(_none_if_nan(caption_scores[pos]) if caption_scores is not None
                               else None),
                fused_score=float(fused[pos]),
                rerank_score=_none_if_nan(rerank[pos]) if rerank is not None else None,
                final_score=_none_if_nan(final[pos]) if final is not None else None))
        end = time.perf_counter()
        timings = {'encode': (t_encode - start) * 1e3, 'coarse': (t_coarse - t_encode) * 1e3,
                   'captions': (t_captions - t_coarse) * 1e3,
                   'rerank': (end - t_captions) * 1e3, 'total': (end - start) * 1e3}
        return QueryResult(query=pool.text, normalized_query=pool.reported,
                           candidates=candidates,
                           timings_ms=timings, no_match=no_match, rerank=rerank_info)

    def _rerank(self, query, order, items, fused, captions, stage, coarse, caption):
        """Run the reranker stage over the candidates in ``order`` (see rerankers/stage.py)."""
        ranked = items[order]
        rows = [self.gallery.items[i] for i in ranked]

        def progress(done, total):
            stage(f'rerank {done}/{total}', 0.7 + 0.2 * done / max(total, 1))

        return run_stage(self.reranker, self.config.reranker, query, fused[order],
                         [self.gallery.path_of(row) for row in rows],
                         [row.platform for row in rows],
                         [captions.texts[i] for i in ranked], on_progress=progress,
                         coarse=None if coarse is None else coarse[order],
                         caption=None if caption is None else caption[order])

    def query_image(self, image, top_k=None, platform=None, on_stage=None, near=None,
                    query_platform=DEFAULT_QUERY_PLATFORM):
        """Rank gallery images for a photo; returns a :class:`QueryResult` (image_query.py).

        ``image`` is a decoded PIL image (``gallery.decode_image`` / ``decode_image_bytes``),
        embedded by the image encoder's image tower (through the ``query_platform`` expert
        when the encoder has platform experts); the coarse score is the cosine with each
        gallery image. ``platform`` keeps one platform's images (e.g. 'satellite' for drone ->
        satellite); ``near`` = ``(lat, lon, radius_m)`` only images within that geodesic
        radius, applied inside the FAISS search so k results come back when k images pass;
        an empty area gives no candidates and a ``no_match`` reason. ``on_stage`` as in
        :meth:`query` ('encode', 'coarse'). Raises ConfigError when ``image_encoder.backend``
        is ``none`` and QueryError for a bad image or option.
        """
        return run_image_query(self, image, top_k=top_k, platform=platform,
                               on_stage=on_stage, near=near, query_platform=query_platform)


def platform_codes(gallery):
    """Return the platform code of every gallery item (int64 array).

    A gallery held as columns (a synthetic benchmark gallery of 10M items) hands its codes
    over with ``gallery.platform_codes()``; others are read item by item.
    """
    columns = getattr(gallery, 'platform_codes', None)
    if columns is not None:
        return np.asarray(columns(), dtype=np.int64)
    return np.array([PLATFORM_CODES[item.platform] for item in gallery.items], dtype=np.int64)


def image_item_keys(identity, items, hashes):
    """Return each item's int64 digest as an image index row knows it (id, platform, content).

    It is what lets ``cgrs index`` add new items to a saved index instead of rebuilding it.
    """
    return item_digests(f'{identity}\t{item.image_id}\t{item.platform}\t{content or ""}'
                        for item, content in zip(items, hashes))


def build_image_index(gallery, hashes, keys, matrix, settings=None, identity='', log=None):
    """Build the image VectorIndex for items whose content hash has a stored embedding.

    ``settings``: the ``index`` config section (type, training, recall); ``identity`` (the
    image encoder's) goes into each row's digest (:func:`image_item_keys`).
    """
    row_of = {key: row for row, key in enumerate(keys)}
    items = np.array([i for i, content in enumerate(hashes) if content in row_of],
                     dtype=np.int64)
    if not len(items):
        return None
    rows = [row_of[hashes[i]] for i in items]
    codes = [PLATFORM_CODES[gallery.items[i].platform] for i in items]
    digests = image_item_keys(identity, [gallery.items[i] for i in items],
                              [hashes[i] for i in items])
    return VectorIndex.build(matrix[rows], items, codes, len(gallery), settings=settings,
                             item_keys=digests, log=log)
