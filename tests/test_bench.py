"""The benchmark harness (``idefender_gpu.bench``) and ``idefender-gpu bench``: machinery only.

Tiny shapes; nothing here is a timing (the harness's clocks run, their values are not
asserted beyond being finite and non-negative).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "benchmarks" / "results"


def _bench_parser() -> argparse.ArgumentParser:
    from idefender_gpu.bench.cli import register

    parser = argparse.ArgumentParser(prog="idefender-gpu")
    register(parser.add_subparsers(dest="command", required=True))
    return parser


# ---------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_bench_command_end_to_end_on_a_tiny_shape(tmp_path):
    """``idefender-gpu bench`` with its default ``--out``: a fresh ``results/bench-*`` folder
    of the working directory (never ``benchmarks/results``), the JSON record (timing, fit to
    tol in a subprocess, FLOP count, blocks of groups, both scikit-learn references, the
    array-API one with ``SCIPY_ARRAY_API`` set by the command itself) and the table."""
    env = {k: v for k, v in os.environ.items() if k != "SCIPY_ARRAY_API"}
    cmd = [sys.executable, "-m", "idefender_gpu.cli", "bench", "--n", "600", "--d", "4",
           "--groups", "3", "--k", "2", "--iters", "2", "--repeats", "1", "--device", "cpu",
           "--group-block", "2", "--references", "sklearn_numpy,sklearn_array_api",
           "--threads", "1"]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    folders = list((tmp_path / "results").glob("bench-*"))
    assert len(folders) == 1 and not (tmp_path / "benchmarks").exists()
    record = json.loads((folders[0] / "workload_a_cpu.json").read_text())
    assert record["benchmark"] == "em_workload"
    w = record["workload"]
    assert (w["name"], w["n_samples"], w["n_features"], w["n_groups"], w["n_components"]) == (
        "a", 600, 4, 3, 2)
    assert record["flops_per_iteration"] == 4 * 600 * 2 * 4**2
    assert record["machine"]["thread_environment"]["OMP_NUM_THREADS"] == "1"
    probe = record["matmul_probe"]["cpu"]
    assert probe["gflops"] > 0 and probe["products_per_sync"] >= 2 and probe["tf32_on"] is False
    results = record["results"]
    assert set(results) == {"idefender_gpu[torch]", "sklearn_numpy", "sklearn_array_api"}
    for entry in results.values():
        assert entry["sec_per_iter"] >= 0, entry
        fit = entry["fit"]
        assert fit["seconds"] > 0 and fit["tol"] == 1e-3 and fit["max_iter"] == 100
        # Three well-separated blobs per group: every implementation converges well before
        # max_iter from the shared initialisation.
        assert fit["converged"] is True and len(fit["n_iter"]) == 3 and fit["n_iter_max"] < 100
        assert fit["peak_memory_bytes"] > 0 and "RSS" in fit["peak_memory_kind"]
    assert results["idefender_gpu[torch]"]["group_block"] == 2
    ours = results["idefender_gpu[torch]"]["fit"]
    for name in ("sklearn_numpy", "sklearn_array_api"):
        ref = results[name]["fit"]
        # Same data, same initialisation, same tol: the same iterations and log-likelihoods.
        assert ours["n_iter"] == ref["n_iter"], name
        np.testing.assert_allclose(ours["final_mean_log_likelihood_per_group"],
                                   ref["final_mean_log_likelihood_per_group"], rtol=1e-4)
    assert "| a: 600x4, G=3, K=2, full |" in done.stdout
    assert f"wrote {Path('results') / folders[0].name / 'workload_a_cpu.json'}" in done.stdout
    table = subprocess.run(cmd[:4] + ["--table", "--out", str(folders[0])], env=env,
                           capture_output=True, text=True, timeout=120)
    assert table.returncode == 0, table.stderr
    assert "| idefender_gpu[torch] |" in table.stdout
    assert table.stdout.count("| a: 600x4, G=3, K=2, full |") == 3


def test_gpu_only_workload_is_recorded_as_skipped_on_cpu(tmp_path):
    from idefender_gpu.bench.run import run_workload

    record = run_workload("c1", device="cpu")
    assert record["workload"]["n_samples"] == 1_281_167 and record["workload"]["n_features"] == 4096
    assert record["workload"]["n_groups"] == 1000 and record["workload"]["n_components"] == 1
    assert "GPU-only" in record["skipped"] and "results" not in record


# ---------------------------------------------------------------------------------------
# The command's options
# ---------------------------------------------------------------------------------------


def test_default_out_is_a_fresh_folder_never_the_committed_results(tmp_path, monkeypatch):
    from idefender_gpu.bench import cli

    args = _bench_parser().parse_args(["bench"])
    assert args.out is None and args.workload == "a"
    out = cli.default_out()
    assert out.parts[0] == "results" and out.name.startswith("bench-") and out.name.endswith("Z")
    assert out.resolve() != (Path.cwd() / cli.COMMITTED_RESULTS).resolve()
    monkeypatch.chdir(tmp_path)
    first, second = cli._fresh(out), cli._fresh(out)
    assert first != second and first.is_dir() and second.is_dir()
    assert second.name == f"{out.name}-2"


def test_every_option_has_help_and_the_default_out_is_shown():
    parser = _bench_parser()
    bench = parser._subparsers._group_actions[0].choices["bench"]
    for action in bench._actions:
        assert action.help and action.help != argparse.SUPPRESS, action.dest
    text = bench.format_help()
    assert "results/bench-<UTC time>/" in text and "benchmarks/results" in text
    assert bench.description


def test_workload_choices_are_the_workloads():
    from idefender_gpu.bench.cli import DETECTOR_WORKLOAD_CHOICES, WORKLOAD_CHOICES
    from idefender_gpu.bench.detector_workloads import DETECTOR_WORKLOADS
    from idefender_gpu.bench.workloads import WORKLOADS

    assert WORKLOAD_CHOICES == (*WORKLOADS, "all", *DETECTOR_WORKLOADS)
    assert DETECTOR_WORKLOAD_CHOICES == tuple(DETECTOR_WORKLOADS)


def test_bad_option_values_are_rejected(capsys):
    parser = _bench_parser()
    for argv in (["--n", "0"], ["--tol", "nan"], ["--limit-min", "-1"], ["--workload", "z"]):
        with pytest.raises(SystemExit) as info:
            parser.parse_args(["bench", *argv])
        assert info.value.code == 2
        assert argv[0] in capsys.readouterr().err


def test_unusable_device_is_refused_before_any_work(capsys):
    import torch

    from idefender_gpu.bench import cli

    assert cli._device_problem(None) is None and cli._device_problem("cpu") is None
    assert "not a torch device" in cli._device_problem("gpu0")
    if torch.cuda.is_available():
        assert "CUDA device(s)" in cli._device_problem("cuda:99")
    else:
        assert "CUDA is not available" in cli._device_problem("cuda")
    args = _bench_parser().parse_args(["bench", "--device", "nope", "--no-array-api"])
    with pytest.raises(ValueError, match="argument --device: not a torch device: 'nope'"):
        args.func(args)
    from idefender_gpu.cli import main

    assert main(["bench", "--device", "nope", "--no-array-api"]) == 2
    assert "error: argument --device: not a torch device: 'nope'" in capsys.readouterr().err
    assert main(["bench", "--table", "--out", "/nonexistent/folder"]) == 2
    assert "no folder /nonexistent/folder" in capsys.readouterr().err


def test_environment_updates_and_restart_arguments():
    from idefender_gpu.bench import cli

    parser = _bench_parser()
    bench = parser._subparsers._group_actions[0].choices["bench"]
    args = parser.parse_args(["bench", "--threads", "1", "--n", "600", "--no-array-api",
                              "--references", "", "--tol", "0.01"])
    assert cli.environment_updates(args, environ={}) == dict.fromkeys(cli.THREAD_VARIABLES, "1")
    assert cli.environment_updates(args, environ=dict.fromkeys(cli.THREAD_VARIABLES, "1")) == {}
    args_api = parser.parse_args(["bench", "--references", "sklearn_array_api"])
    assert cli.environment_updates(args_api, environ={}) == {"SCIPY_ARRAY_API": "1"}
    assert cli.environment_updates(args_api, environ={"SCIPY_ARRAY_API": "1"}) == {}
    table = parser.parse_args(["bench", "--table"])
    assert cli.environment_updates(table, environ={}) == {}
    # The restart gives the same arguments back.
    again = parser.parse_args(["bench", *cli._argv(args, bench)])
    assert vars(again).keys() == vars(args).keys()
    assert {k: v for k, v in vars(again).items() if k != "func"} == {
        k: v for k, v in vars(args).items() if k != "func"}


@pytest.mark.slow
def test_command_restarts_itself_when_the_libraries_are_already_loaded():
    """NumPy loaded before ``main``: the thread counts cannot apply in this process, so the
    command restarts itself (``execve``: the caller's code after ``main`` never runs) with the
    variables set and the same arguments."""
    code = ("import numpy, sys\n"
            "from idefender_gpu.cli import main\n"
            "rc = main(['bench', '--threads', '1', '--table', '--out', sys.argv[1]])\n"
            "print('returned', rc)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                                             "OPENBLAS_NUM_THREADS")}
    done = subprocess.run([sys.executable, "-c", code, str(COMMITTED)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "returned" not in done.stdout
    assert "| a: 60000x128, G=10, K=5, full |" in done.stdout


# ---------------------------------------------------------------------------------------
# No environment written at import
# ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_importing_the_harness_writes_no_environment():
    code = (
        "import os, sys\n"
        "import idefender_gpu.bench.cli\n"
        "assert 'torch' not in sys.modules and 'scipy' not in sys.modules, 'cli imports too much'\n"
        "import idefender_gpu.bench as b\n"
        "import idefender_gpu.bench.run, idefender_gpu.bench.report\n"
        "b.WORKLOADS, b.format_records, b.run_workload\n"
        "assert 'SCIPY_ARRAY_API' not in os.environ, os.environ['SCIPY_ARRAY_API']\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "SCIPY_ARRAY_API"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr


# ---------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------


def _committed_records():
    paths = sorted(COMMITTED.glob("*.json"))
    assert paths, COMMITTED
    return [pytest.param(p, id=p.name) for p in paths]


@pytest.mark.parametrize("path", _committed_records())
def test_format_records_renders_every_committed_file(path):
    from idefender_gpu.bench.report import format_records

    record = json.loads(path.read_text())
    text = format_records([record])
    kind = record["benchmark"]
    if kind == "em_workload":
        w = record["workload"]
        shape = f"| {w['name']}: {w['n_samples']}x{w['n_features']}, G={w['n_groups']}, "
        if "skipped" in record:
            assert text.count(shape) == 1 and "skipped" in text
        else:
            assert text.count(shape) == len(record["results"])
            for name in record["results"]:
                assert f"| {name} |" in text
    elif kind == "em_backends":
        assert text.count("\n| ") == len(record["rows"]) + 1  # the header row and one per point
    elif kind == "detector_workload":  # one table row per fit variant or model
        assert text.count(f"\n| {record['workload']['name']}") == len(record["results"])
    else:
        assert kind.startswith("data-parallel EM")
        for row in record["results"]:
            assert f"| {row['name']} |" in text


def test_load_records_reads_every_kind_of_the_committed_folder():
    from idefender_gpu.bench.report import format_records, format_summary, load_records

    records = load_records(COMMITTED)
    assert len(records) == len(list(COMMITTED.glob("*.json")))
    text = format_records(records)
    assert "| a: 60000x128, G=10, K=5, full |" in text and "| ctype | D | K | N |" in text
    summary = format_summary(records).splitlines()
    workloads = [r for r in records if r["benchmark"] == "em_workload"]
    detectors = [r for r in records if r["benchmark"] == "detector_workload"]
    assert len(summary) == (sum(len(r.get("results", {None: 0})) for r in workloads)
                            + sum(len(r["results"]) for r in detectors))
    assert any(line.startswith("a (60000x128, G=10, K=5, full) idefender_gpu[torch] on cpu: ")
               and "% of the FP32 matmul rate; fit " in line for line in summary)
    assert any(line.startswith("c1 (1281167x4096, G=1000, K=1, full): skipped: GPU-only")
               for line in summary)


# ---------------------------------------------------------------------------------------
# References: memory estimate, torchgmm absent
# ---------------------------------------------------------------------------------------


def test_sklearn_reference_of_c1_and_c2_skipped_by_its_memory_estimate():
    """Issue 16 item 4: scikit-learn's per-group copies for c1/c2 (21 GB of samples and
    67 / 134 GB of (K, D, D) inits) are skipped up front, with the estimate."""
    from idefender_gpu.bench.references import reference_memory_estimate, reference_skip
    from idefender_gpu.bench.workloads import WORKLOADS

    c1, c2 = WORKLOADS["c1"], WORKLOADS["c2"]
    est1 = reference_memory_estimate("sklearn_numpy", c1)
    samples, inits = 1_281_167 * 4096 * 4, 1000 * 4096**2 * 4
    assert samples + inits <= est1["cache_bytes"] < 1.01 * (samples + inits)
    assert est1["total_bytes"] == est1["cache_bytes"] + est1["fit_bytes"]
    assert 4 * 4096**2 * 4 <= est1["fit_bytes"] < 1e9
    est2 = reference_memory_estimate("sklearn_array_api", c2)
    assert est2["cache_bytes"] - est1["cache_bytes"] == pytest.approx(inits, rel=1e-3)
    gib = 2**30
    for name, workload in (("sklearn_numpy", c1), ("sklearn_array_api", c1),
                           ("sklearn_numpy", c2)):
        skip = reference_skip(name, workload, "cpu", available_bytes=64 * gib)
        assert skip is not None and skip["skipped"].startswith("memory: estimated")
        assert skip["memory_estimate_bytes"] > 64 * gib
        assert skip["memory_available_bytes"] == 64 * gib
        assert "host memory" in skip["skipped"]
    # The same reference fits a machine with memory to spare, and our own fits are not
    # references.
    assert reference_skip("sklearn_numpy", c1, "cpu", available_bytes=1024 * gib) is None
    assert reference_skip("idefender_gpu[torch]", c1, "cpu", available_bytes=1) is None
    a = WORKLOADS["a"]
    assert reference_memory_estimate("sklearn_numpy", a)["total_bytes"] < 0.1 * gib
    assert reference_skip("sklearn_numpy", a, "cpu", available_bytes=4 * gib) is None
    with pytest.raises(ValueError, match="no memory estimate"):
        reference_memory_estimate("nope", a)


def test_skipped_references_are_recorded_with_their_reason(monkeypatch):
    """torchgmm absent: recorded as skipped with the command that installs it; a reference
    over the memory estimate: skipped before anything is allocated."""
    from idefender_gpu.bench import references, run
    from idefender_gpu.bench.workloads import WORKLOADS

    tiny = replace(WORKLOADS["a"], n_samples=60, n_features=2, n_groups=2, n_components=2,
                   backends=())
    monkeypatch.setitem(sys.modules, "torchgmm", None)
    monkeypatch.setitem(sys.modules, "torchgmm.bayes", None)
    record = run.run_workload(tiny, references=("torchgmm",), device="cpu")
    skipped = record["results"]["torchgmm"]["skipped"]
    assert skipped.startswith("not installed") and references.TORCHGMM_INSTALL in skipped
    assert record["ratios"] == {}
    monkeypatch.setattr(references, "available_memory_bytes", lambda device: 1000)
    record = run.run_workload(tiny, references=("sklearn_numpy",), device="cpu")
    sk = record["results"]["sklearn_numpy"]
    assert sk["skipped"].startswith("memory: estimated") and sk["memory_available_bytes"] == 1000
    from idefender_gpu.bench.report import format_records, format_summary

    assert "| sklearn_numpy | memory: estimated" in format_records([record])
    assert "sklearn_numpy: memory: estimated" in format_summary([record])


# ---------------------------------------------------------------------------------------
# benchmarks/gpu_check.sh
# ---------------------------------------------------------------------------------------

GPU_CHECK = ROOT / "benchmarks" / "gpu_check.sh"


@pytest.mark.slow
def test_gpu_check_script_parses_and_its_dry_run_lists_every_step(tmp_path):
    assert subprocess.run(["bash", "-n", str(GPU_CHECK)], timeout=30).returncode == 0
    done = subprocess.run(["bash", str(GPU_CHECK), "--dry-run", "--out", str(tmp_path / "gc")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith("[dry-run] timeout")]
    assert len(lines) == 7, done.stdout  # the 7th, runbook_timings.py: tests/test_runbook_timings.py
    assert "pytest" in lines[0] and ("-m gpu" in lines[0] or "-k cuda" in lines[0])
    for line, workload in zip(lines[1:], ("a", "b", "d-full", "c1", "imagenet-cpu")):
        assert f"--workload {workload} " in line and "--device cuda" in line, line
        assert f"--out {tmp_path / 'gc'} " in line and "benchmarks/results" not in line
    assert "--scale 0.1 --groups 100" in lines[4]
    # the runbook's timings (issue 14) last, their JSON beside the bench records
    assert "benchmarks/runbook_timings.py --device cuda" in lines[6]
    assert f"--out {tmp_path / 'gc' / 'runbook_timings.json'}" in lines[6]
    assert 80 <= int(lines[6].split()[2].rstrip("s")) <= 100  # the script's CUDA caps (72 s) + start-up
    # the steps' limits fit the 9.5 minutes of the check (the device tool allows 600 s a command)
    assert sum(int(line.split()[2].rstrip("s")) for line in lines) <= 570
    assert not (tmp_path / "gc").exists()  # a dry run writes nothing


@pytest.mark.slow
def test_gpu_check_script_stops_with_a_clear_message_without_cuda(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the script would run the whole check")
    done = subprocess.run(["bash", str(GPU_CHECK), "--out", str(tmp_path / "gc")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 3, (done.stdout, done.stderr)
    assert "no CUDA device" in done.stderr and not (tmp_path / "gc").exists()
