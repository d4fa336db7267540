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
"""

from pathlib import Path

from cgrs_ros.engine.gallery import PLATFORMS
from cgrs_ros.engine.storage import atomic_replace, atomic_write_json, read_json
import faiss
import numpy as np

PLATFORM_CODES = {name: code for code, name in enumerate(PLATFORMS)}


def write_faiss_index(index, path):
    """Write a FAISS index atomically (faiss.write_index to a temp file, fsync, rename)."""
    with atomic_replace(path) as tmp:
        faiss.write_index(index, tmp)


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

    def search(self, groups, k):
        """Search (query vector, lo, hi) groups; return (item indices, scores), best first.

        Each group searches only rows lo..hi with its own query vector, k results each; the
        merged list keeps the best k overall. A group covering every row runs the bare search.
        """
        items, scores = [], []
        for vector, lo, hi in groups:
            if hi <= lo:
                continue
            query = np.ascontiguousarray(vector, dtype=np.float32).reshape(1, -1)
            kk = min(k, hi - lo)
            if lo == 0 and hi == len(self):
                dist, rows = self.index.search(query, kk)
            else:
                params = faiss.SearchParameters(sel=faiss.IDSelectorRange(lo, hi))
                dist, rows = self.index.search(query, kk, params=params)
            keep = rows[0] >= 0
            items.append(self.row_items[rows[0][keep]])
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
        write_faiss_index(self.index, path.with_suffix('.faiss'))
        atomic_write_json(path.with_suffix('.json'), dict(
            meta, row_items=self.row_items.tolist(), bounds=self.bounds.tolist()))

    @classmethod
    def load(cls, path, n_items, expect):
        """Read an index saved by :meth:`save` if its meta matches ``expect``; else None."""
        path = Path(path)
        try:
            meta = read_json(path.with_suffix('.json'))
        except (OSError, ValueError):
            return None
        if any(meta.get(key) != value for key, value in expect.items()):
            return None
        try:
            index = faiss.read_index(str(path.with_suffix('.faiss')))
        except RuntimeError:
            return None
        if index.ntotal != len(meta['row_items']):
            return None
        return cls(index, meta['row_items'], meta['bounds'], n_items)
