"""Seconds per training step and peak memory: ``fine_tune`` against a straightforward diffusers loop.

The reference is diffusers' ``train_text_to_image.py`` reduced to its step: ``UNet2DConditionModel`` +
AdamW, the VAE and text encoder run every step (in the autocast dtype, as that script casts them), the
UNet's forward under autocast, MSE on ε, gradient clipping, an lr scheduler step. Both train the same
SD 1.5-shaped model (random weights, saved once as a diffusers folder and loaded by each side) on the same
batch size and resolution (256 px), in fp32 and with bf16 autocast; fixative also with LoRA (rank 4). Each
(implementation, precision) runs in its own process (so peak memory is its own), rounds interleaved;
medians over rounds and the ratios fixative / diffusers are printed. Every process imports the same
libraries (torch, diffusers, transformers, accelerate, fixative) before it loads the model. Memory (CPU):
the training memory is the peak resident set during the training steps (the high-water mark is reset once
the networks are loaded, cast and the optimiser built, and read after the last step, before fixative casts
the frozen networks back to their own dtype) less the resident set after the imports: networks,
activations, gradients and optimiser state; the ratios are computed on it. The process's whole peak
(loading and the end included) is printed beside it.

    python benchmarks/finetune.py [--quick] [--rounds 2] [--steps 4] [--threads 2]

``--quick``: a narrower UNet (block widths 64/128/256/256; SD 1.5's layout otherwise) and text encoder,
so that it runs in minutes on 2 CPU cores; without it the real SD 1.5 shapes need ~20 GB of memory per process.
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

import torch

IMPLEMENTATIONS = ("fixative", "diffusers", "fixative-lora")
PRECISIONS = ("fp32", "bf16")


def build_folder(folder: Path, quick: bool) -> None:
    from fixative.core.checkpoints import save_diffusers
    from fixative.core.config import CLIPTextConfig, ModelConfig, UNetConfig
    from fixative.core.model import StableDiffusionModel
    from fixative.core.presets import get_preset

    preset = get_preset("sd15")
    config = preset.model_config
    if quick:
        text = CLIPTextConfig(
            hidden_size=256,
            intermediate_size=1024,
            num_hidden_layers=4,
            num_attention_heads=4,
            hidden_act="quick_gelu",
            projection_dim=256,
        )
        unet = UNetConfig(
            **{**vars(config.unet), "block_out_channels": (64, 128, 256, 256), "cross_attention_dim": 256}
        )
        config = ModelConfig(unet, config.vae, text)
    torch.manual_seed(0)
    save_diffusers(StableDiffusionModel.from_config(config, preset.scheduler_config), folder)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def reset_peak_memory(device: torch.device) -> None:
    """Start the peak count anew (CPU: Linux's resident-set high-water mark, /proc/self/clear_refs)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")


def peak_resident_mb(device: torch.device) -> float:
    """The peak since the last reset (CPU: VmHWM)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def resident_mb(device: torch.device) -> float:
    """The memory in use now (CUDA: allocated; CPU: the resident set)."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated() / 2**20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def batch_data(batch: int, resolution: int):
    generator = torch.Generator().manual_seed(0)
    pixels = torch.rand(batch * 4, 3, resolution, resolution, generator=generator) * 2 - 1
    captions = [f"a painting of a house number {i}" for i in range(batch * 4)]
    return pixels, captions


def run_fixative(
    folder: Path, precision: str, lora: bool, steps: int, batch: int, resolution: int, device: torch.device
) -> tuple[list[float], float]:
    from fixative.core.checkpoints import load_model
    from fixative.core.datasets import ImageCaptions
    from fixative.core.finetune import DenoisingObjective, FinetuneConfig, fine_tune

    model = load_model(folder, device=device)
    times, peaks = [], []

    class Timed(DenoisingObjective):
        def setup(self, model, config):
            super().setup(model, config)
            reset_peak_memory(device)

        def after_step(self):
            super().after_step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter())
            peaks.append(peak_resident_mb(device))

    pixels, captions = batch_data(batch, resolution)
    config = FinetuneConfig(
        method="lora" if lora else "full",
        rank=4,
        max_steps=steps + 1,
        batch_size=batch,
        lr=1e-5,
        mixed_precision="no" if precision == "fp32" else "bf16",
    )
    fine_tune(
        model,
        ImageCaptions(pixels, captions),
        config,
        Timed(),
        progress=False,
        log=lambda _: None,
        device="cpu" if device.type == "cpu" else "auto",
    )
    return [b - a for a, b in zip(times, times[1:])], peaks[-1]  # the first step (warm-up) is not counted


def run_diffusers(
    folder: Path, precision: str, steps: int, batch: int, resolution: int, device: torch.device
) -> tuple[list[float], float]:
    import diffusers
    import torch.nn.functional as F
    import transformers

    weight_dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    unet = diffusers.UNet2DConditionModel.from_pretrained(folder, subfolder="unet").to(device).train()
    vae = (
        diffusers.AutoencoderKL.from_pretrained(folder, subfolder="vae").to(device, weight_dtype).requires_grad_(False)
    )
    text_encoder = transformers.CLIPTextModel.from_pretrained(folder, subfolder="text_encoder").to(device, weight_dtype)
    text_encoder.requires_grad_(False)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
    noise_scheduler = diffusers.DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-5, weight_decay=1e-2)
    lr_scheduler = diffusers.optimization.get_scheduler("constant", optimizer=optimizer)
    reset_peak_memory(device)
    pixels, captions = batch_data(batch, resolution)
    generator = torch.Generator().manual_seed(0)
    times = []
    for _ in range(steps + 1):
        index = torch.randint(0, len(pixels), (batch,), generator=generator)
        input_ids = tokenizer(
            [captions[i] for i in index], padding="max_length", max_length=77, truncation=True, return_tensors="pt"
        ).input_ids.to(device)
        latents = vae.encode(pixels[index].to(device, weight_dtype)).latent_dist.sample()
        latents = latents * vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=generator).to(device, latents.dtype)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch,), generator=generator).to(
            device
        )
        noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
        encoder_hidden_states = text_encoder(input_ids, return_dict=False)[0]
        with torch.autocast(device.type, torch.bfloat16, enabled=precision == "bf16"):
            model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
        loss = F.mse_loss(model_pred.float(), noise.float(), reduction="mean")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter())
    return [b - a for a, b in zip(times, times[1:])], peak_resident_mb(device)


def worker(args) -> None:
    import accelerate  # noqa: F401  (the same libraries in every process, so that the baseline is the same)
    import diffusers  # noqa: F401
    import transformers  # noqa: F401

    import fixative.core.finetune  # noqa: F401

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    baseline = resident_mb(device)
    if args.implementation == "diffusers":
        times, training_peak = run_diffusers(
            args.folder, args.precision, args.steps, args.batch, args.resolution, device
        )
    else:
        times, training_peak = run_fixative(
            args.folder,
            args.precision,
            args.implementation == "fixative-lora",
            args.steps,
            args.batch,
            args.resolution,
            device,
        )
    print(
        json.dumps(
            {
                "seconds_per_step": statistics.median(times),
                "peak_mb": peak_memory_mb(device),
                "training_mb": training_peak - baseline,
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a narrower SD 1.5-shaped model (minutes on 2 cores)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per run (after one warm-up step)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--worker", nargs=2, metavar=("IMPLEMENTATION", "PRECISION"), help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.implementation, args.precision = args.worker
        worker(args)
        return
    results: dict[tuple[str, str], list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "sd15-shaped"
        build_folder(folder, args.quick)
        for round_index in range(args.rounds):
            for precision in PRECISIONS:
                for implementation in IMPLEMENTATIONS:
                    command = [
                        sys.executable,
                        __file__,
                        "--worker",
                        implementation,
                        precision,
                        "--folder",
                        str(folder),
                        "--steps",
                        str(args.steps),
                        "--batch",
                        str(args.batch),
                        "--resolution",
                        str(args.resolution),
                        "--threads",
                        str(args.threads),
                        "--device",
                        args.device,
                    ]
                    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
                    result = json.loads(output.strip().splitlines()[-1])
                    results.setdefault((implementation, precision), []).append(result)
                    print(
                        f"round {round_index + 1} {implementation:14} {precision}: "
                        f"{result['seconds_per_step']:.3f} s/step, peak {result['peak_mb']:.0f} MB, "
                        f"training {result['training_mb']:.0f} MB",
                        flush=True,
                    )
    median = {
        key: {k: statistics.median(r[k] for r in runs) for k in ("seconds_per_step", "peak_mb", "training_mb")}
        for key, runs in results.items()
    }
    shape = "SD 1.5 layout, narrower (--quick)" if args.quick else "SD 1.5"
    print(
        f"\n{shape}, batch {args.batch}, {args.resolution} px, {args.device}, {args.threads} threads, "
        f"median of {args.rounds} rounds x {args.steps} steps"
    )
    print(
        "training memory = peak resident set during training less the resident set after the imports (MB); "
        "ratios on it; in brackets the ratios of the whole process's peak (loading included)"
    )
    print(
        f"{'':8} {'fixative s/step':>16} {'diffusers s/step':>17} {'time ratio':>11} {'ours MB':>8} "
        f"{'diffusers MB':>13} {'LoRA MB':>8} {'memory ratio':>17} {'LoRA / full memory':>22}"
    )
    for precision in PRECISIONS:
        ours, theirs, lora = (median[(i, precision)] for i in IMPLEMENTATIONS)
        print(
            f"{precision:8} {ours['seconds_per_step']:16.3f} {theirs['seconds_per_step']:17.3f} "
            f"{ours['seconds_per_step'] / theirs['seconds_per_step']:10.2f}x {ours['training_mb']:8.0f} "
            f"{theirs['training_mb']:13.0f} {lora['training_mb']:8.0f} "
            f"{ours['training_mb'] / theirs['training_mb']:6.2f}x ({ours['peak_mb'] / theirs['peak_mb']:.2f}x) "
            f"{lora['training_mb'] / ours['training_mb']:11.2f}x ({lora['peak_mb'] / ours['peak_mb']:.2f}x)"
        )


if __name__ == "__main__":
    main()
