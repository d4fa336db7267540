"""The captioner interface, its per-image outcome, and the ``captioner`` config section."""

import abc
import dataclasses
from typing import Literal, Optional

from cgrs_ros.engine.captioners.prompts import validate_prompt_overrides
from cgrs_ros.engine.errors import ConfigError
from cgrs_ros.engine.sections import SectionSettings
import pydantic

BACKENDS = ('transformers', 'openai', 'learned', 'manifest')


@dataclasses.dataclass(frozen=True)
class CaptionOutcome:
    """The result for one image: a caption, or the reason there is none.

    Captioners return one outcome per input image so that one bad image (undecodable, refused
    by an endpoint) never costs the rest of its batch.
    """

    caption: Optional[str] = None
    error: Optional[str] = None

    @property
    def ok(self):
        """Return True when a caption was produced."""
        return self.caption is not None


class CaptionerSettings(SectionSettings):
    """The ``captioner`` section of the engine configuration (fields of all backends)."""

    model_config = pydantic.ConfigDict(extra='forbid')
    SECTION = 'captioner'

    backend: Literal['transformers', 'openai', 'learned', 'manifest', 'none'] = 'manifest'
    model: Optional[str] = pydantic.Field(
        None, description='Hugging Face model id or local directory (transformers), or the '
                          'model name the endpoint serves (openai).')
    device: str = pydantic.Field('auto', description="'auto', 'cpu', 'cuda' or 'cuda:N'.")
    dtype: Literal['auto', 'float32', 'float16', 'bfloat16'] = pydantic.Field(
        'auto', description="'auto' is float32 on CPU and bfloat16 (or float16) on a GPU.")
    batch_size: int = pydantic.Field(8, ge=1, description='Images per captioning call.')
    max_new_tokens: int = pydantic.Field(96, ge=1, le=4096)
    prompts: dict[str, str] = pydantic.Field(
        default_factory=dict, description='Per-platform prompt overrides (satellite, drone, '
                                          'ground): an instruction, or a text prefix for plain '
                                          'captioning models.')
    system_prompt: Optional[str] = None
    prompt_style: Literal['auto', 'chat', 'prefix'] = pydantic.Field(
        'auto', description="'auto' uses chat prompts when the model has a chat template.")
    prompt_version: Optional[str] = pydantic.Field(
        None, description='Version label of the prompts; default: a hash of the prompts in use.')
    trust_remote_code: bool = False
    # openai backend
    base_url: str = 'http://127.0.0.1:8000/v1'
    api_key_env: Optional[str] = 'OPENAI_API_KEY'
    timeout_s: float = pydantic.Field(
        60.0, gt=0, description='Total seconds per request: connecting, waiting and reading.')
    max_response_bytes: int = pydantic.Field(
        1_048_576, ge=1024, description='Largest answer read from the endpoint (openai).')
    max_caption_chars: int = pydantic.Field(
        2000, ge=16, description='Longer captions are cut at a word boundary.')
    max_retries: int = pydantic.Field(3, ge=0, le=20)
    retry_backoff_s: float = pydantic.Field(1.0, ge=0, description='First retry delay; doubles.')
    concurrency: int = pydantic.Field(4, ge=1, le=256)
    max_image_side: Optional[int] = pydantic.Field(
        1024, ge=16, description='Longer side images are shrunk to before upload (openai).')

    @pydantic.field_validator('prompts')
    @classmethod
    def _known_platforms(cls, value):
        try:
            return validate_prompt_overrides(value)
        except ConfigError as exc:
            raise ValueError(str(exc).removeprefix('captioner.prompts has ')) from None


class Captioner(abc.ABC):
    """A vision-language model that writes one caption per gallery image.

    Subclasses set ``batch_size`` (how many images a caller should pass per ``caption`` call)
    and implement ``identity``, ``prompt_version`` and ``caption``.
    """

    batch_size = 1

    @property
    @abc.abstractmethod
    def identity(self):
        """Return a stable string naming backend, model and generation settings.

        Part of the caption cache key: a different identity means different captions.
        """

    @property
    @abc.abstractmethod
    def prompt_version(self):
        """Return the version (or hash) of the prompts in use; a change recaptions."""

    @abc.abstractmethod
    def caption(self, images, platforms):
        """Caption PIL images, one platform name per image; return one CaptionOutcome each."""

    def close(self):
        """Release models, threads and connections (the captioner is unusable afterwards)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    @staticmethod
    def _check_inputs(images, platforms):
        if len(images) != len(platforms):
            raise ValueError(
                f'caption() got {len(images)} images but {len(platforms)} platforms')
