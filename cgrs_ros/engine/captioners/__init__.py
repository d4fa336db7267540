"""Captioner backends: a VLM writes one detailed caption per gallery image.

``make_captioner(section)`` builds the backend named by the ``captioner`` section of the engine
config: ``transformers`` (a local Hugging Face model), ``openai`` (an OpenAI-compatible
endpoint) or ``learned`` (the caption bank of a model trained by ``cgrs train dual``). The
``manifest`` backend (captions shipped in the manifest) is not a model; the caption store in
``cgrs_ros.engine.captions`` serves it.
"""

from cgrs_ros.engine.captioners.base import (
    BACKENDS, Captioner, CaptionerSettings, CaptionOutcome)
from cgrs_ros.engine.captioners.prompts import (
    CHAT_PROMPTS, PLATFORMS, PREFIX_PROMPTS, PromptSet, SYSTEM_PROMPT)
from cgrs_ros.engine.errors import ConfigError

__all__ = [
    'BACKENDS', 'CHAT_PROMPTS', 'Captioner', 'CaptionerSettings', 'CaptionOutcome', 'PLATFORMS',
    'PREFIX_PROMPTS', 'PromptSet', 'SYSTEM_PROMPT', 'make_captioner',
]


def make_captioner(section):
    """Build the captioner a ``captioner`` config section (dict or pydantic model) names.

    Raises ConfigError for an invalid section or a backend that is not a model, and
    ModelLoadError when a transformers model cannot be found.
    """
    settings = CaptionerSettings.from_section(section)
    if settings.backend == 'transformers':
        from cgrs_ros.engine.captioners.transformers_backend import TransformersCaptioner
        return TransformersCaptioner(settings)
    if settings.backend == 'openai':
        from cgrs_ros.engine.captioners.openai_backend import OpenAICaptioner
        return OpenAICaptioner(settings)
    if settings.backend == 'learned':
        from cgrs_ros.engine.captioners.learned_backend import LearnedCaptioner
        return LearnedCaptioner(settings)
    what = ('it reads the manifest descriptions through the caption store'
            if settings.backend == 'manifest' else 'captions are off')
    raise ConfigError(
        f'captioner.backend {settings.backend!r} runs no model ({what}); choose '
        "'transformers', 'openai' or 'learned' to caption images.")
