"""Tensor maths of the drop selectors ("higher = keep"), and the learned token gate.

The selectors themselves are entries of `heart_lib.catalogue`.

All scorers return one score per token of the current sequence, shape [B, n]; the pruning wrapper
never lets prefix tokens (class/distillation/register) compete, whatever their score.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from timm.layers import Attention

from heart_lib import timm_seam


def class_attention(probs: torch.Tensor, has_class_token: bool) -> torch.Tensor:
    """The one definition of "CLS attention" (sensitivity scores and the pruning selector alike):
    the attention each token receives, mean over heads, from the class token's query row; in a
    model without a class token (its first tokens are registers), the mean over every query row.

    probs [B, H, q, n]: attention probabilities of the query rows at hand (the class token's row
    first when there is one). Returns [B, n].
    """
    rows = probs[:, :, 0] if has_class_token else probs.mean(dim=2)
    return rows.mean(dim=1)


def cls_attention_from_qkv(qkv: torch.Tensor, attn: Attention, has_class_token: bool = True) -> torch.Tensor:
    """`class_attention` from a captured `attn.qkv` output [B, n, 3·H·d].

    With a class token only its query row is computed (B·H·n·d multiply-adds), so the attention
    itself can stay on timm's fused path, which never materialises the probabilities.
    """
    parts = timm_seam.split_qkv(qkv, attn.num_heads, attn.head_dim)  # [B, n, 3, H, d]
    queries = parts[:, :1, 0] if has_class_token else parts[:, :, 0]  # [B, q, H, d]
    q = attn.q_norm(queries.transpose(1, 2))  # [B, H, q, d]
    k = attn.k_norm(parts[:, :, 1].transpose(1, 2))  # [B, H, n, d]
    logits = torch.einsum("bhqd,bhnd->bhqn", q, k) * attn.scale
    return class_attention(logits.softmax(dim=-1), has_class_token)


def gather_scores(full: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Scores given per original token position [B, N] read at the current tokens' positions [B, n].

    Tokens with no original position (index < 0: a fused token) score +inf, so they are kept.
    """
    safe = index.clamp(min=0)
    out = full.to(index.device).gather(1, safe).float()
    return torch.where(index < 0, torch.full_like(out, math.inf), out)


def capture_output(module: nn.Module, store: dict, key: str):
    """Register a forward hook that stores the module's output in `store[key]`; returns the handle."""
    def hook(_module, _args, output):
        store[key] = output
    return module.register_forward_hook(hook)


# ---------------------------------------------------------------------------- learned gate

class TokenGate(nn.Module):
    """A light per-token scorer for one layer: LayerNorm -> Linear(D, h) -> GELU -> Linear(h, 1).

    Trained to predict the (per-image standardised, log-scaled) HEART score of each token from the
    token's residual-stream vector, so that at inference it ranks tokens like the HVP oracle does
    at ~2·D·h FLOPs per token instead of several backward passes.
    """

    def __init__(self, dim: int, hidden: int = 64):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(self.norm(x)))).squeeze(-1)


class TokenGateSet(nn.Module):
    """One TokenGate per pruning layer (keys are layer indices)."""

    def __init__(self, dim: int, layers: tuple[int, ...], hidden: int = 64):
        super().__init__()
        self.dim, self.hidden, self.layers = dim, hidden, tuple(int(v) for v in layers)
        self.gates = nn.ModuleDict({str(layer): TokenGate(dim, hidden) for layer in self.layers})

    def forward(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        key = str(int(layer))
        if key not in self.gates:
            raise ValueError(f"the token gate has no layer {layer}; it was trained for layers {self.layers}")
        return self.gates[key](x)

    def save(self, path: str | Path) -> Path:
        from heart_lib.results import atomic_path

        path = Path(path)
        with atomic_path(path) as tmp:
            torch.save({"dim": self.dim, "hidden": self.hidden, "layers": list(self.layers),
                        "state_dict": self.state_dict()}, tmp)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "TokenGateSet":
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"gate = {str(path)!r}: no such file (train one with train_token_gate)")
        blob = torch.load(path, map_location="cpu", weights_only=True)
        gate = cls(blob["dim"], tuple(blob["layers"]), blob["hidden"])
        gate.load_state_dict(blob["state_dict"])
        return gate.eval()


def gate_targets(scores: torch.Tensor, prefix: int) -> torch.Tensor:
    """Regression target from HEART scores [B, N]: per-image standardised log(|S| + tiny).

    Ranking is all the gate needs; logs tame the heavy tail, standardising removes the per-image
    scale (images differ by orders of magnitude in curvature).
    """
    s = scores[:, prefix:].abs().double()
    t = torch.log(s + 1e-12 * s.mean(dim=1, keepdim=True).clamp(min=1e-30))
    t = (t - t.mean(dim=1, keepdim=True)) / t.std(dim=1, keepdim=True).clamp(min=1e-12)
    return t.float()


@torch.no_grad()
def block_inputs(model: nn.Module, images: torch.Tensor, layers: tuple[int, ...], batch_size: int = 32
                 ) -> dict[int, torch.Tensor]:
    """Residual-stream input of each block in `layers` of an (unpruned) timm ViT, [B, N, D] per layer."""
    store: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    handles = [model.blocks[layer].register_forward_pre_hook(
        lambda _m, args, layer=layer: store[layer].append(args[0].detach())) for layer in layers]
    try:
        for start in range(0, len(images), batch_size):
            model(images[start:start + batch_size])
    finally:
        for handle in handles:
            handle.remove()
    return {layer: torch.cat(chunks) for layer, chunks in store.items()}


def train_token_gate(features: Mapping[int, torch.Tensor], scores: Mapping[int, torch.Tensor], prefix: int,
                     hidden: int = 64, epochs: int = 60, lr: float = 3e-3, batch_size: int = 64,
                     seed: int = 0) -> TokenGateSet:
    """Fit one TokenGate per layer to predict HEART scores from block-input features.

    features[l]: [B, N, D] residual stream at block l's input (unpruned model); scores[l]: [B, N]
    HEART scores of the same images. Prefix tokens are excluded (never pruned).
    """
    layers = tuple(sorted(int(v) for v in features))
    if set(layers) != set(int(v) for v in scores):
        raise ValueError(f"features layers {layers} and scores layers {sorted(scores)} differ")
    if epochs < 1 or hidden < 1:
        raise ValueError(f"epochs ({epochs}) and hidden ({hidden}) must be positive")
    dim = next(iter(features.values())).shape[-1]
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    gates = TokenGateSet(dim, layers, hidden)
    for layer in layers:
        x = features[layer][:, prefix:].float()
        t = gate_targets(scores[layer], prefix)
        gate = gates.gates[str(layer)]
        opt = torch.optim.AdamW(gate.parameters(), lr=lr, weight_decay=1e-4)
        steps = epochs * math.ceil(len(x) / batch_size)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
        gate.train()
        for _ in range(epochs):
            order = torch.randperm(len(x), generator=gen)
            for start in range(0, len(x), batch_size):
                idx = order[start:start + batch_size]
                loss = F.mse_loss(gate(x[idx]), t[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
        gate.eval()
    return gates.eval()


@torch.no_grad()
def gate_rank_agreement(gates: TokenGateSet, features: Mapping[int, torch.Tensor],
                        scores: Mapping[int, torch.Tensor], prefix: int) -> dict[int, float]:
    """Mean per-image Spearman correlation between gate predictions and HEART scores, per layer."""
    from scipy.stats import spearmanr

    out = {}
    for layer in gates.layers:
        pred = gates(layer, features[layer][:, prefix:].float()).numpy()
        target = scores[layer][:, prefix:].abs().numpy()
        rho = [spearmanr(p, t).statistic for p, t in zip(pred, target)]
        out[layer] = float(np.nanmean(rho))
    return out
