"""Create timm ViT/DeiT models with real weights, and evaluate them.

Weights resolve as: an explicit file -> the offline mirror (checksum-verified) -> the timm hub.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import timm
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from heart_lib.data import DataError, manifest, mirror_path, verify
from heart_lib.paths import mirror_dir
from heart_lib.progress import progress as progress_bar
from heart_lib.stats import wilson_interval

WEIGHT_SOURCES = ("none", "mirror", "hub", "auto")


def check_model_name(name: str) -> None:
    """Raise a ValueError naming close matches when timm has no model called `name`."""
    if not isinstance(name, str) or not timm.is_model(name):
        close = difflib.get_close_matches(str(name), timm.list_models(), n=5, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
        raise ValueError(f"unknown model {name!r}: timm has no model of that name{hint}")


def create_model(name: str, weights: str | os.PathLike = "none", num_classes: int | None = None,
                 seed: int = 0, **timm_kwargs: Any) -> torch.nn.Module:
    """A timm model in eval mode, fp32, on the CPU.

    weights: "none" (random, seeded), "mirror" (the offline mirror), "hub" (timm's hub),
    "auto" (mirror, else hub) or a path to a state_dict file. `num_classes` different from the
    checkpoint's replaces the classifier with a new (seeded) one after loading.
    """
    check_model_name(name)
    torch.manual_seed(seed)
    source = os.fspath(weights)
    if source == "none":
        model = timm.create_model(name, pretrained=False, num_classes=num_classes or 1000, **timm_kwargs)
        return model.eval()
    if source in ("mirror", "auto"):
        path = mirror_weights(name)
        if path is None and source == "mirror":
            raise DataError(mirror_weights_missing(name))
        model = _from_file(name, path, timm_kwargs) if path is not None else _from_hub(name, timm_kwargs)
    elif source == "hub":
        model = _from_hub(name, timm_kwargs)
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise DataError(f"weights file {path} does not exist (weights must be one of "
                            f"{', '.join(WEIGHT_SOURCES)} or a path to a state_dict file)")
        model = _from_file(name, path, timm_kwargs)
    if num_classes is not None and num_classes != model.num_classes:
        torch.manual_seed(seed)
        model.reset_classifier(num_classes)
    return model.eval()


def mirror_weights_missing(name: str) -> str:
    """Why the mirror has no weights for `name`: where it looked, and the ways to supply them."""
    entry = manifest().get("weights", {}).get(name)
    if entry is None:
        return (f"no weights for {name!r} in data/manifest.yaml (it lists: {', '.join(manifest()['weights'])}); "
                "use weights='hub' (needs internet access) or a file path")
    root = mirror_dir()
    where = (f"looked for {root / entry['mirror']}" if root is not None
             else "no mirror folder (set HEART_DATA_MIRROR, default ../shared/data)")
    return (f"no {name} weights in the mirror: {where}; put the file there, set HEART_DATA_MIRROR, "
            "or use weights='hub' (needs internet access) or a file path")


def mirror_weights(name: str) -> Path | None:
    """The verified mirror checkpoint for model `name`, or None when the mirror has none."""
    entry = manifest().get("weights", {}).get(name)
    if entry is None:
        return None
    path = mirror_path(entry["mirror"])
    if path is None:
        return None
    verify(path, entry["sha256"], f"{name} weights")
    return path


def _from_file(name: str, path: Path, timm_kwargs: dict[str, Any]) -> torch.nn.Module:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means a bad file
        raise DataError(f"cannot read weights file {path}: {err}") from err
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # training checkpoints wrap the state_dict
    if not isinstance(state, dict):
        raise DataError(f"weights file {path} holds a {type(state).__name__}, not a state_dict")
    # Build the classifier the checkpoint has (e.g. 10 classes after fine-tuning on CIFAR-10).
    model = timm.create_model(name, pretrained=False, **timm_kwargs)
    head = model.pretrained_cfg.get("classifier", "head")
    head = head[0] if isinstance(head, (tuple, list)) else head
    classes = state.get(f"{head}.weight", torch.empty(0)).shape[:1]
    if classes and classes[0] != model.num_classes:
        model = timm.create_model(name, pretrained=False, num_classes=classes[0], **timm_kwargs)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise DataError(f"weights file {path} does not fit model {name!r}: {err}") from err
    return model


def _from_hub(name: str, timm_kwargs: dict[str, Any]) -> torch.nn.Module:
    entry = manifest().get("weights", {}).get(name, {})
    tag = entry.get("hub", name)
    try:
        return timm.create_model(tag, pretrained=True, **timm_kwargs)
    except Exception as err:  # noqa: BLE001 - offline, missing tag, ... all mean "hub unavailable"
        raise DataError(f"could not fetch pretrained weights for {name!r} from the timm hub ({tag}): "
                        f"{type(err).__name__}: {err}. Offline? Put the checkpoint in the mirror "
                        "(HEART_DATA_MIRROR) or pass weights=<path to a state_dict file>.") from err


@torch.no_grad()
def predict(model: torch.nn.Module, loader: DataLoader, progress: bool = True, desc: str = "evaluate"
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels over a loader (eval mode, no grad)."""
    model.eval()
    device = next(model.parameters()).device
    logits, labels = [], []
    for images, targets in (progress_bar(loader, desc) if progress else loader):
        logits.append(model(images.to(device)).float().cpu())
        labels.append(torch.as_tensor(targets))
    return torch.cat(logits), torch.cat(labels)


def per_image_table(logits: torch.Tensor, labels: torch.Tensor) -> pd.DataFrame:
    """One row per image: label, prediction, confidence, probability of the label, loss, hits."""
    loss = F.cross_entropy(logits, labels, reduction="none")
    probs = logits.softmax(-1)
    confidence, pred = probs.max(-1)
    top5 = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
    if not torch.isfinite(loss).all():
        bad = torch.nonzero(~torch.isfinite(loss)).flatten().tolist()
        raise FloatingPointError(f"non-finite loss for images at positions {bad[:20]}")
    return pd.DataFrame({
        "label": labels.numpy(),
        "pred": pred.numpy(),
        "confidence": confidence.numpy(),
        "prob_label": probs.gather(1, labels[:, None]).squeeze(1).numpy(),
        "loss": loss.numpy(),
        "correct": (pred == labels).numpy(),
        "correct_top5": (top5 == labels[:, None]).any(-1).numpy(),
    })


def evaluate(model: torch.nn.Module, loader: DataLoader, progress: bool = True) -> pd.DataFrame:
    """Per-image evaluation table of `model` over `loader` (see per_image_table)."""
    return per_image_table(*predict(model, loader, progress))


def summarize(table: pd.DataFrame, confidence: float = 0.95) -> dict[str, float]:
    """Top-1/top-5 accuracy with Wilson intervals, and the mean loss with a normal interval."""
    n = len(table)
    if n == 0:
        raise ValueError("cannot summarise an empty evaluation table")
    out: dict[str, float] = {"n": n}
    for name, column in (("top1", "correct"), ("top5", "correct_top5")):
        hits = int(table[column].sum())
        lo, hi = wilson_interval(hits, n, confidence)
        out.update({name: hits / n, f"{name}_lo": lo, f"{name}_hi": hi})
    sem = float(np.std(table["loss"], ddof=1) / np.sqrt(n)) if n > 1 else float("nan")
    out.update({"loss": float(table["loss"].mean()), "loss_sem": sem})
    return out
