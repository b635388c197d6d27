"""Fixtures and assertions shared by every test package."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from parity import randomize

from fixative.core.checkpoints import save_diffusers
from fixative.core.model import StableDiffusionModel
from fixative.core.presets import Preset, get_preset
from fixative.core.tokenizer import CLIPTokenizer


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny networks: one thread is fastest, and it avoids OpenMP spin-waits (tens of times
    slower) when other processes share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _write_with_fixative(folder: Path, config: Preset, seed: int, dtype: torch.dtype | None) -> Path:
    torch.manual_seed(seed)
    model = StableDiffusionModel.from_config(config.model_config, config.scheduler_config)
    return save_diffusers(model, folder, dtype=dtype)


def _write_like_a_release(folder: Path, config: Preset, seed: int) -> Path:
    """Shaped like a released SD folder, written by diffusers and transformers themselves; the text encoder stored
    under text_model.* as released folders have it (transformers >= 5.6 would drop the prefix). Every parameter
    random (``randomize``)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import load_file, save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(config.model_config.unet.to_diffusers())
    vae = AutoencoderKL.from_config(config.model_config.vae.to_diffusers())
    text = config.model_config.text_encoder
    text_encoder = CLIPTextModel(CLIPTextConfig(**vars(text)))
    for index, module in enumerate((unet, vae, text_encoder)):
        randomize(module, seed + index)
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    text_encoder.save_pretrained(folder / "text_encoder")
    weights = folder / "text_encoder" / "model.safetensors"
    save_file(
        {k if k.startswith("text_model.") else "text_model." + k: v for k, v in load_file(weights).items()},
        weights,
        metadata={"format": "pt"},
    )
    CLIPTokenizer.bundled(pad_token="!" if text.hidden_act == "gelu" else "<|endoftext|>").save(folder / "tokenizer")
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(config.scheduler_config))
    (folder / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "StableDiffusionPipeline",
                "_diffusers_version": "0.6.0",
                "feature_extractor": [None, None],
                "safety_checker": [None, None],
                "requires_safety_checker": False,
                "scheduler": ["diffusers", config.scheduler_config["_class_name"]],
                "text_encoder": ["transformers", "CLIPTextModel"],
                "tokenizer": ["transformers", "CLIPTokenizer"],
                "unet": ["diffusers", "UNet2DConditionModel"],
                "vae": ["diffusers", "AutoencoderKL"],
            }
        )
    )
    return folder


@pytest.fixture(scope="session")
def sd_folder(tmp_path_factory):
    """Factory of diffusers folders of random-weight models, each made once per session; tests must not modify
    them. ``sd_folder("tiny-sd2", seed=0, dtype=torch.float16, prediction_type="v_prediction")``: keyword
    arguments beyond these override the preset's scheduler settings. ``writer``: "fixative" (save_diffusers,
    fixative's initialisation) or "diffusers" (written by diffusers and transformers like a released folder,
    every parameter random; ``dtype`` does not apply)."""
    made = {}

    def make(
        preset: str = "tiny-sd1",
        seed: int = 0,
        dtype: torch.dtype | None = None,
        writer: str = "fixative",
        **scheduler_settings,
    ) -> Path:
        key = (preset, seed, str(dtype), writer, tuple(sorted(scheduler_settings.items())))
        if key not in made:
            config = get_preset(preset)
            config.scheduler_config.update(scheduler_settings)
            folder = tmp_path_factory.mktemp(f"{preset}-{writer}") / preset
            made[key] = (
                _write_with_fixative(folder, config, seed, dtype)
                if writer == "fixative"
                else _write_like_a_release(folder, config, seed)
            )
        return made[key]

    return make
