"""Backend config sections (captioner, reranker) validated with one-sentence errors.

The engine config hands a backend's section over as a plain mapping; the backend's pydantic
settings class validates it and, when a key is wrong, raises one ConfigError naming the
section, the key, the value and the fix, as the engine config does for its own sections.
"""

from typing import ClassVar

from cgrs_ros.engine.errors import ConfigError
import pydantic

UNKNOWN_KEY = 'unknown key; check its spelling against config/engine.yaml'


class SectionSettings(pydantic.BaseModel):
    """Base of a backend section's settings; subclasses set ``SECTION`` (its name)."""

    SECTION: ClassVar[str] = ''

    @classmethod
    def from_section(cls, section):
        """Build settings from a dict or pydantic model; ConfigError naming the key if bad."""
        if isinstance(section, cls):
            return section
        if section is None:
            section = {}
        elif isinstance(section, pydantic.BaseModel):
            section = section.model_dump()
        elif not isinstance(section, dict):
            raise ConfigError(f'the {cls.SECTION} section must be a mapping, not '
                              f'{type(section).__name__}.')
        try:
            return cls.model_validate(section)
        except pydantic.ValidationError as exc:
            first = exc.errors()[0]
            where = '.'.join(str(p) for p in first['loc']) or cls.SECTION
            message = first['msg'].removeprefix('Value error, ')
            if first['type'] == 'extra_forbidden':
                message = UNKNOWN_KEY
            raise ConfigError(
                f'{cls.SECTION}.{where}: {message} (got {first.get("input")!r}); fix it in the '
                f'{cls.SECTION} section of the config.') from None
