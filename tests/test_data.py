import shutil

import pytest
import torch

from heart_lib import data
from heart_lib.data import DataError


@pytest.fixture
def fake_mirror(tmp_path, monkeypatch):
    """An empty mirror and a private cache, so checksum memory starts blank."""
    root = tmp_path / "mirror"
    root.mkdir()
    monkeypatch.setenv("HEART_DATA_MIRROR", str(root))
    monkeypatch.setenv("HEART_CACHE", str(tmp_path / "cache"))
    return root


def test_real_validation_images_resolve_with_labels(mirror):
    dataset = data.image_dataset("imagenet-val-1300")
    assert len(dataset) == 1300
    image, label = dataset[0]
    assert image.size == (227, 227) and 0 <= label < 1000
    assert len(set(data.dataset_labels(dataset))) == 725


def test_subset_is_seeded_and_reproducible(mirror):
    a = data.image_dataset("imagenet-sample-1000", limit=50, seed=3)
    b = data.image_dataset("imagenet-sample-1000", limit=50, seed=3)
    c = data.image_dataset("imagenet-sample-1000", limit=50, seed=4)
    assert a.indices == b.indices and a.indices != c.indices and len(a) == 50


def test_missing_dataset_names_itself_and_the_mirror(fake_mirror):
    with pytest.raises(DataError, match=r"imagenet-val-1300 not found.*mirror"):
        data.image_dataset("imagenet-val-1300")


def test_corrupt_labels_file_is_refused(mirror, fake_mirror):
    copy = fake_mirror / "imagenet-sample-1000"
    shutil.copytree(mirror / "imagenet-sample-1000", copy)
    labels = copy / "labels.csv"
    labels.write_text(labels.read_text().replace("n01440764_tench.JPEG,0", "n01440764_tench.JPEG,1"))
    with pytest.raises(DataError, match="checksum mismatch"):
        data.image_dataset("imagenet-sample-1000")


def test_replaced_image_is_refused(mirror, fake_mirror):
    copy = fake_mirror / "imagenet-val-1300"
    shutil.copytree(mirror / "imagenet-val-1300", copy)
    first, second = sorted((copy / "images").iterdir())[:2]
    shutil.copy(second, first)  # a valid JPEG, but not the right one
    with pytest.raises(DataError, match="imagenet-val-1300 images: checksum mismatch"):
        data.image_dataset("imagenet-val-1300")


def test_verified_checksum_is_remembered(mirror, monkeypatch, tmp_path):
    monkeypatch.setenv("HEART_CACHE", str(tmp_path / "cache"))
    path = data.resolve_file("imagenet-synsets")
    monkeypatch.setattr(data, "sha256_file", lambda p: pytest.fail(f"re-hashed {p}"))
    assert data.resolve_file("imagenet-synsets") == path


def test_changed_file_is_checked_again(mirror, fake_mirror):
    target = fake_mirror / "imagenet-labels" / "imagenet_synsets.txt"
    target.parent.mkdir()
    shutil.copy(mirror / "imagenet-labels" / "imagenet_synsets.txt", target)
    data.resolve_file("imagenet-synsets")
    target.write_text(target.read_text() + "n99999999\n")
    with pytest.raises(DataError, match="checksum mismatch"):
        data.resolve_file("imagenet-synsets")


def test_full_validation_folder_uses_the_official_labels(mirror, tmp_path):
    folder = tmp_path / "val"
    folder.mkdir()
    reference = data.image_folder_with_csv("imagenet-val-1300")[1][:3]
    for sample in reference:
        shutil.copy(sample.path, folder / sample.path.name)
    dataset = data.image_dataset("imagenet-val", path=folder)
    assert data.dataset_labels(dataset) == [s.label for s in sorted(reference, key=lambda s: s.path.name)]


def test_full_validation_folder_must_be_given(monkeypatch):
    monkeypatch.delenv("HEART_IMAGENET_VAL", raising=False)
    with pytest.raises(DataError, match="HEART_IMAGENET_VAL"):
        data.image_dataset("imagenet-val")


def test_cifar10_from_the_mirror_archive(mirror):
    test = data.image_dataset("cifar10-test")
    assert len(test) == 10000
    labels = data.dataset_labels(test)
    assert [labels.count(k) for k in range(10)] == [1000] * 10
    image, label = test[0]
    assert image.size == (32, 32)


def test_synthetic_images_are_seeded():
    a, b = data.image_dataset("synthetic", limit=4, seed=1), data.image_dataset("synthetic", limit=4, seed=1)
    assert torch.equal(a[2][0], b[2][0]) and a[0][0].shape == (3, 32, 32)


@pytest.mark.parametrize("kwargs, message", [
    ({"name": "imagenet-22k"}, "unknown dataset"),
    ({"name": "synthetic", "limit": 0}, "limit"),
])
def test_bad_dataset_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        data.image_dataset(**kwargs)


def test_class_names(mirror):
    names = data.class_names()
    assert len(names) == 1000 and names[0] == "tench"
