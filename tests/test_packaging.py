"""``kernels/`` ships as ``idefender_gpu.kernels``, never as a top-level ``kernels`` package."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_kernels_import_as_subpackage():
    import idefender_gpu.kernels as kernels

    assert Path(kernels.__file__).resolve().parent == ROOT / "kernels"
    assert callable(kernels.log_gaussian_prob)


@pytest.mark.slow
def test_wheel_contains_kernels_under_the_package(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    wheel = next(tmp_path.glob("idefender_gpu-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "idefender_gpu/kernels/_dense.py" in names
    assert "idefender_gpu/kernels/_linalg.py" in names
    assert not any(name.startswith("kernels/") for name in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "idefender-gpu = idefender_gpu.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
