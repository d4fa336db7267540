"""FAISS inner-product search over L2-normalized vectors: exact or approximate, filtered inside.

Index types (config section ``index``, :class:`IndexSettings`), all built with FAISS's
``index_factory``:

- ``flat``: exact scan (IndexFlatIP). Below ``index.flat_max`` rows (100k) a scan costs less
  than encoding the query, so ``auto`` keeps it there.
- ``ivf_hnsw_sq8``: inverted lists with an HNSW coarse quantizer, 8-bit scalar codes (d bytes
  per vector); ``auto`` from ``flat_max`` to ``index.pq_min`` rows (4M).
- ``ivf_hnsw_pq``: the same with product-quantization codes (``pq_m`` bytes per vector, d/4 by
  default); ``auto`` from ``pq_min`` rows: what fits 10M images in a few hundred bytes each.
- ``ivf_hnsw_flat`` (float32 lists) and ``hnsw`` (an HNSW graph over float32 vectors) on
  request.

The approximate types are trained on a random sample (``index.train_size``; 40 vectors per
list by default) and their search breadth (``nprobe`` for IVF, ``efSearch`` for HNSW) is, unless
configured, tuned at build time: the smallest breadth whose recall@10 against an exact scan
reaches ``index.target_recall`` on held-out gallery vectors (each one's own row left out of
both lists). The recall is stored with the index and printed by ``cgrs index``.

Filters run inside the search, never after a top-k. Each row remembers its platform; a query
asks for a set of platforms (a contiguous row range when rows are sorted by platform, the
case after a full build, else a bitmap) and optionally an explicit set of rows (a search area,
area.py). A filtered set of at most ``index.exact_filter_max`` rows is scored exactly (its
vectors gathered, or decoded from their codes, and multiplied by the query): that is what
makes a radius query cheaper than an unfiltered one at any gallery size. A larger set goes to
FAISS as a selector, with the search breadth widened by the inverse of the share of rows that
pass, so about as many passing candidates are met as an unfiltered search meets.

A saved index is three files: ``NAME.<token>.faiss``, ``NAME.<token>.rows.npy`` (per row:
gallery item, 64-bit digest of the item's identity, platform code) and ``NAME.json``
(identity, fingerprint, type, search breadth, recall, both files' names, sizes and SHA-256).
The JSON is written last and is the commit: an interrupted build or save leaves the previous
index whole.
:meth:`VectorIndex.check` / :meth:`VectorIndex.load` tell an index that is out of date (None:
rebuild it, nothing is wrong) from one that is damaged (StateError naming the file); the
checksum is what catches flipped bytes inside the vectors: FAISS reads such a file without
complaint and ranks with it. Indexes open memory-mapped (``index.mmap``), so a 10M-row index
opens in the time its checksum takes. Rows are appended to a trained index without retraining
(:meth:`VectorIndex.add`), which is how ``cgrs index`` adds new images to a large gallery.
"""

import contextlib
import errno
import hashlib
import math
import os
from pathlib import Path
import re
import secrets
import time
from typing import Literal, Optional

from cgrs_ros.engine.errors import StateError
from cgrs_ros.engine.gallery import PLATFORMS
from cgrs_ros.engine.sections import SectionSettings
from cgrs_ros.engine.storage import (atomic_replace, atomic_write_bytes, atomic_write_json,
                                     npy_bytes, read_json, sha256_file)
import faiss
import numpy as np
import pydantic

PLATFORM_CODES = {name: code for code, name in enumerate(PLATFORMS)}
ALL_PLATFORMS = tuple(range(len(PLATFORMS)))
INDEX_TYPES = ('auto', 'flat', 'ivf_hnsw_flat', 'ivf_hnsw_sq8', 'ivf_hnsw_pq', 'hnsw')
FORMAT = 2
RECALL_K = 10
_CHUNK = 65536
# Search breadths tried by the build-time tuning, smallest first.
_BREADTHS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 2048,
             4096, 8192, 16384, 32768, 65536)


class IndexSettings(SectionSettings):
    """The ``index`` section of the engine configuration (how the image index is built)."""

    model_config = pydantic.ConfigDict(extra='forbid')
    SECTION = 'index'

    type: Literal[INDEX_TYPES] = pydantic.Field(  # noqa: A003 (the config key's name)
        'auto', description='auto picks by gallery size: flat, then ivf_hnsw_sq8, then '
                            'ivf_hnsw_pq (see flat_max, pq_min).')
    flat_max: int = pydantic.Field(100_000, ge=0, description='auto: exact below this many rows.')
    pq_min: int = pydantic.Field(4_000_000, ge=1, description='auto: PQ codes from this many.')
    nlist: Optional[int] = pydantic.Field(
        None, ge=1, le=1 << 20, description='IVF lists; null: about 1.5 sqrt(rows), a power of 2.')
    nprobe: Optional[int] = pydantic.Field(
        None, ge=1, description='IVF lists searched; null: tuned at build to reach target_recall.')
    ef_search: Optional[int] = pydantic.Field(
        None, ge=1, description='HNSW breadth (type hnsw); null: tuned like nprobe.')
    hnsw_m: int = pydantic.Field(32, ge=4, le=256, description='HNSW links per node.')
    pq_m: Optional[int] = pydantic.Field(
        None, ge=1, description='PQ bytes per vector (divides the dimension); null: dim / 4.')
    train_size: Optional[int] = pydantic.Field(
        None, ge=1, description='Training sample; null: 40 per IVF list (at least 10000).')
    recall_queries: int = pydantic.Field(
        500, ge=10, description='Held-out vectors recall@10 is measured with at build time.')
    target_recall: float = pydantic.Field(0.95, gt=0.0, le=1.0)
    exact_filter_max: int = pydantic.Field(
        50_000, ge=0, description='Filtered searches over at most this many rows score them '
                                  'exactly.')
    mmap: bool = pydantic.Field(True, description='Open saved indexes memory-mapped.')
    seed: int = 0


def resolve_type(settings, n):
    """Return the index type ``settings`` asks for at ``n`` rows (``auto`` resolved)."""
    if settings.type != 'auto':
        return settings.type
    if n < max(settings.flat_max, 1):
        return 'flat'
    return 'ivf_hnsw_sq8' if n < settings.pq_min else 'ivf_hnsw_pq'


def auto_nlist(n):
    """Return the default IVF list count: a power of 2 near 1.5 sqrt(n), 39+ rows per list."""
    nlist = 2 ** round(math.log2(max(1.5 * math.sqrt(max(n, 1)), 1)))
    return int(max(1, min(nlist, 65536, n // 39)))


def factory_string(kind, dim, n, settings):
    """Return the ``index_factory`` description of an index type for ``n`` rows of ``dim``."""
    m = settings.hnsw_m
    if kind == 'flat':
        return 'Flat'
    if kind == 'hnsw':
        return f'HNSW{m}'
    nlist = settings.nlist or auto_nlist(n)
    codes = {'ivf_hnsw_flat': 'Flat', 'ivf_hnsw_sq8': 'SQ8'}.get(kind)
    if codes is None:
        pq_m = settings.pq_m or max(1, dim // 4)
        if dim % pq_m:
            raise ValueError(f'index.pq_m {pq_m} must divide the vector dimension {dim}')
        codes = f'PQ{pq_m}np'  # np: no polysemous training (minutes, for a filter unused)
    # An HNSW quantizer only pays off over many lists; a handful are scanned exactly.
    quantizer = f'_HNSW{m}' if nlist >= 256 else ''
    return f'IVF{nlist}{quantizer},{codes}'


def item_digests(keys):
    """Return 64-bit digests (int64) of item identity strings, for matching rows to items."""
    return np.array([int.from_bytes(hashlib.blake2b(key.encode('utf-8'), digest_size=8)
                                    .digest(), 'little', signed=True) for key in keys],
                    dtype=np.int64)


_ERRNO_OF = {os.strerror(code): code for code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)}


def write_faiss_index(index, path):
    """Write a FAISS index atomically (temp file, fsync, rename); return (bytes, SHA-256)."""
    with atomic_replace(path) as tmp:
        try:
            faiss.write_index(index, tmp)
        except RuntimeError as exc:
            # FAISS reports a failed write (a full disk, a file-size limit) as a RuntimeError
            # naming the C++ check; say it as the OS error it is, so the CLI words it.
            reason = re.search(r'\(([^()]*)\)\s*$', str(exc))
            if 'write error' not in str(exc):
                raise
            raise OSError(errno.EIO if reason is None else _ERRNO_OF.get(reason[1], errno.EIO),
                          reason[1] if reason else 'write error', str(path)) from None
        written = (Path(tmp).stat().st_size, sha256_file(tmp))
    return written


@contextlib.contextmanager
def _one_thread():
    """Run FAISS on one OpenMP thread in this thread (others keep their setting).

    One query gains nothing from threads on a few shared cores and loses to threads waiting
    on each other: decoding 2,000 rows took 4.7 ms on one thread and 12 ms on two here.
    """
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(previous)


def _rows_in(rows, rng):
    rows = np.asarray(rows)
    return rows[(rows >= rng[0]) & (rows < rng[1])]


class VectorIndex:
    """A FAISS index whose rows are gallery items (see the module docstring).

    ``row_items[r]`` is the gallery item index of row ``r``; ``item_rows[i]`` the row of item
    ``i`` (-1 when the item has no vector); ``row_codes[r]`` the platform code of row ``r``;
    ``row_keys[r]`` the digest of the item's identity when the index was built (or 0).
    ``info`` says how it was built (type, factory, breadth, recall, timings).
    """

    def __init__(self, index, row_items, row_codes, n_items, row_keys=None, info=None,
                 settings=None):
        """Wrap a built index (use :meth:`build` or :meth:`load`)."""
        self.index = index
        self.settings = settings or IndexSettings()
        self.row_items = np.asarray(row_items, dtype=np.int64)
        self.row_codes = np.asarray(row_codes, dtype=np.int8)
        self.row_keys = (np.zeros(len(self.row_items), dtype=np.int64) if row_keys is None
                         else np.asarray(row_keys, dtype=np.int64))
        self.item_rows = np.full(n_items, -1, dtype=np.int64)
        self.item_rows[self.row_items] = np.arange(len(self.row_items))
        self.dim = index.d
        self.info = dict(info or {})
        self.info.setdefault('type', 'flat')
        self._ivf = faiss.try_extract_index_ivf(index)
        self._hnsw = faiss.downcast_index(index) if isinstance(
            faiss.downcast_index(index), faiss.IndexHNSW) else None
        self._selections = {}
        self._places = None
        self._mapping = None
        self._lists = {}
        self.matrix = self._flat_matrix()

    def _flat_matrix(self):
        """Return a zero-copy view of the float32 vectors of a flat or HNSW index, else None."""
        flat = faiss.downcast_index(self.index)
        if isinstance(flat, faiss.IndexHNSW):
            flat = faiss.downcast_index(flat.storage)
        if not isinstance(flat, faiss.IndexFlat):
            return None
        total = flat.ntotal * flat.d
        return (faiss.rev_swig_ptr(flat.get_xb(), total).reshape(flat.ntotal, flat.d)
                if total else np.zeros((0, flat.d), dtype=np.float32))

    def __len__(self):
        return int(self.index.ntotal)

    @property
    def kind(self):
        """Return the index type name ('flat', 'ivf_hnsw_pq', ...)."""
        return self.info['type']

    # ------------------------------------------------------------------ building

    @classmethod
    def build(cls, vectors, item_indices, platform_codes, n_items, settings=None,
              item_keys=None, log=None):
        """Build from vectors of items ``item_indices`` with platform codes (any order).

        ``vectors`` may be any array-like that slices into float32 rows (a memory map or a
        chunk generator): it is read in chunks, so the vectors need not fit in memory. Rows are
        sorted by platform, then by item. ``item_keys`` (int64 digests, :func:`item_digests`)
        let a later build recognise the items again (:meth:`add`).
        """
        settings = IndexSettings.from_section(settings)
        say = log or (lambda message: None)
        item_indices = np.asarray(item_indices, dtype=np.int64)
        codes = np.asarray(platform_codes, dtype=np.int64)
        order = np.lexsort((item_indices, codes))  # by platform, then manifest order
        n, dim = len(order), int(vectors.shape[1])
        kind = resolve_type(settings, n)
        factory = factory_string(kind, dim, n, settings)
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
        info = {'type': kind, 'factory': factory, 'rows': n}
        start = time.perf_counter()
        sample = np.zeros(0, dtype=np.int64)
        if not index.is_trained:
            rng = np.random.default_rng(settings.seed)
            ivf = faiss.try_extract_index_ivf(index)
            size = settings.train_size or max(10_000, 40 * (ivf.nlist if ivf else 1))
            sample = np.sort(rng.choice(n, size=min(n, size), replace=False))
            if ivf is not None:
                ivf.cp.niter = 10  # k-means rounds (FAISS: 25): keeps a 10M build in minutes
            pq = getattr(faiss.downcast_index(ivf), 'pq', None) if ivf is not None else None
            if pq is not None:  # one k-means per sub-vector: 128 of them took 71 s here
                pq.cp.niter, pq.cp.max_points_per_centroid = 10, 64
            say(f'training {factory} on {len(sample)} of {n} vectors')
            index.train(np.ascontiguousarray(_take(vectors, order[sample]), dtype=np.float32))
        info['trained_rows'] = int(len(sample))
        info['train_s'] = time.perf_counter() - start
        # Recall is measured with held-out vectors that are not in the index yet (a query
        # that is in an HNSW graph finds its own neighbours at any breadth, and reports 0.97
        # where unseen queries get 0.39); they are added once the breadth is chosen.
        held = np.zeros(0, dtype=np.int64)
        count = min(settings.recall_queries, n // 10)  # a tenth at most, 10 at least
        if kind != 'flat' and count >= 10:
            rng = np.random.default_rng(settings.seed + 1)
            pool = np.setdiff1d(np.arange(n), sample)
            pool = pool if len(pool) >= count else np.arange(n)
            held = np.sort(rng.choice(pool, size=count, replace=False))
        first = np.setdiff1d(np.arange(n), held)
        # IVF rows take their final numbers as ids (rows stay sorted by platform); an HNSW
        # graph numbers rows as they come, so its held-out rows end up last.
        ids = faiss.try_extract_index_ivf(index) is not None
        perm = np.arange(n) if ids or not len(held) else np.concatenate([first, held])
        keys = None if item_keys is None else np.asarray(item_keys)[order[perm]]
        built = cls(index, item_indices[order[perm]], codes[order[perm]], n_items,
                    row_keys=keys, info=info, settings=settings)
        start = time.perf_counter()
        built._add_rows(vectors, order, perm, first if ids else np.arange(len(first)), ids, say)
        built.info['add_s'] = time.perf_counter() - start
        if len(held):
            rows_in = first if ids else np.arange(len(first))
            built._tune(_take(vectors, order[held]), vectors, order[perm[rows_in]], rows_in, say)
            built._add_rows(vectors, order, perm, held if ids else np.arange(len(first), n),
                            ids, say)
        else:
            built.info.update(recall_at_10=1.0 if kind == 'flat' else None, recall_queries=0,
                              breadth=None, recall_rows=n)
        built._refresh()
        return built

    def _add_rows(self, vectors, order, perm, rows, with_ids, say):
        """Add the vectors of ``rows`` (final row numbers) in chunks."""
        for lo in range(0, len(rows), _CHUNK):
            chunk = rows[lo:lo + _CHUNK]
            block = np.ascontiguousarray(_take(vectors, order[perm[chunk]]), dtype=np.float32)
            if with_ids:
                self.index.add_with_ids(block, np.ascontiguousarray(chunk, dtype=np.int64))
            else:
                self.index.add(block)
            if len(rows) > _CHUNK:
                say(f'added {min(len(rows), lo + _CHUNK)} of {len(rows)} vectors')

    def _refresh(self):
        """Drop what was derived from the rows (after rows were added)."""
        self._selections = {}
        self._places = None
        self._mapping = None
        self._lists = {}
        self.matrix = self._flat_matrix()

    def _tune(self, queries, vectors, sources, rows, log):
        """Measure recall@10 of held-out ``queries`` against an exact scan; store it in ``info``.

        ``vectors[sources[i]]`` is the vector of indexed row ``rows[i]``. A breadth not
        configured becomes the smallest reaching ``target_recall``, or where recall stops
        growing (the codes' limit) when it never does.
        """
        say, settings = log, self.settings
        start = time.perf_counter()
        truth = rows[_exact_top(vectors, sources, queries, RECALL_K)]
        say(f'exact top-{RECALL_K} of {len(queries)} held-out vectors in '
            f'{time.perf_counter() - start:.1f} s')
        name, configured = self._breadth_setting()
        breadths = ([configured] if configured else
                    [b for b in _BREADTHS if b <= self._breadth_max()] or [self._breadth_max()])
        recall, breadth, last = 0.0, breadths[-1], None
        for step in breadths:
            self._set_breadth(step)
            _, found = self.index.search(queries, RECALL_K)
            got = _recall(found, truth)
            say(f'{name} {step}: recall@{RECALL_K} {got:.3f}')
            if last is not None and got - last < 0.002:
                break  # a plateau under the target (the codes' limit): a wider search buys nothing
            recall, breadth, last = got, step, got
            if got >= settings.target_recall:
                break
        self._set_breadth(breadth)
        self.info.update(recall_at_10=float(recall), recall_queries=int(len(queries)),
                         recall_rows=len(rows), breadth=int(breadth), breadth_name=name,
                         recall_method='held-out gallery vectors, added after the measurement')
        return recall

    def _append(self, vectors, items, codes, keys=None):
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if len(vectors):
            self.index.add(vectors)
        self.row_items = np.concatenate([self.row_items, np.asarray(items, dtype=np.int64)])
        self.row_codes = np.concatenate([self.row_codes, np.asarray(codes, dtype=np.int8)])
        self.row_keys = np.concatenate([self.row_keys, np.zeros(len(items), dtype=np.int64)
                                        if keys is None else np.asarray(keys, dtype=np.int64)])
        self.item_rows[np.asarray(items, dtype=np.int64)] = np.arange(
            len(self.row_items) - len(items), len(self.row_items))
        self._refresh()

    def add(self, vectors, item_indices, platform_codes, item_keys=None):
        """Append rows to this (trained) index without retraining it; returns the row count.

        Appended rows are not sorted by platform: platform filters then use a bitmap
        selector. The recall stored at build is kept (``recall_rows`` says at what size).
        """
        self._append(vectors, item_indices, platform_codes, item_keys)
        self.info['rows'] = len(self)
        return len(self)

    def remap_items(self, row_items, n_items):
        """Point rows at new gallery positions (the manifest was reordered or grew)."""
        self.row_items = np.asarray(row_items, dtype=np.int64)
        self.item_rows = np.full(n_items, -1, dtype=np.int64)
        self.item_rows[self.row_items] = np.arange(len(self.row_items))

    # ------------------------------------------------------------------ recall

    def _breadth_setting(self):
        if self._ivf is not None:
            return 'nprobe', self.settings.nprobe
        return 'efSearch', self.settings.ef_search

    def _breadth_max(self):
        return int(self._ivf.nlist) if self._ivf is not None else 4096

    def _set_breadth(self, breadth):
        if self._ivf is not None:
            self._ivf.nprobe = int(breadth)
            quantizer = faiss.downcast_index(self._ivf.quantizer)
            if isinstance(quantizer, faiss.IndexHNSW):
                quantizer.hnsw.efSearch = max(int(breadth) * 2, 64)
        elif self._hnsw is not None:
            self._hnsw.hnsw.efSearch = int(breadth)

    def _params(self, selector, share):
        """Search parameters with ``selector``, the breadth widened by 1 / ``share``."""
        breadth = self.info.get('breadth')
        if self._ivf is not None and breadth:
            nprobe = int(min(self._ivf.nlist, math.ceil(breadth / max(share, 1e-9))))
            params = faiss.SearchParametersIVF(sel=selector, nprobe=nprobe)
            quantizer = faiss.downcast_index(self._ivf.quantizer)
            if isinstance(quantizer, faiss.IndexHNSW):
                inner = faiss.SearchParametersHNSW(efSearch=max(2 * nprobe, 64))
                params.quantizer_params = inner
                params.referenced_objects = [inner]  # keeps it alive as long as params
            return params
        if self._hnsw is not None and breadth:
            ef = int(min(65536, math.ceil(breadth / max(share, 1e-9))))
            return faiss.SearchParametersHNSW(sel=selector, efSearch=ef)
        return faiss.SearchParameters(sel=selector)

    # ------------------------------------------------------------------ searching

    def nbytes(self):
        """Bytes held in memory by the index (codes, lists, graph) and the row tables."""
        tables = (self.row_items.nbytes + self.item_rows.nbytes + self.row_codes.nbytes
                  + self.row_keys.nbytes)
        if self.kind == 'flat':
            return int(self.matrix.nbytes + tables)
        return int(_index_bytes(self.index) + tables
                   + (0 if self._places is None else self._places.nbytes))

    def platform_selection(self, codes):
        """Return ``(lo, hi)`` when the rows of platform ``codes`` are one range, else rows.

        Rows of a full build are sorted by platform (one range per platform set the queries
        use); rows appended later make some sets a scattered list of rows.
        """
        codes = tuple(sorted(codes))
        found = self._selections.get(codes)
        if found is None:
            if codes == ALL_PLATFORMS:
                found = (0, len(self))
            else:
                rows = np.flatnonzero(np.isin(self.row_codes, codes))
                if not len(rows):
                    found = (0, 0)
                elif rows[-1] - rows[0] + 1 == len(rows):
                    found = (int(rows[0]), int(rows[-1]) + 1)
                else:
                    found = rows
            self._selections[codes] = found
        return found

    def rows_of_platform(self, platform):
        """Return the rows of a platform name (sorted)."""
        found = self.platform_selection((PLATFORM_CODES[platform],))
        return np.arange(*found) if isinstance(found, tuple) else found

    def rows_of_items(self, items):
        """Return the sorted rows of gallery items (items without a vector are left out)."""
        rows = self.item_rows[np.asarray(items, dtype=np.int64)]
        return np.sort(rows[rows >= 0])

    def vectors(self, rows):
        """Return the vectors of ``rows`` (decoded from their codes for compressed types)."""
        rows = np.asarray(rows, dtype=np.int64)
        if self.matrix is not None:
            return self.matrix[rows]
        if not len(rows):
            return np.zeros((0, self.dim), dtype=np.float32)
        if self._ivf is None:
            return self.index.reconstruct_batch(np.ascontiguousarray(rows))
        return self.index.sa_decode(self._ivf_codes(rows))

    def _ivf_codes(self, rows):
        """Return the standalone codes (list number, then the list's code) of IVF rows.

        FAISS decodes rows one at a time (reconstruct_batch: about 8 us a row here); reading
        the codes out of their lists and decoding them in one ``sa_decode`` call is several
        times faster, which is what makes scoring the rows inside a search area exactly
        cheaper than an unfiltered search. A memory-mapped index holds all lists in one
        mapping: the codes are gathered from it in one numpy indexing step. An index in
        memory (being built) reads them list by list.
        """
        ivf = self._ivf
        if self._places is None:
            ivf.make_direct_map()  # row -> (list, offset): 8 bytes a row, built once
            self._places = faiss.rev_swig_ptr(ivf.direct_map.array.data(), len(self))
            lists = faiss.downcast_InvertedLists(ivf.invlists)
            if isinstance(lists, faiss.OnDiskInvertedLists):
                base, size = int(lists.ptr), ivf.code_size
                region = faiss.rev_swig_ptr(lists.ptr, lists.totsize)
                # Every code_size-byte window of the mapping, so that one fancy index copies
                # whole codes (no per-byte index array).
                self._mapping = (np.lib.stride_tricks.sliding_window_view(region, size),
                                 np.array([int(lists.get_codes(n)) - base
                                           for n in range(ivf.nlist)], np.int64))
        places = self._places[rows]
        lists, offsets = places >> 32, places & 0xFFFFFFFF
        coarse, size = ivf.coarse_code_size(), ivf.code_size
        codes = np.empty((len(rows), coarse + size), dtype=np.uint8)
        codes[:, :coarse] = lists.astype('<u8').view(np.uint8).reshape(-1, 8)[:, :coarse]
        if self._mapping is not None:
            windows, starts = self._mapping
            codes[:, coarse:] = windows[starts[lists] + offsets * size]
            return codes
        order = np.argsort(lists, kind='stable')
        starts = np.flatnonzero(np.diff(lists[order], prepend=-1))
        for group in np.split(order, starts[1:]):
            number = int(lists[group[0]])
            view = self._lists.get(number)
            if view is None:
                count = ivf.invlists.list_size(number)
                view = self._lists[number] = faiss.rev_swig_ptr(
                    ivf.invlists.get_codes(number), count * size).reshape(count, size)
            codes[group, coarse:] = view[offsets[group]]
        return codes

    def search(self, groups, k, rows=None):
        """Search (query vector, platform codes) groups; return (item indices, scores).

        Each group searches only the rows of its platforms with its own query vector, k
        results each; the merged list keeps the best k overall. ``rows`` (sorted row numbers,
        e.g. :meth:`rows_of_items` of the items inside a search area) further restricts every
        group to those rows, inside the search (module docstring): a filtered query still gets
        k results when k rows pass it.
        """
        with _one_thread():
            return self._search_groups(groups, k, rows)

    def _search_groups(self, groups, k, rows):
        items, scores = [], []
        n = len(self)
        for vector, codes in groups:
            selection = self.platform_selection(codes)
            if rows is not None:
                allowed = (_rows_in(rows, selection) if isinstance(selection, tuple)
                           else np.intersect1d(rows, selection, assume_unique=True))
                selection = allowed
            count = (selection[1] - selection[0] if isinstance(selection, tuple)
                     else len(selection))
            if count <= 0:
                continue
            query = np.ascontiguousarray(vector, dtype=np.float32).reshape(1, -1)
            kk = min(k, count)
            if not isinstance(selection, tuple) and count <= self.settings.exact_filter_max:
                exact = np.concatenate([self.vectors(selection[lo:lo + _CHUNK]) @ query[0]
                                        for lo in range(0, count, _CHUNK)])
                found, dist = _best(exact, selection, kk)
            else:
                found, dist = self._search(query, kk, selection, count / max(n, 1))
            items.append(self.row_items[found])
            scores.append(dist)
        if not items:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
        items, scores = np.concatenate(items), np.concatenate(scores)
        if len(groups) > 1:
            order = np.argsort(-scores, kind='stable')[:k]
            items, scores = items[order], scores[order]
        return items, scores

    def _search(self, query, k, selection, share):
        if isinstance(selection, tuple) and selection == (0, len(self)):
            params = self._params(None, 1.0)
        elif isinstance(selection, tuple):
            params = self._params(faiss.IDSelectorRange(*selection), share)
        else:
            bits = np.zeros(len(self), dtype=bool)
            bits[selection] = True
            packed = np.packbits(bits, bitorder='little')
            selector = faiss.IDSelectorBitmap(len(self), faiss.swig_ptr(packed))
            params = self._params(selector, share)
            params.referenced_objects = list(getattr(params, 'referenced_objects', None)
                                             or []) + [packed]
        dist, found = self.index.search(query, k, params=params)
        keep = found[0] >= 0
        return found[0][keep], dist[0][keep]

    def scores_for(self, items, vectors):
        """Inner products of items with per-item query vectors; NaN where an item has no row."""
        rows = self.item_rows[np.asarray(items, dtype=np.int64)]
        out = np.full(len(rows), np.nan, dtype=np.float64)
        have = rows >= 0
        if have.any():
            out[have] = np.einsum('ij,ij->i', self.vectors(rows[have]),
                                  np.asarray(vectors, dtype=np.float32)[have])
        return out

    # ------------------------------------------------------------------ persistence

    def save(self, path, meta):
        """Write the index, its row table and the JSON meta (``meta`` adds identity etc.).

        The two data files get new names (``NAME.<token>.faiss``, ``NAME.<token>.rows.npy``)
        and the JSON, written atomically last, names them: it is the commit. A build or save
        interrupted at any point leaves the previous JSON naming the previous, intact files,
        so the previous index stays usable. Files no JSON names are deleted after the commit.
        """
        path = Path(path)
        token = secrets.token_hex(6)
        faiss_path = path.with_name(f'{path.name}.{token}.faiss')
        rows_path = path.with_name(f'{path.name}.{token}.rows.npy')
        table = np.stack([self.row_items, self.row_keys, self.row_codes.astype(np.int64)],
                         axis=1)
        data = npy_bytes(table)
        atomic_write_bytes(rows_path, data)
        size, digest = write_faiss_index(self.index, faiss_path)
        atomic_write_json(path.with_suffix('.json'), dict(
            meta, format=FORMAT, **self.info, faiss_file=faiss_path.name, faiss_bytes=size,
            faiss_sha256=digest, rows_file=rows_path.name, rows_bytes=len(data),
            rows_sha256=hashlib.sha256(data).hexdigest()))
        self.sweep(path, keep=(faiss_path.name, rows_path.name))

    @staticmethod
    def sweep(path, keep=()):
        """Delete the data and temp files of the index at ``path`` except those in ``keep``.

        ``keep=()`` with the JSON removed first deletes the whole index. Only ``cgrs index``
        writes an index, one run per state folder, so no other writer's temp file is hit.
        """
        path = Path(path)
        for file in path.parent.glob(f'{path.name}.*'):
            data = file.name.endswith(('.faiss', '.rows.npy'))
            if file.name not in keep and data:
                file.unlink(missing_ok=True)
        for file in path.parent.glob(f'.{path.name}.*.tmp'):
            file.unlink(missing_ok=True)

    @classmethod
    def remove(cls, path):
        """Delete a saved index (JSON first, so no half-deleted index is ever read)."""
        Path(path).with_suffix('.json').unlink(missing_ok=True)
        cls.sweep(path)

    @staticmethod
    def read_meta(path):
        """Return the saved JSON meta of an index (None when absent); StateError if unreadable."""
        table = Path(path).with_suffix('.json')
        if not table.exists():
            return None
        try:
            meta = read_json(table)
        except (OSError, ValueError) as exc:
            raise StateError(table, f'unreadable JSON: {exc}') from None
        if not isinstance(meta, dict):
            raise StateError(table, 'it is not a JSON object')
        if meta.get('format') == FORMAT and not all(
                isinstance(meta.get(key), str) and '/' not in meta[key]
                and meta[key].startswith(Path(path).name + '.')
                for key in ('faiss_file', 'rows_file')):
            raise StateError(table, 'it does not name its data files (faiss_file, rows_file)')
        return meta

    @classmethod
    def _meta(cls, path, expect):
        """Return the meta if it matches ``expect``, None when absent or out of date."""
        meta = cls.read_meta(path)
        if meta is None or meta.get('format') != FORMAT:
            return None  # absent, or written before this format: rebuilt, nothing is wrong
        if any(meta.get(key) != value for key, value in expect.items()):
            return None
        return meta

    @classmethod
    def check(cls, path, expect):
        """Tell whether the saved index is current and intact, for ``cgrs index``.

        Returns True when it is (sizes and SHA-256 match), False when it is absent or out of
        date (rewrite it); raises StateError naming the damaged file.
        """
        path = Path(path)
        meta = cls._meta(path, expect)
        if meta is None:
            return False
        cls.check_files(path, meta)
        return True

    @staticmethod
    def _check_file(file, meta, prefix):
        try:
            size = file.stat().st_size
        except OSError as exc:
            raise StateError(file, f'cannot read it ({exc.strerror or exc})') from None
        json_name = file.name.split('.')[0] + '.json'
        if size != meta.get(f'{prefix}_bytes'):
            raise StateError(file, f'it is {size} bytes, {json_name} recorded '
                                   f'{meta.get(f"{prefix}_bytes")}')
        if sha256_file(file) != meta.get(f'{prefix}_sha256'):
            raise StateError(file, f'its SHA-256 differs from the one {json_name} recorded')

    @classmethod
    def check_files(cls, path, meta):
        """Check both data files against the sizes and SHA-256 ``meta`` recorded."""
        cls._check_file(path.parent / meta['faiss_file'], meta, 'faiss')
        cls._check_file(path.parent / meta['rows_file'], meta, 'rows')

    @classmethod
    def load(cls, path, n_items, expect, settings=None, mmap=None, meta=None):
        """Read an index saved by :meth:`save` if its meta matches ``expect``; else None.

        Raises StateError naming the file when the index is damaged (checked on every load:
        both files' sizes and SHA-256, the row table's shape). ``mmap`` (default
        ``index.mmap``) maps the file read-only instead of reading it: :meth:`add` then needs
        ``mmap=False``. ``meta``: the JSON already read and checked (skips both).
        """
        settings = IndexSettings.from_section(settings)
        path = Path(path)
        if meta is None:
            meta = cls._meta(path, expect)
            if meta is None:
                return None
            cls.check_files(path, meta)
        faiss_path = path.parent / meta['faiss_file']
        mmap = settings.mmap if mmap is None else mmap
        flags = 0
        if mmap:  # inverted lists map through OnDiskInvertedLists, flat codes through IFC
            flags = faiss.IO_FLAG_READ_ONLY | (faiss.IO_FLAG_MMAP if str(
                meta.get('type', '')).startswith('ivf') else faiss.IO_FLAG_MMAP_IFC)
        try:
            index = faiss.read_index(str(faiss_path), flags)
        except RuntimeError as exc:
            reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else 'read error'
            raise StateError(faiss_path, f'FAISS cannot read it: {reason}') from None
        rows_path = path.parent / meta['rows_file']
        try:
            table = np.load(str(rows_path), allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            raise StateError(rows_path, f'not a readable .npy array ({exc})') from None
        if (table.ndim != 2 or table.shape != (index.ntotal, 3)
                or (len(table) and not 0 <= table[:, 0].min() <= table[:, 0].max() < n_items)
                or (len(table) and not 0 <= table[:, 2].min() <= table[:, 2].max()
                    < len(PLATFORMS))):
            raise StateError(rows_path, f'its row table does not fit the {index.ntotal}-row '
                                        'index')
        info = {key: meta[key] for key in _INFO_KEYS if key in meta}
        loaded = cls(index, table[:, 0], table[:, 2], n_items, row_keys=table[:, 1], info=info,
                     settings=settings)
        if loaded.info.get('breadth'):
            loaded._set_breadth(loaded.info['breadth'])
        return loaded


_INFO_KEYS = ('type', 'factory', 'rows', 'trained_rows', 'train_s', 'add_s', 'recall_at_10',
              'recall_queries', 'recall_rows', 'breadth', 'breadth_name', 'recall_method',
              'added_since_training')


def _take(vectors, rows):
    """Return ``vectors[rows]`` as float32, reading sorted runs (memory maps, generators)."""
    rows = np.asarray(rows, dtype=np.int64)
    if isinstance(vectors, np.ndarray) and not isinstance(vectors, np.memmap):
        return np.asarray(vectors[rows], dtype=np.float32)
    order = np.argsort(rows, kind='stable')
    out = np.empty((len(rows), vectors.shape[1]), dtype=np.float32)
    out[order] = np.asarray(vectors[rows[order]], dtype=np.float32)
    return out


def _exact_top(vectors, source, queries, k):
    """Exact top-k rows for ``queries`` over rows ``r`` with vectors ``vectors[source[r]]``."""
    best = np.full((len(queries), k), -np.inf, dtype=np.float32)
    best_rows = np.full((len(queries), k), -1, dtype=np.int64)
    for lo in range(0, len(source), _CHUNK):
        block = _take(vectors, source[lo:lo + _CHUNK])
        scores = queries @ block.T
        top = np.argpartition(-scores, min(k, scores.shape[1] - 1), axis=1)[:, :k]
        merged = np.concatenate([best, np.take_along_axis(scores, top, 1)], axis=1)
        merged_rows = np.concatenate([best_rows, top + lo], axis=1)
        keep = np.argsort(-merged, axis=1, kind='stable')[:, :k]
        best = np.take_along_axis(merged, keep, 1)
        best_rows = np.take_along_axis(merged_rows, keep, 1)
    return best_rows


def _recall(found, truth):
    hits = sum(len(np.intersect1d(f[f >= 0], t[t >= 0])) for f, t in zip(found, truth))
    return hits / max(1, int((truth >= 0).sum()))


def _best(scores, rows, k):
    """Return the rows and scores of the best ``k`` of ``scores`` (best first)."""
    scores = np.asarray(scores, dtype=np.float32)
    top = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
    top = top[np.argsort(-scores[top], kind='stable')]
    return np.asarray(rows)[top], scores[top]


def _index_bytes(index):
    """Estimate the bytes an index holds in memory: its codes, ids, centroids or graph."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:  # codes + 8-byte ids per row, plus the centroids
        return index.ntotal * (ivf.code_size + 8) + ivf.nlist * index.d * 4
    hnsw = faiss.downcast_index(index)
    links = 2 * hnsw.hnsw.nb_neighbors(0) * 4 if isinstance(hnsw, faiss.IndexHNSW) else 0
    return index.ntotal * (index.d * 4 + links)
