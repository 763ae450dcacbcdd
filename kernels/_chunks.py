"""Chunking over samples under a memory budget (the one rule every kernel follows).

A kernel that materialises ``bytes_per_row`` bytes of intermediates per sample processes
its samples in chunks of :func:`chunk_rows` rows. The default budget depends on the
device: small on CPU (chunks that stay in cache are fastest), a share of the free memory
on CUDA with a minimum row count (large GEMMs).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path

import torch

__all__ = [
    "CACHE_SHARE",
    "CUDA_FREE_FRACTION",
    "DEFAULT_CACHE_BYTES",
    "DEFAULT_MEMORY_BUDGET",
    "MIN_CHUNK_ROWS",
    "MIN_PASS_ROWS",
    "cache_bytes",
    "chunk_rows",
    "default_memory_budget",
    "pass_rows",
]

#: Default bound, in bytes, on the intermediates of one chunk, per device type. On CPU
#: chunks that stay in cache are fastest (``benchmarks/bench_chunks.py`` measures it); on
#: a GPU larger chunks keep the GEMMs large. For CUDA this is the floor of a budget derived
#: from the free device memory (:data:`CUDA_FREE_FRACTION`).
DEFAULT_MEMORY_BUDGET = {"cpu": 8 * 2**20, "cuda": 512 * 2**20}

#: Share of the device memory that is free (to the driver, or cached but unused by
#: PyTorch's allocator) that one CUDA chunk may use by default.
CUDA_FREE_FRACTION = 0.25

#: Fewest rows per chunk under the default budget, per device type. With many groups on
#: a GPU (1000 ImageNet classes) the byte budget alone gives chunks of a few rows, and
#: every chunk re-reads every precision factor (memory-bound GEMMs); 128 rows keep the
#: GEMMs compute-bound. An explicit ``memory_budget`` is always honoured exactly.
MIN_CHUNK_ROWS = {"cuda": 128}


def default_memory_budget(device: torch.device | str) -> int:
    """The default chunk budget in bytes for ``device`` (64 MiB for unknown types).

    CUDA: ``max(512 MiB, CUDA_FREE_FRACTION * available)`` with ``available`` the free
    device memory plus what PyTorch's caching allocator holds unused
    (``torch.cuda.mem_get_info``, called for CUDA devices only).
    """
    device = torch.device(device)
    budget = DEFAULT_MEMORY_BUDGET.get(device.type, 64 * 2**20)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        budget = max(budget, int(CUDA_FREE_FRACTION * (free + cached)))
    return budget


def chunk_rows(
    n_rows: int, bytes_per_row: int, memory_budget: int | None, device: torch.device | str = "cpu"
) -> int:
    """Rows per chunk so that ``rows * bytes_per_row <= memory_budget`` (at least one).

    ``memory_budget=None`` uses :func:`default_memory_budget` of ``device`` and at least
    :data:`MIN_CHUNK_ROWS` rows of that device type (never more than ``n_rows``).
    """
    min_rows = 1
    if memory_budget is None:
        device = torch.device(device)
        budget = default_memory_budget(device)
        min_rows = MIN_CHUNK_ROWS.get(device.type, 1)
    else:
        budget = int(memory_budget)
    return max(1, min(n_rows, max(min_rows, budget // max(1, bytes_per_row))))


def _chunks(n_rows: int, rows: int) -> Iterator[slice]:
    """Consecutive slices of at most ``rows`` of ``range(n_rows)``."""
    for start in range(0, n_rows, rows):
        yield slice(start, min(start + rows, n_rows))


# --------------------------------------------------------------------------------------
# Chunks of the fused EM pass: sized to the cache (CPU)
# --------------------------------------------------------------------------------------

#: Cache bytes assumed where ``/sys/devices/system/cpu/cpu0/cache`` is not readable.
DEFAULT_CACHE_BYTES = 1 * 2**20

#: Share of :func:`cache_bytes` that one chunk's working set of the fused pass fills on
#: CPU. Measured (``benchmarks/chunk_study.py``, 1 thread, loaded 2-core EPYC, 1 MiB L2):
#: d-diag (K=256, D=16, diag) ran fastest at about 1000 rows (1.2 MB of buffers), 20%
#: slower at 256 or 4096 rows, 2x slower at 64; the old unfused path took 5.7x as long.
CACHE_SHARE = 1.0

#: Fewest rows per chunk of the fused pass on CPU by default: below this the GEMMs are
#: too thin to run near the matmul peak (workload a, full, K=5, D=128, G=10: 128 rows
#: 25% faster than 64, 2.6x faster than 32; ``benchmarks/chunk_study.py``).
MIN_PASS_ROWS = 128

_SIZE_SUFFIX = {"K": 2**10, "M": 2**20, "G": 2**30}


def _parse_size(text: str) -> int:
    """``'1024K'`` -> 1048576 (the format of sysfs cache sizes)."""
    text = text.strip()
    if text and text[-1].upper() in _SIZE_SUFFIX:
        return int(text[:-1]) * _SIZE_SUFFIX[text[-1].upper()]
    return int(text)


def _n_cpus(cpu_list: str) -> int:
    """Number of CPUs in a sysfs list such as ``'0-3,8'``."""
    total = 0
    for part in cpu_list.split(","):
        first, _, last = part.partition("-")
        if first:
            total += int(last or first) - int(first) + 1
    return max(1, total)


@functools.lru_cache(maxsize=None)
def cache_bytes(root: str = "/sys/devices/system/cpu/cpu0/cache") -> int:
    """Bytes of the largest data cache private to one core (L2 on current x86 and ARM
    servers), read once from sysfs; where no cache is private, the largest share per
    core of a shared one; :data:`DEFAULT_CACHE_BYTES` where sysfs has no answer."""
    private, shares = [], []
    for index in sorted(Path(root).glob("index*")):
        try:
            if (index / "type").read_text().strip() == "Instruction":
                continue
            size = _parse_size((index / "size").read_text())
            n_sharing = _n_cpus((index / "shared_cpu_list").read_text().strip())
        except (OSError, ValueError):
            continue
        (private if n_sharing == 1 else shares).append(size // n_sharing)
    return max(private or shares or [DEFAULT_CACHE_BYTES])


def pass_rows(
    n_rows: int, bytes_per_row: int, memory_budget: int | None, device: torch.device | str = "cpu"
) -> int:
    """Rows per chunk of the fused EM pass (:func:`~._fused.em_pass`).

    An explicit ``memory_budget`` is honoured exactly, as in :func:`chunk_rows`. By
    default, on CPU the chunk's working set (``bytes_per_row`` per row) fills
    :data:`CACHE_SHARE` of :func:`cache_bytes`, with at least :data:`MIN_PASS_ROWS` rows,
    and never more than the default budget; on other devices :func:`chunk_rows`'s rule.
    """
    device = torch.device(device)
    if memory_budget is not None or device.type != "cpu":
        return chunk_rows(n_rows, bytes_per_row, memory_budget, device)
    per_row = max(1, bytes_per_row)
    rows = max(MIN_PASS_ROWS, int(CACHE_SHARE * cache_bytes()) // per_row)
    rows = min(rows, max(1, default_memory_budget(device) // per_row))
    return max(1, min(n_rows, rows))
