"""The per-step computation of latent consistency distillation, against hand computations."""

from __future__ import annotations

import pytest
import torch
from distill_helpers import tiny_teacher

from fixative.consistency.lcd import (
    LCDSettings,
    SkippingSchedule,
    consistency_distillation_loss,
    consistency_function,
    guidance_condition,
    pseudo_huber,
    student_from_teacher,
    teacher_ddim_step,
)
from fixative.core.errors import FixativeError
from fixative.core.pipelines import encode_prompt, generate, guidance_scale_embedding, predict_noise_cfg
from fixative.core.schedulers import NoiseSchedule

pytestmark = pytest.mark.usefixtures("one_thread")


def latents_like(model, batch=2, seed=1):
    size = model.unet.config.sample_size
    return torch.randn(batch, 4, size, size, generator=torch.Generator().manual_seed(seed))


def test_skipping_schedule_pairs_are_k_apart_and_start_on_the_ddim_timesteps():
    schedule = SkippingSchedule(NoiseSchedule(torch.linspace(0.99, 0.01, 1000)), num_ddim_timesteps=50)
    assert schedule.skip == 20
    assert schedule.timesteps.tolist() == list(range(19, 1000, 20))
    start, end = schedule.draw(4096, torch.Generator().manual_seed(0))
    assert set(start.tolist()) == set(range(19, 1000, 20))  # every DDIM timestep drawn
    assert torch.equal(end, (start - 20).clamp(min=0))
    assert set(end[start == 19].tolist()) == {0}
    with pytest.raises(FixativeError, match="between 1 and 1000"):
        SkippingSchedule(NoiseSchedule(torch.ones(1000)), num_ddim_timesteps=0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_boundary_condition_holds_exactly(prediction_type):
    """f(x, t = 0) = x bit for bit, whatever the network predicts."""
    model = tiny_teacher(prediction_type)
    student = student_from_teacher(model.unet, time_cond_proj_dim=16)
    torch.nn.init.normal_(student.time_embedding.cond_proj.weight)
    alphas_cumprod = NoiseSchedule.from_config(model.scheduler_config).alphas_cumprod
    latents = latents_like(model)
    text_embeddings = encode_prompt(model, ["a cat", "a dog"], guidance=False)
    timesteps = torch.zeros(2, dtype=torch.long)
    condition = guidance_condition(student, torch.tensor([3.0, 9.0]), latents)
    with torch.no_grad():
        output = student(latents, timesteps, text_embeddings, timestep_cond=condition)
        consistency = consistency_function(
            output, latents, timesteps, alphas_cumprod, prediction_type, LCDSettings().boundary
        )
    assert output.abs().mean() > 0.1
    assert torch.equal(consistency, latents)
    # and away from the boundary it is not the identity
    later = consistency_function(
        output, latents, torch.tensor([499, 999]), alphas_cumprod, prediction_type, LCDSettings().boundary
    )
    assert (later - latents).abs().mean() > 0.1


def test_consistency_function_equals_the_scalings_by_hand(teacher):
    alphas_cumprod = NoiseSchedule.from_config(teacher.scheduler_config).alphas_cumprod
    latents, output = latents_like(teacher, 1, 2), latents_like(teacher, 1, 3)
    t = 259
    scaled = 10.0 * t
    c_skip, c_out = 0.25 / (scaled**2 + 0.25), scaled / (scaled**2 + 0.25) ** 0.5
    x0 = (latents - (1 - alphas_cumprod[t]).sqrt() * output) / alphas_cumprod[t].sqrt()
    ours = consistency_function(output, latents, torch.tensor([t]), alphas_cumprod, "epsilon", LCDSettings().boundary)
    torch.testing.assert_close(ours, c_skip * latents + c_out * x0, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_teacher_ddim_step_equals_a_hand_computation(prediction_type):
    """At a fixed point (x at t_{n+k} = 519, t_n = 499, w = 4): the guided teacher's DDIM step, by hand from
    LCM Sec. 4.2 (ε̂ = (1 + w) ε_c − w ε_∅) and DDIM Eq. 12 (η = 0)."""
    model = tiny_teacher(prediction_type)
    alphas_cumprod = NoiseSchedule.from_config(model.scheduler_config).alphas_cumprod
    schedule = SkippingSchedule(NoiseSchedule(alphas_cumprod), 50)
    latents = latents_like(model, 1)
    text = encode_prompt(model, ["a lighthouse"], guidance=False)
    uncond = encode_prompt(model, [""], guidance=False)
    t, t_prev, w = 519, 499, 4.0
    assert t in schedule.timesteps and t - schedule.skip == t_prev
    with torch.no_grad():
        out_c, out_u = model.unet(latents, t, text), model.unet(latents, t, uncond)
        a_t, a_prev = alphas_cumprod[t].item(), alphas_cumprod[t_prev].item()
        if prediction_type == "epsilon":
            eps_c, eps_u = out_c, out_u
        else:  # ε = √ᾱ v + √(1 − ᾱ) x
            eps_c, eps_u = (a_t**0.5 * out + (1 - a_t) ** 0.5 * latents for out in (out_c, out_u))
        x0_c, x0_u = ((latents - (1 - a_t) ** 0.5 * eps) / a_t**0.5 for eps in (eps_c, eps_u))
        eps, x0 = (1 + w) * eps_c - w * eps_u, (1 + w) * x0_c - w * x0_u
        expected = a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * eps
        ours = teacher_ddim_step(
            model.unet,
            latents,
            torch.tensor([t]),
            torch.tensor([t_prev]),
            text,
            uncond,
            torch.tensor([w]),
            alphas_cumprod,
            prediction_type,
        )
    assert (ours - latents).abs().mean() > 1e-3
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_guidance_convention_is_ordinary_cfg_at_one_plus_w(teacher):
    """Teacher side: guiding at LCM's w is core's classifier-free guidance at scale 1 + w; student side: the
    embedding trained for w is the one ``generate`` feeds at guidance scale 1 + w (as diffusers'
    LatentConsistencyModelPipeline does)."""
    alphas_cumprod = NoiseSchedule.from_config(teacher.scheduler_config).alphas_cumprod
    latents = latents_like(teacher, 1)
    w, t = 6.0, 799
    with torch.no_grad():
        guided = predict_noise_cfg(teacher, latents, t, encode_prompt(teacher, ["a cat"]), guidance_scale=1 + w)
        # a DDIM step to t = ᾱ^{-1}... compare through the step: same ε̂ gives the same x̂
        a_t, a_prev = alphas_cumprod[t], alphas_cumprod[t - 20]
        x0 = (latents - (1 - a_t).sqrt() * guided) / a_t.sqrt()
        expected = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * guided
        ours = teacher_ddim_step(
            teacher.unet,
            latents,
            torch.tensor([t]),
            torch.tensor([t - 20]),
            encode_prompt(teacher, ["a cat"], guidance=False),
            encode_prompt(teacher, [""], guidance=False),
            torch.tensor([w]),
            alphas_cumprod,
            "epsilon",
        )
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)

    teacher.unet = student_from_teacher(teacher.unet, time_cond_proj_dim=16)
    fed = []
    teacher.unet.time_embedding.cond_proj.register_forward_hook(lambda module, args, out: fed.append(args[0]))
    generate(
        teacher, "a cat", num_inference_steps=1, guidance_scale=1 + w, scheduler="lcm", output="latents", progress=False
    )
    torch.testing.assert_close(fed[0], guidance_condition(teacher.unet, torch.tensor([w]), latents))
    assert not torch.allclose(fed[0], guidance_scale_embedding(torch.tensor([1 + w]), 16))


def test_untrained_student_is_the_teacher_and_a_distilled_teacher_is_refused(teacher):
    student = student_from_teacher(teacher.unet, time_cond_proj_dim=16)
    latents = latents_like(teacher)
    text = encode_prompt(teacher, ["a", "b"], guidance=False)
    condition = guidance_condition(student, torch.tensor([3.0, 12.0]), latents)
    with torch.no_grad():
        assert torch.equal(student(latents, 499, text, timestep_cond=condition), teacher.unet(latents, 499, text))
    with pytest.raises(FixativeError, match="already embeds a guidance scale"):
        student_from_teacher(student)


def test_pseudo_huber_by_hand():
    a, b = torch.tensor([0.0, 1.0, -3.0]), torch.tensor([0.0, 0.0, 1.0])
    c = 0.001
    expected = ((0.0 + c**2) ** 0.5 - c + (1 + c**2) ** 0.5 - c + (16 + c**2) ** 0.5 - c) / 3
    assert pseudo_huber(a, b, c).item() == pytest.approx(expected, rel=1e-6)
    assert pseudo_huber(a, a).item() == 0.0


def algorithm_1_by_hand(teacher, student, target, read_student):
    """LCM Algorithm 1 composed by hand at generator seed 5 (t_{n+k}, noise and w drawn in that order, 10 DDIM
    timesteps, L2): the loss, and what consistency_distillation_loss needs to compute it again.
    read_student(output, x, t): the consistency function of the student's and the target's outputs."""
    alphas_cumprod = NoiseSchedule.from_config(teacher.scheduler_config).alphas_cumprod
    latents = latents_like(teacher, 3)
    text = encode_prompt(teacher, ["a", "b", "c"], guidance=False)
    uncond = encode_prompt(teacher, [""], guidance=False)
    generator = torch.Generator().manual_seed(5)
    index = torch.randint(0, 10, (3,), generator=generator)
    noise = torch.randn(latents.shape, generator=generator)
    w = 3.0 + 12.0 * torch.rand(3, generator=generator)
    start = index * 100 + 99
    end = (start - 100).clamp(min=0)
    a_start = alphas_cumprod[start].reshape(-1, 1, 1, 1)
    noisy = a_start.sqrt() * latents + (1 - a_start).sqrt() * noise
    condition = guidance_scale_embedding(w, 16)
    with torch.no_grad():
        prediction = read_student(student(noisy, start, text, timestep_cond=condition), noisy, start)
        x_prev = teacher_ddim_step(teacher.unet, noisy, start, end, text, uncond, w, alphas_cumprod, "epsilon")
        target_value = read_student(target(x_prev, end, text, timestep_cond=condition), x_prev, end)
    expected = ((prediction - target_value) ** 2).mean()

    def ours(student_prediction_type=None):
        with torch.no_grad():
            return consistency_distillation_loss(
                student,
                teacher.unet,
                target,
                latents,
                text,
                uncond,
                SkippingSchedule(NoiseSchedule(alphas_cumprod), 10),
                LCDSettings(num_ddim_timesteps=10, loss="l2"),
                generator=torch.Generator().manual_seed(5),
                student_prediction_type=student_prediction_type,
            )

    return expected, ours


def test_distillation_loss_is_algorithm_1_with_draws_in_order(teacher):
    """The loss equals the composition by hand, with t_{n+k}, noise and w drawn in that order."""
    alphas_cumprod = NoiseSchedule.from_config(teacher.scheduler_config).alphas_cumprod
    boundary = LCDSettings().boundary
    student = student_from_teacher(teacher.unet, time_cond_proj_dim=16)
    torch.nn.init.normal_(student.time_embedding.cond_proj.weight, std=0.1)
    target = student_from_teacher(teacher.unet, time_cond_proj_dim=16)  # a different target network

    def as_epsilon(output, x, t):
        return consistency_function(output, x, t, alphas_cumprod, "epsilon", boundary)

    expected, ours = algorithm_1_by_hand(teacher, student, target, as_epsilon)
    assert ours().item() == pytest.approx(expected.item(), rel=1e-6)
    assert ours().item() > 0


def test_a_student_with_its_own_parameterisation_reads_its_output_as_such(teacher):
    """With student_prediction_type, the student's and the target's outputs are read as v (x0 = α x − σ v), the
    teacher's still as ε: the loss equals that composition by hand and differs from the all-ε one."""
    alphas_cumprod = NoiseSchedule.from_config(teacher.scheduler_config).alphas_cumprod
    boundary = LCDSettings().boundary
    student = student_from_teacher(teacher.unet, time_cond_proj_dim=16)

    def as_v(output, x, t):  # c_skip x + c_out (α x − σ v), by hand
        a = alphas_cumprod[t].reshape(-1, 1, 1, 1)
        return boundary.denoise(a.sqrt() * x - (1 - a).sqrt() * output, x, t.reshape(-1, 1, 1, 1))

    expected, ours = algorithm_1_by_hand(teacher, student, student, as_v)
    assert ours("v_prediction").item() == pytest.approx(expected.item(), rel=1e-6)
    assert ours().item() != pytest.approx(ours("v_prediction").item(), rel=1e-3)


def test_bad_settings_are_one_line_errors():
    with pytest.raises(FixativeError, match="unknown loss"):
        LCDSettings(loss="l1")
    with pytest.raises(FixativeError, match="w_min <= w_max"):
        LCDSettings(w_min=5, w_max=3)
