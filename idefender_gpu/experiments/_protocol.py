"""What the semi-white-box, gray-box and adaptive reproductions share (private).

:class:`ProtocolConfig` holds their common settings; :func:`prepare` loads the data, splits
the test images into the evaluation set and a held-out calibration set, and trains (or
loads) model F; :func:`fit_defence` fits I-defender and the Mahalanobis baseline on a
model's natural training hidden states and computes both families of thresholds:

- *train*: the paper's ID-95 / ID-99, keeping 95% / 99% of each class's natural
  training data (ID-99 from the first ``n_calibrate`` training images);
- *held-out*: the same fractions of each class's held-out natural test images (the last
  ``n_holdout`` test images in use, never attacked nor scored as negatives), the default
  decision: a model's hidden states are more typical on the images it was trained on, so
  training-data thresholds reject more than their nominal share of new natural inputs.

Both detectors are left with their held-out 95% thresholds in ``thresholds_`` (the
defended model an attacker meets). :func:`score` gives predictions, scores and the class
each score is taken under, so any set of thresholds can be applied afterwards.

A profile with ``streamed`` data (ImageNet) never holds its images in memory: ``prepare``
reads them through :mod:`._loaders` (``Setup.streamed``; ``x_eval`` / ``y_eval`` are then
the ``n_attack`` attacked images only, and the held-out images are a seeded stratified
share of val, ``x_holdout`` None), the detectors are fitted and calibrated over loaders,
natural images are scored through a loader under their predicted class only, and no fit
is memoised (one 1000-class, 4096-feature detector holds 67 GB in float32).
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from numbers import Integral
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from idefender_gpu import IDefender, MahalanobisDetector
from idefender_gpu._param_validation import Interval, Options, Predicate, validate_params
from idefender_gpu.experiments._common import CONFIG_CONSTRAINTS, PhaseTimer, batches, check_device, display_path, load_checked, logger, rate
from idefender_gpu.experiments._datasets import PROFILES, Profile, build_role_model, obtain_model, profile_for
from idefender_gpu.features import parse_layers
from idefender_gpu.metrics import roc_auc_score
from idefender_gpu.models import evaluate

__all__ = ["Defence", "ProtocolConfig", "Setup", "balanced_accuracy", "fit_defence", "prepare", "record_accuracy",
           "score", "score_loader", "score_natural", "threshold_summary"]

#: threshold family -> what it is calibrated on
THRESHOLDS = {"heldout": "held-out natural test images", "train": "natural training images"}


@dataclass
class ProtocolConfig:
    """Settings shared by the semi-white-box, gray-box and adaptive reproductions.

    Attributes
    ----------
    dataset, data, seed, n_train, n_test, device, progress, download, cache
        As in :class:`~idefender_gpu.experiments.blackbox.BlackboxConfig` (the first model,
        F on Fashion-MNIST / MNIST, WRN-34-8 on CIFAR-10, is trained with ``seed + 1``);
        ``dataset`` also 'cifar10'. What the dataset sets (models, default layer and
        training length) is its :class:`~idefender_gpu.experiments._datasets.Profile`.
    epochs : int, optional
        Training epochs of the models (None: the dataset's default, 5 for F, 200 for a WRN).
    stand_in : bool
        Seeded random images of the dataset's shapes and the profile's narrow networks
        (:data:`~idefender_gpu.experiments._datasets.STAND_INS`): a pipeline check, not a
        reproduction (results record ``stand_in``).
    weights : tuple of path
        Checkpoints of the models in role order (Source, then Target and Wide in the
        gray-box protocol), e.g. ``idefender-gpu train``'s ``model.safetensors``; the roles
        without one are loaded from the cache or trained.
    n_holdout : int
        The last ``n_holdout`` test images in use calibrate the held-out thresholds; the
        others are the evaluation set. On a streamed dataset (ImageNet) a seeded stratified
        share of val instead (:func:`~idefender_gpu.experiments._loaders.split_val`: val is
        sorted by class), the evaluation images in a seeded order; ``n_train`` / ``n_test``
        are seeded random subsets there.
    n_attack : int, optional
        Evaluation images attacked (the first ``n_attack``; None: all).
    n_calibrate : int, optional
        Training images whose scores set the training-data ID-99 thresholds.
    workers : int, optional
        Loader processes of a streamed dataset (ImageNet; None: ``min(8, CPUs)``, 0 for the stand-in).
    layers, n_components, covariance_type, reg_covar, batch_size, memory_budget
        I-defender's settings (as the black-box reproduction's; ``layers`` None: the
        dataset's default, ``conv2`` of F, the input of a WRN's last Linear layer).
    """

    dataset: str = "fashion-mnist"
    data: str | None = None
    seed: int = 0
    epochs: int | None = None
    n_train: int | None = None
    n_test: int | None = None
    n_holdout: int = 2000
    n_attack: int | None = 1000
    n_calibrate: int | None = 10000
    device: str = field(default_factory=lambda: "cuda" if torch.cuda.is_available() else "cpu")
    progress: bool | None = None
    download: bool = False
    cache: str | None = None
    layers: tuple[str, ...] | None = None
    n_components: int = 1
    covariance_type: str = "full"
    reg_covar: float = 1e-4
    batch_size: int = 500
    memory_budget: int | None = None
    stand_in: bool = False
    weights: tuple[str, ...] = ()
    workers: int | None = None

    _parameter_constraints = {
        **CONFIG_CONSTRAINTS,
        "dataset": [Options(str, set(PROFILES))],
        "epochs": [None, *CONFIG_CONSTRAINTS["epochs"]],
        "layers": [None, *CONFIG_CONSTRAINTS["layers"]],
        "stand_in": ["boolean"],
        "weights": [Predicate(lambda v: isinstance(v, (tuple, list))
                              and all(isinstance(p, (str, os.PathLike)) for p in v), "a tuple of paths")],
        "n_holdout": [Interval(Integral, 10, None)],
        "workers": [None, Interval(Integral, 0, None)],
        **{name: [None, Interval(Integral, 1, None)] for name in ("n_train", "n_test", "n_attack", "n_calibrate")},
    }

    def validate(self) -> torch.device:
        """Check every setting before any work; return the device."""
        constraints = {}
        for klass in reversed(type(self).__mro__):
            constraints.update(getattr(klass, "_parameter_constraints", {}))
        validate_params(type(self).__name__, vars(self), constraints)
        device = check_device(self.device)
        profile = self.profile()
        with torch.device("meta"):  # names only: no memory, no initialisation
            for role in profile.roles[:self._n_roles()]:
                parse_layers(build_role_model(role.model, 10), list(self.detector_layers()))
        if len(self.weights) > self._n_roles():
            raise ValueError(f"weights (--weights) takes at most {self._n_roles()} file(s) here (the models "
                             f"{', '.join(r.role for r in profile.roles[:self._n_roles()])}, in that order); got "
                             f"{len(self.weights)}")
        if profile.streamed and not self.stand_in and self.data is None:
            raise ValueError(f"--dataset {self.dataset} needs --data ROOT: the ImageNet folder holding train/ and "
                             f"val/, one sub-folder per class (or --stand-in)")
        if profile.weights_hint is not None and len(self.weights) < self._n_roles():
            roles = [r.role for r in profile.roles[:self._n_roles()]]
            raise ValueError(f"--dataset {self.dataset} needs {len(roles)} --weights FILE ({', '.join(roles)}, in "
                             f"that order; the models are never trained here): {profile.weights_hint}; got "
                             f"{len(self.weights)}")
        for path in self.weights:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"weights (--weights) {os.fspath(path)!r}: no such file (a checkpoint "
                                        f"such as idefender-gpu train's model.safetensors)")
        if self.n_test is not None and self.n_holdout >= self.n_test:
            raise ValueError(f"n_holdout (--n-holdout) must be smaller than n_test (--n-test): the rest is the "
                             f"evaluation set; got n_holdout {self.n_holdout} and n_test {self.n_test}")
        return device

    #: how many of the profile's roles the protocol uses (Source only; the gray-box protocol: all)
    _roles_used: ClassVar[int] = 1

    def _n_roles(self) -> int:
        return min(self._roles_used, len(self.profile().roles))

    def profile(self) -> Profile:
        """What the dataset (or its stand-in) sets: models, default layer and training length."""
        return profile_for(self.dataset, self.stand_in)

    def train_epochs(self) -> int:
        """``epochs``, or the dataset's default."""
        return self.profile().epochs if self.epochs is None else self.epochs

    def detector_layers(self) -> tuple[str, ...]:
        """``layers``, or the dataset's default."""
        return tuple(self.profile().layers if self.layers is None else self.layers)

    def weights_for(self, index: int) -> str | None:
        """The checkpoint given for role ``index`` (None: cache or train)."""
        return self.weights[index] if index < len(self.weights) else None

    def to_json(self) -> dict[str, Any]:
        """The settings as JSON (paths as :func:`display_path` writes them)."""
        out = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}
        out["data"], out["cache"] = display_path(self.data), display_path(self.cache)
        out["device"] = str(self.device)
        out["epochs"], out["layers"] = self.train_epochs(), list(self.detector_layers())
        out["weights"] = [display_path(p) for p in self.weights]
        return out

    def budget(self, device: torch.device) -> int | None:
        """The detectors' memory budget: the one set, else the library's defaults (a small
        budget would also push the hidden states of a fit with several components out of
        memory: the EM passes would then re-run the model)."""
        return self.memory_budget


@dataclass
class Setup:
    """The data split and model F of a run."""

    data: Any
    x_eval: Tensor
    y_eval: Tensor
    x_holdout: Tensor
    y_holdout: Tensor
    model: nn.Module
    model_info: dict[str, Any]
    device: torch.device
    #: a streamed dataset's loaders (``_loaders.StreamedData``); None: everything in memory
    streamed: Any = None

    def counts(self) -> tuple[int, int, int]:
        """``(training, evaluation, held-out)`` images in use."""
        if self.streamed is not None:
            return self.streamed.n_train, int(self.streamed.eval_idx.numel()), int(self.streamed.holdout_idx.numel())
        return int(self.data.x_train.shape[0]), int(self.x_eval.shape[0]), int(self.x_holdout.shape[0])


@dataclass
class Defence:
    """A model's I-defender and Mahalanobis baseline, with every threshold set."""

    idefender: IDefender
    mahalanobis: MahalanobisDetector | None
    #: detector name -> family ('heldout', 'train') -> keep (0.95, 0.99) -> thresholds (C,) on CPU
    thresholds: dict[str, dict[str, dict[float, Tensor]]]

    def detectors(self) -> dict[str, Any]:
        out = {"idefender": self.idefender, "mahalanobis": self.mahalanobis}
        return {k: v for k, v in out.items() if v is not None}


def model_record(info: dict[str, Any], accuracy: float, training: str) -> dict[str, Any]:
    """What results files record about a trained model."""
    path = info.get("path")
    return {"seed": info.get("seed"), "epochs": info.get("epochs"), "test_accuracy": accuracy,
            "checkpoint": os.path.basename(path) if path else None, "cached": bool(info.get("cached")),
            "train_seconds": info.get("train_seconds"), "training": training}


def prepare(config: ProtocolConfig, timer: PhaseTimer, accuracy: bool = True) -> Setup:
    """Load and split the data (sizes checked before any training), then train or load F
    (``accuracy``: as :func:`obtain_role`)."""
    device = check_device(config.device)
    if config.profile().streamed:
        return _prepare_streamed(config, timer, device, accuracy)
    with timer("data", label=False):
        data = load_checked(config)
        n_test = data.x_test.shape[0]
        if config.n_holdout >= n_test:
            raise ValueError(f"n_holdout (--n-holdout) must be smaller than the {n_test} test images in use "
                             f"(--n-test): the rest is the evaluation set; got {config.n_holdout}")
        y_holdout = data.y_test[n_test - config.n_holdout:]
        missing = sorted(set(range(data.n_classes)) - set(y_holdout.tolist()))
        if missing:
            raise ValueError(f"the held-out calibration images (the last {config.n_holdout} test images, "
                             f"--n-holdout) must hold every class; classes {missing} have none (raise "
                             f"--n-holdout)")
    logger.info("%s: %d training, %d test images (%d held out for the thresholds) from %s", data.name,
                len(data.y_train), n_test, config.n_holdout, display_path(data.source))
    split = n_test - config.n_holdout
    setup = Setup(data, data.x_test[:split], data.y_test[:split], data.x_test[split:], y_holdout, None, {}, device)
    setup.model, record = obtain_role(config, setup, 0, timer)
    setup.model_info = {config.profile().roles[0].model: record}
    return setup


def _prepare_streamed(config: ProtocolConfig, timer: PhaseTimer, device: torch.device, accuracy: bool) -> Setup:
    """:func:`prepare` over loaders: the split, the attacked images in memory, the Source model."""
    from idefender_gpu.experiments._loaders import load_streamed

    with timer("data", label=False):
        data = load_streamed(config, device)
        n_eval = int(data.eval_idx.numel())
        n = n_eval if config.n_attack is None else min(config.n_attack, n_eval)
        x, y = data.tensors("eval", n)  # the attacked images: the only ones in memory
    logger.info("%s: %d training, %d val images (%d held out for the thresholds, stratified; %d attacked) from %s, "
                "%d loader worker(s)", data.name, data.n_train, n_eval + len(data.holdout_idx), len(data.holdout_idx),
                n, display_path(data.source), data.workers)
    setup = Setup(data, x, y, None, data.labels("holdout"), None, {}, device, streamed=data)
    setup.model, record = obtain_role(config, setup, 0, timer, accuracy)
    setup.model_info = {config.profile().roles[0].model: record}
    return setup


@torch.no_grad()
def _loader_accuracy(model: nn.Module, loader: Any, device: torch.device) -> float:
    right = total = 0
    for x, y in loader:
        pred = model(x.to(device, non_blocking=True)).argmax(1).cpu()
        right += int((pred == torch.as_tensor(y)).sum())
        total += int(pred.numel())
    return right / max(total, 1)


def obtain_role(config: ProtocolConfig, setup: Setup, index: int, timer: PhaseTimer,
                accuracy: bool = True) -> tuple[nn.Module, dict]:
    """The model of the profile's role ``index`` (user weights, cache or training; timed as
    ``train``) and its results record (test accuracy on the evaluation set). A streamed
    dataset's caller that scores every natural evaluation image anyway passes
    ``accuracy=False`` and fills the accuracy from those scores (:func:`record_accuracy`):
    one pass over the images instead of two."""
    role, epochs, weights = config.profile().roles[index], config.train_epochs(), config.weights_for(index)
    how = f"load {weights}" if weights is not None else (f"train {epochs} epoch(s) on {setup.counts()[0]} "
                                                         f"images, or load the cached checkpoint")
    with timer("train", f"model {role.role} ({role.model}): {how}"):
        model, info, training = obtain_model(role, setup.data, seed=config.seed, epochs=epochs, device=setup.device,
                                             cache=config.cache, weights=weights, progress=config.progress)
    if setup.streamed is None:
        value = float((evaluate(model, setup.x_eval.to(setup.device)).cpu() == setup.y_eval).double().mean())
    else:  # every evaluation image, through the loader (or later, from the caller's scores)
        value = _loader_accuracy(model, setup.streamed.loader("eval"), setup.device) if accuracy else None
    return model, model_record(info, value, training)


def record_accuracy(record: dict[str, Any], setup: Setup, natural: dict[str, Tensor]) -> None:
    """Fill a streamed role's ``test_accuracy`` from :func:`score_natural`'s predictions."""
    if record.get("test_accuracy") is None and setup.streamed is not None:
        record["test_accuracy"] = float((natural["pred"] == setup.streamed.labels("eval")).double().mean())


def _loader(x: Tensor, y: Tensor) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=1000)


#: complete defences (with the baseline) fitted in this process, by weights, data and detector
#: settings: ``reproduce all`` fits model F's detectors once for the three protocols (the same
#: numbers; about 80 s per fit saved on a 2-core CPU)
_FITTED: dict[tuple, Defence] = {}


def _weights_digest(model: nn.Module) -> str:
    import hashlib

    digest = hashlib.sha256()
    for key, tensor in model.state_dict().items():
        digest.update(key.encode())
        digest.update(tensor.detach().to("cpu", torch.float64).numpy().tobytes())
    return digest.hexdigest()


def fit_defence(config: ProtocolConfig, setup: Setup, model: nn.Module, timer: PhaseTimer,
                name: str = "F", baseline: bool = True) -> Defence:
    """I-defender and (``baseline``) the Mahalanobis baseline on ``model``; train and held-out
    thresholds. A defence this process already fitted on the same weights, data split and
    detector settings is reused (its thresholds are never changed after fitting); a streamed
    dataset's defences are never kept (each may hold tens of GB)."""
    if getattr(setup, "streamed", None) is not None:
        return _fit_defence(config, setup, model, timer, name, baseline)
    key = (_weights_digest(model), setup.data.sha256, int(setup.data.x_train.shape[0]), int(setup.x_eval.shape[0]),
           int(setup.x_holdout.shape[0]), config.n_calibrate, config.detector_layers(), config.n_components,
           config.covariance_type, config.reg_covar, config.seed, str(setup.device), config.budget(setup.device))
    if key in _FITTED:  # holds the baseline too: good for either request
        logger.info("model %s: I-defender%s fitted earlier in this run, reused", name,
                    " and Mahalanobis" if baseline else "")
        return _FITTED[key]
    defence = _fit_defence(config, setup, model, timer, name, baseline)
    if baseline:  # only complete defences are kept, and only the last two (each holds C D x D covariances)
        _FITTED[key] = defence
        while len(_FITTED) > 2:
            del _FITTED[next(iter(_FITTED))]
    return defence


def _fit_defence(config: ProtocolConfig, setup: Setup, model: nn.Module, timer: PhaseTimer,
                 name: str, baseline: bool) -> Defence:
    data, budget = setup.data, config.budget(setup.device)
    if getattr(setup, "streamed", None) is not None:
        n_train = setup.streamed.n_train
        train_loader, cal_loader = setup.streamed.loader("train"), setup.streamed.loader("calibrate")
        held_loader = setup.streamed.loader("holdout")
    else:
        n_train = len(data.y_train)
        train_loader = _loader(data.x_train, data.y_train)
        n_cal = data.x_train.shape[0] if config.n_calibrate is None else min(config.n_calibrate, data.x_train.shape[0])
        cal_loader = _loader(data.x_train[:n_cal], data.y_train[:n_cal])
        held_loader = _loader(setup.x_holdout, setup.y_holdout)
    thresholds: dict[str, dict[str, dict[float, Tensor]]] = {}
    with timer("fit_detectors", f"model {name}: I-defender{' and Mahalanobis' if baseline else ''} on "
                                f"{n_train} training images; train and held-out thresholds"):
        idefender = IDefender(model, list(config.detector_layers()), config.n_components,
                              covariance_type=config.covariance_type, keep=0.95, reg_covar=config.reg_covar,
                              random_state=config.seed, memory_budget=budget,
                              progress=config.progress).fit(train_loader)
        mahalanobis = MahalanobisDetector(model, list(config.detector_layers()), reg_covar=config.reg_covar,
                                          memory_budget=budget, progress=config.progress).fit(train_loader) \
            if baseline else None
        for key, detector in (("idefender", idefender), ("mahalanobis", mahalanobis)):
            if detector is None:
                continue
            table: dict[str, dict[float, Tensor]] = {"train": {0.95: detector.thresholds_.clone().cpu()}}
            if key == "idefender":
                detector.calibrate(cal_loader, keep=0.99)
                table["train"][0.99] = detector.thresholds_.clone().cpu()
            table["heldout"] = {}
            for keep in (0.99, 0.95):  # 0.95 last: the thresholds the detector keeps
                detector.calibrate(held_loader, keep=keep)
                table["heldout"][keep] = detector.thresholds_.clone().cpu()
            thresholds[key] = table
    return Defence(idefender, mahalanobis, thresholds)


@torch.no_grad()
def score(x: Tensor, model: nn.Module, defence: Defence, batch_size: int,
          device: torch.device) -> dict[str, Tensor]:
    """``pred`` (model's prediction) and, per detector, ``<name>`` (score) and ``<name>_class``
    (the class it is scored under), each ``(N,)`` on CPU (scores in float64)."""
    parts: dict[str, list[Tensor]] = {"pred": []}
    for sl in batches(x.shape[0], batch_size):
        xb = x[sl].to(device)
        pred = model(xb).argmax(1)
        parts["pred"].append(pred.cpu())
        for key, detector in defence.detectors().items():
            log_density = detector.log_density(xb)  # (B, C)
            scored = log_density.argmax(1) if getattr(detector, "score_class", "predicted") == "closest" else pred
            parts.setdefault(key, []).append(log_density.gather(1, scored[:, None])[:, 0].double().cpu())
            parts.setdefault(f"{key}_class", []).append(scored.cpu())
    return {k: torch.cat(v) for k, v in parts.items()}


@torch.no_grad()
def score_loader(loader: Any, model: nn.Module, defence: Defence, device: torch.device) -> dict[str, Tensor]:
    """:func:`score` over a loader of ``(x, y)`` batches (a streamed dataset's natural images):
    a detector that scores under the predicted class evaluates that class's density only
    (``log_density(x, pred)``; ImageNet: one of 1000 full-covariance Gaussians per image)."""
    parts: dict[str, list[Tensor]] = {"pred": []}
    for xb, _ in loader:
        xb = xb.to(device, non_blocking=True)
        pred = model(xb).argmax(1)
        parts["pred"].append(pred.cpu())
        for key, detector in defence.detectors().items():
            if getattr(detector, "score_class", "predicted") == "closest":
                log_density = detector.log_density(xb)  # (B, C): a shared covariance, cheap
                scored = log_density.argmax(1)
                value = log_density.gather(1, scored[:, None])[:, 0]
            else:
                scored, value = pred, detector.log_density(xb, pred)  # (B,)
            parts.setdefault(key, []).append(value.double().cpu())
            parts.setdefault(f"{key}_class", []).append(scored.cpu())
    return {k: torch.cat(v) for k, v in parts.items()}


def score_natural(setup: Setup, model: nn.Module, defence: Defence, batch_size: int) -> dict[str, Tensor]:
    """Scores of every natural evaluation image (:func:`score`, or :func:`score_loader` for a
    streamed dataset), in the evaluation order (the attacked images first)."""
    if setup.streamed is not None:
        return score_loader(setup.streamed.loader("eval"), model, defence, setup.device)
    return score(setup.x_eval, model, defence, batch_size, setup.device)


def rejected(scores: dict[str, Tensor], key: str, thresholds: Tensor) -> Tensor:
    """Boolean ``(N,)``: the detector ``key`` rejects (score below its scored class's threshold)."""
    return scores[key] < thresholds.double()[scores[f"{key}_class"]]


def balanced_accuracy(natural_rejected: Tensor, adversarial_rejected: Tensor) -> float | None:
    """``(TPR + TNR) / 2`` of a thresholded detector: the AUC of its binary decision."""
    if natural_rejected.numel() == 0 or adversarial_rejected.numel() == 0:
        return None
    return 0.5 * (float(adversarial_rejected.double().mean()) + 1.0 - float(natural_rejected.double().mean()))


def auc(natural: Tensor, adversarial: Tensor) -> float | None:
    """AUC of ``-score``, adversarial inputs positives (None without any)."""
    if natural.numel() == 0 or adversarial.numel() == 0:
        return None
    scores = torch.cat([-natural, -adversarial])
    labels = torch.cat([torch.zeros(natural.numel()), torch.ones(adversarial.numel())])
    return float(roc_auc_score(scores, labels))


def threshold_summary(defence: Defence, natural: dict[str, Tensor], model: str = "F") -> list[dict[str, Any]]:
    """Natural false-reject rate on the evaluation set of every threshold set of both detectors."""
    rows = []
    for key, families in defence.thresholds.items():
        for family, by_keep in families.items():
            for keep, th in sorted(by_keep.items()):
                rows.append({"model": model, "detector": key, "family": family, "calibrated_on": THRESHOLDS[family],
                             "keep": keep, "natural_test_rejected": rate(rejected(natural, key, th))})
    return rows


def base_results(experiment: str, config: ProtocolConfig, setup: Setup, defence: Defence) -> dict[str, Any]:
    """The fields every protocol's results share (the caller adds records, timings)."""
    from idefender_gpu.experiments._common import machine_info

    data, det = setup.data, defence.idefender
    n_train, n_eval, n_holdout = setup.counts()
    n_attack = n_eval if config.n_attack is None else min(config.n_attack, n_eval)
    return {
        "experiment": experiment, "dataset": data.name, "seed": config.seed, "config": config.to_json(),
        "stand_in": bool(getattr(data, "stand_in", False)),
        "data": {"source": display_path(data.source), "sha256": data.sha256, "n_train": n_train,
                 "n_eval": n_eval, "n_attack": int(n_attack), "n_holdout": n_holdout,
                 **({"holdout": "a seeded, stratified share of val; the evaluation images in a seeded order"}
                    if getattr(setup, "streamed", None) is not None else {})},
        "models": setup.model_info,
        "detector": {"layers": list(det.layers_), "n_features": int(sum(det.n_features_.values())),
                     "n_components": config.n_components, "covariance_type": config.covariance_type,
                     "reg_covar": config.reg_covar},
        "machine": machine_info(setup.device),
    }


@dataclass
class SingleModelRun:
    """What the one-model protocols (semi-white-box, adaptive) start from: model F, its
    defences, the attacked images and every natural evaluation image scored."""

    device: torch.device
    timer: PhaseTimer
    start: float
    setup: Setup
    defence: Defence
    x: Tensor  # the first n_attack evaluation images
    y: Tensor
    natural_all: dict[str, Tensor]  # scores of every evaluation image
    natural: dict[str, Tensor]  # ... of the attacked ones
    results: dict[str, Any]

    @property
    def model(self) -> nn.Module:
        return self.setup.model


def begin_single_model(config: ProtocolConfig, experiment: str) -> SingleModelRun:
    """Validate ``config``, prepare data and model F, fit its defences, score the natural
    evaluation images and start the results (with the threshold summary)."""
    device = config.validate()
    timer = PhaseTimer(device)
    start = time.perf_counter()
    setup = prepare(config, timer, accuracy=False)  # a streamed Source's from the natural scores below
    name = config.profile().roles[0].model  # F on the MNIST family
    defence = fit_defence(config, setup, setup.model, timer, name)
    n = setup.x_eval.shape[0] if config.n_attack is None else min(config.n_attack, setup.x_eval.shape[0])
    with timer("score", f"score {setup.counts()[1]} natural evaluation images"):
        natural_all = score_natural(setup, setup.model, defence, config.batch_size)
    record_accuracy(setup.model_info[name], setup, natural_all)
    results = base_results(experiment, config, setup, defence)
    results["thresholds"] = threshold_summary(defence, natural_all, name)
    return SingleModelRun(device, timer, start, setup, defence, setup.x_eval[:n], setup.y_eval[:n],
                          natural_all, {k: v[:n] for k, v in natural_all.items()}, results)
