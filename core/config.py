"""Dataclass configs of the three Stable Diffusion networks.

Each config reads a diffusers / transformers ``config.json`` (``from_diffusers``) and writes one that
diffusers and transformers load (``to_diffusers``). Misnamed upstream fields are translated here, once:
diffusers' ``attention_head_dim`` is a number of *heads* for SD 1.x and 2.x, so it becomes ``num_heads``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .errors import FixativeError

UNET_DOWN_BLOCKS = {"DownBlock2D": False, "CrossAttnDownBlock2D": True}
UNET_UP_BLOCKS = {"UpBlock2D": False, "CrossAttnUpBlock2D": True}


def _as_tuple(value: Any, length: int) -> tuple:
    if isinstance(value, (list, tuple)):
        if len(value) != length:
            raise FixativeError(f"config value {value!r} should have {length} entries, one per block")
        return tuple(value)
    return (value,) * length


def _reject_unsupported(config: dict, name: str, checks: dict[str, Any]) -> None:
    for key, allowed in checks.items():
        value = config.get(key, allowed)
        if value != allowed:
            raise FixativeError(
                f"{name} config sets {key}={value!r}, which fixative does not support "
                f"(Stable Diffusion 1.x/2.x use {allowed!r})"
            )


@dataclass
class UNetConfig:
    """The denoising UNet of SD 1.x / 2.x (diffusers' ``UNet2DConditionModel``)."""

    sample_size: int = 64  # latent height/width the model was trained at (512 px / 8); informational
    in_channels: int = 4  # 9 for inpainting UNets (latents + mask + masked-image latents)
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    # One flag per down block: does it hold transformer (cross-attention) blocks? Up blocks mirror it.
    cross_attention_blocks: tuple[bool, ...] = (True, True, True, False)
    layers_per_block: int = 2
    # Attention heads per down block (the mid block uses the last). SD 1.x: 8 everywhere;
    # SD 2.x: head width 64, i.e. (5, 10, 20, 20).
    num_heads: tuple[int, ...] = (8, 8, 8, 8)
    cross_attention_dim: int = 768  # text embedding width: 768 for SD 1.x (CLIP ViT-L), 1024 for SD 2.x
    transformer_layers_per_block: int = 1
    use_linear_projection: bool = False  # SD 2.x: proj_in / proj_out are Linear, SD 1.x: 1x1 Conv
    upcast_attention: bool = False  # SD 2.1 (768 px) computes attention scores in fp32
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    # Width of an extra condition embedded and added to the timestep embedding (the guidance-scale
    # embedding of latent consistency models, LCM paper Sec. 4.2); None for plain SD.
    time_cond_proj_dim: int | None = None

    def __post_init__(self) -> None:
        self.block_out_channels = tuple(self.block_out_channels)
        n = len(self.block_out_channels)
        self.cross_attention_blocks = _as_tuple(self.cross_attention_blocks, n)
        self.num_heads = _as_tuple(self.num_heads, n)

    @property
    def time_embed_dim(self) -> int:
        return self.block_out_channels[0] * 4

    @staticmethod
    def heads_from_width(block_out_channels: tuple[int, ...], head_width: int) -> tuple[int, ...]:
        """Heads per block when the model is described by its head width (64 for SD 2.x)."""
        return tuple(c // head_width for c in block_out_channels)

    @classmethod
    def from_diffusers(cls, config: dict) -> UNetConfig:
        _reject_unsupported(
            config,
            "UNet",
            {
                "addition_embed_type": None,
                "class_embed_type": None,
                "encoder_hid_dim": None,
                "num_class_embeds": None,
                "act_fn": "silu",
                "resnet_time_scale_shift": "default",
                "mid_block_type": "UNetMidBlock2DCrossAttn",
                "only_cross_attention": False,
                "dual_cross_attention": False,
                "center_input_sample": False,
                "time_embedding_type": "positional",
                "conv_in_kernel": 3,
                "conv_out_kernel": 3,
                "downsample_padding": 1,
                "mid_block_scale_factor": 1,
            },
        )
        down = list(config.get("down_block_types", ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]))
        up = list(config.get("up_block_types", ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3))
        for name in down:
            if name not in UNET_DOWN_BLOCKS:
                raise FixativeError(f"UNet down block type {name!r} is not supported (SD 1.x/2.x blocks only)")
        for name in up:
            if name not in UNET_UP_BLOCKS:
                raise FixativeError(f"UNet up block type {name!r} is not supported (SD 1.x/2.x blocks only)")
        cross = tuple(UNET_DOWN_BLOCKS[name] for name in down)
        if tuple(UNET_UP_BLOCKS[name] for name in reversed(up)) != cross:
            raise FixativeError("UNet up blocks do not mirror the down blocks; this layout is not supported")
        block_out_channels = tuple(config.get("block_out_channels", (320, 640, 1280, 1280)))
        # diffusers: num_attention_heads = num_attention_heads or attention_head_dim (both are head counts)
        heads = config.get("num_attention_heads") or config.get("attention_head_dim", 8)
        transformer_layers = config.get("transformer_layers_per_block", 1)
        if isinstance(transformer_layers, (list, tuple)):
            if len(set(transformer_layers)) != 1:
                raise FixativeError("per-block transformer_layers_per_block is not supported (SDXL-style)")
            transformer_layers = transformer_layers[0]
        cross_attention_dim = config.get("cross_attention_dim", 768)
        if isinstance(cross_attention_dim, (list, tuple)):
            cross_attention_dim = cross_attention_dim[0]
        return cls(
            sample_size=config.get("sample_size", 64),
            in_channels=config.get("in_channels", 4),
            out_channels=config.get("out_channels", 4),
            block_out_channels=block_out_channels,
            cross_attention_blocks=cross,
            layers_per_block=config.get("layers_per_block", 2),
            num_heads=_as_tuple(heads, len(block_out_channels)),
            cross_attention_dim=cross_attention_dim,
            transformer_layers_per_block=transformer_layers,
            use_linear_projection=config.get("use_linear_projection", False),
            upcast_attention=config.get("upcast_attention", False),
            norm_num_groups=config.get("norm_num_groups", 32),
            norm_eps=config.get("norm_eps", 1e-5),
            flip_sin_to_cos=config.get("flip_sin_to_cos", True),
            freq_shift=config.get("freq_shift", 0),
            time_cond_proj_dim=config.get("time_cond_proj_dim"),
        )

    def to_diffusers(self) -> dict:
        down = ["CrossAttnDownBlock2D" if c else "DownBlock2D" for c in self.cross_attention_blocks]
        up = ["CrossAttnUpBlock2D" if c else "UpBlock2D" for c in reversed(self.cross_attention_blocks)]
        heads = self.num_heads[0] if len(set(self.num_heads)) == 1 else list(self.num_heads)
        return {
            "_class_name": "UNet2DConditionModel",
            "sample_size": self.sample_size,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "block_out_channels": list(self.block_out_channels),
            "down_block_types": down,
            "up_block_types": up,
            "mid_block_type": "UNetMidBlock2DCrossAttn",
            "layers_per_block": self.layers_per_block,
            "attention_head_dim": heads,  # diffusers' name for the number of heads
            "cross_attention_dim": self.cross_attention_dim,
            "transformer_layers_per_block": self.transformer_layers_per_block,
            "use_linear_projection": self.use_linear_projection,
            "upcast_attention": self.upcast_attention,
            "norm_num_groups": self.norm_num_groups,
            "norm_eps": self.norm_eps,
            "flip_sin_to_cos": self.flip_sin_to_cos,
            "freq_shift": self.freq_shift,
            "time_cond_proj_dim": self.time_cond_proj_dim,
            "act_fn": "silu",
            "center_input_sample": False,
            "downsample_padding": 1,
            "mid_block_scale_factor": 1,
        }


@dataclass
class AutoencoderKLConfig:
    """The KL autoencoder of SD 1.x / 2.x (diffusers' ``AutoencoderKL``): 8x down-sampling, 4 latents."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 512  # image size the model was trained at; also the default tile size
    scaling_factor: float = 0.18215  # SD 1.x and 2.x; latents fed to the UNet are z * scaling_factor
    mid_block_add_attention: bool = True

    def __post_init__(self) -> None:
        self.block_out_channels = tuple(self.block_out_channels)

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_diffusers(cls, config: dict) -> AutoencoderKLConfig:
        _reject_unsupported(
            config, "VAE", {"act_fn": "silu", "shift_factor": None, "use_quant_conv": True, "use_post_quant_conv": True}
        )
        n = len(config.get("block_out_channels", (128, 256, 512, 512)))
        for key, allowed in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            for name in config.get(key, [allowed] * n):
                if name != allowed:
                    raise FixativeError(f"VAE block type {name!r} is not supported (expected {allowed})")
        sample_size = config.get("sample_size", 512)
        if isinstance(sample_size, (list, tuple)):
            sample_size = sample_size[0]
        return cls(
            in_channels=config.get("in_channels", 3),
            out_channels=config.get("out_channels", 3),
            block_out_channels=tuple(config.get("block_out_channels", (128, 256, 512, 512))),
            layers_per_block=config.get("layers_per_block", 2),
            latent_channels=config.get("latent_channels", 4),
            norm_num_groups=config.get("norm_num_groups", 32),
            sample_size=sample_size,
            scaling_factor=config.get("scaling_factor", 0.18215),
            mid_block_add_attention=config.get("mid_block_add_attention", True),
        )

    def to_diffusers(self) -> dict:
        n = len(self.block_out_channels)
        return {
            "_class_name": "AutoencoderKL",
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "down_block_types": ["DownEncoderBlock2D"] * n,
            "up_block_types": ["UpDecoderBlock2D"] * n,
            "block_out_channels": list(self.block_out_channels),
            "layers_per_block": self.layers_per_block,
            "act_fn": "silu",
            "latent_channels": self.latent_channels,
            "norm_num_groups": self.norm_num_groups,
            "sample_size": self.sample_size,
            "scaling_factor": self.scaling_factor,
            "mid_block_add_attention": self.mid_block_add_attention,
        }


@dataclass
class CLIPTextConfig:
    """The CLIP text transformer (transformers' ``CLIPTextModel``).

    SD 1.x: OpenAI CLIP ViT-L/14 (768 wide, 12 layers, quick_gelu). SD 2.x: OpenCLIP ViT-H/14
    (1024 wide, 23 of its 24 layers kept in diffusers folders, gelu); SD 2.x uses the penultimate layer.
    """

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"  # SD 2.x: "gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 768  # width of the joint CLIP space; unused by the text encoder itself
    pad_token_id: int = 1
    bos_token_id: int = 49406
    # eos_token_id == 2 is the legacy value of older config files: the pooled output is then taken at
    # argmax(input_ids), which is the EOS token for the CLIP vocabulary (transformers does the same).
    eos_token_id: int = 49407

    def __post_init__(self) -> None:
        if self.hidden_act not in ("quick_gelu", "gelu"):
            raise FixativeError(f"text encoder activation {self.hidden_act!r} is not supported (quick_gelu or gelu)")

    @classmethod
    def from_diffusers(cls, config: dict) -> CLIPTextConfig:
        config = (
            config.get("text_config", config) if "text_config" in config and "hidden_size" not in config else config
        )
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in names})

    def to_diffusers(self) -> dict:
        out = dataclasses.asdict(self)
        out.update(
            {
                "architectures": ["CLIPTextModel"],
                "model_type": "clip_text_model",
                "attention_dropout": 0.0,
                "dropout": 0.0,
                "initializer_factor": 1.0,
                "initializer_range": 0.02,
                "torch_dtype": "float32",
            }
        )
        return out


@dataclass
class ModelConfig:
    """The three networks of one Stable Diffusion model."""

    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: AutoencoderKLConfig = field(default_factory=AutoencoderKLConfig)
    text_encoder: CLIPTextConfig = field(default_factory=CLIPTextConfig)


def unet_problems(unet: UNetConfig) -> list[str]:
    """What keeps a UNet config from building: GroupNorm channels not divisible by the groups, heads not dividing
    a block's width."""
    problems = [
        f"UNet block width {channels} is not divisible by its {unet.norm_num_groups} GroupNorm groups"
        for channels in unet.block_out_channels
        if channels % unet.norm_num_groups
    ]
    attention = [
        *zip(unet.block_out_channels, unet.num_heads, unet.cross_attention_blocks),
        (unet.block_out_channels[-1], unet.num_heads[-1], True),
    ]  # the mid block always attends
    problems += [
        f"UNet block width {channels} is not divisible by its {heads} attention heads"
        for channels, heads, attends in attention
        if attends and (heads < 1 or channels % heads)
    ]
    return list(dict.fromkeys(problems))


def vae_problems(vae: AutoencoderKLConfig) -> list[str]:
    return [
        f"VAE block width {channels} is not divisible by its {vae.norm_num_groups} GroupNorm groups"
        for channels in vae.block_out_channels
        if channels % vae.norm_num_groups
    ]


def text_encoder_problems(text: CLIPTextConfig) -> list[str]:
    if text.num_attention_heads < 1 or text.hidden_size % text.num_attention_heads:
        return [
            f"text encoder width {text.hidden_size} is not divisible by its {text.num_attention_heads} attention heads"
        ]
    return []


def architecture_problems(config: ModelConfig) -> list[str]:
    """What keeps these configs from building networks (every GroupNorm's channels divisible by its groups, every
    attention's heads dividing its width); empty when the architecture is consistent."""
    return unet_problems(config.unet) + vae_problems(config.vae) + text_encoder_problems(config.text_encoder)


def check_buildable(problems: list[str]) -> None:
    """Raise the first problem of ``*_problems`` as a FixativeError (networks call this before building)."""
    if problems:
        raise FixativeError(f"the config cannot be built: {problems[0]}")
