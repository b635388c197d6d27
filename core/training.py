"""The reusable training step of the denoiser: denoising loss, caption dropout, EMA, low-rank adapters.

Plain functions over (model, optimizer, batch), no global state, so the toy build, mimicry fine-tuning
(eval) and distillation can call them, under ``accelerate`` or not (pass ``accelerator.backward`` as
``backward``). The UNet is anything with ``unet(noisy_latents, timesteps, text_embeddings) -> model_output``.
"""

from __future__ import annotations

import contextlib
import math
import random
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import FixativeError
from .schedulers import NoiseSchedule, ScheduleSettings

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def alphas_cumprod_from_config(scheduler_config: dict) -> torch.Tensor:
    """ᾱ_t = Π_{s<=t} (1 - β_s) for t = 0 .. num_train_timesteps - 1 (DDPM, Ho et al. 2020, Sec. 2), float32
    as diffusers' schedulers hold it: the sampler's own noise schedule (core/schedulers.py)."""
    return NoiseSchedule.from_settings(ScheduleSettings.from_config(scheduler_config)).alphas_cumprod


def _per_sample(values: torch.Tensor, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """values[timesteps] shaped (B, 1, 1, 1) to broadcast against ``like``."""
    picked = values.to(timesteps.device)[timesteps].to(like.dtype)
    return picked.reshape(-1, *([1] * (like.ndim - 1)))


def add_noise(latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
              alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε   (DDPM eq. 4)."""
    alpha_bar = _per_sample(alphas_cumprod, timesteps, latents)
    return alpha_bar.sqrt() * latents + (1 - alpha_bar).sqrt() * noise


def training_target(latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                    alphas_cumprod: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """What the model learns to output: ε, v = sqrt(ᾱ_t) ε - sqrt(1 - ᾱ_t) x_0 (Salimans & Ho 2022, Sec. 4), or x_0."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        alpha_bar = _per_sample(alphas_cumprod, timesteps, latents)
        return alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents
    if prediction_type == "sample":
        return latents
    raise FixativeError(f"prediction_type {prediction_type!r} is not one of {PREDICTION_TYPES}")


def min_snr_weights(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, gamma: float,
                    prediction_type: str) -> torch.Tensor:
    """Min-SNR-γ loss weights (Hang et al. 2023, eq. 9): min(SNR_t, γ) / SNR_t for an ε target,
    min(SNR_t, γ) / (SNR_t + 1) for a v target, min(SNR_t, γ) for x_0; SNR_t = ᾱ_t / (1 - ᾱ_t). (B,) float32."""
    alpha_bar = alphas_cumprod.to(timesteps.device)[timesteps].double()
    snr = alpha_bar / (1 - alpha_bar)
    clipped = snr.clamp(max=gamma)
    weights = {"epsilon": clipped / snr, "v_prediction": clipped / (snr + 1), "sample": clipped}[prediction_type]
    return weights.float()


def denoising_loss(unet: Callable, latents: torch.Tensor, text_embeddings: torch.Tensor,
                   alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon",
                   generator: torch.Generator | None = None, timesteps: torch.Tensor | None = None,
                   snr_gamma: float | None = None, autocast_dtype: torch.dtype | None = None,
                   offset_noise: float = 0.0) -> torch.Tensor:
    """MSE between the model output on noised latents and its target (the simple loss, DDPM eq. 14).

    latents: scaled VAE latents (B, 4, h, w); text_embeddings (B, 77, D). Noise and timesteps (uniform over
    the training steps) are drawn on the CPU from ``generator``, so a seed gives the same batch anywhere.
    snr_gamma: weight each sample by Min-SNR-γ (γ = 5 in the paper) instead of uniformly.
    autocast_dtype: run the model's forward pass under torch.autocast in this dtype (e.g. bfloat16).
    offset_noise: add this much noise constant over each image and channel (Guttenberg 2023, "Diffusion with
    offset noise"): SD's schedule leaves ᾱ_T > 0, so the model never learns to move an image's mean
    colour away from the noise's; the offset teaches it to.
    """
    batch = latents.shape[0]
    if timesteps is None:
        timesteps = torch.randint(0, len(alphas_cumprod), (batch,), generator=generator)
    timesteps = timesteps.to(latents.device)
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32)
    if offset_noise:
        noise = noise + offset_noise * torch.randn(*latents.shape[:2], 1, 1, generator=generator)
    noise = noise.to(latents.device, latents.dtype)
    noisy_latents = add_noise(latents, noise, timesteps, alphas_cumprod)
    target = training_target(latents, noise, timesteps, alphas_cumprod, prediction_type)
    precision = torch.autocast(latents.device.type, autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    with precision:
        model_output = unet(noisy_latents, timesteps, text_embeddings)
    if snr_gamma is None:
        return F.mse_loss(model_output.float(), target.float())
    per_sample = (model_output.float() - target.float()).pow(2).flatten(1).mean(1)
    return (per_sample * min_snr_weights(timesteps, alphas_cumprod, snr_gamma, prediction_type)).mean()


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


def train_step(unet: nn.Module, optimizer: torch.optim.Optimizer, latents: torch.Tensor,
               text_embeddings: torch.Tensor, alphas_cumprod: torch.Tensor, config: TrainStepConfig = TrainStepConfig(),
               generator: torch.Generator | None = None, backward: Callable[[torch.Tensor], None] | None = None,
               scheduler: torch.optim.lr_scheduler.LRScheduler | None = None) -> float:
    """One optimisation step on one batch; returns the loss. ``backward``: e.g. ``accelerator.backward``."""
    optimizer.zero_grad(set_to_none=True)
    loss = denoising_loss(unet, latents, text_embeddings, alphas_cumprod, config.prediction_type, generator,
                          snr_gamma=config.snr_gamma, autocast_dtype=config.autocast_dtype,
                          offset_noise=config.offset_noise)
    (backward or torch.Tensor.backward)(loss)
    if config.max_grad_norm is not None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return loss.item()


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int,
                  final_fraction: float = 0.05) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up to the optimizer's lr, then cosine decay to ``final_fraction`` of it."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class EMA:
    """Exponential moving average of a model's floating-point parameters: θ̄ ← d θ̄ + (1 - d) θ."""

    def __init__(self, model: nn.Module, decay: float = 0.999):
        self.decay = decay
        self.shadow = {name: p.detach().clone() for name, p in model.named_parameters() if p.dtype.is_floating_point}

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


class LoRALinear(nn.Linear):
    """A Linear layer plus a low-rank update: W x + (α / r) B A x, B zero at start (LoRA, Hu et al. 2021, eq. 3).

    It keeps the wrapped layer's ``weight`` / ``bias`` (same state-dict keys, frozen) and adds
    ``lora_down`` (A, r x in) and ``lora_up`` (B, out x r).
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        kwargs = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_down = nn.Linear(base.in_features, rank, bias=False, **kwargs)
        self.lora_up = nn.Linear(rank, base.out_features, bias=False, **kwargs)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        self.scale = (alpha if alpha is not None else rank) / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + self.scale * self.lora_up(self.lora_down(x))

    def merged(self) -> nn.Linear:
        """A plain Linear with W + (α / r) B A."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            delta = self.lora_up.weight.float() @ self.lora_down.weight.float()
            linear.weight.copy_(self.weight.float() + self.scale * delta)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear


ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def inject_lora(model: nn.Module, rank: int = 4, alpha: float | None = None,
                targets: Iterable[str] = ATTENTION_PROJECTIONS) -> list[nn.Parameter]:
    """Wrap every Linear whose name ends with one of ``targets`` (e.g. ``attn2.to_k``) in a LoRALinear.

    Returns the new trainable parameters (the model's other parameters are left as they were; freeze
    them with ``model.requires_grad_(False)`` before calling this to train the adapters only).
    """
    targets = tuple(targets)
    chosen = [name for name, m in model.named_modules()
              if type(m) is nn.Linear and any(name == t or name.endswith("." + t) for t in targets)]
    if not chosen:
        raise FixativeError(f"no Linear layer named {targets} in the model: nothing to adapt with LoRA")
    params = []
    for name in chosen:
        lora = LoRALinear(model.get_submodule(name), rank, alpha)
        _replace(model, name, lora)
        params += [lora.lora_down.weight, lora.lora_up.weight]
    return params


def merge_lora(model: nn.Module) -> int:
    """Fold every LoRALinear back into a plain Linear (state-dict keys as before injection); returns the count."""
    names = [name for name, m in model.named_modules() if isinstance(m, LoRALinear)]
    for name in names:
        _replace(model, name, model.get_submodule(name).merged())
    return len(names)
