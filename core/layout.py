"""The memory layout the convolutional networks (UNet, VAE) work in.

On the CPU, oneDNN convolves channels-last (NHWC) activations without reordering input and output at every
layer, and the attention layers read channels-last feature maps as (batch, h*w, channels) tokens without a
copy. But ATen's channels-last GroupNorm backward is tens of times slower in bf16 (and its convolution
backward slower too), so when autograd records (gradients to the pixels of a cloak, to the weights in
training) the networks stay channels-first. Other devices keep the layout they were given.
"""

from __future__ import annotations

import functools

import torch
from torch import nn


def records_grad(x: torch.Tensor, network: nn.Module) -> bool:
    """Whether autograd will record a call of ``network`` on ``x``."""
    return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in network.parameters()))


def working_layout(x: torch.Tensor, network: nn.Module) -> torch.Tensor:
    """``x`` in the layout ``network`` runs fastest in: channels-last on the CPU without autograd, else
    channels-first (contiguous); unchanged on other devices."""
    if x.device.type != "cpu":
        return x
    return x.contiguous() if records_grad(x, network) else x.contiguous(memory_format=torch.channels_last)


def packs_weights(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a convolution of ``x`` can use a weight packed once into oneDNN's layout: channels-last fp32 /
    bf16 inference on the CPU, outside torch.compile (which packs weights itself when freezing)."""
    return (
        x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.bfloat16)
        and x.dim() == 4
        and x.is_contiguous(memory_format=torch.channels_last)
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        and not torch.compiler.is_compiling()
        and torch.backends.mkldnn.is_available()
        and (x.dtype == torch.float32 or mkldnn_bf16_supported())
    )


@functools.cache
def mkldnn_bf16_supported() -> bool:
    """Whether oneDNN convolves in bf16 on this CPU (AVX-512 or AMX); without it a packed bf16 weight cannot be
    built, and F.conv2d's own bf16 path is used instead."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def emulated_bf16_warning(device: torch.device | str, fp32_option: str) -> str | None:
    """The one warning line for bf16 autocast on a CPU without native bf16, naming the option that runs in fp32;
    None where bf16 is native (a GPU, or a CPU with AVX-512 / AMX)."""
    if torch.device(device).type != "cpu" or mkldnn_bf16_supported():
        return None
    return (
        "this CPU has no native bf16 (no AVX-512 / AMX), so bf16 autocast is emulated and can be many times slower "
        f"than fp32; {fp32_option}"
    )


def tensor_key(tensor: torch.Tensor | None) -> tuple:
    """Identifies a tensor's current values: storage, in-place version, dtype (a cache is stale when it changes)."""
    return () if tensor is None else (tensor.data_ptr(), tensor._version, tensor.dtype)


def pack_conv2d(
    weight: torch.Tensor, bias: torch.Tensor | None, stride, padding, dilation, groups: int, input_shape
) -> torch.ScriptObject:
    """The weight reordered once into the blocked layout oneDNN convolves with (``run_packed_conv2d`` applies
    it). F.conv2d reorders the weight at every call (and first copies it to channels-last for a channels-last
    input), which at the SD UNet's 8x8 and 16x16 levels costs a large share of the convolution itself."""
    with torch.inference_mode(False), torch.no_grad():
        return torch.ops.mkldnn_prepacked.conv2d_prepack(
            weight, bias, list(stride), list(padding), list(dilation), groups, list(input_shape), "none"
        )


def run_packed_conv2d(x: torch.Tensor, packed: torch.ScriptObject) -> torch.Tensor:
    """The convolution of ``x`` with a ``pack_conv2d`` weight: F.conv2d's result bit for bit, in x's layout."""
    return torch.ops.mkldnn_prepacked.conv2d_run(x, packed)


class Conv2d(nn.Conv2d):
    """nn.Conv2d (same parameters and state-dict keys) that in channels-last inference on the CPU convolves
    with its weight packed once (``pack_conv2d``), repacked when the weight or bias changes (training steps,
    LoRA merges, ``.to()``). Calls that record gradients use nn.Conv2d's forward and drop the packed copy.
    The packed copy stays in memory between calls (``enable_weight_packing`` turns it on and off)."""

    pack_weight = True
    _packed: tuple | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.pack_weight or self.padding_mode != "zeros" or not packs_weights(x, self.weight):
            self._packed = None
            return super().forward(x)
        key = (tensor_key(self.weight), tensor_key(self.bias))
        if self._packed is None or self._packed[0] != key:
            self._packed = None  # release the old packed weight before building the new one
            packed = pack_conv2d(self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups, x.shape)
            self._packed = (key, packed)
        return run_packed_conv2d(x, self._packed[1])


def enable_weight_packing(network: nn.Module, enabled: bool = True) -> None:
    """Whether ``network``'s convolutions keep packed weights for channels-last CPU inference: a copy of each
    convolution weight in oneDNN's layout (for SD 1.5: 1.1 GB for the bf16 UNet, 0.25 GB for the fp32 VAE
    decoder), kept between calls while the weight is unchanged. The VAE packs by default (its activations at
    512 px are far larger than its weights); the UNet does not (the copy would outweigh its activations): turned
    on, it infers channels-last in bf16, a few per cent faster. Off, no copy is kept, and convolutions reorder
    their weights per call as F.conv2d does."""
    for module in network.modules():
        if hasattr(module, "pack_weight"):  # layout.Conv2d, and the UNet's channels-last switch
            module.pack_weight = enabled
        if isinstance(module, Conv2d):
            module._packed = None
        if hasattr(module, "_phase_weight_cache"):
            module._phase_weight_cache = None
