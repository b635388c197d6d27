"""``fixative generate``: txt2img, img2img and inpainting from the command line (a thin layer over
``fixative.core.pipelines.generate``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..defaults import IMG2IMG_STRENGTH, INPAINT_STRENGTH, default_strength
from .options import (
    MODEL_HELP,
    RegistryChoices,
    add_config,
    add_device,
    add_dtype,
    add_quiet,
    resolve_device,
    torch_dtype,
)


def _scheduler_names():
    from ..schedulers import SCHEDULERS

    return SCHEDULERS


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="render images from a prompt (txt2img, img2img, inpainting)",
        description="Render images with a Stable Diffusion model: txt2img; img2img with --init-image; "
        "inpainting with --init-image and --mask (white = repaint). The settings are recorded "
        "in each PNG's text metadata.",
    )
    parser.add_argument("--model", default="toy", help=f"{MODEL_HELP} (default: %(default)s)")
    add_config(parser)
    parser.add_argument("--prompt", required=True, help="what to render; required")
    parser.add_argument(
        "--negative-prompt", default=None, help="what to steer away from (classifier-free guidance; default: none)"
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of torch.Generator('cpu'), as diffusers uses it: same seed, same image (default: %(default)s)",
    )
    parser.add_argument("--steps", type=int, default=30, help="number of sampling steps (default: %(default)s)")
    parser.add_argument(
        "--guidance", type=float, default=7.5, help="classifier-free guidance scale, 1 = off (default: %(default)s)"
    )
    parser.add_argument(
        "--guidance-rescale",
        type=float,
        default=0.0,
        help="guidance rescale phi (Lin et al. 2024, Sec. 3.4); 0.7 is typical for v-prediction "
        "models (default: %(default)s)",
    )
    parser.add_argument(
        "--scheduler",
        choices=RegistryChoices(_scheduler_names),
        default=None,
        metavar="NAME",
        help="sampler: %(choices)s (default: the model's own scheduler, DDIM where fixative lacks it)",
    )
    for side in ("height", "width"):
        parser.add_argument(
            f"--{side}",
            type=int,
            default=None,
            help=f"image {side} in pixels, a multiple of the model's VAE down-sampling factor (8 for "
            "Stable Diffusion, 4 for the toy world; `fixative info` shows it); default: the "
            "init image's, rounded down to that multiple, else the size the model was trained at",
        )
    parser.add_argument("--num-images", type=int, default=1, help="how many images to render (default: %(default)s)")
    parser.add_argument(
        "--init-image",
        type=Path,
        default=None,
        help="image to start from (img2img / inpainting; default: none, txt2img)",
    )
    parser.add_argument(
        "--strength",
        type=float,
        default=None,
        help=f"how far the init image is noised, in (0, 1] (default: {IMG2IMG_STRENGTH} for img2img, "
        f"{INPAINT_STRENGTH} for inpainting)",
    )
    parser.add_argument(
        "--mask",
        type=Path,
        default=None,
        help="inpainting mask, same size as --init-image: white where the model paints (default: none)",
    )
    parser.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="PATH[:SCALE]",
        help="apply a LoRA file (ours, diffusers' or kohya-style .safetensors; a folder means its "
        "pytorch_lora_weights.safetensors) at SCALE (default scale 1); repeatable (default: none)",
    )
    parser.add_argument(
        "--clip-skip", type=int, default=0, help="skip the text encoder's last N layers (default: %(default)s)"
    )
    parser.add_argument("--vae-tiling", action="store_true", help="decode in tiles, for large images (default: off)")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="compile the UNet with torch.compile: the first step takes longer (the time is printed), "
        "the others run faster (default: off)",
    )
    add_dtype(parser)
    add_device(parser)
    add_quiet(parser)
    parser.add_argument(
        "--out",
        type=Path,
        required=True,
        help="output PNG file for one image, or a folder (created) for several; required",
    )
    parser.set_defaults(func=run)


def _output_paths(out: Path, count: int) -> list[Path]:
    from ..errors import FixativeError

    if out.suffix.lower() == ".png":
        if count > 1:
            raise FixativeError(f"--out {out} is one file but {count} images are rendered; give a folder")
        return [out]
    if out.suffix:
        raise FixativeError(f"--out {out}: images are written as PNG; give a .png file or a folder")
    return [out / f"image-{i:03d}.png" for i in range(count)]


def run(args: argparse.Namespace) -> int:
    import json

    from ..checkpoints import load_model
    from ..compilation import compile_model
    from ..errors import FixativeError
    from ..images import load_image, load_mask, save_png
    from ..lora import apply_lora, parse_lora_spec
    from ..pipelines import default_scheduler_name, generate
    from ..provenance import provenance

    if args.steps < 1 or args.num_images < 1:
        raise FixativeError("--steps and --num-images must be at least 1")
    if (args.mask is not None or args.strength is not None) and args.init_image is None:
        raise FixativeError("--mask and --strength need --init-image")
    paths = _output_paths(args.out, args.num_images)
    image = load_image(args.init_image) if args.init_image is not None else None
    mask = load_mask(args.mask) if args.mask is not None else None
    if mask is not None and mask.size != image.size:
        raise FixativeError(
            f"mask {args.mask} is {mask.width}x{mask.height} but the init image is "
            f"{image.width}x{image.height}; they must be the same size"
        )

    loras = [parse_lora_spec(spec) for spec in args.lora]
    model = load_model(
        args.model, device=resolve_device(args.device), dtype=torch_dtype(args.dtype), config=args.config
    )
    multiple = model.size_multiple
    for name in ("height", "width"):
        value = getattr(args, name)
        if value is not None and (value <= 0 or value % multiple):
            raise FixativeError(
                f"--{name} {value} is not a positive multiple of {multiple} (this model's VAE "
                f"down-sampling factor); use e.g. {max(multiple, value - value % multiple)}"
            )
    for path, lora_scale in loras:
        apply_lora(model, path, lora_scale)
    if args.compile:
        compile_model(model)
    scheduler = args.scheduler or default_scheduler_name(model)
    images = generate(
        model,
        args.prompt,
        args.negative_prompt,
        image=image,
        mask=mask,
        strength=args.strength,
        height=args.height,
        width=args.width,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        guidance_rescale=args.guidance_rescale,
        scheduler=scheduler,
        num_images_per_prompt=args.num_images,
        seed=args.seed,
        clip_skip=args.clip_skip,
        vae_tiling=args.vae_tiling,
        progress=not args.quiet,
    )
    settings = {
        "prompt": args.prompt,
        "negative_prompt": args.negative_prompt or "",
        "seed": args.seed,
        "steps": args.steps,
        "guidance_scale": args.guidance,
        "guidance_rescale": args.guidance_rescale,
        "scheduler": scheduler,
        "model": str(getattr(model, "source", args.model)),
        "height": images[0].height,
        "width": images[0].width,
        "clip_skip": args.clip_skip,
        "dtype": args.dtype,
        "provenance": json.dumps(provenance({"model": args.model}, model.unet.device, model.unet.dtype)),
    }
    if loras:
        settings["lora"] = ", ".join(f"{path}:{lora_scale:g}" for path, lora_scale in loras)
    if image is not None:
        settings.update(
            init_image=str(args.init_image),
            strength=args.strength if args.strength is not None else default_strength(inpainting=mask is not None),
        )
    if mask is not None:
        settings["mask"] = str(args.mask)
    for index, (picture, path) in enumerate(zip(images, paths)):
        save_png(picture, path, {**settings, "image_index": index, "num_images": len(images)})
        print(path)
    return 0
