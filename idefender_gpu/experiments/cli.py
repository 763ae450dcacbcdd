"""The ``reproduce`` subcommand of ``idefender-gpu``: the paper's experiments from one command.

``idefender-gpu reproduce blackbox --dataset fashion-mnist`` runs Section 4.1 (Tables 2-5,
Figures 2-5) and writes ``results.json``, ``report.md`` and ROC PNGs into ``--out``.

Wire it into the main parser with :func:`register`::

    from idefender_gpu.experiments.cli import register as register_experiments
    register_experiments(sub)      # sub = parser.add_subparsers(...)

or run this module: ``python -m idefender_gpu.experiments.cli reproduce blackbox ...``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

__all__ = ["build_parser", "main", "register"]


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an int >= 1; got {text}")
    return value


def _count_or_all(text: str) -> int | None:
    if text.lower() == "all":
        return None
    return _positive_int(text)


def _blackbox(args: argparse.Namespace) -> int:
    import torch

    from idefender_gpu.data import DatasetNotFoundError
    from idefender_gpu.experiments.blackbox import ABLATION, BlackboxConfig, run_blackbox
    from idefender_gpu.experiments.report import format_fgsm_table, write_outputs

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    threats = {"both": ("black-box", "semi-white-box"), "black-box": ("black-box",),
               "semi-white-box": ("semi-white-box",)}[args.threat]
    config = BlackboxConfig(
        dataset=args.dataset, data=args.data, seed=args.seed, epochs=args.epochs,
        n_train=args.n_train, n_test=args.n_test, n_other=args.n_other, n_calibrate=args.n_calibrate,
        device=device,
        progress=False if args.no_progress else None, download=not args.no_download,
        cache=args.cache, substitute=args.substitute, holdout=args.holdout,
        layers=tuple(args.layers.split(",")), n_components=args.components,
        covariance_type=args.covariance, reg_covar=args.reg_covar, batch_size=args.batch_size,
        threat_models=threats, ablation=ABLATION if args.ablation else (),
    )
    out = Path(args.out or f"results/reproduce-{args.dataset}")
    started = time.perf_counter()
    try:
        results = run_blackbox(config)
    except DatasetNotFoundError as exc:
        print(f"idefender-gpu reproduce blackbox: {exc}", file=sys.stderr)
        return 2
    paths = write_outputs(results, out)
    print(format_fgsm_table(results))
    print()
    print(f"{results['dataset']}: seed {results['seed']}, wall time {time.perf_counter() - started:.0f} s "
          f"on {results['machine']['device']}")
    for path in paths.values():
        print(f"wrote {path}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``reproduce`` subcommand (with ``blackbox``) to an ``add_subparsers`` object.

    Returns
    -------
    parser : argparse.ArgumentParser
        The ``reproduce`` parser. Each leaf sets ``func`` (call ``args.func(args)``).
    """
    reproduce = subparsers.add_parser(
        "reproduce", help="reproduce the paper's experiments (markdown report, JSON, ROC PNGs)",
        description="Reproduce the I-defender paper's experiments.")
    which = reproduce.add_subparsers(dest="experiment", required=True, metavar="EXPERIMENT")
    bb = which.add_parser(
        "blackbox", help="Section 4.1: FGSM/BIM/L2/DeepFool crafted on model E against model F "
                         "(Tables 2-5, Figures 2-5), plus the semi-white-box variant",
        description="The paper's black-box experiment (Section 4.1) on MNIST or Fashion-MNIST.")
    bb.add_argument("--dataset", choices=("fashion-mnist", "mnist"), default="fashion-mnist")
    bb.add_argument("--data", default=None,
                    help="folder with the four IDX files (searched first; then $IDEFENDER_DATA, "
                         "/usr/share/datasets/<dataset>, the download cache)")
    bb.add_argument("--out", default=None, help="output folder (default results/reproduce-<dataset>)")
    bb.add_argument("--seed", type=int, default=0, help="model E seed (F: seed + 1); default 0")
    bb.add_argument("--epochs", type=_positive_int, default=5, help="training epochs of E and F (default 5)")
    bb.add_argument("--n-train", type=_positive_int, default=None,
                    help="use only the first N training images (default all)")
    bb.add_argument("--n-test", type=_positive_int, default=None,
                    help="use only the first N test images (default all)")
    bb.add_argument("--n-other", type=_count_or_all, default=1000,
                    help="test images attacked in every setting but black-box FGSM (BIM, L2, DeepFool, "
                         "semi-white-box): the first N of the evaluation set, or 'all' (default 1000)")
    bb.add_argument("--n-calibrate", type=_count_or_all, default=10000,
                    help="training images that set the ID-99 thresholds (default 10000, or 'all')")
    bb.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    bb.add_argument("--threads", type=_positive_int, default=None,
                    help="CPU threads for torch (default: torch's own choice)")
    bb.add_argument("--no-progress", action="store_true", help="no progress bars")
    bb.add_argument("--no-download", action="store_true",
                    help="never download the dataset (fail when no local files are found)")
    bb.add_argument("--cache", default=None,
                    help="checkpoint folder (default $IDEFENDER_CACHE/models or ~/.cache/idefender-gpu/models)")
    bb.add_argument("--substitute", choices=("jacobian", "trained"), default="jacobian",
                    help="model E: Papernot's substitute trained from --holdout test images with labels "
                         "queried from F (Defense-GAN's black-box setting; default), or trained on the "
                         "training set with the true labels")
    bb.add_argument("--holdout", type=_positive_int, default=150,
                    help="test images the attacker holds (jacobian substitute); left out of the evaluation")
    bb.add_argument("--layers", default="conv2",
                    help="comma-separated layer specs of model F to model (default conv2: its second "
                         "convolution before the ReLU)")
    bb.add_argument("--components", type=_positive_int, default=1, help="mixture components per class (K)")
    bb.add_argument("--covariance", choices=("full", "tied", "diag", "spherical"), default="full")
    bb.add_argument("--reg-covar", type=float, default=1e-4)
    bb.add_argument("--batch-size", type=_positive_int, default=500, help="attack / scoring batch size")
    bb.add_argument("--threat", choices=("both", "black-box", "semi-white-box"), default="both")
    bb.add_argument("--ablation", action="store_true",
                    help="also compare detector variants (layers, K, covariance) on black-box FGSM")
    bb.set_defaults(func=_blackbox)
    return reproduce


def build_parser() -> argparse.ArgumentParser:
    """A stand-alone parser holding only ``reproduce`` (for ``python -m``)."""
    parser = argparse.ArgumentParser(prog="idefender-gpu", description=__doc__.split("\n")[0])
    register(parser.add_subparsers(dest="command", required=True))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m idefender_gpu.experiments.cli``."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
