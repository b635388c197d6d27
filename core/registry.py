"""Named models: names such as ``"toy"`` that ``load_model`` resolves to a diffusers model folder.

A package above core names its models without core importing it: either through the entry-point group
``fixative.models`` in pyproject.toml (``toy = "fixative.core.toy:model_folder"``: a function returning the
folder), read when a name is first looked up, or in-process with ``register_model``.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path

ENTRY_POINT_GROUP = "fixative.models"

_FOLDERS: dict[str, Callable[[], Path]] = {}


def register_model(name: str, folder: Callable[[], str | Path]) -> None:
    """Make ``load_model(name)`` load the diffusers folder ``folder()`` returns (called at load time)."""
    _FOLDERS[name] = folder


def _entry_point(name: str) -> Callable[[], str | Path] | None:
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        if entry.name == name:
            return entry.load()
    return None


def model_names() -> list[str]:
    """Every name ``load_model`` knows."""
    return sorted({*_FOLDERS, *(entry.name for entry in entry_points(group=ENTRY_POINT_GROUP))})


def named_model_folder(name: str) -> Path | None:
    """The folder of the model called ``name``, or None when no model has that name."""
    folder = _FOLDERS.get(name) or _entry_point(name)
    return None if folder is None else Path(folder())
