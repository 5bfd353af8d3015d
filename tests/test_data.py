import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile

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


# ---------------------------------------------------------------- damaged data is never trusted (issue 16)

def test_file_edited_in_place_with_size_and_mtime_restored_is_checked_again(mirror, fake_mirror):
    target = fake_mirror / "imagenet-labels" / "imagenet_synsets.txt"
    target.parent.mkdir()
    shutil.copy(mirror / "imagenet-labels" / "imagenet_synsets.txt", target)
    data.resolve_file("imagenet-synsets")  # verified and remembered
    st = target.stat()
    with open(target, "r+b") as f:  # same size, one byte changed, mtime put back
        f.seek(3)
        byte = f.read(1)
        f.seek(3)
        f.write(b"x" if byte != b"x" else b"y")
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert target.stat().st_size == st.st_size and target.stat().st_mtime_ns == st.st_mtime_ns
    with pytest.raises(DataError, match="imagenet-synsets: checksum mismatch"):
        data.resolve_file("imagenet-synsets")


def test_two_images_swapped_by_renaming_are_named(mirror, fake_mirror):
    copy = fake_mirror / "imagenet-val-1300"
    shutil.copytree(mirror / "imagenet-val-1300", copy)
    assert len(data.image_dataset("imagenet-val-1300")) == 1300  # verified and remembered
    first, second = sorted((copy / "images").iterdir())[:2]
    first.rename(copy / "images" / "swap")
    second.rename(first)
    (copy / "images" / "swap").rename(second)
    done = subprocess.run([sys.executable, "-m", "heart_lib", "data", "--datasets", "imagenet-val-1300",
                           "--weights"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert "imagenet-val-1300 images: checksum mismatch" in done.stderr
    assert f"2 changed ({first.name}, {second.name})" in done.stderr and "Traceback" not in done.stderr


def test_a_replaced_image_is_named_on_the_first_check(mirror, fake_mirror):
    copy = fake_mirror / "imagenet-sample-1000"
    shutil.copytree(mirror / "imagenet-sample-1000", copy)
    images = sorted((copy / "images").iterdir())
    shutil.copy(images[1], images[0])
    (images[5]).unlink()
    with pytest.raises(DataError, match=rf"1 changed \({images[0].name}\), 1 missing \({images[5].name}\)"):
        data.image_dataset("imagenet-sample-1000")


def test_bad_labels_row_names_the_file_and_the_row(tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text("file,label,wnid\na.JPEG,3,n1\nb.JPEG,three,n2\n")
    with pytest.raises(DataError, match=rf"{labels}, row 3: .*class index"):
        data.read_labels(labels, tmp_path)


def _tiny_cifar(folder, per_class=40):
    """A CIFAR-10-shaped archive of a few hundred tiny files, and its manifest entry."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for split in ("train", "test"):
            for cls in data.CIFAR10_CLASSES:
                for i in range(per_class):
                    blob = f"{split}/{cls}/{i}".encode()
                    info = tarfile.TarInfo(f"cifar10/{split}/{cls}/{i:04d}.jpg")
                    info.size = len(blob)
                    tar.addfile(info, io.BytesIO(blob))
    (folder / "cifar10-jpeg.tar.gz").write_bytes(buf.getvalue())
    return {"mirror": "cifar10-jpeg.tar.gz", "sha256": hashlib.sha256(buf.getvalue()).hexdigest()}


def test_damaged_cifar10_cache_is_named_not_counted(fake_mirror, monkeypatch):
    entry = _tiny_cifar(fake_mirror)
    monkeypatch.setattr(data, "manifest", lambda: {"datasets": {"cifar10": entry}})
    folder = data.cifar10_folder()
    assert len(data.cifar10_samples("test")) == 400
    deleted = sorted((folder / "test" / "cat").iterdir())[:10]
    for path in deleted:
        path.unlink()
    data._checked_folders.clear()  # as a new process would start
    with pytest.raises(DataError, match=rf"10 missing \(cifar10/test/cat/{deleted[0].name}.*Remove .*cifar10-jpeg"):
        data.cifar10_samples("test")


def test_concurrent_first_extractions_both_succeed(fake_mirror, tmp_path):
    entry = _tiny_cifar(fake_mirror, per_class=300)
    script = ("import sys; from heart_lib import data; "
              f"data.manifest = lambda: {{'datasets': {{'cifar10': {entry!r}}}}}; "
              "print(len(data.cifar10_samples('test')))")
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(3)]
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        assert out.strip() == "3000"
    assert not list((tmp_path / "cache").glob(".cifar10-*"))  # no half extraction left
