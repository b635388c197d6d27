"""Cloak a batch of same-size pixel tensors: build the method's objective, run the optimiser, store under budget."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch

from fixative.core.errors import FixativeError

from . import objectives, targets
from .bounds import Budget, measure
from .finalize import finalize, quantize
from .objectives import ASPLConfig
from .optimise import OptimiserConfig, optimise
from .robust import RandomTransform
from .targets import StyleTargetConfig


@dataclass
class CloakConfig:
    method: str = "glaze"  # glaze | mist | photoguard | anti-dreambooth
    budget: Budget = field(default_factory=lambda: Budget(lpips=0.07))
    optimiser: OptimiserConfig = field(default_factory=OptimiserConfig)
    target_style: str | None = None  # glaze: a style text, "auto", or None (required then)
    style_target: StyleTargetConfig = field(default_factory=StyleTargetConfig)
    latent_pool: int = 1  # glaze: compare k x k averages of the latents (1: Glaze's own distance)
    target_push: float = 1.0  # glaze: aim this far along the way to the target (> 1: past it)
    semantic_weight: float = 0.0  # glaze: weight of the frozen UNet's denoising loss under the target style's prompt
    # glaze: that prompt, "{style}" and "{caption}" (the image's own caption) replaced; None: style_target.prompt
    semantic_prompt: str | None = None
    robust: tuple[str, ...] = ()  # EOT transforms (robust.TRANSFORMS)
    mist_semantic_weight: float = 1.0
    mist_prompt: str = "a painting"
    aspl: ASPLConfig = field(default_factory=ASPLConfig)
    lpips_net: str = "alex"
    lpips_backbone: str = "pretrained"  # "random": mechanics tests only, written into every record
    lpips_weights: str | None = None
    seed: int = 0

    def settings(self) -> dict:
        """Everything that changes the output, for records and the resume hash."""
        values = asdict(self)
        values["budget"] = self.budget.as_dict()
        values["robust"] = list(self.robust)
        return values


def uses_captions(config: CloakConfig) -> bool:
    """Whether the objective needs each image's caption (glaze's semantic prompt names ``{caption}``)."""
    return config.method == "glaze" and bool(config.semantic_weight) and "{caption}" in (config.semantic_prompt or "")


def semantic_prompts(config: CloakConfig, style: str, captions: list[str] | None, batch: int) -> list[str]:
    """Glaze's semantic prompt per image: the template with the target style and the image's caption put in."""
    template = config.semantic_prompt or config.style_target.prompt
    if "{caption}" in template and (captions is None or len(captions) != batch or None in captions):
        raise FixativeError(
            "--semantic-prompt names {caption}, but an image has no caption: put it in IMAGE.txt beside the image "
            "or in its folder's metadata.jsonl ('file_name' and 'text')"
        )
    try:
        return [template.format(style=style, caption=captions[i] if captions else "") for i in range(batch)]
    except (KeyError, IndexError, ValueError) as error:
        raise FixativeError(
            f"--semantic-prompt {template!r}: only {{style}} and {{caption}} may be named ({error})"
        ) from None


def make_objective(
    model,
    pixels: torch.Tensor,
    config: CloakConfig,
    style: str | None,
    surrogate: objectives.Surrogate | None = None,
    captions: list[str] | None = None,
) -> tuple[objectives.Objective, dict]:
    """The method's objective for pixels (batch, 3, H, W) in [0, 1], and what it aimed at (for the record).
    surrogate: anti-dreambooth's batch-wide surrogate, warmed up (default: a new one for these pixels);
    captions: one per image, for a semantic prompt that names ``{caption}``."""
    method = config.method
    if method == "glaze":
        if not style:
            raise FixativeError("glaze needs a target style: --target-style TEXT or --target-style auto")
        prompts = semantic_prompts(config, style, captions, pixels.shape[0]) if config.semantic_weight else None
        target_pixels = targets.style_target(model, pixels, style, config.style_target, config.seed)
        objective = objectives.glaze(
            model,
            pixels,
            target_pixels,
            style,
            config.latent_pool,
            config.target_push,
            config.semantic_weight,
            prompts,
            config.seed,
        )
        return objective, {"target_style": style}
    if method == "photoguard":
        return objectives.photoguard(model, pixels, targets.fixed_target(pixels)), {"target": "grey image"}
    if method == "mist":
        return (
            objectives.mist(
                model,
                pixels,
                targets.pattern_target(pixels),
                config.mist_prompt,
                config.mist_semantic_weight,
                config.seed,
            ),
            {"target": "stripe pattern"},
        )
    if method == "anti-dreambooth":
        return objectives.anti_dreambooth(model, pixels, config.aspl, config.seed, surrogate), {}
    raise FixativeError(f"unknown method {method!r}; choose from {', '.join(objectives.METHODS)}")


def cloak_pixels(
    model,
    pixels: torch.Tensor,
    config: CloakConfig,
    style: str | None = None,
    lpips_metric=None,
    restore=quantize,
    tied_channels: bool = False,
    progress: bool = False,
    captions: list[str] | None = None,
) -> tuple[torch.Tensor, list[dict]]:
    """Cloak pixels (batch, 3, H, W) in [0, 1] (H, W multiples of the VAE's factor); returns the stored pixels
    (``restore`` applied: 8-bit rounding by default) and one record per image. captions: one per image, for a
    semantic prompt that names ``{caption}``."""
    started = time.time()
    device = model.vae.device
    pixels = pixels.to(device).float()
    torch.manual_seed(config.seed)
    objective, aimed = make_objective(model, pixels, config, style, captions=captions)
    with torch.no_grad():
        distance_before = objective.target_distance(pixels) if objective.target_distance else None
    transform = RandomTransform(config.robust, config.seed) if config.robust else None
    delta, run = optimise(
        pixels, objective, config.budget, config.optimiser, lpips_metric, transform, tied_channels, progress
    )
    if tied_channels:
        delta = delta.expand_as(pixels)
    stored, scale, met = finalize(pixels, delta, config.budget, lpips_metric, restore)
    with torch.no_grad():
        distance_after = objective.target_distance(stored) if objective.target_distance else None
        values = measure(config.budget, stored, pixels, lpips_metric)
    seconds = (time.time() - started) / pixels.shape[0]
    return stored, [
        image_record(
            config,
            {**aimed, **objective.details},
            values,
            i,
            None if distance_before is None else float(distance_before[i]),
            None if distance_after is None else float(distance_after[i]),
            float(scale[i]),
            bool(met[i]),
            run["steps"],
            seconds,
            lpips_metric,
        )
        for i in range(pixels.shape[0])
    ]


def image_record(
    config: CloakConfig,
    aimed: dict,
    values: dict[str, torch.Tensor],
    index: int,
    distance_before: float | None,
    distance_after: float | None,
    scale: float,
    budget_met: bool,
    steps: int,
    seconds: float,
    lpips_metric=None,
) -> dict:
    """The record of image ``index``: method, what it aimed at, budget values as stored, latent distances,
    whether the final projection happened, steps, seconds; a random LPIPS backbone is said out loud."""
    record = {
        "method": config.method,
        **aimed,
        "budget": config.budget.as_dict(),
        "values": {name: float(v[index]) for name, v in values.items()},
        "latent_distance_before": distance_before,
        "latent_distance_after": distance_after,
        "final_projection": scale < 1,
        "projection_scale": scale,
        "budget_met": budget_met,
        "steps": steps,
        "seconds": round(seconds, 3),
    }
    if lpips_metric is not None:
        record["lpips_backbone"] = lpips_metric.backbone
        if lpips_metric.backbone == "random":
            record["lpips_note"] = "random LPIPS backbone: a test of the mechanics only, not LPIPS"
    return record
