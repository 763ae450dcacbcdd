"""``reproduce semi-whitebox|graybox --dataset cifar10``: the stand-in runs end to end (report and
JSON content), user checkpoints (``--weights``), the cache, and the refusals (exit code 2, one line).

The stand-in runs are tiny (narrow WRNs, one epoch, a few attacked images, two attack steps):
they prove the pipeline, not the method.
"""

from __future__ import annotations

import json

import pytest
import torch

from idefender_gpu.cli import main
from idefender_gpu.experiments._datasets import PROFILES, STAND_IN_NOTE, STAND_INS, Role, obtain_model
from idefender_gpu.experiments.paper import SEMIWHITEBOX_TABLE
from idefender_gpu.models import build_model, save_checkpoint

#: the smallest stand-in run: 100 training and 60 test images (20 held out), 4 attacked
TINY = ["--dataset", "cifar10", "--stand-in", "--n-train", "100", "--n-test", "60", "--n-holdout", "20",
        "--n-attack", "4", "--n-calibrate", "100", "--quiet", "--no-progress", "--threads", "1"]


def _outputs(out):
    return (out / "report.md").read_text(), json.loads((out / "results.json").read_text())


@pytest.mark.slow
def test_semiwhitebox_stand_in_with_user_weights(tmp_path, capsys):
    """The Table 6 pipeline on a stand-in, Source from ``--weights`` (an untrained WRN-10-1's
    checkpoint, as ``idefender-gpu train`` writes them): no training, six bisected columns."""
    torch.manual_seed(0)
    weights = save_checkpoint(build_model("wrn-10-1"), tmp_path / "model.safetensors",
                              {"dataset": "cifar10-stand-in", "model": "wrn-10-1"})
    out = tmp_path / "sw"
    code = main(["reproduce", "semi-whitebox", *TINY, "--out", str(out), "--cache", str(tmp_path / "cache"),
                 "--weights", str(weights)])
    assert code == 0
    report, results = _outputs(out)
    assert report.splitlines()[0] == STAND_IN_NOTE  # first line: not a reproduction
    assert "model wrn-10-1" in report and "--stand-in" in report
    assert results["stand_in"] is True and results["dataset"] == "cifar10-stand-in"
    assert results["architecture"] == "wrn-10-1" and results["paper_same_dataset"] is False
    assert results["models"]["wrn-10-1"]["checkpoint"] == "model.safetensors"
    assert results["detector"]["layers"] == ["fc:input"] and results["detector"]["n_features"] == 64
    assert results["config"]["steps"] == 2 and results["config"]["max_evaluations"] == 3
    assert [r["column"] for r in results["records"]] == [column[0] for column in SEMIWHITEBOX_TABLE[2]]
    assert all(len(r["bisection"]) <= 3 and r["n"] == 4 for r in results["records"])
    assert not (tmp_path / "cache").exists()  # the user's weights: nothing trained nor cached
    assert "cifar10-stand-in semi-whitebox" in capsys.readouterr().out


@pytest.mark.slow
def test_graybox_stand_in_trains_and_caches(tmp_path):
    """Tables 7-8 on a stand-in: Source and Target WRN-10-1 (seeds 1, 2), Wide WRN-16-1 (seed 3),
    trained and cached; the paper's CIFAR-10 eps and alphas."""
    cache = tmp_path / "cache"
    assert main(["reproduce", "graybox", *TINY, "--cache", str(cache), "--out", str(tmp_path / "a")]) == 0
    report, results = _outputs(tmp_path / "a")
    assert report.splitlines()[0] == STAND_IN_NOTE
    assert results["stand_in"] is True
    assert results["architectures"] == {"Source": "wrn-10-1", "Target": "wrn-10-1", "Wide": "wrn-16-1"}
    assert [results["models"][m]["seed"] for m in ("Source", "Target", "Wide")] == [1, 2, 3]
    assert not any(info["cached"] for info in results["models"].values())
    profile = PROFILES["cifar10"]
    assert results["config"]["alphas"] == [1e-3, 1e-2, 1e-1] == list(profile.alphas)
    assert [(r["attack"], r["eps"], r["alpha"]) for r in results["records"]] == [
        (label, eps, alpha) for label, _, eps in profile.graybox_attacks for alpha in profile.alphas]
    for record in results["records"]:
        for model in ("Source", "Target", "Wide"):
            assert 0.0 <= record[model]["adv_acc"] <= 1.0 and record[model]["auc"] is not None
    assert len(list(cache.glob("*.safetensors"))) == 3  # one file per (architecture, seed)


def test_a_trained_wrn_is_cached_and_reused(tmp_path):
    from idefender_gpu.data import stand_in_dataset

    data = stand_in_dataset("cifar10", n_train=20, n_test=10)
    role, cpu = STAND_INS["cifar10"].roles[0], torch.device("cpu")
    first, info, _ = obtain_model(role, data, seed=5, epochs=1, device=cpu, cache=tmp_path)
    again, info_again, training = obtain_model(role, data, seed=5, epochs=1, device=cpu, cache=tmp_path)
    assert not info["cached"] and info_again["cached"] and info_again["path"] == info["path"]
    assert info_again["seed"] == 6 and "seed 6" in training  # seed + the role's offset
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values()))
    other, info_other, _ = obtain_model(role, data, seed=5, epochs=2, device=cpu, cache=tmp_path)
    assert not info_other["cached"] and info_other["path"] != info["path"]  # the training length keys the cache


def test_cifar10_without_data_prints_the_loaders_message(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    for experiment in ("semi-whitebox", "graybox", "adaptive"):
        code = main(["reproduce", experiment, "--dataset", "cifar10", "--data", str(empty), "--no-download",
                     "--out", str(tmp_path / "out"), "--quiet"])
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" not in err
        assert err.startswith(f"idefender-gpu: error: cifar10: the folder given by --data DIR, {empty}")
        assert "cifar-10-binary.tar.gz" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, message", [
    (["semi-whitebox", "--dataset", "imagenet"], "--dataset imagenet is not built yet"),
    (["semi-whitebox", "--dataset", "mnist", "--stand-in"], "--stand-in is available for cifar10, imagenet only"),
    (["graybox", "--stand-in", "--dataset", "cifar10", "--data", "x"], "--stand-in uses no data files"),
    (["graybox", "--stand-in", "--dataset", "cifar10", "--layers", "conv9"], "unknown layer 'conv9'"),
    (["semi-whitebox", "--stand-in", "--dataset", "cifar10", "--weights", "a", "--weights", "b"],
     "at most 1 file(s)"),
    (["graybox", "--stand-in", "--dataset", "cifar10", "--weights", "no-such.safetensors"], "no such file"),
])
def test_unsupported_combinations_are_one_line(tmp_path, capsys, argv, message):
    code = main(["reproduce", *argv, "--out", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and message in err.splitlines()[0] and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_adaptive_takes_cifar10():
    """Issue 14: ``reproduce adaptive`` runs on CIFAR-10 too, with ``--stand-in`` and ``--weights``
    (end to end in tests/test_reproduce_adaptive_cifar.py)."""
    from idefender_gpu.cli import build_parser

    args = build_parser().parse_args(["reproduce", "adaptive", "--dataset", "cifar10", "--stand-in",
                                      "--weights", "m.safetensors"])
    assert args.dataset == "cifar10" and args.stand_in and args.weights == ["m.safetensors"]
    assert "adaptive" in PROFILES["cifar10"].experiments and "adaptive" in STAND_INS["cifar10"].experiments


def test_weights_of_another_dataset_are_refused(tmp_path):
    from idefender_gpu.data import stand_in_dataset

    path = save_checkpoint(build_model("wrn-10-1"), tmp_path / "m.safetensors", {"dataset": "cifar10"})
    data = stand_in_dataset("cifar10", n_train=10, n_test=10)
    with pytest.raises(ValueError, match="trained on cifar10, not on cifar10-stand-in"):
        obtain_model(Role("Source", "wrn-10-1", 1, "x"), data, seed=0, epochs=1, device=torch.device("cpu"),
                     weights=path)
    with pytest.raises(ValueError, match="does not match|architecture"):  # another architecture
        obtain_model(Role("Source", "wrn-16-1", 1, "x"), data, seed=0, epochs=1, device=torch.device("cpu"),
                     weights=path)


def test_one_table_per_dataset():
    """What changes per dataset lives in the profiles: the real CIFAR-10 run uses the paper's
    networks and the detector layer ``hidden_layer`` names; the stand-in, narrow ones."""
    from idefender_gpu.models import hidden_layer

    real, stand_in = PROFILES["cifar10"], STAND_INS["cifar10"]
    assert [r.model for r in real.roles] == ["wrn-34-8", "wrn-34-8", "wrn-46-8"]
    assert real.layers == (hidden_layer("wrn-34-8"),) and real.epochs == 200 and real.paper_same_dataset
    assert [r.model for r in stand_in.roles] == ["wrn-10-1", "wrn-10-1", "wrn-16-1"] and stand_in.stand_in
    assert [r.seed_offset for r in real.roles] == [1, 2, 3] == [r.seed_offset for r in PROFILES["fashion-mnist"].roles]
    assert PROFILES["fashion-mnist"].layers == ("conv2",) and PROFILES["fashion-mnist"].epochs == 5
