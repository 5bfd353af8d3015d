"""Messages a new user meets offline or with a typo: one line, where it looked, how to fix (issue 16)."""

import subprocess
import sys

import pytest


def _cli(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "heart_lib", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_data_with_an_empty_mirror_fails_and_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("HEART_DATA_MIRROR", str(tmp_path / "mirror"))
    monkeypatch.setenv("HEART_CACHE", str(tmp_path / "cache"))
    (tmp_path / "mirror").mkdir()
    done = _cli("data", "--datasets", "imagenet-val-1300")
    assert done.returncode == 1
    assert "timm hub will be used" not in done.stdout + done.stderr
    weights = [line for line in done.stderr.splitlines() if "deit_tiny_patch16_224 weights" in line]
    assert len(weights) == 1 and str(tmp_path / "mirror" / "weights") in weights[0]
    assert "HEART_DATA_MIRROR" in weights[0] and "weights='hub'" in weights[0]
    assert any("imagenet-val-1300 not found" in line for line in done.stderr.splitlines())
    assert "Traceback" not in done.stderr


def test_mirror_weights_missing_names_the_path_in_the_model_error(tmp_path, monkeypatch):
    from heart_lib import models
    from heart_lib.data import DataError

    monkeypatch.setenv("HEART_DATA_MIRROR", str(tmp_path))
    with pytest.raises(DataError, match=rf"looked for {tmp_path}/weights/.*HEART_DATA_MIRROR"):
        models.create_model("deit_tiny_patch16_224", "mirror")


def test_reproduce_an_unknown_profile_is_one_line():
    done = _cli("reproduce", "--profile", "nope")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [done.stderr.strip()] and "unknown profile 'nope'" in done.stderr


def test_checksum_advice_names_no_public_source_that_does_not_exist(tmp_path, monkeypatch):
    from heart_lib import data

    monkeypatch.setenv("HEART_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "synsets.txt"
    bad.write_text("n0\n")
    with pytest.raises(data.DataError) as err:
        data.resolve_file("imagenet-synsets", bad)
    assert "public source is used" not in str(err.value) and "manifest" in str(err.value)


def test_a_model_that_is_no_vision_transformer_is_one_line_in_pruning(tmp_path):
    """`model: resnet18` in the pruning chapter: one line naming the parameter, before any compute."""
    import os
    import subprocess
    import sys

    profile = tmp_path / "profiles" / "cnn"
    profile.mkdir(parents=True)
    (profile / "pruning.yaml").write_text("model: resnet18\nweights: none\n")
    env = {**os.environ, "HEART_PROFILES": str(tmp_path / "profiles"), "HEART_RESULTS": str(tmp_path / "results")}
    done = subprocess.run([sys.executable, "-m", "heart_lib", "run", "--profile", "cnn"], capture_output=True,
                          text=True, env=env, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    message = done.stderr.strip().splitlines()
    assert len(message) == 1 and "parameter 'model' = 'resnet18'" in message[0] and "VisionTransformer" in message[0]
    assert "patch_embed" not in done.stderr and not (tmp_path / "results" / "cnn" / "pruning").exists()
