"""Where one call's peak memory comes from, ours against diffusers' on the same random SD 1.5 weights (the pairs of
benchmarks/core_networks.py): glibc's bytes in use (mallinfo2) after every aten op, with the module that ran it, and
the sampled RSS peak above the call's start (what core_networks.py reports).

    .venv/bin/python benchmarks/memory_trace.py unet --size 32 --dtype bfloat16      # UNet b2, 32x32 latents
    .venv/bin/python benchmarks/memory_trace.py vae --size 512 --dtype float32       # VAE decode, 512 px
    .venv/bin/python benchmarks/memory_trace.py unet --reference-first              # who runs first matters

Per call it prints the peak bytes in use and the op and module at that peak, the RSS peak, the bytes still in use
after the call (memory kept between calls: packed weights, one-time allocations), and the six modules with the
highest bytes in use. The bytes in use miss buffers an op allocates and frees inside itself (oneDNN weight reorders);
the RSS peak counts those, and pages malloc kept from earlier calls are reused unseen. glibc only.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import runpy
import threading
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

MIB = 2**20


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks")
        + ("keepcost",)
    ]


_LIBC = ctypes.CDLL("libc.so.6")
_LIBC.mallinfo2.restype = _MallInfo2


def bytes_in_use() -> int:
    """Bytes malloc has handed out and not had back: small chunks (uordblks) and mmapped ones (hblkhd)."""
    info = _LIBC.mallinfo2()
    return info.uordblks + info.hblkhd


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _OpTrace(TorchDispatchMode):
    """After every aten op: bytes in use above the start, the peak, and each module's highest figure."""

    def __init__(self, module_stack: list[str]):
        super().__init__()
        self.module_stack, self.start = module_stack, bytes_in_use()
        self.peak, self.at_peak, self.by_module = 0, None, {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        used = bytes_in_use() - self.start
        module = self.module_stack[-1] if self.module_stack else "(top)"
        self.by_module[module] = max(self.by_module.get(module, 0), used)
        if used > self.peak:
            self.peak, self.at_peak = used, (str(func), module)
        return out


def track_modules(model: torch.nn.Module, module_stack: list[str]) -> None:
    """Keep ``module_stack`` at the name of the module running (leaves and the top four levels)."""

    def enter(name: str) -> None:
        module_stack.append(name)

    def leave() -> None:
        module_stack.pop()

    for name, module in model.named_modules():
        if not list(module.children()) or name.count(".") <= 3:
            module.register_forward_pre_hook(lambda m, a, name=name: enter(name))
            module.register_forward_hook(lambda m, a, o: leave())


def traced_call(label: str, fn, module_stack: list[str], release_free_memory) -> None:
    release_free_memory()
    start_rss, peak_rss, done = rss_bytes(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak_rss[0] = max(peak_rss[0], rss_bytes() - start_rss)
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        with torch.inference_mode(), _OpTrace(module_stack) as trace:
            fn()
    finally:
        done.set()
        sampler.join()
    kept = (bytes_in_use() - trace.start) / MIB
    print(
        f"{label}: peak in use {trace.peak / MIB:.1f} MiB at {trace.at_peak}; RSS peak {peak_rss[0] / MIB:.1f} MiB; "
        f"in use after the call {kept:.1f} MiB",
        flush=True,
    )
    top = sorted(trace.by_module.items(), key=lambda item: -item[1])[:6]
    print("    " + "; ".join(f"{name} {used / MIB:.0f}" for name, used in top), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("network", choices=("unet", "vae"), help="UNet forward (batch 2) or VAE decode (batch 1)")
    parser.add_argument("--size", type=int, default=32, help="UNet latent side or VAE image side (default 32)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16", help="(default bfloat16)")
    parser.add_argument("--calls", type=int, default=2, help="calls of each, interleaved (default 2)")
    parser.add_argument("--reference-first", action="store_true", help="diffusers' call first (default: ours first)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the inputs (default 0)")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    bench = runpy.run_path(str(Path(__file__).with_name("core_networks.py")))
    dtype, cpu = getattr(torch, args.dtype), torch.device("cpu")
    generator = torch.Generator().manual_seed(args.seed)
    if args.network == "unet":
        ours, theirs, config = bench["unet_pair"](cpu)
        ours.to(dtype), theirs.to(dtype)
        latents = torch.randn(2, 4, args.size, args.size, generator=generator).to(dtype)
        text = torch.randn(2, 77, config.cross_attention_dim, generator=generator).to(dtype)
        timesteps = torch.tensor([500, 500])
        calls = {"ours": lambda: ours(latents, timesteps, text), "theirs": lambda: theirs(latents, timesteps, text)}
    else:
        ours, theirs = bench["vae_pair"](cpu)
        ours.to(dtype), theirs.to(dtype)
        latents = torch.randn(1, 4, args.size // 8, args.size // 8, generator=generator).to(dtype)
        calls = {"ours": lambda: ours.decode(latents), "theirs": lambda: theirs.decode(latents)}
    stacks = {"ours": [], "theirs": []}
    track_modules(ours, stacks["ours"])
    track_modules(theirs, stacks["theirs"])
    order = ("theirs", "ours") if args.reference_first else ("ours", "theirs")
    for i in range(args.calls):
        for label in order if i % 2 == 0 else order[::-1]:
            traced_call(f"{label} #{i}", calls[label], stacks[label], bench["release_free_memory"])


if __name__ == "__main__":
    main()
