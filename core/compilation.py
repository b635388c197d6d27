"""Optional ``torch.compile`` of the networks: ``load_model(..., compile=True)``, ``compile_model(model)``,
``fixative generate --compile``.

TorchInductor fuses each network's forward into generated kernels the first time the network sees a new
input shape (or dtype). That first call takes much longer (tens of seconds to minutes on a CPU) and is
reported once per network; later calls with the same shapes reuse the compiled code. The parameters stay
where they are, so the state dict keys, ``.to()``, saving and training are unchanged.

``freeze=True`` (inference with fixed weights: generating after any LoRA is applied) also sets Inductor's
``freezing``: calls without autograd treat the parameters as constants, so the convolution and matmul
weights are packed once into oneDNN's layout instead of at every call. Weights changed after the first
call are then not seen by those calls.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable

from torch import nn

from .errors import FixativeError
from .model import StableDiffusionModel

NETWORKS = ("unet", "vae", "text_encoder")


def _to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def compile_network(
    module: nn.Module, label: str, report: Callable[[str], None] | None = _to_stderr, freeze: bool = False
) -> nn.Module:
    """Replaces ``module.forward`` by its compiled version (in place; ``del module.forward`` undoes it).
    ``report`` gets one line with the seconds of the first call, which includes the compilation; ``freeze``:
    weights as constants in calls without autograd (see the module docstring)."""
    import torch

    if "forward" in vars(module):  # already compiled
        return module
    compiled_forward = torch.compile(module.forward, options={"freezing": True} if freeze else None)
    first_call = True

    def forward(*args, **kwargs):
        nonlocal first_call
        if not first_call:
            return compiled_forward(*args, **kwargs)
        start = time.perf_counter()
        out = compiled_forward(*args, **kwargs)
        first_call = False
        if report is not None:
            report(f"compiled {label} in {time.perf_counter() - start:.1f} s (first call, compiling included)")
        return out

    module.forward = forward
    return module


def compile_model(
    model: StableDiffusionModel,
    networks: Iterable[str] = ("unet",),
    report: Callable[[str], None] | None = _to_stderr,
    freeze: bool = False,
) -> StableDiffusionModel:
    """Compiles ``networks`` of the model in place (default: the UNet, which runs at every sampling or
    training step; "vae" compiles its encoder and decoder, "text_encoder" the text encoder). Returns it.
    ``freeze``: weights as constants in calls without autograd (see the module docstring)."""
    for name in networks:
        if name not in NETWORKS:
            raise FixativeError(f"cannot compile {name!r}; choose from {', '.join(NETWORKS)}")
        if name == "vae":
            compile_network(model.vae.encoder, "vae encoder", report, freeze)
            compile_network(model.vae.decoder, "vae decoder", report, freeze)
        else:
            compile_network(getattr(model, name), name.replace("_", " "), report, freeze)
    return model
