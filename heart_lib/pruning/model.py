"""A physically pruned timm ViT/DeiT: tokens gathered away at chosen layers, heads sliced out.

`prune(model, config)` deep-copies the model (the original stays untouched), slices the removed
heads out of the copy's weights, and wraps it in `PrunedViT`, whose forward runs the copy's own
submodules (patch embedding, blocks, norm, head) and reduces tokens between them. Blocks without
a reduction run through timm's own `Block.forward` (fused attention included); EViT/ToMe blocks
call the block's submodules in two halves so the reduction sits between attention and MLP, as in
their papers.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import nn
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer

from heart_lib import catalogue, checks, timm_seam
from heart_lib.catalogue import DropSite, PeerSite
from heart_lib.pruning.config import PruningConfig, kept_tokens
from heart_lib.pruning.heads import check_sliceable, slice_heads
from heart_lib.pruning.selectors import TokenGateSet, capture_output, cls_attention_from_qkv

# Score provider for the HEART oracle: (model, images, layers) -> {layer: [B, N] scores}.
OracleFn = Callable[[nn.Module, torch.Tensor, tuple[int, ...]], Mapping[int, torch.Tensor]]


def check_model(model: nn.Module) -> None:
    """Raise ValueError unless `model` is a timm VisionTransformer with standard blocks and attention."""
    if not isinstance(model, VisionTransformer):
        raise ValueError(f"pruning supports timm VisionTransformer models (ViT, DeiT), got {type(model).__name__}")
    for i, block in enumerate(model.blocks):
        if type(block) is not Block:
            raise ValueError(f"block {i} is a {type(block).__name__}; pruning supports timm's standard Block")
        check_sliceable(block.attn, where=f"block {i} attention")


@dataclass
class TokenState:
    """Tokens between blocks: values, original positions (-1 = fused) and ToMe sizes."""

    x: torch.Tensor
    index: torch.Tensor
    size: torch.Tensor | None = None


@dataclass
class ForwardRecord:
    """What the last forward ran: tokens per block (attention, MLP) for each input, oracle time."""

    counts: list[list[tuple[int, int]]] = field(default_factory=list)  # per input: per block
    oracle_seconds: float = 0.0
    kept_index: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [B, n] original positions


class PrunedViT(nn.Module):
    """A pruned copy of a timm ViT. Call it like the model; `record` says what ran last time."""

    def __init__(self, model: VisionTransformer, config: PruningConfig, gate: TokenGateSet | None = None,
                 oracle: OracleFn | None = None, keep_index: bool = False):
        super().__init__()
        self.model = model
        self.config = config
        self.prefix = int(model.num_prefix_tokens)
        self.has_class_token = getattr(model, "cls_token", None) is not None
        self.gate = gate
        self._oracle = oracle
        self.keep_index = keep_index
        self.record = ForwardRecord()
        self._generator = torch.Generator().manual_seed(config.seed)
        self._keep = config.keep_map
        self.entry = catalogue.reducer(config.selector)
        self._drop_layers = tuple(config.layers) if self.entry.drops else ()
        # Blocks whose class-token attention the next block's selection needs.
        self._cls_source = ({l - 1 for l in self._drop_layers} if "previous_attention" in self.entry.needs
                            else set())
        if "gate" in self.entry.needs and config.layers:
            missing = [l for l in config.layers if str(l) not in gate.gates]
            if missing:
                raise ValueError(f"the token gate has no layers {missing} (trained for {gate.layers})")

    # ------------------------------------------------------------------ helpers

    @property
    def num_patches(self) -> int:
        return int(self.model.patch_embed.num_patches)

    def extra_repr(self) -> str:
        return f"config={self.config.to_string()!r}"

    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        return timm_seam.embed(self.model, images)

    def oracle_scores(self, images: torch.Tensor) -> dict[int, torch.Tensor]:
        """HEART scores per original token position for the drop layers, from the head-sliced,
        unpruned model (scores are computed once per input, not re-computed as tokens vanish)."""
        if self._oracle is not None:
            fn = self._oracle
        else:
            from heart_lib import sensitivity  # the sensitivity engine (another module's job)

            def fn(model, imgs, layers):
                return sensitivity.score_tokens(model, imgs, layers=list(layers), method=self.entry.score,
                                                loss="pseudo", probes=self.config.probes, seed=self.config.seed)
        with torch.enable_grad():
            scores = fn(self.model, images, self._drop_layers)
        return {int(k): v.detach() for k, v in scores.items()}

    def _scores(self, layer: int, state: TokenState, context: dict[str, Any]) -> torch.Tensor:
        site = DropSite(layer, state.x, state.index, context, self._generator, self.gate, self.config.variant)
        return self.entry.scorer(site)

    def _reduces(self, layer: int, n_body: int) -> bool:
        """Whether the drop at `layer` removes tokens (else no scores are computed at all)."""
        if self.config.per_input_budget is not None:
            return True
        return kept_tokens(n_body, self._keep[layer], self.config.selector, self.config.fuse) < n_body

    def _drop(self, layer: int, state: TokenState, context: dict[str, Any]) -> TokenState:
        p = self.prefix
        n_body = state.x.shape[1] - p
        if not self._reduces(layer, n_body):
            return state
        scores = self._scores(layer, state, context)[:, p:]
        cfg = self.config
        if cfg.per_input_budget is not None:
            # Batch size 1: the fewest kept tokens whose dropped tokens' predicted loss fits the budget.
            if state.x.shape[0] != 1:
                raise AssertionError("per-input budgets run one input at a time")
            floor = kept_tokens(n_body, self._keep[layer])
            loss = catalogue.predicted_loss(scores[0])
            ordered = loss.sort().values.cumsum(0)
            share = cfg.per_input_budget / len(self._drop_layers)
            droppable = int((ordered <= share).sum())
            keep = max(floor, n_body - droppable)
        else:
            keep = kept_tokens(n_body, self._keep[layer])
        if keep >= n_body:
            return state
        order = scores.argsort(dim=1, descending=True)
        top, rest = order[:, :keep] + p, order[:, keep:] + p
        x = state.x.gather(1, top.unsqueeze(-1).expand(-1, -1, state.x.shape[-1]))
        index = state.index.gather(1, top)
        parts, idx_parts = [state.x[:, :p], x], [state.index[:, :p], index]
        if cfg.fuse:
            # EViT's fused token, here weighted by the selector's own (softmax-normalised) scores.
            w = scores.gather(1, rest - p).float().softmax(dim=1).unsqueeze(-1)
            dropped = state.x.gather(1, rest.unsqueeze(-1).expand(-1, -1, state.x.shape[-1]))
            parts.append((dropped * w).sum(dim=1, keepdim=True))
            idx_parts.append(torch.full_like(index[:, :1], -1))
        return TokenState(torch.cat(parts, dim=1), torch.cat(idx_parts, dim=1), state.size)

    def _run_block(self, layer: int, block: Block, state: TokenState, context: dict[str, Any]) -> TokenState:
        selector = self.config.selector
        n_body = state.x.shape[1] - self.prefix
        peer = (not self.entry.drops and layer in self._keep
                and kept_tokens(n_body, self._keep[layer], selector) < n_body)
        want_cls = layer in self._cls_source and self._reduces(layer + 1, n_body)
        need_qkv = peer or want_cls
        store: dict[str, torch.Tensor] = {}
        handle = capture_output(block.attn.qkv, store, "qkv") if need_qkv else None
        try:
            mask = None
            if state.size is not None:
                # ToMe's proportional attention: a merged token counts as `size` keys.
                mask = state.size.log()[:, None, None, :].to(state.x.dtype)
            if not peer:
                x = block(state.x, attn_mask=mask) if mask is not None else block(state.x)
                if want_cls:
                    context["cls_attn"] = cls_attention_from_qkv(store["qkv"], block.attn, self.has_class_token)
                return TokenState(x, state.index, state.size)
            x = timm_seam.attention_half(block, state.x, mask)
        finally:
            if handle is not None:
                handle.remove()
        target = kept_tokens(n_body, self._keep[layer], selector)
        x, index, size = self.entry.reduce(PeerSite(x, state.index, state.size, store["qkv"], block.attn,
                                                    self.prefix, target, self.has_class_token))
        x = timm_seam.mlp_half(block, x)
        return TokenState(x, index, size)

    # ------------------------------------------------------------------ forward

    def first_changed_block(self) -> int:
        """The first block whose computation pruning changes (earlier blocks run exactly as unpruned)."""
        depth = len(self.model.blocks)
        touched = set(self.config.layers) | set(self.config.head_map) | self._cls_source
        return min(touched | {depth})

    def forward_features(self, images: torch.Tensor | None, oracle: Mapping[int, torch.Tensor] | None = None, *,
                         start_layer: int = 0, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Final-norm token features. `tokens` + `start_layer`: resume from the residual stream at
        the input of block `start_layer` of the *unpruned* model (shared by many configs in a
        sweep); allowed only up to the first block pruning changes."""
        if tokens is None:
            if start_layer != 0:
                raise ValueError("start_layer needs tokens (the residual stream at that block's input)")
            x = self._embed(images)
        else:
            if start_layer > self.first_changed_block():
                raise ValueError(f"start_layer = {start_layer}: pruning changes block {self.first_changed_block()} "
                                 "already, so the unpruned stream cannot be resumed there")
            x = tokens
        b, n, _ = x.shape
        index = torch.arange(n, device=x.device).expand(b, n)
        state = TokenState(x, index)
        context: dict[str, Any] = {"oracle": oracle}
        counts = [(n, n)] * start_layer
        for layer, block in enumerate(self.model.blocks):
            if layer < start_layer:
                continue
            if layer in self._drop_layers:
                state = self._drop(layer, state, context)
                if self.keep_index:
                    self.record.kept_index[layer] = state.index
            n_attn = state.x.shape[1]
            state = self._run_block(layer, block, state, context)
            counts.append((n_attn, state.x.shape[1]))
        self.record.counts.extend([counts] * b)
        return self.model.norm(state.x)

    def forward(self, images: torch.Tensor | None, oracle: Mapping[int, torch.Tensor] | None = None, *,
                start_layer: int = 0, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Logits. `oracle`: precomputed HEART scores {layer: [B, N]} (else computed here, timed).
        `start_layer`/`tokens`: see forward_features."""
        self.record = ForwardRecord()
        if "oracle" in self.entry.needs and self._drop_layers and oracle is None:
            if images is None:
                raise ValueError("the HEART oracle needs the images (or precomputed oracle scores)")
            start = time.perf_counter()
            oracle = self.oracle_scores(images)
            self.record.oracle_seconds = time.perf_counter() - start
        batch = images.shape[0] if images is not None else tokens.shape[0]
        if self.config.per_input_budget is not None and batch > 1:
            # Per-input budgets give each input its own token counts: run inputs one at a time.
            outs = []
            for i in range(batch):
                one = {k: v[i:i + 1] for k, v in oracle.items()}
                feats = self.forward_features(None if images is None else images[i:i + 1], one,
                                              start_layer=start_layer,
                                              tokens=None if tokens is None else tokens[i:i + 1])
                outs.append(self.model.forward_head(feats))
            return checks.finite_logits(self, torch.cat(outs))
        return checks.finite_logits(self, self.model.forward_head(self.forward_features(
            images, oracle, start_layer=start_layer, tokens=tokens)))


def prune(model: nn.Module, config: PruningConfig | str, *, gate: TokenGateSet | None = None,
          oracle: OracleFn | None = None, keep_index: bool = False) -> PrunedViT:
    """A pruned copy of `model` (a timm ViT/DeiT); `model` itself is not modified.

    config: a PruningConfig or its text/file form. gate: the trained token gate (selector="gate";
    else loaded from config.gate). oracle: a HEART score function (default: heart_lib.sensitivity).
    """
    config = PruningConfig.parse(config)
    check_model(model)
    depth = len(model.blocks)
    config.check(depth=depth, num_heads={i: b.attn.num_heads for i, b in enumerate(model.blocks)})
    uses_gate = "gate" in catalogue.reducer(config.selector).needs
    if uses_gate and config.layers and gate is None:
        gate = TokenGateSet.load(config.gate)
    if gate is not None and uses_gate:
        embed = model.embed_dim
        if gate.dim != embed:
            raise ValueError(f"the token gate expects {gate.dim}-dim tokens, the model has {embed}")
    pruned = copy.deepcopy(model)
    for layer, heads in config.heads:
        slice_heads(pruned.blocks[layer].attn, heads)
    wrapper = PrunedViT(pruned, config, gate=gate if uses_gate else None, oracle=oracle,
                        keep_index=keep_index)
    return wrapper.train(model.training)
