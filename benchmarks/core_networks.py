"""fixative's networks vs diffusers / transformers on the same weights, threads and inputs.

Runs are interleaved (ours, theirs, ours, ...) and the median is kept. Prints, per case, the ratio
fixative time / reference time (target: no ratio above 0.80), the peak memory each used during the call
(RSS above the call's start, freed memory handed back to the system first; the figure counts memory our
networks keep between calls, such as packed weights), for bf16 the relative error of each implementation
against its own fp32 output, and how far each is from the machine's limit: the FLOPs of one call
(torch.utils.flop_counter, counted on the reference) per second, beside the peak FLOP/s of a large matmul in
the same dtype measured at the start.

The rows (SD 1.5 shapes, random weights), each in fp32 and bf16 (text encoder: fp32):
  unet      UNet forward, batch 2 (classifier-free guidance), 32x32 and 64x64 latents (256 / 512 px)
  unet-grad UNet forward + backward to the weights, batch 1 (a fine-tuning / distillation step), 32x32 and 64x64
  vae       VAE decode at 512 px
  vae-grad  VAE encoder forward + backward to the input pixels at 512 px (a cloaking step)
  text      CLIP text encoder, batch 2
``--full`` keeps the 512 px / 64x64 rows, ``--quick`` the small ones (UNet 32x32, VAE 256 px).

    .venv/bin/python benchmarks/core_networks.py --threads 2 --repeats 3   # every row above (about 13 min on
                                                                           # 2 idle threads, twice that on 1)
    .venv/bin/python benchmarks/core_networks.py --quick    # one repeat, small cases only (minutes)
    .venv/bin/python benchmarks/core_networks.py --full     # the 512 px / 64x64-latent rows only
    .venv/bin/python benchmarks/core_networks.py --only unet --full --compile   # + our UNet compiled, frozen
    .venv/bin/python benchmarks/core_networks.py --full --profile   # one profiled call each, operator tables
    .venv/bin/python benchmarks/core_networks.py --quick --threads 1 --cpu-time   # on a shared machine: CPU time
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import gc
import os
import statistics
import sys
import threading
import time

import torch


class PeakMemory:
    """Peak memory above the starting level during a block: CUDA allocator stats, else sampled RSS."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_mib = 0.0

    @staticmethod
    def _rss_bytes() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated()
            return self
        self._start = self._rss_bytes()
        self._peak = self._start
        self._running = True

        def sample():
            while self._running:
                self._peak = max(self._peak, self._rss_bytes())
                time.sleep(0.002)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak_mib = (torch.cuda.max_memory_allocated() - self._start) / 2**20
        else:
            self._running = False
            self._thread.join()
            self.peak_mib = (max(self._peak, self._rss_bytes()) - self._start) / 2**20


def release_free_memory() -> None:
    """Hand memory that glibc's malloc keeps after frees back to the system (malloc_trim), so that a call's
    RSS peak above its start counts every page it needs: pages kept from an earlier call (of the other
    implementation, or of another case) would otherwise be reused unseen and lower that call's figure."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def timed(fn, device: torch.device, grad: bool = False, trim: bool = False) -> tuple[float, float, torch.Tensor]:
    """Seconds, peak MiB and output of fn(); under inference_mode unless ``grad`` (fn runs a backward);
    ``trim``: first hand freed memory back to the system (release_free_memory)."""
    if trim:
        release_free_memory()
    gc.collect()
    with PeakMemory(device) as memory, torch.inference_mode(not grad):
        start = CLOCK()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = CLOCK() - start
    return seconds, memory.peak_mib, out


@functools.cache
def peak_flops(dtype: torch.dtype, device: torch.device, size: int = 3072, repeats: int = 5) -> float:
    """FLOP/s of the fastest of ``repeats`` (size x size) @ (size x size) matmuls: what the machine can do."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats + 1):  # the first call warms up
        start = time.perf_counter()
        torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


CLOCK = time.perf_counter  # --cpu-time: time.process_time
PROFILE_ROWS = 0  # with --profile: operator-table rows printed per call instead of timing (0: time)


def profiled(name: str, ours, theirs, grad: bool):
    """One call of each under torch.profiler (after a warm-up call for the UNet rows, whose up-sampling
    fold is cached on the first call): the operators by self CPU time. Returns both outputs."""
    from torch.profiler import ProfilerActivity, profile

    outputs = []
    for label, fn in (("fixative", ours), ("reference", theirs)):
        if name.startswith("unet"):
            timed(fn, torch.device("cpu"), grad)
        gc.collect()
        with profile(activities=[ProfilerActivity.CPU]) as prof, torch.inference_mode(not grad):
            start = time.perf_counter()
            outputs.append(fn())
            seconds = time.perf_counter() - start
        table = prof.key_averages().table(
            sort_by="self_cpu_time_total", row_limit=PROFILE_ROWS, max_name_column_width=48
        )
        print(f"=== {name}: {label}, one call {seconds:.2f} s (profiled)\n{table}", flush=True)
    return outputs


def compare(name: str, ours, theirs, device: torch.device, repeats: int, reference_outputs=None, grad=False):
    """Interleaved timing, the median of ``repeats`` calls each; ``grad``: the calls run a backward pass.
    First one call of the reference, neither timed nor in the memory figures: it counts the FLOPs and pays
    the process's one-time allocations for the case (oneDNN primitives and buffers: about 17-20 MiB for the bf16
    UNet at 32x32 latents), which otherwise went to whichever implementation ran first, always ours. From 3
    repeats on there is no other warm-up call: at these sizes a first call's extra cost (our packed weights,
    primitives only ours uses) is the one outlier the median drops. Peak memory is the largest over all calls,
    first included, so that memory kept between calls (packed weights) shows; the first call of each
    implementation starts with freed memory handed back to the system (release_free_memory), so that it counts
    every page it touches. Returns the printed row and
    both outputs."""
    if PROFILE_ROWS:
        return {}, *profiled(name, ours, theirs, grad)
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    times, memory, outputs = {"ours": [], "theirs": []}, {"ours": [], "theirs": []}, {}

    def counted():
        with counter:
            return theirs()

    release_free_memory()
    timed(counted, device, grad)

    def run(label: str) -> float:
        fn = ours if label == "ours" else theirs
        seconds, memory_mib, outputs[label] = timed(fn, device, grad, trim=not memory[label])
        memory[label].append(memory_mib)
        return seconds

    if repeats < 3:  # warm-up calls, not timed
        run("ours"), run("theirs")
    for i in range(repeats):
        for label in ("ours", "theirs") if i % 2 == 0 else ("theirs", "ours"):
            times[label].append(run(label))
    ours_out, theirs_out = outputs["ours"], outputs["theirs"]
    row = {
        "case": name,
        "ours_s": statistics.median(times["ours"]),
        "ref_s": statistics.median(times["theirs"]),
        "ours_mib": max(memory["ours"]),
        "ref_mib": max(memory["theirs"]),
        "parity": relative_error(ours_out, theirs_out),
        "gflop": counter.get_total_flops() / 1e9,
        "peak_gflops": peak_flops(theirs_out.dtype, device) / 1e9,
    }
    if reference_outputs is not None:
        ours_fp32, theirs_fp32 = reference_outputs
        row["ours_err"] = relative_error(ours_out, ours_fp32)
        row["ref_err"] = relative_error(theirs_out, theirs_fp32)
    print(format_row(row), flush=True)
    return row, ours_out, theirs_out


def relative_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    out, reference = out.float(), reference.float()
    return ((out - reference).norm() / reference.norm().clamp_min(1e-12)).item()


def format_row(row: dict) -> str:
    text = (
        f"{row['case']:<38} ours {row['ours_s']:7.3f}s  ref {row['ref_s']:7.3f}s  "
        f"ratio {row['ours_s'] / row['ref_s']:5.2f}  "
        f"peak MiB ours {row['ours_mib']:6.0f} ref {row['ref_mib']:6.0f}  "
        f"GFLOP {row['gflop']:6.0f}  GFLOP/s ours {row['gflop'] / row['ours_s']:5.0f} ref "
        f"{row['gflop'] / row['ref_s']:5.0f} of {row['peak_gflops']:4.0f}  ours-vs-ref {row['parity']:.1e}"
    )
    if "ours_err" in row:
        text += f"  bf16-vs-fp32 ours {row['ours_err']:.1e} ref {row['ref_err']:.1e}"
    return text


def unet_pair(device: torch.device):
    """diffusers' SD 1.5 UNet with random weights, and ours holding the same tensors."""
    from diffusers import UNet2DConditionModel as DiffusersUNet

    from fixative.core.config import UNetConfig
    from fixative.core.unet import UNet2DConditionModel

    config = UNetConfig()  # sd15
    torch.manual_seed(0)
    theirs = DiffusersUNet(**{k: v for k, v in config.to_diffusers().items() if not k.startswith("_")}).eval()
    with torch.device("meta"):
        ours = UNet2DConditionModel(config)
    ours.load_state_dict(theirs.state_dict(), strict=True, assign=True)
    return ours.eval().to(device), theirs.to(device), config


def compiled_rows(args, device, name: str, ours, theirs, inputs) -> list[dict]:
    """With --compile: our UNet under torch.compile with Inductor's freezing (fixative.core.compilation,
    weights as constants) against diffusers' eager one; the first call's time, compiling included, is printed."""
    if not args.compile:
        return []
    from fixative.core.compilation import compile_network

    compile_network(ours, "unet", report=lambda message: print(f"  {message}", flush=True), freeze=True)
    with torch.inference_mode():
        ours(*inputs)  # compiles, before the timed calls
    rows = [
        compare(f"{name} compiled+frozen", lambda: ours(*inputs), lambda: theirs(*inputs).sample, device, args.repeats)[
            0
        ]
    ]
    del ours.forward  # back to eager
    torch._dynamo.reset()
    return rows


def unet_cases(args, device) -> list[dict]:
    ours, theirs, config = unet_pair(device)
    rows = []
    sizes = unet_sizes(args)
    fp32_outputs = {}
    for size in sizes:
        latents = torch.randn(2, 4, size, size, device=device)
        text_embeddings = torch.randn(2, 77, config.cross_attention_dim, device=device)
        t = torch.tensor([500, 500], device=device)
        name = f"unet sd15 {size}x{size} b2 fp32"
        row, ours_out, theirs_out = compare(
            name,
            lambda: ours(latents, t, text_embeddings),
            lambda: theirs(latents, t, text_embeddings).sample,
            device,
            args.repeats,
        )
        fp32_outputs[size] = (ours_out, theirs_out, latents, text_embeddings, t)
        rows.append(row)
    ours.to(torch.bfloat16)
    theirs.to(torch.bfloat16)
    for size in sizes:
        ours_fp32, theirs_fp32, latents, text_embeddings, t = fp32_outputs[size]
        latents, text_embeddings = latents.bfloat16(), text_embeddings.bfloat16()
        name = f"unet sd15 {size}x{size} b2 bf16"
        rows.append(
            compare(
                name,
                lambda: ours(latents, t, text_embeddings),
                lambda: theirs(latents, t, text_embeddings).sample,
                device,
                args.repeats,
                reference_outputs=(ours_fp32, theirs_fp32),
            )[0]
        )
        if size == sizes[-1]:  # one compilation: the largest latents
            rows += compiled_rows(args, device, name, ours, theirs, (latents, t, text_embeddings))
    return rows


def unet_sizes(args) -> list[int]:
    """Latent sides of the UNet rows: 32x32 (256 px images) and 64x64 (512 px)."""
    return [32] if args.quick else [64] if args.full else [32, 64]


def unet_grad_cases(args, device) -> list[dict]:
    """Forward and backward to the weights, batch 1 (a fine-tuning step's network work); the outputs
    compared are the gradients of conv_in's weight, the last the backward pass reaches."""
    ours, theirs, config = unet_pair(device)
    ours.train()
    theirs.train()
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        ours.to(dtype)
        theirs.to(dtype)
        for size in unet_sizes(args):
            latents = torch.randn(1, 4, size, size, generator=torch.Generator().manual_seed(1)).to(device, dtype)
            text_embeddings = torch.randn(
                1, 77, config.cross_attention_dim, generator=torch.Generator().manual_seed(2)
            ).to(device, dtype)
            t = torch.tensor([500], device=device)

            def step(unet, output):
                output(unet(latents, t, text_embeddings)).float().square().mean().backward()
                grad = unet.conv_in.weight.grad
                unet.zero_grad(set_to_none=True)
                return grad

            rows.append(
                compare(
                    f"unet sd15 {size}x{size} b1 +grad {'bf16' if dtype == torch.bfloat16 else 'fp32'}",
                    lambda: step(ours, lambda out: out),
                    lambda: step(theirs, lambda out: out.sample),
                    device,
                    args.repeats,
                    grad=True,
                )[0]
            )
    return rows


def vae_pair(device: torch.device):
    """diffusers' SD VAE with random weights, and ours holding the same tensors."""
    from diffusers import AutoencoderKL as DiffusersVAE

    from fixative.core.config import AutoencoderKLConfig
    from fixative.core.vae import AutoencoderKL

    config = AutoencoderKLConfig()
    torch.manual_seed(0)
    theirs = DiffusersVAE(**{k: v for k, v in config.to_diffusers().items() if not k.startswith("_")}).eval()
    with torch.device("meta"):
        ours = AutoencoderKL(config)
    ours.load_state_dict(theirs.state_dict(), strict=True, assign=True)
    return ours.eval().to(device), theirs.to(device)


def vae_cases(args, device) -> list[dict]:
    ours, theirs = vae_pair(device)
    size = 256 if args.quick else 512
    latents = torch.randn(1, 4, size // 8, size // 8, device=device)
    row, ours_out, theirs_out = compare(
        f"vae decode {size}x{size} fp32",
        lambda: ours.decode(latents),
        lambda: theirs.decode(latents).sample,
        device,
        args.repeats,
    )
    rows = [row]
    reference = (ours_out, theirs_out)
    ours.to(torch.bfloat16)
    theirs.to(torch.bfloat16)
    latents_bf16 = latents.bfloat16()
    rows.append(
        compare(
            f"vae decode {size}x{size} bf16",
            lambda: ours.decode(latents_bf16),
            lambda: theirs.decode(latents_bf16).sample,
            device,
            args.repeats,
            reference_outputs=reference,
        )[0]
    )
    return rows


def vae_grad_cases(args, device) -> list[dict]:
    """The encoder's forward and backward to the input pixels (a cloaking step: the VAE is frozen); the
    outputs compared are the pixel gradients of sum(mean^2) of the posterior."""
    ours, theirs = vae_pair(device)
    ours.requires_grad_(False)
    theirs.requires_grad_(False)
    size = 256 if args.quick else 512
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        ours.to(dtype)
        theirs.to(dtype)
        pixels = (torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1).to(device, dtype)

        def step(mean_of):
            x = pixels.clone().requires_grad_()
            mean_of(x).float().square().sum().backward()
            return x.grad

        rows.append(
            compare(
                f"vae encode {size}x{size} +grad {'bf16' if dtype == torch.bfloat16 else 'fp32'}",
                lambda: step(lambda x: ours.encode(x).mean),
                lambda: step(lambda x: theirs.encode(x).latent_dist.mean),
                device,
                args.repeats,
                grad=True,
            )[0]
        )
    return rows


def text_encoder_cases(args, device) -> list[dict]:
    from transformers import CLIPTextConfig as HFConfig
    from transformers import CLIPTextModel as HFModel

    from fixative.core.config import CLIPTextConfig
    from fixative.core.text_encoder import CLIPTextModel

    config = CLIPTextConfig()
    torch.manual_seed(0)
    hf_config = {
        k: v for k, v in config.to_diffusers().items() if k not in ("architectures", "model_type", "torch_dtype")
    }
    theirs = HFModel(HFConfig(**hf_config)).eval()
    with torch.device("meta"):
        ours = CLIPTextModel(config)
    state = {
        k if k.startswith("text_model.") else f"text_model.{k}": v
        for k, v in theirs.state_dict().items()
        if not k.endswith("position_ids")
    }
    ours.load_state_dict(state, strict=True, assign=True)
    ours.eval()
    theirs.to(device)
    ours.to(device)
    input_ids = torch.randint(0, config.vocab_size - 2, (2, 77), device=device)
    input_ids[:, 0] = config.bos_token_id
    input_ids[:, 10:] = config.eos_token_id
    return [
        compare(
            "text encoder sd15 b2 fp32",
            lambda: ours(input_ids).last_hidden_state,
            lambda: theirs(input_ids).last_hidden_state,
            device,
            args.repeats,
        )[0]
    ]


GROUPS = {
    "text": text_encoder_cases,
    "vae": vae_cases,
    "vae-grad": vae_grad_cases,
    "unet": unet_cases,
    "unet-grad": unet_grad_cases,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small cases only (UNet 32x32, VAE encoder 256 px), one repeat unless --repeats",
    )
    parser.add_argument(
        "--full",
        action="store_true",
        help="the full-size rows only: UNet at 64x64 latents, VAE at 512 px (default: also the 32x32 UNet and text)",
    )
    parser.add_argument(
        "--profile",
        type=int,
        nargs="?",
        const=15,
        default=0,
        help="instead of timing, profile one call of each implementation and print the top N operators "
        "by self CPU time (N default 15; default: off)",
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed runs of each implementation (default 3)")
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cpu or cuda (default: cuda when available)",
    )
    parser.add_argument(
        "--threads", type=int, default=torch.get_num_threads(), help="torch threads (default: torch's default)"
    )
    parser.add_argument(
        "--cpu-time",
        action="store_true",
        help="time by this process's CPU time instead of wall time, so that other jobs on a shared machine do not "
        "count (equal to wall time on one idle thread; with more threads it sums them; default: off)",
    )
    parser.add_argument("--only", nargs="+", choices=GROUPS, help="run these groups of cases only (default: all)")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also time our bf16 UNet forward at the largest latents under torch.compile with freezing "
        "(minutes of compiling; default: off)",
    )
    args = parser.parse_args()
    global CLOCK, PROFILE_ROWS
    PROFILE_ROWS = args.profile
    if args.cpu_time:
        CLOCK = time.process_time
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    clock = "CPU time" if args.cpu_time else "wall time"
    print(
        f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, repeats {args.repeats}, "
        f"{clock}",
        flush=True,
    )
    for dtype in (torch.float32, torch.bfloat16):
        if not PROFILE_ROWS:
            print(f"peak {dtype}: {peak_flops(dtype, device) / 1e9:.0f} GFLOP/s (a 3072^3 matmul, fastest of 5)")
    rows = []
    for name, cases in GROUPS.items():
        if (args.only is None or name in args.only) and not (args.full and name == "text"):
            rows += cases(args, device)
    if PROFILE_ROWS:
        return 0
    worst = max(row["ours_s"] / row["ref_s"] for row in rows)
    print(f"worst ratio {worst:.2f} (target <= 0.80)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
