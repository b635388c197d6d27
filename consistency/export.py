"""What distillation writes: a student model folder with an LCM scheduler."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from fixative.core.checkpoints import save_diffusers
from fixative.core.model import StableDiffusionModel
from fixative.core.schedulers import to_diffusers
from fixative.core.unet import UNet2DConditionModel


def lcm_scheduler_config(
    teacher_scheduler_config: dict, num_ddim_timesteps: int, prediction_type: str | None = None
) -> dict:
    """diffusers' LCMScheduler config for a student distilled from a teacher with this schedule: the teacher's
    β schedule, the student's prediction type (default: the teacher's), and the distillation's DDIM timesteps as
    ``original_inference_steps`` (the timesteps the student was trained at, from which the sampler picks its
    1-8 steps)."""
    config = {**teacher_scheduler_config, "original_inference_steps": num_ddim_timesteps}
    if prediction_type is not None:
        config["prediction_type"] = prediction_type
    return to_diffusers("lcm", config)


def save_student(
    teacher: StableDiffusionModel,
    student: UNet2DConditionModel,
    folder: str | Path,
    num_ddim_timesteps: int,
    dtype: torch.dtype | None = None,
) -> Path:
    """A model folder: the student UNet, the teacher's VAE, text encoder and tokenizer, an LCM scheduler.
    diffusers' LatentConsistencyModelPipeline and ``fixative generate --scheduler lcm`` load it. Written
    atomically (core's ``save_diffusers``)."""
    model = dataclasses.replace(
        teacher, unet=student, scheduler_config=lcm_scheduler_config(teacher.scheduler_config, num_ddim_timesteps)
    )
    return save_diffusers(model, folder, dtype=dtype, overwrite=True)
