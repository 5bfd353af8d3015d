"""The one place for platform workarounds.

1. torchvision from PyPI is a CUDA build. Next to a CPU-only torch its compiled extension
   (`_C.so`) does not load, and `import torchvision` (hence `import timm`) then fails with
   ``operator torchvision::nms does not exist``: torchvision registers fake kernels for ops whose
   schemas only its extension defines. When the extension cannot be loaded we define those two
   schemas ourselves, so torchvision imports; the ops themselves stay unavailable, which nothing
   here needs (they are detection ops).
2. Fused scaled-dot-product attention has no double backward and no forward-mode AD, so curvature
   (Hessian-vector products) must run timm's attention on its explicit, non-fused path.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from pathlib import Path
from typing import Iterator

import torch

# Schemas copied from the signatures torchvision's extension would register.
_TORCHVISION_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_fragment: torch.library.Library | None = None  # kept alive: the schemas vanish with it


def torchvision_extension_path() -> Path | None:
    """Path of torchvision's compiled extension, found without importing torchvision."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob("_C*.so")) + sorted(Path(folder).glob("_C*.pyd"))
        if found:
            return found[0]
    return None


def ensure_torchvision_importable() -> str:
    """Make ``import torchvision`` work; returns how: 'imported', 'extension', 'schemas' or 'absent'.

    Must run before torchvision is first imported; it is a no-op afterwards.
    """
    global _fragment
    if "torchvision" in sys.modules:
        return "imported"
    if _fragment is not None:
        return "schemas"
    path = torchvision_extension_path()
    if path is None:
        return "absent"
    try:
        torch.ops.load_library(str(path))
        return "extension"
    except (OSError, RuntimeError):
        pass
    _fragment = torch.library.Library("torchvision", "FRAGMENT")
    for schema in _TORCHVISION_SCHEMAS:
        _fragment.define(schema)
    return "schemas"


@contextlib.contextmanager
def non_fused_attention(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Run every timm attention module of `model` on the explicit (twice differentiable) path.

    timm decides fused vs explicit per module instance (`fused_attn`, fixed at construction), so
    flipping the global switch is not enough for a model that already exists.
    """
    flipped = [m for m in model.modules() if getattr(m, "fused_attn", False) is True]
    for module in flipped:
        module.fused_attn = False
    try:
        yield model
    finally:
        for module in flipped:
            module.fused_attn = True
