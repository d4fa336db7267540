"""Captioning runs: a VLM captions every gallery image it has not captioned yet.

``run_captioning`` is what ``cgrs caption`` and the captioning node both run:

1. load the gallery and the content hash of every image (the indexer's hash cache);
2. pending = images without a row for (content hash, captioner identity, prompt version) in the
   caption store, plus earlier failures of the captioner itself (an endpoint that was down, a
   model error: they are retried on the next run). Images whose file cannot be decoded are not
   retried until the file changes. ``force`` recaptions everything;
3. pending images are sorted by platform, so a batch shares one prompt (prefix captioners such
   as BLIP batch only rows with the same prompt), and captioned batch by batch;
4. each batch is committed to SQLite in one transaction (``CaptionStore.put_many``), so a run
   killed with ``kill -9`` loses at most the batch in flight and the next run resumes there;
5. the text embeddings of new captions are stored through the indexer's caption-embedding
   path, so queries (and a running retrieval node's refresh) use them with no extra step.

The captioner model is loaded only when something is pending: a run over an unchanged gallery
loads no model. A progress callback sees done / total / failed / rate / ETA after every batch,
and a stop event is checked between batches.
"""

import contextlib
import dataclasses
import fcntl
from pathlib import Path
import time

from cgrs_ros.engine.captions import (caption_source_for, caption_store_path, CaptionRecord,
                                      CaptionStore, MANIFEST_CAPTIONER, NO_CAPTIONER)
from cgrs_ros.engine.errors import CgrsError, ConfigError, GalleryError, ModelLoadError
from cgrs_ros.engine.gallery import decode_image, find_manifest, load_gallery, PLATFORMS
from cgrs_ros.engine.storage import default_state_dir, FileHashCache

# Give up on a run when the captioner failed every image of this many batches in a row: the
# model or endpoint is broken, and going on would only record the whole gallery as failed.
ABORT_AFTER_FAILED_BATCHES = 5
DECODE_ERROR = 'cannot decode image'


@dataclasses.dataclass(frozen=True)
class CaptionFailure:
    """A gallery image without a caption, and why."""

    image_id: str
    path: str
    line: int
    reason: str

    def __str__(self):
        return f'line {self.line} (image_id {self.image_id!r}, {self.path}): {self.reason}'


@dataclasses.dataclass(frozen=True)
class CaptionProgress:
    """Where a run stands: ``done`` of ``total`` images this run, ``failed`` of them failed.

    ``rate`` is images per second since the captioner was ready (0 before the first batch),
    ``eta_s`` the seconds left at that rate (None while unknown), ``captioned`` the gallery
    images that have a caption from this captioner now (earlier runs included) out of
    ``gallery_size``, ``new_captions`` the captions written by this run so far.
    """

    done: int
    total: int
    failed: int
    rate: float
    eta_s: float
    elapsed_s: float
    captioned: int
    gallery_size: int
    new_captions: int

    def to_dict(self):
        """Return the progress as plain data."""
        return dataclasses.asdict(self)


@dataclasses.dataclass
class CaptionSummary:
    """The state of a gallery's captions for one captioner, and what the last run did.

    Gallery counts (``total = captioned + failed + pending``) are in gallery images; run counts
    (``attempted``, ``new_captions``, ``new_failures``) in distinct images (identical files are
    captioned once).
    """

    captioner: str
    prompt_version: str
    total: int = 0
    captioned: int = 0
    failed: int = 0
    pending: int = 0
    attempted: int = 0
    new_captions: int = 0
    new_failures: int = 0
    failures: list = dataclasses.field(default_factory=list)
    skipped: list = dataclasses.field(default_factory=list)
    stopped: bool = False
    aborted: str = None
    models_loaded: list = dataclasses.field(default_factory=list)
    captions_embedded: int = 0
    text_encoder: str = None
    embedding_error: str = None
    state_dir: str = ''
    elapsed_s: float = 0.0
    rate: float = 0.0

    def to_dict(self):
        """Return the summary as plain data (``cgrs caption --json``)."""
        out = dataclasses.asdict(self)
        out['failures'] = [dataclasses.asdict(f) for f in self.failures]
        out['skipped'] = [str(problem) for problem in self.skipped]
        return out

    def status_dict(self):
        """Return the gallery counts only (``cgrs caption --status --json``)."""
        keys = ('total', 'captioned', 'failed', 'pending', 'captioner', 'prompt_version',
                'state_dir')
        out = {key: getattr(self, key) for key in keys}
        out['failures'] = [dataclasses.asdict(f) for f in self.failures]
        out['skipped'] = [str(problem) for problem in self.skipped]
        return out


def _check_backend(section):
    if section.backend in (MANIFEST_CAPTIONER, NO_CAPTIONER):
        what = ('captions come from the manifest descriptions and `cgrs index` stores them'
                if section.backend == MANIFEST_CAPTIONER else 'the caption channel is off')
        raise ConfigError(
            f'captioner.backend is {section.backend}: {what}; to caption images with a VLM set '
            'captioner.backend to transformers or openai in the engine config (see '
            'config/engine.yaml)')


def describe_captioner(section):
    """Return (identity, prompt version) of the captioner a config section names.

    No model weights are loaded: the openai backend is built (it sends nothing until asked to
    caption); for transformers only the model's config and processor are read when the prompt
    version is a hash of the prompts in use (which depend on whether the model has a chat
    template). Used by ``cgrs caption --status`` and to find pending images before deciding
    whether to load the model at all.
    """
    from cgrs_ros.engine.captioners import CaptionerSettings, make_captioner
    _check_backend(section)
    settings = CaptionerSettings.from_section(section)
    if settings.backend == 'openai':
        with make_captioner(settings) as captioner:
            return captioner.identity, captioner.prompt_version
    if settings.backend == 'learned':
        from cgrs_ros.engine.captioners.learned_backend import read_caption_bank
        return read_caption_bank(settings.model)[2:]
    if not settings.model:
        raise ConfigError('captioner.model is empty; set it to a Hugging Face model id or a '
                          'local model directory.')
    # Same identity as TransformersCaptioner.identity (test_captioning checks they agree).
    identity = (f'transformers:{settings.model}:greedy:max_new_tokens='
                f'{settings.max_new_tokens}')
    if settings.prompt_version:
        return identity, settings.prompt_version
    return identity, _transformers_prompt_version(settings)


def _transformers_prompt_version(settings):
    """Return the hashed prompt version a transformers model would use (config + processor)."""
    from cgrs_ros.engine.captioners import PromptSet
    from cgrs_ros.engine.torch_compat import ensure_torchvision
    ensure_torchvision()
    import transformers

    kwargs = {'trust_remote_code': settings.trust_remote_code}
    try:
        model_type = transformers.AutoConfig.from_pretrained(settings.model, **kwargs).model_type
        processor = transformers.AutoProcessor.from_pretrained(settings.model, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f'cannot read the captioning model {settings.model!r} ({str(exc).splitlines()[0]}); '
            'set captioner.model to a local model directory (or a cached Hugging Face id)'
        ) from None
    style = settings.prompt_style
    if style == 'auto':
        style = 'chat' if getattr(processor, 'chat_template', None) else 'prefix'
    return PromptSet(style, settings.prompts, settings.system_prompt, model_type).version


@dataclasses.dataclass
class _Plan:
    """The gallery, its hashes and the store rows of one captioner (see :func:`_plan`)."""

    gallery: object
    state: Path
    hashes: list
    rows: dict            # content hash -> 'ok' | 'failed'
    errors: dict          # content hash -> failure reason
    undecodable: dict     # content hash -> decode error (not retried)


def _plan(gallery_dir, state_dir, identity, version):
    gallery = load_gallery(gallery_dir, check_images='exists')
    if not gallery.items:
        first = f' (first: {gallery.problems[0]})' if gallery.problems else ''
        raise GalleryError(f'no usable row in {gallery.manifest}{first}; fix the manifest')
    state = Path(default_state_dir(gallery_dir) if state_dir is None else state_dir)
    state.mkdir(parents=True, exist_ok=True)
    hash_cache = FileHashCache(state)
    try:
        by_path, _ = hash_cache.update([(item.path, gallery.path_of(item))
                                        for item in gallery.items])
        undecodable = hash_cache.undecodable()
    finally:
        hash_cache.close()
    with CaptionStore(caption_store_path(state)) as store:
        rows = store.done(identity, version)
        errors = store.failures(identity, version)
    return _Plan(gallery, state, [by_path[item.path] for item in gallery.items], rows, errors,
                 undecodable)


def _count(summary, plan):
    """Fill the gallery counts and the failure list of ``summary`` from ``plan``."""
    summary.total = len(plan.gallery.items)
    summary.captioned = summary.failed = summary.pending = 0
    summary.failures = []
    for item, content in zip(plan.gallery.items, plan.hashes):
        status = plan.rows.get(content)
        if status == 'ok':
            summary.captioned += 1
        elif status == 'failed':
            summary.failed += 1
            summary.failures.append(CaptionFailure(item.image_id, item.path, item.line,
                                                   plan.errors.get(content) or 'unknown'))
        else:
            summary.pending += 1


def caption_status(gallery_dir, config, state_dir=None):
    """Return a :class:`CaptionSummary` of the gallery's captions; captions nothing.

    Loads no model weights (see :func:`describe_captioner`); files not hashed before are read
    once to hash them.
    """
    identity, version = describe_captioner(config.captioner)
    plan = _plan(gallery_dir, state_dir, identity, version)
    summary = CaptionSummary(identity, version, skipped=list(plan.gallery.problems),
                             state_dir=str(plan.state))
    _count(summary, plan)
    return summary


def _todo(plan, force, limit):
    """Distinct pending (content hash, item) pairs: manifest order, limited, then by platform."""
    todo, seen = [], set()
    for item, content in zip(plan.gallery.items, plan.hashes):
        if content in seen:
            continue
        seen.add(content)
        status = plan.rows.get(content)
        if force or status is None or (status == 'failed' and content not in plan.undecodable):
            todo.append((content, item))
    if limit is not None:
        todo = todo[:max(0, limit)]
    order = {platform: i for i, platform in enumerate(PLATFORMS)}
    # Stable sort: within a platform, manifest order is kept.
    return sorted(todo, key=lambda pair: order[pair[1].platform])


@contextlib.contextmanager
def _exclusive_run(state):
    """Hold the state folder's captioning lock, or raise GalleryError when another run has it.

    Two runs over one gallery (``cgrs caption`` while the captioning node works) would caption
    the same images twice. flock is released by the kernel when a process dies, so a run
    killed with ``kill -9`` leaves no stale lock (stdlib has no such lock, hence fcntl here).
    """
    handle = open(state / 'captioning.lock', 'a+b')
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise GalleryError(
            f'another captioning run (cgrs caption or captioning_node) is working on {state}; '
            'wait until it finishes, or stop it, then run again') from None
    try:
        yield
    finally:
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
        handle.close()


class _CaptionEmbedder:
    """Stores text embeddings of captions through the indexer's caption-embedding path.

    A failure to load the text encoder does not lose captions (they are committed already;
    the retriever embeds missing ones itself): it is reported once and embedding stops.
    """

    def __init__(self, state, config, summary):
        self.state, self.config, self.summary = state, config, summary

    def __call__(self, texts):
        if self.summary.embedding_error or not texts:
            return
        from cgrs_ros.engine.encoders import text_encoder_identity
        from cgrs_ros.engine.indexer import embed_caption_texts
        try:
            self.summary.text_encoder = text_encoder_identity(self.config.text_encoder)
            keys, loaded = embed_caption_texts(self.state, self.config.text_encoder, texts)
        except (CgrsError, OSError, RuntimeError) as exc:
            self.summary.embedding_error = (
                f'caption text embeddings not stored ({exc}); queries embed them on first use')
            return
        if keys:
            self.summary.captions_embedded += len(keys)
            if loaded and loaded not in self.summary.models_loaded:
                self.summary.models_loaded.append(loaded)


def run_captioning(gallery_dir, config, state_dir=None, *, limit=None, force=False,
                   batch_size=None, progress=None, stop=None, load_captioner=None, ray=None):
    """Caption what is pending in a gallery; return a :class:`CaptionSummary`.

    ``progress(CaptionProgress)`` is called when the run starts and after every committed
    batch. ``stop`` (a ``threading.Event``) is checked between batches. ``batch_size`` overrides
    ``captioner.batch_size``. ``load_captioner()`` returns the captioner to use (the caller
    keeps and closes it; the captioning node reuses one across runs); by default one is built
    from ``config.captioner`` when something is pending and closed at the end. ``ray`` (a
    ``cluster.RayJob``) captions on a Ray cluster instead, through the same commits.

    Raises ConfigError / GalleryError / ModelLoadError for unusable inputs.
    """
    start = time.perf_counter()
    identity, version = describe_captioner(config.captioner)
    find_manifest(gallery_dir)  # a mistyped gallery path fails before any folder is created
    state = Path(default_state_dir(gallery_dir) if state_dir is None else state_dir)
    state.mkdir(parents=True, exist_ok=True)
    with _exclusive_run(state):
        summary = _run_locked(gallery_dir, config, state, identity, version, limit, force,
                              batch_size, progress, stop, load_captioner, ray)
    summary.elapsed_s = time.perf_counter() - start
    return summary


def _run_locked(gallery_dir, config, state_dir, identity, version, limit, force, batch_size,
                progress, stop, load_captioner, ray):
    """Run the body of :func:`run_captioning` (the caller holds the state folder's lock)."""
    plan = _plan(gallery_dir, state_dir, identity, version)
    summary = CaptionSummary(identity, version, skipped=list(plan.gallery.problems),
                             state_dir=str(plan.state))
    todo = _todo(plan, force, limit)
    embed = _CaptionEmbedder(plan.state, config, summary)
    if todo and ray is not None:
        from cgrs_ros.engine.cluster import caption_batches
        summary.models_loaded.append(f'{identity} ({ray.describe()})')
        rows = [(content, plan.gallery.path_of(item), item.platform) for content, item in todo]
        outcomes = caption_batches(ray, config.captioner, identity, version, rows,
                                   batch_size or config.captioner.model_dump().get(
                                       'batch_size') or 8)
        _caption_batches(outcomes, plan, todo, summary, embed, progress, stop)
    elif todo:
        owned = load_captioner is None
        if owned:
            from cgrs_ros.engine.captioners import make_captioner
            captioner = make_captioner(config.captioner)
        else:
            captioner = load_captioner()
        try:
            summary.models_loaded.append(captioner.identity)
            if (captioner.identity, captioner.prompt_version) != (identity, version):
                # The loaded model says otherwise (cannot happen unless describe_captioner
                # and the backend disagree): trust the model that writes the captions.
                summary.captioner, summary.prompt_version = identity, version = (
                    captioner.identity, captioner.prompt_version)
                plan = _plan(gallery_dir, state_dir, identity, version)
                todo = _todo(plan, force, limit)
            outcomes = _local_batches(captioner, plan, todo, summary,
                                      batch_size or captioner.batch_size)
            _caption_batches(outcomes, plan, todo, summary, embed, progress, stop)
        finally:
            if owned:
                captioner.close()
    # Fill any gap left by an earlier run killed between committing captions and storing
    # their embeddings (cheap when nothing is missing: no model is loaded).
    with CaptionStore(caption_store_path(plan.state)) as store:
        ok, _ = store.ok_captions(caption_source_for(config.captioner))
        plan.rows = store.done(identity, version)
        plan.errors = store.failures(identity, version)
    live = set(plan.hashes)
    embed(sorted({text for content, (text, _) in ok.items() if content in live}))
    _count(summary, plan)
    return summary


@dataclasses.dataclass
class BatchOutcome:
    """What captioning one batch produced, before it is committed.

    ``records`` one CaptionRecord per image; ``texts`` the new captions; ``bad`` {content hash:
    reason} of images that did not decode; ``model_failures`` images the model failed on;
    ``ready`` images that decoded (the model saw them).
    """

    size: int
    records: list
    texts: list
    bad: dict
    model_failures: int
    ready: int


def caption_rows(captioner, identity, version, rows):
    """Caption one batch of ``(content hash, image path, platform)``; return a BatchOutcome.

    Runs where the captioner is: in this process, or in a Ray actor (cluster.py).
    """
    records, texts, bad = [], [], {}
    images, ready = [], []
    for content, path, platform in rows:
        try:
            images.append(decode_image(path))
            ready.append((content, platform))
        except Exception as exc:  # any decoder error: this image fails, the run goes on
            bad[content] = f'{DECODE_ERROR} ({type(exc).__name__}: {exc})'
            records.append(CaptionRecord(content, identity, version, 'failed',
                                         error=bad[content]))
    outcomes = []
    if images:
        try:
            outcomes = captioner.caption(images, [platform for _, platform in ready])
        except Exception as exc:  # a model/endpoint error fails this batch only
            reason = f'captioner error ({type(exc).__name__}: {exc})'
            outcomes = [None] * len(images)
            for content, _ in ready:
                records.append(CaptionRecord(content, identity, version, 'failed',
                                             error=reason))
    model_failures = 0
    for (content, _), outcome in zip(ready, outcomes):
        if outcome is None:
            model_failures += 1
        elif outcome.ok:
            records.append(CaptionRecord(content, identity, version, 'ok',
                                         text=outcome.caption))
            texts.append(outcome.caption)
        else:
            model_failures += 1
            records.append(CaptionRecord(content, identity, version, 'failed',
                                         error=outcome.error or 'no caption'))
    return BatchOutcome(len(rows), records, texts, bad, model_failures, len(ready))


def _local_batches(captioner, plan, todo, summary, size):
    """Caption ``todo`` here, batch by batch (a generator: the caller stops pulling to stop)."""
    for first in range(0, len(todo), size):
        rows = [(content, plan.gallery.path_of(item), item.platform)
                for content, item in todo[first:first + size]]
        yield caption_rows(captioner, summary.captioner, summary.prompt_version, rows)


def _caption_batches(outcomes, plan, todo, summary, embed, progress, stop):
    """Commit the batches ``outcomes`` yields, one transaction each, and count them."""
    summary.attempted = len(todo)
    already = sum(1 for content in plan.hashes if plan.rows.get(content) == 'ok')
    items_of = {}
    for content in plan.hashes:
        items_of[content] = items_of.get(content, 0) + 1
    began = time.perf_counter()
    done = failed_in_a_row = 0

    def report():
        if progress is None:
            return
        elapsed = time.perf_counter() - began
        rate = done / elapsed if done and elapsed > 0 else 0.0
        eta = (len(todo) - done) / rate if rate else None
        progress(CaptionProgress(done, len(todo), summary.new_failures, rate, eta, elapsed,
                                 already, len(plan.hashes), summary.new_captions))

    report()
    hash_cache = FileHashCache(plan.state)
    store = CaptionStore(caption_store_path(plan.state))
    try:
        while True:
            if stop is not None and stop.is_set() and done < len(todo):
                summary.stopped = True
                break
            batch = next(outcomes, None)
            if batch is None:
                break
            records = batch.records
            store.put_many(records)  # one transaction: the batch is in, or not at all
            if batch.bad:
                hash_cache.mark_undecodable(batch.bad)
            embed(batch.texts)
            done += batch.size
            summary.new_captions += len(batch.texts)
            summary.new_failures += batch.size - len(batch.texts)
            already += sum(items_of[r.content_hash] for r in records if r.status == 'ok'
                           and plan.rows.get(r.content_hash) != 'ok')
            for rec in records:
                plan.rows[rec.content_hash] = rec.status
            report()
            failed_in_a_row = failed_in_a_row + 1 if batch.ready and \
                batch.model_failures == batch.ready else 0
            if failed_in_a_row >= ABORT_AFTER_FAILED_BATCHES:
                last = next(r.error for r in reversed(records) if r.status == 'failed')
                summary.aborted = (
                    f'the captioner failed every image of {failed_in_a_row} batches in a row '
                    f'(last: {last}); check the model or endpoint, then run again (failed '
                    'images are retried)')
                break
    finally:
        store.close()
        hash_cache.close()
    elapsed = time.perf_counter() - began
    summary.rate = done / elapsed if elapsed > 0 else 0.0
