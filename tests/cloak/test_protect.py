"""The optimiser and the methods on a tiny random model: the latent distance falls, every budget holds on the 8-bit
output, the same seed gives the same output, the final projection rescues a δ that breaks its budget."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from fixative.cloak import budget as metrics
from fixative.cloak.bounds import Budget, measure, parse_budget, satisfied
from fixative.cloak.finalize import finalize, quantize
from fixative.cloak.objectives import ASPLConfig, Objective
from fixative.cloak.optimise import OptimiserConfig, optimise
from fixative.cloak.protect import CloakConfig, cloak_pixels
from fixative.cloak.robust import RandomTransform, jpeg
from fixative.core.errors import FixativeError


def _config(method="photoguard", budget=Budget(linf=16 / 255, psnr=30, ssim=0.9), steps=40, **kwargs) -> CloakConfig:
    return CloakConfig(method=method, budget=budget, optimiser=OptimiserConfig(steps=steps, lr=0.01), **kwargs)


def _assert_on_8_bit_grid_within(stored, pixels, budget):
    assert torch.equal(stored, quantize(stored))
    assert satisfied(budget, measure(budget, stored, pixels, every=False)).all()


@pytest.mark.parametrize("budget", [Budget(linf=16 / 255, psnr=30, ssim=0.9), Budget(psnr=28)])
def test_encoder_attack_halves_the_latent_distance_within_every_budget(tiny_model, artwork_pixels, budget):
    stored, records = cloak_pixels(tiny_model, artwork_pixels, _config(budget=budget, steps=60))
    _assert_on_8_bit_grid_within(stored, artwork_pixels, budget)
    for record in records:
        assert record["latent_distance_after"] <= 0.5 * record["latent_distance_before"]
        assert record["budget_met"] and record["values"]["psnr"] >= budget.psnr


def test_glaze_aims_at_an_img2img_target_and_records_the_style(tiny_model, artwork_pixels):
    config = _config("glaze", steps=30)
    config.style_target.steps = 4
    stored, records = cloak_pixels(tiny_model, artwork_pixels, config, style="cubism")
    _assert_on_8_bit_grid_within(stored, artwork_pixels, config.budget)
    assert records[0]["target_style"] == "cubism"
    assert all(r["latent_distance_after"] < r["latent_distance_before"] for r in records)


def test_pooled_glaze_moves_the_pooled_latents_toward_and_past_the_target(tiny_model, artwork_pixels):
    from fixative.cloak.objectives import encode_mean, glaze

    target = artwork_pixels.flip(-1)
    pooled = glaze(tiny_model, artwork_pixels, target, "cubism", pool=64)  # wider than the latents: channel means
    assert pooled.details["latent_pool"] == 64
    means = encode_mean(tiny_model, artwork_pixels).mean((2, 3))
    expected = (means - encode_mean(tiny_model, target).mean((2, 3))).pow(2).mean(1)
    torch.testing.assert_close(pooled.target_distance(artwork_pixels), expected, rtol=1e-5, atol=1e-8)
    past = glaze(tiny_model, artwork_pixels, target, "cubism", pool=64, push=3.0)
    torch.testing.assert_close(past.target_distance(artwork_pixels), 9 * expected, rtol=1e-4, atol=1e-8)
    config = _config("glaze", budget=Budget(psnr=28), steps=30, latent_pool=64)
    config.style_target.steps = 4
    stored, records = cloak_pixels(tiny_model, artwork_pixels, config, style="cubism")
    _assert_on_8_bit_grid_within(stored, artwork_pixels, config.budget)
    assert all(r["latent_distance_after"] < 0.5 * r["latent_distance_before"] for r in records)
    assert records[0]["latent_pool"] == 64 and records[0]["target_push"] == 1.0


def test_the_semantic_term_lowers_the_denoising_loss_under_the_target_prompt(tiny_model, artwork_pixels):
    from fixative.cloak.objectives import _text_embeddings, encode_mean, glaze
    from fixative.core.schedulers import NoiseSchedule
    from fixative.core.training import denoising_losses

    prompt = "a painting by cubism"
    objective = glaze(tiny_model, artwork_pixels, artwork_pixels, "cubism", 64, 1.0, 1.0, prompt)

    def semantic(pixels: torch.Tensor, step: int) -> torch.Tensor:  # the objective less its latent distance
        return objective.loss(pixels, step) - objective.target_distance(pixels)

    with torch.no_grad():  # the term is the UNet's denoising loss under the prompt, step 0's noise
        latents = encode_mean(tiny_model, artwork_pixels)
        embeddings = _text_embeddings(tiny_model, [prompt] * latents.shape[0])
        schedule = NoiseSchedule.from_config(tiny_model.scheduler_config)
        generator = torch.Generator().manual_seed(0)
        direct = denoising_losses(tiny_model.unet, latents, embeddings, schedule, tiny_model.prediction_type, generator)
        torch.testing.assert_close(semantic(artwork_pixels, 0), direct)
    config = _config("glaze", budget=Budget(psnr=26), steps=25, latent_pool=64, semantic_weight=1.0)
    config.style_target.steps = 4
    stored, records = cloak_pixels(tiny_model, artwork_pixels, config, style="cubism")
    _assert_on_8_bit_grid_within(stored, artwork_pixels, config.budget)
    assert records[0]["semantic_weight"] == 1.0 and records[0]["semantic_prompt"] == prompt
    with torch.no_grad():  # over 8 fixed noise draws, the cloak lowered it
        before = torch.stack([semantic(artwork_pixels, step) for step in range(8)]).mean()
        after = torch.stack([semantic(stored, step) for step in range(8)]).mean()
    assert after < before


def test_glaze_without_a_style_is_a_clear_error(tiny_model, artwork_pixels):
    with pytest.raises(FixativeError, match="target style"):
        cloak_pixels(tiny_model, artwork_pixels, _config("glaze"))


def test_the_same_seed_gives_the_same_output(tiny_model, artwork_pixels):
    config = _config("mist", steps=5, seed=3)
    first, _ = cloak_pixels(tiny_model, artwork_pixels, config)
    second, _ = cloak_pixels(tiny_model, artwork_pixels, config)
    other, _ = cloak_pixels(tiny_model, artwork_pixels, _config("mist", steps=5, seed=4))
    assert torch.equal(first, second) and not torch.equal(first, other)


def test_mist_raises_the_denoising_loss_and_approaches_the_pattern(tiny_model, artwork_pixels):
    config = _config("mist", steps=30)
    stored, records = cloak_pixels(tiny_model, artwork_pixels, config)
    _assert_on_8_bit_grid_within(stored, artwork_pixels, config.budget)
    assert all(r["latent_distance_after"] < r["latent_distance_before"] for r in records)


def test_anti_dreambooth_alternates_with_surrogate_fine_tuning(tiny_model, artwork_pixels, monkeypatch):
    from fixative.cloak import objectives

    calls = []
    real_train_step = objectives.train_step
    monkeypatch.setattr(objectives, "train_step", lambda *a, **k: calls.append(1) or real_train_step(*a, **k))
    unet_before = {k: v.clone() for k, v in tiny_model.unet.state_dict().items()}
    config = _config("anti-dreambooth", steps=6, aspl=ASPLConfig(every=3, surrogate_steps=2))
    stored, records = cloak_pixels(tiny_model, artwork_pixels, config)
    _assert_on_8_bit_grid_within(stored, artwork_pixels, config.budget)
    # a refresh at the first step and after steps 3 and 6, each 2 steps on the clean copy + 2 on the surrogate
    assert len(calls) == 3 * 4
    assert records[0]["latent_distance_before"] is None and not torch.equal(stored, artwork_pixels)
    assert all(torch.equal(v, tiny_model.unet.state_dict()[k]) for k, v in unet_before.items())  # model untouched


def test_the_batch_wide_surrogate_changes_only_the_surrogate(tiny_model, artwork_pixels, monkeypatch):
    from fixative.cloak import objectives

    calls = []
    real_train_step = objectives.train_step
    monkeypatch.setattr(
        objectives,
        "train_step",
        lambda unet, o, latents, *a, **k: calls.append(latents.shape) or real_train_step(unet, o, latents, *a, **k),
    )
    unet_before = {k: v.clone() for k, v in tiny_model.unet.state_dict().items()}
    surrogate = objectives.Surrogate(tiny_model, ASPLConfig(warmup_steps=3, warmup_batch=1), seed=0)
    small = artwork_pixels[:, :, :16, :16]
    surrogate.warm_up([artwork_pixels, small])  # two sizes: chunks of one image, in turn
    assert [tuple(shape) for shape in calls] == [(1, 4, 12, 16), (1, 4, 12, 16), (1, 4, 8, 8)]
    assert len(surrogate.warmup_losses) == 3
    assert any(not torch.equal(v, surrogate.unet.state_dict()[k]) for k, v in unet_before.items())
    assert all(torch.equal(v, tiny_model.unet.state_dict()[k]) for k, v in unet_before.items())  # model untouched
    # every = 0: the warmed-up surrogate is attacked as it is (FSMG); no fine-tuning during the attack
    calls.clear()
    fork_before = {k: v.clone() for k, v in surrogate.unet.state_dict().items()}
    config = _config("anti-dreambooth", steps=3, aspl=ASPLConfig(every=0, warmup_steps=3))
    stored, records = cloak_pixels(tiny_model, artwork_pixels, config)
    assert len(calls) == 3 and records[0]["surrogate_warmup_steps"] == 3 and len(records[0]["surrogate_warmup_loss"])
    objective = objectives.anti_dreambooth(tiny_model, artwork_pixels, ASPLConfig(every=1), 0, surrogate)
    objective.loss(artwork_pixels, 0)
    objective.after_step(artwork_pixels, 0)
    assert all(torch.equal(v, surrogate.unet.state_dict()[k]) for k, v in fork_before.items())  # attacks fork it


def test_a_batch_wide_surrogate_gives_each_image_the_same_cloak_in_any_order(tiny_model):
    from fixative.cloak import cloak

    rng = np.random.default_rng(0)
    images = [Image.fromarray((rng.random((20, 24, 3)) * 255).astype(np.uint8)) for _ in range(2)]
    config = _config("anti-dreambooth", steps=2, aspl=ASPLConfig(every=1, surrogate_steps=1, warmup_steps=2))
    forward = cloak(images, tiny_model, config)
    backward = cloak(images[::-1], tiny_model, config)
    assert np.array_equal(np.asarray(forward[0].image), np.asarray(backward[1].image))
    assert np.array_equal(np.asarray(forward[1].image), np.asarray(backward[0].image))
    assert not np.array_equal(np.asarray(forward[0].image), np.asarray(images[0]))


def test_signed_pgd_with_momentum_and_eot_keep_the_budget(tiny_model, artwork_pixels):
    budget = Budget(linf=8 / 255)
    config = CloakConfig(
        method="photoguard",
        budget=budget,
        robust=("jpeg", "resize", "blur", "noise"),
        optimiser=OptimiserConfig(steps=20, lr=1 / 255, optimiser="pgd"),
    )
    stored, records = cloak_pixels(tiny_model, artwork_pixels, config)
    _assert_on_8_bit_grid_within(stored, artwork_pixels, budget)
    assert metrics.linf(stored, artwork_pixels).max() > 4 / 255  # the steps went somewhere
    assert all(r["latent_distance_after"] < r["latent_distance_before"] for r in records)


class _CountingMetric:
    """A stand-in LPIPS: the mean absolute change per image, counting the backward passes through it."""

    backward_calls = 0

    def __call__(self, pixels, reference):
        metric = self

        class Counted(torch.autograd.Function):
            @staticmethod
            def forward(ctx, value):
                return value.clone()

            @staticmethod
            def backward(ctx, grad):
                metric.backward_calls += 1
                return grad

        return Counted.apply((pixels - reference).abs().flatten(1).mean(1))


def test_the_soft_penalty_is_differentiated_only_while_a_bound_is_broken(artwork_pixels):
    target = torch.rand(artwork_pixels.shape, generator=torch.Generator().manual_seed(1))
    objective = Objective(loss=lambda pixels, step: (pixels - target).pow(2).flatten(1).mean(1), target_distance=None)
    config = OptimiserConfig(steps=10, lr=0.01)
    loose, strict = _CountingMetric(), _CountingMetric()
    delta_loose, _ = optimise(artwork_pixels, objective, Budget(lpips=1.0), config, loose)
    delta_free, _ = optimise(artwork_pixels, objective, Budget(linf=1.0), config)
    assert loose.backward_calls == 0 and torch.equal(delta_loose, delta_free)
    delta_strict, _ = optimise(artwork_pixels, objective, Budget(lpips=1e-4), config, strict)
    assert strict.backward_calls == 9  # every step but the first (δ = 0 breaks no bound)
    assert not torch.allclose(delta_strict, delta_free)


def test_final_projection_scales_a_delta_that_breaks_the_budget(artwork_pixels):
    budget = Budget(psnr=35, ssim=0.97)
    delta = 0.2 * torch.randn(artwork_pixels.shape, generator=torch.Generator().manual_seed(0))
    stored, scale, met = finalize(artwork_pixels, delta, budget)
    assert met.all() and (scale < 1).all() and (scale > 0).all()
    _assert_on_8_bit_grid_within(stored, artwork_pixels, budget)
    # as large as the bisection allows: twice the scale breaks a bound
    larger = quantize(artwork_pixels + (2 * scale).view(-1, 1, 1, 1) * delta)
    assert not satisfied(budget, measure(budget, larger, artwork_pixels, every=False)).any()
    unchanged, scale_one, _ = finalize(artwork_pixels, delta * 1e-3, budget)
    assert (scale_one == 1).all()


def test_budget_parsing():
    budget = parse_budget(["linf=16/255", "psnr=32", "ssim=0.95"])
    assert budget == Budget(linf=16 / 255, psnr=32, ssim=0.95)
    assert "16/255" in budget.describe()
    for bad in (["linf"], ["size=3"], ["psnr=abc"], ["ssim=2"]):
        with pytest.raises(FixativeError):
            parse_budget(bad)
    with pytest.raises(FixativeError, match="at least one bound"):
        Budget()


def test_differentiable_jpeg_is_close_to_pillows():
    smooth = torch.nn.functional.avg_pool2d(
        torch.rand(1, 3, 40, 48, generator=torch.Generator().manual_seed(0)), 5, 1, 2
    )
    smooth = quantize(smooth)
    buffer = io.BytesIO()
    Image.fromarray((smooth[0].permute(1, 2, 0) * 255).round().byte().numpy()).save(
        buffer, "JPEG", quality=75, subsampling=0
    )
    pillow = torch.from_numpy(np.asarray(Image.open(buffer)).copy()).permute(2, 0, 1)[None].float() / 255
    ours = jpeg(smooth.requires_grad_(True), 75)
    assert (ours - pillow).abs().mean() < 0.3 * (smooth - pillow).abs().mean()
    ours.sum().backward()
    assert torch.isfinite(smooth.grad).all()
    transform = RandomTransform(("jpeg", "resize", "blur", "noise"), seed=0)
    assert all(transform(smooth.detach(), step).shape == smooth.shape for step in range(12))


@pytest.mark.parametrize("schedule", ["constant", "cosine", "linear"])
def test_signed_pgd_steps_follow_the_schedule(artwork_pixels, schedule):
    target = torch.rand(artwork_pixels.shape, generator=torch.Generator().manual_seed(1))
    objective = Objective(loss=lambda pixels, step: (pixels - target).pow(2).flatten(1).mean(1), target_distance=None)
    deltas = []
    config = OptimiserConfig(steps=8, lr=0.01, optimiser="pgd", schedule=schedule)
    objective.after_step = lambda pixels, step: deltas.append(pixels - artwork_pixels)
    optimise(artwork_pixels, objective, Budget(linf=1.0), config)
    moves = [d.abs().amax().item() for d in torch.stack([torch.zeros_like(deltas[0]), *deltas]).diff(dim=0)]
    expected = {
        "constant": [0.01] * 8,
        "cosine": [0.01 * (1 + math.cos(math.pi * t / 8)) / 2 for t in range(8)],
        "linear": [0.01 * (1 - t / 8) for t in range(8)],
    }[schedule]
    assert moves == pytest.approx(expected, abs=1e-6)


def test_an_unknown_schedule_is_a_one_line_error(artwork_pixels):
    objective = Objective(loss=lambda pixels, step: pixels.flatten(1).mean(1), target_distance=None)
    with pytest.raises(FixativeError, match="schedule must be one of"):
        optimise(artwork_pixels, objective, Budget(linf=1.0), OptimiserConfig(steps=1, schedule="step"))


def test_the_plateau_stop_waits_for_the_loss_to_stop_improving(artwork_pixels):
    # the loss falls by 1 a step for 15 steps, then stays: 5 steps without improvement end the run after step 20
    objective = Objective(
        loss=lambda pixels, step: pixels.flatten(1).sum(1) * 0 + float(max(15 - step, 0)), target_distance=None
    )
    _, info = optimise(artwork_pixels, objective, Budget(linf=1.0), OptimiserConfig(steps=100, plateau_steps=5))
    assert info["steps"] == 21


def test_a_per_image_semantic_prompt_is_each_images_caption_in_the_target_style(tiny_model, artwork_pixels):
    from fixative.cloak.objectives import _text_embeddings, encode_mean
    from fixative.cloak.protect import make_objective
    from fixative.core.schedulers import NoiseSchedule
    from fixative.core.training import denoising_losses

    config = _config("glaze", latent_pool=64, semantic_weight=1.0, semantic_prompt="{caption} by {style}")
    config.style_target.steps = 2
    captions = ["a painting of a cat", "a painting of a boat"]
    objective, _ = make_objective(tiny_model, artwork_pixels, config, "cubism", captions=captions)
    prompts = ["a painting of a cat by cubism", "a painting of a boat by cubism"]
    assert objective.details["semantic_prompt"] == prompts
    with torch.no_grad():  # image i's term is the UNet's loss under prompt i, not under the other image's
        latents = encode_mean(tiny_model, artwork_pixels)
        schedule = NoiseSchedule.from_config(tiny_model.scheduler_config)

        def direct(texts):
            generator = torch.Generator().manual_seed(0)
            embeddings = _text_embeddings(tiny_model, texts)
            return denoising_losses(
                tiny_model.unet, latents, embeddings, schedule, tiny_model.prediction_type, generator
            )

        semantic = objective.loss(artwork_pixels, 0) - objective.target_distance(artwork_pixels)
        torch.testing.assert_close(semantic, direct(prompts))
        assert not torch.allclose(semantic, direct(prompts[::-1]))
    with pytest.raises(FixativeError, match=r"names \{caption\}, but an image has no caption"):
        make_objective(tiny_model, artwork_pixels, config, "cubism", captions=["a painting of a cat", None])
    config.semantic_prompt = "{caption} by {artist}"
    with pytest.raises(FixativeError, match=r"only \{style\} and \{caption\}"):
        make_objective(tiny_model, artwork_pixels, config, "cubism", captions=captions)
