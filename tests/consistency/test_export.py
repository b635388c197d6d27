"""A saved student folder renders the same image in fixative and in diffusers' LatentConsistencyModelPipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from fixative.consistency.export import lcm_scheduler_config, save_student  # noqa: E402
from fixative.consistency.lcd import student_from_teacher  # noqa: E402
from fixative.core.checkpoints import load_model  # noqa: E402
from fixative.core.pipelines import generate  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_lcm_scheduler_config_keeps_the_teachers_schedule(teacher):
    config = lcm_scheduler_config(teacher.scheduler_config, 25)
    assert config["_class_name"] == "LCMScheduler"
    assert config["original_inference_steps"] == 25
    for key in ("beta_start", "beta_end", "beta_schedule", "prediction_type", "num_train_timesteps"):
        assert config[key] == teacher.scheduler_config[key]


@pytest.mark.parametrize("steps", [1, 4])
def test_saved_student_renders_as_in_diffusers(teacher, tmp_path, steps):
    student = student_from_teacher(teacher.unet, time_cond_proj_dim=32)
    torch.nn.init.normal_(student.time_embedding.cond_proj.weight, std=0.05)  # a trained-looking embedding
    folder = save_student(teacher, student, tmp_path / "student", num_ddim_timesteps=50)

    ours = generate(
        load_model(folder),
        "a lighthouse at dusk",
        num_inference_steps=steps,
        guidance_scale=8.0,
        scheduler="lcm",
        seed=7,
        output="images",
        progress=False,
    )
    pipe = diffusers.LatentConsistencyModelPipeline.from_pretrained(folder, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(
        "a lighthouse at dusk",
        num_inference_steps=steps,
        guidance_scale=8.0,
        generator=torch.Generator("cpu").manual_seed(7),
        output_type="np",
    ).images
    ours = ours.permute(0, 2, 3, 1).numpy()
    assert ours.shape == theirs.shape
    assert np.abs(ours - theirs).max() <= 2 / 255
    # the guidance embedding matters: another guidance scale gives another image
    other = generate(
        load_model(folder),
        "a lighthouse at dusk",
        num_inference_steps=steps,
        guidance_scale=2.0,
        scheduler="lcm",
        seed=7,
        output="images",
        progress=False,
    )
    assert np.abs(other.permute(0, 2, 3, 1).numpy() - ours).max() > 2 / 255
