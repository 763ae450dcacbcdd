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
    return parser


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
