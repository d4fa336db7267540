"""The reranker interface and the ``reranker`` config section.

A reranker is the third stage of a query (after the coarse search and the caption channel):
a cross-modal model that sees the query and one candidate image together and returns how
well they match, as a probability in [0, 1]. The stage (``rerankers/stage.py``) scores the top
``k`` candidates, fuses the probability with the score they already had and re-sorts them.
"""

import abc
import logging
from typing import Literal, Optional

from cgrs_ros.engine.sections import SectionSettings
import numpy as np
import pydantic

logger = logging.getLogger(__name__)
BACKENDS = ('none', 'openai', 'transformers', 'itm', 'trained')

# The yes/no question the generative backends (openai, transformers) answer per candidate.
# {platform} is the candidate's platform name, {query} the normalized goal text.
DEFAULT_PROMPT = (
    'This is a {platform} image. Does it show the place described as follows: "{query}"? '
    'Answer Yes or No.')
# The question for image goals (the photo first, the candidate second), for backends that
# compare two images ({query_platform}: the photo's platform, {platform}: the candidate's).
DEFAULT_IMAGE_PROMPT = (
    'The first image is a {query_platform} photo, the second a {platform} image. Do they show '
    'the same place? Answer Yes or No.')


class RerankerSettings(SectionSettings):
    """The ``reranker`` section of the engine configuration (fields of all backends)."""

    model_config = pydantic.ConfigDict(extra='forbid')
    SECTION = 'reranker'

    backend: Literal['none', 'openai', 'transformers', 'itm', 'trained'] = 'none'
    k: int = pydantic.Field(10, ge=1, le=1000,
                            description='Top candidates (after caption fusion) the stage scores.')
    weight: float = pydantic.Field(
        0.5, ge=0.0, le=1.0, description='Share of the reranker probability in the final score; '
                                         'the rest is the min-max normalized score before it.')
    timeout_ms: Optional[float] = pydantic.Field(
        None, gt=0, description='Per-query budget for the stage; candidates not scored in time '
                                'keep their earlier order. null = no budget.')
    model: Optional[str] = pydantic.Field(
        None, description='Model folder or Hugging Face id (transformers, itm), the model name '
                          'the endpoint serves (openai), or a `cgrs train reranker` folder.')
    device: str = pydantic.Field('auto', description="'auto', 'cpu', 'cuda' or 'cuda:N'.")
    dtype: Literal['auto', 'float32', 'float16', 'bfloat16'] = 'auto'
    batch_size: int = pydantic.Field(4, ge=1, le=256, description='Candidates per model call.')
    prompt: str = pydantic.Field(DEFAULT_PROMPT, description='Yes/no question ({platform}, '
                                                             '{query}) for generative backends.')
    image_prompt: str = pydantic.Field(
        DEFAULT_IMAGE_PROMPT, description='Yes/no question for image goals ({query_platform}, '
                                          '{platform}), for backends that compare two images.')
    trust_remote_code: bool = False
    # openai backend (same meaning as in the captioner section)
    base_url: str = 'http://127.0.0.1:8000/v1'
    api_key_env: Optional[str] = 'OPENAI_API_KEY'
    timeout_s: float = pydantic.Field(30.0, gt=0, description='Total seconds per request.')
    max_response_bytes: int = pydantic.Field(262_144, ge=1024)
    max_retries: int = pydantic.Field(2, ge=0, le=20)
    retry_backoff_s: float = pydantic.Field(0.5, ge=0)
    concurrency: int = pydantic.Field(4, ge=1, le=256)
    max_image_side: Optional[int] = pydantic.Field(
        512, ge=16, description='Longer side candidate images are shrunk to before the model '
                                'sees them (openai, transformers).')
    top_logprobs: int = pydantic.Field(10, ge=1, le=20)
    logprob_floor: float = pydantic.Field(
        -20.0, le=0.0, description='Log-probability assumed for Yes or No when the server does '
                                   'not list it among the top_logprobs.')

    @pydantic.field_validator('prompt', 'image_prompt')
    @classmethod
    def _placeholders(cls, value):
        try:
            value.format(platform='satellite', query='q', query_platform='drone')
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f'the prompt may use only {{platform}} and {{query}} ({exc})') \
                from None
        return value


class Reranker(abc.ABC):
    """A model that scores (query, candidate image) pairs jointly.

    Subclasses set ``batch_size`` (how many candidates a caller should pass per ``score``
    call; the stage reports progress and checks its budget between calls) and implement
    ``identity`` and ``score``.
    """

    batch_size = 1
    needs_images = True    # False: the stage does not decode candidate images for it
    uses_priors = False    # True: score() also gets priors={'fused', 'coarse', 'caption'}
    # True: score() takes query_image= (an image goal: compare the photo with each candidate)
    compares_images = False

    @property
    @abc.abstractmethod
    def identity(self):
        """Return a stable string naming backend, model and scoring settings."""

    @abc.abstractmethod
    def score(self, query, images, platforms, captions=None):
        """Return P(match) per candidate as a float array (NaN where one could not be scored).

        ``images`` are PIL images (None where the image could not be read), ``platforms`` their
        platform names, ``captions`` their captions (None where there is none; backends that
        read only pixels ignore them). One bad candidate never fails the others.
        """

    def close(self):
        """Release models, threads and connections (the reranker is unusable afterwards)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    @staticmethod
    def _check_inputs(images, platforms, captions):
        if len(images) != len(platforms) or (captions is not None
                                             and len(captions) != len(images)):
            raise ValueError(f'score() got {len(images)} images, {len(platforms)} platforms '
                             f'and {len(captions) if captions is not None else 0} captions')


class LocalModelReranker(Reranker):
    """A reranker running a local model on (image, text) pairs in batches (itm, transformers).

    Subclasses load ``_model``/``_processor``/``_torch``/``device`` and implement
    ``_score_batch(pairs) -> [P(match)]``; ``_prepare`` turns one candidate into its pair. A
    candidate that cannot be prepared, or whose pair makes the model fail, gets NaN alone: a
    failed batch is retried one candidate at a time.
    """

    def _prepare(self, image, platform, query, photo=None):
        """Return the (RGB image, text) pair the model scores for one candidate.

        ``photo`` is (prepared photo, its platform) for an image goal; only backends with
        ``compares_images`` get one.
        """
        return image.convert('RGB'), query

    def _prepare_photo(self, photo):
        """Return the query photo as the model takes it (called once per ``score``)."""
        return photo.convert('RGB')

    def score(self, query, images, platforms, captions=None, query_image=None,
              query_platform='drone'):
        """Return P(match) per candidate (NaN where its image is missing or unusable).

        ``query_image`` (an image goal) is compared with each candidate by backends that
        compare two images (``compares_images``); the others refuse it.
        """
        self._check_inputs(images, platforms, captions)
        photo = None
        if query_image is not None:
            if not self.compares_images:
                raise ValueError(f'{type(self).__name__} scores text against an image; it '
                                 'cannot compare a photo with the candidates')
            photo = (self._prepare_photo(query_image), query_platform)
        scores = np.full(len(images), np.nan, dtype=np.float64)
        ready = []
        for i, (image, platform) in enumerate(zip(images, platforms)):
            if image is None:
                continue
            try:
                ready.append((i, self._prepare(image, platform, query, photo)))
            except Exception as exc:  # noqa: B902 - any decoding failure is this image's
                logger.warning('reranker: cannot read candidate %d: %s', i, exc)
        for start in range(0, len(ready), self.batch_size):
            group = ready[start:start + self.batch_size]
            for (i, _), value in zip(group, self._score_robust([pair for _, pair in group])):
                scores[i] = value
        return scores

    def _score_robust(self, pairs):
        try:
            return self._score_batch(pairs)
        except Exception as exc:  # noqa: B902 - isolate the failing candidate below
            if len(pairs) == 1:
                logger.warning('reranker: candidate could not be scored: %s: %s',
                               type(exc).__name__, exc)
                return [float('nan')]
            logger.warning('reranker: batch of %d failed (%s); scoring one at a time',
                           len(pairs), exc)
            return [self._score_robust([pair])[0] for pair in pairs]

    def close(self):
        """Drop the model so its memory can be reclaimed."""
        self._model = None
        self._processor = None
        if self.device.startswith('cuda'):
            self._torch.cuda.empty_cache()


def yes_probability(yes_logprob, no_logprob):
    """P(yes) from the log-probabilities of the Yes and No answers, renormalized over the two.

    Pointwise yes/no relevance scoring (as in SkyLink's and GeoRanker's VLM rerankers): the
    softmax over just {Yes, No} removes the mass the model puts on other tokens.
    """
    pair = np.array([yes_logprob, no_logprob], dtype=np.float64)
    pair -= pair.max()
    odds = np.exp(pair)
    return float(odds[0] / odds.sum())
