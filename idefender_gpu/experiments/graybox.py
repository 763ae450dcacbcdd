"""The paper's gray-box protocol (Section 4.3, Tables 7-8) on MNIST / Fashion-MNIST.

Source and Target are two copies of model F trained independently on the same training
data (seeds ``seed + 1`` and ``seed + 2``), each with its own I-defender (held-out ID-95
thresholds). The attacker knows everything about Source and its I-defender and nothing of
Target's parameters: :class:`~idefender_gpu.attacks.GrayBox` (paper Eq. 6) is crafted on
Source with alpha in {0, 1e-3, 1e-2, 1e-1, 1}, and the adversarial inputs are evaluated on
Source (what the attacker optimised against) and on Target (detection AUC against the same
natural images, adversarial accuracy, evasions: misclassified and accepted). Table 8's
analogue evaluates the same inputs on *Wide*, a larger network of F's family built here
(:class:`WideF`: 1.5 times F's channels, plain torch layers, seed ``seed + 3``), with its own
I-defender. On CIFAR-10 the three are WRN-34-8, WRN-34-8 and WRN-46-8 with the paper's eps
and alphas; what each dataset sets is its profile in ``_datasets.PROFILES``.

Eps: the paper's (Iter-Linf 0.013 and 0.0085, Iter-L2 0.47, FGSM 0.075) are for CIFAR-10
images, on which a few grey levels suffice; they barely move model F on Fashion-MNIST. We
keep the paper's ratios where they fit and anchor them to the paper's own Fashion-MNIST
range (Table 5, FGSM eps 0.1 to 0.3): Iter-Linf eps 0.1 (Table 5's smallest) and 0.065
(0.1 x 0.0085 / 0.013), Iter-L2 eps 1.8 (0.1 x 0.47 / 0.013, times sqrt(784 / 3072) for
the smaller image) and FGSM eps 0.3 (Table 5's largest; the paper's FGSM / Iter-Linf ratio
of 5.8 would exceed it). Iterative attacks: 10 steps of 2.5 eps / 10.

On ImageNet (Table 9) Source and Target are two VGG19s from the user's files, alpha in
{1e-2, 1e-1, 1}, FGSM eps 0.3, Iter-Linf 0.019, Iter-L2 12.5 on [0, 1] pixels (the paper
does not give the scale; ``eps_scale`` divides them), no wider network and no Mahalanobis
baseline. One 1000-class detector on 4096 features holds 67 GB in float32, so two cannot
coexist on one GPU: the protocol runs sequentially (:func:`run_graybox` on a ``streamed``
profile): fit Source's I-defender, craft every (attack, alpha) set on Source and keep the
adversarial images (``len(attacks) x len(alphas) x n_attack`` images on the host), record
Source's adversarial accuracy (the model only), free Source and its detector, then load
Target, fit its I-defender and evaluate every set on it (adversarial accuracy, AUC against
the natural evaluation images, scored through a loader under the predicted class).
"""

from __future__ import annotations

import gc
import os
import time
import warnings
from numbers import Integral, Real
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from idefender_gpu._param_validation import Interval, Predicate
from idefender_gpu.attacks import GrayBox
from idefender_gpu.experiments._common import batches, finish, PhaseTimer, logger, rate
from idefender_gpu.experiments._outputs import add_curve, fmt, pct, setup_lines
from idefender_gpu.experiments._datasets import PROFILES, STAND_IN_NOTE, WideF
from idefender_gpu.experiments._protocol import (
    ProtocolConfig,
    auc,
    base_results,
    fit_defence,
    obtain_role,
    prepare,
    record_accuracy,
    rejected,
    score,
    score_loader,
    score_natural,
    threshold_summary,
)
from idefender_gpu.experiments._common import craft as _craft
from idefender_gpu.models import evaluate
from idefender_gpu.experiments.paper import GRAYBOX_TABLES, IMAGENET_TABLE, IMAGENET_TARGET_CLEAN_ACC

__all__ = ["ALPHAS", "GRAYBOX_ATTACKS", "GrayboxConfig", "WideF", "markdown", "run_graybox"]

#: Fashion-MNIST's alphas and attacks (label, GrayBox base, eps): see the module docstring for
#: the choice of eps; every dataset's are in its profile (``_datasets.PROFILES``)
ALPHAS = PROFILES["fashion-mnist"].alphas
GRAYBOX_ATTACKS = PROFILES["fashion-mnist"].graybox_attacks


@dataclass
class GrayboxConfig(ProtocolConfig):
    """Settings of :func:`run_graybox`: :class:`ProtocolConfig`'s, plus

    Attributes
    ----------
    alphas : tuple of float, optional
        The weights of Eq. 6's detector term (None: the dataset's, :data:`ALPHAS` on
        Fashion-MNIST, the paper's 1e-3, 1e-2, 1e-1 on CIFAR-10).
    attacks : tuple of (label, base, eps), optional
        None: the dataset's (:data:`GRAYBOX_ATTACKS` on Fashion-MNIST, the paper's eps on CIFAR-10).
    wide : bool
        Also evaluate on the wider network (Table 8's analogue).
    steps : int
        Steps of the iterative attacks (each of 2.5 eps / steps).
    eps_scale : float
        Every gray-box eps is divided by it (default 1: the eps on [0, 1] pixels; e.g. 255
        reads ImageNet's Table 9 eps as grey levels); labels then say ``/ S``.
    """

    alphas: tuple[float, ...] | None = None
    attacks: tuple[tuple[str, str, float], ...] | None = None
    wide: bool = True
    steps: int = 10
    eps_scale: float = 1.0

    _roles_used = 3  # Source, Target, Wide

    _parameter_constraints = {
        "alphas": [None, Predicate(lambda v: isinstance(v, (tuple, list)) and len(v) > 0
                             and all(isinstance(a, (int, float)) and a >= 0 for a in v),
                             "a non-empty tuple of floats >= 0")],
        "attacks": [None, Predicate(lambda v: isinstance(v, (tuple, list)) and len(v) > 0
                              and all(len(a) == 3 and a[1] in ("bim", "l2", "fgsm") and a[2] > 0 for a in v),
                              "a non-empty tuple of (label, 'bim' | 'l2' | 'fgsm', eps > 0)")],
        "wide": ["boolean"],
        "steps": [Interval(Integral, 1, None)],
        "eps_scale": [Interval(Real, 0, None, closed="neither")],
    }

    def resolved(self) -> tuple[tuple[float, ...], tuple[tuple[str, str, float], ...]]:
        """``(alphas, attacks)``: the ones set, else the dataset's (eps divided by ``eps_scale``)."""
        profile = self.profile()
        attacks = profile.graybox_attacks if self.attacks is None else tuple(self.attacks)
        if self.eps_scale != 1:
            attacks = tuple((f"{label} / {self.eps_scale:g}", base, eps / self.eps_scale)
                            for label, base, eps in attacks)
        return profile.alphas if self.alphas is None else tuple(self.alphas), attacks

    def to_json(self) -> dict[str, Any]:
        """The settings as JSON, the dataset's alphas and attacks filled in."""
        out = super().to_json()
        alphas, attacks = self.resolved()
        out["alphas"], out["attacks"] = list(alphas), [list(a) for a in attacks]
        return out


def run_graybox(config: GrayboxConfig) -> dict[str, Any]:
    """Run the Tables 7-8 protocol; return the results (JSON-able but for ``results['curves']``)."""
    device = config.validate()
    timer = PhaseTimer(device)
    start = time.perf_counter()
    profile = config.profile()
    if profile.streamed:
        return _run_sequential(config, device, timer, start)
    setup = prepare(config, timer)
    models: dict[str, nn.Module] = {"Source": setup.model}
    setup.model_info = {"Source": next(iter(setup.model_info.values()))}
    for index in (1, 2) if config.wide else (1,):
        name = profile.roles[index].role
        models[name], setup.model_info[name] = obtain_role(config, setup, index, timer)
    alphas, attacks = config.resolved()
    defences = {name: fit_defence(config, setup, model, timer, name, baseline=False) for name, model in models.items()}
    n = setup.x_eval.shape[0] if config.n_attack is None else min(config.n_attack, setup.x_eval.shape[0])
    x, y = setup.x_eval[:n], setup.y_eval[:n]
    results = base_results("graybox", config, setup, defences["Source"])
    results["architectures"] = {r.role: r.model for r in profile.roles if r.role in models}
    results["paper_same_dataset"], results["notes"] = profile.paper_same_dataset, list(profile.graybox_notes)
    results["thresholds"], natural = [], {}
    with timer("score", f"score {setup.x_eval.shape[0]} natural evaluation images on every model"):
        for name, model in models.items():
            scores = score(setup.x_eval, model, defences[name], config.batch_size, device)
            results["thresholds"] += threshold_summary(defences[name], scores, name)
            natural[name] = {k: v[:n] for k, v in scores.items()}
    source_detector = defences["Source"].idefender  # with its held-out ID-95 thresholds
    records = []
    for label, base, eps in attacks:
        for alpha in alphas:
            started = time.perf_counter()
            steps = {} if base == "fgsm" else {"step_size": (2.5 / config.steps) * eps, "steps": config.steps}
            attack = GrayBox(models["Source"], source_detector, base=base, alpha=alpha, eps=eps, **steps)
            with timer("attack", False):
                x_adv = _craft(attack, x, y, config.batch_size, device, f"gray-box {label} alpha={alpha:g}",
                               config.progress).cpu()
            record: dict[str, Any] = {"attack": label, "base": base, "eps": eps, "alpha": alpha, "n": int(n)}
            for name, model in models.items():
                adv = score(x_adv, model, defences[name], config.batch_size, device)
                nat = natural[name]
                th = defences[name].thresholds["idefender"]["heldout"][0.95]
                adv_rejected = rejected(adv, "idefender", th)
                wrong = adv["pred"] != y
                record[name] = {
                    "clean_acc": float((nat["pred"] == y).double().mean()),
                    "adv_acc": float((~wrong).double().mean()),
                    "auc": auc(nat["idefender"], adv["idefender"]),
                    "auc_successful": auc(nat["idefender"], adv["idefender"][adv["pred"] != nat["pred"]]),
                    "id95_detected": rate(adv_rejected),
                    "evaded": rate(wrong & ~adv_rejected),
                }
                if alpha in (alphas[0], alphas[-1]):
                    add_curve(results, f"roc_graybox_{name.lower()}.png",
                              f"gray-box (crafted on Source), I-defender of {name}", f"{label}, alpha {alpha:g}",
                              nat["idefender"], adv["idefender"], record[name]["auc"])
            records.append(record)
            logger.info("gray-box %s alpha %g: AUC Source %.4f, Target %.4f; adv acc Source %.3f, Target %.3f: "
                        "%.1f s", label, alpha, record["Source"]["auc"], record["Target"]["auc"],
                        record["Source"]["adv_acc"], record["Target"]["adv_acc"], time.perf_counter() - started)
    results["records"] = records
    return finish(results, timer, start)


def _same_file(paths: tuple[str, ...]) -> bool:
    try:
        return len(paths) >= 2 and os.path.samefile(paths[0], paths[1])
    except OSError:
        return False


def _run_sequential(config: GrayboxConfig, device: torch.device, timer: PhaseTimer, start: float) -> dict[str, Any]:
    """The protocol with one model and one detector in memory at a time (ImageNet): Source's
    detector, every adversarial set crafted on it, Source freed; then Target's detector and
    the evaluation (see the module docstring)."""
    profile, (alphas, attacks) = config.profile(), config.resolved()
    notes = list(profile.graybox_notes)
    if _same_file(config.weights):
        message = ("--weights names the same file for Source and Target: the attacker then knows Target's "
                   "parameters, and this gray-box run is a white-box one")
        warnings.warn(message, UserWarning, stacklevel=2)
        notes.insert(0, f"**{message}.**")
    setup = prepare(config, timer)  # the data and Source
    source = setup.model
    setup.model_info = {"Source": next(iter(setup.model_info.values()))}
    defence = fit_defence(config, setup, source, timer, "Source", baseline=False)
    x, y, n = setup.x_eval, setup.y_eval, int(setup.x_eval.shape[0])
    results = base_results("graybox", config, setup, defence)
    results["architectures"] = {r.role: r.model for r in profile.roles}
    results["paper_same_dataset"], results["notes"] = profile.paper_same_dataset, notes
    source_clean = evaluate(source, x, batch_size=config.batch_size) == y
    crafted = []
    for (label, base, eps), (paper_label, _, _) in zip(attacks, profile.graybox_attacks if config.attacks is None
                                                        else attacks):
        for alpha in alphas:
            steps = {} if base == "fgsm" else {"step_size": (2.5 / config.steps) * eps, "steps": config.steps}
            attack = GrayBox(source, defence.idefender, base=base, alpha=alpha, eps=eps, **steps)
            with timer("attack", False):
                x_adv = _craft(attack, x, y, config.batch_size, device, f"gray-box {label} alpha={alpha:g}",
                               config.progress).cpu()
            source_right = evaluate(source, x_adv, batch_size=config.batch_size) == y
            record: dict[str, Any] = {"attack": label, "paper_attack": paper_label, "base": base, "eps": eps,
                                      "alpha": alpha, "n": n,
                                      "Source": {"clean_acc": rate(source_clean), "adv_acc": rate(source_right),
                                                 "auc": None, "auc_successful": None, "id95_detected": None,
                                                 "evaded": None}}
            crafted.append((record, x_adv))
            logger.info("gray-box %s alpha %g crafted on Source: adv acc Source %.3f", label, alpha,
                        record["Source"]["adv_acc"])
    del attack, defence, source  # Source's detector is freed before Target's is fitted
    setup.model = None
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    target, setup.model_info["Target"] = obtain_role(config, setup, 1, timer, accuracy=False)  # from the scores
    defence = fit_defence(config, setup, target, timer, "Target", baseline=False)
    with timer("score", f"score {setup.counts()[1]} natural evaluation images on Target"):
        scores = score_natural(setup, target, defence, config.batch_size)
    record_accuracy(setup.model_info["Target"], setup, scores)
    results["thresholds"] = threshold_summary(defence, scores, "Target")
    nat = {k: v[:n] for k, v in scores.items()}
    th = defence.thresholds["idefender"]["heldout"][0.95]
    for record, x_adv in crafted:
        adv = score_loader([(x_adv[sl], y[sl]) for sl in batches(n, config.batch_size)], target, defence, device)
        wrong = adv["pred"] != y
        adv_rejected = rejected(adv, "idefender", th)
        record["Target"] = {
            "clean_acc": float((nat["pred"] == y).double().mean()), "adv_acc": float((~wrong).double().mean()),
            "auc": auc(nat["idefender"], adv["idefender"]),
            "auc_successful": auc(nat["idefender"], adv["idefender"][adv["pred"] != nat["pred"]]),
            "id95_detected": rate(adv_rejected), "evaded": rate(wrong & ~adv_rejected)}
        paper = IMAGENET_TABLE.get(record["alpha"], {}).get(record["paper_attack"])
        if paper is not None and profile.paper_same_dataset:
            record["paper_target"] = {"adv_acc": round(paper[0] / 100, 6), "auc": round(paper[1] / 100, 6)}
        if record["alpha"] in (alphas[0], alphas[-1]):
            add_curve(results, "roc_graybox_target.png", "gray-box (crafted on Source), I-defender of Target",
                      f"{record['attack']}, alpha {record['alpha']:g}", nat["idefender"], adv["idefender"],
                      record["Target"]["auc"])
        logger.info("gray-box %s alpha %g on Target: AUC %.4f, adv acc %.3f", record["attack"], record["alpha"],
                    record["Target"]["auc"], record["Target"]["adv_acc"])
    results["records"] = [record for record, _ in crafted]
    return finish(results, timer, start)


def _table9_lines(results: dict[str, Any]) -> list[str]:
    """Table 9 beside ours: Target adversarial accuracy / AUC per (alpha, attack), in %."""
    same = results.get("paper_same_dataset", False)
    models = results.get("models", {})
    clean = models.get("Target", {}).get("test_accuracy")
    out = ["", "## Table 9 (the paper: ImageNet, VGG19 Source and Target" + ("" if same else "; not this run's data")
           + "): Target adv acc / AUC in %, ours beside", "",
           f"Target clean accuracy: ours {'-' if clean is None else f'{100 * clean:.3f}'}, the paper's "
           f"{IMAGENET_TARGET_CLEAN_ACC:.3f}.", "",
           "| alpha | attack | ours: adv acc / AUC | paper: adv acc / AUC |", "|---|---|---|---|"]
    for r in results["records"]:
        paper = IMAGENET_TABLE.get(r["alpha"], {}).get(r.get("paper_attack", r["attack"]))
        ours = " / ".join("-" if r["Target"][k] is None else f"{100 * r['Target'][k]:.3f}" for k in ("adv_acc", "auc"))
        theirs = "-" if paper is None else f"{paper[0]:.3f} / {paper[1]:.3f}"
        out.append(f"| {r['alpha']:g} | {r['attack']} | {ours} | {theirs} |")
    return out


def markdown(results: dict[str, Any], figures: list[str]) -> str:
    """report.md of the gray-box protocol."""
    recs = results["records"]
    names = [k for k in ("Source", "Target", "Wide") if k in recs[0]] if recs else []
    stand_in = bool(results.get("stand_in"))
    dataset = results["dataset"].removesuffix("-stand-in")
    archs = results.get("architectures", {})
    out = [STAND_IN_NOTE, ""] if stand_in else []
    tables = "Table 9" if dataset == "imagenet" else "Tables 7-8"
    out += [f"# I-defender gray-box protocol ({tables}) on {results['dataset']}", "",
            "Command: `idefender-gpu reproduce graybox --dataset " + dataset + (" --stand-in" if stand_in else "")
            + "`", "",
            "Models: " + ", ".join(f"{m} = {archs.get(m, '?')}" for m in names) + ".", "",
           *setup_lines(results), "",
           "## Detection AUC and adversarial accuracy: crafted on Source (GrayBox, Eq. 6), evaluated on each model", "",
           "Evaded: misclassified and accepted by that model's I-defender (held-out ID-95 thresholds).", "",
           "| attack | alpha | " + " | ".join(f"{m} AUC | {m} adv acc | {m} evaded" for m in names) + " |",
           "|---|---|" + "---|---|---|" * len(names)]
    for r in recs:
        out.append(f"| {r['attack']} | {r['alpha']:g} | " + " | ".join(
            f"{fmt(r[m]['auc'])} | {fmt(r[m]['adv_acc'], 3)} | {pct(r[m]['evaded'])}" for m in names) + " |")
    same = results.get("paper_same_dataset", False)
    if dataset == "imagenet":
        out += _table9_lines(results)
    else:
        out += ["", "## The paper's values (CIFAR-10, WRN34-8 / WRN46-8, AUC in %"
                + ("; the same protocol, dataset and networks)" if same else ": another dataset and network)"), ""]
        for table, columns in GRAYBOX_TABLES.items():
            for column, rows in columns.items():
                out.append(f"- {table}, {column}: " + "; ".join(f"{a:.3f} / {b:.3f}" for a, b in rows))
        out += ["", "(As extracted from the paper: four rows per column under an alpha column whose labels are "
                    "garbled, \"1e-3 1e-2 1e-1\"; Iter-Linf eps 0.0085 and FGSM eps 0.075 values were lost.)"]
    if figures:
        out += ["", "## ROC curves (the smallest and the largest alpha)", ""] + [f"![ROC]({name})" for name in figures]
    notes = results.get("notes", PROFILES["fashion-mnist"].graybox_notes)
    out += ["", "## Notes", "", *(f"- {note}" for note in notes),
            "- The negatives of every AUC are the same natural images, scored by the evaluating model's detector."]
    return "\n".join(out) + "\n"
