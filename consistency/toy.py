"""The toy world's distilled sampler: an LCM-LoRA for the toy teacher, shipped with the toy weights, for sampling
the toy model and its fine-tunes (e.g. eval's mimics) in 1-4 steps with ``lcm_sampler``."""

from __future__ import annotations

import copy
import json
from pathlib import Path

from fixative.core.errors import FixativeError
from fixative.core.lora import LORA_WEIGHTS_NAME, apply_lora
from fixative.core.toy import SHIPPED

from .export import lcm_scheduler_config

TOY_LCM_LORA = SHIPPED / "lcm-lora"


def toy_lcm_lora() -> Path:
    """The shipped LCM-LoRA of the toy teacher (``pytorch_lora_weights.safetensors``)."""
    path = TOY_LCM_LORA / LORA_WEIGHTS_NAME
    if not path.is_file():
        raise FixativeError(
            f"the toy LCM-LoRA is not shipped in this checkout ({path}); distil one with "
            "`fixative distill --teacher toy --method lcm-lora`"
        )
    return path


def lcm_sampler(model, lora: str | Path | None = None):
    """A copy of ``model`` (the toy teacher or a fine-tune of it) with an LCM-LoRA merged into a copy of its UNet
    and, as its scheduler config, the LCM schedule the LoRA was distilled on: sample it with
    ``generate(..., scheduler="lcm", num_inference_steps=1..4, guidance_scale=1.0)``. ``lora``: a LoRA file or
    its folder (with the distill_config.json ``fixative distill`` writes); default: the shipped toy LCM-LoRA."""
    path = Path(lora) if lora is not None else toy_lcm_lora()
    if path.is_dir():
        path = path / LORA_WEIGHTS_NAME
    record = path.parent / "distill_config.json"
    num_ddim_timesteps = json.loads(record.read_text())["num_ddim_timesteps"] if record.is_file() else 50
    sampler = copy.copy(model)
    sampler.unet = copy.deepcopy(model.unet)
    apply_lora(sampler, path)
    sampler.scheduler_config = lcm_scheduler_config(model.scheduler_config, num_ddim_timesteps)
    return sampler
