"""Fine-tuning loop: recipe maths, exact resume after a kill, refusal of foreign checkpoints, NaN stops,
dynamic token selection while training, reproducible augmentation, resolution change."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pandas as pd
import pytest
import torch

from heart_lib.data import image_dataset
from heart_lib.finetune import (TIME_COLUMNS, CheckpointMismatch, NonFiniteLossError, SeededAugment, TrainConfig,
                                distillation_loss, lr_factor, model_at_resolution, train, training_loss)
from heart_lib.finetune import checkpoint as ckpt
from heart_lib.models import create_model
from heart_lib.pruning import prune

PRUNING = "tokens=0.5@1;selector=cls_attention"


def tiny(drop_path: float = 0.0, seed: int = 0):
    return create_model("vit_tiny_patch16_224", weights="none", img_size=32, patch_size=8, depth=2,
                        num_classes=10, drop_path_rate=drop_path, seed=seed)


def random_flip(x: torch.Tensor) -> torch.Tensor:
    # Draws from the global torch stream on purpose: SeededAugment must make it reproducible.
    return x.flip(-1) if torch.rand(()) < 0.5 else x


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny models: with two threads on a busy shared machine every small op waits for the other
    # thread (measured 30x slower), so these tests run single-threaded.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def synthetic():
    return image_dataset("synthetic", limit=48, image_size=32, num_classes=10)


# ------------------------------------------------------------------ recipe

def test_lr_schedule_warms_up_then_decays_to_min():
    total, warm = 20, 4
    f = [lr_factor(s, total, warm, 0.1) for s in range(total)]
    assert f[0] == pytest.approx(1 / 5) and f[3] == pytest.approx(4 / 5)
    assert all(a < b for a, b in zip(f[:warm], f[1:warm + 1]))
    assert f[warm] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[warm:], f[warm + 1:]))
    assert f[-1] == pytest.approx(0.1)
    assert lr_factor(0, 1, 0) == 1.0
    with pytest.raises(ValueError, match="warmup_steps"):
        lr_factor(0, 5, 6)


def test_losses():
    logits = torch.randn(6, 10)
    labels = torch.randint(0, 10, (6,))
    assert distillation_loss(logits, logits, 2.0).abs() < 1e-6
    assert distillation_loss(logits, torch.randn(6, 10)) > 0
    cfg = TrainConfig(label_smoothing=0.0)
    assert torch.allclose(training_loss(logits, labels, cfg), torch.nn.functional.cross_entropy(logits, labels))
    mixed = training_loss(logits, labels, cfg.replace(distill_alpha=1.0), logits.flip(0))
    assert torch.allclose(mixed, distillation_loss(logits, logits.flip(0)))


@pytest.mark.parametrize("field, value", [("epochs", 0), ("lr", -1.0), ("label_smoothing", 1.0),
                                          ("distill_alpha", 1.5), ("amp", "fp8"), ("warmup_epochs", 5.0),
                                          ("stop_after", 0), ("min_lr", 1.0)])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{field: value})


# ------------------------------------------------------------------ checkpoint / resume

def run(out, synthetic, **changes):
    torch.manual_seed(123)  # a different global state than the loop's: the loop must seed itself
    teacher = tiny(drop_path=0.1)
    model = prune(teacher, PRUNING)
    cfg = TrainConfig(epochs=2, batch_size=8, lr=1e-3, warmup_epochs=0.5, distill_alpha=0.5, checkpoint_every=2)
    return train(model, synthetic, cfg.replace(**changes), out, transform=random_flip, teacher=teacher,
                 eval_set=synthetic)


def comparable(history: pd.DataFrame) -> pd.DataFrame:
    return history.drop(columns=list(TIME_COLUMNS))


def test_killed_run_resumes_bit_identical(tmp_path, synthetic):
    full = run(tmp_path / "a", synthetic)
    assert full.finished and full.step == 12 and len(full.history) == 2
    # Killed at step 5 (mid-epoch 1): the last checkpoint is step 4, so step 5 is replayed.
    part = run(tmp_path / "b", synthetic, stop_after=5)
    assert not part.finished and part.step == 5
    assert ckpt.load(tmp_path / "b" / "checkpoint.pt")["step"] == 4
    rest = run(tmp_path / "b", synthetic)
    assert rest.resumed_from == 4 and rest.finished
    pd.testing.assert_frame_equal(comparable(full.history), comparable(rest.history), check_exact=True)
    a, b = full.model.state_dict(), rest.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    written = pd.read_csv(tmp_path / "b" / "history.csv")
    assert list(written["epoch"]) == [1, 2] and written["train_loss"].notna().all()
    # A finished run asked again does no work and returns the same model.
    again = run(tmp_path / "b", synthetic)
    assert again.step == 12 and torch.equal(again.model.state_dict()["model.head.weight"], b["model.head.weight"])


def test_resume_with_other_configuration_is_refused(tmp_path, synthetic):
    run(tmp_path, synthetic, stop_after=2)
    # The refusal names the difference and says how to start over instead.
    with pytest.raises(CheckpointMismatch, match=r"lr: checkpoint 0\.001, now 0\.002.*--no-resume"):
        run(tmp_path, synthetic, lr=2e-3)
    teacher = tiny()
    other = prune(teacher, "tokens=0.25@1;selector=cls_attention")
    cfg = TrainConfig(epochs=2, batch_size=8, lr=1e-3, warmup_epochs=0.5, distill_alpha=0.5, checkpoint_every=2)
    with pytest.raises(CheckpointMismatch, match="pruning"):
        train(other, synthetic, cfg, tmp_path, transform=random_flip, teacher=teacher)
    # Execution-only settings may change on resume.
    assert run(tmp_path, synthetic, checkpoint_every=3).finished


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, synthetic):
    model = tiny()
    calls = {"n": 0}

    def poison(_module, _args, output):
        calls["n"] += 1
        return output * math.nan if calls["n"] == 3 else output

    model.head.register_forward_hook(poison)
    cfg = TrainConfig(epochs=1, batch_size=8, lr=1e-3, checkpoint_every=2)
    with pytest.raises(NonFiniteLossError, match=r"step 3 \(epoch 1, batch 3 of 6.*samples \[.*checkpoint"):
        train(model, synthetic, cfg, tmp_path)
    blob = ckpt.load(tmp_path / "checkpoint.pt")
    assert blob["step"] == 2 and all(torch.isfinite(v).all() for v in blob["model"].values())


def test_foreign_or_bad_inputs(tmp_path, synthetic):
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        train(tiny(), synthetic, TrainConfig(batch_size=8), tmp_path)
    with pytest.raises(ValueError, match="teacher"):
        train(tiny(), synthetic, TrainConfig(batch_size=8, distill_alpha=0.5))
    with pytest.raises(ValueError, match="fewer than one global batch"):
        train(tiny(), synthetic, TrainConfig(batch_size=64))


# ------------------------------------------------------------------ what runs while training

def test_token_selection_is_dynamic_and_gradients_flow_through_kept_tokens(synthetic):
    model = prune(tiny(), PRUNING, keep_index=True).train()
    images = torch.stack([synthetic[i][0] for i in range(8)])
    loss = model(images).logsumexp(-1).mean()
    assert model.training and model.record.counts[0][1][0] == 1 + 8  # block 1 runs on half the 16 patches
    kept = model.record.kept_index[1]
    assert len({tuple(sorted(row.tolist())) for row in kept}) > 1  # each image keeps its own tokens
    loss.backward()
    grads = [p.grad for p in model.model.blocks[1].parameters()] + [model.model.patch_embed.proj.weight.grad]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_seeded_augmentation_is_order_independent(synthetic):
    aug = SeededAugment(synthetic, random_flip, seed=3)
    first = [aug[i][0] for i in range(10)]
    torch.manual_seed(999)
    backwards = [aug[i][0] for i in reversed(range(10))][::-1]
    assert all(torch.equal(a, b) for a, b in zip(first, backwards))
    flips = [not torch.equal(aug[i][0], synthetic[i][0]) for i in range(20)]
    assert 0 < sum(flips) < 20
    aug.set_epoch(1)
    assert any(not torch.equal(aug[i][0], first[i]) for i in range(10))


def test_model_at_resolution_resamples_position_embeddings():
    model = model_at_resolution("vit_tiny_patch16_224", "none", 10, image_size=16, img_size=32, patch_size=8,
                                depth=1)
    assert model.pos_embed.shape[1] == 1 + 4
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 10)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        model_at_resolution("vit_tiny_patch16_224", "none", 10, image_size=20, img_size=32, patch_size=8, depth=1)


# ------------------------------------------------------------------ command line

CLI_ARGS = ["--model", "vit_tiny_patch16_224", "--weights", "none", "--num-classes", "10",
            "--model-kwargs", json.dumps({"img_size": 32, "patch_size": 8, "depth": 2}),
            "--train-data", "synthetic", "--train-limit", "32", "--batch-size", "8", "--epochs", "1",
            "--lr", "1e-3", "--warmup-epochs", "0", "--device", "cpu", "--seed", "3", "--checkpoint-every", "1"]


def test_cli_stopped_run_resumes_when_called_again(tmp_path):
    """`python -m heart_lib.finetune` stopped early (--stop-after) and called again with the same
    --out resumes from its checkpoint and says so."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", HEART_PROGRESS="0")
    cmd = [sys.executable, "-m", "heart_lib.finetune", *CLI_ARGS, "--out", str(tmp_path)]
    first = subprocess.run([*cmd, "--stop-after", "2"], env=env, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    assert "stopped after step 2 (--stop-after)" in first.stdout and "resumed" not in first.stdout
    assert ckpt.load(tmp_path / "checkpoint.pt")["step"] == 2
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
    assert "fine-tuning finished, resumed from step 2 of" in second.stdout, second.stdout
    assert "(--no-resume starts over)" in second.stdout
    assert ckpt.load(tmp_path / "checkpoint.pt")["step"] == 4  # 32 images / 8 per step, one epoch
