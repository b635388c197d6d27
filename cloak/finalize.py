"""The budget guarantee: measure the output as it will be stored (8-bit rounding, or the file format's own), and
where a bound fails, scale δ down by bisection until every bound holds on the stored pixels."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .bounds import Budget, measure, satisfied

BISECTION_STEPS = 14  # scale resolution 2^-14: finer than one 8-bit level on any δ


def quantize(pixels: torch.Tensor, levels: int = 255) -> torch.Tensor:
    """Round [0, 1] pixels to ``levels`` + 1 values (8-bit: 255)."""
    return (pixels.clamp(0, 1) * levels).round() / levels


@torch.no_grad()
def finalize(
    pixels: torch.Tensor,
    delta: torch.Tensor,
    budget: Budget,
    lpips_metric=None,
    restore: Callable[[torch.Tensor], torch.Tensor] = quantize,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stored pixels of x + s δ with the largest s in [0, 1] (s = 1 when it already holds) such that every bound
    holds between the stored output and the input.

    pixels: the input as read (batch, 3, H, W) in [0, 1]; restore: [0, 1] pixels -> what the output file will hold.
    Returns (stored pixels, scale per image (batch,), bounds met (batch,) bool). scale < 1 means the final
    projection happened; a bound can fail even at s = 0 only when storing alone breaks it (JPEG output, a palette).
    """
    reference = pixels
    scale = torch.ones(pixels.shape[0], device=pixels.device)

    def stored(s: torch.Tensor) -> torch.Tensor:
        return restore(pixels + s.view(-1, 1, 1, 1) * delta)

    out = stored(scale)
    ok = satisfied(budget, measure(budget, out, reference, lpips_metric, every=False))
    if ok.all():
        return out, scale, ok
    low = torch.zeros_like(scale)  # s = 0 stores the input itself
    high = torch.where(ok, scale, torch.ones_like(scale))
    for _ in range(BISECTION_STEPS):
        middle = torch.where(ok, scale, (low + high) / 2)
        middle_ok = satisfied(budget, measure(budget, stored(middle), reference, lpips_metric, every=False))
        low = torch.where(~ok & middle_ok, middle, low)
        high = torch.where(~ok & ~middle_ok, middle, high)
    scale = torch.where(ok, scale, low)
    out = stored(scale)
    return out, scale, satisfied(budget, measure(budget, out, reference, lpips_metric, every=False))
