"""Markdown tables of benchmark records (README's benchmark tables are made here).

:func:`format_records` renders every kind of record: named workloads (``em_workload``,
:func:`~idefender_gpu.bench.run.run_workload`), detector workloads (``detector_workload``,
:func:`~idefender_gpu.bench.detector_workloads.run_detector_workload`), backend grids (``em_backends``,
``benchmarks/bench_backends.py``) and the fixed-iteration records of earlier versions
(``em_full_fixed_iterations``). :func:`load_records` reads a folder of them. Imports nothing
of the harness.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = [
    "RECORD_PATTERNS",
    "backend_row",
    "format_backend_table",
    "format_detector_table",
    "format_distributed_table",
    "format_records",
    "format_summary",
    "format_table",
    "format_workload_table",
    "load_records",
]

#: The JSON files of a results folder that :func:`load_records` reads, in table order.
RECORD_PATTERNS = ("em_*.json", "workload_*.json", "detector_*.json", "backends_*.json",
                   "distributed_*.json")


def load_records(folder: str | Path) -> list[dict[str, Any]]:
    """Every benchmark record in ``folder`` (:data:`RECORD_PATTERNS`, sorted by name)."""
    folder = Path(folder)
    return [json.loads(path.read_text()) for pattern in RECORD_PATTERNS
            for path in sorted(folder.glob(pattern))]


def format_table(records: list[dict[str, Any]]) -> str:
    """Markdown table of fixed-iteration records (``em_full_fixed_iterations``, written by
    earlier versions of ``idefender-gpu bench``): one row per implementation."""
    lines = [
        "| machine | workload | implementation | s / EM iteration | GFLOP/s | % of matmul peak | speed-up of ours |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for record in records:
        w = record["workload"]
        m = record["machine"]
        where = m.get("gpu") or f"{m['cpu']} ({m['torch_threads']} threads)"
        shape = f"{w['n_samples']}x{w['n_features']}, G={w['n_groups']}, K={w['n_components']}, {w['covariance_type']}, {w['dtype']}"
        ours = record["results"]["idefender_gpu"]["sec_per_iter"]
        for name, entry in record["results"].items():
            if "sec_per_iter" not in entry:
                lines.append(f"| {where} | {shape} | {name} | skipped: {entry.get('skipped', '')} | | | |")
                continue
            if name == "idefender_gpu":
                speedup = "1.0"
            else:
                speedup = f"{entry['sec_per_iter'] / ours:.1f}x" if ours > 0 else ""
            gflops = f"{entry['gflops']:.1f}" if "gflops" in entry else ""
            peak = f"{100 * entry['fraction_of_matmul_peak']:.0f}%" if "gflops" in entry else ""
            lines.append(
                f"| {where} | {shape} | {name} | {entry['sec_per_iter']:.4f} | {gflops} | "
                f"{peak} | {speedup} |"
            )
    return "\n".join(lines)


def _bytes(n: float | None) -> str:
    return "" if n is None else f"{n / 2**30:.2f} GiB"


def format_workload_table(records: list[dict[str, Any]]) -> str:
    """Markdown table of named-workload records (one row per implementation)."""
    lines = [
        "| workload | machine | implementation | s / EM iteration | fit to tol: s (iterations, "
        "converged) | final mean log-lik. | peak memory | GFLOP/s | % of matmul peak | "
        "speed-up of ours |",
        "|---|---|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for record in records:
        w, m = record["workload"], record["machine"]
        where = m.get("gpu") or f"{m['cpu']} ({m['torch_threads']} threads)"
        shape = (f"{w['name']}: {w['n_samples']}x{w['n_features']}, G={w['n_groups']}, "
                 f"K={w['n_components']}, {w['covariance_type']}")
        if "skipped" in record:
            lines.append(f"| {shape} | {where} | - | skipped: {record['skipped']} | | | | | | |")
            continue
        ours = record["ratios"].get("ours")
        for name, entry in record["results"].items():
            if "sec_per_iter" not in entry:
                reason = entry.get("skipped") or entry.get("error", "")
                lines.append(f"| {shape} | {where} | {name} | {reason} | | | | | | |")
                continue
            fit = entry.get("fit", {})
            if "seconds" in fit:
                capped = ""
                if fit.get("max_iter_capped_by_time_limit") and fit["n_iter_max"] >= fit["max_iter"]:
                    capped = f", stopped at max_iter={fit['max_iter']} by the time limit"
                conv = "yes" if fit["converged"] else f"{100 * fit['converged_fraction']:.0f}%"
                fit_cell = f"{fit['seconds']:.1f} ({fit['n_iter_max']}, {conv}{capped})"
                ll = f"{fit['final_mean_log_likelihood']:.4f}"
                mem = _bytes(fit.get("peak_memory_bytes"))
            else:
                fit_cell, ll, mem = fit.get("skipped", entry.get("error", "")), "", ""
            if name == ours:
                speedup = "1.0"
            else:
                ratio = record["ratios"].get(f"speedup_vs_{name}")
                speedup = "" if ratio is None else f"{ratio:.2g}x"
            gflops = f"{entry['gflops']:.1f}" if "gflops" in entry else ""
            peak = f"{100 * entry['fraction_of_matmul_peak']:.1f}%" if "gflops" in entry else ""
            lines.append(
                f"| {shape} | {where} | {name} | {entry['sec_per_iter']:.4f} | {fit_cell} | {ll} | "
                f"{mem} | {gflops} | {peak} | {speedup} |"
            )
    return "\n".join(lines)


def _where(machine: dict[str, Any]) -> str:
    return machine.get("gpu") or f"{machine['cpu']} ({machine['torch_threads']} threads)"


def _phase_cell(phase: dict[str, Any] | None, rate: float | None) -> str:
    """``seconds (GFLOP/s, % of the matmul rate)`` of one phase of a detector fit."""
    if not phase:
        return ""
    text = f"{phase['seconds']:.1f}"
    if phase.get("gflops"):
        text += f" ({phase['gflops']:.0f} GFLOP/s"
        text += f", {100 * phase['gflops'] / rate:.0f}%)" if rate else ")"
    return text


def format_detector_table(records: list[dict[str, Any]]) -> str:
    """Markdown tables of detector workloads (``detector_workload``,
    :func:`~idefender_gpu.bench.detector_workloads.run_detector_workload`): one row per fit
    variant (seconds per phase, peak RSS, quality), or per model of detector-overhead."""
    fits = [r for r in records if r["workload"]["kind"] == "fit"]
    overheads = [r for r in records if r["workload"]["kind"] != "fit"]
    parts = []
    if fits:
        lines = [
            "| workload | machine | order / covariance | moments pass s | parameters s | thresholds pass s "
            "| scoring s | total s (data generation) | peak RSS | finite | natural reject | wrong-class AUC |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|",
        ]
        for record in fits:
            w = record["workload"]
            shape = (f"{w['name']}: {w['n_train']}x{w['n_features']}, {w['n_classes']} classes, "
                     f"{w['n_test']} held out, batch {w['batch_size']}")
            rate = record.get("matmul_probe", {}).get("gflops")
            for name, r in record["results"].items():
                if "error" in r:
                    lines.append(f"| {shape} | {_where(record['machine'])} | {name} | {r['error'][:200]} "
                                 "| | | | | | | | |")
                    continue
                p, q = r["phases"], r["quality"]
                generation = sum(phase.get("data_generation_seconds", 0.0) for phase in p.values())
                auc = f"{q['auc_wrong_class']:.4f}" if "auc_wrong_class" in q else ""
                lines.append(
                    f"| {shape} | {_where(record['machine'])} | {name} | {_phase_cell(p.get('moments_pass'), rate)} "
                    f"| {_phase_cell(p.get('parameters'), rate)} | {_phase_cell(p.get('thresholds_pass'), rate)} "
                    f"| {_phase_cell(p.get('scoring'), rate)} | {r['total_seconds']:.1f} ({generation:.1f}) "
                    f"| {_bytes(r.get('peak_rss_bytes'))} | {'yes' if r['all_finite'] else 'NO'} "
                    f"| {100 * q['natural_reject_rate']:.1f}% | {auc} |")
        parts.append("\n".join(lines))
    if overheads:
        lines = ["| workload | machine | model | batch | model(x) s | detector.score(x) s | overhead |",
                 "|---|---|---|---:|---:|---:|---:|"]
        for record in overheads:
            for name, r in record["results"].items():
                if "forward_seconds" not in r:
                    reason = r.get("skipped") or r.get("error", "")
                    lines.append(f"| {record['workload']['name']} | {_where(record['machine'])} | {name} "
                                 f"| {reason[:200]} | | | |")
                    continue
                lines.append(
                    f"| {record['workload']['name']} | {_where(record['machine'])} | {name} "
                    f"({r['n_features']} features, {r['n_classes']} classes) | {r['batch']} "
                    f"| {r['forward_seconds']:.4f} | {r['score_seconds']:.4f} "
                    f"| {100 * r['overhead_fraction']:.1f}% |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def _detector_summary(record: dict[str, Any]) -> list[str]:
    """One line per variant (or model) of a detector record (the GPU check's summary)."""
    w = record["workload"]
    head = f"{w['name']} ({w['n_train']}x{w['n_features']}, {w['n_classes']} classes)"
    lines = []
    for name, r in record["results"].items():
        if "total_seconds" in r:
            p = r["phases"]
            lines.append(f"{head} {name}: {r['total_seconds']:.1f} s (moments {p['moments_pass']['seconds']:.1f}, "
                         f"parameters {p['parameters']['seconds']:.1f}, thresholds "
                         f"{p['thresholds_pass']['seconds']:.1f}, scoring {p['scoring']['seconds']:.1f}), "
                         f"peak RSS {_bytes(r.get('peak_rss_bytes'))}"
                         + (f", device peak {_bytes(r['cuda_max_memory_allocated_bytes'])}"
                            if "cuda_max_memory_allocated_bytes" in r else "")
                         + f", finite: {r['all_finite']}")
        elif "forward_seconds" in r:
            lines.append(f"{head} {name}: score {r['score_seconds']:.4f} s, forward {r['forward_seconds']:.4f} s, "
                         f"overhead {100 * r['overhead_fraction']:.1f}%")
        else:
            lines.append(f"{head} {name}: {r.get('skipped') or r.get('error', '')}")
    return lines


def _backend_cell(entry: dict[str, Any]) -> str:
    if "sec_per_iter" not in entry:
        return "error"
    mark = ""
    if entry.get("extrapolated"):
        mark = " (extrap.)"
    elif "T(0)" in entry.get("method", ""):
        mark = " (1 sample)"
    return f"{entry['sec_per_iter']:.4f}{mark}"


def backend_row(row: dict[str, Any]) -> str:
    """One markdown row of the backend grid: ctype, D, K, N, dense, keops, winner, ratio."""
    winner = row.get("winner", "-")
    ratio = f"{row['ratio_dense_over_keops']:.2f}" if "ratio_dense_over_keops" in row else "-"
    return (f"| {row['covariance_type']} | {row['n_features']} | {row['n_components']} | "
            f"{row['n_samples']} | {_backend_cell(row['torch'])} | {_backend_cell(row['keops'])} | "
            f"{winner} | {ratio} |")


def format_backend_table(record: dict[str, Any]) -> str:
    """Markdown table of a backend-grid record (``benchmarks/bench_backends.py``)."""
    m = record["machine"]
    where = m.get("gpu") or f"{m['cpu']} ({m['torch_threads']} threads)"
    lines = [
        f"Backends on {where}, float32, G=1: seconds per EM iteration; ratio = dense / KeOps "
        "(above 1: KeOps faster)",
        "",
        "| ctype | D | K | N | dense s/it | keops s/it | winner | ratio dense/keops |",
        "|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    lines += [backend_row(row) for row in record["rows"]]
    return "\n".join(lines)


def format_distributed_table(record: dict[str, Any]) -> str:
    """Markdown table of a data-parallel record (``benchmarks/bench_distributed.py``)."""
    w = record["workload"]
    lines = [
        f"{record['benchmark']}: N={w['N']}, D={w['D']}, K={w['K']}, G={w['G']}, "
        f"{w['covariance_type']}, {w['dtype']}, {w['em_iterations']} EM iterations, best of "
        f"{w['rounds']} rounds",
        "",
        "| run | processes | threads each | best s | s / EM iteration | CPU s / rank / iteration |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for row in record["results"]:
        cpu = ", ".join(f"{c:.3f}" for c in row["cpu_seconds_per_rank_per_iteration_in_best_round"])
        lines.append(f"| {row['name']} | {row['world']} | {row['threads']} | "
                     f"{row['best_seconds']:.2f} | {row['seconds_per_iteration']:.4f} | {cpu} |")
    return "\n".join(lines)


def format_records(records: list[dict[str, Any]]) -> str:
    """Every kind of benchmark record as markdown: the fixed-iteration table
    (:func:`format_table`), the named workloads, the detector workloads, the backend grids
    and the data-parallel runs."""
    parts = []
    legacy = [r for r in records if r.get("benchmark") == "em_full_fixed_iterations"]
    workloads = [r for r in records if r.get("benchmark") == "em_workload"]
    if legacy:
        parts.append(format_table(legacy))
    if workloads:
        parts.append(format_workload_table(workloads))
    detectors = [r for r in records if r.get("benchmark") == "detector_workload"]
    if detectors:
        parts.append(format_detector_table(detectors))
    parts += [format_backend_table(r) for r in records if r.get("benchmark") == "em_backends"]
    parts += [format_distributed_table(r) for r in records
              if str(r.get("benchmark", "")).startswith("data-parallel EM")]
    return "\n\n".join(parts)


def format_summary(records: list[dict[str, Any]]) -> str:
    """One line per implementation of each workload record (the GPU check's summary):
    seconds per iteration, share of the device's matmul rate (and whether that rate was
    TF32), the fit to tol, or why it was skipped."""
    lines = []
    for record in records:
        if record.get("benchmark") == "detector_workload":
            lines += _detector_summary(record)
            continue
        if record.get("benchmark") != "em_workload":
            continue
        w = record["workload"]
        head = (f"{w['name']} ({w['n_samples']}x{w['n_features']}, G={w['n_groups']}, "
                f"K={w['n_components']}, {w['covariance_type']})")
        if "skipped" in record:
            lines.append(f"{head}: skipped: {record['skipped']}")
            continue
        probes = record.get("matmul_probe", {})
        for name, entry in record["results"].items():
            where = entry.get("device", "")
            if "sec_per_iter" not in entry:
                reason = entry.get("skipped") or entry.get("error", "")
                lines.append(f"{head} {name}: {reason}")
                continue
            text = f"{head} {name} on {where}: {entry['sec_per_iter']:.4g} s/iteration"
            if "fraction_of_matmul_peak" in entry:
                probe = probes.get(where.split(":")[0], {})
                tf32 = " TF32" if probe.get("tf32_on") else " FP32"
                text += (f", {entry['gflops']:.0f} GFLOP/s = "
                         f"{100 * entry['fraction_of_matmul_peak']:.0f}% of the{tf32} matmul rate")
            fit = entry.get("fit", {})
            if "seconds" in fit:
                text += (f"; fit {fit['seconds']:.2f} s ({fit['n_iter_max']} iterations, "
                         f"{'converged' if fit['converged'] else 'not converged'}, "
                         f"peak {_bytes(fit.get('peak_memory_bytes'))})")
            elif fit:
                text += f"; fit {fit.get('skipped', '')}"
            lines.append(text)
    return "\n".join(lines)
