"""The ``idefender-gpu`` command: benchmarks of the GPU-native Gaussian mixtures and the
I-defender paper's experiments.

:func:`main` is the console script. It parses the command line (every option is checked
there or, for what needs the model or the data, by the subcommand before any work), runs
the subcommand and turns the library's errors (``idefender_gpu.exceptions``, ``ValueError``
/ ``TypeError`` from validation, missing files) into one ``idefender-gpu: error: ...``
message with exit code 2; ``--debug`` shows the traceback instead.

Subcommands
-----------
reproduce
    The paper's experiments (:mod:`idefender_gpu.experiments.cli`): ``reproduce blackbox``.
train
    Train a WideResNet on CIFAR-10 (:func:`idefender_gpu.models.train_classifier`: the WRN
    paper's augmentation and schedule, mixed precision on CUDA, a resumable safetensors
    training state after every epoch); ``--stand-in`` runs it on seeded random images of
    CIFAR-10's shapes with a narrow WRN, a few steps (not a reproduction).
bench
    Batched EM against scikit-learn (NumPy and array-API) and torchgmm on the named
    workloads of :data:`idefender_gpu.bench.WORKLOADS`: JSON records in a fresh
    ``results/bench-<UTC time>/`` (``--out`` to choose) and a markdown table; see
    :mod:`idefender_gpu.bench.cli`.
"""

from __future__ import annotations

import argparse
import sys


DESCRIPTION = (
    "GPU-native Gaussian mixtures (a scikit-learn GaussianMixture drop-in in PyTorch) and the I-defender "
    "adversarial-input detector: benchmarks against scikit-learn, and the I-defender paper's experiments."
)

EPILOG = """\
examples:
  idefender-gpu reproduce blackbox --dataset fashion-mnist --threads 1
  idefender-gpu reproduce blackbox --help
  idefender-gpu train --model wrn-34-8 --dataset cifar10 --data DIR --device cuda
  idefender-gpu train --stand-in
  idefender-gpu bench --help

An error prints one line 'idefender-gpu: error: ...' (then its details) and exits with
code 2; --debug shows the traceback instead."""


class _Parser(argparse.ArgumentParser):
    """argparse's parser, whose usage errors print the error first, on one line, and point to
    ``--help`` instead of repeating the whole usage (exit code 2, as argparse's)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n(see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    """Argument parser of the ``idefender-gpu`` command."""
    from idefender_gpu import __version__

    parser = _Parser(prog="idefender-gpu", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", title="commands")
    from idefender_gpu.bench.cli import register as register_bench

    _debug_option(register_bench(sub))
    from idefender_gpu.experiments.cli import register as register_reproduce

    register_reproduce(sub)
    _register_train(sub)
    return parser


# --------------------------------------------------------------------------------------
# train
# --------------------------------------------------------------------------------------

#: what ``--stand-in`` changes, unless the option is given: a narrow WRN, a few steps
STAND_IN = {"model": "wrn-10-1", "epochs": 2, "n_train": 256, "n_test": 64}
STAND_IN_NOTE = ("STAND-IN RUN, NOT A REPRODUCTION: seeded random images of CIFAR-10's shapes and a narrow "
                 "WideResNet trained for a few steps, to prove the pipeline end to end")


def _wrn_name(text: str) -> str:
    """A ``wrn-D-K`` name with ``D = 6n + 4`` (argparse type)."""
    from idefender_gpu.models._wideresnet import parse_wrn_name

    try:
        parsed = parse_wrn_name(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if parsed is None:
        hint = (" (VGG19 is not trained here: ImageNet commands load its weights from a file)"
                if text.lower().startswith("vgg") else "")
        raise argparse.ArgumentTypeError(f"must be a WideResNet 'wrn-D-K' with D = 6n + 4, such as wrn-34-8 or "
                                         f"wrn-46-8; got {text!r}{hint}")
    return text


_wrn_name.__name__ = "WideResNet name"


def _positive_float(text: str) -> float:
    import math

    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite float > 0 (such as 0.1); got {text!r}")
    return value


_positive_float.__name__ = "positive float"


def _register_train(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from idefender_gpu.experiments.cli import device, non_negative_int, positive_int

    parser = sub.add_parser(
        "train", help="train a WideResNet on CIFAR-10 (resumable safetensors checkpoints; --stand-in: a quick "
                      "end-to-end run on random images)",
        description="Train a WideResNet (Zagoruyko & Komodakis, 2016) on CIFAR-10: random crops with 4-pixel "
                    "padding and horizontal flips, SGD with Nesterov momentum 0.9 and weight decay 5e-4, the "
                    "rate x0.2 at 30%, 60% and 80% of the epochs, mixed precision on CUDA. After every epoch "
                    "OUT/checkpoint.safetensors holds the training state (--resume continues it); at the end "
                    "OUT/model.safetensors holds the weights and OUT/train.json the history.")
    parser.add_argument("--model", type=_wrn_name, default=None, metavar="NAME",
                        help="wrn-D-K, D = 6n + 4 (default wrn-34-8; wrn-10-1 with --stand-in)")
    parser.add_argument("--dataset", choices=("cifar10",), default="cifar10", help="the dataset (default cifar10)")
    parser.add_argument("--data", metavar="DIR", default=None,
                        help="folder holding cifar-10-batches-bin, the only one searched when given (default: "
                             "$IDEFENDER_DATA if set, else the download cache)")
    parser.add_argument("--no-download", action="store_true",
                        help="never download the dataset (without it, torchvision downloads it when no folder is "
                             "named and no local files are found)")
    parser.add_argument("--n-train", type=positive_int, default=None, metavar="N",
                        help=f"use only the first N training images (with --stand-in: N random images, default "
                             f"{STAND_IN['n_train']}; 50000 gives an epoch of the real size)")
    parser.add_argument("--n-test", type=positive_int, default=None, metavar="N",
                        help=f"use only the first N test images (with --stand-in: default {STAND_IN['n_test']})")
    parser.add_argument("--epochs", type=positive_int, default=None, metavar="N",
                        help="epochs (default 200; 2 with --stand-in)")
    parser.add_argument("--batch-size", type=positive_int, default=128, metavar="N", help="default %(default)s")
    parser.add_argument("--lr", type=_positive_float, default=0.1, help="initial learning rate (default %(default)s)")
    parser.add_argument("--seed", type=non_negative_int, default=0, metavar="N",
                        help="initialisation, batch order and augmentation (default %(default)s)")
    parser.add_argument("--out", metavar="DIR", default=None,
                        help="output folder (default results/train-<dataset>-<model>, ignored by git)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the training state in OUT/checkpoint.safetensors (same settings)")
    parser.add_argument("--device", type=device, default=None,
                        help="torch device (default cuda when available, else cpu)")
    parser.add_argument("--threads", type=positive_int, default=None, metavar="N", help="torch CPU threads")
    parser.add_argument("--stand-in", action="store_true",
                        help=f"seeded random images of CIFAR-10's shapes ({STAND_IN['n_train']} training, "
                             f"{STAND_IN['n_test']} test), {STAND_IN['model']}, {STAND_IN['epochs']} epochs: "
                             "proves the pipeline, reproduces nothing")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    _debug_option(parser)
    parser.set_defaults(func=_run_train)
    return parser


def _run_train(args: argparse.Namespace) -> int:
    """``idefender-gpu train``: settings checked first, then the data, the loop, the files."""
    import json
    import time
    from pathlib import Path

    import torch

    from idefender_gpu.experiments.cli import check_writable_folder, phase_lines
    from idefender_gpu.models import build_model, hidden_layer, save_checkpoint
    from idefender_gpu.models._train import TrainConfig, train_classifier

    model_name = args.model or (STAND_IN["model"] if args.stand_in else "wrn-34-8")
    epochs = args.epochs or (STAND_IN["epochs"] if args.stand_in else 200)
    config = TrainConfig(epochs=epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed).validate()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    suffix = "-stand-in" if args.stand_in else ""
    out = Path(args.out or f"results/train-{args.dataset}-{model_name}{suffix}")
    check_writable_folder(out, "--out")
    state = out / "checkpoint.safetensors"
    if args.resume and not state.is_file():
        raise FileNotFoundError(f"--resume: no training state at {str(state)!r} (train without --resume first)")
    if not args.resume and state.exists():
        raise FileExistsError(f"--out {str(out)!r} already holds a training state ({state.name}): pass --resume "
                              "to continue it, or choose another --out")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    with phase_lines(args.quiet):
        if args.stand_in:
            print(STAND_IN_NOTE)
            from idefender_gpu.data import stand_in_dataset

            data = stand_in_dataset(args.dataset, n_train=args.n_train or STAND_IN["n_train"],
                                    n_test=args.n_test or STAND_IN["n_test"], seed=args.seed)
        else:
            from idefender_gpu.data import load_dataset

            data = load_dataset(args.dataset, args.data, download=not args.no_download, wording="command")
            data = data.subset(args.n_train, args.n_test)
        model = build_model(model_name, data.n_classes)
        info = {"dataset": data.name, "data_sha256": data.sha256, "model": model_name,
                "stand_in": bool(args.stand_in)}
        out.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        result = train_classifier(model, data.x_train, data.y_train, config, x_test=data.x_test,
                                  y_test=data.y_test, device=device, checkpoint=state, resume=args.resume,
                                  info=info, progress=None if not args.quiet else False)
        seconds = time.perf_counter() - started
    last = result["history"][-1] if result["history"] else {}
    summary = {**({"note": STAND_IN_NOTE} if args.stand_in else {}), **info, "hidden_layer": hidden_layer(model_name),
               "n_train": int(data.x_train.shape[0]), "n_test": int(data.x_test.shape[0]),
               "config": config.to_json(), "device": result["device"], "amp": result["amp"],
               "epochs_done": result["epoch"], "test_accuracy": last.get("test_accuracy"),
               "seconds_this_run": seconds, "torch": torch.__version__, "history": result["history"]}
    weights = save_checkpoint(model.cpu(), out / "model.safetensors",
                              {k: v for k, v in summary.items() if k != "history"})
    (out / "train.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"{model_name} on {data.name}: {result['epoch']} epochs, test accuracy "
          f"{last.get('test_accuracy', float('nan')):.4f}, {seconds:.0f} s on {result['device']}"
          f"{' (stand-in: not a reproduction)' if args.stand_in else ''}")
    for path in (weights, out / "train.json", state):
        print(f"wrote {path}")
    return 0


def _debug_option(parser: argparse.ArgumentParser) -> None:
    """``--debug`` after the subcommand too (``idefender-gpu bench ... --debug``)."""
    try:
        parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                            help="show the full traceback of an error")
    except argparse.ArgumentError:  # the subcommand declares its own
        pass


def _user_errors() -> tuple[type[BaseException], ...]:
    """The exceptions :func:`main` prints as a message: everything in ``idefender_gpu.exceptions``
    (NotPSDError, InvalidParameterError, NotFittedError and DatasetNotFoundError are ValueErrors
    or FileNotFoundErrors; RankFailedError is listed itself), validation's ValueError and
    TypeError, and OSError (a missing or unwritable file)."""
    from idefender_gpu.exceptions import RankFailedError

    return (ValueError, TypeError, OSError, RankFailedError)


def _report(exc: BaseException) -> None:
    """``idefender-gpu: error: <the message's first line>``, then its other lines, indented."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()] or [type(exc).__name__]
    print(f"idefender-gpu: error: {lines[0]}", file=sys.stderr)
    for line in lines[1:]:
        print(f"  {line}", file=sys.stderr)
    print("(run again with --debug for the traceback)", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``idefender-gpu`` console script.

    Returns
    -------
    code : int
        0 on success; 2 for a usage error (argparse's message) or an error of the library
        (one ``idefender-gpu: error: ...`` message on stderr; with ``--debug``, the
        exception propagates with its traceback); 130 when interrupted.
    """
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("idefender-gpu: interrupted", file=sys.stderr)
        return 130
    except _user_errors() as exc:
        if args.debug:
            raise
        _report(exc)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
