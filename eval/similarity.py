"""Paired image similarity: SSIM, PSNR, L-inf and LPIPS of test images against their references.

The distances themselves are cloak's budget functions (cloak/budget.py, the suite's one copy, each equal to
its reference: torchmetrics' SSIM within 1e-5, PSNR within 1e-4 dB, the lpips package); here they are applied
to pairs of image folders (matched by file name) and reported per image and as a mean, with provenance.
PSNR's mean is the mean of per-image PSNR (not the PSNR of the pooled MSE).
"""

from __future__ import annotations

from pathlib import Path

import torch

from fixative.cloak.budget import linf, load_lpips, psnr, ssim
from fixative.core.errors import FixativeError

from .features import file_sha256, image_files, read_uint8

PAIRED = ("ssim", "psnr", "linf", "lpips")
REFERENCES = {
    "ssim": "Wang et al. 2004 (Gaussian 11x11, sigma 1.5, data range 1); torchmetrics SSIM within 1e-5",
    "psnr": "10 log10(1 / MSE), data range 1, per image; torchmetrics PSNR within 1e-4 dB",
    "linf": "max |x - y| in [0, 1] units",
    "lpips": "lpips package (Zhang et al. 2018), linear layers v0.1",
}


def distance_function(
    metric: str,
    lpips_net: str = "alex",
    lpips_backbone: str = "pretrained",
    lpips_weights: str | Path | None = None,
    device: torch.device | str = "cpu",
):
    """(function of (pixels, reference) in [0, 1] -> per-image values, provenance)."""
    if metric not in PAIRED:
        raise FixativeError(f"unknown paired metric {metric!r}; choose one of {', '.join(PAIRED)}")
    provenance = {"metric": metric, "reference": REFERENCES[metric]}
    if metric != "lpips":
        return {"ssim": ssim, "psnr": psnr, "linf": linf}[metric], provenance
    network = load_lpips(lpips_net, lpips_backbone, lpips_weights, device)
    provenance.update(
        net=lpips_net,
        backbone=lpips_backbone,
        backbone_weights=str(network.weights_path) if network.weights_path else None,
        backbone_sha256=file_sha256(network.weights_path) if network.weights_path else None,
    )
    if lpips_backbone == "random":
        provenance["warning"] = "random LPIPS backbone: a test of the mechanics, not LPIPS"

    def distance(pixels: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return network(pixels.to(device, torch.float32), reference.to(device, torch.float32)).cpu()

    return distance, provenance


def compare_folders(test: str | Path, reference: str | Path, metric: str, **options) -> dict:
    """``metric`` of every image in ``test`` against the same-named image in ``reference``.

    Pairs missing a partner or unreadable are skipped and listed; pairs of different sizes are an error."""
    distance, provenance = distance_function(metric, **options)
    references = {p.name: p for p in image_files(reference)}
    values, skipped = {}, []
    for path in image_files(test):
        image = read_uint8(path)
        partner = read_uint8(references[path.name]) if path.name in references else None
        if image is None or partner is None:
            skipped.append(path.name)
            continue
        if image.shape != partner.shape:
            raise FixativeError(
                f"{path.name}: {tuple(image.shape[1:])} in {test} but {tuple(partner.shape[1:])} "
                f"in {reference}; paired metrics need images of one size"
            )
        pixels = image[None].double() / 255
        values[path.name] = float(distance(pixels, partner[None].double() / 255)[0])
    if not values:
        raise FixativeError(f"no image of {test} has a readable same-named partner in {reference}")
    finite = [v for v in values.values() if v != float("inf")]  # PSNR of identical images is +inf
    mean = sum(finite) / len(finite) if finite else float("inf")
    return {
        "metric": metric,
        "value": mean,
        "per_image": values,
        "pairs": len(values),
        "identical_pairs_left_out_of_the_mean": len(values) - len(finite),
        "skipped": skipped,
        "test": str(test),
        "reference": str(reference),
        "provenance": provenance,
    }
