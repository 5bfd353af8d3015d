"""Loss budget -> schedule: the predicted loss respects ε, grows with pruning, and matches its tables."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import heart_lib  # noqa: F401
import timm

from heart_lib.budget import Calibration, predicted_loss, schedule_for_budget
from heart_lib.flops import count_flops, vit_shape
from heart_lib.pruning import PruningConfig


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=64, patch_size=8, depth=6, num_classes=10).eval()
    gen = torch.Generator().manual_seed(0)
    tokens = {l: torch.rand(5, 65, generator=gen) ** 3 + 1e-4 for l in (1, 3, 4)}
    heads = torch.rand(5, 6, 3, generator=gen) * 0.05 + 1e-4
    return model, vit_shape(model), Calibration.from_scores(tokens, heads, prefix=1), tokens, heads


def test_token_cost_is_the_sum_of_the_lowest_scores(setup):
    _, _, calib, tokens, _ = setup
    s = 0.5 * tokens[3][:, 1:].double()
    brute = np.mean([sorted(row.tolist())[:10] for row in s], axis=0).sum()
    assert calib.token_loss(3, 64, 54) == pytest.approx(brute, rel=1e-9)
    # dropping 64 -> 54 then 54 -> 44 costs the same as 64 -> 44 (ranks are consecutive)
    assert calib.token_loss(3, 64, 54) + calib.token_loss(3, 54, 44) == pytest.approx(calib.token_loss(3, 64, 44))


def test_predicted_loss_of_a_config(setup):
    _, shape, calib, _, heads = setup
    config = PruningConfig.parse("tokens=0.5@1,3;selector=heart;heads=2:0+1")
    pred = predicted_loss(calib, config, shape)
    expected_heads = float((0.5 * heads[:, 2, :2].double()).mean(0).sum())
    assert pred["heads"] == pytest.approx(expected_heads)
    assert pred["tokens"] == pytest.approx(calib.token_loss(1, 64, 32) + calib.token_loss(3, 32, 16))
    with pytest.raises(ValueError, match="no calibration scores"):
        predicted_loss(calib, PruningConfig.parse("tokens=0.5@2;selector=heart"), shape)


def test_schedule_respects_budget_and_saves_more_with_more_budget(setup):
    model, shape, calib, _, _ = setup
    previous = 0.0
    for eps in (0.0, 0.05, 0.3, 2.0):
        sched = schedule_for_budget(calib, shape, eps, layers=(1, 3, 4))
        assert sched.predicted["total"] <= eps + 1e-12
        assert sched.flops == count_flops(sched.config, base=model)  # what the schedule claims is what runs
        assert sched.reduction >= previous - 1e-12
        previous = sched.reduction
        if eps == 0.0:
            assert sched.reduction == 0.0 and not sched.config.heads
    assert previous > 0.3
    assert any(sched.config.heads for sched in [schedule_for_budget(calib, shape, 2.0, layers=(1, 3, 4))])
    # asymmetric: per-layer ratios differ at some budget
    ratios = {schedule_for_budget(calib, shape, eps, layers=(1, 3, 4)).config.keep for eps in (0.05, 0.3)}
    assert any(len(set(r)) > 1 for r in ratios)


def test_budget_errors(setup):
    _, shape, calib, _, _ = setup
    with pytest.raises(ValueError, match="epsilon"):
        schedule_for_budget(calib, shape, -1.0, layers=(1,))
    with pytest.raises(ValueError, match="no calibration token scores"):
        schedule_for_budget(calib, shape, 0.1, layers=(2,))
    with pytest.raises(ValueError, match="grid"):
        schedule_for_budget(calib, shape, 0.1, layers=(1,), grid=(0.9, 0.5))
