"""conv3x3(nearest_upsample_x2(x)) without materialising the up-sampled image (the UNet's and the VAE
decoder's up-sampling layers).

Each of the four output phases (a, b) (output pixel (2i + a, 2j + b)) is a 2x2 convolution of the input
whose taps are sums of the 3x3 taps that fall on the same input pixel: the same result with 16 instead
of 36 multiply-adds per input pixel and channel pair. When gradients flow to the weight (training) the
plain up-sample and conv are used: folding inside the autograd graph kept ~0.5 GB more for the SD UNet.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .layout import pack_conv2d, packs_weights, run_packed_conv2d, tensor_key


def _fold_for_upsampling(kernel: torch.Tensor, dim: int) -> torch.Tensor:
    """3 taps along ``dim`` -> 2 taps for each output phase of conv3x3(nearest_up2(x)): output row 2i reads
    input rows (i-1, i) with kernel rows (0, 1+2); output row 2i+1 reads (i, i+1) with rows (0+1, 2).
    Returns the phases stacked in front: (2, *kernel.shape with 2 at dim)."""
    k0, k1, k2 = kernel.unbind(dim)
    return torch.stack([torch.stack([k0, k1 + k2], dim), torch.stack([k0 + k1, k2], dim)])


def _phase_weight(weight: torch.Tensor) -> torch.Tensor:
    """(out, in, 3, 3) -> (4 * out, in, 2, 2), phases (a, b) in order; folded in fp32 for low-precision weights."""
    rows = _fold_for_upsampling(weight.float(), dim=2)  # (2, out, in, 2, 3)
    phase_weight = _fold_for_upsampling(rows, dim=4).transpose(0, 1)  # (a, b, out, in, 2, 2)
    return phase_weight.reshape(4 * weight.shape[0], -1, 2, 2).to(weight.dtype)


def _cached_phase_conv(conv: nn.Conv2d, x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """The four phases' 2x2 convolution (padding 1), its folded weight kept on the module while the weight and
    bias are unchanged (same storage, version and dtype): folding the SD UNet's 1280-channel kernels at every
    call costs more than the multiply-adds it saves at small latents. In channels-last inference on the CPU
    the folded weight is also packed once for oneDNN (layout.pack_conv2d)."""
    weight, bias = conv.weight, conv.bias
    if torch.compiler.is_compiling():
        phase_weight, phase_bias = _phase_weight(weight), bias.repeat(4)
        return lambda x: F.conv2d(x, phase_weight, phase_bias, padding=1)
    key = (tensor_key(weight), tensor_key(bias), weight.device)
    cached = getattr(conv, "_phase_weight_cache", None)
    if cached is None or cached["key"] != key:
        conv._phase_weight_cache = None  # release the old copies first
        with torch.inference_mode(False), torch.no_grad():  # normal tensors, usable outside inference mode too
            cached = {"key": key, "weight": _phase_weight(weight), "bias": bias.repeat(4), "packed": None}
        conv._phase_weight_cache = cached
    if not getattr(conv, "pack_weight", False) or not packs_weights(x, weight):
        return lambda x: F.conv2d(x, cached["weight"], cached["bias"], padding=1)
    if cached["packed"] is None:
        cached["packed"] = pack_conv2d(cached["weight"], cached["bias"], (1, 1), (1, 1), (1, 1), 1, x.shape)
    return lambda x: run_packed_conv2d(x, cached["packed"])


def upsample_nearest2x_conv(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """conv(F.interpolate(x, scale_factor=2, mode="nearest")) for a 3x3, padding-1, stride-1 ``conv``, in
    x's memory format (channels-first or channels-last)."""
    if torch.is_grad_enabled() and conv.weight.requires_grad:
        return conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
    batch, _, height, width = x.shape
    channels = conv.weight.shape[0]
    phases = _cached_phase_conv(conv, x)(x)  # output pixel (i, j) of phase (a, b) is at (i + a, j + b)
    phases = phases.view(batch, 2, 2, channels, height + 1, width + 1)  # (batch, a, b, out, h + 1, w + 1)
    layout = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    out = torch.empty(batch, channels, 2 * height, 2 * width, dtype=x.dtype, device=x.device, memory_format=layout)
    for a in (0, 1):
        for b in (0, 1):
            out[:, :, a::2, b::2] = phases[:, a, b, :, a : a + height, b : b + width]
    return out
