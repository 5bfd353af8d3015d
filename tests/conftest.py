"""Shared fixtures: small random ViTs and the real mirror (tests needing it skip with a reason if absent)."""

from __future__ import annotations

import os

import pytest
import torch

import heart_lib  # noqa: F401  (makes torchvision importable before timm is imported below)
from heart_lib.paths import mirror_dir

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def mirror():
    root = mirror_dir()
    if root is None or not root.is_dir():
        if os.environ.get("CI"):
            pytest.fail("the data mirror (../shared/data or HEART_DATA_MIRROR) is missing on CI")
        pytest.skip("no data mirror (set HEART_DATA_MIRROR)")
    return root


@pytest.fixture
def tiny_vit():
    from heart_lib.models import create_model

    return create_model("vit_tiny_patch16_224", weights="none", img_size=32, patch_size=8, depth=2,
                        num_classes=10)


@pytest.fixture
def one_thread():
    """Many tiny ops: one thread is much faster than two on a machine shared with other jobs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
