"""End-to-end seconds per image: fixative's ``generate`` vs diffusers' StableDiffusionPipeline.

Both render from the same diffusers folder (the SD 1.5 architecture with random weights, built once
into a temporary folder), with the same scheduler, steps, guidance, size, seed and threads. Each run is
a fresh subprocess (model loading, one warm-up image, then the timed images), runs alternate between
the two implementations, and the median is kept. Peak memory is the subprocess's maximum resident set
size (``resource.getrusage``; it includes loading the weights), or ``torch.cuda.max_memory_allocated``
on a GPU. Prints the ratio fixative / diffusers (target: <= 1.00) and the largest pixel difference
between the two renders.

    .venv/bin/python benchmarks/pipeline.py            # SD 1.5 architecture, 256x256, 10 steps, 3 runs each
    .venv/bin/python benchmarks/pipeline.py --quick    # a small UNet/VAE, 128x128, 4 steps, 2 runs each
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "an oil painting of a lighthouse on a cliff at dusk"
NEGATIVE = "blurry, low quality"


def build_folder(folder: Path, quick: bool) -> None:
    """A diffusers folder: SD 1.5's UNet, VAE and CLIP ViT-L/14 text encoder (random weights), or small ones."""
    import diffusers
    import torch
    import transformers

    from fixative.core.tokenizer import CLIPTokenizer

    torch.manual_seed(0)
    if quick:
        unet = diffusers.UNet2DConditionModel(
            block_out_channels=(64, 128, 256, 256),
            layers_per_block=1,
            cross_attention_dim=256,
            attention_head_dim=4,
            sample_size=16,
        )
        vae = diffusers.AutoencoderKL(
            block_out_channels=(32, 64, 64, 64),
            layers_per_block=1,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
            sample_size=128,
        )
        text_config = transformers.CLIPTextConfig(
            hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4, projection_dim=256
        )
    else:
        unet = diffusers.UNet2DConditionModel(sample_size=64, cross_attention_dim=768)  # SD 1.5's defaults
        vae = diffusers.AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
            sample_size=512,
        )
        text_config = transformers.CLIPTextConfig(
            hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768
        )
    text_config.update(
        {
            "vocab_size": 49408,
            "max_position_embeddings": 77,
            "hidden_act": "quick_gelu",
            "bos_token_id": 49406,
            "eos_token_id": 49407,
            "pad_token_id": 1,
        }
    )
    text_encoder = transformers.CLIPTextModel(text_config)
    tokenizer_folder = folder.with_name(folder.name + "-tokenizer")
    CLIPTokenizer.bundled().save(tokenizer_folder)
    scheduler = diffusers.DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=transformers.CLIPTokenizer.from_pretrained(tokenizer_folder),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)


def worker(args: argparse.Namespace) -> None:
    """One run in this process: load, warm up, time ``--images`` renders; print one JSON line."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    settings = dict(num_inference_steps=args.steps, guidance_scale=7.5, height=args.size, width=args.size)
    start = time.perf_counter()
    if args.worker == "fixative":
        from fixative.core.checkpoints import load_model
        from fixative.core.pipelines import generate

        model = load_model(args.folder, device=device, dtype=dtype)

        def render(steps: int):
            return generate(
                model,
                PROMPT,
                NEGATIVE,
                scheduler=args.scheduler,
                seed=0,
                progress=False,
                **dict(settings, num_inference_steps=steps),
            )[0]
    else:
        import diffusers

        names = {
            "ddim": "DDIMScheduler",
            "euler": "EulerDiscreteScheduler",
            "euler-a": "EulerAncestralDiscreteScheduler",
            "dpm++2m": "DPMSolverMultistepScheduler",
        }
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(
            args.folder, torch_dtype=dtype, safety_checker=None, requires_safety_checker=False
        ).to(device)
        pipe.scheduler = getattr(diffusers, names[args.scheduler]).from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)

        def render(steps: int):
            return pipe(
                PROMPT,
                negative_prompt=NEGATIVE,
                generator=torch.Generator("cpu").manual_seed(0),
                **dict(settings, num_inference_steps=steps),
            ).images[0]

    load_seconds = time.perf_counter() - start
    render(2)  # warm-up
    seconds = []
    for _ in range(args.images):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        image = render(args.steps)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    image.save(args.image_out)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device.type == "cuda":
        peak_mib = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps({"seconds": statistics.median(seconds), "load_seconds": load_seconds, "peak_mib": peak_mib}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small networks, 128x128, 4 steps, 2 runs each")
    parser.add_argument("--runs", type=int, default=None, help="subprocess runs per implementation")
    parser.add_argument("--images", type=int, default=1, help="timed images per run (after one warm-up)")
    parser.add_argument("--size", type=int, default=None, help="image height and width")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps")
    parser.add_argument("--scheduler", default="dpm++2m", choices=("ddim", "euler", "euler-a", "dpm++2m"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"))
    parser.add_argument("--threads", type=int, default=0, help="torch threads per run (0: torch's default)")
    parser.add_argument("--folder", type=Path, default=None, help="reuse a model folder instead of building one")
    parser.add_argument("--worker", choices=("fixative", "diffusers"), help=argparse.SUPPRESS)
    parser.add_argument("--image-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.runs = args.runs or (2 if args.quick else 3)
    args.size = args.size or (128 if args.quick else 256)
    args.steps = args.steps or (4 if args.quick else 10)
    if args.worker:
        worker(args)
        return

    import numpy as np
    from PIL import Image

    with tempfile.TemporaryDirectory(prefix="fixative-bench-") as temporary:
        temporary = Path(temporary)
        if args.folder is None:
            args.folder = temporary / "model"
            start = time.perf_counter()
            build_folder(args.folder, args.quick)
            print(
                f"built {'small' if args.quick else 'SD 1.5-architecture'} folder in "
                f"{time.perf_counter() - start:.0f} s",
                flush=True,
            )
        results = {"fixative": [], "diffusers": []}
        for run in range(args.runs):
            order = ("fixative", "diffusers") if run % 2 == 0 else ("diffusers", "fixative")
            for name in order:
                command = [
                    sys.executable,
                    __file__,
                    "--worker",
                    name,
                    "--folder",
                    str(args.folder),
                    "--image-out",
                    str(temporary / f"{name}.png"),
                    "--size",
                    str(args.size),
                    "--steps",
                    str(args.steps),
                    "--images",
                    str(args.images),
                    "--scheduler",
                    args.scheduler,
                    "--device",
                    args.device,
                    "--dtype",
                    args.dtype,
                    "--threads",
                    str(args.threads),
                ]
                done = subprocess.run(command, capture_output=True, text=True)
                if done.returncode:
                    sys.exit(f"{name} run failed:\n{done.stderr[-3000:]}")
                result = json.loads(done.stdout.strip().splitlines()[-1])
                results[name].append(result)
                print(
                    f"run {run + 1} {name:9s} {result['seconds']:7.2f} s/image  load {result['load_seconds']:5.1f} s"
                    f"  peak {result['peak_mib']:7.0f} MiB",
                    flush=True,
                )
        difference = np.abs(
            np.asarray(Image.open(temporary / "fixative.png"), dtype=np.int16)
            - np.asarray(Image.open(temporary / "diffusers.png"), dtype=np.int16)
        ).max()

    median = {name: statistics.median(r["seconds"] for r in runs) for name, runs in results.items()}
    peak = {name: max(r["peak_mib"] for r in runs) for name, runs in results.items()}
    import torch

    threads = args.threads or torch.get_num_threads()
    print(
        f"\n{args.size}x{args.size}, {args.steps} steps ({args.scheduler}), guidance 7.5, {args.device} {args.dtype}, "
        f"{threads} threads, {args.runs} runs each, median s/image"
    )
    print(f"{'':10s} {'s/image':>8s} {'peak MiB':>9s}")
    for name in ("fixative", "diffusers"):
        print(f"{name:10s} {median[name]:8.2f} {peak[name]:9.0f}")
    print(
        f"ratio fixative/diffusers: time {median['fixative'] / median['diffusers']:.2f}, "
        f"peak memory {peak['fixative'] / peak['diffusers']:.2f} (target time <= 1.00)"
    )
    print(f"largest pixel difference between the two renders: {difference}/255")


if __name__ == "__main__":
    main()
