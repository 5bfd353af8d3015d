"""The catalogue of methods: every sensitivity score and every token reducer is one entry here.

Adding a method means adding one entry (`register_score` / `register_reducer`); config validation,
the pruned forward, the analytic FLOPs, the chapters and the claims families read the entries, so
nothing else names methods.

- A **score** (`ScoreEntry`) ranks tokens and/or heads from the gate derivatives (gradient `g`,
  curvature `S` from an estimator) or from a recording of one forward pass (activations,
  attention probabilities), see book/method.md, 'Components, gates and the sensitivity score'.
- A **token reducer** (`ReducerEntry`) removes tokens in a pruned model: a *drop selector* scores
  the tokens at a block's input and keeps the best; a *peer* (EViT, ToMe) reduces tokens its own way
  between a block's attention and MLP. Each entry says how many tokens it keeps, how it scores or
  reduces, and the FLOPs its own work adds.

This module is a leaf: it imports nothing from heart_lib at load time, so every other module can
read it; the reducers' tensor maths (`pruning.selectors`, `pruning.peers`) are imported when run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

VARIANTS = ("raw", "abs", "clamp")  # how negative curvature ranks: as is, |S|, max(S, 0)


def apply_variant(scores: torch.Tensor, variant: str) -> torch.Tensor:
    """raw S, |S| or max(S, 0) (negative curvature clamped to zero)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant = {variant!r}: allowed values are {', '.join(VARIANTS)}")
    if variant == "abs":
        return scores.abs()
    if variant == "clamp":
        return scores.clamp_min(0)
    return scores


def predicted_loss(curvature: torch.Tensor) -> torch.Tensor:
    """Predicted loss increase of removing a component from its HEART curvature S: ½·max(S, 0).

    The gradient term is dropped (as HEART does); negative curvature is clamped so no removal is
    ever predicted to lower the loss.
    """
    return 0.5 * curvature.clamp(min=0)


# ============================================================================ scores


@dataclass(frozen=True)
class Recording:
    """What one recorded forward gives the heuristic scores (see `sensitivity`)."""

    tokens: dict[int, torch.Tensor]  # block input [B, N, D]
    heads: dict[int, torch.Tensor]  # head outputs [B, H, N, d]
    attention: dict[int, torch.Tensor]  # probabilities [B, H, N, N]
    has_class_token: bool
    generator: torch.Generator
    batch: int
    n_tokens: int
    num_heads: dict[int, int]


@dataclass(frozen=True)
class ScoreEntry:
    """One sensitivity score (higher = more important = keep)."""

    name: str
    label: str
    family: str  # heart (curvature only) | second_order | first_order | fisher | attention | norm | random
    primary: bool = False  # the family's pre-registered primary variant (see FAMILIES)
    gradient: bool = False  # needs ∂L/∂m
    curvature: str | None = None  # estimator of ∂²L/∂m²: single | hutchinson | exact | chosen (the caller's)
    scope: str | None = None  # single probe per layer or global; None: the caller's choice
    formula: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor] | None = None  # (g, S) -> score
    heuristic: Callable[[Recording, str, int], torch.Tensor] | None = None  # (recording, kind, layer) -> score
    recording: str | None = None  # the heuristic reads a recorded forward: activations | attention
    acts_on: tuple[str, ...] = ("tokens", "heads")
    variants: tuple[str, ...] = ("raw",)
    per_component: bool = False  # one HVP per component: the chapter runs it on a few images only

    @property
    def needs(self) -> tuple[str, ...]:
        return tuple(n for n, on in (("gradient", self.gradient), ("curvature", self.curvature is not None),
                                     ("recording", self.recording is not None)) if on)

    @property
    def second_order(self) -> bool:
        """Uses curvature: the family claim C1 sets against first-order and heuristic scores."""
        return self.curvature is not None


def _cls_attention(rec: Recording, kind: str, layer: int) -> torch.Tensor:
    from heart_lib.pruning.selectors import class_attention

    attn = rec.attention[layer].float()
    if kind == "tokens":  # the one definition the pruning selector uses too
        return class_attention(attn, rec.has_class_token)
    # heads: negative entropy of the class token's attention row (focused heads score high)
    rows = attn[:, :, 0, :] if rec.has_class_token else attn.mean(2)
    return (rows * rows.clamp_min(1e-30).log()).sum(-1)


def _norm(rec: Recording, kind: str, layer: int) -> torch.Tensor:
    if kind == "tokens":
        return rec.tokens[layer].float().norm(dim=-1)
    return rec.heads[layer].float().transpose(1, 2).flatten(2).norm(dim=-1)


def _random(rec: Recording, kind: str, layer: int) -> torch.Tensor:
    width = rec.n_tokens if kind == "tokens" else rec.num_heads[layer]
    return torch.rand((rec.batch, width), generator=rec.generator)


_curv = lambda g, s: s  # noqa: E731
_second = lambda g, s: -g + 0.5 * s  # noqa: E731  (predicted loss change of removing c)

SCORES: dict[str, ScoreEntry] = {}


def register_score(entry: ScoreEntry) -> ScoreEntry:
    """Add a score to the catalogue (its name must be new)."""
    if entry.name in SCORES:
        raise ValueError(f"score {entry.name!r} is already in the catalogue")
    if (entry.formula is None) == (entry.heuristic is None):
        raise ValueError(f"score {entry.name!r}: give exactly one of formula (from derivatives) or heuristic")
    SCORES[entry.name] = entry
    return entry


for _entry in (
    # scope None: per layer unless the caller asks for one global probe (heart_global fixes it)
    ScoreEntry("heart", "HEART single probe (per layer)", "heart", primary=True, gradient=True, curvature="single",
               formula=_curv, variants=VARIANTS),
    ScoreEntry("heart_global", "HEART single probe (one HVP, all gates)", "heart", gradient=True,
               curvature="single", scope="global", formula=_curv, variants=VARIANTS),
    ScoreEntry("heart_hutchinson", "HEART Hutchinson", "heart", gradient=True, curvature="hutchinson",
               formula=_curv, variants=VARIANTS),
    ScoreEntry("heart_exact", "HEART exact diagonal", "heart", gradient=True, curvature="exact", formula=_curv,
               variants=VARIANTS, per_component=True),
    ScoreEntry("second_order", "full second order −g + ½S (S Hutchinson)", "second_order", primary=True,
               gradient=True, curvature="chosen", formula=_second),
    ScoreEntry("second_order_exact", "full second order −g + ½S (S exact)", "second_order", gradient=True,
               curvature="exact", formula=_second, per_component=True),
    # −g is the first-order Taylor estimate of ΔL when c is removed (δ = −z_c): signed, like HEART's
    # ½S, so the primary comparison is signed against signed; |g| is the unsigned variant.
    ScoreEntry("taylor_signed", "first-order Taylor −g (signed)", "first_order", primary=True, gradient=True,
               formula=lambda g, s: -g),
    ScoreEntry("taylor", "first-order Taylor |g|", "first_order", gradient=True, formula=lambda g, s: g.abs()),
    ScoreEntry("fisher", "empirical Fisher g²", "fisher", primary=True, gradient=True,
               formula=lambda g, s: g.square()),
    ScoreEntry("cls_attention", "CLS attention", "attention", primary=True, heuristic=_cls_attention,
               recording="attention"),
    ScoreEntry("norm", "activation norm", "norm", primary=True, heuristic=_norm, recording="activations"),
    ScoreEntry("random", "random", "random", primary=True, heuristic=_random),
):
    register_score(_entry)

# The families of C1, each with one primary score declared here, before any result is read: HEART's
# is the paper's score (raw curvature S from the per-layer single probe); the others are their
# papers' usual forms (the first-order one signed, to face HEART's signed ½S like with like).
FAMILIES = ("heart", "second_order", "first_order", "fisher", "attention", "norm", "random")


def primary(family: str) -> str:
    """The pre-registered primary score of a family."""
    names = [n for n, e in SCORES.items() if e.family == family and e.primary]
    if len(names) != 1:
        raise ValueError(f"family {family!r} has {len(names)} primary scores; declare exactly one")
    return names[0]


def score(name: str) -> ScoreEntry:
    """The catalogue entry of a score; a clear error names the allowed ones."""
    if name not in SCORES:
        raise ValueError(f"method = {name!r}: allowed values are {', '.join(SCORES)}")
    return SCORES[name]


def scores(**where: Any) -> tuple[str, ...]:
    """Names of the scores whose attributes equal `where` (e.g. family="heart"), in catalogue order."""
    return tuple(n for n, e in SCORES.items() if all(getattr(e, k) == v for k, v in where.items()))


# ============================================================================ token reducers


@dataclass
class DropSite:
    """What a drop selector sees at the input of block `layer` (tokens prefix first)."""

    layer: int
    x: torch.Tensor  # [B, n, D]
    index: torch.Tensor  # [B, n] original positions (-1 = fused)
    context: dict[str, Any]  # "oracle": {layer: [B, N]} scores; "cls_attn": [B, n] of the previous block
    generator: torch.Generator
    gate: Any  # the trained TokenGateSet (or None)
    variant: str


@dataclass
class PeerSite:
    """What a peer sees between a block's attention and MLP."""

    x: torch.Tensor
    index: torch.Tensor
    size: torch.Tensor | None  # ToMe sizes (None until a merge happened)
    qkv: torch.Tensor  # captured output of attn.qkv [B, n, 3·H·d]
    attn: Any  # the block's timm Attention
    prefix: int
    target: int  # non-prefix tokens to leave (from `kept_tokens`)
    has_class_token: bool = True  # else CLS attention averages every query row


@dataclass(frozen=True)
class FlopsSite:
    """What a reducer's extra FLOPs depend on at one reduction layer (tokens include the prefix)."""

    shape: Any  # flops.ViTShape (head-sliced)
    layer: int
    counts: list[tuple[int, int]]  # tokens entering each block's attention and MLP
    n_in: int  # tokens entering the reduction
    gate_hidden: int


@dataclass(frozen=True)
class ReducerEntry:
    """One token reducer: a drop selector (acts at a block's input) or a peer (between attention and MLP)."""

    name: str
    label: str
    family: str  # oracle | learned | heuristic | peer
    where: str  # block_input | after_attention
    kept: Callable[[int, int, bool], int]  # (n_body, k = ceil(keep·n_body), fuse) -> tokens left (k < n_body)
    scorer: Callable[[DropSite], torch.Tensor] | None = None  # drop selectors: [B, n], higher = keep
    reduce: Callable[[PeerSite], tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] | None = None
    extra_flops: Callable[[FlopsSite], int] = lambda site: 0
    needs: tuple[str, ...] = ()  # oracle (per-input curvature scores) | gate (a trained gate) | previous_attention
    score: str | None = None  # the sensitivity score an oracle ranks by
    loss_units: bool = False  # scores are curvature in loss units: variants and per-input budgets apply
    schedule: str = "symmetric"  # how the sweep matches FLOPs: symmetric keep ratio | constant_merge (ToMe's r)
    min_layer: int = 0
    min_layer_reason: str = ""

    def __post_init__(self) -> None:
        if self.where not in WHERE:
            raise ValueError(f"reducer {self.name!r}: where = {self.where!r}; allowed {list(WHERE)}")
        if (self.scorer is None) == (self.reduce is None) or (self.scorer is None) != (self.where != "block_input"):
            raise ValueError(f"reducer {self.name!r}: a block_input reducer has a scorer, an after_attention one "
                             "a reduce function")

    @property
    def drops(self) -> bool:
        return self.where == "block_input"


WHERE = ("block_input", "after_attention")
REDUCERS: dict[str, ReducerEntry] = {}


def register_reducer(entry: ReducerEntry) -> ReducerEntry:
    """Add a token reducer to the catalogue (its name must be new)."""
    if entry.name in REDUCERS:
        raise ValueError(f"reducer {entry.name!r} is already in the catalogue")
    REDUCERS[entry.name] = entry
    return entry


def unregister(name: str) -> None:
    """Remove an entry added for a test or an experiment."""
    REDUCERS.pop(name, None)
    SCORES.pop(name, None)


def _drop_kept(n_body: int, k: int, fuse: bool) -> int:
    return k + 1 if fuse else k  # the fused token


def _oracle_scores(site: DropSite) -> torch.Tensor:
    from heart_lib.pruning.selectors import gather_scores

    return gather_scores(apply_variant(site.context["oracle"][site.layer], site.variant), site.index)


def _cls_attention_flops(site: FlopsSite) -> int:
    # the class token's query row (every query row without a class token) against every key of the
    # previous block
    prev, n_prev = site.shape.blocks[site.layer - 1], site.counts[site.layer - 1][0]
    queries = 1 if site.shape.class_token else n_prev
    return 2 * prev.heads * queries * n_prev * prev.head_dim


def _gate_flops(site: FlopsSite) -> int:
    return 2 * site.n_in * (site.shape.dim * site.gate_hidden + site.gate_hidden)


def _evit_flops(site: FlopsSite) -> int:
    b = site.shape.blocks[site.layer]
    queries = 1 if site.shape.class_token else site.n_in
    return 2 * b.heads * queries * site.n_in * b.head_dim


def _tome_flops(site: FlopsSite) -> int:
    # cosine similarities between set A (even positions) and set B (odd), prefix tokens included
    n = site.n_in
    return 2 * ((n + 1) // 2) * (n // 2) * site.shape.blocks[site.layer].head_dim


def _evit(site: PeerSite):
    from heart_lib.pruning.peers import evit_reduce
    from heart_lib.pruning.selectors import cls_attention_from_qkv

    cls_attn = cls_attention_from_qkv(site.qkv, site.attn, site.has_class_token)
    x, index = evit_reduce(site.x, site.index, cls_attn, site.prefix, site.target - 1)
    return x, index, site.size


def _tome(site: PeerSite):
    from heart_lib.pruning.peers import mean_keys, tome_merge

    size = site.size if site.size is not None else torch.ones(site.x.shape[:2], dtype=site.x.dtype,
                                                              device=site.x.device)
    keys = mean_keys(site.qkv, site.attn.num_heads, site.attn.head_dim, site.attn.k_norm)
    n_body = site.x.shape[1] - site.prefix
    return tome_merge(site.x, site.index, size, keys, site.prefix, n_body - site.target)


for _name, _label in (("heart", "HEART oracle (single probe)"), ("heart_hutchinson", "HEART oracle (Hutchinson)"),
                      ("heart_exact", "HEART oracle (exact diagonal)")):
    register_reducer(ReducerEntry(_name, _label, "oracle", "block_input", _drop_kept, scorer=_oracle_scores,
                                  needs=("oracle",), score=_name, loss_units=True))
register_reducer(ReducerEntry("gate", "learned token gate", "learned", "block_input", _drop_kept,
                              scorer=lambda s: s.gate(s.layer, s.x), extra_flops=_gate_flops, needs=("gate",)))
register_reducer(ReducerEntry(
    "cls_attention", "CLS attention", "heuristic", "block_input", _drop_kept,
    scorer=lambda s: s.context.pop("cls_attn"), extra_flops=_cls_attention_flops, needs=("previous_attention",),
    min_layer=1, min_layer_reason="it ranks tokens by the class-token attention of the preceding block "
                                  "(use evit, norm, random or heart)"))
register_reducer(ReducerEntry("norm", "activation norm", "heuristic", "block_input", _drop_kept,
                              scorer=lambda s: s.x.norm(dim=-1)))  # L2 norm of each token's vector
register_reducer(ReducerEntry("random", "random", "heuristic", "block_input", _drop_kept,
                              # the generator advances, so each batch gets its own draw
                              scorer=lambda s: torch.rand(s.x.shape[:2], generator=s.generator).to(s.x.device)))
register_reducer(ReducerEntry("evit", "EViT", "peer", "after_attention", lambda n, k, fuse: k + 1, reduce=_evit,
                              extra_flops=_evit_flops))
register_reducer(ReducerEntry("tome", "ToMe", "peer", "after_attention",
                              # ToMe merges at most half the non-prefix tokens, rounded down
                              lambda n, k, fuse: n - min(n - k, n // 2), reduce=_tome,
                              extra_flops=_tome_flops, schedule="constant_merge"))


def reducer(name: str) -> ReducerEntry:
    """The catalogue entry of a token reducer; a clear error names the allowed ones."""
    if name not in REDUCERS:
        raise ValueError(f"selector = {name!r}: allowed values are {list(REDUCERS)}")
    return REDUCERS[name]


def reducers(**where: Any) -> tuple[str, ...]:
    """Names of the reducers whose attributes equal `where` (e.g. where="after_attention")."""
    return tuple(n for n, e in REDUCERS.items() if all(getattr(e, k) == v for k, v in where.items()))


def oracle_reducers() -> tuple[str, ...]:
    return tuple(n for n, e in REDUCERS.items() if "oracle" in e.needs)


# ============================================================================ labels


def label(name: str) -> str:
    """A readable label for a score, selector or peer name as it appears in result tables
    ("heart", "heart |S|", "tome", ...)."""
    base, _, suffix = name.partition(" ")
    entry = SCORES.get(base) or REDUCERS.get(base)
    if entry is None:
        raise ValueError(f"{name!r} is not in the catalogue; known: {sorted(set(SCORES) | set(REDUCERS))}")
    return f"{entry.label} {suffix}".strip()
