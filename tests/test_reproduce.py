"""End to end: ``idefender-gpu reproduce blackbox`` on real Fashion-MNIST files, small (issue 7).

A few hundred images, one epoch, every attack of both threat models: the pipeline runs and
writes ``results.json`` (the required keys, one record per setting, and the values this
small run gives: detection well above chance), ``report.md`` (the paper's columns) and the
ROC PNGs. It reads Debian's ``dataset-fashion-mnist`` files (``apt-get install
dataset-fashion-mnist``) and is skipped when they are absent; nothing downloads. The run
takes about 25 s on one busy core: the tests that use it are marked ``slow``.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch

from idefender_gpu.data import DatasetNotFoundError, find_dataset
from idefender_gpu.experiments.blackbox import ATTACKS, THREAT_MODELS
from idefender_gpu.cli import build_parser, main
from idefender_gpu.experiments.report import FIGURE_DPI, FIGURES

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
REQUIRED = {"dataset", "attack", "eps", "auc", "auc_successful", "tpr_at_5fpr", "clean_acc", "adv_acc", "seed"}


def _debian_files_present() -> bool:
    try:
        find_dataset("fashion-mnist", DEBIAN_DIR)
    except DatasetNotFoundError:
        return False
    return True


needs_data = pytest.mark.skipif(
    not _debian_files_present(),
    reason=f"real Fashion-MNIST IDX files are absent from {DEBIAN_DIR} "
           "(install them with: apt-get install dataset-fashion-mnist)",
)


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """The small pipeline, run once for the module (about 20 s on one busy core)."""
    out = tmp_path_factory.mktemp("reproduce")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # spinning OpenMP threads crawl on busy shared cores
    try:
        code = main(["reproduce", "blackbox", "--dataset", "fashion-mnist", "--data", str(DEBIAN_DIR),
                     "--out", str(out / "results"), "--cache", str(out / "cache"), "--seed", "0",
                     "--epochs", "1", "--n-train", "300", "--n-test", "200", "--holdout", "50", "--n-holdout", "50",
                     "--n-other", "40",
                     "--n-calibrate", "300", "--device", "cpu", "--no-progress", "--no-download"])
    finally:
        torch.set_num_threads(threads)
    return code, out


@pytest.mark.slow
@needs_data
def test_exit_code_and_files(small_run):
    code, out = small_run
    assert code == 0
    names = {p.name for p in (out / "results").iterdir()}
    assert names == {"results.json", "report.md", *FIGURES}
    assert [p.suffix for p in (out / "cache").iterdir()] == [".safetensors"] * 2  # models E and F
    assert any("Esub" in p.name for p in (out / "cache").iterdir())  # E: the Jacobian substitute


@pytest.mark.slow
@needs_data
def test_results_json_records(small_run):
    _, out = small_run
    results = json.loads((out / "results" / "results.json").read_text())
    records = results["records"]
    assert len(records) == len(THREAT_MODELS) * len(ATTACKS)
    assert {(r["threat_model"], r["label"]) for r in records} == {
        (t, a.label) for t in THREAT_MODELS for a in ATTACKS}
    for r in records:
        assert REQUIRED <= set(r), REQUIRED - set(r)
        assert r["dataset"] == "fashion-mnist" and r["seed"] == 0
        assert 0.0 <= r["auc"] <= 1.0 and 0.0 <= r["tpr_at_5fpr"] <= 1.0
        assert r["auc_successful"] is None or 0.0 <= r["auc_successful"] <= 1.0
        assert 0.0 <= r["adv_acc"] <= 1.0 and 0.0 <= r["clean_acc"] <= 1.0
        assert r["n"] == (100 if r["threat_model"] == "black-box" and r["attack"] == "FGSM" else 40)
        if r["attack"] in ("FGSM", "BIM"):
            assert r["mean_linf"] <= r["eps"] + 1e-6
        if r["attack"] == "IterativeL2":
            assert r["mean_l2"] <= r["eps"] + 1e-4
    fgsm = [r for r in records if r["threat_model"] == "black-box" and r["attack"] == "FGSM"]
    assert [r["eps"] for r in fgsm] == [0.1, 0.15, 0.2, 0.25, 0.3]
    assert [r["paper_auc"] for r in fgsm] == [0.9302, 0.9587, 0.9722, 0.9807, 0.985]
    # the semi-white-box attacks use F's own gradients: FGSM at eps 0.3 fools F on most inputs
    white = next(r for r in records if r["threat_model"] == "semi-white-box" and r["label"] == "FGSM eps=0.3")
    assert white["adv_acc"] < white["clean_acc"]
    assert results["data"]["n_train"] == 300 and results["data"]["n_test"] == 100
    assert results["data"]["holdout"] == 50 and results["models"]["F"]["seed"] == 1
    assert "substitute" in results["models"]["E"]["training"]
    assert results["detector"]["layers"] == ["conv2"] and results["detector"]["n_features"] == {"conv2": 1152}
    assert "curves" not in results


def _auc(records, threat, label):
    return next(r for r in records if r["threat_model"] == threat and r["label"] == label)


@pytest.mark.slow
@needs_data
def test_the_detector_detects(small_run):
    """Issue 11: real values, not just AUCs in [0, 1]. This run (300 training images, 1 epoch,
    100 natural test images; seeded, one thread) gives a black-box FGSM AUC of 0.61 at eps 0.1
    rising to 0.89 at eps 0.3, and 0.94 semi-white-box at eps 0.3. A detector that scored at
    random would give 0.5 +- 0.04 (one standard deviation of the AUC with 100 + 100 inputs):
    the bounds below are 6 standard deviations above it and about 0.1 below what the run gives."""
    _, out = small_run
    records = json.loads((out / "results" / "results.json").read_text())["records"]
    fgsm = [r["auc"] for r in records if r["threat_model"] == "black-box" and r["attack"] == "FGSM"]
    assert fgsm[-1] >= 0.75, fgsm  # eps 0.3
    assert fgsm[-1] - fgsm[0] >= 0.15, fgsm  # larger perturbations are easier to detect
    assert _auc(records, "black-box", "FGSM eps=0.3")["mahalanobis_auc"] >= 0.75
    white = _auc(records, "semi-white-box", "FGSM eps=0.3")
    assert white["auc"] >= 0.8 and white["n"] == 40
    # model F after one epoch on 300 images: well above chance (0.1), and FGSM on F itself fools it
    assert 0.3 <= white["clean_acc"] and white["adv_acc"] <= 0.2


@pytest.mark.slow
@needs_data
def test_results_record_no_private_paths(small_run):
    """Issue 15: the committed results.json held /tmp paths of the machine that made it."""
    _, out = small_run
    results = json.loads((out / "results" / "results.json").read_text())
    assert results["data"]["source"] == f"{DEBIAN_DIR} (Debian package dataset-fashion-mnist)"
    assert results["config"]["data"] == results["data"]["source"]
    assert results["config"]["cache"] == "<elsewhere>/cache"  # a pytest temporary folder
    for model in ("E", "F"):
        checkpoint = results["models"][model]["checkpoint"]
        assert checkpoint.endswith(".safetensors") and "/" not in checkpoint
    assert str(out) not in (out / "results" / "results.json").read_text()
    assert str(out) not in (out / "results" / "report.md").read_text()


@pytest.mark.slow
@needs_data
def test_report_has_the_papers_columns(small_run):
    _, out = small_run
    report = (out / "results" / "report.md").read_text()
    assert "Table 5" in report and "Table 4" in report
    assert "| 0.10 |" in report and "0.9302" in report and "0.775" in report  # ours beside the paper
    assert "Semi-white-box" in report and "Mahalanobis" in report
    assert "idefender-gpu reproduce blackbox --dataset fashion-mnist --seed 0 --epochs 1" in report
    for name in FIGURES:
        assert f"]({name})" in report


@pytest.mark.slow
@needs_data
def test_figures_are_legible_pngs(small_run):
    """Issue 15: the ROC PNGs were 336x320 px at 80 dpi, legends about 5 px high."""
    _, out = small_run
    for name in FIGURES:
        raw = (out / "results" / name).read_bytes()
        assert raw[:8] == b"\x89PNG\r\n\x1a\n"
        width, height = struct.unpack(">II", raw[16:24])  # the IHDR chunk
        assert width >= 900 and height >= 750, (name, width, height)
        pixels_per_metre = struct.unpack(">II", raw[raw.index(b"pHYs") + 4:][:8])
        assert round(pixels_per_metre[0] * 0.0254) == FIGURE_DPI >= 150
        assert len(raw) < 400_000


def test_parser_options():
    args = build_parser().parse_args(["reproduce", "blackbox", "--dataset", "mnist", "--n-other", "all"])
    assert args.dataset == "mnist" and args.n_other is None and args.epochs == 5
    with pytest.raises(SystemExit):
        build_parser().parse_args(["reproduce", "blackbox", "--dataset", "cifar10"])


def test_missing_data_fails_cleanly(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("IDEFENDER_DATA", raising=False)
    monkeypatch.setenv("IDEFENDER_CACHE", str(tmp_path / "cache"))
    code = main(["reproduce", "blackbox", "--dataset", "mnist", "--data", str(tmp_path / "none"),
                 "--out", str(tmp_path / "out"), "--no-download", "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.splitlines()[0] == (f"idefender-gpu: error: mnist: the folder given by --data DIR, "
                                   f"{tmp_path / 'none'}, does not exist.")
    assert "Looked in" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()
