"""``fixative finetune``: fine-tune a Stable Diffusion model on captioned images (full, LoRA, DreamBooth), a
thin layer over ``fixative.core.finetune.fine_tune``. Runs as it is under ``accelerate launch``."""

from __future__ import annotations

import argparse
from pathlib import Path

from .options import MODEL_HELP, add_device, add_quiet, add_seed, check_training_device

# core/finetune.py's METHODS, LR_SCHEDULES and MIXED_PRECISION names (it imports torch; --help must not);
# tests/core/cli/test_cli_finetune.py checks that they agree
METHODS = ("full", "lora", "dreambooth")
LR_SCHEDULES = ("constant", "cosine")
MIXED_PRECISION = ("no", "bf16", "fp16")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "finetune",
        help="fine-tune a model on captioned images (full, LoRA, DreamBooth)",
        description="Fine-tune a Stable Diffusion model on an image folder with captions (metadata.jsonl / "
        "metadata.csv) or a LAION-style parquet with img2dataset images. full/dreambooth write a "
        "diffusers folder to --out; lora writes --out/pytorch_lora_weights.safetensors (use it with "
        "`fixative generate --lora`). Runs unchanged under `accelerate launch`.",
    )
    add = parser.add_argument
    add("--model", default="toy", help=f"base model: {MODEL_HELP} (default: %(default)s)")
    add(
        "--data",
        type=Path,
        required=True,
        help="an image folder with metadata.jsonl/.csv (a train/ sub-folder is used when present) or a .parquet "
        "of LAION-style metadata (then give --images); required",
    )
    add(
        "--images",
        type=Path,
        default=None,
        help="with a parquet: img2dataset's output folder (WebDataset .tar shards or files) (default: none)",
    )
    add("--out", type=Path, required=True, help="output folder (checkpoints, validation images, the result); required")
    add("--caption-column", default=None, help="caption column (default: text; TEXT for a parquet)")
    add(
        "--method",
        choices=METHODS,
        default="full",
        help="full: every UNet weight; lora: low-rank adapters; dreambooth: full with --instance-prompt and "
        "prior preservation (default: %(default)s)",
    )
    add("--rank", type=int, default=4, help="LoRA rank (default: %(default)s)")
    add("--alpha", type=float, default=None, help="LoRA alpha; the update is scaled by alpha/rank (default: the rank)")
    add(
        "--lora-targets",
        default="to_q,to_k,to_v,to_out.0",
        help="comma-separated endings of the UNet Linear layers LoRA adapts, e.g. add ff.net.0.proj,ff.net.2 for "
        "the feed-forward layers (default: %(default)s, the attention projections)",
    )
    add("--train-text-encoder", action="store_true", help="also train the text encoder (default: frozen)")
    add("--instance-prompt", default=None, help="caption every training image with this (default: their captions)")
    add("--class-prompt", default=None, help="DreamBooth prior preservation: the class images' prompt (default: none)")
    add(
        "--prior-images",
        type=int,
        default=0,
        help="class images to generate from --class-prompt when no --prior-data is given (default: %(default)s)",
    )
    add(
        "--prior-data",
        type=Path,
        default=None,
        help="an image folder of prior (class) images with captions, instead of generating them (default: none)",
    )
    add(
        "--prior-loss-weight",
        type=float,
        default=1.0,
        help="weight of the prior-preservation loss (default: %(default)s)",
    )
    add("--prior-batch-size", type=int, default=None, help="prior images per batch (default: --batch-size)")
    add("--resolution", type=int, default=None, help="training resolution in pixels (default: the model's)")
    add(
        "--center-crop",
        action="store_true",
        help="square centre crops instead of aspect-ratio buckets (default: buckets)",
    )
    add(
        "--random-crop",
        action="store_true",
        help="square random crops instead of aspect-ratio buckets (default: buckets)",
    )
    add("--random-flip", action="store_true", help="mirror images at random (default: off)")
    add("--shuffle-tags", action="store_true", help="shuffle comma-separated tags of each caption (default: off)")
    add(
        "--keep-tags",
        type=int,
        default=1,
        help="with --shuffle-tags: keep the first N tags in place (default: %(default)s)",
    )
    for name, help_text in (
        ("min-width", "keep parquet rows with WIDTH >= this"),
        ("min-height", "keep parquet rows with HEIGHT >= this"),
        ("min-similarity", "keep parquet rows with similarity >= this"),
        ("max-watermark", "keep parquet rows with pwatermark <= this"),
        ("max-unsafe", "keep parquet rows with punsafe <= this"),
    ):
        add(f"--{name}", type=float, default=None, help=f"{help_text} (default: no filter)")
    add("--max-steps", type=int, default=1000, help="optimiser steps (default: %(default)s)")
    add("--batch-size", type=int, default=1, help="images per batch and process (default: %(default)s)")
    add("--gradient-accumulation", type=int, default=1, help="batches per optimiser step (default: %(default)s)")
    add("--lr", type=float, default=1e-4, help="learning rate (default: %(default)s)")
    add("--weight-decay", type=float, default=1e-2, help="AdamW weight decay (default: %(default)s)")
    add("--lr-schedule", choices=LR_SCHEDULES, default="constant", help="after the warm-up (default: %(default)s)")
    add("--warmup", type=int, default=0, help="linear warm-up steps (default: %(default)s)")
    add("--ema-decay", type=float, default=None, help="keep an EMA of the weights and save it (default: off)")
    add("--snr-gamma", type=float, default=None, help="Min-SNR-gamma loss weighting; 5 is usual (default: off)")
    add("--offset-noise", type=float, default=0.0, help="offset noise strength; 0.1 is usual (default: %(default)s)")
    add("--caption-dropout", type=float, default=0.0, help="share of captions dropped to '' (default: %(default)s)")
    add(
        "--mixed-precision",
        choices=MIXED_PRECISION,
        default="no",
        help="autocast of the UNet's forward pass (default: %(default)s)",
    )
    add("--gradient-checkpointing", action="store_true", help="recompute activations to save memory (default: off)")
    add(
        "--cache-latents",
        action="store_true",
        help="encode each image once; keep the VAE posteriors (sampled anew each step) and, with the text "
        "encoder frozen, the text embeddings on disk in --cache-dir, keyed by content hash (default: off)",
    )
    add("--cache-dir", type=Path, default=None, help="latent cache folder (default: OUT/../.fixative-cache)")
    add("--checkpoint-every", type=int, default=0, help="steps between checkpoints; 0: none (default: %(default)s)")
    add("--resume", action="store_true", help="continue from the latest checkpoint in --out (default: off)")
    add(
        "--validation-prompt",
        action="append",
        default=[],
        help="render this prompt at each checkpoint and at the end; repeatable (default: none)",
    )
    add_seed(parser, "seed of every random draw")
    add_device(parser)  # under accelerate launch, "auto" lets accelerate give each process its device
    add_quiet(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..checkpoints import load_model
    from ..datasets import MetadataFilters, captioned_images, image_folder
    from ..errors import FixativeError
    from ..finetune import FinetuneConfig, fine_tune, image_options_for

    if args.center_crop and args.random_crop:
        raise FixativeError("--center-crop and --random-crop exclude each other")
    check_training_device(args.device, "fine-tuning")
    log = (lambda _: None) if args.quiet else print
    model = load_model(args.model, device="cpu", dtype=torch.float32)
    image = image_options_for(
        model,
        args.resolution,
        bucketing=not (args.center_crop or args.random_crop),
        random_crop=args.random_crop,
        random_flip=args.random_flip,
    )
    filters = MetadataFilters(args.min_width, args.min_height, args.min_similarity, args.max_watermark, args.max_unsafe)
    data = captioned_images(args.data, args.images, image, args.caption_column, filters, log=log)
    prior = image_folder(args.prior_data, image, args.caption_column or "text") if args.prior_data else None
    cache_dir = args.cache_dir or args.out.parent / ".fixative-cache"
    config = FinetuneConfig(
        method=args.method,
        rank=args.rank,
        alpha=args.alpha,
        train_text_encoder=args.train_text_encoder,
        lora_targets=tuple(t.strip() for t in args.lora_targets.split(",") if t.strip()),
        instance_prompt=args.instance_prompt,
        class_prompt=args.class_prompt,
        prior_images=args.prior_images,
        prior_loss_weight=args.prior_loss_weight,
        prior_batch_size=args.prior_batch_size,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        gradient_accumulation=args.gradient_accumulation,
        lr=args.lr,
        weight_decay=args.weight_decay,
        lr_schedule=args.lr_schedule,
        warmup=args.warmup,
        ema_decay=args.ema_decay,
        snr_gamma=args.snr_gamma,
        offset_noise=args.offset_noise,
        caption_dropout=args.caption_dropout,
        shuffle_tags=args.shuffle_tags,
        keep_tags=args.keep_tags,
        mixed_precision=args.mixed_precision,
        gradient_checkpointing=args.gradient_checkpointing,
        cache_latents=args.cache_latents,
        cache_dir=str(cache_dir) if args.cache_latents else None,
        checkpoint_every=args.checkpoint_every,
        validation_prompts=tuple(args.validation_prompt),
        seed=args.seed,
        image=image,
    )
    if args.method == "dreambooth" and prior is None and not args.prior_images:
        raise FixativeError("dreambooth needs prior images: --prior-data DIR or --prior-images N")
    log(
        f"fine-tune: {len(data)} images"
        + (f", {len(prior)} prior images" if prior is not None else "")
        + f", {args.method}, {args.max_steps} steps -> {args.out}"
    )
    fine_tune(
        model,
        data,
        config,
        out=args.out,
        prior_data=prior,
        resume=args.resume,
        device=args.device,
        progress=not args.quiet,
        log=log,
    )
    result = args.out / "pytorch_lora_weights.safetensors" if args.method == "lora" else args.out
    print(result)
    return 0
