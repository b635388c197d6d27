"""Perceptual distances for the cloaking budget: SSIM, PSNR, L-inf and LPIPS.

Every function takes ``pixels`` in [0, 1], shape (batch, 3, height, width), is differentiable, and returns one
value per image, shape (batch,). These are the suite's one copy: ``eval`` imports them for its SSIM / PSNR / LPIPS
metrics.

References and tolerances (tested in tests/cloak/test_budget.py):
- ``ssim``: Wang et al. 2004, eq. 13, with a Gaussian window (size 11, sigma 1.5), K1 = 0.01, K2 = 0.03, data
  range 1, reflect padding so the map covers every pixel; equals torchmetrics' ``StructuralSimilarityIndexMeasure
  (data_range=1.0)`` within 1e-5.
- ``psnr``: 10 log10(1 / MSE), data range 1; equals torchmetrics' ``PeakSignalNoiseRatio(data_range=1.0)`` per
  image within 1e-4 dB.
- ``lpips``: the ``lpips`` package (Zhang et al. 2018) with its shipped linear layers; the backbone's ImageNet weights
  are read from torchvision's file, never downloaded, never silently random.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from fixative.core.errors import FixativeError

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03

# torchvision's ImageNet files for the two LPIPS backbones (the names torchvision's hub download writes).
LPIPS_BACKBONE_FILES = {"alex": "alexnet-owt-7be5be79.pth", "vgg": "vgg16-397923af.pth"}
LPIPS_MIN_SIDE = {"alex": 31, "vgg": 16}  # smaller images leave a trunk's last layer nothing to pool


def _gaussian_window(channels: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(channels, 1, 11, 11) normalised Gaussian, one per channel for a grouped convolution."""
    offsets = torch.arange(SSIM_WINDOW, dtype=dtype, device=device) - (SSIM_WINDOW - 1) / 2
    gauss = torch.exp(-((offsets / SSIM_SIGMA) ** 2) / 2)
    gauss = gauss / gauss.sum()
    window = gauss[:, None] * gauss[None, :]
    return window.expand(channels, 1, SSIM_WINDOW, SSIM_WINDOW).contiguous()


def ssim(pixels: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Mean structural similarity per image, (batch,); 1 for identical images.

    SSIM = (2 mu_x mu_y + C1)(2 sigma_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(sigma_x^2 + sigma_y^2 + C2)),
    C1 = (K1 L)^2, C2 = (K2 L)^2, L = 1 (Wang et al. 2004, eq. 13); local statistics under the Gaussian window.
    """
    _check_pair(pixels, reference)
    channels = pixels.shape[1]
    pad = (SSIM_WINDOW - 1) // 2
    window = _gaussian_window(channels, pixels.dtype, pixels.device)
    stacked = torch.cat((pixels, reference, pixels * pixels, reference * reference, pixels * reference))
    stacked = F.pad(stacked, (pad, pad, pad, pad), mode="reflect")
    mu_x, mu_y, xx, yy, xy = F.conv2d(stacked, window, groups=channels).split(pixels.shape[0])
    sigma_x_sq = (xx - mu_x**2).clamp(min=0.0)
    sigma_y_sq = (yy - mu_y**2).clamp(min=0.0)
    sigma_xy = xy - mu_x * mu_y
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * sigma_xy + c2)) / (
        (mu_x**2 + mu_y**2 + c1) * (sigma_x_sq + sigma_y_sq + c2)
    )
    return ssim_map.flatten(1).mean(1)


def psnr(pixels: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image, (batch,): 10 log10(1 / MSE); +inf for identical images."""
    _check_pair(pixels, reference)
    mse = (pixels - reference).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse)


def linf(pixels: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Largest absolute pixel change per image, (batch,), in [0, 1] units (multiply by 255 for 8-bit levels)."""
    _check_pair(pixels, reference)
    return (pixels - reference).abs().flatten(1).amax(1)


def _check_pair(pixels: torch.Tensor, reference: torch.Tensor) -> None:
    if pixels.ndim != 4 or pixels.shape != reference.shape:
        raise FixativeError(
            f"budget metrics take two (batch, channels, height, width) tensors of one shape; got "
            f"{tuple(pixels.shape)} and {tuple(reference.shape)}"
        )


def torch_hub_checkpoints() -> Path:
    """Where torchvision's pretrained files live: $TORCH_HOME/hub/checkpoints (torch.hub's own rule)."""
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints"


class LPIPS(torch.nn.Module):
    """LPIPS distance per image on [0, 1] pixels, (batch,); ``backbone`` says where the trunk's weights came from.

    ``backbone`` is "pretrained" (torchvision's ImageNet file) or "random" (``pnet_rand``: for tests of the mechanics
    only, not LPIPS; every record that uses it must say so).
    """

    def __init__(self, network, backbone: str, weights_path: Path | None, min_side: int = 1):
        super().__init__()
        self.network = network
        self.backbone = backbone
        self.weights_path = weights_path
        self.min_side = min_side
        for parameter in self.network.parameters():
            parameter.requires_grad_(False)

    def fits(self, pixels: torch.Tensor) -> bool:
        """Whether images of this size are large enough for the trunk."""
        return min(pixels.shape[-2:]) >= self.min_side

    def forward(self, pixels: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        _check_pair(pixels, reference)
        if not self.fits(pixels):
            height, width = pixels.shape[-2:]
            raise FixativeError(
                f"LPIPS needs images at least {self.min_side} px on each side, this one is {width}x{height}: bound it "
                "with --budget psnr=... / ssim=... / linf=... instead"
            )
        return self.network(pixels, reference, normalize=True).flatten(1).mean(1)


def load_lpips(
    net: str = "alex",
    backbone: str = "pretrained",
    weights: str | Path | None = None,
    device: torch.device | str = "cpu",
) -> LPIPS:
    """The LPIPS metric with ``net`` ("alex" or "vgg") and its backbone weights read from a local file.

    ``weights`` is torchvision's file for that backbone; without it the file is looked up in the torch hub cache
    (``$TORCH_HOME/hub/checkpoints``). A missing file is a FixativeError naming it and where to put it.
    ``backbone="random"`` builds an untrained trunk instead (tests of the mechanics only).
    """
    import lpips

    if net not in LPIPS_BACKBONE_FILES:
        raise FixativeError(f"LPIPS network must be one of {sorted(LPIPS_BACKBONE_FILES)}; got {net!r}")
    if backbone not in ("pretrained", "random"):
        raise FixativeError(f"LPIPS backbone must be 'pretrained' or 'random'; got {backbone!r}")
    weights_path = None
    if backbone == "pretrained":
        file_name = LPIPS_BACKBONE_FILES[net]
        weights_path = Path(weights) if weights is not None else torch_hub_checkpoints() / file_name
        if not weights_path.is_file():
            raise FixativeError(
                f"LPIPS needs torchvision's {net} weights {file_name}: not found at {weights_path}; copy the file into "
                f"{torch_hub_checkpoints()} (or $TORCH_HOME/hub/checkpoints) or pass its path (--lpips-weights)"
            )
    # pnet_rand=True builds the trunk without torchvision's download; the trained trunk is loaded below.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torchvision's deprecation note on lpips' `pretrained=` call
        network = lpips.LPIPS(net=net, pnet_rand=True, verbose=False)
    if weights_path is not None:
        _load_backbone(network.net, weights_path)
    network.eval()
    return LPIPS(network, backbone, weights_path, LPIPS_MIN_SIDE[net]).to(device)


def _load_backbone(trunk: torch.nn.Module, weights_path: Path) -> None:
    """Copy torchvision's ``features.{i}.*`` tensors into lpips' slices, whose children keep torchvision's index i."""
    try:
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file is the same user mistake
        raise FixativeError(f"cannot read LPIPS backbone weights {weights_path}: {error}") from None
    trunk_state = {}
    for key in trunk.state_dict():
        _, index, name = key.split(".", 2)  # "slice1.0.weight" -> features.0.weight
        source_key = f"features.{index}.{name}"
        if source_key not in state:
            raise FixativeError(f"{weights_path} is not torchvision's backbone for LPIPS: it lacks {source_key}")
        trunk_state[key] = state[source_key]
    trunk.load_state_dict(trunk_state, strict=True)
