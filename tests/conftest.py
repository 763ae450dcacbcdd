"""Shared fixtures: tolerance table, seeded RNG, devices. No network access anywhere."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

# One tolerance table, per dtype (C13). float64 oracles are tight; float32 loosened by
# round-off of accumulations over thousands of samples.
TOLERANCES = {
    torch.float64: {"rtol": 1e-8, "atol": 1e-10},
    torch.float32: {"rtol": 1e-4, "atol": 1e-5},
}

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def tol(dtype: torch.dtype) -> dict:
    """``rtol``/``atol`` keywords for ``torch.testing.assert_close`` at ``dtype``."""
    return TOLERANCES[dtype]


@pytest.fixture
def seed():
    """Seed torch, NumPy and ``random``; restore the global RNG states afterwards."""
    torch_state = torch.random.get_rng_state()
    np_state = np.random.get_state()
    py_state = random.getstate()
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    yield 0
    torch.random.set_rng_state(torch_state)
    np.random.set_state(np_state)
    random.setstate(py_state)


@pytest.fixture(params=DEVICES)
def device(request):
    """Every available device: CPU always, CUDA when present."""
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def _no_tf32():
    """Comparisons with dense float references run without TF32 (restored afterwards)."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def make_blobs(n_per_group, n_features, n_components, *, seed=0, spread=4.0, dtype=np.float64):
    """Gaussian blobs: for each group, ``n_components`` clusters with random covariances.

    Returns ``X (N, D)`` and group labels ``y (N,)`` (all zeros when ``n_per_group`` is an int).
    """
    rng = np.random.default_rng(seed)
    sizes = [n_per_group] if np.isscalar(n_per_group) else list(n_per_group)
    xs, ys = [], []
    for g, n in enumerate(sizes):
        centres = rng.normal(scale=spread, size=(n_components, n_features))
        comp = rng.integers(0, n_components, size=n)
        mix = rng.normal(size=(n_components, n_features, n_features)) / np.sqrt(n_features)
        noise = rng.normal(size=(n, n_features))
        xs.append(centres[comp] + np.einsum("nd,nde->ne", noise, mix[comp]) + 0.3 * noise)
        ys.append(np.full(n, g))
    return np.concatenate(xs).astype(dtype), np.concatenate(ys)


# --------------------------------------------------------------------------------------
# A toy image problem for the attack tests (appended for tests/test_attacks.py and
# tests/test_adaptive.py): 8x8 bars, a tiny CNN, fixed seeds.
# --------------------------------------------------------------------------------------


def make_bars(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images (n, 1, 8, 8) in [0, 1]: class 0 a row, 1 a column, 2 the diagonal."""
    y = torch.arange(n) % 3
    x = 0.25 * torch.rand(n, 1, 8, 8, generator=generator)
    pos = torch.randint(1, 7, (n,), generator=generator)
    level = 0.6 + 0.4 * torch.rand(n, generator=generator)
    rows = torch.arange(n)
    x[rows[y == 0], 0, pos[y == 0], :] = level[y == 0, None]
    x[rows[y == 1], 0, :, pos[y == 1]] = level[y == 1, None]
    diagonal = x[y == 2]
    diagonal[:, 0][:, torch.eye(8, dtype=torch.bool)] = level[y == 2, None]
    x[y == 2] = diagonal
    return x, y


class TinyCNN(torch.nn.Module):
    """conv(1->4) -> ReLU -> maxpool -> fc1(64->8) -> ReLU -> dropout -> fc2(8->3)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.pool = torch.nn.MaxPool2d(2)
        self.fc1 = torch.nn.Linear(64, 8)
        self.drop = torch.nn.Dropout(0.2)
        self.fc2 = torch.nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pool(torch.relu(self.conv(x))).flatten(1)
        return self.fc2(self.drop(torch.relu(self.fc1(h))))


def train_bars(n_train: int = 600, n_test: int = 300):
    """A trained ``TinyCNN`` (eval mode) and bars data ``(model, x_train, y_train, x, y)``;
    the global RNG state is left untouched (about 1 s on one thread)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        generator = torch.Generator().manual_seed(0)
        x_train, y_train = make_bars(n_train, generator)
        x_test, y_test = make_bars(n_test, generator)
        model = TinyCNN()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(150):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x_train), y_train).backward()
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model.eval(), x_train, y_train, x_test, y_test


# --------------------------------------------------------------------------------------
# TF32 emulation on any device (appended by the kernels' tests, issue 16 item 6)
# --------------------------------------------------------------------------------------


def round_to_tf32(t: torch.Tensor) -> torch.Tensor:
    """``t`` (float32) rounded to TF32's 10-bit mantissa (nearest, ties away from zero),
    as tensor cores round their GEMM operands; other dtypes are returned unchanged."""
    if t.dtype != torch.float32:
        return t
    bits = t.contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32).view(t.shape)


class EmulateTF32(torch.overrides.TorchFunctionMode):
    """Inside ``with EmulateTF32():`` every float32 matrix product rounds its two factors to
    TF32 first and accumulates in float32, as a CUDA GEMM does with TF32 allowed. The
    accumulator of ``baddbmm``/``addmm`` is not rounded (cuBLAS keeps it in float32)."""

    _PRODUCTS = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm,
                 torch.Tensor.mm, torch.bmm, torch.Tensor.bmm}
    _ACCUMULATING = {torch.baddbmm, torch.Tensor.baddbmm, torch.Tensor.baddbmm_, torch.addmm,
                     torch.Tensor.addmm, torch.Tensor.addmm_}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self._PRODUCTS:
            args = (round_to_tf32(args[0]), round_to_tf32(args[1]), *args[2:])
        elif func is torch.Tensor.__rmatmul__:
            args = (round_to_tf32(args[0]), round_to_tf32(args[1]), *args[2:])
        elif func in self._ACCUMULATING:
            args = (args[0], round_to_tf32(args[1]), round_to_tf32(args[2]), *args[3:])
        return func(*args, **kwargs)


@pytest.fixture
def one_thread():
    """One intra-op thread (restored afterwards): on busy shared cores, OpenMP threads that spin
    waiting for each other make tiny models tens of times slower. Use it module-wide with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class PicklePayload:
    """Unpickling this creates ``path``: a stand-in for the arbitrary code a crafted pickle runs,
    for tests that a loader never unpickles (the file must not exist afterwards)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def pytest_collection_modifyitems(config, items):
    """Tests parametrised over the ``cuda`` device carry the ``gpu`` marker (``-m gpu`` selects
    them on a GPU machine: ``benchmarks/gpu_check.sh``)."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        values = callspec.params.values() if callspec else ()
        if any(str(v) == "cuda" or str(v).startswith("cuda:") for v in values):
            item.add_marker(pytest.mark.gpu)


#: ``status(field)``: a field of ``/proc/self/status`` in bytes (``VmRSS``, ``VmHWM``), for the
#: scripts :func:`run_peak_rss` runs (put in front of them).
PROC_STATUS = '''
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)
'''


def run_peak_rss(script, *args):
    """Run ``PROC_STATUS + script`` in a fresh Python (one thread) and return the JSON record
    of its last line. glibc's mmap threshold is fixed: its default rises after each freed
    large block, so freed batches then stay in a fragmented heap and a peak (VmHWM) wanders
    by tens of MB from run to run; with the threshold fixed, blocks are unmapped when freed."""
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, "-c", PROC_STATUS + script, *map(str, args)],
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])
