"""Cluster runs on Ray: ``cgrs index GALLERY --ray ADDRESS`` and ``cgrs caption ... --ray``.

The heavy part of a country-scale gallery is not the query but embedding and captioning
millions of images. With ``--ray`` the same incremental plan as a local run (what is not in
the stores yet) becomes a Ray Data dataset, one row per image (content hash, path,
platform), streamed through a pool of actors that each hold one image encoder or captioner
(``RayJob.actors`` of them, ``num_gpus`` / ``num_cpus`` each). The driver receives the results
batch by batch and writes them through the very stores a local run writes: the embedding
store commits a segment every ``image_encoder.checkpoint_every`` images, the caption store one
transaction per batch. A killed job therefore resumes where its last commit stopped, and a
finished one leaves the same stores as a local run.

Workers read the images at the driver's paths, so the gallery must be on storage every node
sees at the same path (NFS, a bucket mounted alike), and the cluster's Python environment
must have this package and its model dependencies installed (the model weights too, or a
model name the nodes can load). On GPU nodes set the section's ``device: cuda`` and give the
actors ``--ray-gpus 1``.
"""

import dataclasses

from cgrs_ros.engine.errors import ConfigError
from cgrs_ros.engine.gallery import decode_image
import numpy as np


@dataclasses.dataclass(frozen=True)
class RayJob:
    """Where and how wide a cluster run goes."""

    address: str
    actors: int = 1
    num_gpus: float = 0.0
    num_cpus: float = 1.0

    def __post_init__(self):
        """Refuse sizes that cannot start an actor."""
        if self.actors < 1:
            raise ConfigError(f'--ray-actors {self.actors} must be at least 1')
        if self.num_gpus < 0 or self.num_cpus < 0:
            raise ConfigError('--ray-gpus and --ray-cpus must not be negative')

    def describe(self):
        """Return the job in words (for summaries)."""
        return (f'ray {self.address}: {self.actors} actor(s), {self.num_cpus:g} CPU and '
                f'{self.num_gpus:g} GPU each')


def connect(job):
    """Return the ``ray`` module connected to the cluster at ``job.address``."""
    try:
        import ray
    except ImportError:
        raise ConfigError('--ray needs the ray package; install it with `pip install -r '
                          'requirements/cluster.txt`') from None
    if not ray.is_initialized():
        try:
            ray.init(address=job.address, log_to_driver=False, logging_level='ERROR')
        except (ConnectionError, ValueError, RuntimeError) as exc:
            raise ConfigError(f'cannot reach a Ray cluster at {job.address} ({exc}); start one '
                              'with `ray start --head` and pass the address it prints') from None
    return ray


def decode_failure(exc):
    """Return the reason an image is skipped when it cannot be decoded (local and Ray alike)."""
    return f'cannot decode image ({type(exc).__name__}: {exc})'


def _actor_section(section, job):
    """Return a config section for an actor: torch threads bounded by its CPU share."""
    data = section.model_dump()
    if 'threads' in data and not data['threads']:
        data['threads'] = max(1, int(job.num_cpus))
    return data


class ImageEmbedActor:
    """A Ray actor holding one image encoder; embeds batches of (key, path, platform) rows."""

    def __init__(self, section):
        """Load the encoder once per actor."""
        from cgrs_ros.engine.config import ImageEncoderConfig
        from cgrs_ros.engine.encoders import load_image_encoder
        self.encoder = load_image_encoder(ImageEncoderConfig.model_validate(section))

    def __call__(self, batch):
        """Return keys, vectors (zero rows where decoding failed) and decode errors."""
        keys, paths, platforms = batch['key'], batch['path'], batch['platform']
        images, good, errors = [], [], [''] * len(keys)
        for i, path in enumerate(paths):
            try:
                images.append(decode_image(str(path)))
                good.append(i)
            except Exception as exc:  # any decoder error: this image is skipped, as locally
                errors[i] = decode_failure(exc)
        vectors = np.zeros((len(keys), self.encoder.dim), dtype=np.float32)
        if images:
            vectors[good] = self.encoder.encode_images(
                images, platforms=[str(platforms[i]) for i in good])
        return {'key': keys, 'vector': vectors, 'error': np.array(errors, dtype=object)}


def embed_images(job, section, todo, path_of_hash, platform_of_hash):
    """Embed images on the cluster; yield ``(keys, vectors, {key: decode error})`` batches.

    Batches come in the order the actors finish them; the caller stores each one.
    """
    ray = connect(job)
    rows = [{'key': key, 'path': str(path_of_hash[key]), 'platform': platform_of_hash[key]}
            for key in todo]
    dataset = ray.data.from_items(rows).map_batches(
        ImageEmbedActor, fn_constructor_kwargs={'section': _actor_section(section, job)},
        batch_size=section.batch_size, batch_format='numpy', concurrency=job.actors,
        num_cpus=job.num_cpus, num_gpus=job.num_gpus)
    for batch in dataset.iter_batches(batch_size=None, batch_format='numpy'):
        errors = np.asarray(batch['error'], dtype=object)
        ok = errors == ''
        keys = [str(key) for key in batch['key']]
        yield ([key for key, good in zip(keys, ok) if good],
               np.asarray(batch['vector'], dtype=np.float32)[ok],
               {key: str(error) for key, error, good in zip(keys, errors, ok) if not good})


class CaptionActor:
    """A Ray actor holding one captioner; captions batches of (content, path, platform)."""

    def __init__(self, section, identity, version):
        """Load the captioner once per actor."""
        from cgrs_ros.engine.captioners import make_captioner
        self.captioner = make_captioner(section)
        self.identity, self.version = identity, version

    def __call__(self, batch):
        """Return one row per image: status, caption text, error, whether it did not decode."""
        from cgrs_ros.engine.captioning import caption_rows
        rows = list(zip((str(c) for c in batch['content']), (str(p) for p in batch['path']),
                        (str(p) for p in batch['platform'])))
        outcome = caption_rows(self.captioner, self.identity, self.version, rows)
        by_content = {record.content_hash: record for record in outcome.records}
        records = [by_content[content] for content, _, _ in rows]
        return {'content': np.array([r.content_hash for r in records], dtype=object),
                'status': np.array([r.status for r in records], dtype=object),
                'text': np.array([r.text or '' for r in records], dtype=object),
                'error': np.array([r.error or '' for r in records], dtype=object),
                'undecodable': np.array([r.content_hash in outcome.bad for r in records])}


def caption_batches(job, section, identity, version, rows, batch_size):
    """Caption ``rows`` (content hash, path, platform) on the cluster; yield BatchOutcomes."""
    from cgrs_ros.engine.captioning import BatchOutcome
    from cgrs_ros.engine.captions import CaptionRecord
    ray = connect(job)
    items = [{'content': c, 'path': str(p), 'platform': pf} for c, p, pf in rows]
    dataset = ray.data.from_items(items).map_batches(
        CaptionActor, fn_constructor_kwargs={'section': _actor_section(section, job),
                                             'identity': identity, 'version': version},
        batch_size=batch_size, batch_format='numpy', concurrency=job.actors,
        num_cpus=job.num_cpus, num_gpus=job.num_gpus)
    for batch in dataset.iter_batches(batch_size=None, batch_format='numpy'):
        records, texts, bad = [], [], {}
        for content, status, text, error, undecodable in zip(
                batch['content'], batch['status'], batch['text'], batch['error'],
                batch['undecodable']):
            content, status, text, error = str(content), str(status), str(text), str(error)
            if status == 'ok':
                records.append(CaptionRecord(content, identity, version, 'ok', text=text))
                texts.append(text)
            else:
                records.append(CaptionRecord(content, identity, version, 'failed',
                                             error=error))
                if undecodable:
                    bad[content] = error
        ready = len(records) - len(bad)
        yield BatchOutcome(len(records), records, texts, bad, ready - len(texts), ready)
