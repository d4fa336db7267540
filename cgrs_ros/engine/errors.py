"""Errors a user can cause; each message is one sentence naming the input and the fix."""


class CgrsError(Exception):
    """Base class for user-facing errors (bad config, bad gallery, missing model, bad query)."""


class ConfigError(CgrsError):
    """The engine configuration (YAML or parameters) is invalid."""


class GalleryError(CgrsError):
    """The gallery folder or its manifest cannot be used."""


class ModelLoadError(CgrsError):
    """A model or checkpoint could not be loaded."""


class QueryError(CgrsError):
    """A query (goal text, filter, k) is malformed."""
