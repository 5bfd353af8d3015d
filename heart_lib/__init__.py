"""heart_lib: a reproduction of HEART-ViT (Hessian-guided token and head pruning for ViTs)."""

import warnings

from heart_lib._compat import ensure_torchvision_importable

# timm imports huggingface_hub, which imports tqdm.auto; in a notebook kernel without ipywidgets that
# warns "IProgress not found" on every page of the book. Our own bars live in heart_lib.progress.
warnings.filterwarnings("ignore", message="IProgress not found")

TORCHVISION_MODE = ensure_torchvision_importable()

__version__ = "0.1.0"
