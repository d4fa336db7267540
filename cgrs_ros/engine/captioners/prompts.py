"""Prompt templates per gallery platform, and the version string that keys cached captions.

A nadir satellite tile, an oblique drone view and a street photo show the same place very
differently, so each platform gets its own prompt. What the prompts ask for is what operators
say when they describe a goal: roof colours and shapes, roads, water, vegetation, distinctive
landmarks and how things are laid out relative to each other.

Two prompt styles exist because two kinds of model exist:
- ``chat``: instruction-following VLMs (SmolVLM, Qwen2.5-VL, LLaVA, and every OpenAI-compatible
  server) get a system prompt plus a per-platform instruction;
- ``prefix``: plain captioning models (BLIP, BLIP-2, GIT) cannot follow instructions; they
  continue a short text prefix instead (an empty prefix means unconditional captioning).
"""

import hashlib
import json

from cgrs_ros.engine.errors import ConfigError
from cgrs_ros.engine.gallery import PLATFORMS

__all__ = ['PLATFORMS', 'PromptSet', 'SYSTEM_PROMPT', 'CHAT_PROMPTS', 'PREFIX_PROMPTS']

STYLES = ('chat', 'prefix')

SYSTEM_PROMPT = (
    'You describe images for a system that finds places from spoken descriptions. Describe only '
    'what is visible, concretely and compactly. Do not guess place names or addresses.'
)

CHAT_PROMPTS = {
    'satellite': (
        'This is a satellite image tile seen from straight above. Describe the roofs (colours '
        'and shapes), the roads and how they run (straight, curved, crossings, roundabouts), '
        'water, trees, fields and open spaces, and any distinctive landmark such as a stadium, '
        'plaza, tower, bridge or car park. Say how these are laid out relative to each other. '
        'Answer in two to four sentences.'
    ),
    'drone': (
        'This is an oblique aerial photo taken from a drone. Describe the main building: its '
        'roof colour and shape, height, facade and materials. Then describe the roads, water, '
        'trees and open spaces around it and any distinctive landmark, and how they are laid '
        'out relative to the main building. Answer in two to four sentences.'
    ),
    'ground': (
        'This is a photo taken at street level. Describe the buildings (colour, height, roof '
        'shape, facade materials, style), the street, any trees or water, signs and '
        'distinctive landmarks, and how they are arranged in the view. Answer in two to four '
        'sentences.'
    ),
}

PREFIX_PROMPTS = {
    'satellite': 'a satellite image of',
    'drone': 'an aerial photo of',
    'ground': 'a street photo of',
}

# Captioning models whose checkpoints expect one fixed task prompt rather than free text.
MODEL_TYPE_PROMPTS = {
    'florence2': '<MORE_DETAILED_CAPTION>',
    'paligemma': 'caption en',
}


def validate_prompt_overrides(prompts):
    """Check that per-platform prompt overrides name known platforms; return them as a dict."""
    prompts = dict(prompts or {})
    unknown = sorted(set(prompts) - set(PLATFORMS))
    if unknown:
        raise ConfigError(
            f'captioner.prompts has unknown platform(s) {", ".join(unknown)}; use '
            f'{", ".join(PLATFORMS)}.')
    for platform, text in prompts.items():
        if not isinstance(text, str):
            raise ConfigError(f'captioner.prompts.{platform} must be a string.')
    return prompts


class PromptSet:
    """The prompts one captioner uses: a style, a system prompt and one text per platform."""

    def __init__(self, style, overrides=None, system=None, model_type=None, version=None):
        """Resolve the prompt per platform: explicit override, model default, style default."""
        if style not in STYLES:
            raise ConfigError(
                f'prompt style {style!r} is unknown; use one of {", ".join(STYLES)}.')
        overrides = validate_prompt_overrides(overrides)
        self.style = style
        self.system = SYSTEM_PROMPT if system is None else system
        if style == 'chat':
            defaults = dict(CHAT_PROMPTS)
        elif model_type in MODEL_TYPE_PROMPTS:
            defaults = {p: MODEL_TYPE_PROMPTS[model_type] for p in PLATFORMS}
        else:
            defaults = dict(PREFIX_PROMPTS)
        self.texts = {p: overrides.get(p, defaults[p]) for p in PLATFORMS}
        if style == 'chat':
            empty = [p for p, text in self.texts.items() if not text.strip()]
            if empty:
                raise ConfigError(
                    f'captioner.prompts.{empty[0]} is empty, but an instruction-following model '
                    'needs an instruction; remove the override to use the default prompt.')
        self._version = version

    def text(self, platform):
        """Return the prompt text for one platform (ValueError for an unknown platform)."""
        try:
            return self.texts[platform]
        except KeyError:
            raise ValueError(
                f'unknown platform {platform!r}; expected one of {", ".join(PLATFORMS)}') from None

    @property
    def version(self):
        """Return the configured prompt version, or a hash of the prompts actually in use."""
        if self._version:
            return self._version
        # Hash everything that reaches the model, so any prompt edit recaptions.
        blob = json.dumps({'style': self.style, 'system': self.system if self.style == 'chat'
                           else None, 'texts': self.texts}, sort_keys=True)
        return 'sha256:' + hashlib.sha256(blob.encode('utf-8')).hexdigest()[:16]
