"""Captions from a model trained here: the nearest training description in a learned space.

A `cgrs train dual` model folder carries a caption bank (``caption_bank.json``: descriptions
of the training galleries, deduplicated and sampled with the training seed). Captioning an
image embeds it with the model's image tower (its platform's expert) and returns the bank text
its text tower places nearest: a retrieval captioner, trained by the same contrastive run as
the coarse stage, so the whole CGRS pipeline (coarse, captions written from pixels, rerank)
runs on a gallery without descriptions and without a VLM. Its captions describe a place like
the one in the image, seen in another town; they are only as good as the learned space.
"""

import hashlib
import json
from pathlib import Path

from cgrs_ros.engine.captioners.base import Captioner, CaptionOutcome
from cgrs_ros.engine.errors import ConfigError, ModelLoadError
import numpy as np

CAPTION_BANK = 'caption_bank.json'


def read_caption_bank(model):
    """Return (folder, bank texts, identity, prompt version) of a model folder; loads no model.

    The identity is the model's (path and weights fingerprint); the version is a hash of the
    bank, so another bank recaptions.
    """
    from cgrs_ros.engine.encoders import learned_identity

    if not model:
        raise ConfigError('captioner.model is empty; set it to a `cgrs train dual` model '
                          'folder (the one image_encoder.model names)')
    folder = Path(model).expanduser().resolve()
    identity = learned_identity(folder)
    bank_path = folder / CAPTION_BANK
    try:
        bank = json.loads(bank_path.read_text(encoding='utf-8'))['texts']
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(
            f'{bank_path} cannot be read ({exc}); retrain the model with this version of '
            '`cgrs train dual`, which writes the caption bank') from None
    if not bank or not all(isinstance(t, str) for t in bank):
        raise ModelLoadError(f'{bank_path} holds no list of texts; retrain the model')
    digest = hashlib.sha256('\n'.join(bank).encode('utf-8')).hexdigest()[:12]
    return folder, bank, identity, f'bank-{digest}'


class LearnedCaptioner(Captioner):
    """Nearest caption-bank text of each image in a learned dual encoder's space."""

    batch_size = 32

    def __init__(self, settings):
        """Load the model folder and embed its caption bank (seconds for a few thousand)."""
        from cgrs_ros.engine.encoders import load_image_encoder
        from cgrs_ros.engine.config import ImageEncoderConfig

        folder, self._bank, self._identity, self._version = read_caption_bank(settings.model)
        self._encoder = load_image_encoder(ImageEncoderConfig(backend='learned',
                                                              model=str(folder)))
        # (platforms, bank, dim): each platform's expert projection of every bank text.
        self._bank_vectors = self._encoder.encode_texts_per_platform(self._bank)

    @property
    def identity(self):
        """Return the model's identity: its folder and weights fingerprint."""
        return self._identity

    @property
    def prompt_version(self):
        """Return a hash of the caption bank: a different bank recaptions."""
        return self._version

    def caption(self, images, platforms):
        """Return, per image, the bank text nearest to it in its platform expert's space."""
        from cgrs_ros.engine.gallery import PLATFORMS

        self._check_inputs(images, platforms)
        vectors = self._encoder.encode_images(list(images), platforms=list(platforms))
        out = []
        for vector, platform in zip(vectors, platforms):
            scores = self._bank_vectors[PLATFORMS.index(platform)] @ vector
            out.append(CaptionOutcome(caption=self._bank[int(np.argmax(scores))]))
        return out
