"""Fine-tuning chapter: head choice, paired bootstrap, parameter validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from heart_lib import config
from heart_lib.experiments import finetune
from heart_lib.experiments.definitions import TOKENS_40, tokens_40_flops_saved
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
                                            ({"transfer_test": "mnist"}, "transfer_test"),
                                            ({"imagenet_settings": ["gate", "evit"]}, "control"),
                                            ({"transfer_settings": ["unpruned", "evit"]}, "primary selector"),
                                            ({"imagenet_settings": ["unpruned", "gate", "heart"]}, "heart"),
                                            ({"primary_selector": "tome"}, "primary_selector")])
def test_bad_params_are_named(changes, match):
    with pytest.raises(config.ConfigError, match=match):
        config.validate("finetune", {**config.raw_profile_params("default", "finetune"), **changes})


def test_profiles_validate():
    for profile in ("smoke", "default", "full", "paper"):
        params = config.load_params(profile, "finetune")
        assert isinstance(params, Params)
    default = config.load_params("default", "finetune")
    # HEART's setting is the book's one "40 % token pruning", chosen by HEART's own selector
    assert default.token_config().replace(selector="cls_attention", gate=None) == TOKENS_40.replace(selector="cls_attention")
    assert default.primary_selector == "gate" and "gate=" in default.token_config().to_string()


def _tiny():
    from heart_lib import models

    return models.create_model("vit_tiny_patch16_224", "none", None, img_size=64, patch_size=8, depth=6)


def test_every_setting_is_matched_to_the_flops_of_heart_s_setting():
    """Peers and the joint setting save the FLOPs HEART's token setting saves (within the grid step),
    and the joint setting really removes heads."""
    model = _tiny()
    params = Params(token_layers=[1, 3], imagenet_settings=["unpruned", "gate", "joint", "cls_attention", "evit", "tome"])
    calib = finetune.Calibration(gate=None, head_scores=torch.rand(6, 3), agreement={}, seconds=0.0)
    settings = finetune.pruning_settings(params, model, calib, params.imagenet_settings)
    from heart_lib.planning import flops_reduction_on

    reduction = flops_reduction_on(model, params.gate_hidden)
    target = reduction(settings["gate"])
    assert settings["unpruned"] is None and settings["gate"] == params.token_config()
    for name in ("joint", "cls_attention", "evit", "tome"):
        assert abs(reduction(settings[name]) - target) < 0.03, name
        assert settings[name].selector == ("gate" if name == "joint" else name)
    assert settings["joint"].heads and settings["joint"].keep[0] > params.token_keep


def test_forty_percent_token_pruning_is_defined_once():
    assert TOKENS_40.layers == (3, 6, 9) and set(TOKENS_40.keep) == {0.6}
    assert 0.45 < tokens_40_flops_saved() < 0.47  # DeiT-Tiny: the pruning chapter's "keep 0.6" level


def test_the_unpruned_model_must_match_the_baseline_chapter(tmp_path):
    import pandas as pd

    from heart_lib import results

    params = Params()
    folder = tmp_path / "baseline"
    folder.mkdir()
    pd.DataFrame({"correct": [True] * 80 + [False] * 20}).to_csv(folder / "per_image.csv", index=False)
    results.write_json(folder / "per_image.meta.json", {"params": {"model": params.model, "weights": params.weights,
                                                                    "dataset": params.imagenet_test, "limit": None}})
    ours = np.array([1] * 79 + [0] * 21)
    assert finetune.check_against_baseline(ours, folder, params)["checked"]
    with pytest.raises(RuntimeError, match="baseline chapter measured 80"):
        finetune.check_against_baseline(np.array([1] * 70 + [0] * 30), folder, params)
    assert not finetune.check_against_baseline(ours, tmp_path / "none", params)["checked"]


def test_unlabelled_images_teach_by_distillation_only():
    from heart_lib.finetune.recipe import TrainConfig, training_loss

    config = TrainConfig(distill_alpha=0.9, label_smoothing=0.1)
    logits, teacher = torch.randn(4, 10), torch.randn(4, 10)
    labels = torch.tensor([1, 2, finetune.UNLABELLED, finetune.UNLABELLED])
    loss = training_loss(logits, labels, config, teacher)
    assert torch.isfinite(loss)
    # the unlabelled rows' labels do not matter: only the labelled rows enter the cross-entropy
    other = training_loss(logits, torch.tensor([1, 2, finetune.UNLABELLED, finetune.UNLABELLED]), config, teacher)
    ce = torch.nn.functional.cross_entropy(logits[:2], labels[:2], label_smoothing=0.1)
    from heart_lib.finetune.recipe import distillation_loss

    assert loss == pytest.approx(float(0.1 * ce + 0.9 * distillation_loss(logits, teacher)), rel=1e-5)
    assert loss == other


def test_recovery_peer_and_curve_tables():
    import pandas as pd

    rng = np.random.default_rng(0)
    n = 200
    per_image = pd.DataFrame({"experiment": "imagenet", "image": np.arange(n), "label": 0,
                              **{f"{s}_{t}": (rng.random(n) < p).astype(int)
                                 for s, p in (("unpruned", 0.8), ("gate", 0.7), ("evit", 0.6), ("gate+extra", 0.7))
                                 for t in ("before", "after")}})
    recovery = finetune.recovery_rows(per_image, 200, 0)
    assert set(recovery["comparison"]) == set(finetune.COMPARISONS)
    assert len(recovery[recovery["setting"] == "unpruned"]) == 1
    peers = finetune.peer_rows(per_image, "gate", 200, 0)
    assert list(peers["against"]) == ["evit"]  # the extra-image variant of HEART is no peer
    assert peers["after_lo"].iloc[0] <= peers["after"].iloc[0] <= peers["after_hi"].iloc[0]
    accuracy = pd.DataFrame([{"experiment": "imagenet", "setting": "gate", "stage": "before", "top1": 0.5,
                              "top1_lo": 0.4, "top1_hi": 0.6, "images": 100}])
    history = pd.DataFrame([{"experiment": "imagenet", "setting": "gate", "stage": "recovery", "epoch": e,
                             "eval_top1": 0.5 + e / 10, "eval_images": 100} for e in (1, 2)])
    curves = finetune.curve_rows(accuracy, history)
    assert list(curves["epoch"]) == [0, 1, 2] and curves["top1"].tolist() == pytest.approx([0.5, 0.6, 0.7])
    assert (curves["top1_lo"] < curves["top1"]).all() and (curves["top1"] < curves["top1_hi"]).all()
