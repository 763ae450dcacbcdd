"""The detector workloads of ``idefender-gpu bench`` (imagenet-cpu, imagenet-width,
detector-overhead) on tiny shapes through the same code path, and the memory of the K=1
fit's closed-form step at scale (issue 12, item 5).

Nothing here is a timing: the clocks run, their values are only checked to be finite.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import types

import pytest
import torch
from torch import nn

from idefender_gpu.bench.detector_workloads import (
    DETECTOR_WORKLOADS,
    ClassStates,
    SyntheticLoader,
    run_detector_workload,
    scaled_detector_workload,
)

PHASES = ("moments_pass", "parameters", "thresholds_pass", "scoring")


def _tiny(name, **changes):
    shapes = {"imagenet-cpu": dict(n_train=600, n_test=90, n_features=12, n_classes=6, batch_size=64),
              "imagenet-width": dict(n_train=480, n_test=120, n_features=24, n_classes=4, batch_size=100),
              "detector-overhead": dict(n_train=60, n_test=4, n_classes=3, batch_size=2, image_size=32,
                                        repeats=1)}[name]
    return scaled_detector_workload(DETECTOR_WORKLOADS[name], **{**shapes, **changes})


def _check_fit_result(result, w):
    assert result["all_finite"] and all(result["finite"].values())
    assert set(result["phases"]) == set(PHASES)
    for name, phase in result["phases"].items():
        assert phase["seconds"] >= 0 and 0 <= phase["data_generation_seconds"] <= phase["seconds"] + 1e-3
        assert phase["flops"] > 0
    D = w.n_features
    assert result["phases"]["moments_pass"]["flops"] == 2 * w.n_train * D * D
    assert result["phases"]["scoring"]["flops"] == 2 * w.n_test * D * D
    assert math.isclose(result["total_seconds"], sum(p["seconds"] for p in result["phases"].values()))
    assert result["peak_rss_bytes"] > 0 and result["memory"]["after_fit"]["VmHWM"] > 0
    assert result["parameter_bytes"] == w.n_classes * D * (D + 1) * 4
    q = result["quality"]
    assert q["classifier_accuracy"] > 0.95  # the class coded in the states is read back
    assert 0 <= q["natural_reject_rate"] <= 1 and q["keep"] == 0.95


def test_synthetic_loader_is_reiterable_sorted_or_shuffled_and_the_same_each_pass():
    states = ClassStates(5, 8, rank=3, seed=1)
    sorted_loader = SyntheticLoader(states, 53, 10)
    first = [(x.clone(), y.clone()) for x, y in sorted_loader]
    again = list(sorted_loader)
    assert len(first) == len(sorted_loader) == 6 and len(sorted_loader.passes) == 2
    for (x0, y0), (x1, y1) in zip(first, again):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)
    labels = torch.cat([y for _, y in first])
    assert torch.equal(labels, labels.sort().values) and torch.bincount(labels).tolist() == [11, 11, 11, 10, 10]
    shuffled = torch.cat([y for _, y in SyntheticLoader(states, 53, 10, order="shuffled")])
    assert not torch.equal(shuffled, labels) and torch.equal(shuffled.sort().values, labels)
    x = torch.cat([x for x, _ in first])
    assert torch.equal(x[:, :5].argmax(1), labels)  # the class code ClassCodeHead reads
    with pytest.raises(ValueError, match="order must be"):
        SyntheticLoader(states, 53, 10, order="random")


def test_imagenet_cpu_small_both_orders_in_process():
    w = _tiny("imagenet-cpu")
    record = run_detector_workload(w, device="cpu", isolate=False, orders=("sorted", "shuffled"), probe=False)
    assert record["benchmark"] == "detector_workload" and record["workload"]["name"] == "imagenet-cpu"
    assert record["targets"] == {"seconds": 300.0, "peak_rss_bytes": 10 * 2**30}
    assert set(record["results"]) == {"sorted/empirical", "shuffled/empirical"}
    for name, result in record["results"].items():
        _check_fit_result(result, w)
        assert record["checks"][name]["all_finite"] and record["checks"][name]["seconds_within_target"]
        assert "auc_wrong_class" not in result["quality"]


def test_imagenet_width_small_with_shrinkage_rejects_states_presented_as_another_class():
    w = _tiny("imagenet-width")
    record = run_detector_workload(w, device="cpu", isolate=False, probe=False)
    assert set(record["results"]) == {"sorted/empirical", "sorted/ledoit-wolf"}
    for name, result in record["results"].items():
        _check_fit_result(result, w)
        q = result["quality"]
        assert q["auc_wrong_class"] >= 0.99 and q["wrong_class_reject_rate"] > 0.9, q
        assert result["finite"]["wrong_class_scores"]
        assert record["checks"][name]["auc_within_target"]


class _TinyVGG(nn.Module):
    """Stands in for torchvision's VGG19 (same attribute layout: features, classifier[6])."""

    def __init__(self, weights=None, num_classes=1000):
        super().__init__()
        assert weights is None
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, stride=4), nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.classifier = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Identity(), nn.Linear(16, 16),
                                        nn.ReLU(), nn.Identity(), nn.Linear(16, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


def test_detector_overhead_small_model_f_and_a_vgg_stand_in(monkeypatch):
    fake = types.ModuleType("torchvision")
    fake.models = types.SimpleNamespace(vgg19=_TinyVGG)
    monkeypatch.setitem(sys.modules, "torchvision", fake)
    w = _tiny("detector-overhead")
    record = run_detector_workload(w, device="cpu", probe=False)
    f, vgg = record["results"]["F"], record["results"]["vgg19"]
    assert (f["layer"], f["n_features"], f["n_classes"], f["input_shape"]) == ("fc:input", 1152, 10, [1, 28, 28])
    assert (vgg["layer"], vgg["n_features"], vgg["n_classes"], vgg["input_shape"]) == (
        "classifier.6:input", 16, 3, [3, 32, 32])
    for r in (f, vgg):
        assert r["forward_seconds"] > 0 and r["score_seconds"] > 0
        assert math.isclose(r["overhead_fraction"], r["score_over_forward"] - 1)
    assert record["checks"]["vgg19_overhead_fraction"] == vgg["overhead_fraction"]


def test_detector_overhead_records_vgg_as_skipped_without_torchvision(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # import torchvision -> ImportError
    w = _tiny("detector-overhead", models=("vgg19",))
    record = run_detector_workload(w, device="cpu", probe=False)
    assert "torchvision is not installed" in record["results"]["vgg19"]["skipped"]
    assert "checks" not in record


@pytest.mark.slow
def test_bench_command_writes_the_detector_record_and_its_table(tmp_path, capsys):
    """``idefender-gpu bench --workload imagenet-cpu`` with a shape override: one variant in
    its own process (peak RSS its own), the JSON record, the markdown table."""
    import argparse

    from idefender_gpu.bench.cli import register
    from idefender_gpu.bench.report import format_records, format_summary, load_records

    parser = argparse.ArgumentParser(prog="idefender-gpu")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench", "--workload", "imagenet-cpu", "--n", "300", "--d", "8", "--groups", "3",
                              "--n-test", "30", "--batch-size", "50", "--device", "cpu", "--no-array-api",
                              "--references", "", "--out", str(tmp_path)])
    assert args.func(args) == 0
    record = json.loads((tmp_path / "detector_imagenet-cpu_cpu.json").read_text())
    w = record["workload"]
    assert (w["n_train"], w["n_features"], w["n_classes"], w["n_test"], w["batch_size"]) == (300, 8, 3, 30, 50)
    result = record["results"]["sorted/empirical"]
    assert result["all_finite"] and result["peak_rss_bytes"] > result["memory"]["start"]["VmRSS"] / 2
    assert record["matmul_probe"]["gflops"] > 0
    assert 0 < result["phases"]["moments_pass"]["fraction_of_matmul_peak"] < 10
    out = capsys.readouterr().out
    assert "| imagenet-cpu: 300x8, 3 classes" in out and "sorted/empirical" in out
    assert format_records(load_records(tmp_path)).count("sorted/empirical") == 1
    assert "imagenet-cpu (300x8, 3 classes) sorted/empirical" in format_summary([record])


# -- the memory of the closed-form step --------------------------------------------------------

def _totals(C, D, n, dtype=torch.float64, seed=0, higher=True, memory_budget=None):
    from idefender_gpu.detector._moments import batch_moments, merge_moments

    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, C, (n,), generator=g)
    x = torch.randn(n, D, generator=g, dtype=dtype) + 20 * torch.randn(C, D, generator=g, dtype=dtype)[y]
    total = None
    for start in range(0, n, 37):
        part = batch_moments(x[start:start + 37], y[start:start + 37], C, diagonal=False, higher=higher)
        total = merge_moments(total, part, C, memory_budget=memory_budget)
    return total


def test_blocked_merge_and_factors_equal_the_one_block_results_bitwise():
    """merge_moments in blocks of one class and gaussian_parameters in blocks of one class
    (written into the totals' own scatter) give the numbers of one block exactly."""
    from dataclasses import replace

    from idefender_gpu.detector._moments import gaussian_parameters

    for dtype in (torch.float64, torch.float32):
        one = _totals(5, 7, 200, dtype, memory_budget=10**9)
        blocked = _totals(5, 7, 200, dtype, memory_budget=1)
        for a, b in zip(one._fields(), blocked._fields()):
            assert torch.equal(a, b)
        for ctype, estimator in (("full", "empirical"), ("tied", "empirical"), ("full", "ledoit-wolf"),
                                 ("tied", "oas")):
            fresh = replace(one, scatter=one.scatter.clone(), reusable=False)
            expected = gaussian_parameters(fresh, ctype, 1e-3, estimator, memory_budget=10**9)
            assert expected[2].data_ptr() != fresh.scatter.data_ptr()
            spent = replace(blocked, scatter=blocked.scatter.clone())
            assert spent.reusable
            got = gaussian_parameters(spent, ctype, 1e-3, estimator, memory_budget=1)
            assert got[2].data_ptr() == spent.scatter.data_ptr()  # written over the scatter
            for a, b in zip(expected, got):
                assert a.shape == b.shape and torch.equal(a, b), (dtype, ctype, estimator)


_PEAK = """
import json, sys
from dataclasses import replace
import torch
from idefender_gpu.detector._moments import batch_moments, gaussian_parameters, merge_moments

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

torch.set_num_threads(1)
C, D = 48, 384
g = torch.Generator().manual_seed(0)
y = torch.arange(C).repeat_interleave(2 * D // C)
x = torch.randn(y.shape[0], D, generator=g) + torch.randn(C, D, generator=g)[y]
total = merge_moments(None, batch_moments(x, y, C, diagonal=False, higher=False), C)
warm = merge_moments(None, batch_moments(x[:64], y[:64] % 2, 2, diagonal=False, higher=False), 2)
gaussian_parameters(warm, "full", 1e-3)  # warm-up
peaks = {}
for name, m in (("reused", total), ("new", replace(total, reusable=False, scatter=total.scatter.clone()))):
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = status("VmRSS")
    out = gaussian_parameters(m, "full", 1e-3, memory_budget=2**20)  # blocks of one class
    peaks[name] = status("VmHWM") - base
    del out, m
print(json.dumps({**peaks, "scatter": C * D * D * 4}))
"""


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_factors_of_running_totals_need_no_second_copy_of_the_parameters():
    """Peak RSS of gaussian_parameters at C=48, D=384 (a 28 MB float32 scatter): on the
    fit's running totals the factors overwrite the scatter block by block (growth well under
    a quarter of it; before, the covariances, their Cholesky factors and inverses were each
    a full (C, D, D) tensor: about 4x); into a new tensor it grows by one scatter's size (so
    the measurement can fail)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536")
    done = subprocess.run([sys.executable, "-c", _PEAK], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    peaks = json.loads(done.stdout.strip().splitlines()[-1])
    assert peaks["reused"] < 0.25 * peaks["scatter"], peaks
    assert peaks["new"] > 0.9 * peaks["scatter"], peaks


@pytest.mark.parametrize("rows, merge_bytes", [(1, None), (3, 1), (None, None)])
def test_moment_accumulator_equals_the_moments_of_all_states(rows, merge_bytes):
    """Class buckets (a shuffled loader's batches touch every class) then merges (of one
    class at a time with ``merge_bytes=1``): the moments of all the states at once, to
    round-off (float64, third and fourth moments too)."""
    from idefender_gpu.detector._moments import MomentAccumulator, batch_moments, merge_moments

    g = torch.Generator().manual_seed(3)
    C, D = 7, 5
    y = torch.randint(0, C, (600,), generator=g)
    x = 2 * torch.randn(600, D, generator=g, dtype=torch.float64) + 30 + torch.randn(C, D, generator=g,
                                                                                 dtype=torch.float64)[y]
    expected = merge_moments(None, batch_moments(x, y, C, diagonal=False, higher=True), C)
    acc = MomentAccumulator(C, diagonal=False, higher=True, rows=rows, merge_bytes=merge_bytes)
    start = 0
    for size in (1, 5, 90, 0, 3, 250, 251):
        acc.add(x[start:start + size], y[start:start + size])
        start += size
    got = acc.result()
    assert got.reusable and got.classes is None
    for a, b in zip(got._fields(), expected._fields()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-9)
    with pytest.raises(ValueError, match="no states"):
        MomentAccumulator(C, diagonal=False, higher=False).result()


def test_class_buckets_give_every_row_once_with_its_class():
    from idefender_gpu.detector._moments import ClassBuckets

    g = torch.Generator().manual_seed(4)
    C, N = 6, 500
    y = torch.randint(0, C, (N,), generator=g)
    ids = torch.arange(N, dtype=torch.float64)
    x = torch.stack([ids, y.double()], 1)  # each row names itself and its class
    buckets = ClassBuckets(C, 8, max_classes=2)
    seen, start = [], 0
    for size in (3, 0, 40, 1, 200, 256):
        groups = buckets.add({"x": x[start:start + size], "w": x[start:start + size, :1]}, y[start:start + size])
        seen += groups
        start += size
    seen += buckets.drain()
    assert buckets.drain() == []
    rows = torch.cat([parts["x"] for parts, _ in seen])
    labels = torch.cat([lab for _, lab in seen])
    assert torch.equal(rows[:, 0].sort().values, ids)  # every row exactly once
    assert torch.equal(rows[:, 1].long(), labels) and torch.equal(torch.cat([p["w"] for p, _ in seen])[:, 0], rows[:, 0])
    assert all(lab.unique().numel() <= 2 for _, lab in seen)


def test_streamed_thresholds_of_a_shuffled_loader_equal_those_of_a_sorted_one():
    """The K=1 fit of the same states sorted by class or shuffled (buckets of 64 in both
    passes): the same detector (float64, to round-off)."""
    from idefender_gpu import IDefender

    states = ClassStates(5, 6, rank=2, seed=2)
    sorted_loader = SyntheticLoader(states, 700, 50)
    x = torch.cat([b for b, _ in sorted_loader]).double()
    y = torch.cat([c for _, c in sorted_loader])
    perm = torch.randperm(700, generator=torch.Generator().manual_seed(0))
    model = nn.Sequential(nn.Linear(6, 5)).double()
    fits = []
    for order in (torch.arange(700), perm):
        batches = [(x[order][i:i + 50], y[order][i:i + 50]) for i in range(0, 700, 50)]
        fits.append(IDefender(model, n_components=1, progress=False).fit(batches))
    torch.testing.assert_close(fits[1].thresholds_, fits[0].thresholds_, rtol=1e-12, atol=1e-10)
    layer = fits[0].layers_[0]
    torch.testing.assert_close(fits[1].precisions_cholesky_[layer], fits[0].precisions_cholesky_[layer],
                               rtol=1e-10, atol=1e-10)
