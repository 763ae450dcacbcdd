"""``reproduce adaptive --dataset cifar10`` (issue 14): the stand-in run end to end (report, JSON,
PNGs), a user checkpoint (``--weights``), the per-dataset eps (CIFAR-10's k/255, the MNIST
family's unchanged) and the refusals (exit code 2, one line).

The stand-in runs are tiny (WRN-10-1, one epoch, four attacked images, two attack steps): they
prove the pipeline, not the method.
"""

from __future__ import annotations

import json
import struct

import pytest
import torch

from idefender_gpu.cli import build_parser, main
from idefender_gpu.experiments._datasets import STAND_IN_NOTE
from idefender_gpu.experiments.adaptive import EPS, EPS_BY_DATASET, WORST_CASE, AdaptiveConfig, eps_label
from idefender_gpu.models import build_model, save_checkpoint

CIFAR_EPS = [2 / 255, 4 / 255, 8 / 255, 16 / 255]

#: the smallest stand-in run: 100 training and 60 test images (20 held out), 4 attacked
TINY = ["--dataset", "cifar10", "--stand-in", "--n-train", "100", "--n-test", "60", "--n-holdout", "20",
        "--n-attack", "4", "--n-calibrate", "100", "--quiet", "--no-progress", "--threads", "1"]


def _outputs(out):
    return (out / "report.md").read_text(), json.loads((out / "results.json").read_text())


def _png(path) -> tuple[int, int]:
    raw = path.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", raw[16:24])


@pytest.mark.slow
def test_adaptive_stand_in_end_to_end(tmp_path, capsys):
    """WRN-10-1 trained and cached, CIFAR-10's eps (2/255 ... 16/255), every defence and attack
    (torchattacks and ART too) with a worst-case row, the stand-in's small attack counts."""
    out = tmp_path / "ad"
    assert main(["reproduce", "adaptive", *TINY, "--out", str(out), "--cache", str(tmp_path / "cache")]) == 0
    report, results = _outputs(out)
    assert report.splitlines()[0] == STAND_IN_NOTE  # first line: not a reproduction
    assert results["stand_in"] is True and results["dataset"] == "cifar10-stand-in"
    assert results["config"]["eps"] == CIFAR_EPS == results["eps"]
    assert results["architecture"] == "wrn-10-1" and results["detector"]["layers"] == ["fc:input"]
    assert (results["config"]["steps"], results["config"]["n_targets"]) == (2, 1)  # the stand-in's counts
    assert not results["models"]["wrn-10-1"]["cached"] and len(list((tmp_path / "cache").glob("*"))) == 1
    assert results["skipped"] == {}  # torchattacks and ART are installed in the project's environment
    attacks = {"MarginPGD", "torchattacks PGD (targeted)", "ART PGD (targeted)", WORST_CASE}
    rows = {(r["defence"], r["attack"], r["eps"]) for r in results["records"]}
    for eps in CIFAR_EPS:
        assert {("I-defender", a, eps) for a in attacks} <= rows
        assert {(d, a, eps) for d in ("none", "Mahalanobis") for a in ("MarginPGD", WORST_CASE)} <= rows
    assert {("none", "no attack", 0.0), ("I-defender", "no attack", 0.0)} <= rows
    assert len(results["records"]) == 3 + 4 * (5 + 3)
    for r in results["records"]:
        assert r["max_linf"] <= r["eps"] + 1e-6 and r["n"] == 4
    assert [c["eps"] for c in results["comparison"]] == CIFAR_EPS
    assert {p.name for p in out.iterdir()} == {"results.json", "report.md", "roc_adaptive_idefender.png",
                                               "roc_adaptive_mahalanobis.png"}
    assert min(_png(out / "roc_adaptive_idefender.png")) >= 700
    assert "--dataset cifar10 --stand-in" in report and "8/255 (0.0314)" in report
    assert "(the cifar10 default)" in report and "no adaptive table" in report and "Defence `none`" in report
    assert "| 16/255 (0.0627) | I-defender | MarginPGD |" in report
    assert "cifar10-stand-in adaptive" in capsys.readouterr().out


def test_adaptive_stand_in_with_user_weights(tmp_path):
    """Source from ``--weights`` (an untrained WRN-10-1's checkpoint): nothing trained nor cached;
    ``--eps`` as a fraction, ``--steps`` / ``--targets`` the user's, no outside libraries."""
    torch.manual_seed(0)
    weights = save_checkpoint(build_model("wrn-10-1"), tmp_path / "model.safetensors",
                              {"dataset": "cifar10-stand-in", "model": "wrn-10-1"})
    out = tmp_path / "ad"
    code = main(["reproduce", "adaptive", *TINY, "--n-attack", "2", "--out", str(out), "--cache",
                 str(tmp_path / "cache"), "--weights", str(weights), "--eps", "8/255", "--steps", "1",
                 "--targets", "0", "--no-external"])
    assert code == 0
    report, results = _outputs(out)
    assert results["models"]["wrn-10-1"]["checkpoint"] == "model.safetensors"
    assert not (tmp_path / "cache").exists()
    assert results["config"]["eps"] == [8 / 255] and "(--eps)" in report
    assert (results["config"]["steps"], results["config"]["n_targets"]) == (1, 0)
    assert {r["attack"] for r in results["records"]} == {"no attack", "MarginPGD", WORST_CASE}
    assert set(results["skipped"]) == {"torchattacks", "ART"}


@pytest.mark.parametrize("eps", ["0", "0,8/255", "8/0", "2/255/3", "1.5"])
def test_bad_eps_is_refused_in_one_line(tmp_path, capsys, eps):
    with pytest.raises(SystemExit) as exc:
        main(["reproduce", "adaptive", "--dataset", "cifar10", "--stand-in", "--eps", eps,
              "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.splitlines()
    assert exc.value.code == 2 and err[0].startswith("idefender-gpu reproduce adaptive: error: argument --eps: "
                                                     "must be comma-separated floats or fractions in (0, 1]")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, message", [
    (["--dataset", "mnist", "--stand-in"], "--stand-in is available for cifar10, imagenet only"),
    (["--dataset", "cifar10", "--stand-in", "--data", "x"], "--stand-in uses no data files"),
    (["--dataset", "cifar10", "--stand-in", "--weights", "a", "--weights", "b"], "at most 1 file(s)"),
    (["--dataset", "cifar10", "--stand-in", "--weights", "no-such.safetensors"], "no such file"),
])
def test_unsupported_combinations_are_one_line(tmp_path, capsys, argv, message):
    code = main(["reproduce", "adaptive", *argv, "--out", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and message in err.splitlines()[0] and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_each_dataset_has_its_eps():
    """The MNIST family keeps 0.05-0.3; CIFAR-10 (and its stand-in) 2-16 of 255; ImageNet 1-8 of
    255; ``eps`` overrides; results record the radii used."""
    assert EPS_BY_DATASET["fashion-mnist"] == EPS == (0.05, 0.1, 0.2, 0.3) == EPS_BY_DATASET["mnist"]
    assert AdaptiveConfig().attack_eps() == EPS and AdaptiveConfig().to_json()["eps"] == list(EPS)
    assert list(AdaptiveConfig(dataset="cifar10", stand_in=True).attack_eps()) == CIFAR_EPS
    assert EPS_BY_DATASET["imagenet"] == (1 / 255, 2 / 255, 4 / 255, 8 / 255)
    assert AdaptiveConfig(dataset="cifar10", eps=(0.01,)).to_json()["eps"] == [0.01]
    args = build_parser().parse_args(["reproduce", "adaptive", "--dataset", "cifar10", "--eps", "4/255,0.1"])
    assert args.eps == (4 / 255, 0.1) and build_parser().parse_args(["reproduce", "adaptive"]).eps is None


def test_eps_labels_are_readable():
    assert [eps_label(e) for e in CIFAR_EPS] == ["2/255 (0.0078)", "4/255 (0.0157)", "8/255 (0.0314)",
                                                 "16/255 (0.0627)"]
    assert [eps_label(e) for e in (0.05, 0.1, 0.2, 0.3, 0.0, 1.0, 0.0314)] == ["0.05", "0.1", "0.2", "0.3", "0",
                                                                               "1", "0.0314"]


def test_negative_result_is_stated_plainly():
    """The report says in bold where the detector stops nothing (MarginPGD as successful with it as
    without) and where the attacker still evades it on most images."""
    from idefender_gpu.experiments.adaptive import _negative_result

    def rows(eps, bare, ours):
        return [{"eps": eps, "defence": "none", "attack": "MarginPGD", "success_rate": bare},
                {"eps": eps, "defence": "I-defender", "attack": "MarginPGD", "success_rate": ours}]

    lines = _negative_result(rows(8 / 255, 1.0, 0.995) + rows(4 / 255, 0.9, 0.6) + rows(2 / 255, 0.3, 0.1))
    assert lines[0].startswith("**Negative result: at eps 8/255 (0.0314) I-defender stops nothing")
    assert lines[1].startswith("**At eps 4/255 (0.0157) the attacker still evades")
    assert len(lines) == 2
    assert "stops nothing" not in " ".join(_negative_result(rows(0.1, 0.0, 0.0)))  # nothing to stop
