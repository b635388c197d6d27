"""Original single-file checkpoints (CompVis / Stability ``.ckpt`` / ``.safetensors``) <-> our key layout.

An original checkpoint holds the three networks under one prefix each, in the LDM code's module names:

    model.diffusion_model.*          the UNet (input_blocks / middle_block / output_blocks)
    first_stage_model.*              the VAE (encoder.down.N.block.M, attention as 1x1 convolutions)
    cond_stage_model.transformer.*   SD 1.x text encoder, Hugging Face CLIP layout (with or without text_model.)
    cond_stage_model.model.*         SD 2.x text encoder, OpenCLIP layout (fused q/k/v in_proj, resblocks)

Our networks use diffusers' names. Here is one pure mapping per network and direction:
``map_*_key(key, value, config) -> [(our_key, tensor)]`` reads an original tensor (``None`` when the key
does not belong to that layout, ``[]`` when it is a known tensor we do not use), ``*_to_original``
writes a whole state dict back. The architecture of a file is read from its tensor shapes
(``infer_model_config``); what shapes cannot show comes from the release it matches (``presets``).
Files fixative writes also record their exact configs in the metadata entry ``fixative``, so non-standard
models (other head counts, image sizes, prediction types) come back unchanged.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache

import torch

from .config import AutoencoderKLConfig, CLIPTextConfig, ModelConfig, UNetConfig
from .errors import FixativeError
from .parameterization import PREDICTION_TYPES
from .presets import get_preset

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
OPEN_CLIP_PREFIX = "cond_stage_model.model."
PREFIXES = {"unet": UNET_PREFIX, "vae": VAE_PREFIX}
# safetensors metadata entry in which fixative records the exact configs of a file it writes
METADATA_KEY = "fixative"

# Tensors of the original text-encoder wrappers that are not weights of our text encoder: the position
# index buffer, and OpenCLIP's projection into the joint image-text space and its logit temperature.
_UNUSED_TEXT_KEYS = {"embeddings.position_ids", "text_projection", "logit_scale"}
_RELEASED_OPEN_CLIP_LAYERS = 24  # OpenCLIP ViT-H/14; SD 2.x conditions on the output of layer 23

# Leaf renames inside a module: original name -> diffusers name.
_UNET_RESNET = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
_VAE_RESNET = {"nin_shortcut": "conv_shortcut"}
_VAE_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
VAE_ATTENTION_LINEARS = ("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight")


class _ModuleMap:
    """Original module path <-> diffusers module path, each with its leaf renames; maps keys both ways."""

    def __init__(self, modules: dict[str, tuple[str, dict[str, str]]]):
        self.to_ours = modules
        self.to_theirs = {
            ours: (theirs, {b: a for a, b in leaves.items()}) for theirs, (ours, leaves) in modules.items()
        }

    @staticmethod
    def _rename(key: str, table: dict[str, tuple[str, dict[str, str]]]) -> str | None:
        parts = key.split(".")
        for cut in range(len(parts) - 1, 0, -1):  # longest module path first ("input_blocks.3.0.op" before ".0")
            module = ".".join(parts[:cut])
            if module in table:
                target, leaves = table[module]
                rest = ".".join(parts[cut:])
                for old, new in leaves.items():
                    if rest.startswith(old + "."):
                        rest = new + rest[len(old) :]
                        break
                return f"{target}.{rest}"
        return None

    def ours(self, key: str) -> str | None:
        return self._rename(key, self.to_ours)

    def theirs(self, key: str) -> str | None:
        return self._rename(key, self.to_theirs)


# ---------------------------------------------------------------------------------------------- UNet


@lru_cache(maxsize=16)
def _unet_map(layers_per_block: int, cross_attention_blocks: tuple[bool, ...]) -> _ModuleMap:
    resnet, none = _UNET_RESNET, {}
    modules = {
        "time_embed.0": ("time_embedding.linear_1", none),
        "time_embed.2": ("time_embedding.linear_2", none),
        "input_blocks.0.0": ("conv_in", none),
        "out.0": ("conv_norm_out", none),
        "out.2": ("conv_out", none),
        "middle_block.0": ("mid_block.resnets.0", resnet),
        "middle_block.1": ("mid_block.attentions.0", none),
        "middle_block.2": ("mid_block.resnets.1", resnet),
    }
    last = len(cross_attention_blocks) - 1
    # input_blocks: conv_in, then per down block `layers_per_block` (ResNet[, transformer]) and a downsampler
    index = 1
    for block, attention in enumerate(cross_attention_blocks):
        for layer in range(layers_per_block):
            modules[f"input_blocks.{index}.0"] = (f"down_blocks.{block}.resnets.{layer}", resnet)
            if attention:
                modules[f"input_blocks.{index}.1"] = (f"down_blocks.{block}.attentions.{layer}", none)
            index += 1
        if block < last:
            modules[f"input_blocks.{index}.0.op"] = (f"down_blocks.{block}.downsamplers.0.conv", none)
            index += 1
    # output_blocks: layers_per_block + 1 per up block; the last one of a block also holds its upsampler
    for block, attention in enumerate(reversed(cross_attention_blocks)):
        for layer in range(layers_per_block + 1):
            index = block * (layers_per_block + 1) + layer
            modules[f"output_blocks.{index}.0"] = (f"up_blocks.{block}.resnets.{layer}", resnet)
            if attention:
                modules[f"output_blocks.{index}.1"] = (f"up_blocks.{block}.attentions.{layer}", none)
        if block < last:
            modules[f"output_blocks.{index}.{2 if attention else 1}.conv"] = (
                f"up_blocks.{block}.upsamplers.0.conv",
                none,
            )
    return _ModuleMap(modules)


def _unet_map_for(config: UNetConfig) -> _ModuleMap:
    return _unet_map(config.layers_per_block, tuple(config.cross_attention_blocks))


def map_unet_key(key: str, value: torch.Tensor, config: UNetConfig) -> list[tuple[str, torch.Tensor]] | None:
    """An original UNet tensor (key without ``model.diffusion_model.``) under our name."""
    ours = _unet_map_for(config).ours(key)
    return None if ours is None else [(ours, value)]


def unet_original_key(key: str, config: UNetConfig) -> str | None:
    return _unet_map_for(config).theirs(key)


def unet_to_original(state_dict: dict[str, torch.Tensor], config: UNetConfig) -> dict[str, torch.Tensor]:
    if config.time_cond_proj_dim is not None:
        raise FixativeError(
            "this UNet has a guidance-scale embedding (LCM), which the original single-file layout "
            "has no place for; save it as a diffusers folder instead"
        )
    return {
        UNET_PREFIX + _known(unet_original_key(key, config), key, "UNet"): value for key, value in state_dict.items()
    }


def _known(mapped: str | None, key: str, network: str) -> str:
    if mapped is None:
        raise FixativeError(f"{network} tensor {key} has no place in the original single-file layout")
    return mapped


# ----------------------------------------------------------------------------------------------- VAE


@lru_cache(maxsize=16)
def _vae_map(num_blocks: int, layers_per_block: int, mid_attention: bool) -> _ModuleMap:
    none = {}
    modules = {"quant_conv": ("quant_conv", none), "post_quant_conv": ("post_quant_conv", none)}
    for part in ("encoder", "decoder"):
        for name in ("conv_in", "conv_out"):
            modules[f"{part}.{name}"] = (f"{part}.{name}", none)
        modules[f"{part}.norm_out"] = (f"{part}.conv_norm_out", none)
        modules[f"{part}.mid.block_1"] = (f"{part}.mid_block.resnets.0", _VAE_RESNET)
        modules[f"{part}.mid.block_2"] = (f"{part}.mid_block.resnets.1", _VAE_RESNET)
        if mid_attention:
            modules[f"{part}.mid.attn_1"] = (f"{part}.mid_block.attentions.0", _VAE_ATTENTION)
    for block in range(num_blocks):
        for layer in range(layers_per_block):
            modules[f"encoder.down.{block}.block.{layer}"] = (
                f"encoder.down_blocks.{block}.resnets.{layer}",
                _VAE_RESNET,
            )
        if block < num_blocks - 1:
            modules[f"encoder.down.{block}.downsample.conv"] = (
                f"encoder.down_blocks.{block}.downsamplers.0.conv",
                none,
            )
    # the decoder's up.N works at the resolution of encoder block N; diffusers numbers up blocks in running order
    for level in range(num_blocks):
        block = num_blocks - 1 - level
        for layer in range(layers_per_block + 1):
            modules[f"decoder.up.{level}.block.{layer}"] = (f"decoder.up_blocks.{block}.resnets.{layer}", _VAE_RESNET)
        if level > 0:
            modules[f"decoder.up.{level}.upsample.conv"] = (f"decoder.up_blocks.{block}.upsamplers.0.conv", none)
    return _ModuleMap(modules)


def _vae_map_for(config: AutoencoderKLConfig) -> _ModuleMap:
    return _vae_map(len(config.block_out_channels), config.layers_per_block, config.mid_block_add_attention)


def map_vae_key(key: str, value: torch.Tensor, config: AutoencoderKLConfig) -> list[tuple[str, torch.Tensor]] | None:
    """An original VAE tensor (key without ``first_stage_model.``) under our name; the mid-block attention's
    1x1 convolutions (out, in, 1, 1) become linear weights (out, in)."""
    ours = _vae_map_for(config).ours(key)
    if ours is None:
        return [] if key.startswith("loss.") else None  # training checkpoints keep the GAN loss: not a VAE weight
    if ours.endswith(VAE_ATTENTION_LINEARS) and value.ndim == 4:
        value = value[:, :, 0, 0]
    return [(ours, value)]


def vae_original_key(key: str, config: AutoencoderKLConfig) -> str | None:
    return _vae_map_for(config).theirs(key)


def vae_to_original(state_dict: dict[str, torch.Tensor], config: AutoencoderKLConfig) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state_dict.items():
        if key.endswith(VAE_ATTENTION_LINEARS):
            value = value[:, :, None, None]  # back to 1x1 convolutions
        out[VAE_PREFIX + _known(vae_original_key(key, config), key, "VAE")] = value
    return out


# --------------------------------------------------------------------------------------- text encoder

_OPEN_CLIP_LAYER = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)")
_OPEN_CLIP_TOP = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
}
_OPEN_CLIP_LEAVES = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_HF_LAYER = re.compile(r"text_model\.encoder\.layers\.(\d+)\.(.+)")


def map_clip_key(key: str, value: torch.Tensor) -> list[tuple[str, torch.Tensor]] | None:
    """SD 1.x: a Hugging Face CLIP text tensor (key without ``cond_stage_model.transformer.``, with or
    without ``text_model.``) under the released name ``text_model.*``."""
    key = key.removeprefix("text_model.")
    if key in _UNUSED_TEXT_KEYS:
        return []
    return [("text_model." + key, value)]


def map_open_clip_key(key: str, value: torch.Tensor, config: CLIPTextConfig) -> list[tuple[str, torch.Tensor]] | None:
    """SD 2.x: an OpenCLIP text tensor (key without ``cond_stage_model.model.``) under our name.

    The fused attention input projection ``in_proj_weight`` (3 width, width) is split into q, k, v (rows in
    that order, as torch.nn.MultiheadAttention stacks them). Layers past ``config.num_hidden_layers`` (the
    last of the released 24: SD 2.x uses the penultimate layer) are known and unused.
    """
    if key in _OPEN_CLIP_TOP:
        return [(_OPEN_CLIP_TOP[key], value)]
    if key in _UNUSED_TEXT_KEYS:
        return []
    match = _OPEN_CLIP_LAYER.fullmatch(key)
    if match is None:
        return None
    layer, rest = int(match[1]), match[2]
    if layer >= config.num_hidden_layers:
        return []
    prefix = f"text_model.encoder.layers.{layer}."
    if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
        leaf = rest.rsplit("_", 1)[1]  # weight / bias
        return [(f"{prefix}self_attn.{name}_proj.{leaf}", part) for name, part in zip("qkv", value.chunk(3, dim=0))]
    for old, new in _OPEN_CLIP_LEAVES.items():
        if rest.startswith(old + "."):
            return [(prefix + new + rest[len(old) :], value)]
    return None


def text_encoder_original_key(key: str, config: CLIPTextConfig) -> str | None:
    """The original name of one of our text-encoder tensors (q/k/v all name their fused in_proj)."""
    if not is_open_clip(config):
        return CLIP_PREFIX + key
    top = {ours: theirs for theirs, ours in _OPEN_CLIP_TOP.items()}
    if key in top:
        return OPEN_CLIP_PREFIX + top[key]
    match = _HF_LAYER.fullmatch(key)
    if match is None:
        return None
    layer, rest = match[1], match[2]
    fused = re.fullmatch(r"self_attn\.[qkv]_proj\.(weight|bias)", rest)
    if fused:
        return f"{OPEN_CLIP_PREFIX}transformer.resblocks.{layer}.attn.in_proj_{fused[1]}"
    for old, new in _OPEN_CLIP_LEAVES.items():
        if rest.startswith(new + "."):
            return f"{OPEN_CLIP_PREFIX}transformer.resblocks.{layer}.{old}{rest[len(new) :]}"
    return None


def text_encoder_to_original(state_dict: dict[str, torch.Tensor], config: CLIPTextConfig) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state_dict.items():
        original = _known(text_encoder_original_key(key, config), key, "text encoder")
        if original.endswith(("in_proj_weight", "in_proj_bias")):
            if ".q_proj." not in key:
                continue  # written once, from q
            out[original] = torch.cat([state_dict[key.replace(".q_proj.", f".{name}_proj.")] for name in "qkv"])
        else:
            out[original] = value
    return out


# ------------------------------------------------------------------------------------ whole checkpoint


def is_open_clip(config: CLIPTextConfig) -> bool:
    """SD 2.x conditions on an OpenCLIP text tower (GELU), SD 1.x on OpenAI's CLIP (quick GELU).

    The activation is the one config field that tells the two families apart; it decides the text
    encoder's single-file layout and the tokenizer's pad token.
    """
    return config.hidden_act == "gelu"


def map_original_key(key: str, value: torch.Tensor, config: ModelConfig) -> tuple[str, list | None] | None:
    """Routes one tensor of an original checkpoint: (network, its tensors under our names, or None when the
    key is not one of that network's), or None for tensors outside the three networks (the noise schedule,
    EMA copies, training state), which are not weights of the model we build."""
    if key.startswith(UNET_PREFIX):
        return "unet", map_unet_key(key[len(UNET_PREFIX) :], value, config.unet)
    if key.startswith(VAE_PREFIX):
        return "vae", map_vae_key(key[len(VAE_PREFIX) :], value, config.vae)
    if key.startswith(CLIP_PREFIX):
        return "text_encoder", map_clip_key(key[len(CLIP_PREFIX) :], value)
    if key.startswith(OPEN_CLIP_PREFIX):
        return "text_encoder", map_open_clip_key(key[len(OPEN_CLIP_PREFIX) :], value, config.text_encoder)
    return None


def original_key(network: str, key: str, config: ModelConfig) -> str | None:
    """The original name of one of our tensors (for error messages and saving)."""
    if network == "unet":
        mapped = unet_original_key(key, config.unet)
    elif network == "vae":
        mapped = vae_original_key(key, config.vae)
    else:
        return text_encoder_original_key(key, config.text_encoder)
    return None if mapped is None else PREFIXES[network] + mapped


def to_original(state_dicts: dict[str, dict[str, torch.Tensor]], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Our three state dicts (``{"unet": ..., "vae": ..., "text_encoder": ...}``) as one original checkpoint."""
    return {
        **unet_to_original(state_dicts["unet"], config.unet),
        **vae_to_original(state_dicts["vae"], config.vae),
        **text_encoder_to_original(state_dicts["text_encoder"], config.text_encoder),
    }


def config_metadata(config: ModelConfig, scheduler_config: dict) -> str:
    """The exact configs, recorded in files fixative writes (head counts and image size are not in shapes)."""
    return json.dumps(
        {
            "unet": config.unet.to_diffusers(),
            "vae": config.vae.to_diffusers(),
            "text_encoder": config.text_encoder.to_diffusers(),
            "scheduler": scheduler_config,
        }
    )


def config_from_metadata(text: str) -> tuple[ModelConfig, dict]:
    try:
        configs = json.loads(text)
        return (
            ModelConfig(
                UNetConfig.from_diffusers(configs["unet"]),
                AutoencoderKLConfig.from_diffusers(configs["vae"]),
                CLIPTextConfig.from_diffusers(configs["text_encoder"]),
            ),
            dict(configs["scheduler"]),
        )
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise FixativeError(
            f"the file's {METADATA_KEY!r} metadata is damaged ({type(error).__name__}: {error}); "
            "remove that metadata entry to have the architecture read from the tensor shapes"
        ) from None


# ------------------------------------------------------------------------------- shapes -> architecture


def _count(shapes: dict[str, tuple[int, ...]], pattern: str) -> int:
    """How many consecutive indices i from 0 have a key matching pattern.format(i) as a prefix."""
    count = 0
    while any(key.startswith(pattern.format(count)) for key in shapes):
        count += 1
    return count


def _strip(shapes: dict[str, tuple[int, ...]], prefix: str) -> dict[str, tuple[int, ...]]:
    return {key[len(prefix) :]: shape for key, shape in shapes.items() if key.startswith(prefix)}


def _shape(shapes: dict[str, tuple[int, ...]], key: str, network: str) -> tuple[int, ...]:
    if key not in shapes:
        raise FixativeError(f"the checkpoint has no {network} tensor {key}; is this a Stable Diffusion 1.x/2.x model?")
    return shapes[key]


def infer_unet_config(shapes: dict[str, tuple[int, ...]], sd2: bool) -> UNetConfig:
    """The UNet architecture from its original tensor shapes (keys without ``model.diffusion_model.``).

    Head counts are not visible in shapes: SD 1.x uses 8 heads in every block, SD 2.x 64-wide heads
    (at least one, for narrow test models).
    """
    if any(key.startswith(("label_emb.", "input_hint_block.")) for key in shapes):
        raise FixativeError(
            "this UNet has class/size embeddings or a control branch (SDXL, upscaler or ControlNet); "
            "fixative supports Stable Diffusion 1.x/2.x only"
        )
    conv_in = _shape(shapes, "input_blocks.0.0.weight", "UNet")
    widths, attention, per_block = [], [], []
    index, layers = 1, 0
    while f"input_blocks.{index}.0.op.weight" in shapes or f"input_blocks.{index}.0.out_layers.3.weight" in shapes:
        if f"input_blocks.{index}.0.op.weight" in shapes:  # a downsampler closes the block
            per_block.append(layers)
            layers = 0
        else:
            width = shapes[f"input_blocks.{index}.0.out_layers.3.weight"][0]
            if layers == 0:
                widths.append(width)
                attention.append(f"input_blocks.{index}.1.proj_in.weight" in shapes)
            layers += 1
        index += 1
    per_block.append(layers)
    if not widths or len(set(per_block)) != 1:
        raise FixativeError(
            f"the UNet's input blocks hold {per_block} ResNets per level; "
            "a Stable Diffusion 1.x/2.x UNet has the same number at every level"
        )
    proj_in = _shape(shapes, "middle_block.1.proj_in.weight", "UNet")
    heads = [max(1, width // 64) for width in widths] if sd2 else 8
    return UNetConfig(
        in_channels=conv_in[1],
        out_channels=_shape(shapes, "out.2.weight", "UNet")[0],
        block_out_channels=tuple(widths),
        cross_attention_blocks=tuple(attention),
        layers_per_block=per_block[0],
        num_heads=heads,
        cross_attention_dim=_shape(shapes, "middle_block.1.transformer_blocks.0.attn2.to_k.weight", "UNet")[1],
        transformer_layers_per_block=_count(shapes, "middle_block.1.transformer_blocks.{}."),
        use_linear_projection=len(proj_in) == 2,
    )


def infer_vae_config(shapes: dict[str, tuple[int, ...]]) -> AutoencoderKLConfig:
    """The VAE architecture from its original tensor shapes (keys without ``first_stage_model.``)."""
    num_blocks = _count(shapes, "encoder.down.{}.")
    if num_blocks == 0:
        _shape(shapes, "encoder.down.0.block.0.conv1.weight", "VAE")
    return AutoencoderKLConfig(
        in_channels=_shape(shapes, "encoder.conv_in.weight", "VAE")[1],
        out_channels=_shape(shapes, "decoder.conv_out.weight", "VAE")[0],
        block_out_channels=tuple(
            _shape(shapes, f"encoder.down.{i}.block.0.conv1.weight", "VAE")[0] for i in range(num_blocks)
        ),
        layers_per_block=_count(shapes, "encoder.down.0.block.{}."),
        latent_channels=_shape(shapes, "encoder.conv_out.weight", "VAE")[0] // 2,  # mean and log-variance
        mid_block_add_attention="encoder.mid.attn_1.q.weight" in shapes,
    )


def infer_text_config(shapes: dict[str, tuple[int, ...]], open_clip: bool) -> CLIPTextConfig:
    """The text encoder from its tensor shapes (keys without the ``cond_stage_model`` prefix).

    CLIP text towers have 64-wide heads (ViT-L: 12, ViT-H: 16; at least one for narrow test models).
    A 24-layer OpenCLIP tower is the released ViT-H/14, of which SD 2.x uses 23 layers (the penultimate
    output); a file with fewer layers (written by fixative or diffusers' converter) holds exactly those used.
    """
    if open_clip:
        vocab_size, hidden_size = _shape(shapes, "token_embedding.weight", "OpenCLIP text encoder")
        layers = _count(shapes, "transformer.resblocks.{}.")
        intermediate = _shape(shapes, "transformer.resblocks.0.mlp.c_fc.weight", "OpenCLIP text encoder")[0]
        positions = _shape(shapes, "positional_embedding", "OpenCLIP text encoder")[0]
        layers = layers - 1 if layers == _RELEASED_OPEN_CLIP_LAYERS else layers
        activation, projection_dim = "gelu", 512
    else:
        shapes = {key.removeprefix("text_model."): shape for key, shape in shapes.items()}
        vocab_size, hidden_size = _shape(shapes, "embeddings.token_embedding.weight", "CLIP text encoder")
        layers = _count(shapes, "encoder.layers.{}.")
        intermediate = _shape(shapes, "encoder.layers.0.mlp.fc1.weight", "CLIP text encoder")[0]
        positions = _shape(shapes, "embeddings.position_embedding.weight", "CLIP text encoder")[0]
        activation, projection_dim = "quick_gelu", 768
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden_size // 64),
        max_position_embeddings=positions,
        hidden_act=activation,
        projection_dim=projection_dim,
    )


def infer_model_config(
    shapes: dict[str, tuple[int, ...]], prediction_type: str | None
) -> tuple[ModelConfig, dict, list[str]]:
    """The model config, scheduler config and the assumptions made, for an original checkpoint's shapes.

    SD 1.x and 2.x are told apart by the text-encoder layout. Whether an SD 2.x model predicts v (the
    768-px 2.0-v / 2.1) or epsilon (the 512-px bases) is not in the shapes: ``prediction_type`` says it,
    and without it epsilon is assumed and the assumption noted.
    """
    open_clip = any(key.startswith(OPEN_CLIP_PREFIX) for key in shapes)
    if not open_clip and not any(key.startswith(CLIP_PREFIX) for key in shapes):
        raise FixativeError(
            "the checkpoint has no Stable Diffusion 1.x/2.x text encoder (cond_stage_model.transformer.* "
            "or cond_stage_model.model.*); SDXL and other architectures are not supported"
        )
    notes = []
    if prediction_type is None:
        prediction_type = "epsilon"
        notes.append(
            "prediction type assumed epsilon: a single file does not record it (SD 1.x and the 512-px "
            "SD 2.x bases); for the 768-px SD 2.x models (2.0-v, 2.1) pass --prediction-type v_prediction"
        )
    if prediction_type not in PREDICTION_TYPES:
        raise FixativeError(f"unknown prediction type {prediction_type!r}; use one of {', '.join(PREDICTION_TYPES)}")
    # the release whose non-shape settings (image size, attention upcast, scheduler) this file takes
    release = get_preset("sd15" if not open_clip else "sd21" if prediction_type == "v_prediction" else "sd21-base")
    unet = infer_unet_config(_strip(shapes, UNET_PREFIX), sd2=open_clip)
    unet.sample_size = release.model_config.unet.sample_size
    unet.upcast_attention = release.model_config.unet.upcast_attention
    vae = infer_vae_config(_strip(shapes, VAE_PREFIX))
    vae.sample_size = release.model_config.vae.sample_size
    text = infer_text_config(_strip(shapes, OPEN_CLIP_PREFIX if open_clip else CLIP_PREFIX), open_clip)
    scheduler_config = dict(release.scheduler_config, prediction_type=prediction_type)
    return ModelConfig(unet, vae, text), scheduler_config, notes
