"""Attention forward + backward on the CPU at the shapes the networks run: PyTorch's SDPA (the flash kernel on the CPU),
the explicit math form softmax(Q K^T / sqrt(d)) V, and core.attention (which picks one of the two by its rule).

    .venv/bin/python benchmarks/attention_backward.py [--repeats 3] [--only toy]

Prints, per shape and dtype, the best-of-repeats forward and backward CPU milliseconds of each (process time, so
that other jobs on the machine do not count; run it with one thread), and the largest gradient
difference of core.attention from the fp64 math reference relative to the reference's largest gradient.
"""

from __future__ import annotations

import argparse
import math
import os
import time

import torch
import torch.nn.functional as F

from fixative.core.attention import _math_attention, attention

# (name, (B, H, Lq, d), Lk, causal)
SHAPES = [
    ("toy unet self", (24, 4, 64, 32), 64, False),
    ("toy clip causal", (24, 4, 77, 12), 77, True),
    ("sd15 clip causal b2", (2, 12, 77, 64), 77, True),
    ("sd15 unet 32x32 self L0", (1, 8, 1024, 40), 1024, False),
    ("sd15 unet 32x32 cross L0", (1, 8, 1024, 40), 77, False),
    ("sd15 unet 32x32 self L1", (1, 8, 256, 80), 256, False),
    ("sd15 unet 64x64 self L0", (1, 8, 4096, 40), 4096, False),
    ("sd15 unet 64x64 cross L0", (1, 8, 4096, 40), 77, False),
    ("sd15 unet 64x64 self L1", (1, 8, 1024, 80), 1024, False),
    ("sd15 vae 512px mid", (1, 1, 4096, 512), 4096, False),
]


def sdpa(q, k, v, causal):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def math_attention(q, k, v, causal):
    return _math_attention(q, k, v, causal)  # core's explicit form itself, whatever the rule would choose


def ours(q, k, v, causal):
    return attention(q, k, v, is_causal=causal)


def time_fwd_bwd(fn, q, k, v, causal, repeats):
    fwd, bwd = math.inf, math.inf
    for _ in range(repeats):
        q.grad = k.grad = v.grad = None
        start = time.process_time()
        out = fn(q, k, v, causal)
        mid = time.process_time()
        out.backward(grad)
        fwd, bwd = min(fwd, mid - start), min(bwd, time.process_time() - mid)
    return 1e3 * fwd, 1e3 * bwd, (q.grad, k.grad, v.grad)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="calls per measurement, best kept (default 3)")
    parser.add_argument(
        "--only", default="", help="comma-separated; run only shapes whose name contains one of them (default: all)"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    global grad
    for name, (b, h, lq, d), lk, causal in SHAPES:
        if not any(part in name for part in args.only.split(",")):
            continue
        for dtype in (torch.float32, torch.bfloat16):
            torch.manual_seed(args.seed)
            # fp64 reference, fp32 where its score tensor would pass 128 MiB
            ref_dtype = torch.float64 if b * h * lq * lk <= 2**24 else torch.float32
            base = [torch.randn(b, h, n, d, dtype=ref_dtype) for n in (lq, lk, lk)]
            grad = torch.randn(b, h, lq, d, dtype=ref_dtype)
            ref_inputs = [t.clone().requires_grad_() for t in base]
            math_attention(*ref_inputs, causal).backward(grad)
            grad = grad.to(dtype)
            row = []
            for label, fn in (("sdpa", sdpa), ("math", math_attention), ("ours", ours)):
                inputs = [t.to(dtype).requires_grad_() for t in base]
                fwd, bwd, grads = time_fwd_bwd(fn, *inputs, causal, args.repeats)
                err = max(
                    ((g.double() - r.grad).abs().max() / r.grad.abs().max()).item() for g, r in zip(grads, ref_inputs)
                )
                row.append(f"{label} {fwd:7.1f}+{bwd:7.1f} ms (err {err:.1e})")
            print(f"{name:26s} {str(dtype)[6:]:8s} " + " | ".join(row), flush=True)


if __name__ == "__main__":
    main()
