"""The paper's black-box experiment on MNIST / Fashion-MNIST (Section 4.1, Tables 2-5, Figures 2-5).

Pipeline (every long step has a progress bar on a terminal, and a log line when it starts and
ends):

1. Load the dataset from local IDX files (:func:`idefender_gpu.data.load_dataset`).
2. Train (or load from the checkpoint cache) model F (the defended classifier, seed
   ``seed + 1``) and model E (the attacker's substitute, seed ``seed``) of Table 1. By
   default E is trained as in Defense-GAN's black-box experiment, which the paper repeats:
   Papernot et al.'s Jacobian-based augmentation from the first 150 test images, labels
   queried from F (``substitute='jacobian'``); those 150 images are left out of the
   evaluation. ``substitute='trained'`` trains E on the whole training set instead.
3. Fit I-defender on F's hidden states over the natural training data (one Gaussian
   mixture per class, thresholds keeping 95% of each class: ID-95), recalibrate a copy of
   the thresholds at 99% (ID-99), and fit the shared-covariance Mahalanobis baseline on the
   same hidden states.
4. Craft adversarial versions of the test inputs with every attack of :data:`ATTACKS`, on
   model E (black-box: the attacker knows nothing of F or the defence) and on model F
   itself (semi-white-box: F's gradients, no knowledge of the defence).
5. Score natural test inputs (negatives) and adversarial inputs (positives) by the
   log-likelihood of F's hidden state under F's predicted class; report, per attack, F's
   clean and adversarial accuracy, AUC over all adversarial inputs and over the successful
   ones (those that change F's prediction), TPR at 5% FPR, the ID-95 / ID-99 detection
   rates and the Mahalanobis baseline.

:func:`run_blackbox` returns the results as a JSON-able dict (with the ROC curves kept
aside for the figures); :func:`idefender_gpu.experiments.report.write_outputs` writes
``results.json``, ``report.md`` and the ROC PNGs. Only the public API is used.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from numbers import Integral
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from idefender_gpu import IDefender, MahalanobisDetector
from idefender_gpu._param_validation import Interval, Options, Predicate, validate_params
from idefender_gpu.attacks import BIM, FGSM, DeepFool, IterativeL2
from idefender_gpu.data import DATASETS
from idefender_gpu.experiments._common import (
    CONFIG_CONSTRAINTS,
    PhaseTimer,
    batches,
    check_device,
    craft,
    detection,
    display_path,
    load_checked,
    logger,
    machine_info,
    progress_bar,
    rate,
    roc,
)
from idefender_gpu.experiments._ablation import run_ablation
from idefender_gpu.experiments.paper import fgsm_paper_auc
from idefender_gpu.features import parse_layers
from idefender_gpu.models import build_model, evaluate, load_or_train, load_or_train_substitute

__all__ = ["ABLATION", "ATTACKS", "AttackSetting", "BlackboxConfig", "DetectorVariant", "THREAT_MODELS",
           "run_blackbox"]

#: threat model -> the model whose gradients craft the attack
THREAT_MODELS = {"black-box": "E", "semi-white-box": "F"}

FGSM_EPS = (0.10, 0.15, 0.20, 0.25, 0.30)


@dataclass(frozen=True)
class AttackSetting:
    """One row of the attack table: an attack class and its hyper-parameters."""

    name: str
    norm: str
    eps: float | None = None
    alpha: float | None = None
    steps: int | None = None
    overshoot: float | None = None
    max_iter: int | None = None

    @property
    def label(self) -> str:
        if self.name == "FGSM":
            return f"FGSM eps={self.eps:g}"
        if self.name == "DeepFool":
            return f"DeepFool (overshoot {self.overshoot:g})"
        norm = "Linf" if self.norm == "linf" else "L2"
        return f"{self.name} {norm} eps={self.eps:g}"

    def build(self, model: nn.Module) -> Callable[[Tensor, Tensor], Tensor]:
        if self.name == "FGSM":
            return FGSM(model, eps=self.eps)
        if self.name == "BIM":
            return BIM(model, eps=self.eps, alpha=self.alpha, steps=self.steps)
        if self.name == "IterativeL2":
            return IterativeL2(model, eps=self.eps, alpha=self.alpha, steps=self.steps)
        if self.name == "DeepFool":
            return DeepFool(model, overshoot=self.overshoot, max_iter=self.max_iter)
        raise ValueError(f"unknown attack {self.name!r}")


#: The attacks, inputs in [0, 1]. FGSM at the paper's five eps (Tables 3 and 5). The paper
#: gives 10 iterations for the iterative attacks but no eps for Figures 4-5; BIM uses the
#: smallest FGSM eps, 0.1 (Linf), and the iterative L2 attack an L2 radius of 2.0, about
#: the L2 size of an FGSM eps = 0.1 perturbation of a (Fashion-)MNIST image after clipping
#: to [0, 1]; both take steps of 2.5 * eps / steps (so the ball's boundary is reachable and
#: explored). DeepFool is unbounded and minimal (overshoot 0.02, at most 50 steps).
ATTACKS: tuple[AttackSetting, ...] = (
    *(AttackSetting("FGSM", "linf", eps=eps) for eps in FGSM_EPS),
    AttackSetting("BIM", "linf", eps=0.1, alpha=0.025, steps=10),
    AttackSetting("IterativeL2", "l2", eps=2.0, alpha=0.5, steps=10),
    AttackSetting("DeepFool", "l2", overshoot=0.02, max_iter=50),
)


@dataclass(frozen=True)
class DetectorVariant:
    """One I-defender configuration of the ablation (layers of model F, mixture settings)."""

    layers: tuple[str, ...]
    n_components: int = 1
    covariance_type: str = "full"
    reg_covar: float = 1e-4
    max_iter: int = 100
    covariance_estimator: str = "empirical"


#: The variants ``--ablation`` compares on black-box FGSM. ``conv2``: F's second convolution
#: before its ReLU (1152 features); ``fc:input``: the same after the ReLU (the input of the
#: final FC layer, the library's default layer); ``fc``: the logits (10 features); the last
#: two shrink the class covariances (Ledoit-Wolf, OAS) instead of the sample covariance.
ABLATION: tuple[DetectorVariant, ...] = (
    DetectorVariant(("conv2",)),
    DetectorVariant(("fc:input",)),
    DetectorVariant(("fc",)),
    DetectorVariant(("fc",), n_components=5),
    DetectorVariant(("conv2", "fc")),
    DetectorVariant(("conv2",), reg_covar=1e-2),
    DetectorVariant(("conv2",), reg_covar=1e-6),
    DetectorVariant(("conv2",), n_components=1, covariance_type="diag"),
    DetectorVariant(("conv2",), n_components=10, covariance_type="diag"),
    DetectorVariant(("conv2",), n_components=2, covariance_type="full", max_iter=20),
    DetectorVariant(("conv2",), covariance_estimator="ledoit-wolf"),
    DetectorVariant(("conv2",), covariance_estimator="oas"),
)


@dataclass
class BlackboxConfig:
    """Settings of :func:`run_blackbox` (the command's options).

    Attributes
    ----------
    dataset : {'fashion-mnist', 'mnist'}
    data : str, optional
        Folder searched first for the IDX files.
    seed : int
        Model E is trained with ``seed``, model F with ``seed + 1``; the mixtures' k-means
        use ``seed``.
    epochs : int
        Training epochs of both models.
    n_train, n_test : int, optional
        Use only the first ``n_train`` training / ``n_test`` test images (the small CI run).
        Every natural test image is a negative of every AUC, and black-box FGSM (the paper's
        Tables 3 and 5) attacks all of them.
    n_other : int, optional
        Test images attacked in every other setting (black-box BIM, L2, DeepFool and the
        whole semi-white-box variant): the first ``n_other`` (None: all). Default 1000, to
        keep the run within 10 minutes on a 2-core CPU (DeepFool on model F costs about
        20 forward passes per image).
    n_calibrate : int, optional
        Training images whose scores set the ID-99 thresholds (the first ``n_calibrate``;
        None: all). The ID-95 thresholds come from the whole training set (``fit``).
        Default 10000: scoring the training set under every class's density is the
        slowest step of fitting.
    device : str
        ``'cuda'`` when available, else ``'cpu'``.
    progress : bool, optional
        Progress bars (None: when stderr is a terminal).
    download : bool
        Let torchvision download the data when no local files are found.
    cache : str, optional
        Checkpoint folder (default ``cache_dir() / 'models'``).
    substitute : {'jacobian', 'trained'}
        How the black-box attacker gets model E: Papernot's substitute training from the
        first ``holdout`` test images, labels queried from F (6 rounds of 10 epochs,
        lambda 0.1: Defense-GAN's setting), or ordinary training on the training set with
        the true labels (``epochs`` epochs; a stronger transfer attacker).
    holdout : int
        Test images given to the attacker (``substitute='jacobian'``) and left out of the
        evaluation.
    n_holdout : int
        The last ``n_holdout`` test images in use calibrate the ID-95 / ID-99 thresholds
        (held-out natural data, so the nominal false-reject rate holds on new inputs) and
        are left out of the evaluation; 0: thresholds from the training data only. The
        training-data thresholds' detection rates are reported beside (``*_train``).
    layers : tuple of str
        Hidden states of F the detectors model (see the report's notes).
    n_components, covariance_type, reg_covar
        I-defender's mixtures.
    batch_size : int
        Batch size of attacks and scoring.
    memory_budget : int, optional
        The detectors' ``memory_budget`` (bytes per chunk of the density kernels, and the
        hidden states a fit with several components holds before it streams). Default: the
        library's (its chunk sizes; states held up to a quarter of the memory).
    threat_models : tuple of str
        Subset of :data:`THREAT_MODELS`.
    attacks : tuple of AttackSetting
    ablation : tuple of DetectorVariant
        Detector variants compared on the black-box FGSM inputs (empty: none).
    """

    dataset: str = "fashion-mnist"
    data: str | None = None
    seed: int = 0
    epochs: int = 5
    n_train: int | None = None
    n_test: int | None = None
    n_other: int | None = 1000
    n_calibrate: int | None = 10000
    device: str = field(default_factory=lambda: "cuda" if torch.cuda.is_available() else "cpu")
    progress: bool | None = None
    download: bool = False
    cache: str | None = None
    substitute: str = "jacobian"
    holdout: int = 150
    n_holdout: int = 1000
    layers: tuple[str, ...] = ("conv2",)
    n_components: int = 1
    covariance_type: str = "full"
    reg_covar: float = 1e-4
    batch_size: int = 500
    memory_budget: int | None = None
    threat_models: tuple[str, ...] = ("black-box", "semi-white-box")
    attacks: tuple[AttackSetting, ...] = ATTACKS
    ablation: tuple[DetectorVariant, ...] = ()

    _parameter_constraints = {
        **CONFIG_CONSTRAINTS,
        **{name: [None, Interval(Integral, 1, None)] for name in ("n_train", "n_test", "n_other", "n_calibrate")},
        "substitute": [Options(str, {"jacobian", "trained"})],
        "holdout": [Interval(Integral, 0, None)],
        "n_holdout": [Interval(Integral, 0, None)],
        "threat_models": [Predicate(lambda v: isinstance(v, (tuple, list)) and len(v) > 0
                                    and all(t in THREAT_MODELS for t in v),
                                    f"a non-empty tuple of {sorted(THREAT_MODELS)}")],
        "attacks": [Predicate(lambda v: all(isinstance(a, AttackSetting) for a in v),
                              "a tuple of AttackSetting")],
        "ablation": [Predicate(lambda v: all(isinstance(a, DetectorVariant) for a in v),
                               "a tuple of DetectorVariant")],
    }

    def validate(self) -> torch.device:
        """Check every setting that can be checked before any work; return the device.

        The layer names are resolved against an untrained model F, the device against
        this machine, ``holdout`` against ``n_test``. The sizes of the dataset itself are
        checked by :func:`run_blackbox` right after loading it (before any training).

        Raises
        ------
        InvalidParameterError
            For a setting of the wrong type or out of range (scikit-learn's message).
        ValueError
            For an unknown layer of model F, a device this machine lacks, or
            ``holdout >= n_test`` with the Jacobian substitute.
        """
        validate_params(type(self).__name__, vars(self), self._parameter_constraints)
        device = check_device(self.device)
        model = build_model("F", len(DATASETS[self.dataset].classes))
        for layers in (self.layers, *(variant.layers for variant in self.ablation)):
            parse_layers(model, list(layers))
        if self.substitute == "jacobian":
            if self.holdout < 1:
                raise ValueError(f"holdout (--holdout) must be at least 1 with the Jacobian substitute; got "
                                 f"{self.holdout}")
            if self.n_test is not None and self.holdout >= self.n_test:
                raise ValueError(f"holdout (--holdout) must be smaller than n_test (--n-test), the test images "
                                 f"in use: the rest is the evaluation set; got holdout {self.holdout} and "
                                 f"n_test {self.n_test}")
        if self.n_test is not None and self.n_holdout:
            attacker = self.holdout if self.substitute == "jacobian" else 0
            if attacker + self.n_holdout >= self.n_test:
                raise ValueError(f"holdout (--holdout) + n_holdout (--n-holdout) must be smaller than n_test "
                                 f"(--n-test): the rest is the evaluation set; got {attacker} + {self.n_holdout} "
                                 f"and n_test {self.n_test}")
        return device

    def to_json(self) -> dict[str, Any]:
        """The settings as JSON (paths as :func:`display_path` writes them)."""
        out = asdict(self)
        out["attacks"] = [asdict(a) for a in self.attacks]
        out["ablation"] = [asdict(v) for v in self.ablation]
        out["layers"] = list(self.layers)
        out["threat_models"] = list(self.threat_models)
        out["data"], out["cache"] = display_path(self.data), display_path(self.cache)
        out["device"] = str(self.device)
        return out


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


def _score(x: Tensor, model: nn.Module, idefender: IDefender, baseline: MahalanobisDetector,
           batch_size: int, device: torch.device, desc: str, progress: bool | None) -> dict[str, Tensor]:
    """F's predictions and both detectors' scores (log-likelihoods), each ``(N,)`` on CPU."""
    preds, ours, theirs = [], [], []
    with torch.no_grad():
        for sl in progress_bar(batches(x.shape[0], batch_size), desc, progress):
            xb = x[sl].to(device)
            preds.append(model(xb).argmax(1).cpu())
            ours.append(idefender.score(xb).cpu())
            theirs.append(baseline.score(xb).cpu())
    return {"pred": torch.cat(preds), "idefender": torch.cat(ours).double(),
            "mahalanobis": torch.cat(theirs).double()}


# --------------------------------------------------------------------------------------
# The experiment
# --------------------------------------------------------------------------------------


def run_blackbox(config: BlackboxConfig) -> dict[str, Any]:
    """Run the black-box (and semi-white-box) experiment; return the results.

    Parameters
    ----------
    config : BlackboxConfig

    Returns
    -------
    results : dict
        JSON-able except ``results["curves"]`` (ROC curves per threat model and attack, for
        the figures; :func:`~idefender_gpu.experiments.report.write_outputs` drops it from
        the JSON). ``results["records"]`` holds one record per (threat model, attack).

    Every setting is checked before any work (:meth:`BlackboxConfig.validate`), the
    sample counts right after the data is loaded (before any training). Each phase logs
    a line when it starts and one with its seconds when it ends (INFO, logger
    ``idefender_gpu.experiments``).

    Raises
    ------
    idefender_gpu.data.DatasetNotFoundError
        When the dataset's IDX files are not found (and not downloaded).
    InvalidParameterError, ValueError
        For a bad setting (see :meth:`BlackboxConfig.validate`), or ``n_train`` /
        ``n_test`` larger than the dataset, or ``holdout`` not smaller than the test
        images in use.
    """
    device = config.validate()
    timer = PhaseTimer(device)
    progress = config.progress
    start = time.perf_counter()

    with timer("data", label=False):  # no start line: a missing dataset's message comes first
        data = load_checked(config)
    logger.info("%s: %d training, %d test images from %s: %.1f s", data.name, len(data.y_train),
                len(data.y_test), display_path(data.source), timer.seconds["data"])

    holdout = config.holdout if config.substitute == "jacobian" else 0
    if holdout >= data.x_test.shape[0]:
        raise ValueError(f"holdout (--holdout) must be smaller than the {data.x_test.shape[0]} test images in use "
                         f"(--n-test): the rest is the evaluation set; got {holdout}")
    n_test = data.x_test.shape[0]
    if config.n_holdout and holdout + config.n_holdout >= n_test:
        raise ValueError(f"holdout (--holdout) + n_holdout (--n-holdout) must be smaller than the {n_test} test "
                         f"images in use (--n-test): the rest is the evaluation set; got {holdout} + "
                         f"{config.n_holdout}")
    split = n_test - config.n_holdout
    x_cal, y_cal = data.x_test[split:], data.y_test[split:]  # held-out natural images: the thresholds
    if config.n_holdout:
        missing = sorted(set(range(data.n_classes)) - set(y_cal.tolist()))
        if missing:
            raise ValueError(f"the held-out calibration images (the last {config.n_holdout} test images, "
                             f"--n-holdout) must hold every class; classes {missing} have none (raise --n-holdout)")
    x_test, y_test = data.x_test[holdout:split], data.y_test[holdout:split]  # the evaluation set

    model_info: dict[str, Any] = {}
    with timer("train", f"model F: train {config.epochs} epoch(s) on {len(data.y_train)} images, or load "
                        f"the cached checkpoint"):
        F, f_info = load_or_train("F", data, seed=config.seed + 1, epochs=config.epochs, device=device,
                                  cache=config.cache, progress=progress)
    with timer("train", "model E: " + (f"Jacobian substitute from {holdout} test images, labels from F"
                                       if config.substitute == "jacobian" else
                                       f"train {config.epochs} epoch(s)") + ", or load the cached checkpoint"):
        if config.substitute == "jacobian":
            E, e_info = load_or_train_substitute(data, F, f_info["key"], seed=config.seed, holdout=holdout,
                                                 device=device, cache=config.cache, progress=progress)
        else:
            E, e_info = load_or_train("E", data, seed=config.seed, epochs=config.epochs, device=device,
                                      cache=config.cache, progress=progress)
    with timer("train", label=False):
        models = {"E": E, "F": F}
        for name, info in (("E", e_info), ("F", f_info)):
            accuracy = float((evaluate(models[name], x_test.to(device)).cpu() == y_test).double().mean())
            model_info[name] = {"seed": info.get("seed"), "epochs": info.get("epochs"),
                                "test_accuracy": accuracy, "checkpoint": Path(info["path"]).name if info.get("path") else None,
                                "cached": bool(info.get("cached")), "train_seconds": info.get("train_seconds")}
        model_info["E"]["training"] = (
            f"substitute (Papernot et al.): {e_info.get('rounds')} rounds x {e_info.get('epochs')} epochs from "
            f"the first {holdout} test images, lambda {e_info.get('lmbda')}, labels from F "
            f"({e_info.get('oracle_queries', '?')} queries)" if config.substitute == "jacobian"
            else f"trained on the training set, {config.epochs} epochs")
        model_info["F"]["training"] = f"trained on the training set, {config.epochs} epochs"

    train_loader = DataLoader(TensorDataset(data.x_train, data.y_train), batch_size=1000)
    budget = config.memory_budget  # None: the library's defaults (see BlackBoxConfig)
    with timer("fit_idefender", f"I-defender: hidden states of {len(data.y_train)} training images, "
                                f"class mixtures, ID-95 thresholds"):
        idefender = IDefender(F, list(config.layers), config.n_components,
                              covariance_type=config.covariance_type, keep=0.95,
                              reg_covar=config.reg_covar, random_state=config.seed,
                              memory_budget=budget, progress=progress)
        idefender.fit(train_loader)
        thresholds95 = idefender.thresholds_.clone().cpu()
    with timer("calibrate_id99", "ID-99 thresholds"):
        n_cal = data.x_train.shape[0] if config.n_calibrate is None else config.n_calibrate
        idefender.calibrate(DataLoader(TensorDataset(data.x_train[:n_cal], data.y_train[:n_cal]),
                                       batch_size=1000), keep=0.99)
        thresholds99 = idefender.thresholds_.clone().cpu()
        thresholds95_train, thresholds99_train = thresholds95, thresholds99
        if config.n_holdout:  # the default decision: held-out natural data, so 5% holds on new inputs
            cal_loader = DataLoader(TensorDataset(x_cal, y_cal), batch_size=1000)
            thresholds99 = idefender.calibrate(cal_loader, keep=0.99).thresholds_.clone().cpu()
            thresholds95 = idefender.calibrate(cal_loader, keep=0.95).thresholds_.clone().cpu()
    with timer("fit_mahalanobis", "Mahalanobis baseline"):
        baseline = MahalanobisDetector(F, list(config.layers), reg_covar=config.reg_covar,
                                       memory_budget=budget, progress=progress).fit(train_loader)

    with timer("score", f"score {len(y_test)} natural test images"):
        natural = _score(x_test, F, idefender, baseline, config.batch_size, device,
                         "score natural test inputs", progress)
    clean_correct = natural["pred"] == y_test
    natural_rejected95 = natural["idefender"] < thresholds95.double()[natural["pred"]]
    natural_rejected99 = natural["idefender"] < thresholds99.double()[natural["pred"]]
    natural_rejected95_train = natural["idefender"] < thresholds95_train.double()[natural["pred"]]
    natural_rejected99_train = natural["idefender"] < thresholds99_train.double()[natural["pred"]]

    records: list[dict[str, Any]] = []
    curves: dict[str, dict[str, Any]] = {}
    kept: dict[float, Tensor] = {}  # black-box FGSM inputs, for the ablation
    jobs = [(threat, attack) for threat in config.threat_models for attack in config.attacks]
    for index, (threat, setting) in enumerate(progress_bar(jobs, "attacks", progress, unit="attack"), 1):
        started = time.perf_counter()
        source_name = THREAT_MODELS[threat]
        source = models[source_name]
        attack = setting.build(source)
        full = threat == "black-box" and setting.name == "FGSM"
        n = x_test.shape[0] if full or config.n_other is None else min(config.n_other, x_test.shape[0])
        x_nat, y_nat, nat_pred = x_test[:n], y_test[:n], natural["pred"][:n]
        with timer(f"attack {threat}", label=False):
            x_adv = craft(attack, x_nat, y_nat, config.batch_size, device,
                           f"{threat} {setting.label}", progress).cpu()
        with timer("score", label=False):
            adv = _score(x_adv, F, idefender, baseline, config.batch_size, device,
                         f"score {threat} {setting.label}", progress)
            source_pred = evaluate(source, x_adv.to(device)).cpu()
        if config.ablation and threat == "black-box" and setting.name == "FGSM":
            kept[setting.eps] = x_adv
        delta = (x_adv - x_nat).flatten(1)
        successful = adv["pred"] != nat_pred
        rejected95 = adv["idefender"] < thresholds95.double()[adv["pred"]]
        rejected99 = adv["idefender"] < thresholds99.double()[adv["pred"]]
        rejected95_train = adv["idefender"] < thresholds95_train.double()[adv["pred"]]
        rejected99_train = adv["idefender"] < thresholds99_train.double()[adv["pred"]]
        auc, tpr = detection(natural["idefender"], adv["idefender"])
        auc_s, tpr_s = detection(natural["idefender"], adv["idefender"][successful])
        m_auc, m_tpr = detection(natural["mahalanobis"], adv["mahalanobis"])
        m_auc_s, _ = detection(natural["mahalanobis"], adv["mahalanobis"][successful])
        paper_dgan, paper_ours = (fgsm_paper_auc(data.name, setting.eps)
                                  if threat == "black-box" and setting.name == "FGSM" else (None, None))
        record = {
            "dataset": data.name, "threat_model": threat, "source_model": source_name,
            "target_model": "F", "attack": setting.name, "norm": setting.norm, "eps": setting.eps,
            "alpha": setting.alpha, "steps": setting.steps, "overshoot": setting.overshoot,
            "max_iter": setting.max_iter, "label": setting.label,
            "n": int(n), "n_natural": int(x_test.shape[0]), "n_successful": int(successful.sum()),
            "clean_acc": float(clean_correct[:n].double().mean()),
            "adv_acc": float((adv["pred"] == y_nat).double().mean()),
            "source_adv_acc": float((source_pred == y_nat).double().mean()),
            "mean_linf": float(delta.abs().amax(1).mean()), "mean_l2": float(delta.norm(dim=1).mean()),
            "auc": auc, "auc_successful": auc_s, "tpr_at_5fpr": tpr, "tpr_at_5fpr_successful": tpr_s,
            "id95_detection": rate(rejected95), "id99_detection": rate(rejected99),
            "id95_detection_successful": rate(rejected95[successful]),
            "id99_detection_successful": rate(rejected99[successful]),
            "id95_detection_train": rate(rejected95_train), "id99_detection_train": rate(rejected99_train),
            "mahalanobis_auc": m_auc, "mahalanobis_auc_successful": m_auc_s,
            "mahalanobis_tpr_at_5fpr": m_tpr,
            "paper_auc": paper_ours, "paper_defense_gan_auc": paper_dgan,
            "seed": config.seed,
        }
        records.append(record)
        curves.setdefault(threat, {})[setting.label] = {
            "idefender": roc(natural["idefender"], adv["idefender"]),
            "mahalanobis": roc(natural["mahalanobis"], adv["mahalanobis"]),
            "attack": setting.name, "eps": setting.eps,
        }
        logger.info("attack %d/%d, %s %s on %d images: adv acc %.3f, AUC %.4f: %.1f s", index, len(jobs), threat,
                    setting.label, n, record["adv_acc"], auc, time.perf_counter() - started)

    ablation = None
    if config.ablation and kept:
        with timer("ablation", f"ablation: {len(config.ablation)} detector variants"):
            ablation = run_ablation(config, F, train_loader, x_test, kept, device, budget,
                                    (x_cal, y_cal) if config.n_holdout else None)

    total = time.perf_counter() - start
    widths = dict(idefender.n_features_)
    results = {
        "experiment": "blackbox",
        "dataset": data.name,
        "seed": config.seed,
        "config": config.to_json(),
        "data": {"source": display_path(data.source), "sha256": data.sha256, "n_train": int(data.x_train.shape[0]),
                 "n_test": int(x_test.shape[0]), "holdout": int(holdout), "n_holdout": int(config.n_holdout),
                 "n_calibrate_id99": int(min(n_cal, data.x_train.shape[0]))},
        "models": model_info,
        "detector": {
            "layers": list(idefender.layers_), "n_features": widths,
            "n_components": config.n_components, "covariance_type": config.covariance_type,
            "reg_covar": config.reg_covar, "score": "log-likelihood under F's predicted class",
            "natural_test_rejected_id95": rate(natural_rejected95),
            "natural_test_rejected_id99": rate(natural_rejected99),
            "natural_test_rejected_id95_train": rate(natural_rejected95_train),
            "natural_test_rejected_id99_train": rate(natural_rejected99_train),
            "thresholds": ("held-out: the last %d test images in use" % config.n_holdout if config.n_holdout
                           else "natural training images"),
            "baseline": "MahalanobisDetector (one Gaussian per class, shared covariance, closest class)",
        },
        "machine": machine_info(device, timer),
        "timings": {**{k: round(v, 2) for k, v in timer.seconds.items()}, "total": round(total, 2)},
        "records": records,
        "curves": curves,
    }
    if ablation is not None:
        results["ablation"] = ablation
    return results
