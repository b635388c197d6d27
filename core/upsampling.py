"""conv3x3(nearest_upsample_x2(x)) without materialising the up-sampled image (the UNet's and the VAE
decoder's up-sampling layers).

Each of the four output phases (a, b) (output pixel (2i + a, 2j + b)) is a 2x2 convolution of the input
whose taps are sums of the 3x3 taps that fall on the same input pixel: the same result with 16 instead
of 36 multiply-adds per input pixel and channel pair. When gradients flow to the weight (training) the
plain up-sample and conv are used: folding inside the autograd graph kept ~0.5 GB more for the SD UNet.

Memory: by default each phase's 2x2 weight (4/9 of the conv weight) is folded at each call and dropped after
its convolution, so no more weight memory is held than a plain convolution's own per-call weight reorder. Only
with packed weights (layout.Conv2d.pack_weight, channels-last CPU inference) are the four phases folded
into one convolution whose packed weight is kept on the module while the weight is unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layout import pack_conv2d, packs_weights, run_packed_conv2d, tensor_key
from .lora import LoRAConv2d

# the 3x3 kernel taps summed into each of a phase's 2 taps, along rows or columns: output row 2i (phase 0)
# reads input rows (i-1, i) with kernel rows (0, 1+2); output row 2i+1 (phase 1) reads (i, i+1) with rows (0+1, 2)
PHASE_TAPS = (((0,), (1, 2)), ((0, 1), (2,)))


def _fold_matrix(a: int, b: int) -> torch.Tensor:
    """(9, 4) 0/1 matrix taking a flattened 3x3 kernel to the flattened 2x2 kernel of output phase (a, b):
    tap (p, q) is the sum of kernel taps (r, c) with r in PHASE_TAPS[a][p] and c in PHASE_TAPS[b][q]."""
    matrix = torch.zeros(3, 3, 2, 2)
    for p, rows in enumerate(PHASE_TAPS[a]):
        for q, cols in enumerate(PHASE_TAPS[b]):
            for r in rows:
                matrix[r, list(cols), p, q] = 1.0
    return matrix.view(9, 4)


FOLD_MATRICES = {(a, b): _fold_matrix(a, b) for a in (0, 1) for b in (0, 1)}  # built once, at import


def _phase_weight(weight: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """(out, in, 3, 3) -> (out, in, 2, 2): the 2x2 kernel of output phase (a, b), as one matrix product
    (for low-precision weights the sums of up to four taps accumulate in fp32 and are rounded once)."""
    folded = weight.reshape(-1, 9) @ FOLD_MATRICES[a, b].to(dtype=weight.dtype, device=weight.device)
    return folded.view(*weight.shape[:2], 2, 2)


def _all_phases_weight(weight: torch.Tensor) -> torch.Tensor:
    """(out, in, 3, 3) -> (4 * out, in, 2, 2): the four phases' kernels, phases (a, b) in order."""
    return torch.cat([_phase_weight(weight, a, b) for a in (0, 1) for b in (0, 1)])


def _packed_phase_conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.ScriptObject:
    """The four phases' 2x2 convolution (padding 1) as one oneDNN-packed convolution (layout.pack_conv2d),
    kept on the module while the weight and bias are unchanged (same storage, version, dtype and device)."""
    weight, bias = conv.weight, conv.bias
    key = (tensor_key(weight), tensor_key(bias), weight.device)
    cached = getattr(conv, "_phase_weight_cache", None)
    if cached is None or cached["key"] != key:
        conv._phase_weight_cache = None  # release the old copy first
        with torch.inference_mode(False), torch.no_grad():  # normal tensors, usable outside inference mode too
            packed = pack_conv2d(_all_phases_weight(weight), bias.repeat(4), (1, 1), (1, 1), (1, 1), 1, x.shape)
        cached = conv._phase_weight_cache = {"key": key, "packed": packed}
    return cached["packed"]


def upsample_nearest2x_conv(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """conv(F.interpolate(x, scale_factor=2, mode="nearest")) for a 3x3, padding-1, stride-1 ``conv``, in
    x's memory format (channels-first or channels-last)."""
    if isinstance(conv, LoRAConv2d) or (torch.is_grad_enabled() and conv.weight.requires_grad):
        return conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
    batch, _, height, width = x.shape
    channels = conv.weight.shape[0]
    layout = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    out = torch.empty(batch, channels, 2 * height, 2 * width, dtype=x.dtype, device=x.device, memory_format=layout)
    # the 2x2 convolution with padding 1 gives (h + 1, w + 1) positions; output pixel (i, j) of phase (a, b)
    # is at (i + a, j + b)
    if torch.compiler.is_compiling():  # Inductor's freezing folds the weights once
        phases = F.conv2d(x, _all_phases_weight(conv.weight), conv.bias.repeat(4), padding=1)
        phases = phases.view(batch, 2, 2, channels, height + 1, width + 1)
    elif getattr(conv, "pack_weight", False) and packs_weights(x, conv.weight):
        phases = run_packed_conv2d(x, _packed_phase_conv(conv, x))
        phases = phases.view(batch, 2, 2, channels, height + 1, width + 1)
    else:
        if getattr(conv, "_phase_weight_cache", None) is not None:  # dropped as layout.Conv2d drops its own
            conv._phase_weight_cache = None
        phases = None
    for a in (0, 1):
        for b in (0, 1):
            if phases is None:
                phase = F.conv2d(x, _phase_weight(conv.weight, a, b), conv.bias, padding=1)
            else:
                phase = phases[:, a, b]
            out[:, :, a::2, b::2] = phase[:, :, a : a + height, b : b + width]
    return out
