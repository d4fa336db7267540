"""Reranker backends: the cross-modal third stage (SkyLink / GeoRanker style).

``make_reranker(section)`` builds the backend named by the ``reranker`` config section:
``openai`` (an OpenAI-compatible chat server scored by the logprobs of Yes/No), ``transformers``
(a local VLM scored by the same yes/no logits), ``itm`` (BLIP / BLIP-2 image-text matching
heads) or ``trained`` (a cross-encoder trained by ``cgrs train reranker``). ``none`` (the
default) runs no stage. ``rerankers/stage.py`` runs the stage inside a query.
"""

from cgrs_ros.engine.errors import ConfigError
from cgrs_ros.engine.rerankers.base import (BACKENDS, DEFAULT_PROMPT, Reranker,
                                            RerankerSettings, yes_probability)

__all__ = ['BACKENDS', 'DEFAULT_PROMPT', 'Reranker', 'RerankerSettings', 'make_reranker',
           'yes_probability']


def make_reranker(section):
    """Build the reranker a ``reranker`` config section names (None for ``backend: none``).

    Raises ConfigError for an invalid section and ModelLoadError when a model cannot be found.
    """
    settings = RerankerSettings.from_section(section)
    if settings.backend == 'none':
        return None
    if settings.backend == 'openai':
        from cgrs_ros.engine.rerankers.openai_backend import OpenAIReranker
        return OpenAIReranker(settings)
    if settings.backend == 'transformers':
        from cgrs_ros.engine.rerankers.transformers_backend import TransformersReranker
        return TransformersReranker(settings)
    if settings.backend == 'itm':
        from cgrs_ros.engine.rerankers.itm_backend import ITMReranker
        return ITMReranker(settings)
    if settings.backend == 'trained':
        from cgrs_ros.engine.rerankers.trained_backend import TrainedReranker
        return TrainedReranker(settings)
    raise ConfigError(f'reranker.backend {settings.backend!r} is unknown; use one of '
                      f'{", ".join(BACKENDS)}')
