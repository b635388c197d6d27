"""Fixtures shared by the consistency tests (helpers: distill_helpers.py)."""

from __future__ import annotations

import pytest
import torch
from distill_helpers import tiny_teacher

from fixative.core.model import StableDiffusionModel


@pytest.fixture(scope="module")
def one_thread():
    """Tiny networks run fastest on one thread, and it avoids OpenMP spin-waits on shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def teacher() -> StableDiffusionModel:
    return tiny_teacher()
