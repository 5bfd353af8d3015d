"""heart_lib: a reproduction of HEART-ViT (Hessian-guided token and head pruning for ViTs)."""

from heart_lib._compat import ensure_torchvision_importable

TORCHVISION_MODE = ensure_torchvision_importable()

__version__ = "0.1.0"
