"""``reproduce graybox --dataset imagenet`` (Table 9) and the ImageNet adaptive path: the stand-in
end to end over loaders, the cache, ``--eps-scale``, the seeded stratified val split on a tiny
on-disk ImageNet-layout folder, and the real path's refusals (exit code 2, one line).

No VGG19 runs here (not even a forward pass): the stand-in is a narrow VGG19 on 64 x 64 crops.
"""

from __future__ import annotations

import json
import types
import warnings

import pytest
import torch

from idefender_gpu.cli import main
from idefender_gpu.experiments._datasets import PROFILES, STAND_IN_NOTE, STAND_INS
from idefender_gpu.experiments._loaders import load_streamed, split_val
from idefender_gpu.experiments.paper import IMAGENET_TABLE

#: the stand-in's sizes: 60 training images, 40 val (20 held out), 4 attacked
TINY = ["--dataset", "imagenet", "--stand-in", "--n-train", "60", "--n-test", "40", "--n-holdout", "20",
        "--n-attack", "4", "--n-calibrate", "60", "--workers", "0", "--quiet", "--no-progress", "--threads", "1"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny ImageNet layout: train/ and val/, 3 classes x 6 PNGs each (val sorted by class)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("imagenet")
    gen = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for c, synset in enumerate(("n01440764", "n01443537", "n01484850")):
            (root / split / synset).mkdir(parents=True)
            for i in range(6):
                pixels = (torch.rand(20, 24, 3, generator=gen) * 255).to(torch.uint8).numpy()
                Image.fromarray(pixels).save(root / split / synset / f"{synset}_{i}.png")
    return root


def _outputs(out):
    return (out / "report.md").read_text(), json.loads((out / "results.json").read_text())


@pytest.mark.slow
def test_graybox_stand_in_end_to_end_then_adaptive_from_the_cache(tmp_path, capsys):
    """Table 9's pipeline on the stand-in: two VGG19/8s trained (seeds 1, 2) and cached, Source's
    detector, nine adversarial sets, then Target's. Then ``reproduce adaptive --dataset imagenet``'s
    path (``run_adaptive``: Source only, through ``begin_single_model`` over the loaders) loads
    Source from the cache; and ``--weights`` naming one file twice warns and says so in the report."""
    cache = tmp_path / "cache"
    assert main(["reproduce", "graybox", *TINY, "--cache", str(cache), "--out", str(tmp_path / "a")]) == 0
    report, results = _outputs(tmp_path / "a")
    assert report.splitlines()[0] == STAND_IN_NOTE  # first line: not a reproduction
    assert "(Table 9) on imagenet-stand-in" in report and "70.892 / 62.685" in report
    assert results["stand_in"] is True and results["dataset"] == "imagenet-stand-in"
    assert results["architectures"] == {"Source": "vgg19-narrow", "Target": "vgg19-narrow"}
    assert [results["models"][m]["seed"] for m in ("Source", "Target")] == [1, 2]
    assert not any(info["cached"] for info in results["models"].values())
    assert results["data"] == {**results["data"], "n_train": 60, "n_eval": 20, "n_holdout": 20, "n_attack": 4}
    assert results["detector"]["layers"] == ["classifier.6:input"] and results["detector"]["n_features"] == 128
    profile = PROFILES["imagenet"]
    assert results["config"]["alphas"] == [1e-2, 1e-1, 1.0] == list(profile.alphas)
    assert results["config"]["eps_scale"] == 1.0 and results["config"]["workers"] == 0
    assert results["config"]["batch_size"] == 64  # ImageNet's default where --batch-size is not given
    assert [(r["attack"], r["eps"], r["alpha"]) for r in results["records"]] == [
        (label, eps, alpha) for label, _, eps in profile.graybox_attacks for alpha in profile.alphas]
    for record in results["records"]:
        assert "Wide" not in record and record["n"] == 4 and record["paper_attack"] == record["attack"]
        assert 0.0 <= record["Source"]["adv_acc"] <= 1.0 and record["Source"]["auc"] is None  # model only
        assert 0.0 <= record["Target"]["adv_acc"] <= 1.0 and 0.0 <= record["Target"]["auc"] <= 1.0
        assert "paper_target" not in record  # a stand-in is not paired with the paper's numbers
    assert {row["model"] for row in results["thresholds"]} == {"Target"}
    assert (tmp_path / "a" / "roc_graybox_target.png").stat().st_size > 0
    assert len(list(cache.glob("*.safetensors"))) == 2
    assert "imagenet-stand-in graybox" in capsys.readouterr().out

    from idefender_gpu.experiments.adaptive import AdaptiveConfig, run_adaptive

    config = AdaptiveConfig(dataset="imagenet", stand_in=True, eps=(8 / 255,), steps=2, n_targets=1,
                            external=False, n_train=60, n_test=40, n_holdout=20, n_attack=3, n_calibrate=60,
                            cache=str(cache), device="cpu", progress=False, workers=0)
    adaptive = run_adaptive(config)
    assert adaptive["dataset"] == "imagenet-stand-in" and adaptive["stand_in"] is True
    assert adaptive["data"]["n_eval"] == 20 and adaptive["data"]["n_attack"] == 3
    assert adaptive["models"]["vgg19-narrow"]["cached"] is True  # graybox's Source, from the cache
    assert adaptive["models"]["vgg19-narrow"]["test_accuracy"] == results["models"]["Source"]["test_accuracy"]
    attacked = {(r["defence"], r["attack"]) for r in adaptive["records"]}
    assert {("I-defender", "MarginPGD"), ("Mahalanobis", "MarginPGD"), ("none", "MarginPGD")} <= attacked
    assert all(r["n"] == 3 for r in adaptive["records"])
    assert {row["detector"] for row in adaptive["thresholds"]} == {"idefender", "mahalanobis"}

    source = next(cache.glob("*-seed1-*.safetensors"))  # the same file twice: gray-box becomes white-box
    with pytest.warns(UserWarning, match="same file for Source and Target"):
        assert main(["reproduce", "graybox", *TINY, "--n-attack", "1", "--out", str(tmp_path / "b"),
                     "--weights", str(source), "--weights", str(source)]) == 0
    report, same = _outputs(tmp_path / "b")
    assert "this gray-box run is a white-box one" in same["notes"][0] and "white-box one" in report
    assert [same["models"][m]["checkpoint"] for m in ("Source", "Target")] == [source.name] * 2
    # the same weights: Target's accuracy, taken from its natural scores, is Source's, from the loader pass
    assert same["models"]["Target"]["test_accuracy"] == same["models"]["Source"]["test_accuracy"] is not None


def test_eps_scale_divides_every_graybox_eps(capsys):
    from idefender_gpu.experiments.graybox import GrayboxConfig

    config = GrayboxConfig(dataset="imagenet", stand_in=True, eps_scale=255)
    alphas, attacks = config.resolved()
    assert alphas == (1e-2, 1e-1, 1.0)
    assert attacks[0] == ("FGSM eps=0.3 / 255", "fgsm", pytest.approx(0.3 / 255))
    assert config.to_json()["eps_scale"] == 255 and config.to_json()["attacks"][2][2] == pytest.approx(12.5 / 255)
    assert GrayboxConfig(dataset="cifar10").resolved()[1] == PROFILES["cifar10"].graybox_attacks  # default 1
    with pytest.raises(SystemExit) as exc:
        main(["reproduce", "graybox", "--dataset", "imagenet", "--stand-in", "--eps-scale", "0"])
    assert exc.value.code == 2 and "must be a finite float > 0" in capsys.readouterr().err


def test_the_val_split_is_seeded_stratified_and_holds_every_class(folder):
    from idefender_gpu.data import imagenet_folder

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # 3 class folders, not 1000
        labels = torch.as_tensor(imagenet_folder(folder, "val").targets)
    assert labels.tolist() == sorted(labels.tolist())  # val is sorted by class: "the last N" would be wrong
    eval_idx, held = split_val(labels, 6, seed=0)
    assert torch.bincount(labels[held], minlength=3).tolist() == [2, 2, 2]  # stratified, every class
    assert sorted(torch.cat([eval_idx, held]).tolist()) == list(range(18))  # a partition
    assert held.tolist() == sorted(held.tolist()) and len(set(labels[eval_idx[:3]].tolist())) > 1  # shuffled
    again, held_again = split_val(labels, 6, seed=0)
    other, held_other = split_val(labels, 6, seed=1)
    assert torch.equal(again, eval_idx) and torch.equal(held_again, held)
    assert not torch.equal(other, eval_idx) or not torch.equal(held_other, held)
    uneven, held_uneven = split_val(labels, 7, seed=0, n_test=15)  # proportional, largest remainders first
    assert len(held_uneven) == 7 and len(uneven) == 8 and set(labels[held_uneven].tolist()) == {0, 1, 2}
    with pytest.raises(ValueError, match=r"must hold every class; classes \[2\] get none"):
        split_val(labels, 2, seed=0)
    with pytest.raises(ValueError, match=r"n_holdout \(--n-holdout\) must be smaller than the 18 images"):
        split_val(labels, 18, seed=0)


def test_the_loaders_read_the_folder(folder):
    config = types.SimpleNamespace(stand_in=False, data=str(folder), seed=0, n_train=12, n_test=None, n_holdout=6,
                                   n_calibrate=6, n_components=1, workers=0, batch_size=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        data = load_streamed(config, torch.device("cpu"))
    assert data.n_classes == 3 and data.n_train == 12 and not data.stand_in
    assert torch.bincount(data.y_train, minlength=3).min() >= 2  # checked for the mixtures
    x, y = data.tensors("holdout")
    assert x.shape == (6, 3, 224, 224) and 0 <= float(x.min()) and float(x.max()) <= 1
    assert torch.equal(y, data.labels("holdout")) and torch.bincount(y).tolist() == [2, 2, 2]
    assert sum(len(b[1]) for b in data.loader("train")) == 12  # re-iterable, the subset only
    assert torch.equal(data.tensors("eval", 3)[1], data.labels("eval")[:3])
    calibrate = data.labels("calibrate")  # train/ is sorted by class: a stratified subset, not the first 6
    assert len(calibrate) == 6 and set(calibrate.tolist()) == {0, 1, 2} != set(data.y_train[:6].tolist())
    assert torch.equal(torch.cat([y for _, y in data.loader("calibrate")]), calibrate)


@pytest.mark.parametrize("extra, message", [
    ([], "--dataset imagenet needs --data ROOT"),
    (["--data", "DATA", "--weights", "W1"], "needs 2 --weights FILE (Source, Target, in that order"),
    (["--data", "NOWHERE", "--weights", "W1", "--weights", "W2"], "imagenet: the ImageNet root folder"),
    (["--data", "DATA", "--weights", "W1", "--weights", "W2", "--weights", "W1"], "at most 2 file(s)"),
    (["--data", "DATA", "--weights", "W1", "--weights", "W2", "--n-holdout", "10", "--n-attack", "2"],
     "does not match VGG19: missing"),
])
def test_the_real_path_refuses_in_one_line(tmp_path, folder, capsys, extra, message):
    """No --data, too few --weights, a folder that is not there, weights of another architecture."""
    from safetensors.torch import save_file

    save_file({"conv.weight": torch.zeros(2, 2)}, str(tmp_path / "w1.safetensors"))  # not a VGG19
    save_file({"conv.weight": torch.zeros(2, 2)}, str(tmp_path / "w2.safetensors"))
    paths = {"DATA": str(folder), "NOWHERE": str(tmp_path / "nowhere"), "W1": str(tmp_path / "w1.safetensors"),
             "W2": str(tmp_path / "w2.safetensors")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        code = main(["reproduce", "graybox", "--dataset", "imagenet", *[paths.get(a, a) for a in extra],
                     "--workers", "0", "--out", str(tmp_path / "out"), "--quiet", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.startswith("idefender-gpu: error: ") and message in err.splitlines()[0]
    assert not (tmp_path / "out").exists()


def test_one_profile_for_table_9():
    real, stand_in = PROFILES["imagenet"], STAND_INS["imagenet"]
    assert [r.model for r in real.roles] == ["vgg19", "vgg19"] and real.layers == ("classifier.6:input",)
    assert [(base, eps) for _, base, eps in real.graybox_attacks] == [("fgsm", 0.3), ("bim", 0.019), ("l2", 12.5)]
    assert real.streamed and real.weights_hint and real.experiments == {"graybox", "adaptive"}
    assert set(IMAGENET_TABLE) == set(real.alphas) and all(
        set(row) == {label for label, _, _ in real.graybox_attacks} for row in IMAGENET_TABLE.values())
    assert [r.model for r in stand_in.roles] == ["vgg19-narrow"] * 2 and stand_in.weights_hint is None


def test_the_stand_in_network_is_a_narrow_vgg19_that_survives_reinitialisation():
    """``vgg19-narrow`` has VGG19's module and state-dict names (the same detector layer), and
    its layers re-initialise He normal: ``models.train`` resets every layer, and with PyTorch's
    default initialisation this plain 19-layer network outputs a constant (it never trained)."""
    from idefender_gpu.features import parse_layers
    from idefender_gpu.models import VGG19, build_model, hidden_layer

    narrow = build_model("vgg19-narrow", 10)
    with torch.device("meta"):
        full = VGG19(1000, init_weights=False)
    assert list(narrow.state_dict()) == list(full.state_dict())
    assert [n for n, _ in narrow.named_modules()] == [n for n, _ in full.named_modules()]
    assert hidden_layer("vgg19-narrow") == "classifier.6:input" and parse_layers(narrow, ["classifier.6:input"])
    assert narrow.classifier[6].in_features == 128 and narrow.features[0].out_channels == 8
    torch.manual_seed(0)
    for module in narrow.modules():  # what models.train does first
        if hasattr(module, "reset_parameters") and module is not narrow:
            module.reset_parameters()
    with torch.no_grad():
        out = narrow.eval()(torch.rand(4, 3, 64, 64))  # (4, 10)
    assert out.shape == (4, 10) and float(out.std(0).mean()) > 1e-3


@pytest.mark.parametrize("extra, n_holdout, batch_size", [
    ([], 25000, 64),  # ImageNet's defaults: 25 held-out images per class, VGG19-sized batches
    (["--n-holdout", "5000", "--batch-size", "32"], 5000, 32),  # the user's choice wins
    (["--stand-in"], 20, 64),  # the stand-in's sizes win over ImageNet's defaults
])
def test_imagenet_defaults_fill_only_what_the_user_left(extra, n_holdout, batch_size):
    import argparse

    from idefender_gpu.experiments import cli as experiments_cli

    parser = argparse.ArgumentParser()
    experiments_cli.register(parser.add_subparsers())
    args = parser.parse_args(["reproduce", "graybox", "--dataset", "imagenet", *extra])
    kwargs = experiments_cli._protocol_kwargs(args, "graybox")
    assert (kwargs["n_holdout"], kwargs["batch_size"]) == (n_holdout, batch_size)
