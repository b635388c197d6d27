"""The toy world: a miniature Stable Diffusion stack (CLIP, VAE, UNet) trained by fixative itself on the
procedurally painted Toy Atelier. ``--model toy`` resolves to :func:`model_folder` (the entry point
``fixative.models: toy`` names it in core's model registry).

Where the toy world comes from, in order: a full build the user made with ``fixative toy build``
(``$FIXATIVE_HOME/toy/full-seed0``), else the weights shipped in the package (``core/toy/weights``).
Each holds ``sd/`` (a diffusers Stable Diffusion folder) and ``clip/`` (a transformers CLIPModel folder).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import FixativeError
from ..home import fixative_home

SHIPPED = Path(__file__).parent / "weights"


def build_folder(size: str = "full", seed: int = 0, home: str | Path | None = None) -> Path:
    """Where ``fixative toy build`` puts a finished build (``sd/``, ``clip/``, ``atelier/``, ``build.json``)."""
    return Path(home or fixative_home()) / "toy" / f"{size}-seed{seed}"


def toy_folder() -> Path:
    """The folder holding the toy world's ``sd/`` and ``clip/``."""
    built = build_folder()
    if (built / "build.json").is_file():
        return built
    if (SHIPPED / "sd" / "model_index.json").is_file():
        return SHIPPED
    raise FixativeError(
        "the toy world's weights are missing (not shipped in this checkout, not built); "
        "run `fixative toy build` (about 36 minutes on 2 CPU cores)"
    )


def model_folder() -> Path:
    """The toy Stable Diffusion: a diffusers folder (load it with ``load_model("toy")``)."""
    return toy_folder() / "sd"


def clip_folder() -> Path:
    """The toy CLIP: a folder ``transformers.CLIPModel.from_pretrained`` loads (weights stored in fp16)."""
    return toy_folder() / "clip"
