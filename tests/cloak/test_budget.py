"""The budget metrics against their references: torchmetrics' SSIM and PSNR, the lpips package's LPIPS."""

from __future__ import annotations

import warnings

import pytest
import torch
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from fixative.cloak.budget import LPIPS_BACKBONE_FILES, linf, load_lpips, psnr, ssim
from fixative.core.errors import FixativeError


def _pair(seed: int = 0, shape=(3, 3, 37, 53)) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    reference = torch.rand(shape, generator=generator, dtype=torch.float64)
    pixels = (reference + 0.1 * torch.randn(shape, generator=generator, dtype=torch.float64)).clamp(0, 1)
    return pixels, reference


def test_ssim_equals_torchmetrics_per_image():
    pixels, reference = _pair()
    ours = ssim(pixels.float(), reference.float())
    assert ours.shape == (3,)
    for index in range(3):
        metric = StructuralSimilarityIndexMeasure(data_range=1.0)
        expected = metric(pixels[index : index + 1].float(), reference[index : index + 1].float())
        assert abs(ours[index].item() - expected.item()) < 1e-5
    assert ssim(reference, reference).sub(1).abs().max() < 1e-12


def test_psnr_equals_torchmetrics_per_image():
    pixels, reference = _pair(1)
    ours = psnr(pixels, reference)
    for index in range(3):
        metric = PeakSignalNoiseRatio(data_range=1.0)
        expected = metric(pixels[index : index + 1], reference[index : index + 1])
        assert abs(ours[index].item() - expected.item()) < 1e-4


def test_linf_is_the_largest_change():
    reference = torch.zeros(2, 3, 8, 8)
    pixels = reference.clone()
    pixels[0, 1, 3, 4] = 16 / 255
    pixels[1, 2, 0, 0] = -4 / 255
    assert torch.allclose(linf(pixels, reference), torch.tensor([16 / 255, 4 / 255]))


def test_metrics_are_differentiable():
    pixels, reference = _pair(2)
    pixels = pixels.float().requires_grad_(True)
    total = ssim(pixels, reference.float()).sum() + psnr(pixels, reference.float()).sum()
    total.backward()
    assert torch.isfinite(pixels.grad).all() and pixels.grad.abs().sum() > 0


def test_missing_lpips_backbone_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FixativeError) as caught:
        load_lpips("alex")
    message = str(caught.value)
    assert "\n" not in message and LPIPS_BACKBONE_FILES["alex"] in message and str(tmp_path / "hub") in message
    with pytest.raises(FixativeError, match="vgg16-397923af.pth"):
        load_lpips("vgg", weights=tmp_path / "nowhere.pth")


def test_lpips_reads_a_torchvision_backbone_file(tmp_path, monkeypatch):
    """A backbone file in the hub cache is loaded into the trunk; the values equal lpips built on that trunk."""
    import lpips
    import torchvision

    torch.manual_seed(0)
    alexnet = torchvision.models.alexnet()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(alexnet.state_dict(), tmp_path / "hub" / "checkpoints" / LPIPS_BACKBONE_FILES["alex"])
    metric = load_lpips("alex")
    assert metric.backbone == "pretrained"
    assert torch.equal(getattr(metric.network.net.slice2, "3").weight, alexnet.features[3].weight)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torchvision's note on the lpips package's `pretrained=`
        reference_metric = lpips.LPIPS(net="alex", pnet_rand=True, verbose=False)
    net = reference_metric.net
    for slice_ in (net.slice1, net.slice2, net.slice3, net.slice4, net.slice5):
        for name, module in slice_.named_children():
            module.load_state_dict(alexnet.features[int(name)].state_dict())
    pixels, reference = _pair(3, (2, 3, 64, 64))
    pixels, reference = pixels.float(), reference.float()
    expected = reference_metric(pixels * 2 - 1, reference * 2 - 1).flatten()
    assert torch.allclose(metric(pixels, reference), expected, atol=1e-6)


def test_random_lpips_backbone_is_explicit():
    metric = load_lpips("alex", backbone="random")
    assert metric.backbone == "random" and metric.weights_path is None
    pixels, reference = _pair(4, (2, 3, 64, 64))
    distances = metric(pixels.float(), reference.float())
    assert distances.shape == (2,) and (distances > 0).all()
    assert metric(reference.float(), reference.float()).abs().max() < 1e-6
