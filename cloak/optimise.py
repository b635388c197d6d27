"""The one projected optimiser every protection runs on: Adam or signed PGD with momentum over δ.

    δ ← argmin_δ  objective(T(x + δ)) + α · Σ max(D(x + δ, x) − p, 0)   s.t. ||δ||_∞ <= ε, PSNR(x + δ, x) >= q,
                                                                        x + δ ∈ [0, 1]
with T a random robustness transform (expectation over transformations, Athalye et al. 2018) or the identity.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from fixative.core.errors import FixativeError
from fixative.core.training import cosine_decay

from .bounds import Budget, penalty, project
from .objectives import Objective

OPTIMISERS = ("adam", "pgd")
SCHEDULES = ("constant", "cosine", "linear")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class OptimiserConfig:
    steps: int = 100
    lr: float = 0.01  # Adam's learning rate, or the signed step of PGD, in [0, 1] pixel units
    optimiser: str = "adam"  # "adam" or "pgd" (signed steps with momentum, MI-FGSM, Dong et al. 2018, eq. 6-7)
    momentum: float = 0.9  # PGD's μ
    schedule: str = "constant"  # the step size over the run: "constant", or "cosine" / "linear" decay to 0 at `steps`
    alpha: float = 30.0  # weight of the soft budget penalty (Glaze's α)
    plateau_steps: int = 0  # stop when the loss has not improved by plateau_tol for this many steps (0: never)
    plateau_tol: float = 1e-4  # relative improvement that counts
    stop_loss: float | None = None  # stop once the mean objective is at or below this value
    autocast: str | None = None  # "bf16" / "fp16": the objective's forward under torch.autocast (None: as stored)


def schedule_factor(schedule: str, step: int, steps: int) -> float:
    """The step size of update `step` (0-based) of `steps` as a fraction of the configured one.

    cosine: core's ``cosine_decay`` to 0, (1 + cos(π t / T)) / 2; linear: 1 − t / T.
    """
    if schedule == "cosine":
        return cosine_decay(step / steps)
    if schedule == "linear":
        return 1 - step / steps
    return 1.0


def optimise(
    pixels: torch.Tensor,
    objective: Objective,
    budget: Budget,
    config: OptimiserConfig,
    lpips_metric=None,
    transform: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
    tied_channels: bool = False,
    progress: bool = False,
) -> tuple[torch.Tensor, dict]:
    """δ for pixels (batch, 3, H, W) in [0, 1]; returns (δ, {"steps": steps run, "loss": final mean loss}).

    tied_channels: one δ for all three channels (grayscale images stay grey).
    transform(pixels, step): a differentiable random transform applied before the objective (EOT).
    """
    if config.autocast is not None and config.autocast not in AUTOCAST_DTYPES:
        raise FixativeError(f"autocast must be one of {tuple(AUTOCAST_DTYPES)} or none, not {config.autocast!r}")
    if config.optimiser not in OPTIMISERS:
        raise FixativeError(f"optimiser must be one of {OPTIMISERS}, not {config.optimiser!r}")
    if config.schedule not in SCHEDULES:
        raise FixativeError(f"schedule must be one of {SCHEDULES}, not {config.schedule!r}")
    pixels = pixels.detach().float()
    shape = (pixels.shape[0], 1 if tied_channels else pixels.shape[1], *pixels.shape[2:])
    delta = torch.zeros(shape, device=pixels.device)
    reference = pixels[:, :1] if tied_channels else pixels  # grey images: the three channels are equal
    project(budget, delta, reference)
    delta.requires_grad_(True)
    adam = torch.optim.Adam([delta], lr=config.lr) if config.optimiser == "adam" else None
    momentum = torch.zeros_like(delta)
    best, since_best, steps_run, loss_value = math.inf, 0, 0, math.nan
    precision = (
        torch.autocast(pixels.device.type, AUTOCAST_DTYPES[config.autocast])
        if config.autocast
        else contextlib.nullcontext()
    )
    for step in tqdm(range(config.steps), desc="cloak steps", leave=False, disable=not progress):
        lr = config.lr * schedule_factor(config.schedule, step, config.steps)
        adv_pixels = (pixels + delta).clamp(0, 1)
        seen = transform(adv_pixels, step) if transform is not None else adv_pixels
        with precision:
            loss = objective.loss(seen, step).float()
        if budget.ssim is not None or budget.lpips is not None:
            soft = penalty(budget, adv_pixels, pixels, lpips_metric)
            if (soft > 0).any():  # under every bound its gradient is zero: autograd need not go through the metric
                loss = loss + config.alpha * soft
        (grad,) = torch.autograd.grad(loss.sum(), delta)
        with torch.no_grad():
            if adam is not None:
                delta.grad = grad
                adam.param_groups[0]["lr"] = lr
                adam.step()
            else:
                grad = grad / grad.abs().flatten(1).mean(1).clamp(min=1e-12).view(-1, 1, 1, 1)
                momentum.mul_(config.momentum).add_(grad)
                delta.sub_(lr * momentum.sign())
            project(budget, delta, reference)
        objective.after_step((pixels + delta.detach()).clamp(0, 1), step)
        steps_run, loss_value = step + 1, loss.mean().item()
        if config.stop_loss is not None and loss_value <= config.stop_loss:
            break
        if config.plateau_steps:
            if math.isinf(best) or loss_value < best - config.plateau_tol * abs(best):
                best, since_best = loss_value, 0
            else:
                since_best += 1
                if since_best >= config.plateau_steps:
                    break
    return delta.detach(), {"steps": steps_run, "loss": loss_value}
