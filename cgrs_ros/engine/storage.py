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

Integrity (every state file is checked when it is opened, never per query):
- SQLite stores (``state.sqlite``, ``captions.sqlite``) run ``PRAGMA quick_check`` on open, and
  beside each a ``NAME.rows.json`` records figures that never decrease (rows, newest sequence
  number: the stores never delete rows), written after every committed write. A store holding
  fewer rows than recorded lost some (an older copy restored, its ``-wal`` deleted) and is
  refused, because it would answer queries with a silently different ranking.
- Embedding stores record each segment file's size and SHA-256 in ``meta.json``: sizes and
  ``.npy`` headers are checked on every read, checksums when a whole store is read
  (:meth:`EmbeddingStore.load`, :meth:`EmbeddingStore.verify`).
- A damaged file raises :class:`~cgrs_ros.engine.errors.StateError` naming it; ``cgrs index``
  repairs what it can from what is intact (``repair`` methods here) and re-derives the rest.
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
import time

from cgrs_ros.engine.errors import StateError
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


def json_bytes(obj):
    """Return the bytes :func:`atomic_write_json` writes for an object."""
    return (json.dumps(obj, indent=1, sort_keys=True) + '\n').encode('utf-8')


def atomic_write_json(path, obj):
    """Write an object as indented JSON atomically."""
    atomic_write_bytes(path, json_bytes(obj))


def npy_bytes(array):
    """Return the ``.npy`` bytes of a numeric array (never with pickled objects)."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def atomic_save_npy(path, array):
    """Save a numeric array as ``.npy`` atomically (never with pickled objects)."""
    atomic_write_bytes(path, npy_bytes(array))


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


def connect_sqlite(path, synchronous='NORMAL'):
    """Open a SQLite database for concurrent use by several processes (WAL, busy timeout)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(str(path), timeout=30.0, check_same_thread=False)
    try:
        conn.execute('PRAGMA journal_mode=WAL')
        conn.execute(f'PRAGMA synchronous={synchronous}')
    except BaseException:
        conn.close()
        raise
    return conn


# ---- checked SQLite stores (see the module docstring) ------------------------------------

def _not_damage(exc):
    """Tell whether a SQLite error is about access (lock, permission), not a damaged file."""
    text = str(exc).lower()
    return isinstance(exc, sqlite3.OperationalError) and any(
        word in text for word in ('locked', 'busy', 'unable to open', 'readonly', 'read-only'))


def rows_record_path(db_path):
    """Return the file recording a checked database's figures: ``NAME.rows.json`` beside it."""
    db_path = Path(db_path)
    return db_path.with_name(f'{db_path.stem}.rows.json')


def read_rows_record(record_path):
    """Return the figures {name: int} recorded for a database, None without a record.

    Raises StateError naming the record when it is not readable.
    """
    try:
        data = read_json(record_path)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise StateError(record_path, f'unreadable JSON: {exc}') from None
    figures = data.get('figures') if isinstance(data, dict) else None
    if not isinstance(figures, dict) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in figures.values()):
        raise StateError(record_path, 'it holds no {"figures": {name: count}} object')
    return figures


def write_rows_record(record_path, figures, merge=True):
    """Record a database's figures after a committed write.

    The figures must come from inside the committed transaction, so they never exceed what the
    file holds; with ``merge`` each is the larger of it and the one recorded. Two writers
    racing here can leave a figure lower than the truth (the check gets weaker until the next
    write) but never higher, so a healthy store is never refused. Written after the commit,
    not before: a crash in between leaves a record that is too low, not one that is too high.
    """
    figures = {name: int(value) for name, value in figures.items()}
    if merge:
        try:
            old = read_rows_record(record_path) or {}
        except StateError:
            old = {}
        for name, value in old.items():
            if name in figures:
                figures[name] = max(figures[name], value)
    atomic_write_json(record_path, {'figures': figures})


def sqlite_figures(conn, figures):
    """Return {name: value} of a checked database's figures ({name: SQL giving one int})."""
    return {name: int(conn.execute(sql).fetchone()[0] or 0) for name, sql in figures.items()}


def open_checked_sqlite(path, schema):
    """Open a store database after ``PRAGMA quick_check``; create ``schema``; return it.

    Synchronous=FULL: a commit is on disk before its figures are recorded (with NORMAL a power
    cut may drop the last commits of a WAL database, and its record would then claim rows
    the file never kept). Raises StateError naming the file when SQLite finds it damaged.
    """
    path = Path(path)
    try:
        conn = connect_sqlite(path, synchronous='FULL')
    except sqlite3.DatabaseError as exc:
        if _not_damage(exc):
            raise
        raise StateError(path, f'not a readable SQLite database: {exc}') from None
    try:
        rows = conn.execute('PRAGMA quick_check').fetchall()
        if rows != [('ok',)]:
            raise StateError(path, 'SQLite quick_check reports '
                             + '; '.join(str(row[0]) for row in rows[:3]))
        with conn:
            conn.executescript(schema)
    except sqlite3.DatabaseError as exc:
        conn.close()
        if _not_damage(exc):
            raise
        raise StateError(path, f'SQLite reports: {exc}') from None
    except BaseException:
        conn.close()
        raise
    return conn


def lost_rows(now, recorded):
    """Return {name: (now, recorded)} of figures under their record (rows were lost)."""
    return {name: (now[name], value) for name, value in (recorded or {}).items()
            if name in now and now[name] < value}


def describe_lost(lost, record_path):
    """Return the problem sentence part for figures under their record."""
    told = ', '.join(f'{name} {now} < {value}' for name, (now, value) in lost.items())
    return (f'it holds less than {Path(record_path).name} recorded after its last committed '
            f'write ({told}): rows were lost, e.g. an older copy was restored or its -wal file '
            'deleted')


def open_guarded_sqlite(path, schema, figures):
    """Open a checked store (:func:`open_checked_sqlite`) and compare it with its record.

    The record is read BEFORE the figures are counted, so a write committed in between can
    only make the file hold more than the record. A store without a record (made before
    records existed) gets one now. Raises StateError naming the damaged file.
    """
    record_path = rows_record_path(path)
    recorded = read_rows_record(record_path)
    conn = open_checked_sqlite(path, schema)
    try:
        now = sqlite_figures(conn, figures)
        lost = lost_rows(now, recorded)
        if lost:
            raise StateError(path, describe_lost(lost, record_path))
        if recorded is None:
            write_rows_record(record_path, now)
    except BaseException:
        conn.close()
        raise
    return conn


def move_aside(path):
    """Rename a damaged file (with its SQLite ``-wal``/``-shm``) to ``NAME.corrupt-<time>``.

    It is kept, not deleted: what is readable in it may still be salvaged, by us or by hand.
    Returns the new path of the main file.
    """
    path = Path(path)
    stamp = time.strftime('%Y%m%dT%H%M%S')
    target, n = path.with_name(f'{path.name}.corrupt-{stamp}'), 1
    while target.exists():
        target, n = path.with_name(f'{path.name}.corrupt-{stamp}-{n}'), n + 1
    # The main file first: an old -wal left beside a fresh database would be replayed into it.
    for suffix in ('', '-wal', '-shm'):
        with contextlib.suppress(FileNotFoundError):
            os.replace(f'{path}{suffix}', f'{target}{suffix}')
    fsync_dir(path.parent)
    return target


def repair_guarded_sqlite(path, schema, figures, salvage=None):
    """Open a checked store for ``cgrs index``, repairing it; return (conn, notes, lost rows).

    - damaged file (SQLite says so): moved aside (:func:`move_aside`), a fresh one made and,
      with ``salvage(aside_path, conn)`` (returns rows copied), the readable rows copied in;
    - fewer rows than recorded: the rows it holds are kept (they are intact);
    - unreadable record: rewritten from the file.
    The record is then rewritten from the file as it now is. ``lost`` is how many rows the
    record says are gone (None when unknown); ``notes`` say what was done, one per line.
    """
    path = Path(path)
    record_path = rows_record_path(path)
    notes = []
    try:
        recorded = read_rows_record(record_path)
    except StateError as exc:
        recorded = None
        notes.append(f'{record_path} was damaged ({exc.problem}); recorded the figures of '
                     f'{path.name} again')
    lost = None
    try:
        conn = open_checked_sqlite(path, schema)
    except StateError as exc:
        aside = move_aside(path)
        conn = open_checked_sqlite(path, schema)
        salvaged = salvage(aside, conn) if salvage is not None else 0
        now = sqlite_figures(conn, figures)
        if recorded is not None and 'rows' in recorded:
            lost = max(0, recorded['rows'] - now.get('rows', 0))
        notes.append(f'{path} was damaged ({exc.problem}); moved it to {aside.name} and '
                     f'started a fresh one' + (f' with the {salvaged} rows still readable'
                                               if salvage is not None else ''))
        write_rows_record(record_path, now, merge=False)
        return conn, notes, lost
    now = sqlite_figures(conn, figures)
    short = lost_rows(now, recorded)
    if short:
        lost = short['rows'][1] - short['rows'][0] if 'rows' in short else 0
        notes.append(f'{path} was damaged ({describe_lost(short, record_path)}); kept the '
                     f'{now.get("rows", 0)} rows it holds')
    if short or recorded is None:
        write_rows_record(record_path, now, merge=False)
    return conn, notes, lost


def salvage_rows(aside, conn, table, columns):
    """Copy the readable rows of ``table`` from a moved-aside database into ``conn``.

    Rows are read in storage order until SQLite hits damage; a row the fresh schema refuses
    (a CHECK failing on garbage) is skipped. Returns how many rows were copied.
    """
    rows = []
    try:
        # Read-write, not mode=ro: a read-only connection cannot open a WAL database whose
        # -shm is missing. Only this moved-aside copy is touched (its own WAL folded in).
        old = sqlite3.connect(str(aside), timeout=30.0)
    except sqlite3.Error:
        return 0
    try:
        for row in old.execute(f'SELECT {", ".join(columns)} FROM {table}'):
            rows.append(row)
    except sqlite3.Error:
        pass  # damaged from here on: keep what was read
    finally:
        old.close()
    copied = 0
    insert = (f'INSERT OR REPLACE INTO {table} ({", ".join(columns)}) VALUES '
              f'({", ".join("?" * len(columns))})')
    with conn:
        for row in rows:
            try:
                conn.execute(insert, row)
                copied += 1
            except sqlite3.Error:
                continue
    return copied


_FILES_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL, content_hash TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS undecodable (content_hash TEXT PRIMARY KEY, error TEXT NOT NULL);
"""
# Rows of `files` are replaced, never deleted, so their count never decreases.
_FILES_FIGURES = {'rows': 'SELECT COUNT(*) FROM files'}


def hash_cache_path(state_dir):
    """Return the file hash cache database of a state folder."""
    return Path(state_dir) / 'state.sqlite'


class FileHashCache:
    """Content hashes of gallery files, recomputed only when a file's size or mtime changes.

    Reading every image to hash it again on each ``cgrs index`` would cost more than the rest of
    an unchanged re-index, so, like git's index, a file whose (size, mtime_ns) is unchanged keeps
    its recorded hash. A changed stat triggers a re-hash; the embedding is only redone if the
    hash (the content) really changed.

    The database is checked on open (module docstring): a row lost here would drop its image
    from the retriever's ranking without a word, so a damaged cache is refused (StateError)
    and :meth:`open_or_reset` (``cgrs index``) moves it aside and hashes the files again
    (nothing is salvaged: a wrong hash read from a damaged page would pair an image with
    another image's vector, while re-hashing only costs reading the images once).
    """

    def __init__(self, state_dir, _conn=None):
        self.path = hash_cache_path(state_dir)
        self._conn = _conn or open_guarded_sqlite(self.path, _FILES_SCHEMA, _FILES_FIGURES)

    @classmethod
    def open_or_reset(cls, state_dir):
        """Open the cache for ``cgrs index``, starting a fresh one if it is damaged.

        Returns (cache, notes: what was repaired).
        """
        conn, notes, _ = repair_guarded_sqlite(hash_cache_path(state_dir), _FILES_SCHEMA,
                                               _FILES_FIGURES)
        if notes:
            notes[-1] += '; the gallery files are hashed again'
        return cls(state_dir, _conn=conn), notes

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
                figures = sqlite_figures(self._conn, _FILES_FIGURES)
            write_rows_record(rows_record_path(self.path), figures)
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


SEGMENT_NAME = re.compile(r'seg-(\d{6})')


def _is_count(value):
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _meta_problem(meta):
    """Return why a parsed ``meta.json`` cannot be used, or None."""
    if not isinstance(meta, dict):
        return 'it is not a JSON object'
    segments, dim = meta.get('segments'), meta.get('dim')
    if not isinstance(segments, list) or not all(isinstance(seg, dict) for seg in segments):
        return 'its "segments" is not a list of objects'
    if dim is not None and not (_is_count(dim) and dim > 0):
        return f'its "dim" {dim!r} is not a positive integer'
    if segments and dim is None:
        return 'it lists segments but no "dim"'
    numbers = []
    for seg in segments:
        name = seg.get('name')
        if not isinstance(name, str) or not SEGMENT_NAME.fullmatch(name):
            return f'segment name {name!r} is not seg-NNNNNN'
        if not _is_count(seg.get('count')):
            return f'segment {name} has no row count'
        for key in ('bytes', 'keys_bytes'):
            if key in seg and not _is_count(seg[key]):
                return f'segment {name} has a bad {key!r}'
        numbers.append(int(name[4:]))
    if len(set(numbers)) != len(numbers):
        return 'it lists a segment twice'
    if not _is_count(meta.get('next_segment')) or meta['next_segment'] <= max(numbers, default=0):
        return 'its "next_segment" is missing or not past the last segment'
    return None


def read_npy_header(path):
    """Return (shape, dtype, data offset) of an ``.npy`` file, reading only its header."""
    with open(path, 'rb') as handle:
        version = np.lib.format.read_magic(handle)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(handle)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(handle)
        return shape, dtype, handle.tell()


class EmbeddingStore:
    """Append-only store of L2-normalized vectors keyed by content hash, for ONE encoder.

    The folder holds ``meta.json`` (identity, dim, list of segments) and segments
    ``seg-NNNNNN.npy`` + ``seg-NNNNNN.keys.json``. Adding vectors writes a new segment and then
    replaces ``meta.json``; an interrupted run therefore keeps every segment it finished and
    resumes from there. Segments are merged when there are many. Writers take a file lock, so
    the indexer and a retrieval node embedding new captions can share a store; under that lock
    each write first removes what a killed writer left behind (temp files, segments that
    ``meta.json`` does not name).

    Integrity: ``meta.json`` records each segment's row count and the size and SHA-256 of its
    two files (``bytes``/``sha256``, ``keys_bytes``/``keys_sha256``; a meta.json written before
    these existed stays readable, and :meth:`repair` adds them). Every read checks what is
    cheap: the meta's shape, the ``.npy`` size and header (dtype, rows x dim) and the key file,
    which is read whole anyway, against its checksum. The ``.npy`` checksum (a full read) is
    checked where every vector is read anyway (:meth:`load`, compaction) and by :meth:`verify`
    / :meth:`repair`; :meth:`lookup` memory-maps a few rows and checks sizes only. Damage
    raises StateError naming the file.
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
        try:
            meta = read_json(self._meta_path)
        except (OSError, ValueError) as exc:
            raise StateError(self._meta_path, f'unreadable JSON: {exc}') from None
        problem = _meta_problem(meta)
        if problem:
            raise StateError(self._meta_path, problem)
        if meta.get('identity') != self.identity:
            raise RuntimeError(
                f'embedding store {self.root} belongs to {meta.get("identity")!r}, '
                f'not {self.identity!r}')
        return meta

    # ---- reading one segment, checked -----------------------------------------------------

    def _segment_keys(self, seg):
        """Return a segment's keys, checked against meta.json (size, SHA-256, count)."""
        path = self.root / f'{seg["name"]}.keys.json'
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise StateError(path, f'cannot read it ({exc.strerror or exc})') from None
        if 'keys_bytes' in seg and len(data) != seg['keys_bytes']:
            raise StateError(path, f'it is {len(data)} bytes, meta.json recorded '
                                   f'{seg["keys_bytes"]}')
        if 'keys_sha256' in seg and hashlib.sha256(data).hexdigest() != seg['keys_sha256']:
            raise StateError(path, 'its SHA-256 differs from the one meta.json recorded')
        try:
            keys = json.loads(data)
        except ValueError as exc:
            raise StateError(path, f'unreadable JSON: {exc}') from None
        if not isinstance(keys, list) or not all(isinstance(key, str) for key in keys):
            raise StateError(path, 'it is not a JSON list of keys')
        if len(keys) != seg['count']:
            raise StateError(path, f'it holds {len(keys)} keys, meta.json recorded '
                                   f'{seg["count"]}')
        return keys

    def _check_npy(self, seg, dim, checksum=False):
        """Check a segment's ``.npy`` size and header (and SHA-256); return its path."""
        path = self.root / f'{seg["name"]}.npy'
        try:
            size = path.stat().st_size
            shape, dtype, offset = read_npy_header(path)
        except OSError as exc:
            raise StateError(path, f'cannot read it ({exc.strerror or exc})') from None
        except ValueError as exc:
            raise StateError(path, f'not a .npy array file ({exc})') from None
        if 'bytes' in seg and size != seg['bytes']:
            raise StateError(path, f'it is {size} bytes, meta.json recorded {seg["bytes"]}')
        if dtype != np.float32 or shape != (seg['count'], dim):
            raise StateError(path, f'it holds a {"x".join(map(str, shape))} {dtype} array, '
                                   f'meta.json recorded {seg["count"]}x{dim} float32')
        if size != offset + seg['count'] * dim * 4:
            raise StateError(path, f'it is {size} bytes, its {seg["count"]}x{dim} header '
                                   f'needs {offset + seg["count"] * dim * 4}')
        if checksum and 'sha256' in seg and sha256_file(path) != seg['sha256']:
            raise StateError(path, 'its SHA-256 differs from the one meta.json recorded')
        return path

    def _segment_vectors(self, seg, dim, mmap=False):
        """Return a segment's vectors: checksum-verified in memory, or size-checked mmap."""
        path = self._check_npy(seg, dim, checksum=not mmap)
        try:
            return np.load(str(path), mmap_mode='r' if mmap else None, allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            raise StateError(path, f'not a readable .npy array ({exc})') from None

    def _write_segment(self, name, keys, vectors):
        """Write a segment's two files; return its meta.json entry (count, sizes, SHA-256)."""
        data, key_data = npy_bytes(np.asarray(vectors, dtype=np.float32)), json_bytes(list(keys))
        atomic_write_bytes(self.root / f'{name}.npy', data)
        atomic_write_bytes(self.root / f'{name}.keys.json', key_data)
        return {'name': name, 'count': len(keys), 'bytes': len(data),
                'sha256': hashlib.sha256(data).hexdigest(), 'keys_bytes': len(key_data),
                'keys_sha256': hashlib.sha256(key_data).hexdigest()}

    # ---- reads ------------------------------------------------------------------------------

    def keys(self):
        """Return the set of keys stored (reads the key files; checks the .npy sizes)."""
        meta = self._read_meta()
        out = set()
        for seg in meta['segments']:
            out.update(self._segment_keys(seg))
            self._check_npy(seg, meta['dim'])
        return out

    def load(self):
        """Return (keys list, float32 matrix) of everything stored, in storage order.

        Every segment is checked against its recorded SHA-256 (it is read whole anyway).
        """
        meta = self._read_meta()
        keys, blocks = [], []
        for seg in meta['segments']:
            keys.extend(self._segment_keys(seg))
            blocks.append(self._segment_vectors(seg, meta['dim']))
        dim = meta.get('dim') or self.dim or 0
        if not blocks:
            return [], np.zeros((0, dim), dtype=np.float32)
        return keys, np.concatenate(blocks).astype(np.float32, copy=False)

    def lookup(self, wanted):
        """Return (found keys, matrix) for the keys of ``wanted`` that are stored.

        Only segments holding a wanted key are read, and only their wanted rows are copied
        (memory-mapped, sizes checked, no checksum), so looking up a few keys in a large store
        stays cheap.
        """
        wanted = set(wanted)
        meta = self._read_meta()
        keys, blocks = [], []
        for seg in meta['segments']:
            seg_keys = self._segment_keys(seg)
            rows = [i for i, key in enumerate(seg_keys) if key in wanted]
            if rows:
                vectors = self._segment_vectors(seg, meta['dim'], mmap=True)
                keys.extend(seg_keys[i] for i in rows)
                blocks.append(np.asarray(vectors[rows], dtype=np.float32))
        dim = meta.get('dim') or self.dim or 0
        if not blocks:
            return [], np.zeros((0, dim), dtype=np.float32)
        return keys, np.concatenate(blocks)

    def verify(self):
        """Check every file of the store (sizes, headers, SHA-256); return the vector count.

        Raises StateError naming the first damaged file. Costs one read of the whole store.
        """
        meta = self._read_meta()
        for seg in meta['segments']:
            self._segment_keys(seg)
            self._check_npy(seg, meta['dim'], checksum=True)
        return sum(seg['count'] for seg in meta['segments'])

    # ---- writes -----------------------------------------------------------------------------

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
                present.update(self._segment_keys(seg))
            rows, seen = [], set()
            for i, key in enumerate(keys):
                if key not in present and key not in seen:
                    rows.append(i)
                    seen.add(key)
            if not rows:
                return 0
            name = f'seg-{meta["next_segment"]:06d}'
            meta['segments'].append(self._write_segment(name, [keys[i] for i in rows],
                                                        vectors[rows]))
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

    def repair(self):
        """Check the whole store and repair it for ``cgrs index``; return (notes, rebuilt keys).

        - ``meta.json`` unreadable: rebuilt from the segment pairs on disk that read intact
          (one merged segment; a segment a killed writer finished but never listed is a valid
          pair too, its vectors belong to its keys);
        - a damaged segment: dropped from meta.json and deleted, so the caller embeds its
          keys again (a dropped vector is re-derived from its image or caption; keeping a
          vector that may be wrong would rank with it silently);
        - a segment listed without checksums (older meta.json): its sizes and SHA-256 recorded.
        ``notes`` say what was done; ``rebuilt keys`` are the keys of a rebuilt meta.json.
        """
        if not self._meta_path.exists():
            return [], set()
        with self._lock, file_lock(self.root / '.lock'):
            try:
                meta = self._read_meta()
            except StateError as exc:
                return self._rebuild_meta_locked(exc)
            notes, kept, changed = [], [], False
            for seg in meta['segments']:
                try:
                    self._segment_keys(seg)
                    self._check_npy(seg, meta['dim'], checksum=True)
                except StateError as exc:
                    notes.append(f'{exc.path} was damaged ({exc.problem}); dropped its '
                                 f'{seg["count"]} vectors to embed them again')
                    changed = True
                    continue
                if 'sha256' not in seg or 'keys_sha256' not in seg:
                    for suffix, prefix in (('.npy', ''), ('.keys.json', 'keys_')):
                        path = self.root / f'{seg["name"]}{suffix}'
                        seg[f'{prefix}bytes'] = path.stat().st_size
                        seg[f'{prefix}sha256'] = sha256_file(path)
                    changed = True
                kept.append(seg)
            if changed:
                meta['segments'] = kept
                atomic_write_json(self._meta_path, meta)
                self._sweep_locked(meta)  # deletes the dropped segments' files
            return notes, set()

    def _rebuild_meta_locked(self, damage):
        """Write a new meta.json (and one merged segment) from the intact pairs on disk."""
        keys, blocks, dim, used, dropped, top = [], [], None, 0, [], 0
        seen = set()
        for npy in sorted(self.root.glob('seg-*.npy')):
            name = npy.name[:-len('.npy')]
            if not SEGMENT_NAME.fullmatch(name):
                continue
            top = max(top, int(name[4:]))
            try:
                seg_keys = json.loads((self.root / f'{name}.keys.json').read_bytes())
                shape, dtype, offset = read_npy_header(npy)
                if (not isinstance(seg_keys, list)
                        or not all(isinstance(key, str) for key in seg_keys)
                        or dtype != np.float32 or len(shape) != 2
                        or shape[0] != len(seg_keys) or dim not in (None, shape[1])
                        or npy.stat().st_size != offset + shape[0] * shape[1] * 4):
                    raise ValueError('keys and vectors do not match')
                vectors = load_npy(npy)
            except (OSError, ValueError, EOFError):
                dropped.append(name)
                continue
            dim, used = shape[1], used + 1
            rows = [i for i, key in enumerate(seg_keys) if key not in seen]
            seen.update(seg_keys)
            keys.extend(seg_keys[i] for i in rows)
            blocks.append(vectors[rows])
        meta = {'format': 1, 'identity': self.identity, 'dim': dim or self.dim,
                'segments': [], 'next_segment': top + 1}
        if keys:
            name = f'seg-{meta["next_segment"]:06d}'
            meta['next_segment'] += 1
            meta['segments'] = [self._write_segment(name, keys, np.concatenate(blocks))]
        atomic_write_json(self._meta_path, meta)
        self._sweep_locked(meta)
        note = (f'{damage.path} was damaged ({damage.problem}); rebuilt it from the {used} '
                f'intact segment file pair(s) on disk ({len(keys)} vectors)')
        if dropped:
            note += f', dropping {len(dropped)} unreadable one(s) ({", ".join(dropped)})'
        return [note], set(keys)

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
        for seg in meta['segments']:
            seg_keys = self._segment_keys(seg)
            seg_vecs = self._segment_vectors(seg, meta['dim'])
            if keep is not None:
                rows = [i for i, key in enumerate(seg_keys) if key in keep]
                seg_keys, seg_vecs = [seg_keys[i] for i in rows], seg_vecs[rows]
            keys.extend(seg_keys)
            blocks.append(seg_vecs)
        name = f'seg-{meta["next_segment"]:06d}'
        meta['next_segment'] += 1
        if keys:
            meta['segments'] = [self._write_segment(name, keys, np.concatenate(blocks))]
        else:
            meta['segments'] = []
        atomic_write_json(self._meta_path, meta)
        # Old segment files go only after meta.json no longer names them.
        for stale in old:
            for suffix in ('.npy', '.keys.json'):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.root / f'{stale}{suffix}')
