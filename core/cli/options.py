"""Options that mean the same in every sub-command (``--model``, ``--config``, ``--device``, ``--dtype``, ``--seed``,
``--quiet``), for every package's commands to add the same way. Nothing here imports torch at registration."""

from __future__ import annotations

import argparse

# command-line precision names -> torch dtype names
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
MODEL_HELP = "a diffusers model folder, a single-file .safetensors/.ckpt, or a model name such as 'toy'"
CONFIG_HELP = (
    "architecture of a single-file checkpoint where its tensor shapes do not tell it (GroupNorm groups, "
    "head counts): a diffusers model folder, one of its sub-model folders or config.json, or an original "
    "LDM inference .yaml (default: inferred from the shapes, with the released SD settings)"
)


class RegistryChoices:
    """argparse ``choices`` read from a registry when first needed (checking a value, printing help), so that
    registering a command imports nothing heavy: ``RegistryChoices(lambda: SCHEDULERS)``. Give the option a
    ``metavar``: argparse otherwise lists the choices while adding it."""

    def __init__(self, load):
        self._load = load

    def __iter__(self):
        return iter(self._load())

    def __contains__(self, item) -> bool:
        return item in self._load()


def add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, metavar="PATH", help=CONFIG_HELP)


def add_device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device", default="auto", help="cpu, cuda, cuda:N, mps, or auto: cuda > mps > cpu (default: %(default)s)"
    )


def add_dtype(parser: argparse.ArgumentParser, default: str | None = "fp32", help: str = "compute precision") -> None:
    parser.add_argument("--dtype", choices=tuple(DTYPES), default=default, help=f"{help} (default: %(default)s)")


def add_seed(parser: argparse.ArgumentParser, help: str = "random seed") -> None:
    parser.add_argument("--seed", type=int, default=0, help=f"{help} (default: %(default)s)")


def add_quiet(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quiet", action="store_true", help="no progress bars (default: show them)")


def check_training_device(name: str, what: str) -> None:
    """Training commands run under accelerate, which gives each process its device: ``--device`` is auto or cpu."""
    from ..errors import FixativeError

    if name not in ("auto", "cpu"):
        raise FixativeError(
            f"--device {name}: {what} takes auto (accelerate gives each process its device; use `accelerate "
            "launch` for GPUs) or cpu"
        )


def resolve_device(name: str):
    """The torch device ``--device`` names; "auto" picks cuda, then mps, then xpu, then the CPU."""
    import torch

    from fixative.core.devices import auto_device

    return auto_device() if name == "auto" else torch.device(name)


def torch_dtype(name: str):
    """The torch dtype of a ``--dtype`` name (fp32, fp16, bf16)."""
    import torch

    return getattr(torch, DTYPES[name])
