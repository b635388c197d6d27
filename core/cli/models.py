"""``fixative convert`` and ``fixative info``: model formats on the command line (thin layers over
``fixative.core.checkpoints``)."""

from __future__ import annotations

import argparse
import time

from ..parameterization import PREDICTION_TYPES
from .options import DTYPES, MODEL_HELP, add_config

SINGLE_FILE = (".safetensors", ".ckpt")


def register(subparsers) -> None:
    convert = subparsers.add_parser(
        "convert",
        help="convert a model between a diffusers folder and an original single file",
        description="Convert a Stable Diffusion 1.x/2.x model. DST ending in .safetensors or .ckpt is written as an "
        "original single file; any other DST as a diffusers folder (which diffusers loads).",
    )
    convert.add_argument("source", metavar="SRC", help=MODEL_HELP)
    convert.add_argument("destination", metavar="DST", help="output folder, or a .safetensors / .ckpt file")
    convert.add_argument(
        "--dtype",
        choices=tuple(DTYPES),
        default=None,
        help="precision of the written weights (default: as stored in SRC)",
    )
    convert.add_argument(
        "--prediction-type",
        choices=PREDICTION_TYPES,
        default=None,
        help="what the UNet predicts; a single file does not record it (default: the model's; "
        "epsilon for a single file: pass v_prediction for the 768-px SD 2.x models)",
    )
    add_config(convert)
    convert.add_argument("--overwrite", action="store_true", help="replace DST if it exists (default: refuse)")
    convert.set_defaults(func=run_convert)

    info = subparsers.add_parser(
        "info",
        help="describe a model: architecture, sizes, prediction type, scheduler, storage",
        description="Describe a Stable Diffusion model without loading its weights into memory.",
    )
    info.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    info.add_argument(
        "--prediction-type",
        choices=PREDICTION_TYPES,
        default=None,
        help="what the UNet predicts, where the model does not record it (default: the model's; "
        "epsilon for a single file)",
    )
    add_config(info)
    info.set_defaults(func=run_info)


def _stored_dtype(model) -> str | None:
    """The one dtype every network is stored in, or None when they differ."""
    dtypes = set(model.details.stored_dtypes.values())
    if len(dtypes) != 1:
        return None
    (dtype,) = dtypes
    return None if "+" in dtype else dtype


def run_convert(args: argparse.Namespace) -> int:
    import torch

    from ..checkpoints import load_model, save_diffusers, save_single_file

    started = time.perf_counter()
    dtype_name = (
        DTYPES[args.dtype]
        if args.dtype
        else _stored_dtype(
            load_model(args.source, device="meta", prediction_type=args.prediction_type, config=args.config)
        )
    )
    dtype = getattr(torch, dtype_name or "float32")
    print(f"reading {args.source} as {dtype_name or 'float32'} ...", flush=True)
    model = load_model(args.source, dtype=dtype, prediction_type=args.prediction_type, config=args.config)
    for note in model.details.notes:
        print(f"note: {note}")
    print(f"loaded {model.family} ({model.details.format}), {_count(model)} parameters", flush=True)
    if args.destination.endswith(SINGLE_FILE):
        print(f"writing {args.destination} (original single-file layout) ...", flush=True)
        save_single_file(model, args.destination, overwrite=args.overwrite)
    else:
        print(f"writing {args.destination} (diffusers folder) ...", flush=True)
        save_diffusers(model, args.destination, overwrite=args.overwrite)
    print(f"done in {time.perf_counter() - started:.1f} s")
    return 0


def _count(model) -> str:
    return _human(sum(p.numel() for network in model.networks().values() for p in network.parameters()))


def _human(count: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if count >= size:
            return f"{count / size:.2f} {unit}"
    return str(count)


def run_info(args: argparse.Namespace) -> int:
    from ..checkpoints import load_model
    from ..single_file import is_open_clip

    # shapes only
    model = load_model(args.model, device="meta", prediction_type=args.prediction_type, config=args.config)
    unet, vae, text = model.unet.config, model.vae.config, model.text_encoder.config
    scheduler = model.scheduler_config
    sizes = {name: sum(p.numel() for p in network.parameters()) for name, network in model.networks().items()}
    image_size = unet.sample_size * vae.downsampling_factor
    rows = [
        ("model", f"{model.source} ({model.details.format})"),
        ("architecture", model.family),
        ("prediction type", model.prediction_type),
        (
            "parameters",
            ", ".join(f"{name} {_human(n)}" for name, n in sizes.items()) + f" (total {_human(sum(sizes.values()))})",
        ),
        ("stored dtype", ", ".join(f"{name} {dtype}" for name, dtype in model.details.stored_dtypes.items())),
        (
            "unet",
            f"{unet.in_channels} -> {unet.out_channels} channels, blocks {list(unet.block_out_channels)}, "
            f"{unet.layers_per_block} layers per block, attention in {list(unet.cross_attention_blocks)}, "
            f"heads {list(unet.num_heads)}, {'linear' if unet.use_linear_projection else 'conv'} projections, "
            f"attention upcast {'on' if unet.upcast_attention else 'off'}, trained at {image_size} px",
        ),
        ("cross-attention", f"{unet.cross_attention_dim} wide"),
        (
            "latent channels",
            f"{vae.latent_channels} (VAE x{vae.downsampling_factor} down-sampling, "
            f"scaling factor {vae.scaling_factor})",
        ),
        (
            "text encoder",
            f"{'OpenCLIP' if is_open_clip(text) else 'OpenAI CLIP'}, {text.num_hidden_layers} layers, "
            f"{text.hidden_size} wide, {text.num_attention_heads} heads, {text.hidden_act}",
        ),
        (
            "scheduler",
            f"{scheduler.get('_class_name', '?')}: {scheduler.get('beta_schedule', '?')} betas "
            f"{scheduler.get('beta_start', '?')} .. {scheduler.get('beta_end', '?')} over "
            f"{scheduler.get('num_train_timesteps', '?')} steps, timestep spacing "
            f"{scheduler.get('timestep_spacing', 'leading')}, steps offset {scheduler.get('steps_offset', 0)}",
        ),
        ("tokenizer", f"pads with {model.tokenizer.pad_token!r}, {model.tokenizer.model_max_length} tokens"),
    ]
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"{label:<{width}}  {value}")
    for note in model.details.notes:
        print(f"note: {note}")
    return 0
