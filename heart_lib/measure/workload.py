"""What is measured: a timm model, optionally pruned by `heart_lib.pruning`, and its FLOPs.

`--pruning none` measures the plain timm model. Any other value is a pruning configuration in the
pruning engine's compact text form (e.g. ``tokens=0.7@3,6,9;selector=cls_attention``) or a path to
a YAML/JSON file; it is parsed and applied by `heart_lib.pruning` (imported lazily, so the harness
still measures unpruned models where the engine is absent). Every selector the pruning chapter
evaluates can be timed:
- the learned gate: with the trained gate when `gate=` names its file, else with an untrained gate of
  the same shape (the gate's cost depends on its shape only, not on its weights);
- the HEART oracle (`selector=heart`): each timed forward scores its own input with Hessian-vector
  products and then runs the pruned model, so the latency is end to end (scoring included).

FLOPs per image come from `heart_lib.flops` when importable (analytic count of what runs, plus
PyTorch's FlopCounterMode count as a cross-check); otherwise from FlopCounterMode alone, run with
non-fused attention because PyTorch's CPU fused-attention kernel has no FLOP formula and would be
silently skipped. The source is recorded with the number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from heart_lib._compat import non_fused_attention

NO_PRUNING = ("none", "", "dense", "unpruned")


@dataclass
class Workload:
    model: torch.nn.Module
    model_name: str
    pruning: str  # canonical text form; "none" for the plain model
    image_size: int
    params_m: float
    autograd: bool = False  # the forward differentiates inside itself (the HEART oracle)
    notes: str = ""  # what differs from the deployed model (an untrained gate of the same shape)


UNTRAINED_GATE_HIDDEN = 64  # the pruning chapter's gate size (its parameter gate_hidden)


def canonical_pruning(text: str) -> str:
    """The canonical text of a pruning config ('none' for no pruning); invalid configs raise ValueError."""
    if text is None or str(text).strip().lower() in NO_PRUNING:
        return "none"
    try:
        from heart_lib.pruning.config import PruningConfig
    except ImportError as err:
        raise ValueError(f"pruning = {text!r}: heart_lib.pruning is not available here ({err}); "
                         "only --pruning none can be measured") from err
    return PruningConfig.parse(text).to_string()


def build(model_name: str, pruning: str = "none", *, weights: str = "none", seed: int = 0,
          model_kwargs: dict[str, Any] | None = None) -> Workload:
    """The model to time, in eval mode on the CPU (the caller moves it to the device)."""
    from heart_lib import models

    model = models.create_model(model_name, weights, seed=seed, **(model_kwargs or {}))
    text = canonical_pruning(pruning)
    image_size = int(model.patch_embed.img_size[0]) if hasattr(model, "patch_embed") else 224
    autograd, notes = False, ""
    if text != "none":
        from pathlib import Path

        from heart_lib import catalogue
        from heart_lib import pruning as engine
        from heart_lib.pruning.selectors import TokenGateSet

        config = engine.PruningConfig.parse(text)
        needs = catalogue.reducer(config.selector).needs if config.layers else ()
        gate = None
        if "gate" in needs and not Path(str(config.gate)).is_file():
            torch.manual_seed(seed)
            gate = TokenGateSet(model.embed_dim, config.layers, UNTRAINED_GATE_HIDDEN).eval()
            notes = f"untrained token gate of the same shape ({UNTRAINED_GATE_HIDDEN} hidden units): timing only"
        autograd = "oracle" in needs
        model = engine.prune(model, config, gate=gate)
    model.eval()
    params = sum(p.numel() for p in model.parameters()) / 1e6
    return Workload(model, model_name, text, image_size, params, autograd, notes)


def flops_per_image(workload: Workload) -> dict[str, Any]:
    """{'flops_per_image', 'flops_source', 'flops_counted', 'flops_detail'}; never raises."""
    model, size = workload.model, workload.image_size
    out: dict[str, Any] = {"flops_per_image": math.nan, "flops_source": "", "flops_counted": math.nan,
                           "flops_detail": ""}
    try:
        from heart_lib import flops as engine_flops
    except ImportError:
        engine_flops = None
    if engine_flops is not None:
        try:
            out["flops_per_image"] = float(engine_flops.count_flops(model, size))
            out["flops_source"] = "heart_lib.flops.count_flops (analytic)"
        except Exception as err:  # noqa: BLE001 - FLOPs are reported, not required for timing
            out["flops_detail"] = f"analytic count failed: {type(err).__name__}: {err}"
        try:
            with torch.inference_mode():
                out["flops_counted"] = float(engine_flops.counted_flops(model, size))
        except Exception as err:  # noqa: BLE001
            out["flops_detail"] += f"; FlopCounterMode failed: {type(err).__name__}: {err}"
    if math.isnan(out["flops_counted"]):
        try:
            out["flops_counted"] = float(_flop_counter_mode(model, size))
        except Exception as err:  # noqa: BLE001
            out["flops_detail"] += f"; FlopCounterMode failed: {type(err).__name__}: {err}"
    if math.isnan(out["flops_per_image"]) and not math.isnan(out["flops_counted"]):
        out["flops_per_image"] = out["flops_counted"]
        out["flops_source"] = "torch FlopCounterMode (non-fused attention)"
    out["flops_detail"] = out["flops_detail"].strip("; ")
    return out


def _flop_counter_mode(model: torch.nn.Module, image_size: int) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(1, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    with non_fused_attention(model), FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(x)
    return int(counter.get_total_flops())
