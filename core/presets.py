"""Named model configurations: the released Stable Diffusion 1.5 / 2.1 / 2.1-base, the toy world, tiny test models.

Each preset is the three network configs plus the ``scheduler_config.json`` that release ships. The
numbers are those of the released diffusers folders (``stable-diffusion-v1-5``, ``stabilityai/
stable-diffusion-2-1``, ``stabilityai/stable-diffusion-2-1-base``). They also fill in what a
single-file checkpoint cannot show in its tensor shapes (head counts, image size, prediction type).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from .config import AutoencoderKLConfig, CLIPTextConfig, ModelConfig, UNetConfig
from .errors import FixativeError


@dataclass
class Preset:
    model_config: ModelConfig
    scheduler_config: dict


def scheduler_config(class_name: str, prediction_type: str) -> dict:
    """The DDPM training schedule every SD 1.x / 2.x release uses (LDM's "scaled_linear": betas are the
    squares of a linear ramp from sqrt(0.00085) to sqrt(0.012) over 1000 steps), with the sampler
    settings diffusers ships next to it."""
    return {
        "_class_name": class_name,
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "trained_betas": None,
        "prediction_type": prediction_type,  # "epsilon" (SD 1.x, 2.x-base) or "v_prediction" (SD 2.x 768 px)
        "steps_offset": 1,
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "clip_sample": False,
        "timestep_spacing": "leading",
    }


# SD 1.x text tower: OpenAI CLIP ViT-L/14.
_CLIP_VIT_L = CLIPTextConfig(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    hidden_act="quick_gelu",
    projection_dim=768,
)
# SD 2.x text tower: OpenCLIP ViT-H/14, 23 of its 24 layers (SD 2 conditions on the penultimate layer).
_OPEN_CLIP_VIT_H = CLIPTextConfig(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=23,
    num_attention_heads=16,
    hidden_act="gelu",
    projection_dim=512,
)
_SD21_UNET = UNetConfig(num_heads=(5, 10, 20, 20), cross_attention_dim=1024, use_linear_projection=True)

# Tiny models for tests: the real CLIP vocabulary (so the bundled tokenizer works), everything else a few
# channels wide. Head counts follow the rules single-file loading infers them by
# (SD 1: 8 heads per UNet block; SD 2: 64-wide heads, at least one; text: 64-wide heads, at least one).
_TINY_UNET = UNetConfig(
    sample_size=8,
    block_out_channels=(32, 64),
    cross_attention_blocks=(True, False),
    layers_per_block=1,
    num_heads=8,
    cross_attention_dim=32,
)
_TINY_VAE = AutoencoderKLConfig(block_out_channels=(32, 64), layers_per_block=1, sample_size=16)
_TINY_TEXT = CLIPTextConfig(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=1, projection_dim=32
)

# The toy world (core/toy, `fixative toy build`): 64x64 images, 16x16 latents.
# Its text tower is SD 1.x's CLIP text encoder, narrowed: the real 49,408-token BPE vocabulary makes the token
# embedding its largest tensor, and the tower is stored twice (SD's text_encoder/ and the toy CLIP folder).
TOY_TEXT = CLIPTextConfig(
    hidden_size=48,
    intermediate_size=192,
    num_hidden_layers=3,
    num_attention_heads=4,
    projection_dim=64,
    pad_token_id=49407,
)
# No attention in the VAE's mid block: the toy VAE is trained on crops, which a purely convolutional network
# sees the same way as whole images.
TOY_VAE = AutoencoderKLConfig(
    block_out_channels=(16, 32, 64),
    layers_per_block=1,
    norm_num_groups=8,
    sample_size=64,
    mid_block_add_attention=False,
)
# A more SD-like toy VAE (`fixative toy build --vae f8`): SD's layout (four levels, 8x down-sampling, two ResNet
# layers per block, attention in the mid block) at a quarter of SD's widths, 5.3M parameters; 8x8 latents. Picked
# among f8 candidates by test reconstruction PSNR alone. Issue 10 measures cloaking against it beside the shipped f4.
TOY_VAE_F8 = AutoencoderKLConfig(
    block_out_channels=(32, 64, 128, 128),
    layers_per_block=2,
    norm_num_groups=8,
    sample_size=64,
    mid_block_add_attention=True,
)
TOY_VAES = {"f4": TOY_VAE, "f8": TOY_VAE_F8}
# Two levels (16x16 and 8x8 latents), cross-attention at the lower one only: at this size, wide blocks at few
# levels tell the artists apart better than more levels of as many weights.
TOY_UNET = UNetConfig(
    sample_size=16,
    block_out_channels=(64, 128),
    cross_attention_blocks=(False, True),
    layers_per_block=1,
    num_heads=(4, 4),
    cross_attention_dim=TOY_TEXT.hidden_size,
)
# SD 1.x's noise schedule; DDIM is the folder's default sampler.
TOY_SCHEDULER = {
    key: value
    for key, value in scheduler_config("DDIMScheduler", "epsilon").items()
    if key not in ("trained_betas", "skip_prk_steps")
}  # PNDM's setting; no trained betas

PRESETS: dict[str, Preset] = {
    "sd15": Preset(
        ModelConfig(UNetConfig(), AutoencoderKLConfig(), _CLIP_VIT_L), scheduler_config("PNDMScheduler", "epsilon")
    ),
    "sd21": Preset(
        ModelConfig(
            UNetConfig(**{**vars(_SD21_UNET), "sample_size": 96, "upcast_attention": True}),
            AutoencoderKLConfig(sample_size=768),
            _OPEN_CLIP_VIT_H,
        ),
        scheduler_config("DDIMScheduler", "v_prediction"),
    ),
    "sd21-base": Preset(
        ModelConfig(_SD21_UNET, AutoencoderKLConfig(), _OPEN_CLIP_VIT_H), scheduler_config("PNDMScheduler", "epsilon")
    ),
    "toy": Preset(ModelConfig(TOY_UNET, TOY_VAE, TOY_TEXT), TOY_SCHEDULER),
    "tiny-sd1": Preset(ModelConfig(_TINY_UNET, _TINY_VAE, _TINY_TEXT), scheduler_config("PNDMScheduler", "epsilon")),
    "tiny-sd2": Preset(
        ModelConfig(
            UNetConfig(**{**vars(_TINY_UNET), "num_heads": 1, "use_linear_projection": True}),
            _TINY_VAE,
            CLIPTextConfig(**{**vars(_TINY_TEXT), "hidden_act": "gelu"}),
        ),
        scheduler_config("PNDMScheduler", "epsilon"),
    ),
}


def get_preset(name: str) -> Preset:
    """A fresh copy of the named preset (callers may modify it)."""
    if name not in PRESETS:
        raise FixativeError(f"unknown model preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[name])
