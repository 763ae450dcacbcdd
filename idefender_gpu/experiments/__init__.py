"""The paper's experiments, from one command (``idefender-gpu reproduce ...``).

blackbox
    Section 4.1: adversarial examples crafted on model E attack model F (black-box) or use
    F's own gradients (semi-white-box); I-defender on F's hidden states; Tables 2-5 and
    Figures 2-5 of the paper (:func:`run_blackbox`, :class:`BlackboxConfig`).
report
    ``results.json``, ``report.md`` (the paper's numbers beside ours) and ROC PNGs
    (:func:`write_outputs`).
cli
    ``register(subparsers)`` adds the ``reproduce`` subcommand to the ``idefender-gpu`` parser.

Only the public API of :mod:`idefender_gpu` is used here.
"""

from idefender_gpu.experiments.blackbox import ATTACKS, BlackboxConfig, run_blackbox
from idefender_gpu.experiments.report import write_outputs

__all__ = ["ATTACKS", "BlackboxConfig", "run_blackbox", "write_outputs"]
