"""Low-rank adapters (LoRA, Hu et al. 2021): training them, and reading and writing the files people share.

fixative keeps its own ``LoRALinear`` rather than wrapping layers with ``peft``: the adapter is a few
lines, training needs nothing more, and no runtime dependency is added; ``peft`` is needed only where
diffusers' ``load_lora_weights`` reads our files (the tests). Interoperability is in the file format:

* ``save_lora`` writes ``pytorch_lora_weights.safetensors`` in the keys diffusers' ``load_lora_weights``
  reads (``unet.<module>.lora_A.weight`` = A, ``lora_B.weight`` = B, ``text_encoder.<module>...``; the
  peft layout), with the scale α/r folded into B so that no alpha is needed: any loader applies W + B A.
* ``apply_lora`` merges a file into a model's weights at inference, W ← W + s · (α/r) B A, for our files
  and for kohya-style files (``lora_unet_<module_with_underscores>.lora_down.weight`` / ``lora_up`` /
  ``alpha``, ``lora_te_...``) as AUTOMATIC1111 / ComfyUI users have them; linear and convolution layers.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import FixativeError

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # the attention projections, as diffusers' LoRA training
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


class _LoRA:
    """What the adapted layers share: the frozen base ``weight`` / ``bias`` (same state-dict keys) plus
    ``lora_down`` (A) and ``lora_up`` (B), B zero at start, output W x + (α / r) B A x (LoRA, Hu et al. 2021,
    eq. 3)."""

    def _init_adapter(self, base: nn.Module, down: nn.Module, up: nn.Module, rank: int, alpha: float | None) -> None:
        self.weight, self.bias = base.weight, base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.lora_down, self.lora_up = down, up
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        self.scale = (alpha if alpha is not None else rank) / rank

    def delta(self) -> torch.Tensor:
        """(α / r) B A in the base weight's shape, float32 (for a convolution: B (out, r, 1, 1) after
        A (r, in, k, k) is the single kernel (out, in, k, k))."""
        update = self.lora_up.weight.float().flatten(1) @ self.lora_down.weight.float().flatten(1)
        return self.scale * update.reshape(self.weight.shape)

    def merged(self) -> nn.Module:
        """The plain layer with W + (α / r) B A."""
        plain = self._plain()
        with torch.no_grad():
            plain.weight.copy_(self.weight.float() + self.delta())
            if self.bias is not None:
                plain.bias.copy_(self.bias)
        return plain


class LoRALinear(_LoRA, nn.Linear):
    """A Linear layer plus a low-rank update: A (r x in) and B (out x r) Linear layers."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        kwargs = {"device": base.weight.device, "dtype": base.weight.dtype}
        down = nn.Linear(base.in_features, rank, bias=False, **kwargs)
        up = nn.Linear(rank, base.out_features, bias=False, **kwargs)
        self._init_adapter(base, down, up, rank, alpha)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + self.scale * self.lora_up(self.lora_down(x))

    def _plain(self) -> nn.Linear:
        kwargs = {"device": self.weight.device, "dtype": self.weight.dtype}
        return nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, **kwargs)


class LoRAConv2d(_LoRA, nn.Conv2d):
    """A Conv2d plus a low-rank update as peft adapts convolutions (and diffusers' ``load_lora_weights`` reads
    them): A a convolution with the base layer's kernel size, stride, padding and dilation into r channels, B a
    1x1 convolution from r channels; the two compose into one kernel, so the update merges exactly."""

    def __init__(self, base: nn.Conv2d, rank: int, alpha: float | None = None):
        nn.Module.__init__(self)
        if base.groups != 1:
            raise FixativeError("LoRA adapts ordinary convolutions only (groups = 1)")
        for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups"):
            setattr(self, name, getattr(base, name))
        self.transposed, self.output_padding, self.padding_mode = False, base.output_padding, base.padding_mode
        self._base_class = type(base)  # merged back into this class (e.g. core.layout's packing Conv2d)
        self._reversed_padding_repeated_twice = base._reversed_padding_repeated_twice
        kwargs = {"device": base.weight.device, "dtype": base.weight.dtype}
        down = nn.Conv2d(
            base.in_channels,
            rank,
            base.kernel_size,
            base.stride,
            base.padding,
            base.dilation,
            bias=False,
            padding_mode=base.padding_mode,
            **kwargs,
        )
        up = nn.Conv2d(rank, base.out_channels, 1, bias=False, **kwargs)
        self._init_adapter(base, down, up, rank, alpha)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.weight, self.bias) + self.scale * self.lora_up(self.lora_down(x))

    def _plain(self) -> nn.Conv2d:
        return self._base_class(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
            bias=self.bias is not None,
            padding_mode=self.padding_mode,
            device=self.weight.device,
            dtype=self.weight.dtype,
        )


def _adapter_for(module: nn.Module) -> type | None:
    """The adapter class for a layer (subclasses included, e.g. core.layout's Conv2d), None for others and for
    layers already adapted."""
    if isinstance(module, _LoRA):
        return None
    if isinstance(module, nn.Conv2d):
        return LoRAConv2d
    return LoRALinear if isinstance(module, nn.Linear) else None


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def inject_lora(
    model: nn.Module, rank: int = 4, alpha: float | None = None, targets: Iterable[str] = UNET_TARGETS
) -> list[nn.Parameter]:
    """Wrap every Linear or Conv2d whose name ends with one of ``targets`` (e.g. ``attn2.to_k``,
    ``resnets.0.conv1``) in a LoRALinear or LoRAConv2d.

    Returns the new trainable parameters (the model's other parameters are left as they were; freeze
    them with ``model.requires_grad_(False)`` before calling this to train the adapters only).
    """
    targets = tuple(targets)
    chosen = [
        name
        for name, m in model.named_modules()
        if _adapter_for(m) is not None and any(name == t or name.endswith("." + t) for t in targets)
    ]
    if not chosen:
        raise FixativeError(f"no Linear or Conv2d layer named {targets} in the model: nothing to adapt with LoRA")
    params = []
    for name in chosen:
        base = model.get_submodule(name)
        lora = _adapter_for(base)(base, rank, alpha)
        _replace(model, name, lora)
        params += [lora.lora_down.weight, lora.lora_up.weight]
    return params


def merge_lora(model: nn.Module) -> int:
    """Fold every adapter back into a plain Linear / Conv2d (state-dict keys as before injection); returns the
    count."""
    names = [name for name, m in model.named_modules() if isinstance(m, _LoRA)]
    for name in names:
        _replace(model, name, model.get_submodule(name).merged())
    return len(names)


def lora_state_dict(networks: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """The adapters of ``{"unet": unet, "text_encoder": text_encoder}`` in diffusers' (peft) keys, α/r folded
    into B, float32, contiguous (a convolution's A is (r, in, k, k) and B (out, r, 1, 1), as peft's)."""
    state = {}
    for prefix, network in networks.items():
        for name, module in network.named_modules():
            if isinstance(module, _LoRA):
                state[f"{prefix}.{name}.lora_A.weight"] = module.lora_down.weight.detach().float().contiguous()
                state[f"{prefix}.{name}.lora_B.weight"] = (
                    module.scale * module.lora_up.weight.detach().float()
                ).contiguous()
    return state


def save_lora(networks: dict[str, nn.Module], folder: str | Path) -> Path:
    """Write ``folder/pytorch_lora_weights.safetensors`` atomically; returns its path."""
    from safetensors.torch import save_file

    state = lora_state_dict(networks)
    if not state:
        raise FixativeError("the model has no LoRA adapters to save")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LORA_WEIGHTS_NAME
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, tmp, metadata={"format": "pt"})
    tmp.replace(path)
    return path


def parse_lora_spec(spec: str) -> tuple[Path, float]:
    """``PATH[:SCALE]`` -> (path, scale); scale 1 when absent. A folder means its pytorch_lora_weights file."""
    path, scale = spec, 1.0
    head, sep, tail = spec.rpartition(":")
    if sep and head and re.fullmatch(r"[-+]?\d*\.?\d+(e[-+]?\d+)?", tail):
        path, scale = head, float(tail)
    path = Path(path)
    if path.is_dir():
        path = path / LORA_WEIGHTS_NAME
    if not path.is_file():
        raise FixativeError(f"LoRA file {path} does not exist")
    return path, scale


def read_lora(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a LoRA file (.safetensors), float32."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return {k: v.float() for k, v in load_file(str(path)).items()}
    except (SafetensorError, OSError, ValueError) as error:
        raise FixativeError(f"{path} is not a readable .safetensors LoRA file ({error})") from None


def _lora_pairs(state: dict[str, torch.Tensor], model) -> list[tuple[nn.Module, torch.Tensor, torch.Tensor, float]]:
    """(module, up, down, α/r) for every adapted layer of a LoRA state dict in diffusers' (peft) or kohya keys."""
    networks = {"unet": model.unet, "text_encoder": model.text_encoder}
    kohya = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder"}
    modules = {}  # every key prefix a file may use -> module
    for prefix, network in networks.items():
        for name, module in network.named_modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                modules[f"{prefix}.{name}"] = module
                for kohya_prefix, target in kohya.items():
                    if target == prefix:
                        modules[kohya_prefix + name.replace(".", "_")] = module
    pairs, unknown = [], []
    for key in state:
        for down_suffix, up_suffix in ((".lora_A.weight", ".lora_B.weight"), (".lora_down.weight", ".lora_up.weight")):
            if key.endswith(down_suffix):
                stem = key[: -len(down_suffix)]
                if stem not in modules or stem + up_suffix not in state:
                    unknown.append(stem)
                    break
                down, up = state[key], state[stem + up_suffix]
                rank = down.shape[0]
                alpha = state.get(stem + ".alpha")
                pairs.append((modules[stem], up, down, (float(alpha) if alpha is not None else rank) / rank))
    if unknown:
        raise FixativeError(
            f"the LoRA file adapts {len(unknown)} layers this model does not have "
            f"(e.g. {unknown[0]}); is it for another model family?"
        )
    if not pairs:
        raise FixativeError(
            "no LoRA weights found (expected diffusers' lora_A/lora_B or kohya's lora_down/lora_up keys)"
        )
    return pairs


@torch.no_grad()
def apply_lora(model, path: str | Path, scale: float = 1.0) -> int:
    """Merge a LoRA file into ``model`` (a StableDiffusionModel): W ← W + scale · (α/r) B A for every adapted
    layer; returns how many layers changed. Files stack: apply several in turn."""
    pairs = _lora_pairs(read_lora(path), model)
    for module, up, down, factor in pairs:
        # linear: B (out, r) A (r, in); convolution: B (out, r, 1, 1) after A (r, in, k, k) -> (out, in, k, k)
        delta = up.flatten(1) @ down.flatten(1)
        if delta.numel() != module.weight.numel():
            raise FixativeError(
                f"LoRA file {path}: a layer's update has shape {tuple(delta.shape)} but the model's "
                f"weight is {tuple(module.weight.shape)}; is it for another model?"
            )
        delta = scale * factor * delta.to(module.weight.device).reshape(module.weight.shape)
        module.weight.copy_((module.weight.float() + delta).to(module.weight.dtype))
    return len(pairs)
