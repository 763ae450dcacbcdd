"""The verified tensor file shared by detector files and model checkpoints (``idefender_gpu._files``):
round trips, the digest (unchanged from the two copies it replaces, so files written before
still load), atomic writes, copies that outlive the file, and refusal of truncated, foreign,
tampered, other-version and pickled files without running them.
"""

from __future__ import annotations

import hashlib
import json
import pickle

import pytest
import safetensors.torch
import torch

from conftest import PicklePayload
from idefender_gpu import _files

MARKER = "idefender-gpu/test"


def tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(3, 4, generator=g),
        "b": torch.randn(4, generator=g, dtype=torch.float64),
        "n": torch.arange(5),
        "flag": torch.tensor([True, False]),
        "half": torch.randn(2, 2, generator=g).to(torch.bfloat16),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
    }


def _reference_digest(marker, config_json, named):
    """The digest as ``models._digest`` and ``detector._io.digest`` computed it before they
    were merged (bytes copies and all): the merged one must equal it bit for bit."""
    sha = hashlib.sha256()

    def put(data: bytes) -> None:
        sha.update(len(data).to_bytes(8, "little"))
        sha.update(data)

    put(marker.encode())
    put(config_json.encode())
    for name in sorted(named):
        tensor = named[name].detach().to("cpu").contiguous()
        put(name.encode())
        put(str(tensor.dtype).encode())
        put(json.dumps(list(tensor.shape)).encode())
        put(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return sha.hexdigest()


def test_digest_equals_the_former_copies():
    named = tensors()
    config_json = json.dumps({"format_version": 1, "a": [1, 2]}, sort_keys=True)
    assert _files.digest(MARKER, config_json, named) == _reference_digest(MARKER, config_json, named)
    assert _files.digest("other", config_json, named) != _files.digest(MARKER, config_json, named)


def test_round_trip(tmp_path):
    named = tensors()
    config = {"format_version": 3, "note": "ü", "nested": {"k": [1.5, None]}}
    path = _files.write_verified(tmp_path / "sub" / "f.safetensors", MARKER, config, named)
    assert path == tmp_path / "sub" / "f.safetensors"  # the folder was created
    assert [p.name for p in path.parent.iterdir()] == ["f.safetensors"]  # no temporary left
    got_config, got = _files.read_verified(path, MARKER, kind="test file", version=3)
    assert got_config == config
    assert set(got) == set(named)
    for name, tensor in named.items():
        assert got[name].dtype == tensor.dtype and got[name].device.type == "cpu"
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=0)


def test_written_file_permissions_follow_the_umask(tmp_path):
    """As a file made by open(): readable by others under the usual umask 022 (a temporary
    file from mkstemp would leave the target 0600)."""
    import os
    import stat

    reference = tmp_path / "reference"
    reference.write_bytes(b"")
    path = _files.write_verified(tmp_path / "f.safetensors", MARKER, {"format_version": 1}, {"w": torch.ones(1)})
    assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE(reference.stat().st_mode)
    old = os.umask(0o022)
    try:
        path = _files.write_verified(tmp_path / "g.safetensors", MARKER, {"format_version": 1}, {"w": torch.ones(1)})
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_file_written_by_the_former_writer_still_reads(tmp_path):
    """A detector file written before the merge: ``safetensors.save`` of host copies with the
    metadata built by the old digest."""
    named = {"thresholds": torch.randn(3), "layers.0.means": torch.randn(3, 2, 4)}
    config_json = json.dumps({"format_version": 1, "x": 1}, sort_keys=True)
    metadata = {"format": MARKER, "config": config_json, "sha256": _reference_digest(MARKER, config_json, named)}
    path = tmp_path / "old.safetensors"
    path.write_bytes(safetensors.torch.save(named, metadata=metadata))
    config, got = _files.read_verified(path, MARKER, kind="test file", version=1)
    assert config == {"format_version": 1, "x": 1}
    torch.testing.assert_close(got["layers.0.means"], named["layers.0.means"], rtol=0, atol=0)


def test_tied_and_strided_tensors_are_written(tmp_path):
    base = torch.randn(4, 6)
    named = {"a": base, "tied": base, "slice": base[:, 1:3], "t": base.T}
    path = _files.write_verified(tmp_path / "f.safetensors", MARKER, {"format_version": 1}, named)
    _, got = _files.read_verified(path, MARKER, kind="test file", version=1)
    for name, tensor in named.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=0)


def test_read_tensors_outlive_the_file(tmp_path):
    """The tensors read are copies, not views of a memory map: replacing or truncating the
    file afterwards must not change them (or crash on access)."""
    path = tmp_path / "f.safetensors"
    named = {"w": torch.arange(100_000, dtype=torch.float32)}
    _files.write_verified(path, MARKER, {"format_version": 1}, named)
    _, got = _files.read_verified(path, MARKER, kind="test file", version=1)
    path.write_bytes(b"")  # truncate in place (same inode)
    assert float(got["w"].sum()) == float(named["w"].sum())


def test_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = _files.write_verified(tmp_path / "f.safetensors", MARKER, {"format_version": 1, "v": 1},
                                 {"w": torch.ones(2)})

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(_files, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        _files.write_verified(path, MARKER, {"format_version": 1, "v": 2}, {"w": torch.zeros(2)})
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["f.safetensors"]
    config, got = _files.read_verified(path, MARKER, kind="test file", version=1)
    assert config["v"] == 1 and float(got["w"].sum()) == 2.0


@pytest.fixture
def written(tmp_path):
    return _files.write_verified(tmp_path / "f.safetensors", MARKER, {"format_version": 1, "v": 1},
                                 {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(3)})


def _read(path, version=1):
    return _files.read_verified(path, MARKER, kind="test file", version=version)


def test_truncated_and_foreign_files_refused(written, tmp_path):
    data = written.read_bytes()
    for cut in (len(data) - 1, 60, 7, 0):
        bad = tmp_path / f"cut{cut}"
        bad.write_bytes(data[:cut])
        with pytest.raises(ValueError, match="is not a test file: it is not a complete safetensors file"):
            _read(bad)
    foreign = tmp_path / "foreign.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(2)}, str(foreign), metadata={"format": "someone-else"})
    with pytest.raises(ValueError, match="is not an idefender-gpu test file: its metadata must have "
                                         "format='idefender-gpu/test'; got 'someone-else'"):
        _read(foreign)
    bare = tmp_path / "bare.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(2)}, str(bare), metadata={"format": MARKER})
    with pytest.raises(ValueError, match="must hold 'config' and 'sha256'"):
        _read(bare)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        _read(tmp_path / "missing")
    with pytest.raises(TypeError, match="path must be a str or os.PathLike; got int"):
        _read(3)


def test_tampered_bytes_and_config_refused(written, tmp_path):
    data = bytearray(written.read_bytes())
    data[-2] ^= 0x10  # a byte of the last tensor
    flipped = tmp_path / "flipped"
    flipped.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="failed its integrity check"):
        _read(flipped)
    named = safetensors.torch.load(written.read_bytes())
    metadata = safetensors.safe_open(str(written), framework="pt").metadata()
    metadata["config"] = json.dumps({"format_version": 1, "v": 2}, sort_keys=True)  # digest not recomputed
    edited = tmp_path / "edited"
    edited.write_bytes(safetensors.torch.save(named, metadata=metadata))
    with pytest.raises(ValueError, match="failed its integrity check"):
        _read(edited)


@pytest.mark.parametrize("config_json, match", [
    ("{not json", "its config is not JSON"),
    ("[1, 2]", "its config must be a JSON object"),
    (json.dumps({"format_version": 2}), "has test file format version 2; this idefender-gpu reads version 1"),
    (json.dumps({"v": 1}), "has test file format version None"),
])
def test_bad_config_with_a_valid_digest_refused(tmp_path, config_json, match):
    named = {"w": torch.ones(2)}
    metadata = {"format": MARKER, "config": config_json, "sha256": _files.digest(MARKER, config_json, named)}
    path = tmp_path / "f.safetensors"
    path.write_bytes(safetensors.torch.save(named, metadata=metadata))
    with pytest.raises(ValueError, match=match):
        _read(path)


def test_pickles_refused_without_running_them(tmp_path, monkeypatch):
    marker = tmp_path / "marker"
    raw, zipped = tmp_path / "raw.pkl", tmp_path / "zipped.pt"
    raw.write_bytes(pickle.dumps(PicklePayload(marker)))
    torch.save(PicklePayload(marker), zipped)

    def refuse(*args, **kwargs):
        raise AssertionError("a verified file is never unpickled")

    for module, name in ((torch, "load"), (pickle, "load"), (pickle, "loads")):
        monkeypatch.setattr(module, name, refuse)
    for path in (raw, zipped):
        with pytest.raises(ValueError, match="another format such as a pickle, which is never loaded"):
            _read(path)
    assert not marker.exists()
