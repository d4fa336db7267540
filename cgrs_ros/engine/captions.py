"""The caption store (SQLite) and the ``manifest`` captioner.

One row per (image content hash, captioner identity, prompt version): a caption (status
``ok``) or the reason there is none (status ``failed`` + error). Keying by the image's content
hash rather than its id means a renamed or moved image keeps its caption and a changed image
is captioned again. Every write bumps a store-wide sequence number, so a reader (the retrieval
node) can ask "what changed since seq N" and pick up new captions without reopening.

SQLite runs in WAL mode: the captioning process writes while retrieval processes read.
Writers commit once per batch (:meth:`CaptionStore.put_many`), so an interrupted captioning run
keeps every finished batch.

Integrity: the store never deletes a row (a caption is replaced, a withdrawn one becomes a
``failed`` row), so its row count and newest ``seq`` never decrease. After each committed batch
they are recorded in ``captions.rows.json`` (storage.write_rows_record); opening a store that
holds less than that (an older copy restored over it, its ``-wal`` file lost before a
checkpoint) raises StateError instead of ranking with captions that silently went missing.
With ``PRAGMA quick_check`` on open this covers garbage and truncated files too;
:func:`repair_caption_store` (``cgrs index``) salvages what is readable.

Which captions retrieval uses (:func:`caption_source_for`):
- ``captioner.backend: manifest``: the manifest descriptions, stored under the identity
  ``manifest`` by the indexer;
- a VLM backend: for each image, the newest ``ok`` caption written by any VLM captioner.
  "Newest wins" lets a better captioner replace an older one image by image while its run is
  still going, instead of the caption channel going dark until the new run is complete.
"""

import dataclasses
from pathlib import Path
import time

from cgrs_ros.engine.storage import (open_guarded_sqlite, repair_guarded_sqlite,
                                     rows_record_path, salvage_rows, sqlite_figures,
                                     write_rows_record)

MANIFEST_CAPTIONER = 'manifest'
MANIFEST_PROMPT_VERSION = 'descriptions-v1'
# captioner.backend: none. No captioner writes rows under this name, so its source selects no
# caption at all: the caption channel stays off and manifest descriptions are ignored.
NO_CAPTIONER = 'none'
STATUSES = ('ok', 'failed')

_SCHEMA = """
CREATE TABLE IF NOT EXISTS captions (
    content_hash   TEXT NOT NULL,
    captioner      TEXT NOT NULL,
    prompt_version TEXT NOT NULL,
    status         TEXT NOT NULL CHECK (status IN ('ok', 'failed')),
    text           TEXT,
    error          TEXT,
    created_at     REAL NOT NULL,
    seq            INTEGER NOT NULL,
    PRIMARY KEY (content_hash, captioner, prompt_version)
);
CREATE INDEX IF NOT EXISTS captions_seq ON captions (seq);
CREATE INDEX IF NOT EXISTS captions_source ON captions (captioner, prompt_version, status);
"""
_COLUMNS = ('content_hash', 'captioner', 'prompt_version', 'status', 'text', 'error',
            'created_at', 'seq')
# Figures that never decrease (see the module docstring), recorded after every commit.
_FIGURES = {'rows': 'SELECT COUNT(*) FROM captions',
            'max_seq': 'SELECT COALESCE(MAX(seq), 0) FROM captions'}


@dataclasses.dataclass(frozen=True)
class CaptionRecord:
    """One caption store row (``text`` is None for failed rows, ``error`` for ok rows)."""

    content_hash: str
    captioner: str
    prompt_version: str
    status: str
    text: str = None
    error: str = None
    created_at: float = 0.0
    seq: int = 0


@dataclasses.dataclass(frozen=True)
class CaptionSource:
    """Which store rows the caption channel reads (see the module docstring)."""

    captioner: str = None        # exact captioner identity, or None = any VLM captioner
    prompt_version: str = None   # exact prompt version, or None = any


def caption_source_for(captioner_config):
    """Return the :class:`CaptionSource` a ``captioner`` config section selects."""
    if captioner_config.backend == MANIFEST_CAPTIONER:
        return CaptionSource(MANIFEST_CAPTIONER,
                             captioner_config.prompt_version or MANIFEST_PROMPT_VERSION)
    if captioner_config.backend == NO_CAPTIONER:
        return CaptionSource(NO_CAPTIONER, None)
    return CaptionSource(None, None)


def manifest_caption(item):
    """Return the caption the ``manifest`` captioner gives an item, or None without any.

    Several descriptions of one image (GeoText-1652 ships three, each written from a
    different angle) are joined into one text, each ending in a full stop. One caption per
    image keeps the store, the display and the caption index one-row-per-image, and a mean-
    pooled sentence encoder such as MiniLM embeds the union of the details in one vector.
    The cost: MiniLM reads at most 256 word pieces, so very long joined texts are truncated.
    """
    parts = []
    for text in item.descriptions:
        text = text.strip()
        if text:
            parts.append(text if text[-1] in '.!?' else text + '.')
    return ' '.join(parts) or None


class CaptionStore:
    """SQLite store of captions keyed by (content hash, captioner identity, prompt version)."""

    def __init__(self, path, _conn=None):
        """Open (and create if needed) the store at ``path``; StateError if it is damaged."""
        self.path = Path(path)
        self._conn = _conn or open_guarded_sqlite(self.path, _SCHEMA, _FIGURES)

    def close(self):
        """Close the database connection."""
        self._conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def put_many(self, records):
        """Insert or replace rows in ONE transaction (one commit per batch); returns count.

        ``records`` are :class:`CaptionRecord` (``created_at``/``seq`` are filled in here).
        """
        records = list(records)
        for rec in records:
            if rec.status not in STATUSES:
                raise ValueError(f'caption status must be ok or failed, not {rec.status!r}')
            if rec.status == 'ok' and not (rec.text or '').strip():
                raise ValueError(f'an ok caption for {rec.content_hash} has no text')
        if not records:
            return 0
        now = time.time()
        with self._conn:
            # BEGIN IMMEDIATE takes the write lock first, so MAX(seq) cannot race another writer.
            self._conn.execute('BEGIN IMMEDIATE')
            (seq,) = self._conn.execute('SELECT COALESCE(MAX(seq), 0) FROM captions').fetchone()
            self._conn.executemany(
                'INSERT OR REPLACE INTO captions (content_hash, captioner, prompt_version, status,'
                ' text, error, created_at, seq) VALUES (?, ?, ?, ?, ?, ?, ?, ?)',
                [(rec.content_hash, rec.captioner, rec.prompt_version, rec.status,
                  rec.text if rec.status == 'ok' else None,
                  rec.error if rec.status == 'failed' else None, now, seq + i + 1)
                 for i, rec in enumerate(records)])
            figures = sqlite_figures(self._conn, _FIGURES)
        write_rows_record(rows_record_path(self.path), figures)  # after the commit, not before
        return len(records)

    def put_ok(self, content_hash, captioner, prompt_version, text):
        """Store one caption."""
        self.put_many([CaptionRecord(content_hash, captioner, prompt_version, 'ok', text=text)])

    def put_failed(self, content_hash, captioner, prompt_version, error):
        """Record that an image could not be captioned, and why."""
        self.put_many([CaptionRecord(content_hash, captioner, prompt_version, 'failed',
                                     error=error)])

    def get(self, content_hash, captioner, prompt_version):
        """Return the row for one key, or None."""
        row = self._conn.execute(
            'SELECT content_hash, captioner, prompt_version, status, text, error, created_at, seq'
            ' FROM captions WHERE content_hash = ? AND captioner = ? AND prompt_version = ?',
            (content_hash, captioner, prompt_version)).fetchone()
        return CaptionRecord(*row) if row else None

    def done(self, captioner, prompt_version, include_failed=True):
        """Return {content_hash: status} of rows for one captioner identity and prompt version.

        Captioning runs use it to skip images already captioned (and, with
        ``include_failed``, those that failed before).
        """
        sql = ('SELECT content_hash, status FROM captions WHERE captioner = ? AND '
               'prompt_version = ?')
        if not include_failed:
            sql += " AND status = 'ok'"
        return dict(self._conn.execute(sql, (captioner, prompt_version)))

    def last_seq(self):
        """Return the sequence number of the newest write (0 for an empty store)."""
        return self._conn.execute('SELECT COALESCE(MAX(seq), 0) FROM captions').fetchone()[0]

    def ok_captions(self, source, since_seq=0):
        """Return ({content_hash: (text, captioner)}, newest seq) of ok captions for a source.

        Only rows written after ``since_seq`` are returned. For a "any VLM captioner" source
        the newest row per image wins and manifest rows are ignored.
        """
        if source.captioner is not None:
            sql = ("SELECT content_hash, text, captioner, seq FROM captions WHERE status = 'ok'"
                   ' AND captioner = ? AND seq > ?')
            params = [source.captioner, since_seq]
            if source.prompt_version is not None:
                sql += ' AND prompt_version = ?'
                params.append(source.prompt_version)
        else:
            sql = ("SELECT content_hash, text, captioner, seq FROM captions WHERE status = 'ok'"
                   ' AND captioner != ? AND seq > ?')
            params = [MANIFEST_CAPTIONER, since_seq]
        out, newest = {}, since_seq
        for content_hash, text, captioner, seq in self._conn.execute(sql + ' ORDER BY seq',
                                                                     params):
            out[content_hash] = (text, captioner)
            newest = max(newest, seq)
        return out, newest

    def failures(self, captioner, prompt_version):
        """Return {content_hash: error} of failed rows for one captioner and prompt version."""
        return dict(self._conn.execute(
            "SELECT content_hash, error FROM captions WHERE status = 'failed' AND captioner = ?"
            ' AND prompt_version = ?', (captioner, prompt_version)))

    def counts(self):
        """Return {(captioner, prompt_version, status): n} (for status reports)."""
        return {(c, p, s): n for c, p, s, n in self._conn.execute(
            'SELECT captioner, prompt_version, status, COUNT(*) FROM captions '
            'GROUP BY captioner, prompt_version, status')}


def caption_store_path(state_dir):
    """Return the caption store file inside a state folder."""
    return Path(state_dir) / 'captions.sqlite'


def repair_caption_store(path, gallery='GALLERY'):
    """Check the caption store for ``cgrs index`` and repair it; return notes (empty if whole).

    A damaged file is moved aside as ``captions.sqlite.corrupt-<time>`` and its readable rows
    are copied into a fresh store (with their own seq numbers); a store that lost rows keeps
    the rows it holds. Either way the indexer then rewrites the manifest captions from the
    manifest; VLM captions that were lost can only come back from ``cgrs caption``.
    """
    conn, notes, lost = repair_guarded_sqlite(
        path, _SCHEMA, _FIGURES,
        salvage=lambda aside, fresh: salvage_rows(aside, fresh, 'captions', _COLUMNS))
    conn.close()
    if notes and lost != 0:
        told = 'rows may have been lost' if lost is None else f'{lost} rows were lost'
        notes.append(f'{told} from {Path(path).name}: manifest captions are written again from '
                     f'the manifest, VLM captions that were lost need `cgrs caption {gallery}` '
                     'again')
    return notes
