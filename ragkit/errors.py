"""User-facing errors: each carries a message the CLI prints as is, without a traceback."""


class RagkitError(Exception):
    """An error caused by the user's input or environment, explained in plain words."""


class ModelLoadError(RagkitError):
    """A model named by id or path could not be loaded."""


class IndexLockedError(RagkitError):
    """Another process is writing to the index."""


class IndexNotFoundError(RagkitError):
    """No index exists at the given folder."""


class ConfigError(RagkitError):
    """A setting has an invalid value."""
