"""Benchmark harness: batched EM against scikit-learn (and torchgmm) on the same data.

``idefender-gpu bench`` (:mod:`idefender_gpu.bench.cli`) runs :func:`run_workload` on the
named shapes of :data:`WORKLOADS` (a, b, c1, c2, d-diag, d-full): each of our backends and the
references (scikit-learn on NumPy, scikit-learn's array-API mode on torch tensors, torchgmm
where installed) from the same data and, except torchgmm, the same explicit initialisation:

* seconds per EM iteration, ``(min T(1 + iters) - min T(1)) / iters`` over ``repeats``
  (initialisation and validation cancel out), CUDA synchronised before every clock read;
* one fit to ``tol`` (iterations, convergence, final mean log-likelihood, peak memory);
* FLOP/s (:data:`FLOP_FORMULAS`) against the dense float32 matmul rate of the same device in
  the same run (:func:`matmul_probe`, which records whether TF32 was on);
* a time limit per implementation and phase that turns over-long phases into estimates, and
  an up-front memory estimate that skips a reference whose copies would not fit
  (:func:`reference_skip`).

Modules, in import order (each imports only those before it): :mod:`.workloads` (shapes,
FLOP counts, synthetic data), :mod:`.timing` (clocks, matmul probe, machine),
:mod:`.references` (the implementations), :mod:`.run` (one workload run, JSON record),
:mod:`.detector_workloads` (IDefender's streamed fit and scoring at ImageNet scale, and the
detector's overhead over the classifier's forward; imports only :mod:`.timing` of these),
:mod:`.report` (markdown tables; imports nothing of the harness), :mod:`.cli` (the
subcommand). Importing this package writes no environment variable: scikit-learn's array-API
mode needs ``SCIPY_ARRAY_API=1`` before SciPy is imported, which the command sets (restarting
itself if SciPy was already loaded).
"""

from idefender_gpu._lazy import lazy_exports

# Public names resolved on first use (PEP 562): ``idefender-gpu`` builds its parser from
# :mod:`.cli` without importing torch, NumPy or SciPy (before ``SCIPY_ARRAY_API`` is set).
_LAZY = {
    **dict.fromkeys(("REFERENCES", "TORCHGMM_INSTALL", "reference_memory_estimate",
                     "reference_skip"), "idefender_gpu.bench.references"),
    **dict.fromkeys(("backend_row", "format_backend_table", "format_detector_table",
                     "format_distributed_table",
                     "format_records", "format_summary", "format_table",
                     "format_workload_table", "load_records"), "idefender_gpu.bench.report"),
    "run_workload": "idefender_gpu.bench.run",
    **dict.fromkeys(("DETECTOR_WORKLOADS", "DetectorWorkload", "run_detector_workload",
                     "scaled_detector_workload"), "idefender_gpu.bench.detector_workloads"),
    **dict.fromkeys(("available_memory_bytes", "machine_info", "matmul_probe", "matmul_rate",
                     "sync"), "idefender_gpu.bench.timing"),
    **dict.fromkeys(("FLOP_FORMULAS", "WORKLOADS", "Workload", "em_data", "em_data_torch",
                     "flops_per_iteration", "precisions_init", "scaled_workload"),
                    "idefender_gpu.bench.workloads"),
}


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())


__all__ = [
    "DETECTOR_WORKLOADS",
    "DetectorWorkload",
    "FLOP_FORMULAS",
    "REFERENCES",
    "TORCHGMM_INSTALL",
    "WORKLOADS",
    "Workload",
    "available_memory_bytes",
    "backend_row",
    "em_data",
    "em_data_torch",
    "flops_per_iteration",
    "format_backend_table",
    "format_detector_table",
    "format_distributed_table",
    "format_records",
    "format_summary",
    "format_table",
    "format_workload_table",
    "load_records",
    "machine_info",
    "matmul_probe",
    "matmul_rate",
    "precisions_init",
    "reference_memory_estimate",
    "reference_skip",
    "run_detector_workload",
    "run_workload",
    "scaled_detector_workload",
    "scaled_workload",
    "sync",
]
