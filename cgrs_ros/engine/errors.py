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


class StateError(GalleryError):
    """A state file the engine reads (index, embeddings, captions, file hashes) is damaged.

    A GalleryError, so every handler of gallery problems (CLI exit 2, node error reason) also
    catches it. The message is one sentence naming the file and ``cgrs index GALLERY``, which
    repairs it; the component that finds the damage rarely knows the gallery folder, so
    :meth:`for_gallery` fills it in where it is known (``Retriever.open``).
    """

    def __init__(self, path, problem, gallery=None, state_dir=None):
        self.path = str(path)
        self.problem = problem
        self.gallery = None if gallery is None else str(gallery)
        self.state_dir = None if state_dir is None else str(state_dir)
        super().__init__(self.path, problem, self.gallery, self.state_dir)

    def fix(self):
        """Return the command that repairs the damage."""
        command = f'cgrs index {self.gallery or "GALLERY"}'
        if self.state_dir:
            command += f' --state {self.state_dir}'
        return command

    def __str__(self):
        return (f'state file {self.path} is damaged ({self.problem}); run `{self.fix()}` to '
                'repair it')

    def for_gallery(self, gallery, state_dir=None):
        """Return this error with the gallery (and a non-default state folder) in its fix."""
        return StateError(self.path, self.problem, gallery, state_dir)
