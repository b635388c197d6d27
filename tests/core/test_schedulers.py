"""Parity of fixative's schedulers with diffusers' on full sampling loops.

diffusers' schedulers are built the way a user has them: the config dict is written to a
scheduler_config.json and loaded with ``SchedulerClass.from_pretrained`` (DESIGN.md: from_config treats
in-memory defaults differently). The "model" is a fixed deterministic function of (latents, t), so the
loops differ only by the scheduler arithmetic and the noise draws.
"""

import itertools
import json
import logging
import math

import diffusers
import pytest
import torch
from diffusers.utils.torch_utils import randn_tensor as diffusers_randn_tensor
from parity import assert_close

from fixative.core.errors import FixativeError
from fixative.core.parameterization import ConsistencyBoundary, EpsilonPrediction, SamplePrediction, VPrediction
from fixative.core.schedulers import SCHEDULERS, make_scheduler, randn_tensor, to_diffusers

logging.getLogger("diffusers").setLevel(logging.ERROR)
# diffusers' own numpy-2 and config-access deprecations, not ours
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")

SHAPE = (1, 4, 8, 8)
STEPS = 10
SD_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "set_alpha_to_one": False,
    "clip_sample": False,
}
BETAS = {  # beta_schedule -> the (beta_start, beta_end) it is used with
    "linear": (0.0001, 0.02),
    "scaled_linear": (0.00085, 0.012),
    "squaredcos_cap_v2": (0.0001, 0.02),
}
SPACINGS = ("leading", "trailing", "linspace")
DIFFUSERS_CLASS = {
    "ddim": diffusers.DDIMScheduler,
    "ddpm": diffusers.DDPMScheduler,
    "euler": diffusers.EulerDiscreteScheduler,
    "euler-a": diffusers.EulerAncestralDiscreteScheduler,
    "dpm++2m": diffusers.DPMSolverMultistepScheduler,
    "lcm": diffusers.LCMScheduler,
}
PREDICTIONS = {
    "ddim": ("epsilon", "v_prediction", "sample"),
    "ddpm": ("epsilon", "v_prediction", "sample"),
    "euler": ("epsilon", "v_prediction", "sample"),
    "euler-a": ("epsilon", "v_prediction"),
    "dpm++2m": ("epsilon", "v_prediction", "sample"),
    "lcm": ("epsilon", "v_prediction", "sample"),
}


def diffusers_scheduler(name, config, tmp_path):
    (tmp_path / "scheduler_config.json").write_text(json.dumps(config))
    return DIFFUSERS_CLASS[name].from_pretrained(tmp_path)


def fake_model(latents, t):
    """A deterministic stand-in for the UNet: 0.1 x + a fixed pattern that changes with t."""
    pattern = torch.linspace(-1.0, 1.0, math.prod(SHAPE)).reshape(SHAPE).flip(-1)
    return 0.1 * latents + pattern * torch.cos(torch.as_tensor(t, dtype=torch.float32) / 300.0)


def sample_loop(scheduler, timesteps, latents, ours, **step_kwargs):
    """Run the loop; return the latents and the x0 estimate after every step."""
    generator = torch.Generator().manual_seed(7)
    trajectory, estimates = [], []
    for t in timesteps:
        model_output = fake_model(scheduler.scale_model_input(latents, t), t)
        if ours:
            latents = scheduler.step(model_output, t, latents, generator=generator)
            estimate = scheduler.pred_original_sample
        else:
            out = scheduler.step(model_output, t, latents, generator=generator, return_dict=False, **step_kwargs)
            latents = out[0]
            estimate = out[1] if len(out) > 1 else scheduler.model_outputs[-1]  # DPM keeps its x0 there
        trajectory.append(latents)
        estimates.append(estimate)
    return trajectory, estimates


def full_loop_parity(name, config, tmp_path, steps=STEPS, eta=0.0):
    ours = make_scheduler(name, config, eta=eta)
    theirs = diffusers_scheduler(name, config, tmp_path)
    ours.set_timesteps(steps)
    theirs.set_timesteps(steps)
    assert ours.timesteps.dtype == theirs.timesteps.dtype
    torch.testing.assert_close(ours.timesteps, theirs.timesteps, atol=0, rtol=0)
    if hasattr(ours, "sigmas"):
        torch.testing.assert_close(ours.sigmas, theirs.sigmas, atol=0, rtol=1e-6)
    torch.testing.assert_close(torch.as_tensor(ours.init_noise_sigma), torch.as_tensor(theirs.init_noise_sigma))
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    ours_run = sample_loop(ours, ours.timesteps, noise * ours.init_noise_sigma, ours=True)
    kwargs = {"eta": eta} if name == "ddim" else {}
    theirs_run = sample_loop(theirs, theirs.timesteps, noise * theirs.init_noise_sigma, ours=False, **kwargs)
    for mine, reference in zip(ours_run[0], theirs_run[0]):
        assert_close(mine, reference, 1e-5)
    for mine, reference in zip(ours_run[1], theirs_run[1]):
        assert_close(mine, reference, 1e-5)


def schedule_config(beta_schedule, spacing, prediction, zero_snr, **extra):
    beta_start, beta_end = BETAS[beta_schedule]
    return {
        "num_train_timesteps": 1000,
        "beta_start": beta_start,
        "beta_end": beta_end,
        "beta_schedule": beta_schedule,
        "timestep_spacing": spacing,
        "prediction_type": prediction,
        "rescale_betas_zero_snr": zero_snr,
        **extra,
    }


def cases(name, extra_axes):
    """Every combination of beta schedule x spacing x prediction type x zero-SNR x the solver's own axes
    (steps_offset only where it acts: diffusers adds it to "leading" timesteps alone)."""
    keys = list(extra_axes)
    for beta, spacing, prediction, zero_snr, *values in itertools.product(
        BETAS, SPACINGS, PREDICTIONS[name], (False, True), *extra_axes.values()
    ):
        if spacing != "leading" and dict(zip(keys, values)).get("steps_offset", 0) != 0:
            continue
        yield pytest.param(
            name,
            schedule_config(beta, spacing, prediction, zero_snr, **dict(zip(keys, values))),
            id=f"{name}-{beta}-{spacing}-{prediction}-{'zsnr' if zero_snr else 'snr'}-"
            + "-".join(f"{k}={v}" for k, v in zip(keys, values)),
        )


ALL_CASES = [
    *cases("ddim", {"steps_offset": (0, 1), "set_alpha_to_one": (True, False), "clip_sample": (False,)}),
    *cases("ddpm", {"steps_offset": (0, 1), "clip_sample": (False,)}),
    *cases("euler", {"steps_offset": (0, 1), "use_karras_sigmas": (False, True)}),
    *cases("euler-a", {"steps_offset": (0, 1)}),
    # Karras sigmas on the cosine schedule repeat t = 998 and diffusers' dpm++2m then fails (see below)
    *[
        case
        for case in cases("dpm++2m", {"steps_offset": (0, 1), "use_karras_sigmas": (False, True)})
        if not ("squaredcos" in case.id and "karras_sigmas=True" in case.id)
    ],
    # LCM ignores timestep_spacing and steps_offset: its timesteps come from original_inference_steps
    *[case for case in cases("lcm", {}) if "leading" in case.id],
]


@pytest.mark.parametrize("name, config", ALL_CASES)
def test_sampling_loop_matches_diffusers(name, config, tmp_path):
    full_loop_parity(name, config, tmp_path)


@pytest.mark.parametrize("prediction", PREDICTIONS["dpm++2m"])
@pytest.mark.parametrize("spacing", SPACINGS)
def test_dpm_karras_on_the_cosine_schedule_runs_where_diffusers_skips_a_step(prediction, spacing, tmp_path):
    """The timesteps repeat 998; diffusers starts at the second 998 and indexes past its sigmas at the end.
    fixative starts at the first, which is what diffusers computes when told to (set_begin_index(0))."""
    config = schedule_config("squaredcos_cap_v2", spacing, prediction, False, use_karras_sigmas=True)
    ours, theirs = make_scheduler("dpm++2m", config), diffusers_scheduler("dpm++2m", config, tmp_path)
    ours.set_timesteps(STEPS)
    theirs.set_timesteps(STEPS)
    assert (ours.timesteps[:2] == 998).all()
    theirs.set_begin_index(0)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    for mine, reference in zip(
        sample_loop(ours, ours.timesteps, noise, ours=True)[0],
        sample_loop(theirs, theirs.timesteps, noise, ours=False)[0],
    ):
        assert_close(mine, reference, 1e-5)


@pytest.mark.parametrize("name", ["ddim", "ddpm", "lcm"])
@pytest.mark.parametrize("clip_range", [0.5, 1.0])
def test_clip_sample_matches_diffusers(name, clip_range, tmp_path):
    config = dict(SD_CONFIG, clip_sample=True, clip_sample_range=clip_range, prediction_type="sample")
    full_loop_parity(name, config, tmp_path)


@pytest.mark.parametrize("eta", [0.3, 1.0])
def test_ddim_eta_noise_matches_diffusers(eta, tmp_path):
    full_loop_parity("ddim", SD_CONFIG, tmp_path, eta=eta)


@pytest.mark.parametrize("name", ["euler", "dpm++2m"])
def test_karras_sigma_bounds_from_config_match_diffusers(name, tmp_path):
    config = dict(SD_CONFIG, use_karras_sigmas=True, sigma_min=0.1, sigma_max=10.0, final_sigmas_type="sigma_min")
    full_loop_parity(name, config, tmp_path)


@pytest.mark.parametrize(
    "options",
    [
        {"solver_type": "heun"},
        {"euler_at_final": True},
        {"solver_order": 1},
        {"lower_order_final": False, "final_sigmas_type": "sigma_min"},
    ],
)
@pytest.mark.parametrize("steps", [5, 20])
def test_dpm_solver_options_match_diffusers(options, steps, tmp_path):
    full_loop_parity("dpm++2m", dict(SD_CONFIG, **options), tmp_path, steps=steps)


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_lcm_step_counts_match_diffusers(steps, tmp_path):
    full_loop_parity("lcm", dict(SD_CONFIG, original_inference_steps=50, timestep_scaling=10.0), tmp_path, steps)


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_a_stable_diffusion_pndm_config_keeps_its_settings_in_every_solver(name, tmp_path):
    """SD 1.x ships a PNDMScheduler config: switching solver keeps its betas and steps_offset (from_config)."""
    config = dict(SD_CONFIG, _class_name="PNDMScheduler", skip_prk_steps=True, trained_betas=None)
    full_loop_parity(name, config, tmp_path, steps=7)


@pytest.mark.parametrize("name", ["euler", "dpm++2m", "lcm"])
def test_an_in_memory_diffusers_config_switches_like_from_config(name, tmp_path):
    """dict(scheduler.config) of an in-memory scheduler lists its defaults in _use_default_values; those
    give way to the new solver's own defaults, as in diffusers' from_config."""
    in_memory = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    config = dict(in_memory.config)
    assert "timestep_spacing" in config["_use_default_values"]
    ours = make_scheduler(name, config)
    theirs = DIFFUSERS_CLASS[name].from_config(in_memory.config)
    assert ours.settings.timestep_spacing == theirs.config.timestep_spacing
    ours.set_timesteps(STEPS)
    theirs.set_timesteps(STEPS)
    torch.testing.assert_close(ours.timesteps, theirs.timesteps, atol=0, rtol=0)


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_trained_betas_match_diffusers(name, tmp_path):
    betas = torch.linspace(0.0001, 0.03, 1000).tolist()
    full_loop_parity(name, dict(SD_CONFIG, trained_betas=betas, beta_schedule="no-such-schedule"), tmp_path)


@pytest.mark.parametrize("name", list(SCHEDULERS))
@pytest.mark.parametrize("strength", [0.0, 0.3, 0.5, 0.75, 1.0])
def test_img2img_timesteps_and_loop_match_diffusers(name, strength, tmp_path):
    """StableDiffusionImg2ImgPipeline.get_timesteps, set_begin_index, add_noise at the first timestep, loop."""
    steps = 10
    ours = make_scheduler(name, SD_CONFIG)
    theirs = diffusers_scheduler(name, SD_CONFIG, tmp_path)
    ours.set_timesteps(steps)  # as a pipeline does before asking for the img2img schedule
    timesteps = ours.img2img_timesteps(steps, strength)
    theirs.set_timesteps(steps)
    t_start = max(steps - min(int(steps * strength), steps), 0)
    expected = theirs.timesteps[t_start * theirs.order :]
    if hasattr(theirs, "set_begin_index"):
        theirs.set_begin_index(t_start * theirs.order)
    torch.testing.assert_close(timesteps, expected, atol=0, rtol=0)
    if len(expected) == 0:
        return
    image_latents = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4))
    start_ours = ours.add_noise(image_latents, noise, timesteps[:1])
    start_theirs = theirs.add_noise(image_latents, noise, expected[:1])
    assert_close(start_ours, start_theirs, 1e-5)
    for mine, reference in zip(
        sample_loop(ours, timesteps, start_ours, ours=True)[0],
        sample_loop(theirs, expected, start_theirs, ours=False)[0],
    ):
        assert_close(mine, reference, 1e-5)


@pytest.mark.parametrize("strength", [0.3, 0.5, 1.0])
def test_lcm_strength_schedule_matches_the_lcm_img2img_pipeline(strength, tmp_path):
    ours = make_scheduler("lcm", SD_CONFIG)
    theirs = diffusers_scheduler("lcm", SD_CONFIG, tmp_path)
    ours.set_timesteps(4, strength=strength)
    theirs.set_timesteps(4, strength=strength)
    torch.testing.assert_close(ours.timesteps, theirs.timesteps, atol=0, rtol=0)
    latents = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    for mine, reference in zip(
        sample_loop(ours, ours.timesteps, latents, ours=True)[0],
        sample_loop(theirs, theirs.timesteps, latents, ours=False)[0],
    ):
        assert_close(mine, reference, 1e-5)


@pytest.mark.parametrize("name", ["ddim", "ddpm", "lcm"])
def test_add_noise_at_any_training_timestep_matches_diffusers(name, tmp_path):
    ours, theirs = make_scheduler(name, SD_CONFIG), diffusers_scheduler(name, SD_CONFIG, tmp_path)
    generator = torch.Generator().manual_seed(0)
    original, noise = torch.randn((5, 4, 8, 8), generator=generator), torch.randn((5, 4, 8, 8), generator=generator)
    timesteps = torch.tensor([0, 1, 250, 998, 999])
    torch.testing.assert_close(
        ours.add_noise(original, noise, timesteps), theirs.add_noise(original, noise, timesteps), atol=0, rtol=0
    )


@pytest.mark.parametrize("name", ["euler", "euler-a", "dpm++2m"])
@pytest.mark.parametrize("spacing", SPACINGS)
def test_add_noise_at_schedule_timesteps_matches_diffusers(name, spacing, tmp_path):
    config = dict(SD_CONFIG, timestep_spacing=spacing)
    ours, theirs = make_scheduler(name, config), diffusers_scheduler(name, config, tmp_path)
    ours.set_timesteps(STEPS)
    theirs.set_timesteps(STEPS)
    generator = torch.Generator().manual_seed(0)
    original, noise = torch.randn((3, 4, 8, 8), generator=generator), torch.randn((3, 4, 8, 8), generator=generator)
    timesteps = ours.timesteps[[0, 4, 9]]
    torch.testing.assert_close(
        ours.add_noise(original, noise, timesteps), theirs.add_noise(original, noise, timesteps), atol=0, rtol=0
    )


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_to_diffusers_config_samples_the_same_in_diffusers(name, tmp_path):
    source = dict(
        SD_CONFIG,
        prediction_type="v_prediction",
        timestep_spacing="trailing",
        rescale_betas_zero_snr=True,
        use_karras_sigmas=False,
    )
    config = to_diffusers(name, source)
    assert config["_class_name"] == DIFFUSERS_CLASS[name].__name__
    assert config["prediction_type"] == "v_prediction" and config["beta_start"] == 0.00085
    full_loop_parity(name, config, tmp_path)


@pytest.mark.parametrize("name", ["ddim", "euler", "dpm++2m", "euler-a"])
def test_bfloat16_steps_match_diffusers(name, tmp_path):
    """Half-precision latents: the solvers upcast and downcast where diffusers does."""
    ours, theirs = make_scheduler(name, SD_CONFIG), diffusers_scheduler(name, SD_CONFIG, tmp_path)
    ours.set_timesteps(6)
    theirs.set_timesteps(6)
    latents = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    mine, reference = latents * ours.init_noise_sigma, latents * theirs.init_noise_sigma
    for t in ours.timesteps:
        g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
        mine = ours.step(fake_model(ours.scale_model_input(mine, t), t).to(torch.bfloat16), t, mine, generator=g1)
        reference = theirs.step(
            fake_model(theirs.scale_model_input(reference, t), t).to(torch.bfloat16),
            t,
            reference,
            generator=g2,
            return_dict=False,
        )[0]
        assert mine.dtype == reference.dtype == torch.bfloat16
        torch.testing.assert_close(mine, reference, atol=0, rtol=0)


def test_randn_tensor_draws_what_diffusers_draws():
    shape = (2, 4, 8, 8)
    single = randn_tensor(shape, torch.Generator().manual_seed(1), "cpu", torch.float32)
    torch.testing.assert_close(
        single,
        diffusers_randn_tensor(
            shape, generator=torch.Generator().manual_seed(1), device=torch.device("cpu"), dtype=torch.float32
        ),
    )
    per_row = [torch.Generator().manual_seed(s) for s in (1, 2)]
    reference = diffusers_randn_tensor(
        shape,
        generator=[torch.Generator().manual_seed(s) for s in (1, 2)],
        device=torch.device("cpu"),
        dtype=torch.float32,
    )
    torch.testing.assert_close(randn_tensor(shape, per_row, "cpu", torch.float32), reference)


@pytest.mark.parametrize("parameterization", [EpsilonPrediction(), VPrediction(), SamplePrediction()])
def test_parameterization_scalings_give_the_same_x0_as_predict(parameterization):
    generator = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(SHAPE, generator=generator), torch.randn(SHAPE, generator=generator)
    alpha_t = torch.tensor(0.6)
    sigma_t = (1 - alpha_t**2) ** 0.5
    latents = alpha_t * x0 + sigma_t * eps
    model_output = {"epsilon": eps, "v_prediction": alpha_t * eps - sigma_t * x0, "sample": x0}[parameterization.name]
    prediction = parameterization.predict(model_output, latents, alpha_t, sigma_t)
    torch.testing.assert_close(prediction.x0, x0, atol=1e-5, rtol=0)
    torch.testing.assert_close(prediction.eps, eps, atol=1e-5, rtol=0)
    c_skip, c_out = parameterization.scalings(alpha_t, sigma_t)
    torch.testing.assert_close(c_skip * latents + c_out * model_output, x0, atol=1e-5, rtol=0)
    # the Karras form: the variance-exploding sample x_t/α_t = x0 + (σ_t/α_t) ε gives the same x0
    torch.testing.assert_close(
        parameterization.denoise(model_output, latents / alpha_t, sigma_t / alpha_t), x0, atol=1e-5, rtol=0
    )


def test_consistency_boundary_scalings_match_diffusers_lcm():
    boundary = ConsistencyBoundary(timestep_scaling=10.0)
    lcm = diffusers.LCMScheduler()
    for t in torch.tensor([0, 19, 499, 999]):
        torch.testing.assert_close(
            torch.stack(boundary.scalings(t)),
            torch.stack(lcm.get_scalings_for_boundary_condition_discrete(t)),
            atol=0,
            rtol=0,
        )
    c_skip, c_out = boundary.scalings(torch.tensor(0))
    assert c_skip.item() == 1.0 and c_out.item() == 0.0  # f(x, 0) = x


def test_unknown_scheduler_name_lists_the_valid_ones():
    with pytest.raises(FixativeError, match="ddim, euler, euler-a, dpm\\+\\+2m, ddpm, lcm"):
        make_scheduler("pndm", SD_CONFIG)


@pytest.mark.parametrize(
    "name, config, message",
    [
        ("ddim", dict(SD_CONFIG, beta_schedule="cosine"), "beta_schedule"),
        ("euler", dict(SD_CONFIG, timestep_spacing="uniform"), "timestep_spacing"),
        ("ddim", dict(SD_CONFIG, prediction_type="flow"), "prediction_type"),
        ("euler-a", dict(SD_CONFIG, prediction_type="sample"), "prediction_type"),
        ("ddim", dict(SD_CONFIG, thresholding=True), "thresholding"),
        ("dpm++2m", dict(SD_CONFIG, algorithm_type="sde-dpmsolver++"), "algorithm_type"),
        ("dpm++2m", dict(SD_CONFIG, solver_order=3), "solver_order"),
        ("euler", dict(SD_CONFIG, use_exponential_sigmas=True), "use_exponential_sigmas"),
        ("ddpm", dict(SD_CONFIG, variance_type="learned_range"), "variance_type"),
        ("ddim", dict(SD_CONFIG, trained_betas=[0.01] * 10), "trained_betas"),
    ],
)
def test_bad_config_raises_a_fixative_error(name, config, message):
    with pytest.raises(FixativeError, match=message):
        make_scheduler(name, config)


def test_bad_use_raises_fixative_errors():
    with pytest.raises(FixativeError, match="eta"):
        make_scheduler("euler", SD_CONFIG, eta=0.5)
    with pytest.raises(FixativeError, match="num_inference_steps"):
        make_scheduler("ddim", SD_CONFIG).set_timesteps(1001)
    with pytest.raises(FixativeError, match="at most 50"):
        make_scheduler("lcm", SD_CONFIG).set_timesteps(51)
    with pytest.raises(FixativeError, match="strength"):
        make_scheduler("ddim", SD_CONFIG).img2img_timesteps(10, 1.5)
    scheduler = make_scheduler("euler", SD_CONFIG)
    scheduler.set_timesteps(10)
    with pytest.raises(FixativeError, match="not one of"):
        scheduler.step(torch.zeros(SHAPE), 123.5, torch.zeros(SHAPE))
