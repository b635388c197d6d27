"""Consistency training without a teacher: improved consistency training (iCT; Song & Dhariwal 2023, "Improved
Techniques for Training Consistency Models"), as plain functions of the network.

Per optimiser step k of K: the discretisation curriculum gives N(k) noise levels σ_1 < … < σ_N (Karras spacing
between the schedule's smallest and largest σ); draw a pair (σ_i, σ_{i+1}) from the discretised lognormal
distribution, one noise z, and pull f_θ(x + σ_{i+1} z, σ_{i+1}) towards stopgrad(f_θ(x + σ_i z, σ_i)), weighted
by λ(σ_i) = 1/(σ_{i+1} − σ_i), with the pseudo-Huber distance. The target is the student itself under
``torch.no_grad`` (no EMA: Sec. 3.2); no teacher network is called, only the data.

In this variance-preserving latent space: x_σ = (x0 + σ z)/√(1 + σ²) = √ᾱ x0 + √(1 − ᾱ) z with ᾱ = 1/(1 + σ²),
the network sees the fractional training timestep of σ (log σ interpolated on the training schedule), and the
consistency function is LCM's boundary on that timestep, so the result samples with the LCM scheduler.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from fixative.core.errors import FixativeError
from fixative.core.parameterization import ConsistencyBoundary, parameterization
from fixative.core.schedulers import NoiseSchedule, karras_sigmas, sigma_to_timestep, vp_alpha_sigma
from fixative.core.unet import UNet2DConditionModel

RHO = 7.0  # Karras et al. 2022, Eq. 5, as iCT keeps it


def discretisation_steps(step: int, total_steps: int, s0: int = 10, s1: int = 1280) -> int:
    """N(k) = min(s0 · 2^⌊k/K'⌋, s1) + 1 with K' = ⌊K / (⌊log2⌊s1/s0⌋⌋ + 1)⌋ (iCT, Sec. 3.4: the number of
    noise levels doubles every K' steps from s0 + 1 to s1 + 1). K' is at least 1 for very short runs."""
    if not 1 <= s0 <= s1:
        raise FixativeError(f"the iCT curriculum needs 1 <= s0 <= s1, got s0={s0}, s1={s1}")
    doublings = math.floor(math.log2(s1 // s0)) + 1
    stage_length = max(1, total_steps // doublings)
    return min(s0 * 2 ** (step // stage_length), s1) + 1


def noise_levels(schedule: NoiseSchedule, n: int) -> torch.Tensor:
    """σ_1 < … < σ_n, float64: Karras spacing (ρ = 7) between the training schedule's smallest and largest noise
    levels (iCT, Sec. 3.4, with σ_min and σ_max those of this schedule)."""
    sigmas = schedule.sigmas.double()
    return torch.from_numpy(karras_sigmas(float(sigmas[0]), float(sigmas[-1]), n, RHO)[::-1].copy())


def pair_probabilities(sigmas: torch.Tensor, p_mean: float = -1.1, p_std: float = 2.0) -> torch.Tensor:
    """p(σ_i) ∝ erf((ln σ_{i+1} − P_mean)/(√2 P_std)) − erf((ln σ_i − P_mean)/(√2 P_std)), i = 1 … N − 1: the
    lognormal density's mass between neighbouring levels (iCT, Sec. 3.5). (N − 1,) float64, summing to 1."""
    cdf = torch.erf((sigmas.double().log() - p_mean) / (math.sqrt(2) * p_std))
    mass = cdf[1:] - cdf[:-1]
    return mass / mass.sum()


def timesteps_of(schedule: NoiseSchedule, sigmas: torch.Tensor) -> torch.Tensor:
    """The fractional training timesteps of noise levels (the inverse of σ_t), float32. σ_min gives 0."""
    log_sigmas = schedule.sigmas.double().log().numpy()
    return torch.from_numpy(sigma_to_timestep(sigmas.double().numpy(), log_sigmas).astype(np.float32))


def pseudo_huber_per_sample(prediction: torch.Tensor, target: torch.Tensor, c: float) -> torch.Tensor:
    """d(x, y) = √(‖x − y‖² + c²) − c per sample, the norm over all of a sample's elements (iCT, Sec. 3.3). (B,)"""
    squared = (prediction.float() - target.float()).pow(2).flatten(1).sum(1)
    return torch.sqrt(squared + c**2) - c


def huber_c_for(latents: torch.Tensor) -> float:
    """c = 0.00054 √d, d the dimension of one sample (iCT, Sec. 3.3)."""
    return 0.00054 * math.sqrt(latents[0].numel())


def consistency_at(
    unet: UNet2DConditionModel,
    latents: torch.Tensor,
    sigmas: torch.Tensor,
    timesteps: torch.Tensor,
    text_embeddings: torch.Tensor,
    prediction_type: str,
    boundary: ConsistencyBoundary,
) -> torch.Tensor:
    """f(x_σ, σ) = c_skip(t) x_σ + c_out(t) x̂0 with t the timestep of σ (LCM's boundary; Consistency Models,
    Eq. 7). latents: the VP-scaled x_σ (B, C, h, w); sigmas, timesteps: (B,)."""
    alpha_t, sigma_t = (v.to(latents.dtype).reshape(-1, 1, 1, 1) for v in vp_alpha_sigma(sigmas))
    output = unet(latents, timesteps.to(latents.dtype), text_embeddings)
    x0 = parameterization(prediction_type).predict(output, latents, alpha_t, sigma_t).x0
    return boundary.denoise(x0, latents, timesteps.to(latents.dtype).reshape(-1, 1, 1, 1))


def consistency_training_loss(
    student: UNet2DConditionModel,
    latents: torch.Tensor,
    text_embeddings: torch.Tensor,
    schedule: NoiseSchedule,
    step: int,
    total_steps: int,
    boundary: ConsistencyBoundary,
    prediction_type: str = "epsilon",
    huber_c: float | None = None,
    p_mean: float = -1.1,
    p_std: float = 2.0,
    s0: int = 10,
    s1: int = 1280,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """mean over the batch of λ(σ_i) d(f_θ(x + σ_{i+1} z, σ_{i+1}), stopgrad f_θ(x + σ_i z, σ_i)) (iCT, Sec. 3).

    latents: scaled VAE latents (B, 4, h, w); text_embeddings (B, 77, D); step: k, the optimiser steps done;
    huber_c: None for 0.00054 √d. Random draws, in this order, from ``generator`` on the CPU: the pair index i
    per sample, the noise z."""
    batch = latents.shape[0]
    sigmas = noise_levels(schedule, discretisation_steps(step, total_steps, s0, s1))
    index = torch.multinomial(pair_probabilities(sigmas, p_mean, p_std), batch, replacement=True, generator=generator)
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(latents.device, latents.dtype)
    low, high = sigmas[index], sigmas[index + 1]
    timesteps = timesteps_of(schedule, torch.cat([low, high])).to(latents.device)
    low_t, high_t = timesteps.chunk(2)
    low, high = low.float().to(latents.device), high.float().to(latents.device)

    def noised(sigma: torch.Tensor) -> torch.Tensor:  # x_σ = (x0 + σ z)/√(1 + σ²)
        alpha_t, sigma_t = (v.to(latents.dtype).reshape(-1, 1, 1, 1) for v in vp_alpha_sigma(sigma))
        return alpha_t * latents + sigma_t * noise

    prediction = consistency_at(student, noised(high), high, high_t, text_embeddings, prediction_type, boundary)
    with torch.no_grad():
        target = consistency_at(student, noised(low), low, low_t, text_embeddings, prediction_type, boundary)
    weight = 1.0 / (high - low)  # λ(σ_i) = 1/(σ_{i+1} − σ_i) (Sec. 3.5)
    c = huber_c if huber_c is not None else huber_c_for(latents)
    return (weight * pseudo_huber_per_sample(prediction, target, c)).mean()
