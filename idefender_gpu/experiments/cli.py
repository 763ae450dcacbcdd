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
import math
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

__all__ = ["EXPERIMENTS", "Experiment", "add_common_options", "check_writable_folder", "phase_lines", "register"]


# --------------------------------------------------------------------------------------
# Option types: argparse shows their messages as "argument --epochs: must be ..."
# --------------------------------------------------------------------------------------


def _int_at_least(low: int, what: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}; got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be {what}; got {text!r}")
        return value

    parse.__name__ = what
    return parse


positive_int = _int_at_least(1, "a positive int (1, 2, ...)")
non_negative_int = _int_at_least(0, "a non-negative int (0, 1, ...)")


def count_or_all(text: str) -> int | None:
    """A positive int, or ``all`` (None)."""
    if text.lower() == "all":
        return None
    try:
        return positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"must be a positive int or 'all'; got {text!r}") from None


count_or_all.__name__ = "count or 'all'"


def non_negative_float(text: str) -> float:
    """A finite float >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a float >= 0 (such as 1e-4); got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite float >= 0 (such as 1e-4); got {text!r}")
    return value


non_negative_float.__name__ = "non-negative float"


def device(text: str) -> str:
    """A torch device this machine has (``cpu``, ``cuda``, ``cuda:1``, ...)."""
    from idefender_gpu.experiments._common import check_device

    try:
        return str(check_device(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


device.__name__ = "device"


def model_f_layers(text: str) -> tuple[str, ...]:
    """Comma-separated layer specs of model F, resolved against an untrained model F."""
    from idefender_gpu.features import parse_layers
    from idefender_gpu.models import build_model

    layers = tuple(part.strip() for part in text.split(",") if part.strip())
    if not layers:
        raise argparse.ArgumentTypeError(f"must name at least one layer of model F; got {text!r}")
    model = build_model("F")
    try:
        parse_layers(model, list(layers))
    except ValueError:
        names = ", ".join(name for name, _ in model.named_modules() if name)
        raise argparse.ArgumentTypeError(
            f"must be layers of model F ({names}), each optionally with ':input' or ':output', "
            f"comma-separated and each once; got {text!r}") from None
    return layers


model_f_layers.__name__ = "layers of model F"


# --------------------------------------------------------------------------------------
# Options every experiment has, and logging of the phases
# --------------------------------------------------------------------------------------


def add_common_options(parser: argparse.ArgumentParser) -> None:
    """The options every experiment takes: data, output, seed, device, progress, cache."""
    parser.add_argument("--dataset", choices=("fashion-mnist", "mnist"), default="fashion-mnist",
                        help="the dataset (default %(default)s)")
    parser.add_argument("--data", metavar="DIR", default=None,
                        help="folder holding the four IDX files, the only one searched when given "
                             "(default: $IDEFENDER_DATA if set, else Debian's /usr/share/datasets/<dataset>, "
                             "then the download cache)")
    parser.add_argument("--no-download", action="store_true",
                        help="never download the dataset (without it, torchvision downloads it when no "
                             "folder is named and no local files are found)")
    parser.add_argument("--out", metavar="DIR", default=None,
                        help="output folder (default results/reproduce-<dataset>, ignored by git)")
    parser.add_argument("--seed", type=non_negative_int, default=0, metavar="N",
                        help="seed of model E and of the mixtures' k-means; model F uses seed + 1 (default 0)")
    parser.add_argument("--epochs", type=positive_int, default=5, metavar="N",
                        help="training epochs of models E and F (default %(default)s)")
    parser.add_argument("--device", type=device, default=None, metavar="DEVICE",
                        help="torch device such as cpu, cuda or cuda:1 (default: cuda if available, else cpu)")
    parser.add_argument("--threads", type=positive_int, default=None, metavar="N",
                        help="CPU threads for torch (default: torch's own choice; 1 is fastest on a busy "
                             "shared machine)")
    parser.add_argument("--cache", metavar="DIR", default=None,
                        help="checkpoint folder of the trained models (default $IDEFENDER_CACHE/models or "
                             "~/.cache/idefender-gpu/models)")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bars (bars are shown only on a terminal anyway; the one-line "
                             "phase messages stay)")
    parser.add_argument("--quiet", action="store_true",
                        help="no phase messages on stderr (errors and the final table still print)")
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the full traceback of an error")


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


def _blackbox_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n-train", type=positive_int, default=None, metavar="N",
                        help="use only the first N training images (default all)")
    parser.add_argument("--n-test", type=positive_int, default=None, metavar="N",
                        help="use only the first N test images (default all)")
    parser.add_argument("--n-other", type=count_or_all, default=1000, metavar="N",
                        help="test images attacked in every setting but black-box FGSM (BIM, L2, DeepFool, "
                             "semi-white-box): at most the first N of the evaluation set, or 'all' "
                             "(default 1000)")
    parser.add_argument("--n-calibrate", type=count_or_all, default=10000, metavar="N",
                        help="training images that set the ID-99 thresholds: at most the first N, or 'all' "
                             "(default 10000)")
    parser.add_argument("--substitute", choices=("jacobian", "trained"), default="jacobian",
                        help="model E: Papernot's substitute trained from --holdout test images with labels "
                             "queried from F (Defense-GAN's black-box setting; default), or trained on the "
                             "training set with the true labels")
    parser.add_argument("--holdout", type=positive_int, default=150, metavar="N",
                        help="test images the attacker holds (jacobian substitute), left out of the evaluation; "
                             "must be smaller than the test images in use (default %(default)s)")
    parser.add_argument("--n-holdout", type=non_negative_int, default=1000, metavar="N",
                        help="the last N test images in use calibrate the ID-95 / ID-99 thresholds (held-out "
                             "natural data) and are left out of the evaluation; 0: training-data thresholds "
                             "(default %(default)s)")
    parser.add_argument("--layers", type=model_f_layers, default=("conv2",), metavar="LAYERS",
                        help="comma-separated layers of model F whose hidden states I-defender models "
                             "(default conv2: its second convolution before the ReLU; e.g. fc:input, "
                             "conv2,fc)")
    parser.add_argument("--components", type=positive_int, default=1, metavar="K",
                        help="Gaussian mixture components per class (default %(default)s)")
    parser.add_argument("--covariance", choices=("full", "tied", "diag", "spherical"), default="full",
                        help="covariance type of the mixtures, as in scikit-learn's GaussianMixture "
                             "(default %(default)s)")
    parser.add_argument("--reg-covar", type=non_negative_float, default=1e-4, metavar="FLOAT",
                        help="added to the diagonal of every covariance, >= 0 (default %(default)g)")
    parser.add_argument("--batch-size", type=positive_int, default=500, metavar="N",
                        help="attack and scoring batch size (default %(default)s)")
    parser.add_argument("--threat", choices=("both", "black-box", "semi-white-box"), default="both",
                        help="threat models: black-box (attacks crafted on model E), semi-white-box (on "
                             "model F's own gradients, no knowledge of the detector), or both (default)")
    parser.add_argument("--ablation", action="store_true",
                        help="also compare detector variants (layers, K, covariance) on black-box FGSM")


def _blackbox(args: argparse.Namespace) -> int:
    from idefender_gpu.experiments.blackbox import ABLATION, BlackboxConfig, run_blackbox
    from idefender_gpu.experiments.report import format_fgsm_table, write_outputs

    threats = {"both": ("black-box", "semi-white-box"), "black-box": ("black-box",),
               "semi-white-box": ("semi-white-box",)}[args.threat]
    config = BlackboxConfig(
        dataset=args.dataset, data=args.data, seed=args.seed, epochs=args.epochs,
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
# semi-whitebox, graybox, adaptive (the protocols of issue 13) and all
# --------------------------------------------------------------------------------------


def _protocol_options(parser: argparse.ArgumentParser, n_attack: int = 1000) -> None:
    """The options of the three protocols (their shared config, ``ProtocolConfig``)."""
    parser.add_argument("--n-train", type=positive_int, default=None, metavar="N",
                        help="use only the first N training images (default all)")
    parser.add_argument("--n-test", type=positive_int, default=None, metavar="N",
                        help="use only the first N test images (default all)")
    parser.add_argument("--n-holdout", type=_int_at_least(10, "an int >= 10"), default=2000, metavar="N",
                        help="the last N test images in use calibrate the held-out thresholds (default "
                             "%(default)s); the rest is the evaluation set")
    parser.add_argument("--n-attack", type=count_or_all, default=n_attack, metavar="N",
                        help="evaluation images attacked: the first N, or 'all' (default %(default)s)")
    parser.add_argument("--n-calibrate", type=count_or_all, default=10000, metavar="N",
                        help="training images that set the training-data ID-99 thresholds (default 10000)")
    parser.add_argument("--layers", type=model_f_layers, default=("conv2",), metavar="LAYERS",
                        help="comma-separated layers whose hidden states I-defender models (default conv2)")
    parser.add_argument("--components", type=positive_int, default=1, metavar="K",
                        help="Gaussian mixture components per class (default %(default)s)")
    parser.add_argument("--covariance", choices=("full", "tied", "diag", "spherical"), default="full",
                        help="covariance type of the mixtures (default %(default)s)")
    parser.add_argument("--reg-covar", type=non_negative_float, default=1e-4, metavar="FLOAT",
                        help="added to the diagonal of every covariance, >= 0 (default %(default)g)")
    parser.add_argument("--batch-size", type=positive_int, default=500, metavar="N",
                        help="attack and scoring batch size (default %(default)s)")


def _protocol_kwargs(args: argparse.Namespace) -> dict:
    return dict(dataset=args.dataset, data=args.data, seed=args.seed, epochs=args.epochs, n_train=args.n_train,
                n_test=args.n_test, n_holdout=args.n_holdout, n_attack=args.n_attack, n_calibrate=args.n_calibrate,
                device=_default_device(args), progress=False if args.no_progress else None,
                download=not args.no_download, cache=args.cache, layers=tuple(args.layers),
                n_components=args.components, covariance_type=args.covariance, reg_covar=args.reg_covar,
                batch_size=args.batch_size)


def _run_protocol(args: argparse.Namespace, name: str, config, run, markdown) -> int:
    from idefender_gpu.experiments._outputs import write

    config.validate()  # before any work (and again inside run, for Python callers)
    out = Path(args.out or f"results/{name}-{args.dataset}")
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


def _semiwhitebox_options(parser: argparse.ArgumentParser) -> None:
    _protocol_options(parser)
    parser.add_argument("--tolerance", type=non_negative_float, default=0.005, metavar="FLOAT",
                        help="bisection stops within this of the target adversarial accuracy (default %(default)s)")


def _semiwhitebox(args: argparse.Namespace) -> int:
    from idefender_gpu.experiments.semiwhitebox import SemiWhiteboxConfig, markdown, run_semiwhitebox

    config = SemiWhiteboxConfig(**_protocol_kwargs(args), tolerance=args.tolerance)
    return _run_protocol(args, "semi-whitebox", config, run_semiwhitebox, markdown)


def _graybox_options(parser: argparse.ArgumentParser) -> None:
    _protocol_options(parser)
    parser.add_argument("--no-wide", action="store_true",
                        help="skip the wider network (Table 8's analogue)")


def _graybox(args: argparse.Namespace) -> int:
    from idefender_gpu.experiments.graybox import GrayboxConfig, markdown, run_graybox

    config = GrayboxConfig(**_protocol_kwargs(args), wide=not args.no_wide)
    return _run_protocol(args, "graybox", config, run_graybox, markdown)


def eps_list(text: str) -> tuple[float, ...]:
    """Comma-separated Linf radii in (0, 1]."""
    try:
        values = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        values = ()
    if not values or not all(0 < v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"must be comma-separated floats in (0, 1] such as 0.1,0.3; got {text!r}")
    return values


eps_list.__name__ = "eps list"


def _adaptive_options(parser: argparse.ArgumentParser) -> None:
    _protocol_options(parser, n_attack=500)
    parser.add_argument("--eps", type=eps_list, default=(0.05, 0.1, 0.2, 0.3),
                        metavar="EPS", help="comma-separated Linf radii (default 0.05,0.1,0.2,0.3)")
    parser.add_argument("--steps", type=positive_int, default=40, metavar="N",
                        help="steps per attack run (default %(default)s)")
    parser.add_argument("--restarts", type=positive_int, default=1, metavar="N",
                        help="MarginPGD's random restarts per loss (default %(default)s)")
    parser.add_argument("--targets", type=non_negative_int, default=3, metavar="N",
                        help="MarginPGD's targeted runs (default %(default)s)")
    parser.add_argument("--no-external", action="store_true",
                        help="do not run torchattacks' and ART's PGD beside MarginPGD")


def _adaptive(args: argparse.Namespace) -> int:
    from idefender_gpu.experiments.adaptive import AdaptiveConfig, markdown, run_adaptive

    config = AdaptiveConfig(**_protocol_kwargs(args), eps=args.eps, steps=args.steps, n_restarts=args.restarts,
                            n_targets=args.targets, external=not args.no_external)
    return _run_protocol(args, "adaptive", config, run_adaptive, markdown)


def _select_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n-train", type=positive_int, default=None, metavar="N",
                        help="use only the first N training images (default all)")
    parser.add_argument("--n-test", type=positive_int, default=None, metavar="N",
                        help="use only the first N test images (default all)")
    parser.add_argument("--n-validation", type=_int_at_least(10, "an int >= 10"), default=10000, metavar="N",
                        help="the last N training images are the validation split (default %(default)s)")
    parser.add_argument("--select-epochs", type=_int_list, default=None, metavar="N,N",
                        help="training lengths of model F compared (default: --epochs alone)")
    parser.add_argument("--holdout", type=positive_int, default=150, metavar="N",
                        help="test images the attacker's substitute is trained from (default %(default)s)")
    parser.add_argument("--n-holdout", type=non_negative_int, default=1000, metavar="N",
                        help="held-out test images of the test run's thresholds (default %(default)s)")
    parser.add_argument("--no-test", action="store_true", help="choose only: no test-set run")
    parser.add_argument("--batch-size", type=positive_int, default=500, metavar="N",
                        help="attack and scoring batch size (default %(default)s)")


def _int_list(text: str) -> tuple[int, ...]:
    """Comma-separated positive ints."""
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"must be comma-separated positive ints such as 5,10; got {text!r}")
    return values


_int_list.__name__ = "int list"


def _select(args: argparse.Namespace) -> int:
    from idefender_gpu.experiments.selection import SelectConfig, run_select, write_select

    config = SelectConfig(dataset=args.dataset, data=args.data, seed=args.seed,
                          epochs_grid=args.select_epochs or (args.epochs,), n_train=args.n_train,
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


def _all_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n-train", type=positive_int, default=None, metavar="N",
                        help="use only the first N training images in every experiment (default all)")
    parser.add_argument("--n-test", type=positive_int, default=None, metavar="N",
                        help="use only the first N test images in every experiment (default all)")


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
        description="The paper's semi-white-box protocol on model F: FGSM, Iter-Linf, Iter-L2 and DeepFool "
                    "strengths found by bisection so that F's adversarial accuracy hits each Table 6 target; "
                    "AUC and ID-95 / ID-99 (held-out and training-data thresholds) beside the paper's CIFAR-10 "
                    "values. Writes results.json, report.md and ROC PNGs into --out.",
        options=_semiwhitebox_options, run=_semiwhitebox),
    "graybox": Experiment(
        help="Section 4.3 (Tables 7-8 protocol): Eq. 6 crafted on Source, evaluated on Source, Target and a "
             "wider network",
        description="The paper's gray-box protocol: two copies of model F (seeds seed+1, seed+2) and a 1.5x "
                    "wider one, each with its own I-defender; GrayBox (Eq. 6) crafted on Source with alpha in "
                    "{0, 1e-3, 1e-2, 1e-1, 1}. Writes results.json, report.md and ROC PNGs into --out.",
        options=_graybox_options, run=_graybox),
    "adaptive": Experiment(
        help="adaptive white-box attacker (MarginPGD on DefendedModel) at eps 0.05-0.3, beside Mahalanobis, no "
             "detector, torchattacks and ART",
        description="An attacker who knows the detector: success rate at 5% false rejects (held-out "
                    "thresholds), accuracy with rejection and AUC at Linf eps 0.05/0.1/0.2/0.3. Writes "
                    "results.json, report.md and ROC PNGs into --out.",
        options=_adaptive_options, run=_adaptive),
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
        add_common_options(leaf)
        experiment.options(leaf)
        leaf.set_defaults(func=functools.partial(_run, experiment))
    return reproduce
