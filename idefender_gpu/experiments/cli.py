"""The ``reproduce`` subcommand of ``idefender-gpu``: the paper's experiments from one command.

``idefender-gpu reproduce blackbox --dataset fashion-mnist`` runs Section 4.1 (Tables 2-5,
Figures 2-5) and writes ``results.json``, ``report.md`` and ROC PNGs into ``--out``
(default ``results/reproduce-<dataset>``, a folder git ignores).

Wire it into the main parser with :func:`register`::

    from idefender_gpu.experiments.cli import register as register_experiments
    register_experiments(sub)      # sub = parser.add_subparsers(...)

Adding an experiment is one entry of :data:`EXPERIMENTS`: its help, its own options (the
common ones, :func:`add_common_options`, come for free) and the function that runs it.
Every option is checked while the command line is parsed (numbers, the device, layer
names), and the experiment's config checks the rest before any work
(:meth:`~idefender_gpu.experiments.blackbox.BlackboxConfig.validate`): a mistake costs
seconds, not a training run. Errors reach the user through ``idefender_gpu.cli.main``,
which prints them as one ``idefender-gpu: error: ...`` message (exit code 2).
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from idefender_gpu.experiments._options import (  # noqa: F401 (re-exported: idefender_gpu.cli uses them)
    _adaptive_options,
    _all_options,
    _blackbox_options,
    _graybox_options,
    _protocol_options,
    _select_options,
    _semiwhitebox_options,
    MNIST_FAMILY,
    add_common_options,
    count_or_all,
    device,
    eps_list,
    model_f_layers,
    non_negative_float,
    non_negative_int,
    positive_int,
)

__all__ = ["EXPERIMENTS", "Experiment", "add_common_options", "check_writable_folder", "phase_lines", "register"]



class _StderrHandler(logging.Handler):
    """Log records as plain lines on the current ``sys.stderr`` (through tqdm, so an open
    progress bar is redrawn below the line instead of being broken)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # pragma: no cover - never let logging break a run
            self.handleError(record)


@contextmanager
def phase_lines(quiet: bool = False) -> Iterator[None]:
    """Inside, the library's log lines (one per phase: logger ``idefender_gpu.experiments``;
    and any other ``idefender_gpu`` logger's INFO lines) go to stderr with the time of day;
    ``quiet``: only warnings. The logger is restored on exit."""
    logger = logging.getLogger("idefender_gpu")
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def check_writable_folder(path: Path, option: str) -> None:
    """Refuse, before any work, an output folder that cannot be created or written (the run
    would otherwise fail at its end). Creates nothing."""
    import os

    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{option} {path}: is a file, not a folder")
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise NotADirectoryError(f"{option} {path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"{option} {path}: {existing} is not writable")


def _default_device(args: argparse.Namespace) -> str:
    import torch

    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def _run(experiment: "Experiment", args: argparse.Namespace) -> int:
    """Every experiment's run: torch's threads, the phase lines, then ``experiment.run``."""
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    with phase_lines(args.quiet):
        return experiment.run(args)


# --------------------------------------------------------------------------------------
# blackbox
# --------------------------------------------------------------------------------------



def _blackbox(args: argparse.Namespace) -> int:
    from idefender_gpu.experiments.blackbox import ABLATION, BlackboxConfig, run_blackbox
    from idefender_gpu.experiments.report import format_fgsm_table, write_outputs

    threats = {"both": ("black-box", "semi-white-box"), "black-box": ("black-box",),
               "semi-white-box": ("semi-white-box",)}[args.threat]
    config = BlackboxConfig(
        dataset=args.dataset, data=args.data, seed=args.seed, epochs=args.epochs or 5,
        n_train=args.n_train, n_test=args.n_test, n_other=args.n_other, n_calibrate=args.n_calibrate,
        device=_default_device(args),
        progress=False if args.no_progress else None, download=not args.no_download,
        cache=args.cache, substitute=args.substitute, holdout=args.holdout, n_holdout=args.n_holdout,
        layers=tuple(args.layers), n_components=args.components,
        covariance_type=args.covariance, reg_covar=args.reg_covar, batch_size=args.batch_size,
        threat_models=threats, ablation=ABLATION if args.ablation else (),
    )
    config.validate()  # before any work (and again inside run_blackbox, for Python callers)
    out = Path(args.out or f"results/reproduce-{args.dataset}")
    check_writable_folder(out, "--out")
    if args.cache is not None:
        check_writable_folder(Path(args.cache), "--cache")
    started = time.perf_counter()
    results = run_blackbox(config)
    paths = write_outputs(results, out)
    print(format_fgsm_table(results))
    print()
    print(f"{results['dataset']}: seed {results['seed']}, wall time {time.perf_counter() - started:.0f} s "
          f"on {results['machine']['device']}")
    for path in paths.values():
        print(f"wrote {path}")
    return 0


# --------------------------------------------------------------------------------------
# semi-whitebox, graybox, adaptive (the protocols of issue 13; on CIFAR-10, issue 14) and all
# --------------------------------------------------------------------------------------

#: the datasets of the protocols that run beyond the MNIST family (the others are refused in one line)
PROTOCOL_DATASETS = ("fashion-mnist", "mnist", "cifar10", "imagenet")


def _fill_kept_defaults(args: argparse.Namespace, add_options: Callable[[argparse.ArgumentParser], None],
                       values: dict) -> None:
    """Set each of ``values`` (option name, ``_`` for ``-`` -> value) on ``args`` where the user
    kept the default that ``add_options`` gives the option."""
    parser = argparse.ArgumentParser(add_help=False)
    add_options(parser)
    defaults = vars(parser.parse_args([]))
    for key, value in values.items():
        if getattr(args, key) == defaults[key]:
            setattr(args, key, value)


def _protocol_kwargs(args: argparse.Namespace, experiment: str) -> dict:
    """The :class:`ProtocolConfig` fields from the arguments, after checking that ``experiment``
    runs on the dataset (``--stand-in``: the stand-in sizes wherever an option keeps its default)."""
    from idefender_gpu.experiments._datasets import (DATASET_DEFAULTS, STAND_IN_DATASET_SIZES, STAND_IN_SIZES,
                                                     check_supported)

    stand_in = bool(getattr(args, "stand_in", False))
    check_supported(experiment, args.dataset, stand_in)  # one line for what is not built
    if stand_in and args.data is not None:
        raise ValueError("--stand-in uses no data files: drop --data (or drop --stand-in to use them)")
    sizes = dict(DATASET_DEFAULTS.get(args.dataset, {}))  # then the stand-in's, which win
    if stand_in:
        sizes.update({**STAND_IN_SIZES, **STAND_IN_DATASET_SIZES.get(args.dataset, {})})
    _fill_kept_defaults(args, _protocol_options, sizes)
    return dict(dataset=args.dataset, data=args.data, seed=args.seed, epochs=args.epochs, n_train=args.n_train,
                n_test=args.n_test, n_holdout=args.n_holdout, n_attack=args.n_attack, n_calibrate=args.n_calibrate,
                device=_default_device(args), progress=False if args.no_progress else None,
                download=not args.no_download, cache=args.cache,
                layers=None if args.layers is None else tuple(args.layers),
                n_components=args.components, covariance_type=args.covariance, reg_covar=args.reg_covar,
                batch_size=args.batch_size, stand_in=stand_in, weights=tuple(getattr(args, "weights", None) or ()),
                workers=getattr(args, "workers", None))


def _run_protocol(args: argparse.Namespace, name: str, config, run, markdown) -> int:
    from idefender_gpu.experiments._outputs import write

    config.validate()  # before any work (and again inside run, for Python callers)
    suffix = "-stand-in" if config.stand_in else ""
    out = Path(args.out or f"results/{name}-{args.dataset}{suffix}")
    check_writable_folder(out, "--out")
    if args.cache is not None:
        check_writable_folder(Path(args.cache), "--cache")
    started = time.perf_counter()
    results = run(config)
    paths = write(results, out, markdown)
    print(f"{results['dataset']} {name}: seed {results['seed']}, wall time {time.perf_counter() - started:.0f} s "
          f"on {results['machine']['device']}")
    for path in paths.values():
        print(f"wrote {path}")
    return 0



def _semiwhitebox(args: argparse.Namespace) -> int:
    from idefender_gpu.experiments.semiwhitebox import SemiWhiteboxConfig, markdown, run_semiwhitebox

    from idefender_gpu.experiments._datasets import STAND_IN_SEARCH

    kwargs = _protocol_kwargs(args, "semi-whitebox")
    search = dict(STAND_IN_SEARCH) if kwargs["stand_in"] else {}
    if search:
        _fill_kept_defaults(args, _semiwhitebox_options, {"tolerance": search.pop("tolerance")})
    config = SemiWhiteboxConfig(**kwargs, tolerance=args.tolerance, **search)
    return _run_protocol(args, "semi-whitebox", config, run_semiwhitebox, markdown)



def _graybox(args: argparse.Namespace) -> int:
    from idefender_gpu.experiments.graybox import GrayboxConfig, markdown, run_graybox

    from idefender_gpu.experiments._datasets import STAND_IN_STEPS

    kwargs = _protocol_kwargs(args, "graybox")
    config = GrayboxConfig(**kwargs, wide=not args.no_wide, steps=STAND_IN_STEPS if kwargs["stand_in"] else 10,
                           eps_scale=args.eps_scale)
    return _run_protocol(args, "graybox", config, run_graybox, markdown)



def _adaptive(args: argparse.Namespace) -> int:
    from idefender_gpu.experiments.adaptive import STAND_IN_ATTACK, AdaptiveConfig, markdown, run_adaptive

    kwargs = _protocol_kwargs(args, "adaptive")
    if kwargs["stand_in"]:  # the stand-in's small counts wherever the user kept the defaults
        _fill_kept_defaults(args, _adaptive_options,
                            {"steps": STAND_IN_ATTACK["steps"], "targets": STAND_IN_ATTACK["n_targets"]})
    config = AdaptiveConfig(**kwargs, eps=args.eps, steps=args.steps, n_restarts=args.restarts,
                            n_targets=args.targets, external=not args.no_external)
    return _run_protocol(args, "adaptive", config, run_adaptive, markdown)



def _select(args: argparse.Namespace) -> int:
    from idefender_gpu.experiments.selection import SelectConfig, run_select, write_select

    config = SelectConfig(dataset=args.dataset, data=args.data, seed=args.seed,
                          epochs_grid=args.select_epochs or (args.epochs or 5,), n_train=args.n_train,
                          n_test=args.n_test, n_validation=args.n_validation, holdout=args.holdout,
                          n_holdout=args.n_holdout, test=not args.no_test, device=_default_device(args),
                          progress=False if args.no_progress else None, download=not args.no_download,
                          cache=args.cache, batch_size=args.batch_size)
    config.validate()  # before any work
    out = Path(args.out or f"results/select-{args.dataset}")
    check_writable_folder(out, "--out")
    if args.cache is not None:
        check_writable_folder(Path(args.cache), "--cache")
    results = run_select(config)
    paths = write_select(results, out)
    print(f"{results['dataset']} select: chose {results['chosen']['layers']}, K={results['chosen']['n_components']}, "
          f"{results['chosen']['covariance_estimator']}, F {results['chosen']['epochs']} epochs; wall time "
          f"{results['timings']['total']:.0f} s")
    for path in paths.values():
        print(f"wrote {path}")
    return 0


#: the options ``reproduce all`` passes on to every experiment
_ALL_FORWARDED = ("dataset", "data", "no_download", "seed", "epochs", "device", "threads", "cache", "no_progress",
                  "quiet", "n_train", "n_test")



def _all(args: argparse.Namespace) -> int:
    """Every experiment with its defaults, one after the other, into ``--out/<name>``; the
    cached models are trained once and reused."""
    out = Path(args.out or f"results/reproduce-all-{args.dataset}")
    check_writable_folder(out, "--out")
    started = time.perf_counter()
    for name, experiment in EXPERIMENTS.items():
        if name in ("all", "select"):
            continue
        leaf = argparse.ArgumentParser(prog=f"reproduce {name}")
        add_common_options(leaf)
        experiment.options(leaf)
        sub = leaf.parse_args([])
        for key in _ALL_FORWARDED:
            setattr(sub, key, getattr(args, key))
        sub.out = str(out / name)
        code = experiment.run(sub)
        if code:
            return code
    print(f"reproduce all: wall time {time.perf_counter() - started:.0f} s")
    return 0


# --------------------------------------------------------------------------------------
# The table of experiments and the parser
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Experiment:
    """One ``idefender-gpu reproduce <name>`` subcommand."""

    help: str
    description: str
    #: adds the experiment's own options (the common ones are added for every experiment)
    options: Callable[[argparse.ArgumentParser], None]
    #: runs it from the parsed arguments; returns the exit code
    run: Callable[[argparse.Namespace], int]
    #: its ``--dataset`` choices
    datasets: tuple[str, ...] = MNIST_FAMILY


#: name -> experiment. A new experiment is one entry (and its two functions).
EXPERIMENTS: dict[str, Experiment] = {
    "blackbox": Experiment(
        help="Section 4.1: FGSM/BIM/L2/DeepFool crafted on model E against model F (Tables 2-5, "
             "Figures 2-5), plus the semi-white-box variant",
        description="The paper's black-box experiment (Section 4.1) on MNIST or Fashion-MNIST: trains "
                    "models E and F (or loads their cached checkpoints), fits I-defender on F's hidden "
                    "states, attacks, and writes results.json, report.md (the paper's numbers beside "
                    "ours) and ROC PNGs into --out. About 4 minutes on a 2-core CPU with the defaults.",
        options=_blackbox_options, run=_blackbox),
    "semi-whitebox": Experiment(
        help="Section 4.2 (Table 6 protocol): attack strengths bisected to the paper's adversarial accuracies, "
             "ID-95 / ID-99 detection on balanced sets",
        description="The paper's semi-white-box protocol on model F (Fashion-MNIST, MNIST) or WRN-34-8 "
                    "(CIFAR-10; --weights FILE, or trained and cached): FGSM, Iter-Linf, Iter-L2 and DeepFool "
                    "strengths found by bisection so that the model's adversarial accuracy hits each Table 6 "
                    "target; AUC and ID-95 / ID-99 (held-out and training-data thresholds) beside the paper's "
                    "CIFAR-10 values. --stand-in: the CIFAR-10 pipeline in seconds on random images (not a "
                    "reproduction). Writes results.json, report.md and ROC PNGs into --out.",
        options=_semiwhitebox_options, run=_semiwhitebox, datasets=PROTOCOL_DATASETS),
    "graybox": Experiment(
        help="Section 4.3 (Tables 7-8 protocol): Eq. 6 crafted on Source, evaluated on Source, Target and a "
             "wider network",
        description="The paper's gray-box protocol: Source and Target (model F, or WRN-34-8 on CIFAR-10; seeds "
                    "seed+1, seed+2) and a bigger network (a 1.5x wider F, or WRN-46-8), each with its own "
                    "I-defender; GrayBox (Eq. 6) crafted on Source with alpha in {0, 1e-3, 1e-2, 1e-1, 1} "
                    "(CIFAR-10: the paper's 1e-3, 1e-2, 1e-1 and eps; ImageNet, Table 9: two VGG19s from "
                    "--weights SOURCE --weights TARGET, --data ROOT, alpha 1e-2, 1e-1, 1, run one model at a time). "
                    "--stand-in: the CIFAR-10 or ImageNet pipeline in seconds on random images (not a "
                    "reproduction). Writes results.json, report.md and ROC PNGs into --out.",
        options=_graybox_options, run=_graybox, datasets=PROTOCOL_DATASETS),
    "adaptive": Experiment(
        help="adaptive white-box attacker (MarginPGD on DefendedModel) at the dataset's Linf eps, beside "
             "Mahalanobis, no detector, torchattacks and ART",
        description="An attacker who knows the detector (beyond the paper): model F (Fashion-MNIST, MNIST) or "
                    "WRN-34-8 (CIFAR-10; --weights FILE, or trained and cached) and its I-defender wrapped as one "
                    "model and attacked end to end; success rate at 5% false rejects (held-out thresholds), "
                    "accuracy with rejection and AUC at Linf eps 0.05/0.1/0.2/0.3 (CIFAR-10: 2/255, 4/255, 8/255, "
                    "16/255). --stand-in: the CIFAR-10 pipeline in seconds on random images (not a reproduction). "
                    "Writes results.json, report.md and ROC PNGs into --out.",
        options=_adaptive_options, run=_adaptive, datasets=PROTOCOL_DATASETS),
    "select": Experiment(
        help="the detector's layer, K and covariance estimator (and F's training length) chosen on a validation "
             "split of the training data, then their test AUCs beside the default's and the paper's",
        description="Splits the last --n-validation training images off, fits model F, its substitute and every "
                    "candidate detector on the rest, picks the setting with the best mean black-box FGSM AUC at "
                    "eps 0.10/0.15 on the validation split, then reports its test AUCs beside the default's, the "
                    "shrinkage estimators' and the paper's. Writes report.md, results.json and test/ into --out.",
        options=_select_options, run=_select),
    "all": Experiment(
        help="blackbox, semi-whitebox, graybox and adaptive with their defaults, into --out/<name>",
        description="Runs the four reproductions one after the other (cached models reused) into "
                    "--out/<experiment>.",
        options=_all_options, run=_all),
}


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``reproduce`` subcommand (one leaf per :data:`EXPERIMENTS` entry) to an
    ``add_subparsers`` object.

    Returns
    -------
    parser : argparse.ArgumentParser
        The ``reproduce`` parser. Each leaf sets ``func`` (call ``args.func(args)``).
    """
    reproduce = subparsers.add_parser(
        "reproduce", help="reproduce the paper's experiments: reproduce blackbox | semi-whitebox | graybox | "
                          "adaptive | select | all (markdown report, JSON, ROC PNGs)",
        description="Reproduce the I-defender paper's experiments (Zheng & Hong, 2018).")
    which = reproduce.add_subparsers(dest="experiment", required=True, metavar="EXPERIMENT",
                                     title="experiments")
    for name, experiment in EXPERIMENTS.items():
        leaf = which.add_parser(name, help=experiment.help, description=experiment.description)
        add_common_options(leaf, experiment.datasets)
        experiment.options(leaf)
        leaf.set_defaults(func=functools.partial(_run, experiment))
    return reproduce
