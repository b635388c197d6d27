"""One Stable Diffusion model: its three networks, its tokenizer and the scheduler settings it shipped with."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .config import CLIPTextConfig, ModelConfig
from .single_file import is_open_clip
from .text_encoder import CLIPTextModel
from .tokenizer import CLIPTokenizer
from .unet import UNet2DConditionModel
from .vae import AutoencoderKL


def default_tokenizer(text_config: CLIPTextConfig) -> CLIPTokenizer:
    """fixative's bundled CLIP BPE, padded as the model family was trained: SD 2.x pads with "!"."""
    return CLIPTokenizer.bundled(pad_token="!" if is_open_clip(text_config) else "<|endoftext|>")


@dataclass
class SourceDetails:
    """Where a model came from, for ``fixative info`` and result records."""

    format: str = "in memory"  # "diffusers folder", "original single file, safetensors", ...
    stored_dtypes: dict[str, str] = field(default_factory=dict)  # network -> dtype(s) of its stored tensors
    notes: list[str] = field(default_factory=list)  # what was assumed rather than read


@dataclass
class StableDiffusionModel:
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler_config: dict  # the contents of scheduler/scheduler_config.json
    source: str  # the folder, file or name it was loaded from ("random" for from_config)
    details: SourceDetails = field(default_factory=SourceDetails)

    @property
    def config(self) -> ModelConfig:
        return ModelConfig(self.unet.config, self.vae.config, self.text_encoder.config)

    @property
    def prediction_type(self) -> str:
        """What the UNet predicts: "epsilon", "v_prediction" or "sample"."""
        return self.scheduler_config.get("prediction_type", "epsilon")

    @property
    def size_multiple(self) -> int:
        """Image heights and widths must be multiples of this: the VAE's down-sampling factor. The UNet takes any
        latent size (each up-sampler is told the size of the skip it meets, as in diffusers)."""
        return self.vae.config.downsampling_factor

    @property
    def is_inpainting(self) -> bool:
        # inpainting UNets see latents + mask + masked-image latents: 4 + 1 + 4 channels
        return self.unet.config.in_channels == 9

    @property
    def family(self) -> str:
        """ "SD 1.x" or "SD 2.x", with " inpainting" where it applies."""
        name = "SD 2.x" if is_open_clip(self.text_encoder.config) else "SD 1.x"
        return name + (" inpainting" if self.is_inpainting else "")

    def networks(self) -> dict[str, nn.Module]:
        return {"unet": self.unet, "vae": self.vae, "text_encoder": self.text_encoder}

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> StableDiffusionModel:
        """Moves (and casts) the three networks in place; returns self."""
        for network in self.networks().values():
            network.to(device=device, dtype=dtype)
        return self

    @classmethod
    def from_config(
        cls,
        config: ModelConfig,
        scheduler_config: dict,
        tokenizer: CLIPTokenizer | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> StableDiffusionModel:
        """A model with freshly initialised (random) weights, for tests and for training from scratch."""
        with torch.device(device):
            networks = (
                UNet2DConditionModel(config.unet),
                AutoencoderKL(config.vae),
                CLIPTextModel(config.text_encoder),
            )
        unet, vae, text_encoder = (network.to(dtype=dtype).eval() for network in networks)
        return cls(
            unet,
            vae,
            text_encoder,
            tokenizer or default_tokenizer(config.text_encoder),
            dict(scheduler_config),
            source="random",
        )
