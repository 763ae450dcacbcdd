"""Chunking over samples under a memory budget (the one rule every kernel follows).

A kernel that materialises ``bytes_per_row`` bytes of intermediates per sample processes
its samples in chunks of :func:`chunk_rows` rows. The default budget depends on the
device: small on CPU (chunks that stay in cache are fastest), a share of the free memory
on CUDA with a minimum row count (large GEMMs).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

__all__ = [
    "CUDA_FREE_FRACTION",
    "DEFAULT_MEMORY_BUDGET",
    "MIN_CHUNK_ROWS",
    "MAX_PASS_BYTES",
    "MIN_PASS_ROWS",
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
# Chunks of the fused EM pass (CPU)
# --------------------------------------------------------------------------------------

#: Fewest rows per chunk of the fused pass on CPU by default: below this the GEMMs are
#: too thin to run near the matmul peak (workload b, full, K=3, D=512, G=10, idle, 2
#: threads: 58 rows 1.55 s per iteration, 128 to 8192 rows 1.23-1.35 s;
#: ``benchmarks/chunk_study.py``).
MIN_PASS_ROWS = 128

#: Most bytes of one chunk's buffers that :data:`MIN_PASS_ROWS` may ask for by default
#: (a chunk of 128 rows of ImageNet's 1000 classes would need gigabytes; then fewer rows).
MAX_PASS_BYTES = 64 * 2**20


def pass_rows(
    n_rows: int, bytes_per_row: int, memory_budget: int | None, device: torch.device | str = "cpu"
) -> int:
    """Rows per chunk of the fused EM pass (:func:`~._fused.em_pass`).

    An explicit ``memory_budget`` is honoured exactly, as in :func:`chunk_rows`. By
    default, on CPU the chunk's buffers (``bytes_per_row`` per row) fill the default budget
    (8 MiB), with at least :data:`MIN_PASS_ROWS` rows while those stay within
    :data:`MAX_PASS_BYTES`; on other devices :func:`chunk_rows`'s rule. Measured idle on 2
    cores (``benchmarks/chunk_study.py``): chunks sized to the 512 KiB-1 MiB L2 cache (the
    former rule) were up to 2.6x slower on d-diag (907 rows: 1.25 s per iteration, 8192
    rows: 0.47 s): every chunk costs a dozen tensor operations, and below a few thousand
    rows their fixed cost, not the cache, dominates.
    """
    device = torch.device(device)
    if memory_budget is not None or device.type != "cpu":
        return chunk_rows(n_rows, bytes_per_row, memory_budget, device)
    per_row = max(1, bytes_per_row)
    rows = default_memory_budget(device) // per_row
    rows = max(rows, min(MIN_PASS_ROWS, MAX_PASS_BYTES // per_row))
    return max(1, min(n_rows, rows))
