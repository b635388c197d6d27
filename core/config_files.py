"""Architecture configs read from files: what ``load_model(..., config=PATH)`` / ``--config PATH`` gives a single file.

An original single file records tensor shapes only; GroupNorm group counts, SD 2 head counts, image size and
prediction type are not in it. As diffusers' ``from_single_file(config=...)``, PATH supplies them, as one of:

- a diffusers model folder (``model_index.json`` with ``unet/``, ``vae/``, ``text_encoder/``, ``scheduler/``);
- one of its sub-model folders, or that folder's ``config.json`` (only that network's config is taken);
- an original LDM inference ``.yaml`` (``v1-inference.yaml``, ``v2-inference-v.yaml``): ``model.params`` with
  ``unet_config``, ``first_stage_config`` and the noise schedule.

``read_configs`` returns the configs found, by part (``unet``, ``vae``, ``text_encoder``, ``scheduler``); parts
the PATH does not describe are left to the shapes.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .config import AutoencoderKLConfig, CLIPTextConfig, UNetConfig
from .errors import FixativeError

PARSERS: dict[str, Callable[[dict], Any]] = {
    "unet": UNetConfig.from_diffusers,
    "vae": AutoencoderKLConfig.from_diffusers,
    "text_encoder": CLIPTextConfig.from_diffusers,
    "scheduler": dict,
}
CONFIG_FILES = {
    "unet": "config.json",
    "vae": "config.json",
    "text_encoder": "config.json",
    "scheduler": "scheduler_config.json",
}
KINDS = (
    "a diffusers model folder, one of its unet/ vae/ text_encoder/ scheduler/ folders or their config.json, "
    "or an original LDM inference .yaml"
)


def read_json(path: Path, what: str) -> dict:
    """A JSON object from ``path``; a one-line FixativeError (``what``: what the file is needed for) otherwise."""
    if not path.is_file():
        raise FixativeError(f"{path} is missing; {what}")
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise FixativeError(f"{path} is not a readable JSON file ({error})") from None
    if not isinstance(content, dict):
        raise FixativeError(f"{path} should hold a JSON object")
    return content


def parse(path: Path, part: str, what: str = "") -> Any:
    """The config of ``part`` read from the JSON file ``path``; errors name the file."""
    try:
        return PARSERS[part](read_json(path, what))
    except FixativeError as error:
        message = str(error)
        raise FixativeError(message if message.startswith(str(path)) else f"{path}: {message}") from None
    except (TypeError, ValueError, AttributeError) as error:
        raise FixativeError(f"{path}: not a {part} config ({type(error).__name__}: {error})") from None


def _part_of(config: dict) -> str | None:
    """Which network (or the scheduler) a diffusers / transformers config.json describes."""
    name = str(config.get("_class_name", ""))
    if name == "UNet2DConditionModel":
        return "unet"
    if name == "AutoencoderKL":
        return "vae"
    if name.endswith("Scheduler"):
        return "scheduler"
    if config.get("model_type") in ("clip_text_model", "clip") or "CLIPTextModel" in config.get("architectures", ()):
        return "text_encoder"
    return None


def _read_single_config(path: Path) -> dict[str, Any]:
    part = _part_of(read_json(path, KINDS))
    if part is None:
        raise FixativeError(f"{path} is not the config of a UNet, VAE, CLIP text encoder or scheduler; give {KINDS}")
    return {part: parse(path, part)}


def read_configs(path: str | Path) -> dict[str, Any]:
    """The configs ``path`` describes (see the module docstring), by part."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FixativeError(f"--config {path}: no such file or folder; give {KINDS}")
    if path.is_file():
        if path.suffix in (".yaml", ".yml"):
            return ldm_configs(path)
        return _read_single_config(path)
    if (path / "model_index.json").is_file():
        found = {
            part: parse(path / part / name, part)
            for part, name in CONFIG_FILES.items()
            if (path / part / name).is_file()
        }
        if not found:
            raise FixativeError(
                f"--config {path}: the model folder holds no unet/, vae/, text_encoder/ or scheduler/ configs"
            )
        return found
    for name in ("config.json", "scheduler_config.json"):
        if (path / name).is_file():
            return _read_single_config(path / name)
    raise FixativeError(
        f"--config {path}: the folder holds no model_index.json, config.json or scheduler_config.json; give {KINDS}"
    )


# ----------------------------------------------------------------------------- original LDM .yaml


def _get(tree: dict, dotted: str, default: Any = None) -> Any:
    for key in dotted.split("."):
        if not isinstance(tree, dict) or key not in tree:
            return default
        tree = tree[key]
    return tree


def ldm_configs(path: Path) -> dict[str, Any]:
    """The UNet, VAE and scheduler of an original LDM inference ``.yaml``, translated as diffusers'
    ``create_unet_diffusers_config_from_ldm`` / ``create_vae_diffusers_config_from_ldm`` do. LDM's own
    normalisation layers always have 32 groups; the text encoder is read from the shapes."""
    import yaml

    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise FixativeError(f"{path} is not a readable YAML file ({first_line})") from None
    params = _get(tree, "model.params")
    unet = _get(params, "unet_config.params")
    vae = _get(params, "first_stage_config.params.ddconfig")
    if not isinstance(unet, dict) or not isinstance(vae, dict):
        raise FixativeError(
            f"{path} is not an LDM inference config (no model.params.unet_config.params or "
            "first_stage_config.params.ddconfig)"
        )
    try:
        return {"unet": _ldm_unet(unet, params), "vae": _ldm_vae(vae, params), "scheduler": _ldm_scheduler(params)}
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as error:
        raise FixativeError(f"{path}: unexpected LDM config ({type(error).__name__}: {error})") from None


def _ldm_unet(unet: dict, params: dict) -> UNetConfig:
    widths = tuple(unet["model_channels"] * m for m in unet["channel_mult"])
    attention_at = set(unet.get("attention_resolutions", ()))
    # LDM: heads = num_heads, or width / num_head_channels when that is set (SD 2.x: 64-wide heads)
    head_channels = unet.get("num_head_channels", -1)
    heads = tuple(w // head_channels for w in widths) if head_channels != -1 else unet.get("num_heads", 8)
    depth = unet.get("transformer_depth", 1)
    return UNetConfig(
        sample_size=params.get("image_size", unet.get("image_size", 64)),
        in_channels=unet.get("in_channels", 4),
        out_channels=unet.get("out_channels", 4),
        block_out_channels=widths,
        cross_attention_blocks=tuple(2**level in attention_at for level in range(len(widths))),
        layers_per_block=unet.get("num_res_blocks", 2),
        num_heads=heads,
        cross_attention_dim=unet.get("context_dim", 768),
        transformer_layers_per_block=depth[0] if isinstance(depth, (list, tuple)) else depth,
        use_linear_projection=bool(unet.get("use_linear_in_transformer", False)),
        upcast_attention=params.get("parameterization") == "v",  # the 768-px SD 2.x releases upcast attention
    )


def _ldm_vae(vae: dict, params: dict) -> AutoencoderKLConfig:
    return AutoencoderKLConfig(
        in_channels=vae.get("in_channels", 3),
        out_channels=vae.get("out_ch", 3),
        block_out_channels=tuple(vae["ch"] * m for m in vae["ch_mult"]),
        layers_per_block=vae.get("num_res_blocks", 2),
        latent_channels=vae.get("z_channels", 4),
        sample_size=params.get("image_size", 64) * 2 ** (len(vae["ch_mult"]) - 1),  # latent size -> pixels
        scaling_factor=params.get("scale_factor", 0.18215),
    )


def _ldm_scheduler(params: dict) -> dict:
    from .presets import scheduler_config

    prediction_type = "v_prediction" if params.get("parameterization") == "v" else "epsilon"
    # the scheduler class each release ships (presets.py): DDIM with the v models, PNDM otherwise
    class_name = "DDIMScheduler" if prediction_type == "v_prediction" else "PNDMScheduler"
    return dict(
        scheduler_config(class_name, prediction_type),
        num_train_timesteps=params.get("timesteps", 1000),
        beta_start=params.get("linear_start", 0.00085),
        beta_end=params.get("linear_end", 0.012),
    )
