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
from cgrs_ros.engine.cluster import decode_failure
from cgrs_ros.engine.encoders import (image_encoder_identity, load_image_encoder,
                                      load_text_encoder, text_encoder_identity)
from cgrs_ros.engine.errors import ConfigError, GalleryError, StateError
from cgrs_ros.engine.gallery import decode_image, load_gallery
from cgrs_ros.engine.index import PLATFORM_CODES, resolve_type, VectorIndex
from cgrs_ros.engine.retriever import (build_image_index, image_index_fingerprint,
                                       image_index_path, image_item_keys)
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
    image_index: dict = dataclasses.field(default_factory=dict)

    def to_dict(self):
        """Return the summary as plain data (for --json)."""
        out = dataclasses.asdict(self)
        out['skipped'] = [dataclasses.asdict(s) for s in self.skipped]
        return out


def _chunks(seq, size):
    for start in range(0, len(seq), size):
        yield seq[start:start + size]


def _encode_here(encoder, todo, path_of_hash, platform_of_hash):
    """Embed images in this process; yield ``(keys, vectors, {key: decode error})`` batches."""
    for batch in _chunks(todo, encoder.batch_size):
        images, keys, platforms, failures = [], [], [], {}
        for content in batch:
            try:
                images.append(decode_image(path_of_hash[content]))
                keys.append(content)
                platforms.append(platform_of_hash[content])
            except Exception as exc:  # any decoder error: skip this image, keep going
                failures[content] = decode_failure(exc)
        vectors = (encoder.encode_images(images, platforms=platforms) if images
                   else np.zeros((0, encoder.dim), dtype=np.float32))
        yield keys, vectors, failures


def _embed_images(todo, path_of_hash, platform_of_hash, config, store, hash_cache, summary,
                  progress, ray=None):
    """Embed images (by content hash) into ``store``; returns {hash: decode error}.

    An encoder with platform experts gets each image's platform (the first row's, when the
    same file appears under two platforms). ``ray`` (a ``cluster.RayJob``) embeds them on a
    Ray cluster instead; either way the batches are committed here, every
    ``checkpoint_every`` images.
    """
    if ray is None:
        encoder = load_image_encoder(config.image_encoder)
        summary.models_loaded.append(encoder.identity)
        batches = _encode_here(encoder, todo, path_of_hash, platform_of_hash)
    else:
        from cgrs_ros.engine.cluster import embed_images
        summary.models_loaded.append(image_encoder_identity(config.image_encoder))
        batches = embed_images(ray, config.image_encoder, todo, path_of_hash, platform_of_hash)
    failures, pending_keys, pending_vecs = {}, [], []
    bar = tqdm(total=len(todo), desc='embedding images', unit='img', disable=not progress)
    try:
        for keys, vectors, batch_failures in batches:
            failures.update(batch_failures)
            if keys:
                pending_vecs.append(vectors)
                pending_keys.extend(keys)
                summary.images_embedded += len(keys)
            bar.update(len(keys) + len(batch_failures))
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


def index_gallery(gallery_dir, config, state_dir=None, progress=True, replace_index=False,
                  log=None, ray=None):
    """Index a gallery incrementally; returns an :class:`IndexSummary`.

    ``replace_index``: write a new image index even when its recall@10 is lower than the saved
    one's (otherwise the saved one is kept and ``summary.image_index`` says why). ``log``
    hears the index build's steps (training, tuning) as lines of text. ``ray`` (a
    ``cluster.RayJob``) embeds the images on a Ray cluster (cluster.py), through the same
    checkpointed store.

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
                                        hash_cache, summary, progress, ray)
                worked.update(todo)
                known_bad.update(new_bad)
            bad = {c: known_bad[c] for c in set(hashes) if c in known_bad}
            live = set(hashes)
            dead = len(have - live)
            if dead > max(CHECKPOINT_ROWS, len(live)):
                store.compact(keep=live)  # most rows belong to images no longer in the gallery
            outcome = _persist_image_index(state, gallery, hashes, identity, store, summary,
                                           config, replace_index, log)
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


# Index settings that change what a build produces (mmap, exact_filter_max and recall_queries
# only change how it is opened, searched or measured).
_BUILD_KEYS = ('type', 'flat_max', 'pq_min', 'nlist', 'nprobe', 'ef_search', 'hnsw_m', 'pq_m',
               'train_size', 'target_recall', 'seed')
# Recall a replacement may lose against the index it replaces before it needs --replace-index.
RECALL_SLACK = 0.005


def _build_settings(settings):
    return {key: getattr(settings, key) for key in _BUILD_KEYS}


def _index_report(index, action, note=''):
    info = index.info
    return {'action': action, 'type': info.get('type'), 'factory': info.get('factory'),
            'rows': len(index), 'recall_at_10': info.get('recall_at_10'),
            'recall_rows': info.get('recall_rows'), 'breadth': info.get('breadth'),
            'breadth_name': info.get('breadth_name'), 'train_s': info.get('train_s'),
            'add_s': info.get('add_s'), 'note': note}


def _try_incremental(path, meta, gallery, hashes, identity, store, config, digests):
    """Append new items to the saved index when only items were added; else None.

    The saved rows are matched to today's items by digest (image id, platform, content), so
    a reordered manifest still matches. Any saved row whose item left or changed, a change
    of index settings or of the type ``auto`` picks for the new size, or growth past twice
    the rows the index was trained with, means a full build instead.
    """
    if (meta is None or meta.get('format') != 2 or meta.get('identity') != identity
            or meta.get('build') != _build_settings(config.index)):
        return None
    try:
        VectorIndex.check_files(path, meta)
        old = VectorIndex.load(path, len(gallery), {}, settings=config.index, mmap=False,
                               meta=meta)
    except StateError:
        return None
    position = {int(d): i for i, d in enumerate(digests) if hashes[i]}
    old_items = [position.get(int(d), -1) for d in old.row_keys]
    if -1 in old_items or len(set(old_items)) != len(old_items):
        return None
    have = set(old_items)
    new_items = [i for i in range(len(gallery)) if i not in have and hashes[i]]
    keys, matrix = store.lookup({hashes[i] for i in new_items})
    row_of = {key: r for r, key in enumerate(keys)}
    new_items = [i for i in new_items if hashes[i] in row_of]
    total = len(old) + len(new_items)
    built_with = len(old) - old.info.get('added_since_training', 0)
    if resolve_type(config.index, total) != old.kind or (
            old.kind != 'flat' and total > 2 * built_with):
        return None
    old.remap_items(old_items, len(gallery))
    if new_items:
        codes = [PLATFORM_CODES[gallery.items[i].platform] for i in new_items]
        old.add(matrix[[row_of[hashes[i]] for i in new_items]], new_items, codes,
                digests[new_items])
        old.info['added_since_training'] = (old.info.get('added_since_training', 0)
                                            + len(new_items))
    return old, len(new_items)


def _persist_image_index(state, gallery, hashes, identity, store, summary, config,
                         replace_index=False, log=None):
    """Write the FAISS image index for the current gallery unless it is current and intact.

    Returns 'current', 'added' (new items appended to the saved index, no retraining),
    'written' (built afresh), 'repaired' (it was damaged: the damage is added to
    ``summary.repairs``), 'refused' (the new build's recall@10 is lower than the saved
    index's and ``replace_index`` is off: the saved index stays, ``summary.image_index``
    says why) or 'none' (no image has an embedding). ``summary.image_index`` reports the
    index: type, rows, recall@10 and what was done.
    """
    path = image_index_path(state)
    expect = {'identity': identity,
              'fingerprint': image_index_fingerprint(identity, gallery.items, hashes),
              'build': _build_settings(config.index)}
    digests = image_item_keys(identity, gallery.items, hashes)
    damage, meta = None, None
    try:
        meta = VectorIndex.read_meta(path)
        if VectorIndex.check(path, expect):
            current = VectorIndex.load(path, len(gallery), expect, settings=config.index,
                                       mmap=True, meta=meta)
            summary.image_index = _index_report(current, 'current')
            return 'current'
    except StateError as exc:
        damage, meta = exc, None
    grown = _try_incremental(path, meta, gallery, hashes, identity, store, config, digests)
    if grown is not None:
        index, added = grown
        index.save(path, expect)
        summary.image_index = _index_report(
            index, 'added', f'{added} rows added to the saved index without retraining; '
                            f'recall measured when it held {index.info.get("recall_rows")} '
                            'rows')
        return 'added'
    keys, matrix = store.load()
    index = build_image_index(gallery, hashes, keys, matrix, config.index, identity, log)
    if index is None:  # no image could be embedded: leave no stale index behind
        VectorIndex.remove(path)
        return 'none'
    # A rebuild with the same settings and type replaces the saved index as a matter of
    # course; one that changes them must not lose recall without being told to.
    old_recall = (meta or {}).get('recall_at_10') if (meta or {}).get('format') == 2 else None
    new_recall = index.info['recall_at_10']
    changed = (meta or {}).get('build') != expect['build'] or meta.get('type') != index.kind
    if (old_recall is not None and new_recall is not None and changed
            and new_recall < old_recall - RECALL_SLACK
            and not replace_index):
        summary.image_index = _index_report(
            index, 'refused',
            f'kept the saved {meta.get("type")} index (recall@10 {old_recall:.3f}): the new '
            f'{index.kind} index reaches only {new_recall:.3f}; raise index.target_recall or '
            'index.nprobe, set index.type, or pass --replace-index to accept it')
        return 'refused'
    index.save(path, expect)
    summary.image_index = _index_report(index, 'built')
    if damage is None:
        return 'written'
    summary.repairs.append(f'{damage.path} was damaged ({damage.problem}); rebuilt the image '
                           'index from the stored embeddings')
    return 'repaired'
