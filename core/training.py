"""The pieces of a denoiser's training step: the denoising loss, Min-SNR weights, caption dropout, lr
schedules and EMA. ``core/finetune.py`` is the loop that uses them (with accelerate, resume and data);
low-rank adapters live in ``core/lora.py``.

Plain functions, no global state. The UNet is anything with ``unet(noisy_latents, timesteps,
text_embeddings) -> model_output``; the forward process is ``NoiseSchedule.add_noise`` and the target of
each prediction type is the parameterisation's own (core/parameterization.py).
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .parameterization import parameterization
from .schedulers import NoiseSchedule


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, 1, 1) to broadcast against ``like``."""
    return values.to(like.device, like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def training_target(
    latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, schedule: NoiseSchedule, prediction_type: str
) -> torch.Tensor:
    """What the model learns to output for x_t = α_t x0 + σ_t ε: ε, v or x0 (``Parameterization.target``)."""
    alpha_bar = schedule.alphas_cumprod.to(timesteps.device)[timesteps]
    alpha_t, sigma_t = _per_sample(alpha_bar**0.5, latents), _per_sample((1 - alpha_bar) ** 0.5, latents)
    return parameterization(prediction_type).target(latents, noise, alpha_t, sigma_t)


def min_snr_weights(
    timesteps: torch.Tensor, schedule: NoiseSchedule, gamma: float, prediction_type: str
) -> torch.Tensor:
    """Min-SNR-γ loss weights (Hang et al. 2023, eq. 9): min(SNR_t, γ) / SNR_t for an ε target,
    min(SNR_t, γ) / (SNR_t + 1) for a v target, min(SNR_t, γ) for x_0; SNR_t = ᾱ_t / (1 - ᾱ_t). (B,) float32."""
    parameterization(prediction_type)  # a clear error for an unknown type
    alpha_bar = schedule.alphas_cumprod.to(timesteps.device)[timesteps].double()
    snr = alpha_bar / (1 - alpha_bar)
    clipped = snr.clamp(max=gamma)
    weights = {"epsilon": clipped / snr, "v_prediction": clipped / (snr + 1), "sample": clipped}[prediction_type]
    return weights.float()


def denoising_losses(
    unet: Callable,
    latents: torch.Tensor,
    text_embeddings: torch.Tensor,
    schedule: NoiseSchedule,
    prediction_type: str = "epsilon",
    generator: torch.Generator | None = None,
    timesteps: torch.Tensor | None = None,
    snr_gamma: float | None = None,
    autocast_dtype: torch.dtype | None = None,
    offset_noise: float = 0.0,
) -> torch.Tensor:
    """Per-sample squared error between the model output on noised latents and its target, (B,) float32
    (the simple loss, DDPM eq. 14, averaged over each sample's elements).

    latents: scaled VAE latents (B, 4, h, w); text_embeddings (B, 77, D). Timesteps (uniform over the
    training steps), then the noise, then the offset noise are drawn on the CPU from ``generator`` in that
    order, so a seed gives the same batch anywhere.
    snr_gamma: weight each sample by Min-SNR-γ (γ = 5 in the paper).
    autocast_dtype: run the model's forward pass under torch.autocast in this dtype (e.g. bfloat16).
    offset_noise: add this much noise constant over each image and channel (Guttenberg 2023, "Diffusion with
    offset noise"): SD's schedule leaves ᾱ_T > 0, so the model never learns to move an image's mean
    colour away from the noise's; the offset teaches it to.
    """
    batch = latents.shape[0]
    if timesteps is None:
        timesteps = torch.randint(0, schedule.num_train_timesteps, (batch,), generator=generator)
    timesteps = timesteps.to(latents.device)
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32)
    if offset_noise:
        noise = noise + offset_noise * torch.randn(*latents.shape[:2], 1, 1, generator=generator)
    noise = noise.to(latents.device, latents.dtype)
    noisy_latents = schedule.add_noise(latents, noise, timesteps)
    target = training_target(latents, noise, timesteps, schedule, prediction_type)
    precision = torch.autocast(latents.device.type, autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    with precision:
        model_output = unet(noisy_latents, timesteps, text_embeddings)
    per_sample = (model_output.float() - target.float()).pow(2).flatten(1).mean(1)
    if snr_gamma is not None:
        per_sample = per_sample * min_snr_weights(timesteps, schedule, snr_gamma, prediction_type)
    return per_sample


def denoising_loss(
    unet: Callable,
    latents: torch.Tensor,
    text_embeddings: torch.Tensor,
    schedule: NoiseSchedule,
    prediction_type: str = "epsilon",
    generator: torch.Generator | None = None,
    **options,
) -> torch.Tensor:
    """The mean of ``denoising_losses`` over the batch (same arguments)."""
    return denoising_losses(unet, latents, text_embeddings, schedule, prediction_type, generator, **options).mean()


def drop_captions(captions: Sequence[str], rate: float, rng: random.Random) -> list[str]:
    """Replace each caption by the empty prompt with probability ``rate``: the unconditional model of
    classifier-free guidance is the same network (Ho & Salimans 2022, Sec. 3.2)."""
    return ["" if rng.random() < rate else caption for caption in captions]


@dataclass
class TrainStepConfig:
    prediction_type: str = "epsilon"
    max_grad_norm: float | None = 1.0  # gradient clipping by global norm; None: no clipping
    snr_gamma: float | None = None  # Min-SNR-γ loss weighting (Hang et al. 2023); None: uniform
    autocast_dtype: torch.dtype | None = None  # e.g. torch.bfloat16: forward pass under autocast
    offset_noise: float = 0.0  # per image and channel constant noise (Guttenberg 2023); 0.1 is usual


def train_step(
    unet: nn.Module,
    optimizer: torch.optim.Optimizer,
    latents: torch.Tensor,
    text_embeddings: torch.Tensor,
    schedule: NoiseSchedule,
    config: TrainStepConfig = TrainStepConfig(),
    generator: torch.Generator | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
) -> float:
    """One optimisation step on one given batch; returns the loss. Data, accumulation, checkpoints and
    processes are ``core/finetune.py``'s ``fine_tune``, which new code should call instead."""
    optimizer.zero_grad(set_to_none=True)
    loss = denoising_loss(
        unet,
        latents,
        text_embeddings,
        schedule,
        config.prediction_type,
        generator,
        snr_gamma=config.snr_gamma,
        autocast_dtype=config.autocast_dtype,
        offset_noise=config.offset_noise,
    )
    loss.backward()
    if config.max_grad_norm is not None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return loss.item()


def cosine_decay(progress: float, final_fraction: float = 0.0) -> float:
    """The fraction of the full step size at ``progress`` in [0, 1] of a cosine decay to ``final_fraction``:
    η_min + (1 − η_min) (1 + cos(π t / T)) / 2 (Loshchilov & Hutter 2017, SGDR Eq. 5, one cycle)."""
    return final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress))


def warmup_cosine(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, final_fraction: float = 0.05
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up to the optimizer's lr, then cosine decay to ``final_fraction`` of it."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return cosine_decay(min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps)), final_fraction)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def warmup_constant(optimizer: torch.optim.Optimizer, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up to the optimizer's lr, then constant."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / max(1, warmup_steps)))


class EMA:
    """Exponential moving average of a model's floating-point parameters: θ̄ ← d θ̄ + (1 - d) θ."""

    def __init__(self, model: nn.Module, decay: float = 0.999, trainable_only: bool = False):
        self.decay = decay
        self.shadow = {
            name: p.detach().clone()
            for name, p in model.named_parameters()
            if p.dtype.is_floating_point and (p.requires_grad or not trainable_only)
        }

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for name, p in model.named_parameters():
            if name in self.shadow:
                self.shadow[name].lerp_(p.detach(), 1 - self.decay)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        for name, p in model.named_parameters():
            if name in self.shadow:
                p.copy_(self.shadow[name])

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.decay = state["decay"]
        self.shadow = {k: v.clone() for k, v in state["shadow"].items()}
