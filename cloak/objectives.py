"""The protections, one objective each, all minimised by the one loop in ``optimise.py``.

An objective sees the perturbed pixels x + δ in [0, 1], (batch, 3, H, W), and returns a loss per image (batch,).
``target_distance`` is what the record reports before and after (the latent distance to the target, or None for
objectives without a target latent); ``after_step`` lets an objective update a model between perturbation steps
(Anti-DreamBooth's surrogate).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from fixative.core.errors import FixativeError
from fixative.core.pipelines import encode_images, encode_prompt
from fixative.core.schedulers import NoiseSchedule
from fixative.core.training import TrainStepConfig, denoising_losses, train_step

METHODS = ("glaze", "mist", "photoguard", "anti-dreambooth")


@dataclass
class Objective:
    loss: Callable[[torch.Tensor, int], torch.Tensor]  # (pixels in [0, 1], step) -> (batch,), minimised
    target_distance: Callable[[torch.Tensor], torch.Tensor] | None  # pixels -> (batch,) latent distance
    after_step: Callable[[torch.Tensor, int], None] = lambda pixels, step: None
    details: dict = field(default_factory=dict)  # what the record says about the objective


def encode_mean(model, pixels: torch.Tensor) -> torch.Tensor:
    """E(x): the VAE posterior mean of pixels in [0, 1], scaled latents (batch, 4, H/f, W/f), differentiable."""
    return encode_images(model, pixels * 2 - 1, sample=False).float()


def latent_distance(latents: torch.Tensor, target_latents: torch.Tensor) -> torch.Tensor:
    """Mean squared latent distance per image, (batch,)."""
    return (latents - target_latents).pow(2).flatten(1).mean(1)


def encoder_attack(model, target_latents: torch.Tensor, details: dict) -> Objective:
    """Minimise ||E(x + δ) − z_target||² (the Glaze and PhotoGuard encoder objective)."""

    def distance(pixels: torch.Tensor) -> torch.Tensor:
        return latent_distance(encode_mean(model, pixels), target_latents)

    return Objective(loss=lambda pixels, step: distance(pixels), target_distance=distance, details=details)


def glaze(model, pixels: torch.Tensor, target_pixels: torch.Tensor, style: str) -> Objective:
    """Glaze (Shan et al. 2023, Sec. 5.2, eq. 2): min_δ ||E(x + δ) − E(Ω(x, T))||² with Ω the style-transferred
    target (``targets.style_target``); the budget penalty is added by the loop."""
    with torch.no_grad():
        target_latents = encode_mean(model, target_pixels)
    return encoder_attack(model, target_latents, {"target_style": style})


def photoguard(model, pixels: torch.Tensor, target_pixels: torch.Tensor) -> Objective:
    """PhotoGuard's encoder attack (Salman et al. 2023, Sec. 4, eq. 3): min_δ ||E(x + δ) − z_target||², the target
    latent of a fixed image (mid-grey by default, ``targets.fixed_target``)."""
    with torch.no_grad():
        target_latents = encode_mean(model, target_pixels)
    return encoder_attack(model, target_latents, {"target": "fixed image"})


def _text_embeddings(model, prompt: str, batch: int) -> torch.Tensor:
    with torch.no_grad():
        return encode_prompt(model, [prompt] * batch, guidance=False).float()


def mist(
    model, pixels: torch.Tensor, pattern_pixels: torch.Tensor, prompt: str, semantic_weight: float, seed: int
) -> Objective:
    """Mist (Liang et al. 2023, eq. 7): textural loss ||E(x + δ) − E(pattern)||² minus w times the semantic
    loss, the UNet's denoising loss on E(x + δ) (AdvDM, Liang et al. 2023, eq. 5), which the perturbation
    maximises."""
    with torch.no_grad():
        pattern_latents = encode_mean(model, pattern_pixels)
    text_embeddings = _text_embeddings(model, prompt, pixels.shape[0])
    schedule = NoiseSchedule.from_config(model.scheduler_config)

    def loss(adv_pixels: torch.Tensor, step: int) -> torch.Tensor:
        latents = encode_mean(model, adv_pixels)
        textural = latent_distance(latents, pattern_latents)
        generator = torch.Generator().manual_seed(seed * 100_003 + step)
        semantic = denoising_losses(model.unet, latents, text_embeddings, schedule, model.prediction_type, generator)
        return textural - semantic_weight * semantic

    def distance(adv_pixels: torch.Tensor) -> torch.Tensor:
        return latent_distance(encode_mean(model, adv_pixels), pattern_latents)

    return Objective(
        loss=loss,
        target_distance=distance,
        details={"target": "pattern", "semantic_weight": semantic_weight, "prompt": prompt},
    )


@dataclass
class ASPLConfig:
    every: int = 10  # perturbation steps between surrogate updates
    surrogate_steps: int = 3  # fine-tuning steps on the clean copy and on the perturbed images, each time
    surrogate_lr: float = 5e-4
    prompt: str = "a painting"


def anti_dreambooth(model, pixels: torch.Tensor, config: ASPLConfig, seed: int) -> Objective:
    """Anti-DreamBooth's ASPL (Van Le et al. 2023, Sec. 4.2, Alg. 1): the perturbation maximises the denoising loss
    of θ', a copy of the surrogate θ fine-tuned on the clean images; θ itself is fine-tuned on the perturbed images.
    Both fine-tunes are ``config.surrogate_steps`` calls of core's ``train_step``, every ``config.every`` steps."""
    if pixels.shape[0] < 1:
        raise FixativeError("anti-dreambooth needs at least one image")
    text_embeddings = _text_embeddings(model, config.prompt, pixels.shape[0])
    schedule = NoiseSchedule.from_config(model.scheduler_config)
    step_config = TrainStepConfig(prediction_type=model.prediction_type)
    with torch.no_grad():
        clean_latents = encode_mean(model, pixels)
    surrogate = copy.deepcopy(model.unet).float().train().requires_grad_(True)  # θ
    surrogate_optimizer = torch.optim.AdamW(surrogate.parameters(), lr=config.surrogate_lr, weight_decay=0.0)
    state = {"attacked": None}  # θ', refreshed by after_step

    def fine_tune(unet, optimizer, latents, step: int) -> None:
        for k in range(config.surrogate_steps):
            generator = torch.Generator().manual_seed(seed * 100_003 + step * 17 + k)
            train_step(unet, optimizer, latents, text_embeddings, schedule, step_config, generator)

    def refresh(adv_pixels: torch.Tensor, step: int) -> None:
        attacked = copy.deepcopy(surrogate).train()
        optimizer = torch.optim.AdamW(attacked.parameters(), lr=config.surrogate_lr, weight_decay=0.0)
        fine_tune(attacked, optimizer, clean_latents, step)
        attacked.eval().requires_grad_(False)
        state["attacked"] = attacked
        with torch.no_grad():
            perturbed_latents = encode_mean(model, adv_pixels)
        fine_tune(surrogate, surrogate_optimizer, perturbed_latents, step + 1)

    def loss(adv_pixels: torch.Tensor, step: int) -> torch.Tensor:
        if state["attacked"] is None:
            refresh(adv_pixels.detach(), step)
        generator = torch.Generator().manual_seed(seed * 100_003 + step)
        return -denoising_losses(
            state["attacked"],
            encode_mean(model, adv_pixels),
            text_embeddings,
            schedule,
            model.prediction_type,
            generator,
        )

    def after_step(adv_pixels: torch.Tensor, step: int) -> None:
        if (step + 1) % config.every == 0:
            refresh(adv_pixels, step)

    return Objective(
        loss=loss,
        target_distance=None,
        after_step=after_step,
        details={
            "surrogate_every": config.every,
            "surrogate_steps": config.surrogate_steps,
            "surrogate_lr": config.surrogate_lr,
            "prompt": config.prompt,
        },
    )
