"""Expectation over transformations (Athalye et al. 2018, eq. 3): each step sees x + δ through one random,
differentiable transform of those a publisher's pipeline applies — JPEG, down/up resizing, blur, noise."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fixative.core.errors import FixativeError

TRANSFORMS = ("jpeg", "resize", "blur", "noise")

# The JPEG standard's luminance and chrominance quantisation tables (ITU-T T.81, Annex K, tables K.1 and K.2).
_LUMA = [
    16,
    11,
    10,
    16,
    24,
    40,
    51,
    61,
    12,
    12,
    14,
    19,
    26,
    58,
    60,
    55,
    14,
    13,
    16,
    24,
    40,
    57,
    69,
    56,
    14,
    17,
    22,
    29,
    51,
    87,
    80,
    62,
    18,
    22,
    37,
    56,
    68,
    109,
    103,
    77,
    24,
    35,
    55,
    64,
    81,
    104,
    113,
    92,
    49,
    64,
    78,
    87,
    103,
    121,
    120,
    101,
    72,
    92,
    95,
    98,
    112,
    100,
    103,
    99,
]
_CHROMA = [
    17,
    18,
    24,
    47,
    99,
    99,
    99,
    99,
    18,
    21,
    26,
    66,
    99,
    99,
    99,
    99,
    24,
    26,
    56,
    99,
    99,
    99,
    99,
    99,
    47,
    66,
    99,
    99,
    99,
    99,
    99,
    99,
] + [99] * 32


def parse_robust(text: str | None) -> tuple[str, ...]:
    """ "jpeg,blur" -> ("jpeg", "blur"); empty or None -> ()."""
    names = tuple(n.strip() for n in (text or "").split(",") if n.strip())
    unknown = [n for n in names if n not in TRANSFORMS]
    if unknown:
        raise FixativeError(f"--robust: unknown transform {unknown[0]!r}; choose from {','.join(TRANSFORMS)}")
    return names


def _dct_matrix(device) -> torch.Tensor:
    """Orthonormal 8-point DCT-II matrix D: coefficients = D @ block @ D.T."""
    k = torch.arange(8, dtype=torch.float32, device=device).view(-1, 1)
    n = torch.arange(8, dtype=torch.float32, device=device).view(1, -1)
    matrix = torch.cos(math.pi * (2 * n + 1) * k / 16) * math.sqrt(2 / 8)
    matrix[0] /= math.sqrt(2)
    return matrix


def _quality_table(table: list[int], quality: int, device) -> torch.Tensor:
    """libjpeg's quality scaling of a base table (jcparam.c, jpeg_quality_scaling)."""
    scale = 5000 / quality if quality < 50 else 200 - 2 * quality
    values = ((torch.tensor(table, dtype=torch.float32) * scale + 50) / 100).floor().clamp(1, 255)
    return values.view(8, 8).to(device)


def soft_round(x: torch.Tensor) -> torch.Tensor:
    """round(x) + (x − round(x))³: equal to rounding at integers, with a usable gradient (Shin & Song 2017)."""
    rounded = torch.round(x)
    return rounded + (x - rounded) ** 3


def jpeg(pixels: torch.Tensor, quality: int = 75) -> torch.Tensor:
    """Differentiable JPEG approximation: YCbCr, 8x8 DCT, quantisation with soft rounding, back (no chroma
    subsampling). pixels (B, 3, H, W) in [0, 1]."""
    height, width = pixels.shape[-2:]
    pad_h, pad_w = (-height) % 8, (-width) % 8
    x = F.pad(pixels, (0, pad_w, 0, pad_h), mode="replicate") * 255
    r, g, b = x.unbind(1)
    ycbcr = torch.stack(
        [
            0.299 * r + 0.587 * g + 0.114 * b,  # JFIF, ITU-R BT.601
            -0.168736 * r - 0.331264 * g + 0.5 * b,
            0.5 * r - 0.418688 * g - 0.081312 * b,
        ],
        1,
    )
    ycbcr[:, 0] -= 128
    batch, _, h, w = ycbcr.shape
    blocks = ycbcr.unfold(2, 8, 8).unfold(3, 8, 8)  # (B, 3, h/8, w/8, 8, 8)
    dct = _dct_matrix(pixels.device)
    coefficients = dct @ blocks @ dct.T
    tables = torch.stack(
        [
            _quality_table(_LUMA, quality, pixels.device),
            _quality_table(_CHROMA, quality, pixels.device),
            _quality_table(_CHROMA, quality, pixels.device),
        ]
    ).view(1, 3, 1, 1, 8, 8)
    blocks = dct.T @ (soft_round(coefficients / tables) * tables) @ dct
    ycbcr = blocks.permute(0, 1, 2, 4, 3, 5).reshape(batch, 3, h, w)
    y, cb, cr = ycbcr[:, 0] + 128, ycbcr[:, 1], ycbcr[:, 2]
    rgb = torch.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], 1) / 255
    return rgb[..., :height, :width].clamp(0, 1)


def resize(pixels: torch.Tensor, factor: float) -> torch.Tensor:
    """Down-sample by ``factor`` (antialiased bilinear) and back up to the input size."""
    height, width = pixels.shape[-2:]
    small = F.interpolate(
        pixels,
        size=(max(1, round(height * factor)), max(1, round(width * factor))),
        mode="bilinear",
        antialias=True,
        align_corners=False,
    )
    return F.interpolate(small, size=(height, width), mode="bilinear", align_corners=False)


def blur(pixels: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur, radius 3 sigma, reflect padding."""
    radius = max(1, math.ceil(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=pixels.dtype, device=pixels.device)
    kernel = torch.exp(-((offsets / sigma) ** 2) / 2)
    kernel = (kernel / kernel.sum()).view(1, 1, 1, -1).expand(pixels.shape[1], 1, 1, -1)
    x = F.conv2d(F.pad(pixels, (radius, radius, 0, 0), mode="reflect"), kernel, groups=pixels.shape[1])
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), kernel.transpose(-1, -2), groups=pixels.shape[1])


class RandomTransform:
    """Each call picks one of ``names`` (or the identity, one time in len(names) + 1) and its strength at random."""

    def __init__(self, names: tuple[str, ...], seed: int):
        self.names = names
        self.seed = seed

    def __call__(self, pixels: torch.Tensor, step: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        choice = int(torch.randint(0, len(self.names) + 1, (1,), generator=generator))
        strength = float(torch.rand((), generator=generator))
        if choice == len(self.names):
            return pixels
        name = self.names[choice]
        if name == "jpeg":
            return jpeg(pixels, quality=int(50 + 45 * strength))
        if name == "resize":
            return resize(pixels, 0.5 + 0.4 * strength)
        if name == "blur":
            return blur(pixels, 0.4 + 1.1 * strength)
        noise = torch.randn(pixels.shape, generator=generator).to(pixels.device, pixels.dtype)
        return (pixels + 0.03 * strength * noise).clamp(0, 1)
