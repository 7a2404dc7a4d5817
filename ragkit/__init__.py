"""ragkit: local-first retrieval-augmented search and question answering over long documents.

>>> import ragkit
>>> ragkit.__version__
'0.1.0'
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["Index", "Settings", "load_settings", "RagkitError"]

_LAZY = {
    "Index": "ragkit.api",
    "Settings": "ragkit.config",
    "load_settings": "ragkit.config",
    "RagkitError": "ragkit.errors",
}


def __getattr__(name: str) -> Any:
    """Import the public names on first use, so `import ragkit` stays instant."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ragkit' has no attribute {name!r}")
