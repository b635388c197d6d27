"""Latent consistency distillation: the computation of one training step (Luo et al. 2023, "Latent
Consistency Models", Algorithm 1), as plain functions of the networks.

Per step: draw t_{n+k} from the skipping-step schedule (``SkippingSchedule``), noise the latents to it,
draw a guidance weight w ~ U[w_min, w_max], take one guided DDIM step of the frozen teacher from t_{n+k}
to t_n (``teacher_ddim_step``), and pull the student's consistency function at (x_{t_{n+k}}, t_{n+k})
towards the target network's at (x̂_{t_n}, t_n) (``consistency_distillation_loss``).

Guidance convention (the one place it is written down). ``w`` is LCM's guidance weight: the teacher's
guided prediction is

    ε̂ = (1 + w) ε(x, c) − w ε(x, ∅) = ε(x, c) + w (ε(x, c) − ε(x, ∅))      (LCM, Sec. 4.2)

i.e. ordinary classifier-free guidance (Ho & Salimans 2022, ε_∅ + g (ε_c − ε_∅)) with scale g = 1 + w.
A distilled student embeds w itself (``guidance_scale_embedding(w)``, its ``timestep_cond``). Samplers
take the ordinary scale g and embed g − 1 = w: fixative's ``generate`` and diffusers'
``LatentConsistencyModelPipeline`` both do. So ``--w-min 3 --w-max 15`` trains for guidance scales 4 to 16,
and ``fixative generate --scheduler lcm --guidance 8`` asks the student for w = 7. An LCM-LoRA has no
embedding: it learns the teacher guided at w averaged over the range, and samples with guidance 1 (off).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fixative.core.errors import FixativeError
from fixative.core.parameterization import ConsistencyBoundary, parameterization
from fixative.core.pipelines import guidance_scale_embedding
from fixative.core.schedulers import NoiseSchedule, ddim_step
from fixative.core.unet import UNet2DConditionModel

LOSSES = ("huber", "l2")
# unet(latents, timesteps, text_embeddings, timestep_cond=None) -> model output, as core's UNet is called
UNetCall = Callable[..., torch.Tensor]


@dataclass
class SkippingSchedule:
    """The teacher's DDIM timesteps t_i = i·k − 1 (i = 1 … n, k = N / n) and the skipping-step pairs
    (t_{n+k}, t_n) = (t_i, t_i − k) that distillation trains on (LCM, Sec. 4.3); t_1 − k = −1 is clamped
    to 0, where the consistency function is the identity. The same timesteps as diffusers' DDIMSolver
    and, at sampling time, the LCM scheduler's ``original_inference_steps``."""

    noise_schedule: NoiseSchedule  # the teacher's training schedule: ᾱ over the N training timesteps
    num_ddim_timesteps: int = 50

    def __post_init__(self) -> None:
        n, N = self.num_ddim_timesteps, len(self.alphas_cumprod)
        if not 1 <= n <= N:
            raise FixativeError(f"num_ddim_timesteps must be between 1 and {N} (the training timesteps), not {n}")

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self.noise_schedule.alphas_cumprod

    @property
    def skip(self) -> int:
        """k: how many training timesteps one teacher step spans."""
        return len(self.alphas_cumprod) // self.num_ddim_timesteps

    @property
    def timesteps(self) -> torch.Tensor:
        return torch.arange(1, self.num_ddim_timesteps + 1) * self.skip - 1

    def draw(self, batch: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(t_{n+k}, t_n), each (batch,) int64, t_{n+k} uniform over the DDIM timesteps (drawn on the CPU)."""
        index = torch.randint(0, self.num_ddim_timesteps, (batch,), generator=generator)
        start = self.timesteps[index]
        return start, (start - self.skip).clamp(min=0)


def _alpha_bar(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """ᾱ_t per sample, shaped (B, 1, 1, 1) in ``like``'s dtype."""
    return alphas_cumprod.to(like.device)[timesteps.to(like.device)].to(like.dtype).reshape(-1, 1, 1, 1)


def _alpha_sigma(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, like: torch.Tensor):
    """(√ᾱ_t, √(1 − ᾱ_t)) per sample, shaped (B, 1, 1, 1)."""
    alpha_bar = _alpha_bar(alphas_cumprod, timesteps, like)
    return alpha_bar.sqrt(), (1 - alpha_bar).sqrt()


def consistency_function(
    model_output: torch.Tensor,
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    prediction_type: str,
    boundary: ConsistencyBoundary,
) -> torch.Tensor:
    """f(x_t, t) = c_skip(t) x_t + c_out(t) x̂0(x_t, t) (Consistency Models, Song et al. 2023, Eq. 7; LCM,
    Eq. 9): x̂0 from the network output by its parameterisation, c_skip = σ_d²/((s t)² + σ_d²),
    c_out = s t / √((s t)² + σ_d²). At t = 0, c_skip = 1 and c_out = 0: f(x, 0) = x exactly."""
    alpha_t, sigma_t = _alpha_sigma(alphas_cumprod, timesteps, latents)
    x0 = parameterization(prediction_type).predict(model_output, latents, alpha_t, sigma_t).x0
    return boundary.denoise(x0, latents, timesteps.to(latents.device).reshape(-1, 1, 1, 1))


def teacher_ddim_step(
    teacher: UNetCall,
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    prev_timesteps: torch.Tensor,
    text_embeddings: torch.Tensor,
    uncond_embeddings: torch.Tensor,
    w: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    prediction_type: str,
) -> torch.Tensor:
    """x̂_{t_n}: one deterministic DDIM step (Song et al. 2021, Eq. 12, η = 0) of the teacher guided at w,
    x̂_{t_n} = √ᾱ_{t_n} x̂0 + √(1 − ᾱ_{t_n}) ε̂, from x_{t_{n+k}} = ``latents`` at ``timesteps``.

    The guided output is F_c + w (F_c − F_∅) (the module docstring's convention); x̂0 and ε̂ follow from it
    by the parameterisation, which is affine in F with coefficients that do not depend on w, so this equals
    guiding x̂0 and ε̂ separately as diffusers' train_lcm_distill scripts do. w: (B,).
    uncond_embeddings: the empty prompt's text embeddings, (B, 77, D) or (1, 77, D)."""
    batch = latents.shape[0]
    uncond_embeddings = uncond_embeddings.expand(batch, *uncond_embeddings.shape[1:])
    output = teacher(
        torch.cat([latents, latents]),
        torch.cat([timesteps, timesteps]).to(latents.device),
        torch.cat([uncond_embeddings, text_embeddings]),
    )
    output_uncond, output_text = output.chunk(2)
    w = w.to(latents.device, latents.dtype).reshape(-1, 1, 1, 1)
    guided = output_text + w * (output_text - output_uncond)
    alpha_t, sigma_t = _alpha_sigma(alphas_cumprod, timesteps, latents)
    x0, eps = parameterization(prediction_type).predict(guided, latents, alpha_t, sigma_t)
    return ddim_step(x0, eps, _alpha_bar(alphas_cumprod, prev_timesteps, latents), 0.0)


def pseudo_huber(prediction: torch.Tensor, target: torch.Tensor, c: float = 0.001) -> torch.Tensor:
    """mean(√((a − b)² + c²) − c) over all elements (Song & Dhariwal 2023, "Improved Techniques for Training
    Consistency Models", Sec. 3.3; element-wise, as diffusers' LCM scripts apply it)."""
    return torch.mean(torch.sqrt((prediction.float() - target.float()) ** 2 + c**2) - c)


def distance(prediction: torch.Tensor, target: torch.Tensor, loss: str, huber_c: float = 0.001) -> torch.Tensor:
    if loss == "huber":
        return pseudo_huber(prediction, target, huber_c)
    if loss == "l2":
        return F.mse_loss(prediction.float(), target.float())
    raise FixativeError(f"unknown loss {loss!r}; use one of {', '.join(LOSSES)}")


@dataclass
class LCDSettings:
    """The knobs of latent consistency distillation (defaults: LCM / diffusers' train_lcm_distill_sd_wds)."""

    num_ddim_timesteps: int = 50  # n of the skipping-step schedule; k = N / n
    w_min: float = 3.0  # guidance weight range (LCM's w; guidance scale 1 + w)
    w_max: float = 15.0
    loss: str = "huber"  # huber (pseudo-Huber) | l2
    huber_c: float = 0.001
    timestep_scaling: float = 10.0  # s in c_skip, c_out
    sigma_data: float = 0.5  # σ_d in c_skip, c_out

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise FixativeError(f"unknown loss {self.loss!r}; use one of {', '.join(LOSSES)}")
        if not 0 <= self.w_min <= self.w_max:
            raise FixativeError(f"need 0 <= w_min <= w_max, got w_min={self.w_min}, w_max={self.w_max}")

    @property
    def boundary(self) -> ConsistencyBoundary:
        return ConsistencyBoundary(self.timestep_scaling, self.sigma_data)


def draw_guidance(batch: int, settings: LCDSettings, generator: torch.Generator | None = None) -> torch.Tensor:
    """w ~ U[w_min, w_max], (batch,) float32, drawn on the CPU."""
    return settings.w_min + (settings.w_max - settings.w_min) * torch.rand(batch, generator=generator)


def guidance_condition(unet: UNet2DConditionModel, w: torch.Tensor, like: torch.Tensor) -> torch.Tensor | None:
    """The student's ``timestep_cond`` for guidance weight w (the embedding of w itself, see the module
    docstring), or None for a UNet without a guidance embedding (an LCM-LoRA)."""
    dim = unet.config.time_cond_proj_dim
    if dim is None:
        return None
    return guidance_scale_embedding(w, dim).to(like.device, like.dtype)


def consistency_distillation_loss(
    student: UNet2DConditionModel,
    teacher: UNetCall,
    target: UNetCall,
    latents: torch.Tensor,
    text_embeddings: torch.Tensor,
    uncond_embeddings: torch.Tensor,
    schedule: SkippingSchedule,
    settings: LCDSettings,
    prediction_type: str = "epsilon",
    generator: torch.Generator | None = None,
    student_prediction_type: str | None = None,
) -> torch.Tensor:
    """d(f_θ(x_{t_{n+k}}, w, c, t_{n+k}), f_θ⁻(x̂_{t_n}, w, c, t_n)) of LCM Algorithm 1 for one batch.

    student: the network trained (θ); teacher: the frozen teacher UNet; target: the target network θ⁻
    (the EMA of the student for LCD; the student itself, without gradient, for LCM-LoRA), called like
    ``student``. latents: scaled VAE latents (B, 4, h, w); text_embeddings (B, 77, D). Random draws, in
    this order, from ``generator`` on the CPU: t_{n+k}, the noise, w. prediction_type: the teacher's
    parameterisation; student_prediction_type: the student's and the target network's (default: the same).
    """
    student_prediction_type = student_prediction_type or prediction_type
    batch = latents.shape[0]
    alphas_cumprod = schedule.alphas_cumprod
    boundary = settings.boundary
    start, end = schedule.draw(batch, generator)
    start, end = start.to(latents.device), end.to(latents.device)
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(latents.device, latents.dtype)
    w = draw_guidance(batch, settings, generator)
    noisy_latents = schedule.noise_schedule.add_noise(latents, noise, start)
    condition = guidance_condition(student, w, latents)

    student_output = student(noisy_latents, start, text_embeddings, timestep_cond=condition)
    prediction = consistency_function(
        student_output, noisy_latents, start, alphas_cumprod, student_prediction_type, boundary
    )
    with torch.no_grad():
        teacher_latents = teacher_ddim_step(
            teacher, noisy_latents, start, end, text_embeddings, uncond_embeddings, w, alphas_cumprod, prediction_type
        )
        target_output = target(teacher_latents, end, text_embeddings, timestep_cond=condition)
        target_value = consistency_function(
            target_output, teacher_latents, end, alphas_cumprod, student_prediction_type, boundary
        )
    return distance(prediction, target_value, settings.loss, settings.huber_c)


def student_from_teacher(teacher: UNet2DConditionModel, time_cond_proj_dim: int = 256) -> UNet2DConditionModel:
    """The LCD student: the teacher's UNet plus a guidance-scale embedding of width ``time_cond_proj_dim``
    projected into the timestep embedding (LCM, Sec. 4.2), initialised with the teacher's weights. The new
    projection starts at zero, so the untrained student predicts exactly what the teacher does unguided
    (diffusers' script leaves it randomly initialised)."""
    if teacher.config.time_cond_proj_dim is not None:
        raise FixativeError(
            "the teacher UNet already embeds a guidance scale (time_cond_proj_dim is set): it is "
            "a distilled model; distil from the original one"
        )
    config = dataclasses.replace(teacher.config, time_cond_proj_dim=time_cond_proj_dim)
    parameter = next(teacher.parameters())
    with torch.device(parameter.device):
        student = UNet2DConditionModel(config).to(parameter.dtype)
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    if unexpected or missing != ["time_embedding.cond_proj.weight"]:
        raise FixativeError(f"the student does not match the teacher: missing {missing}, unexpected {unexpected}")
    torch.nn.init.zeros_(student.time_embedding.cond_proj.weight)
    return student.train(teacher.training)
