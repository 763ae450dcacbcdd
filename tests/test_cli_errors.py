"""Issue 15: the command's error paths. Every mistake ends in one ``idefender-gpu: error: ...``
line (or argparse's one-line ``argument --x: ...``) and exit code 2, before any work starts:
no training, no data loaded where the mistake does not need the data. ``--debug`` gives the
traceback instead. Also: phase lines without a terminal, paths in results files, help text.

All in-process through :func:`idefender_gpu.cli.main` (fast), one test through the console
entry point as a subprocess.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import idefender_gpu
from idefender_gpu import exceptions
from idefender_gpu.cli import build_parser, main
from idefender_gpu.data import DATASETS, DatasetNotFoundError
from idefender_gpu.experiments import blackbox
from idefender_gpu.experiments._common import PhaseTimer, check_device, display_path
from idefender_gpu.experiments.blackbox import BlackboxConfig, run_blackbox

DEBIAN_DIR = Path(DATASETS["fashion-mnist"].debian_dir)
HAS_FASHION = (DEBIAN_DIR / "train-images-idx3-ubyte.gz").is_file()
BLACKBOX = ["reproduce", "blackbox", "--no-progress", "--no-download"]


@pytest.fixture(autouse=True)
def no_work(monkeypatch, tmp_path):
    """Loading data or training fails the test unless a test allows it: every error here must be
    raised before any work. Private cache; no $IDEFENDER_DATA."""
    monkeypatch.delenv("IDEFENDER_DATA", raising=False)
    monkeypatch.setenv("IDEFENDER_CACHE", str(tmp_path / "cache"))

    def forbidden(*args, **kwargs):
        raise AssertionError("work started before the options were checked")

    monkeypatch.setattr(blackbox, "load_or_train", forbidden)
    monkeypatch.setattr(blackbox, "load_or_train_substitute", forbidden)
    return forbidden


def run(argv, capsys):
    """``(exit code, stderr lines, stdout)`` of ``idefender-gpu argv``."""
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's usage errors and --version
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.err.splitlines(), captured.out


def assert_no_internal_names(lines):
    text = "\n".join(lines)
    assert "Traceback" not in text and "_positive_int" not in text and "invalid <" not in text


# --------------------------------------------------------------------------------------
# Options refused while parsing (argparse: "<prog>: error: argument --x: ...")
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv, first", [
    (["--device", "tpu"], "argument --device: device must be a torch device such as 'cpu', 'cuda' or "
                          "'cuda:1'; got 'tpu'"),
    (["--device", "cuda:99"] if torch.cuda.is_available() else ["--device", "cuda"],
     "argument --device: device 'cuda"),
    (["--layers", "conv3"], "argument --layers: must be layers of model F (conv1, relu1, conv2, relu2, "
                            "flatten, fc)"),
    (["--layers", "conv2,conv2"], "argument --layers: must be layers of model F"),
    (["--layers", ","], "argument --layers: must name at least one layer of model F; got ','"),
    (["--reg-covar", "-1"], "argument --reg-covar: must be a finite float >= 0 (such as 1e-4); got '-1'"),
    (["--reg-covar", "nan"], "argument --reg-covar: must be a finite float >= 0 (such as 1e-4); got 'nan'"),
    (["--reg-covar", "abc"], "argument --reg-covar: must be a float >= 0 (such as 1e-4); got 'abc'"),
    (["--epochs", "0"], "argument --epochs: must be a positive int (1, 2, ...); got '0'"),
    (["--epochs", "1.5"], "argument --epochs: must be a positive int (1, 2, ...); got '1.5'"),
    (["--seed", "-1"], "argument --seed: must be a non-negative int (0, 1, ...); got '-1'"),
    (["--threads", "0"], "argument --threads: must be a positive int (1, 2, ...); got '0'"),
    (["--n-other", "none"], "argument --n-other: must be a positive int or 'all'; got 'none'"),
    (["--holdout", "0"], "argument --holdout: must be a positive int (1, 2, ...); got '0'"),
    (["--covariance", "fulll"], "argument --covariance: invalid choice: 'fulll'"),
    (["--threat", "white-box"], "argument --threat: invalid choice: 'white-box'"),
    (["--dataset", "cifar10"], "argument --dataset: invalid choice: 'cifar10'"),
])
def test_bad_options_are_refused_while_parsing(argv, first, capsys):
    code, err, out = run(BLACKBOX + argv, capsys)
    assert code == 2 and out == ""
    assert err[0].startswith(f"idefender-gpu reproduce blackbox: error: {first}"), err
    assert err[1:] == ["(see 'idefender-gpu reproduce blackbox --help')"]
    assert_no_internal_names(err)


def test_unknown_command_and_missing_command(capsys):
    code, err, _ = run(["nope"], capsys)
    assert code == 2 and err[0].startswith("idefender-gpu: error: argument COMMAND: invalid choice: 'nope'")
    code, err, _ = run([], capsys)
    assert code == 2 and err[0].startswith("idefender-gpu: error: the following arguments are required")
    code, err, _ = run(["reproduce"], capsys)
    assert code == 2 and err[0].startswith("idefender-gpu reproduce: error: the following arguments are required")


# --------------------------------------------------------------------------------------
# Errors of the library, printed by main's handler ("idefender-gpu: error: ...")
# --------------------------------------------------------------------------------------


def test_holdout_larger_than_the_test_images_is_refused_before_any_data(monkeypatch, capsys):
    monkeypatch.setattr(idefender_gpu.data, "load_dataset", lambda *a, **k: pytest.fail("data loaded"))
    code, err, _ = run(BLACKBOX + ["--holdout", "100000", "--n-test", "500"], capsys)
    assert code == 2
    assert err[0] == ("idefender-gpu: error: holdout (--holdout) must be smaller than n_test (--n-test), the "
                      "test images in use: the rest is the evaluation set; got holdout 100000 and n_test 500")
    assert err[-1] == "(run again with --debug for the traceback)" and len(err) == 2


@pytest.mark.skipif(not HAS_FASHION, reason="Debian's dataset-fashion-mnist files are absent")
@pytest.mark.parametrize("argv, first", [
    (["--n-test", "20000"], "n_test (--n-test) must be at most 10000, the number of test images of "
                            f"fashion-mnist in {DEBIAN_DIR}; got 20000"),
    (["--n-train", "70000"], "n_train (--n-train) must be at most 60000, the number of training images of "
                             f"fashion-mnist in {DEBIAN_DIR}; got 70000"),
    (["--holdout", "10000"], "holdout (--holdout) must be smaller than the 10000 test images in use "
                             "(--n-test): the rest is the evaluation set; got 10000"),
    (["--n-train", "100", "--components", "20"],
     "every class needs at least max(2, n_components (--components)) = 20 training images for its mixture; "
     "class 8 (Bag) has 4 of the 100 in use (raise --n-train or lower --components)"),
])
def test_sample_counts_are_checked_against_the_dataset_before_training(argv, first, capsys):
    code, err, _ = run(BLACKBOX + ["--quiet"] + argv, capsys)
    assert code == 2 and err[0] == f"idefender-gpu: error: {first}", err


@pytest.mark.parametrize("how", ["--data", "IDEFENDER_DATA"])
def test_a_named_data_folder_is_used_or_refused(how, tmp_path, monkeypatch, capsys):
    missing = tmp_path / "nonexistent"
    if how == "--data":
        argv, given = ["--data", str(missing)], "the folder given by --data DIR"
    else:
        monkeypatch.setenv("IDEFENDER_DATA", str(missing))
        argv, given = [], "the folder named by IDEFENDER_DATA"
    code, err, _ = run(BLACKBOX + argv, capsys)
    assert code == 2
    assert err[0] == f"idefender-gpu: error: fashion-mnist: {given}, {missing}, does not exist."
    assert "  Looked in:" in err and f"    - {missing}" in err
    assert str(DEBIAN_DIR) not in "\n".join(err[:err.index("  To get them:")])  # never a fallback
    text = "\n".join(err)
    assert "--data DIR" in text and "root=DIR" not in text and "download=True" not in text
    assert_no_internal_names(err)
    assert not (tmp_path / "cache").exists()


def _no_local_mnist(monkeypatch, tmp_path):
    monkeypatch.setitem(DATASETS, "mnist", dataclasses.replace(DATASETS["mnist"],
                                                               debian_dir=str(tmp_path / "debian-mnist")))


def test_missing_data_with_the_default_download_and_no_network(tmp_path, monkeypatch, capsys):
    """Was a 48-line chained traceback with the helpful text buried inside."""
    _no_local_mnist(monkeypatch, tmp_path)
    calls = []

    class Offline:
        def __init__(self, root, train=True, download=False):
            calls.append(root)
            raw = Path(root) / "MNIST" / "raw"
            raw.mkdir(parents=True)
            (raw / "train-images-idx3-ubyte.gz").write_bytes(b"")  # torchvision's partial file
            raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried https://ossci-datasets"
                               ".s3.amazonaws.com/mnist/, got: <urlopen error [Errno -2] Name or service not known>")

    fake = types.ModuleType("torchvision")
    fake.datasets = types.SimpleNamespace(MNIST=Offline)
    monkeypatch.setitem(sys.modules, "torchvision", fake)
    code, err, _ = run(["reproduce", "blackbox", "--dataset", "mnist", "--no-progress"], capsys)
    assert code == 2 and len(calls) == 1
    assert err[0] == ("idefender-gpu: error: mnist: the IDX files were not found in the default folders (no "
                      "--data DIR or IDEFENDER_DATA given).")
    assert err[-2].startswith("  The download with torchvision failed too: RuntimeError: Error downloading "
                              "train-images-idx3-ubyte.gz: Tried https://")
    assert_no_internal_names(err)
    assert not (tmp_path / "cache").exists()  # the failed download left no folder behind


def test_mnist_without_files_and_no_download(tmp_path, monkeypatch, capsys):
    _no_local_mnist(monkeypatch, tmp_path)
    code, err, _ = run(BLACKBOX + ["--dataset", "mnist"], capsys)
    assert code == 2 and err[0].startswith("idefender-gpu: error: mnist: the IDX files were not found")
    assert "download with torchvision" not in "\n".join(err)


def test_unusable_output_folders_are_refused_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(idefender_gpu.data, "load_dataset", lambda *a, **k: pytest.fail("data loaded"))
    (tmp_path / "file").write_text("x")
    code, err, _ = run(BLACKBOX + ["--out", str(tmp_path / "file")], capsys)
    assert code == 2 and err[0] == f"idefender-gpu: error: --out {tmp_path / 'file'}: is a file, not a folder"
    code, err, _ = run(BLACKBOX + ["--cache", str(tmp_path / "file" / "models")], capsys)
    assert code == 2 and err[0] == (f"idefender-gpu: error: --cache {tmp_path / 'file' / 'models'}: "
                                    f"{tmp_path / 'file'} is a file, not a folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # nothing created


@pytest.mark.parametrize("error", [
    exceptions.NotPSDError("The covariance of group 3 is not positive definite: raise reg_covar"),
    exceptions.RankFailedError("rank 1 failed while fitting: ValueError: boom"),
    DatasetNotFoundError("fashion-mnist: gone"),
    PermissionError(13, "Permission denied", "/results/reproduce-fashion-mnist"),
    TypeError("x must be a Tensor; got list"),
])
def test_every_library_error_is_one_message(error, monkeypatch, capsys):
    monkeypatch.setattr(blackbox, "run_blackbox", lambda config: (_ for _ in ()).throw(error))
    code, err, _ = run(BLACKBOX + ["--quiet"], capsys)
    assert code == 2 and err[0] == f"idefender-gpu: error: {str(error).splitlines()[0]}"
    with pytest.raises(type(error)):
        main(BLACKBOX + ["--quiet", "--debug"])  # --debug after the subcommand
    with pytest.raises(type(error)):
        main(["--debug"] + BLACKBOX + ["--quiet"])  # or before it


def test_invalid_parameter_error_and_bugs(monkeypatch, capsys):
    def fail(config):
        BlackboxConfig(reg_covar=math.nan).validate()

    monkeypatch.setattr("idefender_gpu.experiments.blackbox.run_blackbox", fail)
    code, err, _ = run(BLACKBOX + ["--quiet"], capsys)
    assert code == 2 and err[0] == ("idefender-gpu: error: The 'reg_covar' parameter of BlackboxConfig must be "
                                    "a float in the range [0.0, inf). Got nan instead.")
    monkeypatch.setattr("idefender_gpu.experiments.blackbox.run_blackbox",
                        lambda config: (_ for _ in ()).throw(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):  # not the user's mistake: the traceback shows
        main(BLACKBOX + ["--quiet"])


@pytest.mark.slow  # a fresh interpreter imports torch: seconds on a busy machine
def test_console_script_exit_code_and_first_line(tmp_path):
    env = dict(os.environ, IDEFENDER_CACHE=str(tmp_path / "cache"))
    env.pop("IDEFENDER_DATA", None)
    done = subprocess.run([sys.executable, "-m", "idefender_gpu.cli", *BLACKBOX, "--data", str(tmp_path / "x")],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines()[0] == (f"idefender-gpu: error: fashion-mnist: the folder given by --data DIR, "
                                           f"{tmp_path / 'x'}, does not exist.")
    assert "Traceback" not in done.stderr


# --------------------------------------------------------------------------------------
# The config checks everything before any work (Python callers too)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("changes, error, match", [
    ({"reg_covar": -1.0}, exceptions.InvalidParameterError, r"The 'reg_covar' parameter of BlackboxConfig"),
    ({"n_components": 0}, exceptions.InvalidParameterError, r"The 'n_components' parameter"),
    ({"covariance_type": "ful"}, exceptions.InvalidParameterError, r"The 'covariance_type' parameter"),
    ({"threat_models": ("white-box",)}, exceptions.InvalidParameterError, r"The 'threat_models' parameter"),
    ({"layers": ("conv3",)}, ValueError, r"unknown layer 'conv3'"),
    ({"device": "tpu"}, ValueError, r"device must be a torch device"),
    ({"holdout": 0}, ValueError, r"holdout \(--holdout\) must be at least 1"),
    ({"holdout": 200, "n_test": 200}, ValueError, r"holdout \(--holdout\) must be smaller than n_test"),
])
def test_run_blackbox_checks_its_config_before_any_work(changes, error, match, monkeypatch):
    monkeypatch.setattr(idefender_gpu.data, "load_dataset", lambda *a, **k: pytest.fail("data loaded"))
    with pytest.raises(error, match=match):
        run_blackbox(BlackboxConfig(**{"device": "cpu", **changes}))


def test_default_config_is_valid():
    assert BlackboxConfig(device="cpu").validate() == torch.device("cpu")
    assert BlackboxConfig(device="cpu", substitute="trained", holdout=0).validate().type == "cpu"


def test_check_device():
    assert check_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="got 'tpu'"):
        check_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device 'cuda' is not available: .*use device 'cpu'"):
            check_device("cuda")
    with pytest.raises(ValueError, match="is not available"):
        check_device(f"cuda:{max(torch.cuda.device_count(), 1) + 7}")


# --------------------------------------------------------------------------------------
# Progress without a terminal, paths in results files
# --------------------------------------------------------------------------------------


def test_phases_log_one_line_each_with_seconds(capsys):
    from idefender_gpu.experiments.cli import phase_lines

    timer = PhaseTimer(torch.device("cpu"))
    with phase_lines():
        with timer("train", "model F: train 5 epochs"):
            pass
        with timer("score", label=False):
            pass
        with pytest.raises(KeyError):
            with timer("fit", "I-defender"):
                raise KeyError("x")
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3, err  # start and end of "model F"; start of "I-defender", never its end
    assert re.fullmatch(r"\d\d:\d\d:\d\d model F: train 5 epochs \.\.\.", err[0])
    assert re.fullmatch(r"\d\d:\d\d:\d\d model F: train 5 epochs: \d+\.\d s", err[1])
    assert re.fullmatch(r"\d\d:\d\d:\d\d I-defender \.\.\.", err[2])
    assert set(timer.seconds) == {"train", "score", "fit"}
    with phase_lines(quiet=True):
        with timer("train", "model E"):
            pass
    with timer("train", "outside the command"):  # the library alone prints nothing
        pass
    assert capsys.readouterr().err == ""
    assert not any(type(h).__name__ == "_StderrHandler" for h in logging.getLogger("idefender_gpu").handlers)


def test_display_path(tmp_path, monkeypatch):
    monkeypatch.setenv("IDEFENDER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    assert display_path(None) is None
    assert display_path(DEBIAN_DIR) == f"{DEBIAN_DIR} (Debian package dataset-fashion-mnist)"
    assert display_path(DEBIAN_DIR / "x.gz") == f"{DEBIAN_DIR / 'x.gz'} (Debian package dataset-fashion-mnist)"
    assert display_path(tmp_path / "cache" / "models") == "<cache>/models"
    assert display_path(tmp_path / "work" / "data") == "data"  # relative to the working folder
    assert display_path("data/mine") == "data/mine"
    assert display_path(tmp_path / "home" / "x" / "y") == "~/x/y"
    assert display_path("~/z") == "~/z"
    assert display_path(tmp_path / "elsewhere" / "models") == "<elsewhere>/models"  # e.g. /tmp/...


# --------------------------------------------------------------------------------------
# Help and version
# --------------------------------------------------------------------------------------


def test_version_and_top_level_help(capsys):
    code, _, out = run(["--version"], capsys)
    assert code == 0 and out.strip() == f"idefender-gpu {idefender_gpu.__version__}"
    code, _, out = run(["--help"], capsys)
    assert code == 0
    assert "Gaussian mixtures" in out and "I-defender" in out
    assert "bench" in out and "reproduce" in out and "--debug" in out and "--version" in out


def _leaves(parser):
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                yield from _leaves(child)
            return
    yield parser


def test_every_option_of_every_subcommand_has_help():
    leaves = list(_leaves(build_parser()))
    assert {leaf.prog for leaf in leaves} >= {"idefender-gpu reproduce blackbox", "idefender-gpu bench"}
    for leaf in leaves:
        assert leaf.description, leaf.prog
        for action in leaf._actions:
            if action.help is not None and action.help.startswith("==SUPPRESS"):
                continue
            assert action.help, (leaf.prog, action.option_strings)
        assert any("--debug" in a.option_strings for a in leaf._actions), leaf.prog


def test_results_folder_is_ignored_by_git():
    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        pytest.skip("not a git checkout")
    done = subprocess.run(["git", "check-ignore", "-q", "results/reproduce-fashion-mnist/results.json"],
                          cwd=root, capture_output=True, timeout=30)
    assert done.returncode == 0
