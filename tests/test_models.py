import pytest
import torch

from heart_lib import data, models
from heart_lib.data import DataError


def test_unknown_model_suggests_close_names():
    with pytest.raises(ValueError, match="unknown model 'deit_tiny_patch16'.*deit_tiny_patch16_224"):
        models.create_model("deit_tiny_patch16")


def test_real_weights_classify_real_images(mirror):
    model = models.create_model("deit_tiny_patch16_224", weights="mirror")
    dataset = data.image_dataset("imagenet-val-1300", data.model_transform(model), limit=48, seed=0)
    table = models.evaluate(model, data.make_loader(dataset, 48), progress=False)
    summary = models.summarize(table)
    # DeiT-Tiny is a ~72 % top-1 model; a random one would score ~0.1 %.
    assert summary["top1"] > 0.5 and summary["top5"] > 0.75
    assert summary["top1_lo"] < summary["top1"] < summary["top1_hi"]
    assert table["correct"].mean() == summary["top1"]


def test_weights_file_that_does_not_fit_is_refused(tmp_path, tiny_vit):
    path = tmp_path / "tiny.pth"
    torch.save(tiny_vit.state_dict(), path)
    with pytest.raises(DataError, match="does not fit model"):
        models.create_model("deit_tiny_patch16_224", weights=path)


def test_corrupt_weights_file_is_refused(tmp_path):
    path = tmp_path / "broken.pth"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match="cannot read weights file"):
        models.create_model("deit_tiny_patch16_224", weights=path)


def test_weights_from_a_file_round_trip(tmp_path, tiny_vit):
    path = tmp_path / "tiny.pth"
    torch.save(tiny_vit.state_dict(), path)
    again = models.create_model("vit_tiny_patch16_224", weights=path, img_size=32, patch_size=8, depth=2,
                                num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(again(x), tiny_vit(x))


def test_hub_failure_offline_is_explained(monkeypatch):
    import timm

    def offline(*args, **kwargs):
        if kwargs.get("pretrained"):
            raise OSError("network unreachable")
        return timm.create_model.__wrapped__(*args, **kwargs)

    monkeypatch.setattr(models.timm, "create_model", offline)
    with pytest.raises(DataError, match="timm hub.*HEART_DATA_MIRROR"):
        models.create_model("vit_small_patch16_224", weights="hub")


def test_new_head_for_another_task(mirror):
    model = models.create_model("deit_tiny_patch16_224", weights="mirror", num_classes=10)
    assert model.num_classes == 10 and model.head.out_features == 10


def test_summary_of_a_known_table():
    logits = torch.tensor([[5.0, 0.0], [0.0, 5.0], [5.0, 0.0], [0.0, 5.0]])
    table = models.per_image_table(logits, torch.tensor([0, 1, 1, 1]))
    summary = models.summarize(table)
    assert summary["top1"] == 0.75 and summary["top5"] == 1.0 and summary["n"] == 4


def test_non_finite_loss_names_the_images():
    logits = torch.tensor([[1.0, 0.0], [float("nan"), 0.0]])
    with pytest.raises(FloatingPointError, match=r"\[1\]"):
        models.per_image_table(logits, torch.tensor([0, 0]))
