"""Exact FAISS inner-product search over L2-normalized vectors, grouped by platform.

Rows are stored sorted by platform (satellite, drone, ground), so every platform is one
contiguous row range. That makes the platform filter an ``IDSelectorRange`` applied inside the
FAISS search (before top-k, so a filtered query still gets k results), and lets the
``auto`` orientation-word mode score satellite rows with the normalized query and the other
rows with the raw one in two searches that together cost one full scan.

Why exact (IndexFlatIP) at every size: on this class of machine a flat scan of 100k x 512
float32 takes ~6-10 ms for one query, less than the text encoders' forward pass, so an
approximate index (HNSW, IVF) would save little latency at the cost of recall, build time and
filter quality. The row matrix is read straight out of the FAISS index (no second copy), for
scoring candidates that came from the other channel.

A saved index is two files: ``NAME.faiss`` and ``NAME.json`` (row table, identity,
fingerprint, and the ``.faiss`` file's size and SHA-256). :meth:`VectorIndex.check` /
:meth:`VectorIndex.load` tell an index that is out of date (None: rebuild it, nothing is wrong)
from one that is damaged (StateError naming the file). The checksum is what catches flipped
bytes inside the vectors: FAISS reads such a file without complaint and ranks with it.
"""

from pathlib import Path

from cgrs_ros.engine.errors import StateError
from cgrs_ros.engine.gallery import PLATFORMS
from cgrs_ros.engine.storage import atomic_replace, atomic_write_json, read_json, sha256_file
import faiss
import numpy as np

PLATFORM_CODES = {name: code for code, name in enumerate(PLATFORMS)}


def write_faiss_index(index, path):
    """Write a FAISS index atomically (temp file, fsync, rename); return (bytes, SHA-256)."""
    with atomic_replace(path) as tmp:
        faiss.write_index(index, tmp)
        written = (Path(tmp).stat().st_size, sha256_file(tmp))
    return written


class VectorIndex:
    """An IndexFlatIP whose rows are gallery items sorted by platform.

    ``row_items[r]`` is the gallery item index of row ``r``; ``item_rows[i]`` the row of item
    ``i`` (-1 when the item has no vector); ``bounds[c]:bounds[c + 1]`` the rows of platform
    code ``c``.
    """

    def __init__(self, index, row_items, bounds, n_items):
        """Wrap a built index (use :meth:`build` or :meth:`load`)."""
        self.index = index
        self.row_items = np.asarray(row_items, dtype=np.int64)
        self.bounds = np.asarray(bounds, dtype=np.int64)
        self.item_rows = np.full(n_items, -1, dtype=np.int64)
        self.item_rows[self.row_items] = np.arange(len(self.row_items))
        self.dim = index.d
        # A zero-copy view of the index's vectors (valid while self.index lives, which it does:
        # the index is never modified after build).
        total = index.ntotal * index.d
        self.matrix = (faiss.rev_swig_ptr(index.get_xb(), total).reshape(index.ntotal, index.d)
                       if total else np.zeros((0, index.d), dtype=np.float32))

    def __len__(self):
        return int(self.index.ntotal)

    @classmethod
    def build(cls, vectors, item_indices, platform_codes, n_items):
        """Build from vectors of items ``item_indices`` with platform codes (any order)."""
        vectors = np.asarray(vectors, dtype=np.float32)
        item_indices = np.asarray(item_indices, dtype=np.int64)
        codes = np.asarray(platform_codes, dtype=np.int64)
        order = np.lexsort((item_indices, codes))  # by platform, then manifest order
        index = faiss.IndexFlatIP(int(vectors.shape[1]))
        if len(order):
            index.add(np.ascontiguousarray(vectors[order]))
        bounds = np.searchsorted(codes[order], np.arange(len(PLATFORMS) + 1), side='left')
        return cls(index, item_indices[order], bounds, n_items)

    def nbytes(self):
        """Bytes held by the vectors and the row tables."""
        return int(self.matrix.nbytes + self.row_items.nbytes + self.item_rows.nbytes)

    def platform_range(self, platform):
        """Return the (lo, hi) rows of a platform name."""
        code = PLATFORM_CODES[platform]
        return int(self.bounds[code]), int(self.bounds[code + 1])

    def rows_of_items(self, items):
        """Return the sorted rows of gallery items (items without a vector are left out)."""
        rows = self.item_rows[np.asarray(items, dtype=np.int64)]
        return np.sort(rows[rows >= 0])

    def search(self, groups, k, rows=None):
        """Search (query vector, lo, hi) groups; return (item indices, scores), best first.

        Each group searches only rows lo..hi with its own query vector, k results each; the
        merged list keeps the best k overall. A group covering every row runs the bare search.
        ``rows`` (sorted row numbers, e.g. :meth:`rows_of_items` of the items inside a search
        area) further restricts every group to those rows: the allowed rows of the group's
        range go to FAISS as an ``IDSelectorBatch``, so the filter applies before top-k and a
        filtered query still gets k results when k rows pass it.
        """
        items, scores = [], []
        for vector, lo, hi in groups:
            if hi <= lo:
                continue
            allowed = None
            if rows is not None:
                allowed = rows[np.searchsorted(rows, lo):np.searchsorted(rows, hi)]
                if not len(allowed):
                    continue
                if len(allowed) == hi - lo:
                    allowed = None  # the whole range passes: the range selector is enough
            query = np.ascontiguousarray(vector, dtype=np.float32).reshape(1, -1)
            kk = min(k, hi - lo if allowed is None else len(allowed))
            if allowed is not None:
                ids = np.ascontiguousarray(allowed, dtype=np.int64)
                selector = faiss.IDSelectorBatch(len(ids), faiss.swig_ptr(ids))
                params = faiss.SearchParameters(sel=selector)
                dist, rows_found = self.index.search(query, kk, params=params)
            elif lo == 0 and hi == len(self):
                dist, rows_found = self.index.search(query, kk)
            else:
                params = faiss.SearchParameters(sel=faiss.IDSelectorRange(lo, hi))
                dist, rows_found = self.index.search(query, kk, params=params)
            keep = rows_found[0] >= 0
            items.append(self.row_items[rows_found[0][keep]])
            scores.append(dist[0][keep])
        if not items:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
        items, scores = np.concatenate(items), np.concatenate(scores)
        if len(groups) > 1:
            order = np.argsort(-scores, kind='stable')[:k]
            items, scores = items[order], scores[order]
        return items, scores

    def scores_for(self, items, vectors):
        """Inner products of items with per-item query vectors; NaN where an item has no row."""
        rows = self.item_rows[np.asarray(items, dtype=np.int64)]
        out = np.full(len(rows), np.nan, dtype=np.float64)
        have = rows >= 0
        if have.any():
            out[have] = np.einsum('ij,ij->i', self.matrix[rows[have]],
                                  np.asarray(vectors, dtype=np.float32)[have])
        return out

    def save(self, path, meta):
        """Write the index and a JSON row table (``meta`` adds identity/fingerprint)."""
        path = Path(path)
        size, digest = write_faiss_index(self.index, path.with_suffix('.faiss'))
        atomic_write_json(path.with_suffix('.json'), dict(
            meta, row_items=self.row_items.tolist(), bounds=self.bounds.tolist(),
            faiss_bytes=size, faiss_sha256=digest))

    @staticmethod
    def _meta(path, expect):
        """Return the row table if it matches ``expect``, None when absent or out of date."""
        table = path.with_suffix('.json')
        if not table.exists():
            return None
        try:
            meta = read_json(table)
        except (OSError, ValueError) as exc:
            raise StateError(table, f'unreadable JSON: {exc}') from None
        if not isinstance(meta, dict):
            raise StateError(table, 'it is not a JSON object')
        if any(meta.get(key) != value for key, value in expect.items()):
            return None
        rows, bounds = meta.get('row_items'), meta.get('bounds')
        if not (isinstance(rows, list) and isinstance(bounds, list)
                and all(isinstance(v, int) for v in rows + bounds)
                and len(bounds) == len(PLATFORMS) + 1 and bounds[0] == 0
                and bounds[-1] == len(rows) and bounds == sorted(bounds)):
            raise StateError(table, 'its row table (row_items, bounds) is malformed')
        return meta

    @classmethod
    def check(cls, path, expect):
        """Tell whether the saved index is current and intact, for ``cgrs index``.

        Returns True when it is (sizes and SHA-256 match), False when it is absent, out of date
        or written before checksums were recorded (rewrite it); raises StateError naming the
        damaged file.
        """
        path = Path(path)
        meta = cls._meta(path, expect)
        if meta is None or 'faiss_sha256' not in meta:
            return False
        cls._check_faiss(path.with_suffix('.faiss'), meta)
        return True

    @staticmethod
    def _check_faiss(faiss_path, meta):
        try:
            size = faiss_path.stat().st_size
        except OSError as exc:
            raise StateError(faiss_path, f'cannot read it ({exc.strerror or exc})') from None
        if 'faiss_bytes' in meta and size != meta['faiss_bytes']:
            raise StateError(faiss_path, f'it is {size} bytes, {faiss_path.stem}.json '
                                         f'recorded {meta["faiss_bytes"]}')
        if 'faiss_sha256' in meta and sha256_file(faiss_path) != meta['faiss_sha256']:
            raise StateError(faiss_path, f'its SHA-256 differs from the one '
                                         f'{faiss_path.stem}.json recorded')

    @classmethod
    def load(cls, path, n_items, expect):
        """Read an index saved by :meth:`save` if its meta matches ``expect``; else None.

        Raises StateError naming the file when the index is damaged (checked on every load:
        the ``.faiss`` size and SHA-256, the row table's shape; an index saved before checksums
        were recorded is still read, its damage found only where FAISS or the row table see it).
        """
        path = Path(path)
        meta = cls._meta(path, expect)
        if meta is None:
            return None
        faiss_path = path.with_suffix('.faiss')
        cls._check_faiss(faiss_path, meta)
        try:
            index = faiss.read_index(str(faiss_path))
        except RuntimeError as exc:
            reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else 'read error'
            raise StateError(faiss_path, f'FAISS cannot read it: {reason}') from None
        rows = meta['row_items']
        if index.ntotal != len(rows) or (rows and not 0 <= min(rows) <= max(rows) < n_items):
            raise StateError(path.with_suffix('.json'), f'its row table does not fit the '
                                                        f'{index.ntotal}-row index')
        return cls(index, rows, meta['bounds'], n_items)
