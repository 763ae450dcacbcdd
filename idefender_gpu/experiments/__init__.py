"""The paper's experiments, from one command (``idefender-gpu reproduce ...``).

blackbox
    Section 4.1: adversarial examples crafted on model E attack model F (black-box) or use
    F's own gradients (semi-white-box); I-defender on F's hidden states; Tables 2-5 and
    Figures 2-5 of the paper (:func:`run_blackbox`, :class:`BlackboxConfig`).
semiwhitebox
    Section 4.2 / Table 6's protocol: attack strengths bisected so that F's adversarial
    accuracy hits the paper's targets; ID-95 / ID-99 on balanced sets
    (:func:`run_semiwhitebox`, :class:`SemiWhiteboxConfig`).
graybox
    Section 4.3 / Tables 7-8: Eq. 6 crafted on Source, evaluated on Source, Target (F, another
    seed) and a wider F (:func:`run_graybox`, :class:`GrayboxConfig`).
adaptive
    Beyond the paper: MarginPGD on ``DefendedModel`` (the attacker knows the detector) beside
    the Mahalanobis baseline, no detector, torchattacks and ART (:func:`run_adaptive`,
    :class:`AdaptiveConfig`).
selection
    Issue 13 item 5: the detector's setting (layer, K, covariance estimator, F's training
    length) chosen on a validation split of the training data, then its test AUCs beside the
    default's, the shrinkage estimators' and the paper's (:func:`run_select`, :class:`SelectConfig`).
_protocol, _outputs
    What the three protocols share: data split with held-out calibration images, model F,
    detectors with train and held-out thresholds; their results.json / report.md / ROC PNGs.
report
    ``results.json``, ``report.md`` (the paper's numbers beside ours) and ROC PNGs
    (:func:`write_outputs`).
cli
    ``register(subparsers)`` adds the ``reproduce`` subcommand to the ``idefender-gpu`` parser;
    one entry of its ``EXPERIMENTS`` table per experiment.
_common
    What every experiment shares: device check, progress bars, phase timer and log lines,
    detection metrics, the paths results files may record.

Only the public API of :mod:`idefender_gpu` is used here. The names below are imported on
first use, so the command's parser (``import idefender_gpu.experiments.cli``) loads neither
torch nor the detector.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["ATTACKS", "AdaptiveConfig", "BlackboxConfig", "GrayboxConfig", "SelectConfig", "SemiWhiteboxConfig",
           "run_adaptive", "run_blackbox", "run_graybox", "run_select", "run_semiwhitebox", "write_outputs"]

_HOMES = {"ATTACKS": "blackbox", "BlackboxConfig": "blackbox", "run_blackbox": "blackbox",
          "write_outputs": "report", "SemiWhiteboxConfig": "semiwhitebox", "run_semiwhitebox": "semiwhitebox",
          "GrayboxConfig": "graybox", "run_graybox": "graybox", "AdaptiveConfig": "adaptive",
          "run_adaptive": "adaptive", "SelectConfig": "selection", "run_select": "selection"}


def __getattr__(name: str) -> Any:
    """Import the public names lazily (PEP 562)."""
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
