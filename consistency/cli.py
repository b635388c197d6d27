"""``fixative distill``: distil a Stable Diffusion teacher into a latent consistency model (a full student
folder) or an LCM-LoRA, on core's training loop (entry point ``fixative.commands: consistency``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from fixative.core.cli.options import MODEL_HELP, add_device, add_quiet, add_seed, check_training_device
from fixative.core.parameterization import PREDICTION_TYPES

METHODS = ("lcd", "lcm-lora", "ict")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "distill",
        help="distil a model into a 1-4 step latent consistency model (full student or LCM-LoRA)",
        description="Latent consistency distillation (Luo et al. 2023): train a student that samples in 1-8 "
        "steps (`fixative generate --scheduler lcm`) from a teacher and captioned images, on "
        "fixative's training loop (checkpoints, --resume, accelerate launch). lcd writes a model "
        "folder; lcm-lora writes pytorch_lora_weights.safetensors for the teacher (and its "
        "fine-tunes), used with guidance 1.",
    )
    parser.add_argument("--teacher", default="toy", help=f"the model to distil: {MODEL_HELP} (default: %(default)s)")
    parser.add_argument(
        "--data",
        type=Path,
        required=True,
        help="captioned images, as `fixative finetune` reads them: an image folder with "
        "metadata.jsonl / metadata.csv, or a LAION-style .parquet (with --images); required",
    )
    parser.add_argument(
        "--images",
        type=Path,
        default=None,
        help="with a .parquet: img2dataset's output folder holding the images (default: none)",
    )
    parser.add_argument(
        "--caption-column", default=None, help="the caption column of the metadata (default: text; TEXT for a parquet)"
    )
    parser.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="training image side in pixels; default: the teacher's (UNet sample size x 8)",
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder (checkpoints, the result); required")
    parser.add_argument(
        "--method",
        choices=METHODS,
        default="lcd",
        help="lcd: full student with a guidance embedding; lcm-lora: adapters on the frozen "
        "teacher; ict: consistency training without a teacher (Song & Dhariwal 2023), the teacher's "
        "UNet trained on the data alone (default: %(default)s)",
    )
    parser.add_argument("--max-steps", type=int, default=1000, help="optimiser steps (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per step and process (default: %(default)s)")
    parser.add_argument(
        "--gradient-accumulation", type=int, default=1, help="micro-batches per optimiser step (default: %(default)s)"
    )
    parser.add_argument(
        "--lr",
        type=float,
        default=None,
        help="learning rate (default: 1e-6 for lcd, 1e-4 for lcm-lora, as diffusers' LCM scripts; 1e-5 for ict)",
    )
    parser.add_argument("--warmup", type=int, default=0, help="linear lr warm-up steps (default: %(default)s)")
    parser.add_argument(
        "--lr-schedule",
        choices=("constant", "cosine"),
        default="constant",
        help="after the warm-up: constant, or cosine decay to 5%% of --lr (default: %(default)s)",
    )
    parser.add_argument(
        "--num-ddim-timesteps",
        type=int,
        default=50,
        help="teacher DDIM steps of the skipping-step schedule, k = 1000 / N (default: %(default)s)",
    )
    parser.add_argument(
        "--w-min",
        type=float,
        default=3.0,
        help="smallest guidance weight w (LCM's w: guidance scale 1 + w) (default: %(default)s)",
    )
    parser.add_argument("--w-max", type=float, default=15.0, help="largest guidance weight w (default: %(default)s)")
    parser.add_argument(
        "--loss",
        choices=("huber", "l2"),
        default="huber",
        help="pseudo-Huber (c = --huber-c) or squared error (default: %(default)s)",
    )
    parser.add_argument(
        "--huber-c",
        type=float,
        default=None,
        help="pseudo-Huber c (default: 0.001 for lcd and lcm-lora; 0.00054 sqrt(d), d the latent size, for ict)",
    )
    parser.add_argument(
        "--ema-decay", type=float, default=0.95, help="lcd: decay of the EMA target network (default: %(default)s)"
    )
    parser.add_argument(
        "--average-decay",
        type=float,
        default=None,
        help="also keep a slow EMA of the trained weights (e.g. 0.999) and save it as the result instead of "
        "the last weights (lcd: instead of the target network) (default: off)",
    )
    parser.add_argument(
        "--time-cond-proj-dim",
        type=int,
        default=256,
        help="lcd: width of the guidance-scale embedding (default: %(default)s)",
    )
    parser.add_argument(
        "--student-prediction",
        choices=PREDICTION_TYPES,
        default=None,
        help="lcd: what the student's UNet predicts (its scheduler config says so); v_prediction does not amplify "
        "the network's error at high noise as epsilon does (default: the teacher's)",
    )
    parser.add_argument(
        "--p-mean", type=float, default=-1.1, help="ict: mean of ln(sigma) of the noise levels (default: %(default)s)"
    )
    parser.add_argument(
        "--p-std",
        type=float,
        default=2.0,
        help="ict: deviation of ln(sigma) of the noise levels (default: %(default)s)",
    )
    parser.add_argument(
        "--curriculum-s0",
        type=int,
        default=10,
        help="ict: noise levels at the start of the curriculum, minus one (default: %(default)s)",
    )
    parser.add_argument(
        "--curriculum-s1",
        type=int,
        default=1280,
        help="ict: most noise levels of the curriculum, minus one (default: %(default)s)",
    )
    parser.add_argument("--rank", type=int, default=64, help="lcm-lora: adapter rank (default: %(default)s)")
    parser.add_argument("--alpha", type=float, default=None, help="lcm-lora: adapter alpha (default: the rank)")
    parser.add_argument(
        "--mixed-precision",
        choices=("no", "bf16", "fp16"),
        default="no",
        help="autocast of the UNets' forward passes (default: %(default)s)",
    )
    parser.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="recompute the student's activations in the backward pass (default: off)",
    )
    parser.add_argument(
        "--checkpoint-every",
        type=int,
        default=0,
        help="steps between resumable checkpoints; 0: none (default: %(default)s)",
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue from the latest checkpoint in --out (default: off)"
    )
    parser.add_argument(
        "--validation-prompt",
        action="append",
        default=[],
        help="rendered with the student at 1, 2 and 4 steps at each checkpoint and at the end (validation/step-N/"
        "grid.png: a row per prompt); repeatable (default: none)",
    )
    add_seed(parser, "seed of every random draw")
    add_device(parser)  # under accelerate launch, "auto" lets accelerate give each process its device
    add_quiet(parser)
    parser.set_defaults(func=run)


def validation_guidance(settings) -> float:
    """The guidance scale validation images use: the middle of the trained range for lcd (it embeds w = scale − 1),
    1 (off) for the methods without a guidance embedding."""
    return 1 + (settings.w_min + settings.w_max) / 2 if settings.method == "lcd" else 1.0


def run(args: argparse.Namespace) -> int:
    import torch

    from fixative.core.checkpoints import load_model
    from fixative.core.datasets import captioned_images
    from fixative.core.errors import FixativeError
    from fixative.core.finetune import FinetuneConfig, fine_tune, image_options_for

    from .objective import ConsistencyDistillation, DistillSettings

    check_training_device(args.device, "distillation")
    if not args.data.exists():
        raise FixativeError(f"--data {args.data} does not exist")
    log = (lambda _: None) if args.quiet else print
    settings = DistillSettings(
        method=args.method,
        num_ddim_timesteps=args.num_ddim_timesteps,
        w_min=args.w_min,
        w_max=args.w_max,
        loss=args.loss,
        huber_c=args.huber_c,
        ema_decay=args.ema_decay,
        time_cond_proj_dim=args.time_cond_proj_dim,
        student_prediction=args.student_prediction,
        rank=args.rank,
        alpha=args.alpha,
        p_mean=args.p_mean,
        p_std=args.p_std,
        curriculum_s0=args.curriculum_s0,
        curriculum_s1=args.curriculum_s1,
    )
    teacher = load_model(args.teacher, device="cpu", dtype=torch.float32)
    image = image_options_for(teacher, args.resolution)
    data = captioned_images(args.data, args.images, image, args.caption_column, log=log)
    lr = args.lr if args.lr is not None else {"lcd": 1e-6, "lcm-lora": 1e-4, "ict": 1e-5}[args.method]
    config = FinetuneConfig(
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        gradient_accumulation=args.gradient_accumulation,
        lr=lr,
        warmup=args.warmup,
        lr_schedule=args.lr_schedule,
        ema_decay=args.average_decay,
        mixed_precision=args.mixed_precision,
        gradient_checkpointing=args.gradient_checkpointing,
        cache_latents=True,
        cache_dir=str(args.out.parent / ".fixative-cache"),
        checkpoint_every=args.checkpoint_every,
        validation_prompts=tuple(args.validation_prompt),
        validation_steps=(1, 2, 4),
        validation_guidance=validation_guidance(settings),
        seed=args.seed,
        seed_stream="distill",
        image=image,
    )
    log(f"distill: {len(data)} images, {args.method}, {args.max_steps} steps -> {args.out}")
    fine_tune(
        teacher,
        data,
        config,
        ConsistencyDistillation(settings),
        out=args.out,
        resume=args.resume,
        device=args.device,
        progress=not args.quiet,
        log=log,
    )
    result = "pytorch_lora_weights.safetensors" if args.method == "lcm-lora" else "the model folder"
    print(f"{args.out}: {result}")
    return 0
