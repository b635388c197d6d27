"""Assertions and helpers shared by the parity tests (imported as ``parity``: tests/ is on sys.path through
its conftest, and a module of its own cannot be shadowed by another folder's conftest.py)."""

from __future__ import annotations

import torch


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tolerance: float = 1e-4, what: str = "outputs") -> None:
    """Parity with a reference: max |actual - expected| within ``tolerance`` x max(1, max |expected|), compared in
    float32 on the CPU (non-finite reference entries must be matched exactly)."""
    actual, expected = actual.detach().float().cpu(), expected.detach().float().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)}, reference {tuple(expected.shape)}"
    finite = torch.isfinite(expected)
    same_non_finite = (actual[~finite] == expected[~finite]) | (actual[~finite].isnan() & expected[~finite].isnan())
    assert torch.equal(finite, torch.isfinite(actual)) and bool(same_non_finite.all()), (
        f"{what}: non-finite entries differ from the reference"
    )
    scale = expected[finite].abs().max().item() if finite.any() else 1.0
    bound = tolerance * max(1.0, scale)
    difference = (actual[finite] - expected[finite]).abs().max().item() if finite.any() else 0.0
    assert difference <= bound, f"{what} differ from the reference by {difference:.3g} (max abs; allowed {bound:.3g})"


def randomize(module: torch.nn.Module, seed: int) -> None:
    """Every parameter random (norm scales and biases too), so a swapped or skipped tensor shows in outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2 + (parameter == 1) * 1.0)
