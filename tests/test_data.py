"""Tests of ``idefender_gpu.data`` (issue 7): IDX parsing, the search order, the not-found error.

Nothing downloads: every test reads tiny IDX files written here, or Debian's
``dataset-fashion-mnist`` files when they are installed.
"""

from __future__ import annotations

import dataclasses
import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from idefender_gpu import data as data_module
from idefender_gpu.data import (
    DATASETS,
    DatasetNotFoundError,
    find_dataset,
    load_dataset,
    read_idx,
    search_dirs,
)

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")


def idx_bytes(array: np.ndarray) -> bytes:
    """IDX encoding of ``array`` (magic 0x00 0x00 type ndim, big-endian sizes, big-endian values)."""
    codes = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(np.int16): 0x0B,
             np.dtype(np.int32): 0x0C, np.dtype(np.float32): 0x0D, np.dtype(np.float64): 0x0E}
    header = bytes([0, 0, codes[array.dtype], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_dataset(folder: Path, n_train: int = 12, n_test: int = 5, *, compress: bool = True,
                  dotted: bool = False, seed: int = 0) -> dict[str, np.ndarray]:
    """The four MNIST-style IDX files of a tiny random dataset in ``folder``."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels": (np.arange(n_train) % 10).astype(np.uint8),
        "t10k-images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels": (np.arange(n_test) % 10).astype(np.uint8),
    }
    for stem, array in arrays.items():
        kind = "idx3" if array.ndim == 3 else "idx1"
        name = f"{stem}{'.' if dotted else '-'}{kind}-ubyte" + (".gz" if compress else "")
        raw = idx_bytes(array)
        (folder / name).write_bytes(gzip.compress(raw) if compress else raw)
    return arrays


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread (restored afterwards): on busy shared cores, OpenMP threads that spin
    waiting for each other make these tiny models tens of times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """No $IDEFENDER_DATA, a private cache, and Debian folders that do not exist."""
    monkeypatch.delenv("IDEFENDER_DATA", raising=False)
    monkeypatch.setenv("IDEFENDER_CACHE", str(tmp_path / "cache"))
    for name, spec in list(DATASETS.items()):
        monkeypatch.setitem(DATASETS, name, dataclasses.replace(spec, debian_dir=str(tmp_path / "debian" / name)))
    return tmp_path


# --------------------------------------------------------------------------------------
# IDX parsing
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gzip"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.int32, np.float32, np.float64])
def test_read_idx_round_trip(tmp_path, compress, dtype):
    array = (np.arange(2 * 3 * 4) - 5).reshape(2, 3, 4)
    array = array.astype(dtype) if dtype != np.uint8 else (array % 256).astype(np.uint8)
    raw = idx_bytes(array)
    path = tmp_path / "a-idx3-ubyte"
    path.write_bytes(gzip.compress(raw) if compress else raw)
    out = read_idx(path)
    assert out.shape == (2, 3, 4) and out.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(out, array)


def test_read_idx_labels_and_header(tmp_path):
    labels = np.array([3, 1, 4, 1, 5, 9, 2, 6], dtype=np.uint8)
    path = tmp_path / "labels-idx1-ubyte"
    raw = idx_bytes(labels)
    assert raw[:8] == bytes([0, 0, 8, 1, 0, 0, 0, 8])  # the MNIST label-file header
    path.write_bytes(raw)
    np.testing.assert_array_equal(read_idx(path), labels)


@pytest.mark.parametrize("payload, match", [
    (b"\x00\x00\x08\x01\x00\x00\x00\x05\x01\x02", "truncated or corrupted"),       # 2 of 5 values
    (b"\x00\x00\x08\x01\x00\x00\x00\x01\x01\x02", "truncated or corrupted"),       # one value too many
    (b"\x00\x00\x08\x03\x00\x00", "truncated"),                                   # header cut short
    (b"\x80\x03}q\x00.", "not an IDX file"),                                      # a pickle
    (b"\x00\x00\x07\x01\x00\x00\x00\x01\x00", "not an IDX file"),                  # unknown type code
    (b"", "not an IDX file"),
])
def test_read_idx_rejects_bad_files(tmp_path, payload, match):
    path = tmp_path / "bad-idx1-ubyte"
    path.write_bytes(payload)
    with pytest.raises(ValueError, match=match):
        read_idx(path)


def test_read_idx_rejects_broken_gzip(tmp_path):
    path = tmp_path / "bad-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros(10, np.uint8)))[:-6])
    with pytest.raises(ValueError, match="gzip"):
        read_idx(path)


# --------------------------------------------------------------------------------------
# Search order and loading
# --------------------------------------------------------------------------------------


def test_load_from_root(isolated):
    arrays = write_dataset(isolated / "mine")
    ds = load_dataset("fashion-mnist", isolated / "mine")
    assert ds.name == "fashion-mnist" and ds.n_classes == 10
    assert ds.x_train.shape == (12, 1, 28, 28) and ds.x_train.dtype == torch.float32
    assert ds.x_test.shape == (5, 1, 28, 28) and ds.y_test.dtype == torch.int64
    torch.testing.assert_close(ds.x_train[:, 0], torch.from_numpy(arrays["train-images"]).float() / 255)
    assert ds.y_train.tolist() == arrays["train-labels"].tolist()
    assert 0.0 <= float(ds.x_train.min()) and float(ds.x_train.max()) <= 1.0
    assert ds.source == isolated / "mine"


def test_hash_ignores_compression_and_names(isolated):
    write_dataset(isolated / "gz", compress=True)
    write_dataset(isolated / "raw", compress=False, dotted=True)
    write_dataset(isolated / "other", seed=1)
    a, b = load_dataset("mnist", isolated / "gz"), load_dataset("mnist", isolated / "raw")
    assert a.sha256 == b.sha256
    assert load_dataset("mnist", isolated / "other").sha256 != a.sha256
    sub = a.subset(6, 3)
    assert sub.x_train.shape[0] == 6 and sub.x_test.shape[0] == 3 and sub.sha256 != a.sha256
    assert a.subset() is a


@pytest.mark.parametrize("layout", ["flat", "named", "torchvision"])
def test_environment_variable_and_layouts(isolated, monkeypatch, layout):
    base = isolated / "envroot"
    folder = {"flat": base, "named": base / "fashion-mnist", "torchvision": base / "FashionMNIST" / "raw"}[layout]
    write_dataset(folder)
    monkeypatch.setenv("IDEFENDER_DATA", str(base))
    ds = load_dataset("FashionMNIST")  # alias, case-insensitive
    assert ds.source == folder


def test_root_is_searched_before_environment(isolated, monkeypatch):
    write_dataset(isolated / "env", n_train=10)
    write_dataset(isolated / "arg", n_train=20)
    monkeypatch.setenv("IDEFENDER_DATA", str(isolated / "env"))
    assert load_dataset("mnist", isolated / "arg").x_train.shape[0] == 20
    assert load_dataset("mnist").x_train.shape[0] == 10


def test_debian_folder_is_searched(isolated, monkeypatch):
    folder = Path(DATASETS["fashion-mnist"].debian_dir)
    write_dataset(folder)
    assert find_dataset("fashion-mnist")["train_images"] == folder / "train-images-idx3-ubyte.gz"


def test_not_found_lists_where_it_looked(isolated, monkeypatch):
    monkeypatch.setenv("IDEFENDER_DATA", str(isolated / "envdata"))
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("fashion-mnist", isolated / "given")  # download defaults to False
    message = str(info.value)
    first = message.splitlines()[0]
    assert first == f"fashion-mnist: the folder given by root=DIR, {isolated / 'given'}, does not exist."
    for folder in search_dirs("fashion-mnist", isolated / "given"):
        assert str(folder) in message
    assert str(isolated / "envdata") not in message  # root given: $IDEFENDER_DATA is not searched
    assert "apt-get install dataset-fashion-mnist" in message
    assert "IDEFENDER_DATA" in message and "root=DIR" in message and "download=True" in message
    assert "--data" not in message  # the Python API's words
    assert isinstance(info.value, FileNotFoundError)
    assert not (isolated / "cache").exists()  # nothing was downloaded or created


def test_not_found_in_the_commands_words(isolated):
    (isolated / "empty").mkdir()
    with pytest.raises(DatasetNotFoundError) as info:
        find_dataset("mnist", isolated / "empty", wording="command")
    message = str(info.value)
    assert message.splitlines()[0] == (
        f"mnist: the folder given by --data DIR, {isolated / 'empty'}, holds no mnist IDX files.")
    assert "--data DIR" in message and "--no-download" in message
    assert "root=DIR" not in message and "download=True" not in message
    with pytest.raises(ValueError, match="wording must be one of"):
        find_dataset("mnist", wording="cli")


def test_named_folders_are_used_or_refused(isolated, monkeypatch):
    """Issue 15: --data /nonexistent and IDEFENDER_DATA=/nonexistent were silently replaced by
    Debian's folder; a folder the user names is now the only one searched."""
    write_dataset(Path(DATASETS["fashion-mnist"].debian_dir))
    assert load_dataset("fashion-mnist").source == Path(DATASETS["fashion-mnist"].debian_dir)
    with pytest.raises(DatasetNotFoundError, match="the folder given by root=DIR, .*nonexistent, does not exist"):
        load_dataset("fashion-mnist", isolated / "nonexistent")
    monkeypatch.setenv("IDEFENDER_DATA", str(isolated / "nonexistent"))
    with pytest.raises(DatasetNotFoundError, match="the folder named by IDEFENDER_DATA, .*nonexistent, does not "):
        load_dataset("fashion-mnist")
    (isolated / "file").write_text("x")
    with pytest.raises(DatasetNotFoundError, match="is not a folder"):
        load_dataset("fashion-mnist", isolated / "file")


def _fake_torchvision(monkeypatch, behaviour):
    """A stand-in ``torchvision`` whose dataset classes call ``behaviour(root, train)``."""
    import types

    calls = []

    def make(name):
        def init(self, root, train=True, download=False):
            calls.append((name, train))
            behaviour(Path(root) / name / "raw", train)
        return type(name, (), {"__init__": init})

    module = types.ModuleType("torchvision")
    module.datasets = types.SimpleNamespace(FashionMNIST=make("FashionMNIST"), MNIST=make("MNIST"))
    monkeypatch.setitem(__import__("sys").modules, "torchvision", module)
    return calls


def test_failed_download_leaves_nothing_and_helps_first(isolated, monkeypatch):
    def fail_midway(raw, train):
        raw.mkdir(parents=True, exist_ok=True)
        (raw / "train-images-idx3-ubyte.gz").write_bytes(b"partial")
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried http://example, got URLError")

    calls = _fake_torchvision(monkeypatch, fail_midway)
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("mnist", download=True, wording="command")
    lines = str(info.value).splitlines()
    assert lines[0].startswith("mnist: the IDX files were not found in the default folders")
    assert lines[-1] == ("The download with torchvision failed too: RuntimeError: Error downloading "
                         "train-images-idx3-ubyte.gz: Tried http://example, got URLError")
    assert calls == [("MNIST", True)]
    assert not (isolated / "cache").exists()  # no empty data folder, no partial file


def test_download_without_torchvision_says_so(isolated, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "torchvision", None)  # import raises ImportError
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("fashion-mnist", download=True)
    assert str(info.value).splitlines()[0].startswith("fashion-mnist: the IDX files were not found")
    assert "torchvision failed too: ImportError: torchvision is not installed" in str(info.value)
    assert not (isolated / "cache").exists()


def test_download_goes_to_the_cache_and_named_folders_never_download(isolated, monkeypatch):
    def succeed(raw, train):
        if not train:
            write_dataset(raw)

    calls = _fake_torchvision(monkeypatch, succeed)
    with pytest.raises(DatasetNotFoundError):
        load_dataset("mnist", isolated / "mine", download=True)  # a named folder is used or refused
    assert calls == [] and not (isolated / "cache").exists()
    ds = load_dataset("mnist", download=True)
    raw = isolated / "cache" / "data" / "MNIST" / "raw"
    assert ds.source == raw and calls == [("MNIST", True), ("MNIST", False)]
    assert sorted(p.name for p in (isolated / "cache" / "data").iterdir()) == ["MNIST"]  # no temp folder left


def test_incomplete_folder_is_not_used(isolated):
    write_dataset(isolated / "partial")
    (isolated / "partial" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetNotFoundError, match="partial"):
        find_dataset("mnist", isolated / "partial")


def test_mismatched_labels_are_refused(isolated):
    write_dataset(isolated / "bad")
    (isolated / "bad" / "train-labels-idx1-ubyte.gz").write_bytes(
        gzip.compress(idx_bytes(np.zeros(3, np.uint8))))
    with pytest.raises(ValueError, match="labels must have shape"):
        load_dataset("mnist", isolated / "bad")


def test_bad_names():
    with pytest.raises(ValueError, match="dataset must be one of"):
        load_dataset("cifar-100")
    with pytest.raises(TypeError, match="dataset must be a str"):
        load_dataset(3)


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("IDEFENDER_CACHE", str(tmp_path / "c"))
    assert data_module.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("IDEFENDER_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data_module.cache_dir() == tmp_path / "xdg" / "idefender-gpu"


@pytest.mark.skipif(not (DEBIAN_DIR / "train-images-idx3-ubyte.gz").is_file(),
                    reason="Debian's dataset-fashion-mnist files are absent "
                           "(apt-get install dataset-fashion-mnist)")
def test_debian_fashion_mnist(monkeypatch):
    monkeypatch.delenv("IDEFENDER_DATA", raising=False)
    ds = load_dataset("fashion-mnist")
    assert ds.source == DEBIAN_DIR
    assert ds.x_train.shape == (60000, 1, 28, 28) and ds.x_test.shape == (10000, 1, 28, 28)
    assert torch.bincount(ds.y_train).tolist() == [6000] * 10
    assert torch.bincount(ds.y_test).tolist() == [1000] * 10
    assert ds.classes[0] == "T-shirt/top" and ds.classes[9] == "Ankle boot"
