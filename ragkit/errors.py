"""User-facing errors and warnings: each carries a message the CLI prints as is, without a traceback."""


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


class RagkitWarning(UserWarning):
    """Something the user should know that does not stop the work (e.g. an embedded model serving instead of the
    default). The CLI prints it as a warning line on stderr."""


def warn(message: str) -> None:
    """Tell the user `message` as a RagkitWarning (shown once per message by Python's default filter)."""
    import warnings

    warnings.warn(message, RagkitWarning, stacklevel=2)
