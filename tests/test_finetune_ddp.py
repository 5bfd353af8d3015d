"""Two CPU processes under PyTorch's torchrun (DDP over gloo) take the same steps as one process
with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd
import pytest
import torch

from heart_lib.finetune import checkpoint as ckpt
from heart_lib.finetune import cli

ARGS = ["--model", "vit_tiny_patch16_224", "--weights", "none", "--num-classes", "10",
        "--model-kwargs", json.dumps({"img_size": 32, "patch_size": 8, "depth": 2}),
        "--pruning", "tokens=0.5@1;selector=cls_attention", "--train-data", "synthetic", "--train-limit", "48",
        "--batch-size", "16", "--epochs", "1", "--lr", "1e-3", "--warmup-epochs", "0", "--device", "cpu",
        "--seed", "3"]


def test_two_process_ddp_step_equals_single_process_step(tmp_path, monkeypatch):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", HEART_PROGRESS="0")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "heart_lib.finetune", *ARGS, "--out", str(tmp_path / "ddp")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cli.run([*ARGS, "--out", str(tmp_path / "one")]) == 0
    finally:
        torch.set_num_threads(threads)

    ddp, one = ckpt.load(tmp_path / "ddp" / "checkpoint.pt"), ckpt.load(tmp_path / "one" / "checkpoint.pt")
    assert ddp["world_size"] == 2 and one["world_size"] == 1 and ddp["step"] == one["step"] == 3
    assert len(ddp["rng"]) == 2  # every rank's random state is kept for an exact resume
    # Compare the updates (final - initial weights) as one vector. Per-element comparison would be
    # too strict: AdamW turns gradients that are zero in exact arithmetic (e.g. the key biases,
    # which softmax ignores) into lr-sized steps of arbitrary sign from rounding noise.
    from heart_lib.finetune.inputs import model_at_resolution

    init = model_at_resolution("vit_tiny_patch16_224", "none", 10, None, seed=3, img_size=32, patch_size=8,
                               depth=2).state_dict()
    assert set(one["model"]) == set(ddp["model"]) == {f"model.{k}" for k in init}
    upd_one = torch.cat([(one["model"][f"model.{k}"] - v).flatten() for k, v in init.items()])
    upd_ddp = torch.cat([(ddp["model"][f"model.{k}"] - v).flatten() for k, v in init.items()])
    assert upd_one.norm() > 0.1  # the three steps really moved the weights
    assert (upd_ddp - upd_one).norm() / upd_one.norm() < 1e-3
    h_ddp = pd.read_csv(tmp_path / "ddp" / "history.csv")
    h_one = pd.read_csv(tmp_path / "one" / "history.csv")
    assert h_ddp["train_images"].tolist() == h_one["train_images"].tolist() == [48]
    assert h_ddp["train_loss"].iloc[0] == pytest.approx(h_one["train_loss"].iloc[0], rel=1e-5)


def test_cli_rejects_bad_values_before_starting(tmp_path, capsys):
    assert cli.run(["--out", str(tmp_path), "--epochs", "0"]) == 2
    assert "epochs = 0" in capsys.readouterr().err
