"""Multiplicative gates and activation probes on timm's own ViT module instances.

A *token gate* multiplies the residual stream entering block `l` token by token (shape [B, N]);
a *head gate* multiplies each head's output just before `attn.proj` (shape [B, H]). Both are
attached as forward pre-hooks on the model's existing modules: no forward is copied, no weight is
copied, and `detach()` removes every hook. With a gate left at `None` (or all ones) the model
computes exactly what the unpatched model computes.

Gates are plain tensors held in a `GateSet`; the hooks read them at call time, so the same hooks
work for ordinary autograd, double backward and `torch.func` transforms (assign the transformed
tensor to the set inside the function being transformed).

The set can also *record* what the scores need besides derivatives: the block inputs `z` (token
activations), the head outputs before the projection, and the attention probabilities (the latter
only on timm's explicit attention path, see `heart_lib._compat.non_fused_attention`).
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import torch
from torch import nn

from heart_lib import timm_seam

__all__ = [
    "VitInfo", "GateSet", "vit_info", "check_layers", "attach_gates", "gates_attached", "num_prefix_tokens",
]


@dataclass(frozen=True)
class VitInfo:
    """What the gates need to know about a timm ViT."""

    depth: int
    num_heads: tuple[int, ...]  # per block
    head_dim: tuple[int, ...]  # per block
    num_prefix_tokens: int  # class + distillation + register tokens: never pruned
    has_class_token: bool


def vit_info(model: nn.Module) -> VitInfo:
    """Describe a timm ViT; a clear ValueError for anything else.

    Requires `model.blocks` (a sequence of blocks), each with `attn.proj` (nn.Linear) and
    `attn.num_heads`, and `model.num_prefix_tokens` (timm's VisionTransformer family, DeiT,
    distilled DeiT and register-token ViTs all qualify).
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module (a timm ViT), got {type(model).__name__}")
    blocks = getattr(model, "blocks", None)
    name = type(model).__name__
    if not isinstance(blocks, (nn.Sequential, nn.ModuleList)) or len(blocks) == 0:
        raise ValueError(f"model {name} is not a timm Vision Transformer: it has no `blocks` "
                         "(expected timm's VisionTransformer / DeiT family)")
    if not hasattr(model, "num_prefix_tokens"):
        raise ValueError(f"model {name} is not a timm Vision Transformer: it has no `num_prefix_tokens`")
    heads, head_dims = [], []
    for index, block in enumerate(blocks):
        attn = getattr(block, "attn", None)
        proj = getattr(attn, "proj", None)
        if not isinstance(proj, nn.Linear) or not hasattr(attn, "num_heads"):
            raise ValueError(f"model {name}: block {index} has no timm-style attention (`attn.proj` Linear and "
                             "`attn.num_heads`); head gates cannot be placed")
        num_heads = int(attn.num_heads)
        if proj.in_features % num_heads:
            raise ValueError(f"model {name}: block {index} attn.proj has {proj.in_features} inputs, "
                             f"not divisible by num_heads={num_heads}")
        heads.append(num_heads)
        head_dims.append(proj.in_features // num_heads)
    return VitInfo(depth=len(blocks), num_heads=tuple(heads), head_dim=tuple(head_dims),
                   num_prefix_tokens=int(model.num_prefix_tokens),
                   has_class_token=getattr(model, "cls_token", None) is not None)


def num_prefix_tokens(model: nn.Module) -> int:
    """How many leading tokens (class, distillation, register) the model carries; never prune them."""
    return vit_info(model).num_prefix_tokens


def check_layers(layers: Iterable[int] | int | None, depth: int, name: str = "layers") -> tuple[int, ...]:
    """Validate block indices (negative indices count from the end); returns them sorted, unique."""
    if layers is None:
        return tuple(range(depth))
    if isinstance(layers, int):
        layers = (layers,)
    out = []
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise ValueError(f"{name} must hold integer block indices, got {layer!r}")
        if not -depth <= layer < depth:
            raise ValueError(f"{name} = {layer} is out of range: the model has {depth} blocks "
                             f"(allowed 0..{depth - 1}, or negative from the end)")
        out.append(layer % depth)
    if not out:
        raise ValueError(f"{name} is empty: name at least one block index (0..{depth - 1})")
    return tuple(sorted(set(out)))


def _optional_layers(layers: Iterable[int] | int | None, depth: int, name: str) -> tuple[int, ...]:
    if layers is not None and not isinstance(layers, int):
        layers = tuple(layers)
        if not layers:
            return ()
    return check_layers(layers, depth, name)


@dataclass
class GateSet:
    """The gates and recordings of one attachment. Assign tensors to `token[l]` / `head[l]`.

    token[l]: None or a tensor broadcastable to [B, N] multiplying block l's input tokens.
    head[l]:  None or a tensor broadcastable to [B, H] multiplying block l's head outputs.
    After a forward with `record=True`: `tokens[l]` = block input [B, N, D] (before the gate),
    `heads[l]` = head outputs [B, N, H, d_head] (before the gate), `attention[l]` = attention
    probabilities [B, H, N, N] (explicit attention path only). Recordings keep their graph.
    """

    info: VitInfo
    token_layers: tuple[int, ...]
    head_layers: tuple[int, ...]
    token: dict[int, torch.Tensor | None] = field(default_factory=dict)
    head: dict[int, torch.Tensor | None] = field(default_factory=dict)
    record: bool = False
    tokens: dict[int, torch.Tensor] = field(default_factory=dict)
    heads: dict[int, torch.Tensor] = field(default_factory=dict)
    attention: dict[int, torch.Tensor] = field(default_factory=dict)
    _handles: list = field(default_factory=list, repr=False)

    def clear(self) -> None:
        """Reset every gate to None and drop recordings."""
        self.token = {layer: None for layer in self.token_layers}
        self.head = {layer: None for layer in self.head_layers}
        self.clear_records()

    def clear_records(self) -> None:
        self.tokens, self.heads, self.attention = {}, {}, {}

    def ones(self, batch: int, tokens: int, *, dtype: torch.dtype = torch.float32,
             device: torch.device | str = "cpu", requires_grad: bool = False
             ) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        """Fresh all-ones gates for every attached layer (set on this GateSet and returned)."""
        kw = dict(dtype=dtype, device=device)
        self.token = {l: torch.ones(batch, tokens, **kw).requires_grad_(requires_grad) for l in self.token_layers}
        self.head = {l: torch.ones(batch, self.info.num_heads[l], **kw).requires_grad_(requires_grad)
                     for l in self.head_layers}
        return self.token, self.head

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def detach(self) -> None:
        """Remove every hook this set placed on the model (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def _token_hook(gates: GateSet, layer: int):
    def hook(module: nn.Module, args: tuple, kwargs: dict):
        x = args[0]
        if gates.record:
            gates.tokens[layer] = x
        gate = gates.token.get(layer)
        if gate is None:
            return None
        if gate.shape[-1] != x.shape[1]:
            raise ValueError(f"token gate for block {layer} has {gate.shape[-1]} tokens, the block sees {x.shape[1]}")
        return (x * gate.to(x.dtype).unsqueeze(-1),) + tuple(args[1:]), kwargs
    return hook


def _head_hook(gates: GateSet, layer: int):
    heads, head_dim = gates.info.num_heads[layer], gates.info.head_dim[layer]

    def hook(module: nn.Module, args: tuple):
        x = args[0]  # [B, N, H * d_head], heads contiguous (timm reshapes (H, d_head) -> H * d_head)
        if gates.record:
            gates.heads[layer] = x.unflatten(-1, (heads, head_dim))
        gate = gates.head.get(layer)
        if gate is None:
            return None
        split = x.unflatten(-1, (heads, head_dim)) * gate.to(x.dtype).unsqueeze(-2).unsqueeze(-1)
        return (split.flatten(-2),) + tuple(args[1:])
    return hook


def _attention_hook(gates: GateSet, layer: int):
    def hook(module: nn.Module, args: tuple, output: torch.Tensor):
        if gates.record:
            gates.attention[layer] = output
    return hook


def attach_gates(model: nn.Module, *, token_layers: Iterable[int] | None = None,
                 head_layers: Iterable[int] | None = None, record: bool = False) -> GateSet:
    """Place token gates at the inputs of `token_layers` and head gates before `attn.proj` of
    `head_layers` (None = every block; () = none). Returns the GateSet; call `.detach()` when done,
    or use `gates_attached(...)` as a context manager.
    """
    info = vit_info(model)
    tl = _optional_layers(token_layers, info.depth, "token_layers")
    hl = _optional_layers(head_layers, info.depth, "head_layers")
    gates = GateSet(info=info, token_layers=tl, head_layers=hl, record=record)
    gates.clear()
    blocks = model.blocks
    for layer in tl:
        gates._handles.append(blocks[layer].register_forward_pre_hook(_token_hook(gates, layer), with_kwargs=True))
    for layer in hl:
        attn = blocks[layer].attn
        gates._handles.append(attn.proj.register_forward_pre_hook(_head_hook(gates, layer)))
        # timm applies attn_drop to the softmax output on the explicit path: a free place to read it.
        probe = timm_seam.attention_probe(attn)
        if probe is not None:
            gates._handles.append(probe.register_forward_hook(_attention_hook(gates, layer)))
    if record:  # attention maps for token layers too (CLS-attention scores of tokens at layer l)
        for layer in tl:
            probe = timm_seam.attention_probe(blocks[layer].attn)
            if layer not in hl and probe is not None:
                gates._handles.append(probe.register_forward_hook(_attention_hook(gates, layer)))
    return gates


@contextlib.contextmanager
def gates_attached(model: nn.Module, *, token_layers: Iterable[int] | None = None,
                   head_layers: Iterable[int] | None = None, record: bool = False) -> Iterator[GateSet]:
    """Context-manager form of `attach_gates`: the hooks are removed on exit, even on error."""
    gates = attach_gates(model, token_layers=token_layers, head_layers=head_layers, record=record)
    try:
        yield gates
    finally:
        gates.detach()


def hook_count(model: nn.Module) -> int:
    """Number of forward (pre-)hooks on the model's modules (for checking that detach cleans up)."""
    total = 0
    for module in model.modules():
        total += len(module._forward_pre_hooks) + len(module._forward_hooks)
    return total


# Whether running `blocks[start:] -> norm -> forward_head` reproduces a model's forward; checked
# once per model instance (the check costs two forwards).
_TAIL_OK: "weakref.WeakKeyDictionary[nn.Module, bool]" = weakref.WeakKeyDictionary()


class BlockRunner:
    """Re-run a ViT from the input of any block, reusing one recorded forward of `images`.

    Leave-one-out and per-layer curvature only depend on what happens downstream of the gated
    block, so starting there saves the upstream blocks. The tail is timm's own modules
    (`blocks[start:]`, `norm`, `forward_head`); it is checked once per model against the model's
    full forward, and if they differ (a model whose forward does more) every call runs the full
    model. `record=False` skips the recording forward: then only `logits_from(0)` (the model's
    own forward) is available.
    """

    def __init__(self, model: nn.Module, images: torch.Tensor, *, record: bool = True, check_tol: float = 1e-5):
        self.model, self.images = model, images
        self.info = vit_info(model)
        self.inputs: dict[int, torch.Tensor] = {}
        self.logits: torch.Tensor | None = None
        self.tail_ok = False
        if not record:
            return
        handles = [block.register_forward_pre_hook(
            lambda module, args, kwargs, i=i: self.inputs.__setitem__(i, args[0].detach()), with_kwargs=True)
            for i, block in enumerate(model.blocks)]
        try:
            with torch.no_grad():
                self.logits = model(images).detach()
        finally:
            for handle in handles:
                handle.remove()
        if len(self.inputs) == self.info.depth:
            if model not in _TAIL_OK:
                _TAIL_OK[model] = self._tail_matches(check_tol)
            self.tail_ok = _TAIL_OK[model]

    @property
    def num_tokens(self) -> int:
        return self.inputs[0].shape[1]

    def _tail(self, x: torch.Tensor, start: int) -> torch.Tensor:
        for block in list(self.model.blocks)[start:]:
            x = block(x)
        return self.model.forward_head(self.model.norm(x))

    def _tail_matches(self, tol: float) -> bool:
        if not all(hasattr(self.model, n) for n in ("norm", "forward_head")):
            return False
        with torch.no_grad():
            try:
                tail = self._tail(self.inputs[0], 0)
            except Exception:  # noqa: BLE001 - any failure means: do not use the shortcut
                return False
        scale = self.logits.abs().max().clamp_min(1.0)
        return tail.shape == self.logits.shape and bool(((tail - self.logits).abs() <= tol * scale).all())

    def logits_from(self, start: int, repeat: int = 1) -> torch.Tensor:
        """Model output computed from block `start`'s recorded input (gates apply as attached).

        start = 0 (or a model whose tail check failed) runs the model's own forward on the images.
        `repeat` > 1 stacks the batch that many times (replica r = rows r*B..(r+1)*B-1), so one
        call can evaluate several gate settings at once.
        """
        if start == 0 or not self.tail_ok:
            images = self.images.repeat(repeat, *([1] * (self.images.dim() - 1))) if repeat > 1 else self.images
            return self.model(images)
        x = self.inputs[start]
        return self._tail(x.repeat(repeat, 1, 1) if repeat > 1 else x, start)
