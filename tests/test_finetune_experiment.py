"""Fine-tuning chapter: head choice, paired bootstrap, parameter validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from heart_lib import config
from heart_lib.experiments.finetune import Params
from heart_lib.planning import lowest_heads as choose_heads
from heart_lib.stats import paired_difference


def test_choose_heads_takes_lowest_and_keeps_one_per_layer():
    scores = torch.tensor([[0.1, 0.2, 0.3], [5.0, 6.0, 0.05], [0.01, 0.02, 0.03]])
    assert choose_heads(scores, 1) == {2: (0,)}
    # Layer 2 holds the three lowest, but one head of it must stay.
    assert choose_heads(scores, 3) == {1: (2,), 2: (0, 1)}
    assert choose_heads(scores, 6) == {0: (0, 1), 1: (0, 2), 2: (0, 1)}
    with pytest.raises(ValueError, match="count = 7"):
        choose_heads(scores, 7)


def test_paired_difference_interval():
    rng = np.random.default_rng(0)
    before = rng.random(500) < 0.6
    after = before.copy()
    after[:50] = True  # 50 images gained (some already right)
    diff, lo, hi = paired_difference(after, before, 1000, seed=1)
    assert diff == pytest.approx((after.astype(int) - before).mean())
    assert 0 < lo <= diff <= hi
    same = paired_difference(before, before, 200)
    assert same == (0.0, 0.0, 0.0)  # identical outcomes: no uncertainty about the difference
    with pytest.raises(ValueError, match="equal-length"):
        paired_difference(after, before[:10])


@pytest.mark.parametrize("changes, match", [({"token_keep": 1.0}, "token_keep"), ({"recovery_epochs": 0}, "recovery_epochs"),
                                            ({"token_layers": [9, 3]}, "increasing"), ({"amp": "fp8"}, "amp"),
                                            ({"transfer": False, "imagenet": False}, "nothing to run"),
                                            ({"transfer_test": "mnist"}, "transfer_test")])
def test_bad_params_are_named(changes, match):
    with pytest.raises(config.ConfigError, match=match):
        config.validate("finetune", {**config.raw_profile_params("default", "finetune"), **changes})


def test_profiles_validate():
    for profile in ("smoke", "default", "full", "paper"):
        params = config.load_params(profile, "finetune")
        assert isinstance(params, Params)
    default = config.load_params("default", "finetune")
    assert default.token_config().to_string() == "tokens=0.6@3,6,9;selector=cls_attention"
