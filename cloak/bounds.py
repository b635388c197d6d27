"""A perceptual budget, the bounds a cloak must keep: several distances at once, their soft penalties and hard
projections.

``Budget(linf=16/255, psnr=32)`` means L-inf <= 16/255 *and* PSNR >= 32 dB. L-inf and PSNR are enforced exactly
by projection during optimisation (a box and an L2 ball); SSIM and LPIPS by the Glaze penalty
α · max(D(x + δ, x) − p, 0) (Shan et al. 2023, Sec. 5.2). The guarantee on the 8-bit output is the final
bisection of ``finalize.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from fixative.core.errors import FixativeError

from . import budget as metrics

LINF_TOLERANCE = 1e-6  # float error of 16/255 and the like


@dataclass(frozen=True)
class Budget:
    linf: float | None = None  # largest pixel change, [0, 1] units (16/255 = 16 levels of 8 bits)
    psnr: float | None = None  # lowest PSNR, dB
    ssim: float | None = None  # lowest SSIM
    lpips: float | None = None  # highest LPIPS

    def __post_init__(self):
        if all(getattr(self, f.name) is None for f in fields(self)):
            raise FixativeError("a budget needs at least one bound, e.g. --budget psnr=32 or --budget linf=16/255")

    def as_dict(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def describe(self) -> str:
        signs = {"linf": "<=", "psnr": ">=", "ssim": ">=", "lpips": "<="}
        shown = {"linf": lambda v: f"{v * 255:g}/255", "psnr": lambda v: f"{v:g} dB"}
        return " and ".join(
            f"{name} {signs[name]} {shown.get(name, lambda v: f'{v:g}')(value)}"
            for name, value in self.as_dict().items()
        )


def parse_budget(items: list[str]) -> Budget:
    """["psnr=32", "linf=16/255"] -> Budget; a bad item is a one-line FixativeError."""
    values = {}
    for item in items:
        name, sep, text = item.partition("=")
        name = name.strip().lower()
        if not sep or name not in {f.name for f in fields(Budget)}:
            raise FixativeError(f"budget {item!r}: write METRIC=VALUE with METRIC one of linf, psnr, ssim, lpips")
        try:
            numerator, _, denominator = text.partition("/")
            value = float(numerator) / (float(denominator) if denominator else 1.0)
        except ValueError:
            raise FixativeError(f"budget {item!r}: {text!r} is not a number (16/255 and 0.0627 both work)") from None
        if value <= 0 or (name in ("linf", "ssim") and value > 1):
            raise FixativeError(f"budget {item!r} is out of range")
        values[name] = value
    return Budget(**values)


def measure(
    budget: Budget, pixels: torch.Tensor, reference: torch.Tensor, lpips_metric=None, every: bool = True
) -> dict[str, torch.Tensor]:
    """Per-image values (batch,) of the budget's metrics, or (``every``) of SSIM, PSNR, L-inf and LPIPS when
    there is a metric for it and the images are large enough for it; pixels in [0, 1]."""
    values = {}
    if every or budget.linf is not None:
        values["linf"] = metrics.linf(pixels, reference)
    if every or budget.psnr is not None:
        values["psnr"] = metrics.psnr(pixels, reference)
    if every or budget.ssim is not None:
        values["ssim"] = metrics.ssim(pixels, reference)
    if budget.lpips is not None or (every and lpips_metric is not None and lpips_metric.fits(pixels)):
        if lpips_metric is None:
            raise FixativeError("an LPIPS budget needs the LPIPS metric (see fixative.cloak.budget.load_lpips)")
        values["lpips"] = lpips_metric(pixels, reference)
    return values


def satisfied(budget: Budget, values: dict[str, torch.Tensor]) -> torch.Tensor:
    """(batch,) bool: every bound holds."""
    ok = torch.ones_like(next(iter(values.values())), dtype=torch.bool)
    if budget.linf is not None:
        ok &= values["linf"] <= budget.linf + LINF_TOLERANCE
    if budget.psnr is not None:
        ok &= values["psnr"] >= budget.psnr
    if budget.ssim is not None:
        ok &= values["ssim"] >= budget.ssim
    if budget.lpips is not None:
        ok &= values["lpips"] <= budget.lpips
    return ok


def penalty(budget: Budget, pixels: torch.Tensor, reference: torch.Tensor, lpips_metric=None) -> torch.Tensor:
    """Σ max(D − p, 0) over the soft bounds (SSIM as 1 − SSIM, LPIPS), (batch,); zero when there are none."""
    total = torch.zeros(pixels.shape[0], device=pixels.device, dtype=pixels.dtype)
    if budget.ssim is not None:
        total = total + (budget.ssim - metrics.ssim(pixels, reference)).clamp(min=0)
    if budget.lpips is not None:
        total = total + (lpips_metric(pixels, reference) - budget.lpips).clamp(min=0)
    return total


@torch.no_grad()
def project(budget: Budget, delta: torch.Tensor, pixels: torch.Tensor) -> None:
    """In place: δ into the L-inf box, the PSNR ball ||δ||² <= N · 10^(−PSNR/10), and x + δ into [0, 1]."""
    if budget.linf is not None:
        delta.clamp_(-budget.linf, budget.linf)
    delta.copy_((pixels + delta).clamp(0, 1) - pixels)
    if budget.psnr is not None:
        # every channel counts in the mean squared error, a tied δ (B, 1, H, W) once per channel
        per_image = delta[0].numel() * pixels.shape[1] // delta.shape[1]
        radius = (per_image * 10 ** (-budget.psnr / 10)) ** 0.5
        norms = delta.flatten(1).norm(dim=1) * (pixels.shape[1] / delta.shape[1]) ** 0.5
        delta.mul_((radius / norms.clamp(min=1e-12)).clamp(max=1.0).view(-1, 1, 1, 1))
