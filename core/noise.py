"""Random numbers drawn as diffusers draws them, so that the same seed gives the same image in both tools."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .errors import FixativeError


def randn_tensor(
    shape: Sequence[int],
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Standard normal noise drawn as diffusers' ``randn_tensor`` draws it: a CPU generator draws on the
    CPU and the tensor then moves to ``device``; a list of generators draws one batch row from each."""
    device = torch.device(device or "cpu")
    generators = list(generator) if isinstance(generator, (list, tuple)) else [generator]
    draw_device = "cpu" if generators[0] is not None and generators[0].device.type == "cpu" else device
    if len(generators) == 1:
        return torch.randn(tuple(shape), generator=generators[0], device=draw_device, dtype=dtype).to(device)
    if len(generators) != shape[0]:
        raise FixativeError(f"{len(generators)} generators for a batch of {shape[0]}; pass one per image")
    rows = [torch.randn((1, *shape[1:]), generator=g, device=draw_device, dtype=dtype) for g in generators]
    return torch.cat(rows).to(device)
