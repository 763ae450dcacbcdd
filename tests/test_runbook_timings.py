"""``benchmarks/runbook_timings.py``: the GPU runbook's per-step timings (issue 14, item 5).

The script is loaded from its file (``benchmarks/`` is not a package) and run in this
process through its ``main`` with ``--quick`` (tiny models, a few seconds on one CPU thread).
That the GPU check's dry run lists it as its last step is checked with gpu_check.sh's other
steps, in ``tests/test_bench.py`` (one dry run for both).
"""

from __future__ import annotations

import importlib.util
import json
import math
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "runbook_timings.py"


@pytest.fixture(scope="module")
def runbook():
    spec = importlib.util.spec_from_file_location("runbook_timings", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _extrapolations(entry):
    return entry.get("extrapolated", []) + [e for sub in entry.get("models", {}).values()
                                            for e in sub["extrapolated"]]


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_quick_run_measures_every_step_and_extrapolates_from_the_measured_rates(runbook, tmp_path, capsys):
    out = tmp_path / "sub" / "runbook.json"
    threads = torch.get_num_threads()
    assert runbook.main(["--quick", "--device", "cpu", "--out", str(out)]) == 0
    assert torch.get_num_threads() == threads
    record = json.loads(out.read_text())
    assert record["benchmark"] == "runbook_timings" and record["profile"] == "quick" and record["complete"]
    assert "not a measurement" in record["note"] and "no figure here is the runbook's" in record["note"]
    for key in ("torch", "torch_threads", "load_average", "device"):
        assert key in record["machine"]
    steps = record["steps"]
    assert list(steps) == list(runbook.STEPS)
    for name, entry in steps.items():
        assert "error" not in entry, (name, entry)
        assert 0 < entry["wall_seconds"] <= entry["cap_seconds"] + 5, name
        extrapolated = _extrapolations(entry)
        assert extrapolated, name
        for e in extrapolated:
            assert e["kind"] == "extrapolation" and e["seconds"] > 0 and e["formula"] and e["inputs"], (name, e)
    # the extrapolations are the measured rates times the pipeline's counts
    train = steps["wrn-train"]["models"]["wrn-10-1"]
    (n1, t1), (n2, t2) = [(r["steps"], r["seconds"]) for r in train["runs"][-2:]]
    assert train["method"].startswith("two runs") and n2 > n1 and t1 > 0
    assert train["seconds_per_step"] == pytest.approx(max(t2 - t1, 1e-9) / (n2 - n1))
    assert train["images_per_second"] == pytest.approx(steps["wrn-train"]["batch"] / train["seconds_per_step"])
    epoch_steps = math.ceil(50_000 / steps["wrn-train"]["batch"])
    assert train["extrapolated"][0]["seconds"] == pytest.approx(epoch_steps * train["seconds_per_step"])
    assert train["extrapolated"][1]["seconds"] == pytest.approx(200 * epoch_steps * train["seconds_per_step"])
    features = steps["wrn-features"]
    assert features["layer"] == "fc:input" and features["seconds"] > 0
    implied = features["forward_gflop_per_image"] * features["images_per_second"] / 1e3
    assert features["achieved_tflops"] == pytest.approx(implied)
    rate = features["batch"] * features["iterations"] / features["seconds"]
    assert features["images_per_second"] == pytest.approx(rate)
    assert features["extrapolated"][0]["seconds"] == pytest.approx(60_000 / rate)
    vgg = steps["vgg19-forward"]
    assert vgg["extrapolated"][1]["seconds"] == pytest.approx(2 * 1_281_167 / vgg["images_per_second"])
    attack = steps["vgg19-attack-step"]
    assert attack["extrapolated"][0]["seconds"] == pytest.approx(1000 * 3 * 21 / attack["image_steps_per_second"])
    jpeg = steps["jpeg-decode"]
    assert jpeg["written"]["mean_bytes"] > 20_000  # not trivially compressible
    assert [r["workers"] for r in jpeg["runs"]] == [0, 1] and all(r["images"] > 0 for r in jpeg["runs"])
    assert jpeg["extrapolated"][0]["seconds"] == pytest.approx(
        1_281_167 / (16 * jpeg["images_per_second_per_worker"]))
    assert jpeg["extrapolated"][2]["seconds"] == pytest.approx(1_281_167 / (16 * jpeg["runs"][0]["images_per_second"]))
    fit = steps["detector-fit"]
    for phase, e in zip(("moments_pass", "parameters", "thresholds_pass"), fit["extrapolated"]):
        p = fit["phases"][phase]
        assert p["seconds"] > 0
        assert e["seconds"] == pytest.approx(1000 * (p["seconds"] - p["data_generation_seconds"]) / fit["classes"])
    assert fit["extrapolated"][3]["seconds"] == pytest.approx(sum(e["seconds"] for e in fit["extrapolated"][:3]))
    assert fit["parameter_bytes_1000_classes"] == 1000 * 32 * 33 * 4
    assert record["extrapolated"][0]["seconds"] == pytest.approx(
        1_281_167 / min(vgg["images_per_second"], 16 * jpeg["images_per_second_per_worker"]))
    printed = capsys.readouterr().out
    assert printed.startswith("runbook timings (quick)") and "no figure here is the runbook's" in printed
    assert all(f"| {name}" in printed for name in runbook.STEPS)
    line = runbook.summary_line(record)
    assert "\n" not in line and all(name in line for name in runbook.STEPS) and "INCOMPLETE" not in line


def test_a_bad_steps_name_is_a_one_line_error(runbook, capsys):
    with pytest.raises(SystemExit) as exc:
        runbook.main(["--quick", "--steps", "wrn-train,vgg-19"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error: argument --steps: unknown step 'vgg-19'" in err
    assert "wrn-train, wrn-features" in err and "Traceback" not in err


@pytest.mark.usefixtures("one_thread")
def test_a_failing_step_is_recorded_and_the_others_run(runbook, tmp_path, monkeypatch, capsys):
    def broken(step):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setitem(runbook.STEP_FUNCTIONS, "wrn-features", broken)
    out = tmp_path / "r.json"
    assert runbook.main(["--quick", "--device", "cpu", "--steps", "wrn-features,detector-fit", "--out", str(out)]) == 1
    record = json.loads(out.read_text())
    assert record["steps"]["wrn-features"]["error"] == "RuntimeError: out of memory (simulated)"
    assert "phases" in record["steps"]["detector-fit"] and record["complete"]
    assert "steps failed or skipped: wrn-features" in capsys.readouterr().err
    assert "wrn-features error (RuntimeError: out of memory" in runbook.summary_line(record)
    # a spent --budget-s skips the steps left (recorded, the run fails); the caps shrink to what is left
    assert runbook.main(["--quick", "--device", "cpu", "--steps", "detector-fit,jpeg-decode", "--budget-s", "0.5",
                         "--out", str(out)]) == 1
    skipped = json.loads(out.read_text())["steps"]
    assert all(skipped[name]["skipped"] == "--budget-s 0.5 spent before this step" for name in skipped)
    assert "| jpeg-decode | skipped: --budget-s 0.5" in capsys.readouterr().out
    # a record cut short (a timeout) says so in its summary line
    record.update(complete=False, steps_selected=[*record["steps_selected"], "jpeg-decode"])
    assert "INCOMPLETE (not run: jpeg-decode)" in runbook.summary_line(record)


def test_a_timed_loop_stops_at_its_share_of_the_cap(runbook):
    step = runbook.Step("x", torch.device("cpu"), {}, 0.3, None, {})
    calls = []
    result = runbook.timed_loop(lambda: (calls.append(1), time.sleep(0.02)), step, warmup=2, share=0.5)
    assert result["warmup_iterations"] == 2 and len(calls) == 2 + result["iterations"]
    assert 3 <= result["iterations"] <= 9 and 0.1 <= result["seconds"] < 0.3
    assert runbook.timed_loop(lambda: None, step, warmup=0, max_iters=3, min_iters=1)["iterations"] <= 3
