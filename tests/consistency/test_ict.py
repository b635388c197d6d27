"""Improved consistency training (Song & Dhariwal 2023): the curriculum, the noise levels and their sampler,
the pseudo-Huber distance, and one training step on core's loop (the student trains; the target is stop-grad)."""

from __future__ import annotations

import math

import pytest
import torch
from distill_helpers import CAPTIONS, tiny_teacher, toy_data
from torch import nn

from fixative.consistency.ict import (
    consistency_training_loss,
    discretisation_steps,
    huber_c_for,
    noise_levels,
    pair_probabilities,
    pseudo_huber_per_sample,
    timesteps_of,
)
from fixative.consistency.objective import ConsistencyDistillation, DistillSettings
from fixative.core.errors import FixativeError
from fixative.core.finetune import FinetuneConfig, fine_tune
from fixative.core.parameterization import ConsistencyBoundary
from fixative.core.pipelines import encode_prompt
from fixative.core.schedulers import NoiseSchedule

pytestmark = pytest.mark.usefixtures("one_thread")

SD_SCHEDULE = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}


def schedule() -> NoiseSchedule:
    return NoiseSchedule.from_config(SD_SCHEDULE)


@pytest.mark.parametrize(
    "step, expected",
    [(0, 11), (99, 11), (100, 21), (250, 41), (399, 81), (400, 161), (699, 641), (700, 1281), (799, 1281)],
)
def test_curriculum_doubles_every_k_prime_steps(step, expected):
    # K = 800, s0 = 10, s1 = 1280: K' = ⌊800 / (log2 128 + 1)⌋ = 100; N = min(10 · 2^⌊k/100⌋, 1280) + 1
    assert discretisation_steps(step, 800, 10, 1280) == expected


def test_curriculum_of_a_short_run_and_bad_settings():
    assert [discretisation_steps(k, 3, 10, 40) for k in range(4)] == [11, 21, 41, 41]  # K' = max(1, ⌊3/3⌋)
    assert discretisation_steps(5, 4, 10, 10) == 11
    with pytest.raises(FixativeError):
        discretisation_steps(0, 10, 20, 10)


def test_noise_levels_span_the_schedule_with_karras_spacing():
    sched = schedule()
    sigmas = noise_levels(sched, 11)
    schedule_sigmas = sched.sigmas.double()
    assert sigmas.shape == (11,) and bool((sigmas[1:] > sigmas[:-1]).all())
    torch.testing.assert_close(sigmas[0], schedule_sigmas[0])
    torch.testing.assert_close(sigmas[-1], schedule_sigmas[-1])
    low, high = schedule_sigmas[0] ** (1 / 7), schedule_sigmas[-1] ** (1 / 7)
    torch.testing.assert_close(sigmas[3], (low + 3 / 10 * (high - low)) ** 7)  # Karras et al. 2022, Eq. 5
    timesteps = timesteps_of(sched, sigmas)
    assert timesteps[0] == 0 and abs(float(timesteps[-1]) - 999) < 1e-3
    torch.testing.assert_close(timesteps_of(sched, schedule_sigmas[[0, 17, 500]]), torch.tensor([0.0, 17.0, 500.0]))


def test_pair_probabilities_are_the_lognormal_mass_between_levels():
    sigmas = noise_levels(schedule(), 41)
    p = pair_probabilities(sigmas, -1.1, 2.0)
    assert p.shape == (40,) and abs(float(p.sum()) - 1) < 1e-12
    cdf = [0.5 * (1 + math.erf((math.log(float(s)) + 1.1) / (2.0 * math.sqrt(2)))) for s in sigmas]
    by_hand = torch.tensor([b - a for a, b in zip(cdf, cdf[1:])], dtype=torch.float64)
    torch.testing.assert_close(p, by_hand / by_hand.sum())
    # a larger P_mean moves the mass to larger noise levels
    index = torch.arange(40, dtype=torch.float64)
    assert float((pair_probabilities(sigmas, 0.5, 2.0) * index).sum()) > float((p * index).sum()) + 3


class Recorder(nn.Module):
    """A stand-in UNet: predicts ε = scale · x, and records each call's timesteps and whether autograd records."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(0.5))
        self.calls = []

    def forward(self, latents, timesteps, text_embeddings, timestep_cond=None):
        self.calls.append((timesteps.detach().clone(), torch.is_grad_enabled()))
        return self.scale * latents


def test_loss_draws_adjacent_levels_lognormally_and_stops_the_targets_gradient():
    sched = schedule()
    student = Recorder()
    latents = torch.randn(4000, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    text = torch.zeros(4000, 77, 8)
    loss = consistency_training_loss(
        student, latents, text, sched, step=0, total_steps=800, boundary=ConsistencyBoundary(),
        generator=torch.Generator().manual_seed(1),
    )  # fmt: skip
    (high_t, high_grad), (low_t, low_grad) = student.calls
    assert high_grad and not low_grad  # the student's call is recorded, the target's (same network) is not
    levels = timesteps_of(sched, noise_levels(sched, 11))  # N(0) = 11
    high_index = torch.searchsorted(levels, high_t - 1e-3)
    low_index = torch.searchsorted(levels, low_t - 1e-3)
    torch.testing.assert_close(levels[high_index], high_t)
    torch.testing.assert_close(levels[low_index], low_t)
    assert torch.equal(high_index, low_index + 1)  # (σ_i, σ_{i+1}) are neighbours
    share = torch.bincount(low_index, minlength=10).double() / len(low_index)
    expected = pair_probabilities(noise_levels(sched, 11))
    assert (share - expected).abs().max() < 0.03  # 4000 draws: ±3 standard errors of the largest share
    loss.backward()
    assert student.scale.grad is not None and student.scale.grad != 0


def test_pseudo_huber_per_sample_by_hand():
    prediction = torch.zeros(2, 4, 4, 4)
    target = torch.zeros(2, 4, 4, 4)
    target[0, 0, 0, :2] = torch.tensor([3.0, 4.0])  # ‖·‖ = 5
    c = huber_c_for(prediction)
    assert c == pytest.approx(0.00054 * 8)  # d = 64
    distances = pseudo_huber_per_sample(prediction, target, c)
    torch.testing.assert_close(distances, torch.tensor([math.sqrt(25 + c**2) - c, 0.0]))


def test_one_ict_step_trains_the_unet_without_a_teacher():
    model = tiny_teacher()
    unet = model.unet
    before = {n: v.clone() for n, v in unet.state_dict().items()}
    objective = ConsistencyDistillation(DistillSettings(method="ict", num_ddim_timesteps=10))
    fine_tune(model, toy_data(), FinetuneConfig(max_steps=1, batch_size=2, lr=1e-3, seed=0), objective, progress=False)
    assert model.unet is unet and objective.teacher is None and objective.step == 1
    moved = {n for n, v in unet.state_dict().items() if not torch.equal(before[n], v)}
    assert len(moved) > 0.9 * len(before)
    assert model.scheduler_config["_class_name"] == "LCMScheduler"
    assert objective.settings.huber_c is None  # 0.00054 √d, from the latents' size


def test_ict_loss_at_a_fixed_point_matches_the_formula(teacher):
    """λ(σ_i) d(f(x_{σ_{i+1}}), f(x_{σ_i})) computed by hand from the same draws."""
    sched = NoiseSchedule.from_config(teacher.scheduler_config)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    text = encode_prompt(teacher, CAPTIONS[:2], guidance=False)
    boundary = ConsistencyBoundary()
    with torch.no_grad():
        loss = consistency_training_loss(
            teacher.unet, latents, text, sched, 3, 40, boundary, generator=torch.Generator().manual_seed(5)
        )
    generator = torch.Generator().manual_seed(5)
    sigmas = noise_levels(sched, discretisation_steps(3, 40))  # K' = 5: N = 11
    index = torch.multinomial(pair_probabilities(sigmas), 2, replacement=True, generator=generator)
    noise = torch.randn(latents.shape, generator=generator)
    values = []
    with torch.no_grad():
        for sigma in (sigmas[index + 1], sigmas[index]):
            sigma = sigma.float()
            t = timesteps_of(sched, sigma)
            alpha, sigma_t = (1 / (1 + sigma**2)).sqrt().reshape(-1, 1, 1, 1), (sigma / (1 + sigma**2).sqrt())
            x = alpha * latents + sigma_t.reshape(-1, 1, 1, 1) * noise
            eps = teacher.unet(x, t, text)
            x0 = (x - sigma_t.reshape(-1, 1, 1, 1) * eps) / alpha
            scaled = 10 * t.reshape(-1, 1, 1, 1)
            values.append(0.25 / (scaled**2 + 0.25) * x + scaled / (scaled**2 + 0.25).sqrt() * x0)
    c = 0.00054 * math.sqrt(256)
    distance = ((values[0] - values[1]).pow(2).flatten(1).sum(1) + c**2).sqrt() - c
    by_hand = (distance / (sigmas[index + 1] - sigmas[index]).float()).mean()
    torch.testing.assert_close(loss, by_hand, rtol=1e-5, atol=1e-7)


def test_bad_ict_settings_are_one_line_errors():
    with pytest.raises(FixativeError, match="pseudo-Huber"):
        DistillSettings(method="ict", loss="l2")
    with pytest.raises(FixativeError, match="s0 <= s1"):
        DistillSettings(method="ict", curriculum_s0=20, curriculum_s1=10)
    assert DistillSettings(method="lcd").huber_c == 0.001
