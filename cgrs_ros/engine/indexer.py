"""``cgrs index``: embed new or changed gallery images and captions, persist the FAISS index.

Incremental by content: an image is re-embedded only when its bytes (SHA-256) are new to the
configured image encoder, a caption only when its text is new to the text encoder. Files whose
size and mtime are unchanged are not even re-read (storage.FileHashCache). Models are loaded
only when there is something to embed, so a run over an unchanged gallery does no model work.

Image embeddings are checkpointed every ``image_encoder.checkpoint_every`` images (default
1024; each checkpoint is a new store segment), caption embeddings every :data:`CHECKPOINT_ROWS`,
so an interrupted run resumes where it stopped. Images that fail to decode are skipped with the
reason and remembered by content hash, so later runs do not try them again (until the file
changes).

Every run first checks the state it reads and repairs what is damaged from what is intact
(storage.py, "Integrity"): a damaged file hash cache is started afresh (files hashed again), a
damaged embedding segment is dropped (its images or captions embedded again), an unreadable
``meta.json`` is rebuilt from the segment files, a damaged caption store is moved aside and its
readable rows salvaged (manifest captions written again), a damaged FAISS index is rebuilt from
the embeddings. The summary lists each repair (``repairs``) and counts the items whose state
was rebuilt as ``repaired``, never as ``unchanged``.
"""

import dataclasses
from pathlib import Path
import time

from cgrs_ros.engine.captions import (caption_source_for, caption_store_path, CaptionRecord,
                                      CaptionSource, CaptionStore, manifest_caption,
                                      MANIFEST_CAPTIONER, repair_caption_store)
from cgrs_ros.engine.encoders import (image_encoder_identity, load_image_encoder,
                                      load_text_encoder, text_encoder_identity)
from cgrs_ros.engine.errors import ConfigError, GalleryError, StateError
from cgrs_ros.engine.gallery import decode_image, load_gallery
from cgrs_ros.engine.index import VectorIndex
from cgrs_ros.engine.retriever import build_image_index, image_index_fingerprint, image_index_path
from cgrs_ros.engine.storage import default_state_dir, EmbeddingStore, FileHashCache, sha256_text
import numpy as np
from tqdm import tqdm

CHECKPOINT_ROWS = 1024


@dataclasses.dataclass(frozen=True)
class SkippedItem:
    """A gallery row that is not (fully) indexed, and why."""

    image_id: str
    line: int
    reason: str

    def __str__(self):
        who = f' (image_id {self.image_id!r})' if self.image_id else ''
        return f'line {self.line}{who}: {self.reason}'


@dataclasses.dataclass
class IndexSummary:
    """What an index run did.

    ``indexed``: items that needed model work this run; ``repaired``: items without model work
    whose state was rebuilt from a damaged file; ``unchanged``: items already up to date;
    ``skipped``: rows left out (or only partly indexed), with reasons; ``repairs``: one line
    per damaged state file found, saying what was done about it.
    """

    indexed: int = 0
    unchanged: int = 0
    skipped: list = dataclasses.field(default_factory=list)
    repaired: int = 0
    repairs: list = dataclasses.field(default_factory=list)
    images_embedded: int = 0
    captions_embedded: int = 0
    captions_written: int = 0
    files_hashed: int = 0
    models_loaded: list = dataclasses.field(default_factory=list)
    image_encoder: str = None
    text_encoder: str = None
    captioned: int = 0
    state_dir: str = ''
    elapsed_s: float = 0.0

    def to_dict(self):
        """Return the summary as plain data (for --json)."""
        out = dataclasses.asdict(self)
        out['skipped'] = [dataclasses.asdict(s) for s in self.skipped]
        return out


def _chunks(seq, size):
    for start in range(0, len(seq), size):
        yield seq[start:start + size]


def _embed_images(todo, path_of_hash, platform_of_hash, config, store, hash_cache, summary,
                  progress):
    """Embed images (by content hash) into ``store``; returns {hash: decode error}.

    An encoder with platform experts gets each image's platform (the first row's, when the
    same file appears under two platforms).
    """
    encoder = load_image_encoder(config.image_encoder)
    summary.models_loaded.append(encoder.identity)
    failures, pending_keys, pending_vecs = {}, [], []
    bar = tqdm(total=len(todo), desc='embedding images', unit='img', disable=not progress)
    try:
        for batch in _chunks(todo, encoder.batch_size):
            images, keys, platforms = [], [], []
            for content in batch:
                try:
                    images.append(decode_image(path_of_hash[content]))
                    keys.append(content)
                    platforms.append(platform_of_hash[content])
                except Exception as exc:  # any decoder error: skip this image, keep going
                    failures[content] = f'cannot decode image ({type(exc).__name__}: {exc})'
            if images:
                pending_vecs.append(encoder.encode_images(images, platforms=platforms))
                pending_keys.extend(keys)
                summary.images_embedded += len(images)
            bar.update(len(batch))
            if len(pending_keys) >= config.image_encoder.checkpoint_every:
                _flush(store, pending_keys, pending_vecs)
                hash_cache.mark_undecodable(failures)
        _flush(store, pending_keys, pending_vecs)
        hash_cache.mark_undecodable(failures)
    finally:
        bar.close()
    return failures


def _flush(store, keys, vecs):
    if keys:
        store.add(list(keys), np.concatenate(vecs))
        keys.clear()
        vecs.clear()


def _write_manifest_captions(gallery, hashes, store, prompt_version):
    """Store the manifest descriptions as captions (only rows whose text changed)."""
    wanted, dropped = {}, set()
    for item, content in zip(gallery.items, hashes):
        text = manifest_caption(item)
        if text is not None:
            wanted[content] = text  # identical images: the last row's descriptions win
        else:
            dropped.add(content)
    existing, _ = store.ok_captions(CaptionSource(MANIFEST_CAPTIONER, prompt_version))
    records = [CaptionRecord(content, MANIFEST_CAPTIONER, prompt_version, 'ok', text=text)
               for content, text in wanted.items() if existing.get(content, (None,))[0] != text]
    # A description deleted from the manifest must stop being this image's caption.
    records += [CaptionRecord(content, MANIFEST_CAPTIONER, prompt_version, 'failed',
                              error='the manifest row has no description any more')
                for content in dropped - set(wanted) if content in existing]
    written = 0
    for batch in _chunks(records, 5000):
        written += store.put_many(batch)
    return written


def embed_caption_texts(state_dir, text_config, texts, progress=False):
    """Store text embeddings of the caption ``texts`` the text encoder's store lacks.

    Returns (keys embedded now, identity of the encoder when one was loaded else None). The
    encoder is loaded only when something is missing. ``cgrs index`` and captioning runs
    (``captioning.py``, after every committed batch) both embed captions through here.
    """
    identity = text_encoder_identity(text_config)
    text_store = EmbeddingStore.for_encoder(state_dir, 'text', identity)
    have = text_store.keys()
    todo = {}
    for text in texts:
        key = sha256_text(text)
        if key not in have:
            todo.setdefault(key, text)
    if not todo:
        return [], None
    encoder = load_text_encoder(text_config)
    keys = list(todo)
    bar = tqdm(total=len(keys), desc='embedding captions', unit='caption', disable=not progress)
    try:
        for batch in _chunks(keys, max(CHECKPOINT_ROWS, encoder.batch_size)):
            text_store.add(batch, encoder.encode_texts([todo[k] for k in batch]))
            bar.update(len(batch))
    finally:
        bar.close()
    return keys, encoder.identity


def index_gallery(gallery_dir, config, state_dir=None, progress=True):
    """Index a gallery incrementally; returns an :class:`IndexSummary`.

    Raises GalleryError when no manifest row is usable and ConfigError when there is nothing
    to search with (no image encoder and no captions).
    """
    start = time.perf_counter()
    gallery = load_gallery(gallery_dir, check_images='header')
    summary = IndexSummary(skipped=[SkippedItem(p.image_id, p.line, p.message)
                                    for p in gallery.problems])
    if not gallery.items:
        first = f' (first: {gallery.problems[0]})' if gallery.problems else ''
        raise GalleryError(f'no usable row in {gallery.manifest}{first}; fix the manifest')
    state = Path(default_state_dir(gallery_dir) if state_dir is None else state_dir)
    summary.state_dir = str(state)
    state.mkdir(parents=True, exist_ok=True)

    hash_cache, notes = FileHashCache.open_or_reset(state)
    summary.repairs.extend(notes)
    rebuilt_all = bool(notes)  # a gallery-wide table was rebuilt: every item's record with it
    rebuilt = set()            # content hashes whose embedding or index entry was rebuilt
    try:
        files = [(item.path, gallery.path_of(item)) for item in gallery.items]
        bar = tqdm(total=len(files), desc='checking files', unit='file',
                   disable=not progress or len(files) < 1000)
        hashes_by_path, summary.files_hashed = hash_cache.update(files, lambda: bar.update())
        bar.close()
        hashes = [hashes_by_path[item.path] for item in gallery.items]
        worked = set()  # content hashes that needed model work this run

        # Coarse channel: image embeddings for the configured encoder.
        bad = {}
        if config.image_encoder.backend != 'none':
            identity = image_encoder_identity(config.image_encoder)
            summary.image_encoder = identity
            store = EmbeddingStore.for_encoder(state, 'image', identity)
            notes, rebuilt_keys = store.repair()
            summary.repairs.extend(notes)
            rebuilt.update(rebuilt_keys)
            have = store.keys()
            known_bad = hash_cache.undecodable()
            path_of_hash, platform_of_hash = {}, {}
            for item, content in zip(gallery.items, hashes):
                path_of_hash.setdefault(content, gallery.path_of(item))
                platform_of_hash.setdefault(content, item.platform)
            todo = [c for c in path_of_hash if c not in have and c not in known_bad]
            if todo:
                new_bad = _embed_images(todo, path_of_hash, platform_of_hash, config, store,
                                        hash_cache, summary, progress)
                worked.update(todo)
                known_bad.update(new_bad)
            bad = {c: known_bad[c] for c in set(hashes) if c in known_bad}
            live = set(hashes)
            dead = len(have - live)
            if dead > max(CHECKPOINT_ROWS, len(live)):
                store.compact(keep=live)  # most rows belong to images no longer in the gallery
            outcome = _persist_image_index(state, gallery, hashes, identity, store, summary)
            if outcome == 'repaired':
                rebuilt.update(hashes)

        # Caption channel: manifest captions into the store, then caption text embeddings.
        notes = repair_caption_store(caption_store_path(state), gallery_dir)
        summary.repairs.extend(notes)
        rebuilt_all = rebuilt_all or bool(notes)
        with CaptionStore(caption_store_path(state)) as captions:
            if config.captioner.backend == MANIFEST_CAPTIONER:
                version = caption_source_for(config.captioner).prompt_version
                summary.captions_written = _write_manifest_captions(gallery, hashes, captions,
                                                                    version)
            ok, _ = captions.ok_captions(caption_source_for(config.captioner))
        item_texts = [ok[c][0] if c in ok else None for c in hashes]
        summary.captioned = sum(text is not None for text in item_texts)
        if summary.captioned:
            summary.text_encoder = text_encoder_identity(config.text_encoder)
            notes, rebuilt_keys = EmbeddingStore.for_encoder(
                state, 'text', summary.text_encoder).repair()
            summary.repairs.extend(notes)
            rebuilt.update(content for content, text in zip(hashes, item_texts)
                           if text is not None and sha256_text(text) in rebuilt_keys)
            embedded, loaded = embed_caption_texts(
                state, config.text_encoder, [t for t in item_texts if t is not None], progress)
            if loaded:
                summary.models_loaded.append(loaded)
            summary.captions_embedded += len(embedded)
            embedded = set(embedded)
            worked.update(content for content, text in zip(hashes, item_texts)
                          if text is not None and sha256_text(text) in embedded)
        elif config.image_encoder.backend == 'none':
            raise ConfigError(
                f'nothing to index in {gallery_dir}: image_encoder.backend is none and no image '
                'has a caption; configure an image encoder, add descriptions to the manifest, '
                'or run `cgrs caption` first')

        for item, content, text in zip(gallery.items, hashes, item_texts):
            if content in bad:
                note = '; it is searchable by its caption only' if text else ''
                summary.skipped.append(SkippedItem(item.image_id, item.line, bad[content] + note))
            elif content in worked:
                summary.indexed += 1
            elif rebuilt_all or content in rebuilt:
                summary.repaired += 1
            else:
                summary.unchanged += 1
    finally:
        hash_cache.close()
    summary.elapsed_s = time.perf_counter() - start
    return summary


def _persist_image_index(state, gallery, hashes, identity, store, summary):
    """Write the FAISS image index for the current gallery unless it is current and intact.

    Returns 'current', 'written' (it was out of date), 'repaired' (it was damaged: the damage
    is added to ``summary.repairs``) or 'none' (no image has an embedding).
    """
    path = image_index_path(state)
    expect = {'identity': identity,
              'fingerprint': image_index_fingerprint(identity, gallery.items, hashes)}
    damage = None
    try:
        if VectorIndex.check(path, expect):
            return 'current'
    except StateError as exc:
        damage = exc
    keys, matrix = store.load()
    index = build_image_index(gallery, hashes, keys, matrix)
    if index is None:  # no image could be embedded: leave no stale index behind
        for suffix in ('.faiss', '.json'):
            path.with_suffix(suffix).unlink(missing_ok=True)
        return 'none'
    index.save(path, expect)
    if damage is None:
        return 'written'
    summary.repairs.append(f'{damage.path} was damaged ({damage.problem}); rebuilt the image '
                           'index from the stored embeddings')
    return 'repaired'
