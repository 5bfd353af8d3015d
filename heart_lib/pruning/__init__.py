"""Physically pruned Vision Transformers: token dropping with pluggable selectors, head slicing,
and the EViT / ToMe peers. See `config` for the conventions and the compact text form; the
selectors and peers are entries of `heart_lib.catalogue`."""

from heart_lib.pruning.config import VARIANTS, PruningConfig, kept_tokens, token_plan
from heart_lib.pruning.heads import mask_heads_hook, slice_heads
from heart_lib.pruning.model import PrunedViT, check_model, prune
from heart_lib.pruning.selectors import TokenGate, TokenGateSet, train_token_gate

__all__ = ["PruningConfig", "prune", "PrunedViT", "slice_heads", "mask_heads_hook", "kept_tokens", "token_plan",
           "check_model", "TokenGate", "TokenGateSet", "train_token_gate",
           "VARIANTS"]
