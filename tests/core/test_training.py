import math
import random

import pytest
import torch
from torch import nn

from fixative.core.training import (EMA, LoRALinear, TrainStepConfig, add_noise, alphas_cumprod_from_config,
                                    denoising_loss, drop_captions, inject_lora, merge_lora, min_snr_weights, train_step,
                                    training_target, warmup_cosine)

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


def test_alphas_cumprod_matches_diffusers_ddpm_scheduler():
    diffusers = pytest.importorskip("diffusers")
    for config in (SD_SCHEDULER, dict(SD_SCHEDULER, beta_schedule="linear", beta_start=0.0001, beta_end=0.02),
                   dict(SD_SCHEDULER, beta_schedule="squaredcos_cap_v2", rescale_betas_zero_snr=True)):
        assert torch.equal(alphas_cumprod_from_config(config), diffusers.DDPMScheduler(**config).alphas_cumprod)


def test_add_noise_and_v_target_match_diffusers():
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.DDPMScheduler(**SD_SCHEDULER)
    torch.manual_seed(0)
    latents, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    timesteps = torch.tensor([0, 500, 999])
    alphas_cumprod = alphas_cumprod_from_config(SD_SCHEDULER)
    assert torch.allclose(add_noise(latents, noise, timesteps, alphas_cumprod),
                          scheduler.add_noise(latents, noise, timesteps), atol=1e-5)
    assert torch.allclose(training_target(latents, noise, timesteps, alphas_cumprod, "v_prediction"),
                          scheduler.get_velocity(latents, noise, timesteps), atol=1e-5)
    assert training_target(latents, noise, timesteps, alphas_cumprod, "epsilon") is noise


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_loss_decreases_on_a_tiny_problem(prediction_type):
    torch.manual_seed(0)
    model = TinyDenoiser()
    patterns = torch.randn(2, 4, 8, 8)
    conditions = torch.randn(2, 77, 8)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    alphas_cumprod = alphas_cumprod_from_config(SD_SCHEDULER)
    generator = torch.Generator().manual_seed(0)
    config = TrainStepConfig(prediction_type=prediction_type)
    losses = []
    for step in range(120):
        which = torch.randint(0, 2, (16,), generator=generator)
        losses.append(train_step(model, optimizer, patterns[which], conditions[which], alphas_cumprod, config, generator))
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < 0.6 * first, (first, last)


def test_denoising_loss_is_reproducible_from_a_generator():
    torch.manual_seed(0)
    model = TinyDenoiser()
    latents, text = torch.randn(4, 4, 8, 8), torch.randn(4, 77, 8)
    alphas_cumprod = alphas_cumprod_from_config(SD_SCHEDULER)
    a = denoising_loss(model, latents, text, alphas_cumprod, generator=torch.Generator().manual_seed(5))
    b = denoising_loss(model, latents, text, alphas_cumprod, generator=torch.Generator().manual_seed(5))
    c = denoising_loss(model, latents, text, alphas_cumprod, generator=torch.Generator().manual_seed(6))
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


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.to_q, self.to_k, self.to_v = nn.Linear(8, 8, bias=False), nn.Linear(8, 8, bias=False), nn.Linear(8, 8, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(8, 8), nn.Dropout(0.0)])
        self.other = nn.Linear(8, 8)

    def forward(self, x):
        q, k, v = self.to_q(x), self.to_k(x), self.to_v(x)
        attention = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, -1)
        return self.other(self.to_out[0](attention @ v))


def test_lora_starts_as_identity_and_merges_exactly():
    torch.manual_seed(0)
    model = Attention()
    x = torch.randn(2, 5, 8)
    before = model(x)
    keys = set(model.state_dict())
    model.requires_grad_(False)
    params = inject_lora(model, rank=2, alpha=4)
    assert len(params) == 8  # down and up of to_q, to_k, to_v, to_out.0; "other" untouched
    assert isinstance(model.to_out[0], LoRALinear) and type(model.other) is nn.Linear
    assert torch.equal(model(x), before)  # B = 0 at start
    assert all(p.requires_grad for p in params)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora" not in n)
    with torch.no_grad():
        for p in params:
            p.normal_()
    adapted = model(x)
    assert (adapted - before).abs().max() > 1e-2
    assert merge_lora(model) == 4
    assert set(model.state_dict()) == keys
    merged = model(x)
    assert (merged - adapted).abs().max() <= 1e-5 * max(1, adapted.abs().max())


def test_lora_trains_only_the_adapters():
    torch.manual_seed(0)
    model = Attention()
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    model.requires_grad_(False)
    params = inject_lora(model, rank=2)
    optimizer = torch.optim.Adam(params, lr=1e-2)
    x, target = torch.randn(4, 5, 8), torch.randn(4, 5, 8)
    losses = []
    for _ in range(50):
        optimizer.zero_grad()
        loss = (model(x) - target).pow(2).mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in frozen.items())


def test_min_snr_weights_follow_the_paper():
    alphas_cumprod = alphas_cumprod_from_config(SD_SCHEDULER)
    timesteps = torch.tensor([0, 100, 500, 999])
    snr = (alphas_cumprod[timesteps] / (1 - alphas_cumprod[timesteps])).double()
    eps = min_snr_weights(timesteps, alphas_cumprod, 5.0, "epsilon")
    assert torch.allclose(eps.double(), torch.minimum(snr, torch.tensor(5.0, dtype=torch.float64)) / snr)
    assert eps[-1] == 1.0 and eps[0] < 0.01  # noisy steps keep weight 1, nearly clean ones are down-weighted
    v = min_snr_weights(timesteps, alphas_cumprod, 5.0, "v_prediction")
    assert torch.allclose(v.double(), torch.minimum(snr, torch.tensor(5.0, dtype=torch.float64)) / (snr + 1))


def test_weighted_loss_with_gamma_infinite_equals_plain_loss_and_bf16_autocast_is_close():
    torch.manual_seed(0)
    model = TinyDenoiser()
    latents, text = torch.randn(4, 4, 8, 8), torch.randn(4, 77, 8)
    alphas_cumprod = alphas_cumprod_from_config(SD_SCHEDULER)
    plain = denoising_loss(model, latents, text, alphas_cumprod, generator=torch.Generator().manual_seed(1))
    weighted = denoising_loss(model, latents, text, alphas_cumprod, generator=torch.Generator().manual_seed(1),
                              snr_gamma=float("inf"))
    assert torch.allclose(plain, weighted, rtol=1e-5)
    bf16 = denoising_loss(model, latents, text, alphas_cumprod, generator=torch.Generator().manual_seed(1),
                          autocast_dtype=torch.bfloat16)
    assert bf16.item() != plain.item() and abs(bf16.item() - plain.item()) < 0.05 * plain.item()


def test_offset_noise_adds_a_constant_per_image_and_channel():
    """Guttenberg 2023: noise + s * n(B, C, 1, 1). A model predicting zeros has loss E[noise²] = 1 + s²,
    and the offset is constant over each image and channel."""
    alphas_cumprod = alphas_cumprod_from_config(SD_SCHEDULER)
    latents, text = torch.zeros(64, 4, 16, 16), torch.zeros(64, 77, 8)
    seen = []

    def zero_model(noisy_latents, timesteps, text_embeddings):
        seen.append(noisy_latents / (1 - alphas_cumprod[timesteps]).sqrt().reshape(-1, 1, 1, 1))  # = the noise
        return torch.zeros_like(noisy_latents)

    plain = denoising_loss(zero_model, latents, text, alphas_cumprod, generator=torch.Generator().manual_seed(0))
    offset = denoising_loss(zero_model, latents, text, alphas_cumprod, generator=torch.Generator().manual_seed(0),
                            offset_noise=1.0)
    assert 0.9 < plain.item() < 1.1 and 1.7 < offset.item() < 2.3
    means = seen[1].mean((2, 3)) - seen[0].mean((2, 3))  # the same per-pixel draw under one seed: the offset
    assert torch.allclose(seen[1] - seen[0], means[..., None, None].expand_as(seen[0]), atol=1e-5)
    assert means.std() > 0.5
