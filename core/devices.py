"""Which device "auto" means: the one place that asks torch which accelerators it sees."""

from __future__ import annotations

import torch


def auto_device() -> torch.device:
    """The accelerator torch sees, in the order CUDA, Apple's MPS, Intel's XPU; else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        return torch.device("xpu")
    return torch.device("cpu")
