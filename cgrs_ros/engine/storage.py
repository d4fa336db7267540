"""Engine state on disk: atomic writes, file locks, content hashes and embedding stores.

Everything the engine writes goes through :func:`atomic_write_bytes` (temp file in the same
folder, fsync, ``os.replace``, fsync of the folder), so a crash leaves either the old file or
the new one, never half of one. Nothing here pickles: arrays are ``.npy`` read with
``allow_pickle=False``, tables are JSON or SQLite.

State folder layout (``GALLERY/.cgrs/`` unless a state dir is given)::

    state.sqlite                 file path -> (size, mtime, content hash); undecodable images
    captions.sqlite              the caption store (see captions.py)
    embeddings/<kind>-<slug>/    one EmbeddingStore per encoder identity
    index/                       FAISS index files and their row tables
"""

import contextlib
import fcntl
import hashlib
import io
import json
import os
from pathlib import Path
import re
import sqlite3
import tempfile
import threading

import numpy as np

STATE_DIRNAME = '.cgrs'
HASH_CHUNK = 1 << 20


def default_state_dir(gallery_dir):
    """Return the state folder used when none is given: ``GALLERY/.cgrs``."""
    return Path(gallery_dir) / STATE_DIRNAME


def fsync_dir(path):
    """Flush a directory entry so a rename inside it survives a power cut."""
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_replace(path):
    """Yield a temp path beside ``path``; when the block succeeds, fsync it and rename it over.

    For writers that need a file name (FAISS, SQLite backups); on any error the temp file is
    removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=str(path.parent))
    os.close(fd)
    try:
        yield tmp
        with open(tmp, 'rb') as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path, data):
    """Write ``data`` to ``path`` atomically (temp file, fsync, rename, fsync of the folder)."""
    with atomic_replace(path) as tmp:
        with open(tmp, 'wb') as handle:
            handle.write(data)


def atomic_write_text(path, text):
    """Write UTF-8 text atomically."""
    atomic_write_bytes(path, text.encode('utf-8'))


def atomic_write_json(path, obj):
    """Write an object as indented JSON atomically."""
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True) + '\n')


def atomic_save_npy(path, array):
    """Save a numeric array as ``.npy`` atomically (never with pickled objects)."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    atomic_write_bytes(path, buffer.getvalue())


def load_npy(path):
    """Load an ``.npy`` file written by :func:`atomic_save_npy` (pickles refused)."""
    return np.load(str(path), allow_pickle=False)


def read_json(path):
    """Read a JSON file."""
    with open(path, 'r', encoding='utf-8') as handle:
        return json.load(handle)


@contextlib.contextmanager
def file_lock(path):
    """Hold an exclusive advisory lock on ``path`` (created if needed) for the with-block.

    Writers of one embedding store (the indexer, a retrieval node embedding fresh captions)
    may run in different processes; the lock makes their read-modify-write steps serial.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, 'a+b') as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def sha256_file(path):
    """Return the hex SHA-256 of a file's bytes (the content hash of an image)."""
    digest = hashlib.sha256()
    with open(path, 'rb') as handle:
        for chunk in iter(lambda: handle.read(HASH_CHUNK), b''):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_text(text):
    """Return the hex SHA-256 of a string's UTF-8 bytes (the content hash of a caption)."""
    return hashlib.sha256(text.encode('utf-8')).hexdigest()


def identity_slug(identity):
    """Turn an encoder identity into a short, filesystem-safe, collision-resistant folder name."""
    readable = re.sub(r'[^A-Za-z0-9._-]+', '-', identity).strip('-')[-40:]
    return f'{readable}-{hashlib.sha1(identity.encode("utf-8")).hexdigest()[:10]}'


def connect_sqlite(path):
    """Open a SQLite database for concurrent use by several processes (WAL, busy timeout)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(str(path), timeout=30.0, check_same_thread=False)
    conn.execute('PRAGMA journal_mode=WAL')
    conn.execute('PRAGMA synchronous=NORMAL')
    return conn


class FileHashCache:
    """Content hashes of gallery files, recomputed only when a file's size or mtime changes.

    Reading every image to hash it again on each ``cgrs index`` would cost more than the rest of
    an unchanged re-index, so, like git's index, a file whose (size, mtime_ns) is unchanged keeps
    its recorded hash. A changed stat triggers a re-hash; the embedding is only redone if the
    hash (the content) really changed.
    """

    def __init__(self, state_dir):
        self._conn = connect_sqlite(Path(state_dir) / 'state.sqlite')
        with self._conn:
            self._conn.execute(
                'CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, size INTEGER NOT NULL,'
                ' mtime_ns INTEGER NOT NULL, content_hash TEXT NOT NULL)')
            self._conn.execute(
                'CREATE TABLE IF NOT EXISTS undecodable (content_hash TEXT PRIMARY KEY,'
                ' error TEXT NOT NULL)')

    def close(self):
        """Close the database."""
        self._conn.close()

    def recorded(self):
        """Return {path: content_hash} for every file hashed so far (no stat, no reads)."""
        return dict(self._conn.execute('SELECT path, content_hash FROM files'))

    def update(self, files, progress=None):
        """Return {relative path: content hash} for ``files`` [(relative, absolute path)].

        Also returns the number of files actually read and hashed. ``progress`` is called once
        per file (for a progress bar).
        """
        known = {row[0]: row[1:] for row in self._conn.execute(
            'SELECT path, size, mtime_ns, content_hash FROM files')}
        hashes, changed = {}, []
        for rel, absolute in files:
            st = os.stat(absolute)
            old = known.get(rel)
            if old is not None and old[0] == st.st_size and old[1] == st.st_mtime_ns:
                hashes[rel] = old[2]
            else:
                hashes[rel] = sha256_file(absolute)
                changed.append((rel, st.st_size, st.st_mtime_ns, hashes[rel]))
            if progress:
                progress()
        if changed:
            with self._conn:
                self._conn.executemany(
                    'INSERT OR REPLACE INTO files (path, size, mtime_ns, content_hash)'
                    ' VALUES (?, ?, ?, ?)', changed)
        return hashes, len(changed)

    def undecodable(self):
        """Return {content_hash: error} for images that failed to decode before."""
        return dict(self._conn.execute('SELECT content_hash, error FROM undecodable'))

    def mark_undecodable(self, failures):
        """Record images (by content hash) that cannot be decoded, so re-runs skip them fast."""
        with self._conn:
            self._conn.executemany(
                'INSERT OR REPLACE INTO undecodable (content_hash, error) VALUES (?, ?)',
                list(failures.items()))


class EmbeddingStore:
    """Append-only store of L2-normalized vectors keyed by content hash, for ONE encoder.

    The folder holds ``meta.json`` (identity, dim, list of segments) and segments
    ``seg-NNNNNN.npy`` + ``seg-NNNNNN.keys.json``. Adding vectors writes a new segment and then
    replaces ``meta.json``; an interrupted run therefore keeps every segment it finished and
    resumes from there. Segments are merged when there are many. Writers take a file lock, so
    the indexer and a retrieval node embedding new captions can share a store; under that lock
    each write first removes what a killed writer left behind (temp files, segments that
    ``meta.json`` does not name).
    """

    MAX_SEGMENTS = 24

    def __init__(self, root, identity, dim=None):
        self.root = Path(root)
        self.identity = identity
        self.dim = dim
        self._lock = threading.Lock()
        self._meta_path = self.root / 'meta.json'

    @classmethod
    def for_encoder(cls, state_dir, kind, identity, dim=None):
        """Return the store for an encoder identity under ``state_dir/embeddings``."""
        return cls(Path(state_dir) / 'embeddings' / f'{kind}-{identity_slug(identity)}',
                   identity, dim)

    def _read_meta(self):
        if not self._meta_path.exists():
            return {'format': 1, 'identity': self.identity, 'dim': self.dim, 'segments': [],
                    'next_segment': 1}
        meta = read_json(self._meta_path)
        if meta.get('identity') != self.identity:
            raise RuntimeError(
                f'embedding store {self.root} belongs to {meta.get("identity")!r}, '
                f'not {self.identity!r}')
        return meta

    def keys(self):
        """Return the set of keys stored (reads only the small key files)."""
        out = set()
        for seg in self._read_meta()['segments']:
            out.update(read_json(self.root / f'{seg["name"]}.keys.json'))
        return out

    def load(self):
        """Return (keys list, float32 matrix) of everything stored, in storage order."""
        meta = self._read_meta()
        keys, blocks = [], []
        for seg in meta['segments']:
            keys.extend(read_json(self.root / f'{seg["name"]}.keys.json'))
            blocks.append(load_npy(self.root / f'{seg["name"]}.npy'))
        dim = meta.get('dim') or self.dim or 0
        if not blocks:
            return [], np.zeros((0, dim), dtype=np.float32)
        return keys, np.concatenate(blocks).astype(np.float32, copy=False)

    def lookup(self, wanted):
        """Return (found keys, matrix) for the keys of ``wanted`` that are stored.

        Only segments holding a wanted key are read, and only their wanted rows are copied
        (memory-mapped), so looking up a few keys in a large store stays cheap.
        """
        wanted = set(wanted)
        meta = self._read_meta()
        keys, blocks = [], []
        for seg in meta['segments']:
            seg_keys = read_json(self.root / f'{seg["name"]}.keys.json')
            rows = [i for i, key in enumerate(seg_keys) if key in wanted]
            if rows:
                vectors = np.load(str(self.root / f'{seg["name"]}.npy'), mmap_mode='r',
                                  allow_pickle=False)
                keys.extend(seg_keys[i] for i in rows)
                blocks.append(np.asarray(vectors[rows], dtype=np.float32))
        dim = meta.get('dim') or self.dim or 0
        if not blocks:
            return [], np.zeros((0, dim), dtype=np.float32)
        return keys, np.concatenate(blocks)

    def add(self, keys, vectors):
        """Append vectors for new keys (keys already stored are ignored); returns how many."""
        vectors = np.asarray(vectors, dtype=np.float32)
        if len(keys) != len(vectors):
            raise ValueError('keys and vectors differ in length')
        if not len(keys):
            return 0
        with self._lock, file_lock(self.root / '.lock'):
            meta = self._read_meta()
            if meta.get('dim') is None:
                meta['dim'] = int(vectors.shape[1])
            elif meta['dim'] != vectors.shape[1]:
                raise RuntimeError(
                    f'embedding store {self.root} holds {meta["dim"]}-d vectors, got '
                    f'{vectors.shape[1]}-d for the same encoder identity')
            self._sweep_locked(meta)
            present = set()
            for seg in meta['segments']:
                present.update(read_json(self.root / f'{seg["name"]}.keys.json'))
            rows, seen = [], set()
            for i, key in enumerate(keys):
                if key not in present and key not in seen:
                    rows.append(i)
                    seen.add(key)
            if not rows:
                return 0
            name = f'seg-{meta["next_segment"]:06d}'
            atomic_save_npy(self.root / f'{name}.npy', vectors[rows])
            atomic_write_json(self.root / f'{name}.keys.json', [keys[i] for i in rows])
            meta['segments'].append({'name': name, 'count': len(rows)})
            meta['next_segment'] += 1
            atomic_write_json(self._meta_path, meta)
            if len(meta['segments']) > self.MAX_SEGMENTS:
                self._compact_locked(meta, None)
            return len(rows)

    def compact(self, keep=None):
        """Merge all segments into one, dropping keys not in ``keep`` (when given)."""
        with self._lock, file_lock(self.root / '.lock'):
            meta = self._read_meta()
            self._sweep_locked(meta)
            if meta['segments']:
                self._compact_locked(meta, keep)

    def _sweep_locked(self, meta):
        # Every write here happens under the lock, so with the lock held a temp file or a
        # segment meta.json does not name can only be left by a writer killed mid-write
        # (SIGKILL, power loss); without this they would stay forever, up to a whole store's
        # size when the kill hit a compaction.
        named = {f'{seg["name"]}{suffix}' for seg in meta['segments']
                 for suffix in ('.npy', '.keys.json')}
        for path in self.root.glob('*'):
            name = path.name
            if (name.startswith('.') and name.endswith('.tmp')) or (
                    name.startswith('seg-') and name not in named):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)

    def _compact_locked(self, meta, keep):
        old = [seg['name'] for seg in meta['segments']]
        keys, blocks = [], []
        for name in old:
            seg_keys = read_json(self.root / f'{name}.keys.json')
            seg_vecs = load_npy(self.root / f'{name}.npy')
            if keep is not None:
                rows = [i for i, key in enumerate(seg_keys) if key in keep]
                seg_keys, seg_vecs = [seg_keys[i] for i in rows], seg_vecs[rows]
            keys.extend(seg_keys)
            blocks.append(seg_vecs)
        name = f'seg-{meta["next_segment"]:06d}'
        meta['next_segment'] += 1
        if keys:
            atomic_save_npy(self.root / f'{name}.npy', np.concatenate(blocks))
            atomic_write_json(self.root / f'{name}.keys.json', keys)
            meta['segments'] = [{'name': name, 'count': len(keys)}]
        else:
            meta['segments'] = []
        atomic_write_json(self._meta_path, meta)
        # Old segment files go only after meta.json no longer names them.
        for stale in old:
            for suffix in ('.npy', '.keys.json'):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.root / f'{stale}{suffix}')
