"""What every result records about how it was made: versions, device, dtype and a content hash of each model used.

``provenance(models={"model": "toy"}, device="cpu", dtype="float32")`` returns a JSON-ready dict; results
(PNG metadata, ``build.json``, reports) store it whole. A model's hash is the sha256 of each of its weight files;
hashes are cached by (path, size, modification time) in ``$FIXATIVE_HOME/sha256.json``, so a 4 GB checkpoint is
read once, and again only when it changes.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import tempfile
from collections.abc import Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from .home import fixative_home
from .registry import named_model_folder

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth")
LIBRARIES = ("fixative", "torch", "diffusers", "transformers")

_memory: dict[str, dict] = {}  # this process's view of the cache file


def _version(package: str) -> str:
    """The running module's own version where it is loaded (torch's carries its build, e.g. +cu130)."""
    module = sys.modules.get(package)
    if isinstance(getattr(module, "__version__", None), str):
        return module.__version__
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def weight_files(source: str | Path) -> list[Path]:
    """The weight files of a model: a single file, every weight file under a folder, or a registered name's."""
    path = named_model_folder(str(source)) or Path(source).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    return []


def _cache_file() -> Path:
    return fixative_home() / "sha256.json"


def _load_cache() -> dict[str, dict]:
    if not _memory:
        try:
            _memory.update(json.loads(_cache_file().read_text(encoding="utf-8")))
        except (OSError, ValueError):
            pass
    return _memory


def _save_cache(cache: dict[str, dict]) -> None:
    """Written atomically; a cache that cannot be written only costs re-hashing next time."""
    try:
        target = _cache_file()
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=".sha256.", suffix=".tmp", dir=target.parent)
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            json.dump(cache, file, indent=1, sort_keys=True)
        os.replace(temporary, target)
    except OSError:
        pass


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's bytes, read in blocks (no cache: for many small files, such as images)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256(path: str | Path) -> str:
    """The sha256 of a file, from the cache while its size and modification time are unchanged (for weights)."""
    path = Path(path).resolve()
    stat = path.stat()
    cache = _load_cache()
    entry = cache.get(str(path))
    if entry and entry.get("size") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns:
        return entry["sha256"]
    digest = file_sha256(path)
    cache[str(path)] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}
    _save_cache(cache)
    return digest


def model_record(source: str | Path) -> dict:
    """{"source": ..., "sha256": {file relative to the model: hash}} for one model."""
    files = weight_files(source)
    root = files[0].parent if len(files) == 1 else (named_model_folder(str(source)) or Path(source).expanduser())
    return {"source": str(source), "sha256": {str(p.relative_to(root)): sha256(p) for p in files}}


def provenance(models: Mapping[str, str | Path] | None = None, device=None, dtype=None) -> dict:
    """Versions of fixative, torch, diffusers and transformers, Python and the platform, the device and dtype the
    work ran in, and per model (by role, e.g. {"model": "toy"}) its source and weight-file hashes."""
    return {
        "versions": {name: _version(name) for name in LIBRARIES} | {"python": platform.python_version()},
        "platform": platform.platform(),
        "device": None if device is None else str(device),
        "dtype": None if dtype is None else str(dtype).removeprefix("torch."),
        "models": {role: model_record(source) for role, source in (models or {}).items()},
    }
