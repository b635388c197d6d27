"""The FID Inception network: Inception-v3 as TensorFlow's ``pt_inception-2015-12-05`` graph computes it.

This is the network of Heusel et al. 2017's reference FID code, ported to PyTorch by pytorch-fid and
torch-fidelity; all three read the same converted weights (``pt_inception-2015-12-05-6726825d.pth``) and the
parameter names here are that file's keys. It differs from torchvision's Inception-v3 in four places, all
marked below: 1008 output classes, average pools that ignore padding, max pooling in the last block's pool
branch, and the TensorFlow 1.x bilinear resize to 299 x 299.

Reference and tolerance: pool features (2048) equal torch-fidelity's ``FeatureExtractorInceptionV3`` on the
same weights within 1e-4 (tests/eval/test_inception.py, random weights; no pretrained file exists here).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fixative.core.errors import FixativeError

WEIGHT_FILES = ("pt_inception-2015-12-05-6726825d.pth", "weights-inception-2015-12-05-6726825d.pth")
INPUT_SIZE = 299


def tf1_resize_bilinear(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize as TensorFlow 1.x's ``tf.image.resize_bilinear(align_corners=False)`` computes it.

    Source coordinate of output pixel i: s = i * in / out (no half-pixel offset, unlike torch's
    ``interpolate``); value = lerp between floor(s) and min(floor(s) + 1, in - 1). images (B, C, H, W), float.
    """

    def axis(in_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        source = torch.arange(size, dtype=images.dtype, device=images.device) * (in_size / size)
        low = source.long()
        return low, (low + 1).clamp(max=in_size - 1), source - low.to(images.dtype)

    y_low, y_high, dy = axis(images.shape[-2])
    x_low, x_high, dx = axis(images.shape[-1])
    top, bottom = images[..., y_low, :], images[..., y_high, :]
    top = top[..., x_low] + (top[..., x_high] - top[..., x_low]) * dx  # along x first, as TensorFlow does
    bottom = bottom[..., x_low] + (bottom[..., x_high] - bottom[..., x_low]) * dx
    return top + (bottom - top) * dy.view(-1, 1)


class BasicConv2d(nn.Module):
    """Convolution without bias, batch norm (TensorFlow's epsilon 0.001), ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_3x3(x: torch.Tensor) -> torch.Tensor:
    # TensorFlow's average pool divides by the number of real (unpadded) pixels
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):  # Mixed_5b, 5c, 5d: 35 x 35
    def __init__(self, in_channels: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, 1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch5x5_2(self.branch5x5_1(x)),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                self.branch_pool(_avg_pool_3x3(x)),
            ],
            1,
        )


class InceptionB(nn.Module):  # Mixed_6a: 35 -> 17
    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [
                self.branch3x3(x),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                F.max_pool2d(x, kernel_size=3, stride=2),
            ],
            1,
        )


class InceptionC(nn.Module):  # Mixed_6b .. 6e: 17 x 17, factorised 7 x 7
    def __init__(self, in_channels: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, 1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        double = x
        for layer in (
            self.branch7x7dbl_1,
            self.branch7x7dbl_2,
            self.branch7x7dbl_3,
            self.branch7x7dbl_4,
            self.branch7x7dbl_5,
        ):
            double = layer(double)
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
                double,
                self.branch_pool(_avg_pool_3x3(x)),
            ],
            1,
        )


class InceptionD(nn.Module):  # Mixed_7a: 17 -> 8
    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seven = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), seven, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):  # Mixed_7b, 7c: 8 x 8, expanded filter banks
    def __init__(self, in_channels: int, max_pool: bool):
        super().__init__()
        # TensorFlow's graph max-pools in Mixed_7c's pool branch where the paper (and Mixed_7b) average-pool
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(in_channels, 320, 1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        three = self.branch3x3_1(x)
        double = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _avg_pool_3x3(x)
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch3x3_2a(three),
                self.branch3x3_2b(three),
                self.branch3x3dbl_3a(double),
                self.branch3x3dbl_3b(double),
                self.branch_pool(pooled),
            ],
            1,
        )


class FIDInceptionV3(nn.Module):
    """uint8 images (B, 3, H, W) -> pool features (B, 2048), float32 (or the module's dtype)."""

    num_features = 2048

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)  # 1008 classes in the TensorFlow graph; unused for FID, kept for the keys

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise FixativeError(
                f"the FID Inception reads uint8 RGB images (B, 3, H, W), got {images.dtype} {tuple(images.shape)}"
            )
        dtype = self.fc.weight.dtype
        x = tf1_resize_bilinear(images.to(dtype), INPUT_SIZE)
        x = (x - 128) / 128  # the graph's (x - 128) * 0.0078125
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (B, 64, 147, 147)
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # (B, 192, 71, 71)
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for block in (
            self.Mixed_5b,
            self.Mixed_5c,
            self.Mixed_5d,
            self.Mixed_6a,
            self.Mixed_6b,
            self.Mixed_6c,
            self.Mixed_6d,
            self.Mixed_6e,
            self.Mixed_7a,
            self.Mixed_7b,
            self.Mixed_7c,
        ):
            x = block(x)
        return x.mean((2, 3))  # (B, 2048)


def find_weights(path: str | Path | None = None) -> Path:
    """The FID Inception weights: ``path`` when given, else the torch hub cache (``<hub>/checkpoints/``)."""
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FixativeError(
                f"FID Inception weights not found at {path}; give the path of "
                f"{WEIGHT_FILES[0]} (pytorch-fid's release) with --inception-weights"
            )
        return path
    checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    for name in WEIGHT_FILES:
        if (checkpoints / name).is_file():
            return checkpoints / name
    raise FixativeError(
        f"FID Inception weights missing: put {WEIGHT_FILES[0]} (pytorch-fid's release, "
        f"github.com/mseitzer/pytorch-fid/releases) in {checkpoints}/ or pass --inception-weights PATH"
    )


def load_fid_inception(path: str | Path | None = None, device: torch.device | str = "cpu") -> FIDInceptionV3:
    """The FID Inception with weights from ``path`` or the torch hub cache; strict: a missing or unexpected
    tensor is an error naming it. Never downloads, never falls back to random weights."""
    path = find_weights(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated or foreign file: say which, in one line
        raise FixativeError(f"cannot read FID Inception weights {path}: {error.__class__.__name__}") from None
    network = FIDInceptionV3()
    # batch norms' step counters are bookkeeping that converted files may or may not carry
    counters = {k: v for k, v in network.state_dict().items() if k.endswith("num_batches_tracked")}
    state = {**counters, **state}
    expected = set(network.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise FixativeError(f"{path} is not the FID Inception: missing {missing[:3]}, unexpected {unexpected[:3]}")
    network.load_state_dict(state)
    return network.requires_grad_(False).eval().to(device)
