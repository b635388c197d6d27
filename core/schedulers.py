"""Samplers for Stable Diffusion: a noise schedule, the solvers that walk it, and the bookkeeping between.

Three layers, kept apart (k-diffusion / sgm style):

- the **noise schedule**: ᾱ_t over the training timesteps, read from a diffusers ``scheduler_config.json``
  dict (``NoiseSchedule``), the timesteps of a sampling run (``spaced_timesteps``) and the Karras noise
  levels (``karras_sigmas``);
- the **solvers**: one function per update rule, with the paper's equation beside it (``ddim_step``,
  ``ddpm_step``, ``euler_step``, ``euler_ancestral_step``, ``dpm_solver_pp_1_step``,
  ``dpm_solver_pp_2m_step``, ``lcm_step``); how a network output becomes x0 is ``parameterization.py``;
- the **schedulers**: diffusers' calling convention (``set_timesteps``, ``scale_model_input``, ``step``,
  ``add_noise``) around one solver, holding what a step needs to remember (step index, previous x0) and
  drawing the step noise exactly as diffusers does, so that the same generator gives the same image.

``make_scheduler(name, scheduler_config)`` reads every key the solver understands from the dict, the way
diffusers' ``SchedulerClass.from_config`` does for a config loaded from disk: switching solvers keeps
the model's beta schedule, timestep spacing, offset and prediction type. ``to_diffusers`` writes the
config diffusers' matching class loads. Numerics follow diffusers 0.3x-0.4x operation for operation
(float32 schedules, numpy float64 where diffusers uses numpy), so fp32 results agree to rounding.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch

from .errors import FixativeError
from .noise import randn_tensor
from .parameterization import PREDICTION_TYPES, ConsistencyBoundary, parameterization

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


# ---------------------------------------------------------------------------------------------------
# Settings: the scheduler_config.json keys each solver reads, with diffusers' defaults for its class.
# ---------------------------------------------------------------------------------------------------


@dataclass
class ScheduleSettings:
    """Keys every solver reads (defaults: diffusers' DDIMScheduler)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"  # linear | scaled_linear (SD: 0.00085 .. 0.012) | squaredcos_cap_v2
    trained_betas: list[float] | None = None  # overrides the three above
    rescale_betas_zero_snr: bool = False  # Lin et al. 2024, Alg. 1
    prediction_type: str = "epsilon"  # epsilon (SD 1.x, SD 2 base) | v_prediction (SD 2.x 768) | sample
    timestep_spacing: str = "leading"  # leading | trailing | linspace (Lin et al. 2024, Table 2)
    steps_offset: int = 0  # added to "leading" timesteps; SD configs use 1

    @classmethod
    def from_config(cls, config: dict) -> ScheduleSettings:
        """The keys of ``config`` this solver reads; absent ones take the solver's own default."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in known})


@dataclass
class DDIMSettings(ScheduleSettings):
    clip_sample: bool = True  # clamp x0 to ±clip_sample_range (SD configs: False)
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = True  # ᾱ before the first training step: 1, or ᾱ_0 (SD configs: False)


@dataclass
class DDPMSettings(ScheduleSettings):
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    variance_type: str = "fixed_small"  # β̃_t, the posterior variance (the only one fixative implements)


@dataclass
class EulerAncestralSettings(ScheduleSettings):
    timestep_spacing: str = "linspace"


@dataclass
class EulerSettings(ScheduleSettings):
    timestep_spacing: str = "linspace"
    use_karras_sigmas: bool = False  # Karras et al. 2022, Eq. 5, between sigma_min and sigma_max
    sigma_min: float | None = None  # None: the schedule's own smallest / largest noise level
    sigma_max: float | None = None
    final_sigmas_type: str = "zero"  # the noise level after the last step: zero | sigma_min


@dataclass
class DPMSolverSettings(EulerSettings):
    solver_order: int = 2
    solver_type: str = "midpoint"  # how the second-order term is formed: midpoint | heun
    algorithm_type: str = "dpmsolver++"  # data prediction (the only one fixative implements)
    lower_order_final: bool = True  # first-order last step when fewer than 15 steps
    euler_at_final: bool = False  # first-order last step always

    def __post_init__(self) -> None:
        # diffusers maps DEIS / UniPC settings found in a shared config onto DPM-Solver++'s own
        self.algorithm_type = {"deis": "dpmsolver++"}.get(self.algorithm_type, self.algorithm_type)
        if self.solver_type in ("logrho", "bh1", "bh2"):
            self.solver_type = "midpoint"


@dataclass
class LCMSettings(ScheduleSettings):
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    original_inference_steps: int = 50  # the distillation schedule the sampling timesteps are taken from
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    timestep_scaling: float = 10.0  # consistency boundary condition: c_skip, c_out at 10 · t


# ---------------------------------------------------------------------------------------------------
# The noise schedule
# ---------------------------------------------------------------------------------------------------


def cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal 2021, Eq. 17: ᾱ(t) = cos²((t + s)/(1 + s) · π/2), s = 0.008;
    β_i = min(1 − ᾱ((i+1)/N) / ᾱ(i/N), 0.999). diffusers' "squaredcos_cap_v2"."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    n = num_train_timesteps
    return torch.tensor(
        [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)], dtype=torch.float32
    )


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2024, Alg. 1: shift and scale √ᾱ_t so that √ᾱ_T = 0 (zero terminal SNR) and √ᾱ_0 is kept."""
    alphas_bar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * (first / (first - last))
    alphas_bar = alphas_bar_sqrt**2
    alphas = torch.cat([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1 - alphas


@dataclass
class NoiseSchedule:
    """The discrete forward process x_t = √ᾱ_t x0 + √(1 − ᾱ_t) ε, t = 0 … N−1 (Ho et al. 2020, Eq. 4)."""

    alphas_cumprod: torch.Tensor  # (num_train_timesteps,) float32, ᾱ_t

    @classmethod
    def from_settings(cls, settings: ScheduleSettings) -> NoiseSchedule:
        n = settings.num_train_timesteps
        if settings.trained_betas is not None:
            betas = torch.tensor(settings.trained_betas, dtype=torch.float32)
            if len(betas) != n:
                raise FixativeError(
                    f"scheduler config has {len(betas)} trained_betas but num_train_timesteps={n}; make them agree"
                )
        elif settings.beta_schedule == "linear":
            betas = torch.linspace(settings.beta_start, settings.beta_end, n, dtype=torch.float32)
        elif settings.beta_schedule == "scaled_linear":  # linear in √β: Stable Diffusion's schedule
            betas = torch.linspace(settings.beta_start**0.5, settings.beta_end**0.5, n, dtype=torch.float32) ** 2
        elif settings.beta_schedule == "squaredcos_cap_v2":
            betas = cosine_betas(n)
        else:
            raise FixativeError(
                f"unknown beta_schedule {settings.beta_schedule!r} in the scheduler config; "
                f"use one of {', '.join(BETA_SCHEDULES)} or give trained_betas"
            )
        if settings.rescale_betas_zero_snr:
            betas = rescale_zero_terminal_snr(betas)
        return cls(torch.cumprod(1.0 - betas, dim=0))

    @classmethod
    def from_config(cls, scheduler_config: dict) -> NoiseSchedule:
        """The training schedule of a ``scheduler_config.json``."""
        return cls.from_settings(ScheduleSettings.from_config(scheduler_config))

    @property
    def num_train_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    def add_noise(self, original: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """x_t = √ᾱ_t x0 + √(1 − ᾱ_t) ε (Ho et al. 2020, Eq. 4); timesteps: a number or (B,)."""
        alphas_cumprod = self.alphas_cumprod.to(device=original.device, dtype=original.dtype)
        timesteps = torch.as_tensor(timesteps, device=original.device).reshape(-1)
        sqrt_alpha = _per_sample(alphas_cumprod[timesteps] ** 0.5, original)
        sqrt_one_minus_alpha = _per_sample((1 - alphas_cumprod[timesteps]) ** 0.5, original)
        return sqrt_alpha * original + sqrt_one_minus_alpha * noise

    @property
    def sigmas(self) -> torch.Tensor:
        """Noise levels of the equivalent variance-exploding process x_t/√ᾱ_t = x0 + σ_t ε:
        σ_t = √((1 − ᾱ_t)/ᾱ_t) (Karras et al. 2022, Sec. 2). (num_train_timesteps,) float32, increasing."""
        return ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5


def spaced_timesteps(
    spacing: str, num_train_timesteps: int, num_inference_steps: int, steps_offset: int = 0
) -> np.ndarray:
    """The training timesteps a sampling run visits, descending, as float64 (Lin et al. 2024, Table 2).

    linspace: evenly from N−1 to 0 (not rounded here); leading: k · ⌊N/n⌋ + steps_offset;
    trailing: round(N − k · N/n) − 1, which starts at the last training timestep.
    """
    n, N = num_inference_steps, num_train_timesteps
    if spacing == "linspace":
        return np.linspace(0, N - 1, n)[::-1].copy()
    if spacing == "leading":
        return (np.arange(n) * (N // n))[::-1].astype(np.float64) + steps_offset
    if spacing == "trailing":
        return np.round(np.arange(N, 0, -N / n)) - 1
    raise FixativeError(
        f"unknown timestep_spacing {spacing!r} in the scheduler config; use one of {', '.join(TIMESTEP_SPACINGS)}"
    )


def karras_sigmas(sigma_min: float, sigma_max: float, num_inference_steps: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022, Eq. 5: σ_i = (σ_max^{1/ρ} + i/(n−1) · (σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ, ρ = 7."""
    ramp = np.linspace(0, 1, num_inference_steps)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def sigma_to_timestep(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timesteps of noise levels: log σ interpolated linearly between neighbours."""
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    low = np.cumsum(log_sigma - log_sigmas[:, None] >= 0, axis=0).argmax(axis=0).clip(max=len(log_sigmas) - 2)
    high = low + 1
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[high]), 0, 1)
    return (1 - w) * low + w * high


# ---------------------------------------------------------------------------------------------------
# Solvers: one update each. ᾱ are cumulative alphas; σ are variance-exploding noise levels.
# ---------------------------------------------------------------------------------------------------


def ddim_step(x0, eps, alpha_cumprod_prev, std_dev, noise=None):
    """DDIM, Song et al. 2021, Eq. 12: x_{t−1} = √ᾱ_{t−1} x0 + √(1 − ᾱ_{t−1} − σ_t²) ε + σ_t z."""
    latents = alpha_cumprod_prev**0.5 * x0 + (1 - alpha_cumprod_prev - std_dev**2) ** 0.5 * eps
    return latents if noise is None else latents + std_dev * noise


def ddim_std_dev(eta, alpha_cumprod, alpha_cumprod_prev):
    """Song et al. 2021, Eq. 16: σ_t = η √((1 − ᾱ_{t−1})/(1 − ᾱ_t)) √(1 − ᾱ_t/ᾱ_{t−1}); η = 1 is DDPM."""
    return eta * ((1 - alpha_cumprod_prev) / (1 - alpha_cumprod) * (1 - alpha_cumprod / alpha_cumprod_prev)) ** 0.5


def ddpm_step(x0, latents, alpha_cumprod, alpha_cumprod_prev, noise=None):
    """DDPM ancestral step, Ho et al. 2020, Eqs. 6-7: x_{t−1} = μ̃_t(x_t, x0) + √β̃_t z with
    μ̃_t = √ᾱ_{t−1} β_t/(1 − ᾱ_t) · x0 + √α_t (1 − ᾱ_{t−1})/(1 − ᾱ_t) · x_t, β̃_t = (1 − ᾱ_{t−1})/(1 − ᾱ_t) · β_t,
    where α_t = ᾱ_t/ᾱ_{t−1} spans the skipped training steps."""
    alpha_t = alpha_cumprod / alpha_cumprod_prev
    beta_t = 1 - alpha_t
    mean = (alpha_cumprod_prev**0.5 * beta_t) / (1 - alpha_cumprod) * x0 + alpha_t**0.5 * (1 - alpha_cumprod_prev) / (
        1 - alpha_cumprod
    ) * latents
    if noise is None:
        return mean
    variance = torch.clamp((1 - alpha_cumprod_prev) / (1 - alpha_cumprod) * beta_t, min=1e-20)
    return mean + variance**0.5 * noise


def euler_step(latents, x0, sigma, sigma_next):
    """Euler, Karras et al. 2022, Alg. 2 with S_churn = 0: d = (x − D(x; σ))/σ, x' = x + (σ' − σ) d."""
    derivative = (latents - x0) / sigma
    return latents + derivative * (sigma_next - sigma)


def euler_ancestral_step(latents, x0, sigma, sigma_next, noise):
    """Ancestral Euler (k-diffusion's sample_euler_ancestral, η = 1): step deterministically down to
    σ_down = √(σ'² − σ_up²), then add fresh noise σ_up = √(σ'² (σ² − σ'²)/σ²)."""
    sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
    sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
    derivative = (latents - x0) / sigma
    return latents + derivative * (sigma_down - sigma) + noise * sigma_up


def vp_alpha_sigma(sigma):
    """The variance-preserving α_t = 1/√(1 + σ²), σ_t = σ α_t of a variance-exploding noise level σ."""
    alpha_t = 1 / ((sigma**2 + 1) ** 0.5)
    return alpha_t, sigma * alpha_t


def _log_snr(sigma):  # λ = log α_t − log σ_t (Lu et al. 2022)
    alpha_t, sigma_t = vp_alpha_sigma(sigma)
    return torch.log(alpha_t) - torch.log(sigma_t)


def dpm_solver_pp_1_step(latents, x0, sigma, sigma_next):
    """DPM-Solver++(1), Lu et al. 2022, Eq. 9: x_t = (σ_t/σ_s) x_s − α_t (e^{−h} − 1) x0, h = λ_t − λ_s.
    At σ' = 0 (λ = ∞) this returns x0."""
    alpha_t, sigma_t = vp_alpha_sigma(sigma_next)
    _, sigma_s = vp_alpha_sigma(sigma)
    h = _log_snr(sigma_next) - _log_snr(sigma)
    return (sigma_t / sigma_s) * latents - (alpha_t * (torch.exp(-h) - 1.0)) * x0


def dpm_solver_pp_2m_step(latents, x0, x0_prev, sigma_prev, sigma, sigma_next, solver_type="midpoint"):
    """DPM-Solver++(2M), Lu et al. 2022, Alg. 2: with h = λ_t − λ_s, r = (λ_s − λ_prev)/h and
    D1 = (x0 − x0_prev)/r, x_t = (σ_t/σ_s) x_s − α_t (e^{−h} − 1) (x0 + D1/2) (midpoint); the "heun" form
    weights D1 by α_t ((e^{−h} − 1)/h + 1) instead (Lu et al. 2022, App. B)."""
    alpha_t, sigma_t = vp_alpha_sigma(sigma_next)
    _, sigma_s = vp_alpha_sigma(sigma)
    lambda_t, lambda_s, lambda_prev = _log_snr(sigma_next), _log_snr(sigma), _log_snr(sigma_prev)
    h = lambda_t - lambda_s
    r = (lambda_s - lambda_prev) / h
    d1 = (1.0 / r) * (x0 - x0_prev)
    first_order = (sigma_t / sigma_s) * latents - (alpha_t * (torch.exp(-h) - 1.0)) * x0
    if solver_type == "midpoint":
        return first_order - 0.5 * (alpha_t * (torch.exp(-h) - 1.0)) * d1
    return first_order + (alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0)) * d1


def lcm_step(denoised, alpha_cumprod_prev, noise=None):
    """Multistep consistency sampling, Luo et al. 2023, Alg. 3: x_{τ'} = √ᾱ_{τ'} f(x_τ, τ) + √(1 − ᾱ_{τ'}) z;
    the last step returns the consistency function's output f itself."""
    if noise is None:
        return denoised
    return alpha_cumprod_prev.sqrt() * denoised + (1 - alpha_cumprod_prev).sqrt() * noise


# ---------------------------------------------------------------------------------------------------
# Schedulers: diffusers' calling convention around one solver
# ---------------------------------------------------------------------------------------------------


class Scheduler:
    """One solver over one noise schedule, called the way diffusers' schedulers are:

        scheduler.set_timesteps(num_inference_steps, device)
        latents = noise * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            noise_pred = unet(scheduler.scale_model_input(latents, t), t, text_embeddings)
            latents = scheduler.step(noise_pred, t, latents, generator)

    After each step ``pred_original_sample`` holds the step's estimate of the clean latents (for lcm,
    the consistency function's output, diffusers' ``denoised``).
    """

    name: str
    diffusers_class: str
    Settings: type[ScheduleSettings] = ScheduleSettings
    prediction_types: tuple[str, ...] = PREDICTION_TYPES
    # config keys whose other values fixative does not implement -> the value(s) it accepts
    unsupported: dict[str, tuple] = {"thresholding": (False,)}
    order = 1  # model evaluations per step
    init_noise_sigma = 1.0  # the standard deviation of the starting latents
    # Sigma-based solvers cannot take σ_T = ∞; at zero terminal SNR diffusers sets ᾱ_T = 2⁻²⁴ for them.
    finite_terminal_snr = False

    def __init__(self, settings: ScheduleSettings):
        self.settings = settings
        self.parameterization = parameterization(settings.prediction_type, self.prediction_types)
        self.schedule = NoiseSchedule.from_settings(settings)
        if settings.rescale_betas_zero_snr and self.finite_terminal_snr:
            self.schedule.alphas_cumprod[-1] = 2**-24
        self.alphas_cumprod = self.schedule.alphas_cumprod
        self.timesteps: torch.Tensor | None = None
        self.num_inference_steps: int | None = None
        self.pred_original_sample: torch.Tensor | None = None
        self._step_index: int | None = None  # where the next step is, for solvers that walk an index
        self._begin_index: int | None = None  # set by img2img_timesteps

    def set_timesteps(self, num_inference_steps: int, device: torch.device | str | None = None) -> None:
        n, N = num_inference_steps, self.settings.num_train_timesteps
        if not 1 <= n <= N:
            raise FixativeError(f"num_inference_steps must be between 1 and {N} (the training timesteps), not {n}")
        self.num_inference_steps = n
        self.timesteps = self._timesteps(n).to(device)
        self.pred_original_sample = None
        self._step_index = self._begin_index = None

    def _timesteps(self, num_inference_steps: int) -> torch.Tensor:
        raise NotImplementedError

    def img2img_timesteps(
        self, num_inference_steps: int, strength: float, device: torch.device | str | None = None
    ) -> torch.Tensor:
        """The timesteps an image-to-image run takes (SDEdit, Meng et al. 2022): the last
        ⌊n · strength⌋ of the n-step schedule; its first element is the level ``add_noise`` gives the
        image. As diffusers' StableDiffusionImg2ImgPipeline.get_timesteps, which also makes the
        sigma-based solvers start their step index there. Empty when strength is too small for one step."""
        if not 0 <= strength <= 1:
            raise FixativeError(f"strength must be between 0 and 1, not {strength}")
        if device is None and self.timesteps is not None:
            device = self.timesteps.device
        self.set_timesteps(num_inference_steps, device)
        init_timestep = min(int(num_inference_steps * strength), num_inference_steps)
        t_start = max(num_inference_steps - init_timestep, 0)
        self._begin_index = t_start * self.order
        return self.timesteps[t_start * self.order :]

    def scale_model_input(self, latents: torch.Tensor, t) -> torch.Tensor:
        return latents

    def step(
        self,
        model_output: torch.Tensor,
        t,
        latents: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
    ) -> torch.Tensor:
        """The latents at the next (less noisy) timestep."""
        raise NotImplementedError

    def add_noise(self, original: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """x_t = √ᾱ_t x0 + √(1 − ᾱ_t) ε on this scheduler's schedule (``NoiseSchedule.add_noise``)."""
        return self.schedule.add_noise(original, noise, timesteps)

    # The step index as diffusers tracks it: the img2img start, or else t's position in the schedule;
    # then one more per step. (Where t occurs twice diffusers takes the second position, which skips a
    # step and fails at the end, e.g. dpm++2m with Karras sigmas on the cosine schedule; we take the first.)
    def _index(self, t) -> int:
        if self._step_index is None:
            self._step_index = self._begin_index if self._begin_index is not None else self._index_of(t)
        return self._step_index

    def _index_of(self, t) -> int:
        if self.timesteps is None:
            raise FixativeError("call set_timesteps before stepping the scheduler")
        matches = (self.timesteps == torch.as_tensor(t, device=self.timesteps.device)).nonzero()
        if len(matches) == 0:
            raise FixativeError(
                f"timestep {float(t)} is not one of this scheduler's timesteps; pass an element of scheduler.timesteps"
            )
        return matches[0].item()

    def _clipped(self, x0: torch.Tensor) -> torch.Tensor:
        if self.settings.clip_sample:
            return x0.clamp(-self.settings.clip_sample_range, self.settings.clip_sample_range)
        return x0


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, 1, ...) broadcasting against ``like``."""
    return values.flatten().reshape(-1, *([1] * (like.ndim - 1)))


def _integer_timesteps(settings: ScheduleSettings, num_inference_steps: int) -> torch.Tensor:
    spaced = spaced_timesteps(
        settings.timestep_spacing, settings.num_train_timesteps, num_inference_steps, settings.steps_offset
    )
    return torch.from_numpy(np.round(spaced).astype(np.int64))


class DDIMScheduler(Scheduler):
    """Denoising diffusion implicit models (Song et al. 2021); deterministic for eta = 0."""

    name, diffusers_class, Settings = "ddim", "DDIMScheduler", DDIMSettings

    def __init__(self, settings: DDIMSettings, eta: float = 0.0):
        super().__init__(settings)
        self.eta = eta
        self.final_alpha_cumprod = torch.tensor(1.0) if settings.set_alpha_to_one else self.alphas_cumprod[0]

    def _timesteps(self, num_inference_steps: int) -> torch.Tensor:
        return _integer_timesteps(self.settings, num_inference_steps)

    def step(self, model_output, t, latents, generator=None):
        # diffusers steps back by ⌊N/n⌋ training timesteps whatever the spacing
        prev_t = t - self.settings.num_train_timesteps // self.num_inference_steps
        alpha_cumprod = self.alphas_cumprod[t]
        alpha_cumprod_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        x0, eps = self.parameterization.predict(model_output, latents, alpha_cumprod**0.5, (1 - alpha_cumprod) ** 0.5)
        x0 = self._clipped(x0)
        std_dev = ddim_std_dev(self.eta, alpha_cumprod, alpha_cumprod_prev)
        noise = None
        if self.eta > 0:
            noise = randn_tensor(model_output.shape, generator, model_output.device, model_output.dtype)
        self.pred_original_sample = x0
        return ddim_step(x0, eps, alpha_cumprod_prev, std_dev, noise)


class DDPMScheduler(Scheduler):
    """Denoising diffusion probabilistic models (Ho et al. 2020), ancestral sampling with β̃_t."""

    name, diffusers_class, Settings = "ddpm", "DDPMScheduler", DDPMSettings

    def __init__(self, settings: DDPMSettings):
        if settings.variance_type != "fixed_small":
            raise FixativeError(
                f"variance_type {settings.variance_type!r} is not supported by fixative's ddpm "
                "scheduler; use fixed_small"
            )
        super().__init__(settings)

    def _timesteps(self, num_inference_steps: int) -> torch.Tensor:
        return _integer_timesteps(self.settings, num_inference_steps)

    def step(self, model_output, t, latents, generator=None):
        index = self._index_of(t)  # the step before is the next entry of the schedule
        prev_t = self.timesteps[index + 1] if index + 1 < len(self.timesteps) else -1
        alpha_cumprod = self.alphas_cumprod[t]
        alpha_cumprod_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else torch.tensor(1.0)
        x0, _ = self.parameterization.predict(model_output, latents, alpha_cumprod**0.5, (1 - alpha_cumprod) ** 0.5)
        x0 = self._clipped(x0)
        noise = None
        if t > 0:
            noise = randn_tensor(model_output.shape, generator, model_output.device, model_output.dtype)
        self.pred_original_sample = x0
        return ddpm_step(x0, latents, alpha_cumprod, alpha_cumprod_prev, noise)


class _SigmaScheduler(Scheduler):
    """Base of the solvers that walk noise levels σ_i (``self.sigmas``, n + 1 of them, on the CPU)."""

    finite_terminal_snr = True

    def __init__(self, settings: ScheduleSettings):
        super().__init__(settings)
        self.sigmas = torch.cat([self.schedule.sigmas.flip(0), torch.zeros(1)])

    def _interpolated_sigmas(self, timesteps: np.ndarray) -> np.ndarray:
        """σ at (fractional) training timesteps, interpolated linearly; float64."""
        train_sigmas = self.schedule.sigmas.numpy()
        return np.interp(timesteps, np.arange(len(train_sigmas)), train_sigmas)

    def _final_sigma(self) -> float:
        if self.settings.final_sigmas_type == "sigma_min":
            return self.schedule.sigmas[0].item()
        return 0.0

    def _noise_level_indices(self, timesteps: torch.Tensor) -> list[int]:
        if self._begin_index is None:
            return [self._index_of(t) for t in timesteps]
        return [self._step_index if self._step_index is not None else self._begin_index] * len(timesteps)


class _VESigmaScheduler(_SigmaScheduler):
    """Solvers on variance-exploding latents x0 + σ ε (Karras et al. 2022): the network sees x/√(σ² + 1)."""

    @property
    def init_noise_sigma(self):
        max_sigma = self.sigmas.max()
        if self.settings.timestep_spacing in ("linspace", "trailing"):
            return max_sigma
        return (max_sigma**2 + 1) ** 0.5

    def scale_model_input(self, latents, t):
        sigma = self.sigmas[self._index(t)]
        return latents / ((sigma**2 + 1) ** 0.5)

    def add_noise(self, original, noise, timesteps):
        """x = x0 + σ ε at the noise level of each timestep."""
        timesteps = torch.as_tensor(timesteps, device=self.timesteps.device).reshape(-1)
        sigmas = self.sigmas.to(device=original.device, dtype=original.dtype)
        return original + noise * _per_sample(sigmas[self._noise_level_indices(timesteps)], original)

    def _float_timesteps(self, num_inference_steps: int) -> np.ndarray:
        s = self.settings
        return spaced_timesteps(s.timestep_spacing, s.num_train_timesteps, num_inference_steps, s.steps_offset).astype(
            np.float32
        )


class EulerScheduler(_VESigmaScheduler):
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Alg. 2 without churn)."""

    name, diffusers_class, Settings = "euler", "EulerDiscreteScheduler", EulerSettings
    unsupported = {
        "interpolation_type": ("linear",),
        "timestep_type": ("discrete",),
        "use_exponential_sigmas": (False,),
        "use_beta_sigmas": (False,),
    }

    def __init__(self, settings: EulerSettings):
        if settings.final_sigmas_type not in ("zero", "sigma_min"):
            raise FixativeError(f"final_sigmas_type must be zero or sigma_min, not {settings.final_sigmas_type!r}")
        super().__init__(settings)

    def _timesteps(self, num_inference_steps: int) -> torch.Tensor:
        s = self.settings
        timesteps = self._float_timesteps(num_inference_steps)
        sigmas = self._interpolated_sigmas(timesteps)
        if s.use_karras_sigmas:
            sigmas = karras_sigmas(
                s.sigma_min if s.sigma_min is not None else sigmas[-1].item(),
                s.sigma_max if s.sigma_max is not None else sigmas[0].item(),
                num_inference_steps,
            )
            timesteps = sigma_to_timestep(sigmas, np.log(self.schedule.sigmas.numpy()))
        self.sigmas = torch.from_numpy(np.concatenate([sigmas, [self._final_sigma()]]).astype(np.float32))
        return torch.from_numpy(timesteps.astype(np.float32))

    def step(self, model_output, t, latents, generator=None):
        i = self._index(t)
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        latents = latents.to(torch.float32)
        x0 = self.parameterization.denoise(model_output, latents, sigma)
        self.pred_original_sample = x0
        self._step_index += 1
        return euler_step(latents, x0, sigma, sigma_next).to(model_output.dtype)


class EulerAncestralScheduler(_VESigmaScheduler):
    """Euler steps with fresh noise after each (k-diffusion's ancestral sampler)."""

    name, diffusers_class, Settings = "euler-a", "EulerAncestralDiscreteScheduler", EulerAncestralSettings
    prediction_types = ("epsilon", "v_prediction")
    unsupported = {}

    def _timesteps(self, num_inference_steps: int) -> torch.Tensor:
        timesteps = self._float_timesteps(num_inference_steps)
        sigmas = self._interpolated_sigmas(timesteps)
        self.sigmas = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))
        return torch.from_numpy(timesteps)

    def step(self, model_output, t, latents, generator=None):
        i = self._index(t)
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        latents = latents.to(torch.float32)
        x0 = self.parameterization.denoise(model_output, latents, sigma)
        noise = randn_tensor(model_output.shape, generator, model_output.device, model_output.dtype)
        self.pred_original_sample = x0
        self._step_index += 1
        return euler_ancestral_step(latents, x0, sigma, sigma_next, noise).to(model_output.dtype)


class DPMSolverMultistepScheduler(_SigmaScheduler):
    """DPM-Solver++(2M) (Lu et al. 2022): second order from the previous step's x0, first order at the start
    and, by default, at the end (lower_order_final below 15 steps; always when the last σ is zero)."""

    name, diffusers_class, Settings = "dpm++2m", "DPMSolverMultistepScheduler", DPMSolverSettings
    unsupported = {
        "thresholding": (False,),
        "use_exponential_sigmas": (False,),
        "use_beta_sigmas": (False,),
        "use_lu_lambdas": (False,),
        "use_flow_sigmas": (False,),
        # learned variances (a 2x-channel output) are for pixel models, not Stable Diffusion
        "variance_type": (None, "fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log"),
        "lambda_min_clipped": (-math.inf,),
    }

    def __init__(self, settings: DPMSolverSettings):
        for key, value, allowed in (
            ("algorithm_type", settings.algorithm_type, ("dpmsolver++",)),
            ("solver_order", settings.solver_order, (1, 2)),
            ("solver_type", settings.solver_type, ("midpoint", "heun")),
            ("final_sigmas_type", settings.final_sigmas_type, ("zero", "sigma_min")),
        ):
            if value not in allowed:
                raise FixativeError(
                    f"{key}={value!r} is not supported by fixative's dpm++2m scheduler; "
                    f"use one of {', '.join(map(str, allowed))}"
                )
        super().__init__(settings)
        self._x0_prev: torch.Tensor | None = None

    def set_timesteps(self, num_inference_steps, device=None):
        super().set_timesteps(num_inference_steps, device)
        self._x0_prev = None

    def _timesteps(self, num_inference_steps: int) -> torch.Tensor:
        s, n = self.settings, num_inference_steps
        # n + 1 points with the last (t = 0 side) dropped, except for trailing spacing
        if s.timestep_spacing == "trailing":
            spaced = spaced_timesteps("trailing", s.num_train_timesteps, n)
        else:
            spaced = spaced_timesteps(s.timestep_spacing, s.num_train_timesteps, n + 1, s.steps_offset)[:-1]
        timesteps = np.round(spaced).astype(np.int64)
        train_sigmas = self.schedule.sigmas.numpy()
        if s.use_karras_sigmas:  # over the whole training range, whatever the spacing
            sigmas = karras_sigmas(
                s.sigma_min if s.sigma_min is not None else train_sigmas[0].item(),
                s.sigma_max if s.sigma_max is not None else train_sigmas[-1].item(),
                n,
            )
            timesteps = sigma_to_timestep(sigmas, np.log(train_sigmas))
            if s.beta_schedule != "squaredcos_cap_v2":
                timesteps = timesteps.round()
        else:
            sigmas = self._interpolated_sigmas(timesteps)
        self.sigmas = torch.from_numpy(np.concatenate([sigmas, [self._final_sigma()]]).astype(np.float32))
        return torch.from_numpy(timesteps).to(torch.int64)

    def add_noise(self, original, noise, timesteps):
        """x_t = α_t x0 + σ_t ε at the (interpolated) noise level of each timestep."""
        timesteps = torch.as_tensor(timesteps, device=self.timesteps.device).reshape(-1)
        sigmas = self.sigmas.to(device=original.device, dtype=original.dtype)
        alpha_t, sigma_t = vp_alpha_sigma(_per_sample(sigmas[self._noise_level_indices(timesteps)], original))
        return alpha_t * original + sigma_t * noise

    def step(self, model_output, t, latents, generator=None):
        s = self.settings
        i = self._index(t)
        last = i == len(self.timesteps) - 1
        first_order_final = last and (
            s.euler_at_final or (s.lower_order_final and len(self.timesteps) < 15) or s.final_sigmas_type == "zero"
        )
        alpha_t, sigma_t = vp_alpha_sigma(self.sigmas[i])
        x0 = self.parameterization.predict(model_output, latents, alpha_t, sigma_t).x0
        latents = latents.to(torch.float32)
        if s.solver_order == 1 or self._x0_prev is None or first_order_final:
            prev = dpm_solver_pp_1_step(latents, x0, self.sigmas[i], self.sigmas[i + 1])
        else:
            prev = dpm_solver_pp_2m_step(
                latents, x0, self._x0_prev, self.sigmas[i - 1], self.sigmas[i], self.sigmas[i + 1], s.solver_type
            )
        self._x0_prev = self.pred_original_sample = x0
        self._step_index += 1
        return prev.to(model_output.dtype)


class LCMScheduler(Scheduler):
    """Latent consistency models' multistep sampler (Luo et al. 2023, Alg. 3)."""

    name, diffusers_class, Settings = "lcm", "LCMScheduler", LCMSettings

    def __init__(self, settings: LCMSettings):
        super().__init__(settings)
        self.boundary = ConsistencyBoundary(settings.timestep_scaling)
        self._strength = 1.0

    def set_timesteps(self, num_inference_steps: int, device=None, strength: float = 1.0) -> None:
        """n timesteps picked evenly from the distillation schedule k·c − 1, k = 1 … original_inference_steps
        (c = N / original_inference_steps). strength < 1 keeps only its first ⌊original · strength⌋ entries:
        the image-to-image schedule of diffusers' LatentConsistencyModelImg2ImgPipeline."""
        self._strength = strength
        super().set_timesteps(num_inference_steps, device)

    def _timesteps(self, num_inference_steps: int) -> torch.Tensor:
        s, n = self.settings, num_inference_steps
        original = s.original_inference_steps
        if original > s.num_train_timesteps:
            raise FixativeError(
                f"original_inference_steps={original} exceeds num_train_timesteps="
                f"{s.num_train_timesteps}; fix the scheduler config"
            )
        c = s.num_train_timesteps // original
        distilled = np.arange(1, int(original * self._strength) + 1) * c - 1
        if len(distilled) < n:
            raise FixativeError(
                f"lcm can take at most {len(distilled)} steps here (original_inference_steps="
                f"{original} x strength {self._strength}); lower num_inference_steps"
            )
        picks = np.floor(np.linspace(0, len(distilled), num=n, endpoint=False)).astype(np.int64)
        return torch.from_numpy(distilled[::-1][picks].copy())

    def step(self, model_output, t, latents, generator=None):
        i = self._index(t)
        prev_t = self.timesteps[i + 1] if i + 1 < len(self.timesteps) else t
        alpha_cumprod, alpha_cumprod_prev = self.alphas_cumprod[t], self.alphas_cumprod[prev_t]
        x0, _ = self.parameterization.predict(model_output, latents, alpha_cumprod.sqrt(), (1 - alpha_cumprod).sqrt())
        denoised = self.boundary.denoise(self._clipped(x0), latents, t)
        noise = None
        if i != self.num_inference_steps - 1:
            noise = randn_tensor(model_output.shape, generator, model_output.device, denoised.dtype)
        self.pred_original_sample = denoised
        self._step_index += 1
        return lcm_step(denoised, alpha_cumprod_prev, noise)


SCHEDULERS: dict[str, type[Scheduler]] = {
    cls.name: cls
    for cls in (
        DDIMScheduler,
        EulerScheduler,
        EulerAncestralScheduler,
        DPMSolverMultistepScheduler,
        DDPMScheduler,
        LCMScheduler,
    )
}


def _scheduler_class(name: str) -> type[Scheduler]:
    if name not in SCHEDULERS:
        raise FixativeError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    return SCHEDULERS[name]


def make_scheduler(name: str, scheduler_config: dict | None = None, *, eta: float = 0.0) -> Scheduler:
    """The scheduler ``name`` (ddim, euler, euler-a, dpm++2m, ddpm, lcm) with every setting it understands
    read from a diffusers scheduler_config dict (any scheduler class's). eta: DDIM's noise (0 = deterministic)."""
    cls = _scheduler_class(name)
    config = dict(scheduler_config or {})
    for key in config.get("_use_default_values", ()):  # defaults of the class the config was saved from
        config.pop(key, None)
    for key, accepted in cls.unsupported.items():
        if config.get(key, accepted[0]) not in accepted:
            raise FixativeError(
                f"the scheduler config sets {key}={config[key]!r}, which fixative's {name} "
                f"scheduler does not support; remove it or set {key}={accepted[0]!r}"
            )
    settings = cls.Settings.from_config(config)
    if settings.timestep_spacing not in TIMESTEP_SPACINGS and cls is not LCMScheduler:
        raise FixativeError(
            f"unknown timestep_spacing {settings.timestep_spacing!r} in the scheduler config; "
            f"use one of {', '.join(TIMESTEP_SPACINGS)}"
        )
    if cls is DDIMScheduler:
        return DDIMScheduler(settings, eta=eta)
    if eta:
        raise FixativeError(f"eta applies to the ddim scheduler only, not {name}")
    return cls(settings)


def to_diffusers(name: str, scheduler_config: dict | None = None) -> dict:
    """The scheduler_config.json dict of diffusers' class for ``name`` (``_class_name`` included), carrying
    the settings ``make_scheduler(name, scheduler_config)`` uses, so that diffusers samples the same way."""
    scheduler = make_scheduler(name, scheduler_config)
    settings = {k: v for k, v in dataclasses.asdict(scheduler.settings).items() if v is not None}
    return {"_class_name": scheduler.diffusers_class, **settings}
