"""What a denoising network predicts, and how its output becomes a clean-sample estimate.

Every noisy sample is x_t = α_t x0 + σ_t ε with α_t² + σ_t² = 1 (α_t² = ᾱ_t, the cumulative product of
1 − β). Each parameterisation turns a network output F into (x0, ε) (``predict``), states the same map as
the two scalings of ``x0 = c_skip · x_t + c_out · F`` (``scalings``, the sgm / EDM form), names the
training target F for a given (x0, ε) (``target``), and gives the
denoiser D(x; σ) of the equivalent variance-exploding sample x = x_t/α_t = x0 + σ ε, σ = σ_t/α_t, that
Karras-style solvers step (``denoise``; Karras et al. 2022, Eq. 7, the network seeing x/√(σ² + 1)).
The consistency models' boundary condition is one more of these: ``f(x_t, t) = c_skip(t) · x_t +
c_out(t) · F`` with F the estimated x0.

The formulas are written in the order diffusers evaluates them, so results agree bit for bit.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

from .errors import FixativeError

if TYPE_CHECKING:  # torch is not imported here, so that the command line can read PREDICTION_TYPES quickly
    import torch


class Prediction(NamedTuple):
    x0: torch.Tensor  # the clean-sample estimate
    eps: torch.Tensor  # the noise estimate


class EpsilonPrediction:
    """F = ε (Ho et al. 2020, Eq. 11): x0 = (x_t − σ_t ε) / α_t."""

    name = "epsilon"

    def scalings(self, alpha_t, sigma_t):
        return 1 / alpha_t, -sigma_t / alpha_t

    def predict(self, model_output, latents, alpha_t, sigma_t) -> Prediction:
        return Prediction((latents - sigma_t * model_output) / alpha_t, model_output)

    def target(self, x0, eps, alpha_t, sigma_t):
        """What the network is trained to output for x_t = α_t x0 + σ_t ε."""
        return eps

    def denoise(self, model_output, latents, sigma):
        return latents - sigma * model_output


class VPrediction:
    """F = v = α_t ε − σ_t x0 (Salimans & Ho 2022, Sec. 4): x0 = α_t x_t − σ_t v, ε = α_t v + σ_t x_t."""

    name = "v_prediction"

    def scalings(self, alpha_t, sigma_t):
        return alpha_t, -sigma_t

    def predict(self, model_output, latents, alpha_t, sigma_t) -> Prediction:
        return Prediction(alpha_t * latents - sigma_t * model_output, alpha_t * model_output + sigma_t * latents)

    def target(self, x0, eps, alpha_t, sigma_t):
        return alpha_t * eps - sigma_t * x0

    def denoise(self, model_output, latents, sigma):  # x0 = x/(σ² + 1) − σ/√(σ² + 1) · v
        return model_output * (-sigma / (sigma**2 + 1) ** 0.5) + (latents / (sigma**2 + 1))


class SamplePrediction:
    """F = x0: ε = (x_t − α_t x0) / σ_t."""

    name = "sample"

    def scalings(self, alpha_t, sigma_t):
        return 0.0, 1.0

    def predict(self, model_output, latents, alpha_t, sigma_t) -> Prediction:
        return Prediction(model_output, (latents - alpha_t * model_output) / sigma_t)

    def target(self, x0, eps, alpha_t, sigma_t):
        return x0

    def denoise(self, model_output, latents, sigma):
        return model_output


class ConsistencyBoundary:
    """The consistency function f(x_t, t) = c_skip(t) x_t + c_out(t) F with c_skip(0) = 1, c_out(0) = 0.

    Song et al. 2023, Eq. 7, with LCM's discrete-time scalings (Luo et al. 2023, Sec. 4.2): the timestep
    is scaled by ``timestep_scaling`` (10 in LCM) so that the boundary condition is nearly met at t = 0,
    σ_data = 0.5; F is the x0 estimate of the parameterisation the network was trained with.
    """

    name = "consistency"

    def __init__(self, timestep_scaling: float = 10.0, sigma_data: float = 0.5):
        self.timestep_scaling = timestep_scaling
        self.sigma_data = sigma_data

    def scalings(self, timestep):
        scaled = timestep * self.timestep_scaling
        c_skip = self.sigma_data**2 / (scaled**2 + self.sigma_data**2)
        c_out = scaled / (scaled**2 + self.sigma_data**2) ** 0.5
        return c_skip, c_out

    def denoise(self, x0, latents, timestep) -> torch.Tensor:
        c_skip, c_out = self.scalings(timestep)
        return c_out * x0 + c_skip * latents


PARAMETERIZATIONS = {p.name: p for p in (EpsilonPrediction(), VPrediction(), SamplePrediction())}
PREDICTION_TYPES = tuple(PARAMETERIZATIONS)  # diffusers' prediction_type values: epsilon, v_prediction, sample


def parameterization(prediction_type: str, allowed: tuple[str, ...] = PREDICTION_TYPES):
    """The parameterisation for a diffusers ``prediction_type`` ("epsilon", "v_prediction", "sample")."""
    if prediction_type not in allowed:
        raise FixativeError(
            f"prediction_type {prediction_type!r} is not supported here; use one of {', '.join(allowed)}"
        )
    return PARAMETERIZATIONS[prediction_type]
