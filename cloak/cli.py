"""``fixative cloak``: protect artwork before publishing (a thin layer over ``fixative.cloak.api.cloak_files``).

Registered through the entry point ``fixative.commands: cloak``; heavy imports happen inside ``run``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fixative.core.cli import options

METHODS = ("glaze", "mist", "photoguard", "anti-dreambooth")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "cloak",
        help="cloak artwork so that models fine-tuned on it learn the wrong style",
        description="Add a small perturbation, bounded by a perceptual budget that holds on the stored 8-bit "
        "file, so that a diffusion model fine-tuned on the published images mimics the wrong style. "
        "Files and folders (recursive) in; PNG (TIFF for CMYK) and a JSON record per image out, "
        "summary.json beside them. Re-running with the same settings skips finished images.",
    )
    parser.add_argument("inputs", nargs="+", type=Path, metavar="INPUT", help="image files and/or folders")
    parser.add_argument("--out", type=Path, required=True, help="output folder (created); required")
    parser.add_argument("--model", default="toy", help=f"{options.MODEL_HELP} (default: %(default)s)")
    parser.add_argument("--method", choices=METHODS, default="glaze", help="protection (default: %(default)s)")
    parser.add_argument(
        "--target-style",
        default=None,
        help="glaze's target style: a text such as 'cubism', or 'auto' (a style between the 50th "
        "and 75th percentile of CLIP distance from the artworks); default: none (required "
        "for glaze)",
    )
    parser.add_argument(
        "--clip",
        type=Path,
        default=None,
        help="CLIP model folder for --target-style auto (default: the toy CLIP with --model toy)",
    )
    parser.add_argument(
        "--budget",
        action="append",
        default=None,
        metavar="METRIC=VALUE",
        help="perceptual bound, repeatable: lpips=0.07, ssim=0.95, psnr=32 (dB), linf=16/255; "
        "every bound holds on the stored file (default: lpips=0.07)",
    )
    parser.add_argument(
        "--lpips-net", choices=("alex", "vgg"), default="alex", help="LPIPS network (default: %(default)s)"
    )
    parser.add_argument(
        "--lpips-weights",
        type=Path,
        default=None,
        help="torchvision's backbone file (alexnet-owt-7be5be79.pth / vgg16-397923af.pth); default: "
        "looked up in $TORCH_HOME/hub/checkpoints",
    )
    parser.add_argument(
        "--lpips-backbone",
        choices=("pretrained", "random"),
        default="pretrained",
        help="'random' is for testing the mechanics only (not LPIPS; written in every record) (default: %(default)s)",
    )
    parser.add_argument("--steps", type=int, default=500, help="optimisation steps (default: %(default)s)")
    parser.add_argument(
        "--lr", type=float, default=0.01, help="learning rate (Adam) or step (PGD) (default: %(default)s)"
    )
    parser.add_argument(
        "--optimiser",
        choices=("adam", "pgd"),
        default="adam",
        help="Adam, or signed PGD with momentum (default: %(default)s)",
    )
    parser.add_argument(
        "--schedule",
        choices=("constant", "cosine", "linear"),
        default="constant",
        help="step size over the run: constant, or cosine / linear decay to 0 at --steps (default: %(default)s)",
    )
    parser.add_argument(
        "--alpha",
        type=float,
        default=30.0,
        help="weight of the LPIPS / SSIM budget penalty (Glaze's alpha) (default: %(default)s)",
    )
    parser.add_argument(
        "--plateau",
        type=int,
        default=0,
        help="stop when the objective has not improved for this many steps; 0 = never (default: %(default)s)",
    )
    parser.add_argument(
        "--strength", type=float, default=0.5, help="img2img strength of glaze's style target (default: %(default)s)"
    )
    parser.add_argument(
        "--target-guidance",
        type=float,
        default=7.5,
        help="guidance scale of glaze's style target (default: %(default)s)",
    )
    parser.add_argument(
        "--target-steps",
        type=int,
        default=25,
        help="solver steps of glaze's style target, before strength (default: %(default)s)",
    )
    parser.add_argument(
        "--latent-pool",
        type=int,
        default=1,
        help="glaze: compare k x k averages of the latents; k >= the latent size compares their per-channel means "
        "(default: %(default)s, Glaze's own per-latent distance)",
    )
    parser.add_argument(
        "--target-push",
        type=float,
        default=1.0,
        help="glaze: aim this far along the way from the image's latents to the target's; > 1 aims past the "
        "target (default: %(default)s)",
    )
    parser.add_argument(
        "--semantic-weight",
        type=float,
        default=0.0,
        help="glaze: add this weight times the UNet's denoising loss under the target style's prompt, so that the "
        "model explains the cloaked image as the target style (default: %(default)s, off)",
    )
    parser.add_argument(
        "--semantic-prompt",
        help="glaze: the semantic term's prompt; {style} is the target style, {caption} each image's caption "
        "(IMAGE.txt beside it, or its folder's metadata.jsonl), e.g. '{caption}, by {style}' "
        "(default: the style target's prompt, 'a painting by {style}')",
    )
    parser.add_argument(
        "--surrogate-warmup",
        type=int,
        default=0,
        help="anti-dreambooth: fine-tune one surrogate this many steps on all the batch's images first "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--surrogate-every",
        type=int,
        default=10,
        help="anti-dreambooth: perturbation steps between surrogate updates; 0 = never, attack the warmed-up "
        "surrogate as it is (default: %(default)s)",
    )
    parser.add_argument(
        "--robust",
        default="",
        help="EOT transforms during optimisation, comma separated: jpeg,resize,blur,noise (default: none)",
    )
    parser.add_argument(
        "--format",
        choices=("png", "jpeg"),
        default="png",
        help="output format; JPEG weakens the cloak and warns (default: %(default)s)",
    )
    parser.add_argument(
        "--tile-size",
        type=int,
        default=1024,
        help="images larger than this (pixels) are cloaked in overlapping tiles (default: %(default)s)",
    )
    options.add_seed(parser, "seed of every random draw")
    options.add_dtype(parser, help="model precision")
    parser.add_argument(
        "--autocast",
        choices=("none", "bf16", "fp16"),
        default="none",
        help="run the objective under torch.autocast in this precision; bf16 is fast on GPUs and on CPUs with "
        "AVX512-BF16 or AMX (default: %(default)s)",
    )
    options.add_device(parser)
    options.add_quiet(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from fixative.core.checkpoints import load_model

    from .api import cloak_files, launch_state, summary_table
    from .bounds import parse_budget
    from .objectives import ASPLConfig
    from .optimise import OptimiserConfig
    from .protect import CloakConfig
    from .robust import parse_robust
    from .targets import StyleTargetConfig

    torch.manual_seed(args.seed)
    config = CloakConfig(
        method=args.method,
        budget=parse_budget(args.budget or ["lpips=0.07"]),
        optimiser=OptimiserConfig(
            steps=args.steps,
            lr=args.lr,
            optimiser=args.optimiser,
            schedule=args.schedule,
            alpha=args.alpha,
            plateau_steps=args.plateau,
            autocast=None if args.autocast == "none" else args.autocast,
        ),
        target_style=args.target_style,
        style_target=StyleTargetConfig(
            strength=args.strength, guidance_scale=args.target_guidance, steps=args.target_steps
        ),
        latent_pool=args.latent_pool,
        target_push=args.target_push,
        semantic_weight=args.semantic_weight,
        semantic_prompt=args.semantic_prompt,
        aspl=ASPLConfig(every=args.surrogate_every, warmup_steps=args.surrogate_warmup),
        robust=parse_robust(args.robust),
        lpips_net=args.lpips_net,
        lpips_backbone=args.lpips_backbone,
        lpips_weights=str(args.lpips_weights) if args.lpips_weights else None,
        seed=args.seed,
    )
    if config.method == "glaze" and not config.target_style:
        from fixative.core.errors import FixativeError

        raise FixativeError("glaze needs --target-style TEXT or --target-style auto")
    device = options.resolve_device(args.device)
    state = launch_state(cpu=device.type == "cpu")
    if state is not None and args.device == "auto":  # a multi-process launch: each process on its own device
        device = state.device
    model = load_model(args.model, device=device, dtype=options.torch_dtype(args.dtype))
    log = (lambda *a, **k: None) if args.quiet else print
    summary = cloak_files(
        args.inputs, args.out, model, config, args.format, args.tile_size, args.clip, progress=not args.quiet, log=log
    )
    if not args.quiet and (state is None or state.is_main_process):
        print(summary_table(summary))
        print(f"wrote {args.out / 'summary.json'}")
    return 1 if summary["failed"] else 0
