"""Fixtures and assertions shared by every test package."""

from __future__ import annotations

import pytest
import torch


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tolerance: float = 1e-4, what: str = "outputs") -> None:
    """Parity with a reference: max |actual - expected| within ``tolerance`` x max(1, max |expected|), compared in
    float32 on the CPU (non-finite reference entries must be matched exactly)."""
    actual, expected = actual.detach().float().cpu(), expected.detach().float().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)}, reference {tuple(expected.shape)}"
    finite = torch.isfinite(expected)
    same_non_finite = (actual[~finite] == expected[~finite]) | (actual[~finite].isnan() & expected[~finite].isnan())
    assert torch.equal(finite, torch.isfinite(actual)) and bool(same_non_finite.all()), (
        f"{what}: non-finite entries differ from the reference")
    scale = expected[finite].abs().max().item() if finite.any() else 1.0
    bound = tolerance * max(1.0, scale)
    difference = (actual[finite] - expected[finite]).abs().max().item() if finite.any() else 0.0
    assert difference <= bound, f"{what} differ from the reference by {difference:.3g} (max abs; allowed {bound:.3g})"


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny networks: one thread is fastest, and it avoids OpenMP spin-waits (tens of times
    slower) when other processes share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
