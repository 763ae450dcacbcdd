"""The ``idefender-gpu`` command and the benchmark harness, end to end on a tiny workload."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np


def test_bench_command_writes_json_and_table(tmp_path):
    env = dict(os.environ, SCIPY_ARRAY_API="1")
    cmd = [sys.executable, "-m", "idefender_gpu.cli", "bench", "--n", "600", "--d", "4",
           "--groups", "3", "--k", "2", "--iters", "2", "--repeats", "1", "--device", "cpu",
           "--out", str(tmp_path)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "speedup_vs_sklearn_numpy" in done.stdout
    files = list(tmp_path.glob("em_600x4_G3_K2_cpu.json"))
    assert len(files) == 1
    record = json.loads(files[0].read_text())
    results = record["results"]
    assert set(results) == {"idefender_gpu", "sklearn_numpy", "sklearn_array_api"}
    for name in ("idefender_gpu", "sklearn_numpy", "sklearn_array_api"):
        assert results[name]["sec_per_iter"] > 0, results[name]
    # Same data, same initialisation, same iterations: the same log-likelihoods.
    ours = np.array(results["idefender_gpu"]["final_mean_log_likelihood"])
    ref = np.array(results["sklearn_numpy"]["final_mean_log_likelihood"])
    np.testing.assert_allclose(ours, ref, rtol=1e-4)  # float32 round-off over 3 iterations
    table = subprocess.run(cmd[:3] + ["bench", "--table", "--out", str(tmp_path)], env=env,
                           capture_output=True, text=True, timeout=120)
    assert table.returncode == 0, table.stderr
    assert "| idefender_gpu |" in table.stdout


def test_unknown_subcommand_fails_cleanly():
    done = subprocess.run([sys.executable, "-m", "idefender_gpu.cli", "nope"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2
    assert "invalid choice" in done.stderr
