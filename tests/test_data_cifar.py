"""Tests of CIFAR-10 in ``idefender_gpu.data`` (issue 14): the binary batches, the search order,
the not-found error, the refusal of the pickled python version, the download into the cache.

Nothing downloads: every test writes tiny binary batches (20 records) in tmp_path.
"""

from __future__ import annotations

import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import PicklePayload

from idefender_gpu.data import (
    CIFAR_CLASSES,
    DATASET_NAMES,
    DatasetNotFoundError,
    find_dataset,
    load_dataset,
    read_cifar_batch,
    search_dirs,
)
from idefender_gpu.data import _cifar

pytestmark = pytest.mark.usefixtures("one_thread")

BATCH_FILES = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]


def write_batches(folder: Path, n: int = 20, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The six binary batch files of a tiny CIFAR-10 in ``folder``: n records each (label byte +
    3072 channel-major pixel bytes); returns file name -> (images (n, 3, 32, 32), labels (n,))."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for i, name in enumerate(BATCH_FILES):
        images = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
        labels = ((np.arange(n) + i) % 10).astype(np.uint8)
        records = np.concatenate([labels[:, None], images.reshape(n, -1)], axis=1)  # (n, 3073)
        (folder / name).write_bytes(records.tobytes())
        written[name] = (images, labels)
    return written



@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """No $IDEFENDER_DATA and a private, empty cache."""
    monkeypatch.delenv("IDEFENDER_DATA", raising=False)
    monkeypatch.setenv("IDEFENDER_CACHE", str(tmp_path / "cache"))
    return tmp_path


def test_read_batch_is_channel_major(tmp_path):
    record = np.zeros(3073, np.uint8)
    record[0] = 7
    record[1 + 0 * 1024 + 2 * 32 + 5] = 11   # red, row 2, column 5
    record[1 + 2 * 1024 + 31 * 32 + 0] = 22  # blue, row 31, column 0
    (tmp_path / "b.bin").write_bytes(record.tobytes() * 2)
    images, labels = read_cifar_batch(tmp_path / "b.bin")
    assert images.shape == (2, 3, 32, 32) and images.dtype == np.uint8 and labels.tolist() == [7, 7]
    assert images[1, 0, 2, 5] == 11 and images[1, 2, 31, 0] == 22 and int(images.sum()) == 2 * 33


def test_load_from_root(isolated):
    written = write_batches(isolated / "mine" / "cifar-10-batches-bin")
    ds = load_dataset("CIFAR10", isolated / "mine")  # alias, case-insensitive; torchvision-like root
    assert ds.name == "cifar10" and ds.classes == CIFAR_CLASSES["cifar10"] and ds.classes[0] == "airplane"
    assert ds.classes[9] == "truck" and ds.n_classes == 10
    assert ds.x_train.shape == (100, 3, 32, 32) and ds.x_train.dtype == torch.float32
    assert ds.x_test.shape == (20, 3, 32, 32) and ds.y_train.dtype == torch.int64 and ds.y_test.shape == (20,)
    train_images = np.concatenate([written[f][0] for f in BATCH_FILES[:5]])
    np.testing.assert_array_equal(ds.x_train.numpy(), train_images.astype(np.float32) / np.float32(255))
    assert ds.y_train.tolist() == np.concatenate([written[f][1] for f in BATCH_FILES[:5]]).tolist()
    assert ds.y_test.tolist() == written["test_batch.bin"][1].tolist()
    assert 0.0 <= float(ds.x_train.min()) and float(ds.x_train.max()) <= 1.0
    assert ds.source == isolated / "mine" / "cifar-10-batches-bin" and not ds.stand_in
    assert load_dataset("cifar-10", isolated / "mine").sha256 == ds.sha256
    write_batches(isolated / "other", seed=1)
    assert load_dataset("cifar10", isolated / "other").sha256 != ds.sha256


@pytest.mark.parametrize("layout", ["flat", "named", "named-bin"])
def test_environment_variable_and_layouts(isolated, monkeypatch, layout):
    base = isolated / "envroot"
    folder = {"flat": base, "named": base / "cifar10", "named-bin": base / "cifar10" / "cifar-10-batches-bin"}[layout]
    write_batches(folder)
    monkeypatch.setenv("IDEFENDER_DATA", str(base))
    assert load_dataset("cifar10").source == folder
    assert find_dataset("cifar10")["test_batch.bin"] == folder / "test_batch.bin"


def test_cache_is_the_default_and_root_comes_first(isolated, monkeypatch):
    write_batches(isolated / "cache" / "data" / "cifar-10-batches-bin", n=10)
    write_batches(isolated / "arg", n=30)
    assert load_dataset("cifar10").x_train.shape[0] == 50
    assert load_dataset("cifar10", isolated / "arg").x_train.shape[0] == 150
    monkeypatch.setenv("IDEFENDER_DATA", str(isolated / "nothing-here"))
    with pytest.raises(DatasetNotFoundError, match="the folder named by IDEFENDER_DATA, .*nothing-here, does not"):
        load_dataset("cifar10")  # a named folder is used or refused, never replaced by the cache


def test_not_found_names_folders_files_and_url(isolated):
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("cifar10", isolated / "given")
    message = str(info.value)
    assert message.splitlines()[0] == f"cifar10: the folder given by root=DIR, {isolated / 'given'}, does not exist."
    for folder in search_dirs("cifar10", isolated / "given"):
        assert f"  - {folder}" in message
    assert "data_batch_1.bin" in message and "test_batch.bin" in message
    assert _cifar.URL in message and _cifar.MD5 in message
    assert "root=DIR" in message and "download=True" in message and "--data" not in message
    assert isinstance(info.value, FileNotFoundError) and not (isolated / "cache").exists()


def test_not_found_in_the_commands_words(isolated):
    (isolated / "empty").mkdir()
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("cifar10", isolated / "empty", wording="command")
    message = str(info.value)
    assert message.splitlines()[0] == (
        f"cifar10: the folder given by --data DIR, {isolated / 'empty'}, holds no cifar10 binary batch files.")
    assert "--data DIR" in message and "--no-download" in message
    assert "root=DIR" not in message and "download=True" not in message
    with pytest.raises(DatasetNotFoundError, match="default folders"):
        load_dataset("cifar10")


def test_incomplete_folder_is_not_used(isolated):
    write_batches(isolated / "partial")
    (isolated / "partial" / "data_batch_3.bin").unlink()
    with pytest.raises(DatasetNotFoundError, match="holds no cifar10 binary batch files"):
        load_dataset("cifar10", isolated / "partial")


@pytest.mark.parametrize("cut, match", [(5, "not a positive multiple of 3073"), (3073 * 20, "not a positive")])
def test_truncated_batch_is_refused(isolated, cut, match):
    write_batches(isolated / "bad")
    path = isolated / "bad" / "data_batch_2.bin"
    raw = path.read_bytes()
    path.write_bytes(raw[:-cut] if cut < len(raw) else b"")
    with pytest.raises(ValueError, match=match) as info:
        load_dataset("cifar10", isolated / "bad")
    assert "data_batch_2.bin" in str(info.value)


def test_label_out_of_range_is_refused(isolated):
    write_batches(isolated / "bad")
    path = isolated / "bad" / "test_batch.bin"
    raw = bytearray(path.read_bytes())
    raw[3 * 3073] = 10  # the label byte of record 3
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"test_batch.bin.*record 3 has label 10, outside \[0, 10\)"):
        load_dataset("cifar10", isolated / "bad")


def test_pickled_python_version_is_refused_without_unpickling(isolated):
    """torchvision's cifar-10-batches-py folder: named in the error, never unpickled."""
    marker = isolated / "executed"
    folder = isolated / "tv" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in ["batches.meta", *(f.removesuffix(".bin") for f in BATCH_FILES)]:
        (folder / name).write_bytes(pickle.dumps({b"labels": [0], b"data": PicklePayload(marker)}))
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("cifar10", isolated / "tv")
    message = str(info.value)
    assert f"Found the python version (pickles) in {folder}" in message and "never unpickles" in message
    assert _cifar.URL in message
    assert not marker.exists()
    pickle.loads((folder / "test_batch").read_bytes())[b"data"].close()  # the payload is live: unpickling runs it
    assert marker.exists()
    marker.unlink()
    # a pickle renamed to a binary batch is refused as malformed, still not unpickled
    (folder.parent / "x.bin").write_bytes(pickle.dumps(PicklePayload(marker)))
    with pytest.raises(ValueError, match="not a CIFAR-10 binary batch"):
        read_cifar_batch(folder.parent / "x.bin")
    assert not marker.exists()


def test_download_goes_to_the_cache_and_named_folders_never_download(isolated, monkeypatch):
    calls = []

    def fetch(url, folder, md5):
        calls.append((url, md5))
        write_batches(Path(folder) / "cifar-10-batches-bin", n=4)
        (Path(folder) / "cifar-10-binary.tar.gz").write_bytes(b"archive")

    monkeypatch.setattr(_cifar, "_fetch_archive", fetch)
    with pytest.raises(DatasetNotFoundError):
        load_dataset("cifar10", isolated / "mine", download=True)
    assert calls == [] and not (isolated / "cache").exists()
    ds = load_dataset("cifar10", download=True)
    target = isolated / "cache" / "data" / "cifar-10-batches-bin"
    assert ds.source == target and ds.x_train.shape == (20, 3, 32, 32)
    assert calls == [("https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz", "c32a1d4ab5d03f1284b67883e8d87530")]
    assert sorted(p.name for p in (isolated / "cache" / "data").iterdir()) == ["cifar-10-batches-bin"]
    load_dataset("cifar10", download=True)
    assert len(calls) == 1  # found in the cache now


def test_failed_download_leaves_nothing_and_helps_first(isolated, monkeypatch):
    def fail(url, folder, md5):
        (Path(folder) / "cifar-10-binary.tar.gz").write_bytes(b"partial")
        raise RuntimeError("File not found or corrupted.")

    monkeypatch.setattr(_cifar, "_fetch_archive", fail)
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("cifar10", download=True, wording="command")
    lines = str(info.value).splitlines()
    assert lines[0].startswith("cifar10: the binary batch files were not found in the default folders")
    assert lines[-1] == "The download with torchvision failed too: RuntimeError: File not found or corrupted."
    assert not (isolated / "cache").exists()


def test_download_without_torchvision_says_so(isolated, monkeypatch):
    for module in ("torchvision", "torchvision.datasets", "torchvision.datasets.utils"):
        monkeypatch.setitem(sys.modules, module, None)  # importing it raises ImportError
    with pytest.raises(DatasetNotFoundError, match="failed too: ImportError: torchvision is not installed"):
        load_dataset("cifar10", download=True)
    assert not (isolated / "cache").exists()


def test_bad_names_list_every_dataset():
    assert DATASET_NAMES == ("cifar10", "fashion-mnist", "mnist")
    with pytest.raises(ValueError, match=r"dataset must be one of \['cifar10', 'fashion-mnist', 'mnist'\]"):
        load_dataset("cifar-100")
