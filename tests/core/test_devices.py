import types

import pytest
import torch

from fixative.core.cli.options import resolve_device
from fixative.core.devices import auto_device


@pytest.mark.parametrize(
    "cuda, mps, xpu, expected",
    [(True, True, True, "cuda"), (False, True, True, "mps"), (False, False, True, "xpu"), (False, False, False, "cpu")],
)
def test_auto_picks_cuda_then_mps_then_xpu_then_the_cpu(monkeypatch, cuda, mps, xpu, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    monkeypatch.setattr(torch, "xpu", types.SimpleNamespace(is_available=lambda: xpu), raising=False)
    assert auto_device().type == resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu")  # a named device is taken as named
