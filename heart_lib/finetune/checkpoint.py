"""Checkpoints that resume a run exactly: what they hold, how they are written, when they are refused.

A checkpoint holds the model, optimiser, scheduler and loss-scaler states, the step and the
position inside the epoch, the partial epoch sums, every random-number state (torch CPU and CUDA,
numpy, Python, the pruned model's selector generator) of every process, and a *fingerprint* of
the configuration. Resuming under a different fingerprint is refused with the differences named.
Files are written atomically (temporary file + rename): a kill during the write leaves the
previous checkpoint intact.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from heart_lib.results import atomic_path

FORMAT = 1


class CheckpointMismatch(ValueError):
    """A checkpoint was written by another configuration; the message names the differences."""


def model_fingerprint(model: nn.Module) -> dict[str, Any]:
    """What identifies the architecture being trained: class, pruning config, parameter shapes."""
    config = getattr(model, "config", None)
    shapes = [f"{name}:{tuple(p.shape)}" for name, p in model.state_dict().items()]
    return {
        "model_class": type(model).__name__,
        "pruning": config.to_string() if hasattr(config, "to_string") else None,
        "parameters": sum(p.numel() for p in model.parameters()),
        "state_shapes": hashlib.sha256("\n".join(shapes).encode()).hexdigest()[:16],
    }


def differences(saved: dict[str, Any], current: dict[str, Any], ignore: tuple[str, ...] = ()) -> list[str]:
    """Human-readable differences between two flat fingerprints (keys in `ignore` skipped)."""
    out = []
    for key in sorted(set(saved) | set(current)):
        if key in ignore:
            continue
        a, b = saved.get(key, "<absent>"), current.get(key, "<absent>")
        if a != b:
            out.append(f"{key}: checkpoint {a!r}, now {b!r}")
    return out


def rng_state(model: nn.Module | None = None) -> dict[str, Any]:
    """Every random-number state this process draws from."""
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }
    # The random token selector owns a generator (PrunedViT._generator); it must resume too.
    gen = getattr(model, "_generator", None)
    state["selector"] = gen.get_state() if isinstance(gen, torch.Generator) else None
    return state


def set_rng_state(state: dict[str, Any], model: nn.Module | None = None) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    gen = getattr(model, "_generator", None)
    if state.get("selector") is not None and isinstance(gen, torch.Generator):
        gen.set_state(state["selector"])


def save(path: str | Path, blob: dict[str, Any]) -> Path:
    """Write a checkpoint atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save({"format": FORMAT, **blob}, tmp)
    return path


def load(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint (CPU tensors). Python/numpy RNG states need full unpickling: only load
    checkpoints this library wrote."""
    path = Path(path)
    try:
        blob = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means an unusable file
        raise ValueError(f"cannot read checkpoint {path}: {type(err).__name__}: {err}") from err
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise ValueError(f"{path} is not a heart_lib fine-tuning checkpoint (format {FORMAT})")
    return blob


def check_compatible(blob: dict[str, Any], fingerprint: dict[str, Any], path: str | Path,
                     ignore: tuple[str, ...] = ()) -> None:
    """Refuse (CheckpointMismatch) a checkpoint written under another configuration."""
    diff = differences(blob["fingerprint"], fingerprint, ignore)
    if diff:
        raise CheckpointMismatch(
            f"checkpoint {path} was written by another configuration; refusing to resume. Differences: "
            + "; ".join(diff) + ". Use a fresh output folder, or start over with --no-resume (resume=False from Python).")
