"""Clocks, the matmul-peak probe, memory available and the machine description.

Every clock read is preceded by :func:`sync` (``torch.cuda.synchronize`` on CUDA), so an
interval covers the device work it times. Imports only torch.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Any, Callable

import torch

__all__ = [
    "available_memory_bytes",
    "clock",
    "machine_info",
    "matmul_probe",
    "matmul_rate",
    "sync",
    "tf32_state",
]

#: Thread-count variables of the BLAS and OpenMP runtimes (read when those libraries load).
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")

#: Square size and products per clock interval of :func:`matmul_probe`, per device type.
#: On a GPU one 2048^3 product takes ~0.3 ms on an H100, too short against launch and sync
#: overheads; 8192^3 x 8 is ~9 TFLOP per interval (~0.15 s at the FP32 rate).
PROBE_SHAPES = {"cuda": (8192, 8), "cpu": (2048, 2)}


def sync(device: torch.device) -> None:
    """``torch.cuda.synchronize`` on CUDA devices, nothing elsewhere (before reading clocks)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """Seconds ``fn()`` takes on ``device`` (synchronised before and after), and its result."""
    sync(device)
    t0 = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - t0, result


def tf32_state() -> dict[str, Any]:
    """Whether float32 matmuls may use TF32 (or lower) on CUDA: the flags that decide it."""
    precision = torch.get_float32_matmul_precision()
    allow = bool(torch.backends.cuda.matmul.allow_tf32)
    return {"cuda_matmul_allow_tf32": allow, "float32_matmul_precision": precision,
            "tf32_on": allow or precision != "highest"}


def matmul_probe(device: torch.device | str, size: int | None = None,
                 products: int | None = None, repeats: int = 5) -> dict[str, Any]:
    """Dense float32 matmul rate of ``device``, measured now.

    ``products`` square ``size`` x ``size`` products run back to back between two
    synchronisations; the rate is that interval's flops over the best of ``repeats``
    intervals (after one warm-up product). Defaults per device type:
    :data:`PROBE_SHAPES`.

    Returns
    -------
    dict
        ``gflops``, ``size``, ``products_per_sync``, ``repeats``, ``dtype`` and
        :func:`tf32_state` (``tf32_on``: the rate is the TF32 rate, not the FP32 one).
    """
    device = torch.device(device)
    default_size, default_products = PROBE_SHAPES.get(device.type, PROBE_SHAPES["cpu"])
    size, products = size or default_size, products or default_products
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    out = torch.empty(size, size, device=device)
    torch.matmul(a, b, out=out)  # warm-up (cuBLAS handles, BLAS threads)

    def run() -> None:
        for _ in range(products):
            torch.matmul(a, b, out=out)

    best = min(clock(run, device)[0] for _ in range(repeats))
    info = {"gflops": 2.0 * size**3 * products / best / 1e9, "size": size,
            "products_per_sync": products, "repeats": repeats, "dtype": "float32"}
    if device.type == "cuda":
        info.update(tf32_state())
    else:
        info["tf32_on"] = False
    return info


def matmul_rate(device: torch.device | str, **kwargs: Any) -> float:
    """Dense float32 matmul FLOP/s of ``device`` (:func:`matmul_probe`'s rate)."""
    return matmul_probe(device, **kwargs)["gflops"] * 1e9


def available_memory_bytes(device: torch.device | str) -> int:
    """Memory a new allocation can take now: free device memory on CUDA
    (``torch.cuda.mem_get_info``), else the host's ``MemAvailable`` (``/proc/meminfo``;
    physical memory where that is unreadable)."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def machine_info(device: torch.device | str) -> dict[str, Any]:
    """CPU model, core and thread counts, library versions and the device (JSON-able)."""
    device = torch.device(device)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    threads = {v: os.environ[v] for v in THREAD_VARIABLES if v in os.environ}
    if threads:
        info["thread_environment"] = threads
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info.update(tf32_state())
    try:
        import sklearn

        info["sklearn"] = sklearn.__version__
    except ImportError:
        pass
    return info
