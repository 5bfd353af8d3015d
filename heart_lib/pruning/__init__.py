"""Physically pruned Vision Transformers: token dropping with pluggable selectors, head slicing,
and the EViT / ToMe peers. See `config` for the conventions and the compact text form."""

from heart_lib.pruning.config import (DROP_SELECTORS, ORACLE_SELECTORS, PEER_METHODS, SELECTORS, VARIANTS,
                                      PruningConfig, kept_tokens, token_plan)
from heart_lib.pruning.heads import mask_heads_hook, slice_heads
from heart_lib.pruning.model import PrunedViT, check_model, predicted_loss_from_heart, prune
from heart_lib.pruning.selectors import TokenGate, TokenGateSet, train_token_gate

__all__ = ["PruningConfig", "prune", "PrunedViT", "slice_heads", "mask_heads_hook", "kept_tokens", "token_plan",
           "check_model", "predicted_loss_from_heart", "TokenGate", "TokenGateSet", "train_token_gate",
           "SELECTORS", "VARIANTS", "DROP_SELECTORS", "ORACLE_SELECTORS", "PEER_METHODS"]
