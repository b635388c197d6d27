"""Where fixative keeps what it makes and caches between runs: ``$FIXATIVE_HOME``, default ``~/.cache/fixative``."""

from __future__ import annotations

import os
from pathlib import Path


def fixative_home() -> Path:
    """``$FIXATIVE_HOME``, default ``~/.cache/fixative``."""
    return Path(os.environ.get("FIXATIVE_HOME") or Path.home() / ".cache" / "fixative")
