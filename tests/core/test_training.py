import math
import random

import pytest
import torch
from torch import nn

from fixative.core.schedulers import NoiseSchedule
from fixative.core.training import (
    EMA,
    TrainStepConfig,
    denoising_loss,
    denoising_losses,
    drop_captions,
    min_snr_weights,
    train_step,
    training_target,
    warmup_constant,
    warmup_cosine,
)

SD_SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}


class TinyDenoiser(nn.Module):
    """unet(latents, timesteps, text_embeddings) stand-in: convs with the timestep and the mean text vector added."""

    def __init__(self, channels=4, width=32, text_dim=8):
        super().__init__()
        self.conv_in = nn.Conv2d(channels, width, 3, padding=1)
        self.cond = nn.Linear(text_dim + 1, width)
        self.conv_mid = nn.Conv2d(width, width, 3, padding=1)
        self.conv_out = nn.Conv2d(width, channels, 3, padding=1)

    def forward(self, latents, timesteps, text_embeddings):
        t = torch.as_tensor(timesteps, dtype=latents.dtype).reshape(-1, 1).expand(latents.shape[0], 1) / 1000
        cond = self.cond(torch.cat([text_embeddings.mean(1), t], dim=1))[:, :, None, None]
        h = torch.nn.functional.silu(self.conv_in(latents) + cond)
        h = torch.nn.functional.silu(self.conv_mid(h))
        return self.conv_out(h)


def schedule():
    return NoiseSchedule.from_config(SD_SCHEDULER)


def test_add_noise_and_targets_match_diffusers():
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.DDPMScheduler(**SD_SCHEDULER)
    torch.manual_seed(0)
    latents, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    timesteps = torch.tensor([0, 500, 999])
    assert torch.equal(schedule().add_noise(latents, noise, timesteps), scheduler.add_noise(latents, noise, timesteps))
    assert torch.allclose(
        training_target(latents, noise, timesteps, schedule(), "v_prediction"),
        scheduler.get_velocity(latents, noise, timesteps),
        atol=1e-6,
    )
    assert training_target(latents, noise, timesteps, schedule(), "epsilon") is noise
    assert training_target(latents, noise, timesteps, schedule(), "sample") is latents


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_loss_decreases_on_a_tiny_problem(prediction_type):
    torch.manual_seed(0)
    model = TinyDenoiser()
    patterns = torch.randn(2, 4, 8, 8)
    conditions = torch.randn(2, 77, 8)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    config = TrainStepConfig(prediction_type=prediction_type)
    losses = []
    for _ in range(120):
        which = torch.randint(0, 2, (16,), generator=generator)
        losses.append(train_step(model, optimizer, patterns[which], conditions[which], schedule(), config, generator))
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < 0.6 * first, (first, last)


def test_denoising_loss_is_reproducible_from_a_generator():
    torch.manual_seed(0)
    model = TinyDenoiser()
    latents, text = torch.randn(4, 4, 8, 8), torch.randn(4, 77, 8)
    a = denoising_loss(model, latents, text, schedule(), generator=torch.Generator().manual_seed(5))
    b = denoising_loss(model, latents, text, schedule(), generator=torch.Generator().manual_seed(5))
    c = denoising_loss(model, latents, text, schedule(), generator=torch.Generator().manual_seed(6))
    assert a.item() == b.item() and a.item() != c.item()


def test_caption_dropout_rate():
    captions = [f"caption {i}" for i in range(20000)]
    dropped = drop_captions(captions, 0.1, random.Random(0))
    rate = sum(c == "" for c in dropped) / len(captions)
    assert abs(rate - 0.1) < 0.01
    assert all(c in ("", o) for c, o in zip(dropped, captions))
    assert drop_captions(captions[:50], 0.0, random.Random(0)) == captions[:50]


def test_ema_follows_the_exponential_moving_average():
    model = nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = EMA(model, decay=0.9)
    with torch.no_grad():
        model.weight.fill_(1.0)
    for _ in range(3):
        ema.update(model)
    # θ̄ after 3 updates towards 1 from 0: 1 - 0.9^3
    assert torch.allclose(ema.shadow["weight"], torch.full((2, 3), 1 - 0.9**3))
    ema.copy_to(model)
    assert torch.allclose(model.weight, torch.full((2, 3), 1 - 0.9**3))


def test_warmup_cosine_schedule():
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = warmup_cosine(optimizer, total_steps=110, warmup_steps=10, final_fraction=0.0)
    lrs = []
    for _ in range(110):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)), abs=1e-6)
    assert lrs[-1] < 0.01


def test_min_snr_weights_follow_the_paper():
    alphas_cumprod = schedule().alphas_cumprod
    timesteps = torch.tensor([0, 100, 500, 999])
    snr = (alphas_cumprod[timesteps] / (1 - alphas_cumprod[timesteps])).double()
    eps = min_snr_weights(timesteps, schedule(), 5.0, "epsilon")
    assert torch.allclose(eps.double(), torch.minimum(snr, torch.tensor(5.0, dtype=torch.float64)) / snr)
    assert eps[-1] == 1.0 and eps[0] < 0.01  # noisy steps keep weight 1, nearly clean ones are down-weighted
    v = min_snr_weights(timesteps, schedule(), 5.0, "v_prediction")
    assert torch.allclose(v.double(), torch.minimum(snr, torch.tensor(5.0, dtype=torch.float64)) / (snr + 1))


def test_weighted_loss_with_gamma_infinite_equals_plain_loss_and_bf16_autocast_is_close():
    torch.manual_seed(0)
    model = TinyDenoiser()
    latents, text = torch.randn(4, 4, 8, 8), torch.randn(4, 77, 8)
    plain = denoising_loss(model, latents, text, schedule(), generator=torch.Generator().manual_seed(1))
    weighted = denoising_loss(
        model, latents, text, schedule(), generator=torch.Generator().manual_seed(1), snr_gamma=float("inf")
    )
    assert torch.allclose(plain, weighted, rtol=1e-5)
    bf16 = denoising_loss(
        model, latents, text, schedule(), generator=torch.Generator().manual_seed(1), autocast_dtype=torch.bfloat16
    )
    assert bf16.item() != plain.item() and abs(bf16.item() - plain.item()) < 0.05 * plain.item()


def test_offset_noise_adds_a_constant_per_image_and_channel():
    """Guttenberg 2023: noise + s * n(B, C, 1, 1). A model predicting zeros has loss E[noise²] = 1 + s²,
    and the offset is constant over each image and channel."""
    alphas_cumprod = schedule().alphas_cumprod
    latents, text = torch.zeros(64, 4, 16, 16), torch.zeros(64, 77, 8)
    seen = []

    def zero_model(noisy_latents, timesteps, text_embeddings):
        seen.append(noisy_latents / (1 - alphas_cumprod[timesteps]).sqrt().reshape(-1, 1, 1, 1))  # = the noise
        return torch.zeros_like(noisy_latents)

    plain = denoising_loss(zero_model, latents, text, schedule(), generator=torch.Generator().manual_seed(0))
    offset = denoising_loss(
        zero_model, latents, text, schedule(), generator=torch.Generator().manual_seed(0), offset_noise=1.0
    )
    assert 0.9 < plain.item() < 1.1 and 1.7 < offset.item() < 2.3
    means = seen[1].mean((2, 3)) - seen[0].mean((2, 3))  # the same per-pixel draw under one seed: the offset
    assert torch.allclose(seen[1] - seen[0], means[..., None, None].expand_as(seen[0]), atol=1e-5)
    assert means.std() > 0.5


def test_warmup_constant_schedule():
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule_ = warmup_constant(optimizer, warmup_steps=4)
    lrs = []
    for _ in range(8):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule_.step()
    assert lrs == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0])


def test_per_sample_losses_average_to_the_loss():
    torch.manual_seed(0)
    model = TinyDenoiser()
    latents, text = torch.randn(4, 4, 8, 8), torch.randn(4, 77, 8)
    losses = denoising_losses(model, latents, text, schedule(), generator=torch.Generator().manual_seed(3))
    assert losses.shape == (4,)
    assert torch.equal(
        losses.mean(), denoising_loss(model, latents, text, schedule(), generator=torch.Generator().manual_seed(3))
    )
