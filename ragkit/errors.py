"""User-facing errors and warnings: each carries a message the CLI prints without a traceback.

A message that tells the user to change a setting names it as the Python API takes it, `name=value` (such as
`dense_model=/path/to/model`), and lists the name in `settings`; the CLI shows each such mention as its flag
(`--dense-model /path/to/model`)."""

from __future__ import annotations

from typing import Sequence


class RagkitError(Exception):
    """An error caused by the user's input or environment, explained in plain words; `settings`: the settings its
    message names as `name=value`."""

    def __init__(self, message: str = "", settings: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.settings = tuple(settings)


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
    default). The CLI prints it as a warning line on stderr. `settings`: as for RagkitError."""

    def __init__(self, message: str = "", settings: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.settings = tuple(settings)


def warn(message: str, settings: Sequence[str] = ()) -> None:
    """Tell the user `message` as a RagkitWarning (shown once per message by Python's default filter);
    `settings`: the settings it names as `name=value`."""
    import warnings

    warnings.warn(RagkitWarning(message, settings), stacklevel=2)
