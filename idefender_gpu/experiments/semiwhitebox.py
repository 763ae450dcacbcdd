"""The paper's semi-white-box protocol (Section 4.2, Table 6) on MNIST / Fashion-MNIST / CIFAR-10.

The model is F on the MNIST family and WRN-34-8 on CIFAR-10 (the paper's own setting; the
dataset's profile in ``_datasets.PROFILES``). The attacker uses the model's own gradients and knows nothing of the detector. As in the
paper (which follows SafetyNet's protocol), each attack's strength is set so that F's
adversarial accuracy matches a target: Iter-Linf 13.14%, Iter-L2 10.80%, FGSM 27.84%,
DeepFool 24.53%, Iter-Linf 29.56%, FGSM 45.68%. The strength is found by bisection on the
attacked images themselves: the eps of FGSM, Iter-Linf (BIM, 10 steps of 2.5 eps / 10) and
Iter-L2 (10 steps of 2.5 eps / 10); for DeepFool, first the smallest step budget
(``max_iter``) whose accuracy is at or below the target, then a bisection of the overshoot
at one step fewer (or, with one step, of the overshoot below 0.02). The detection sets are
balanced: the attacked natural images are the negatives, their adversarial versions the
positives. Reported per column: the achieved adversarial accuracy, the AUC of the
log-likelihood score (all and successful adversarial inputs), and for ID-95 / ID-99, with
held-out and training-data thresholds, the balanced detection accuracy ((TPR + TNR) / 2, the
AUC of the thresholded decision); the Mahalanobis baseline's AUC; the paper's CIFAR-10
values beside them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any, Callable

import torch
from torch import Tensor

from idefender_gpu._param_validation import Interval
from idefender_gpu.attacks import BIM, FGSM, DeepFool, IterativeL2
from idefender_gpu.experiments._common import finish, logger, rate
from idefender_gpu.experiments._outputs import add_curve, fmt, pct, setup_lines
from idefender_gpu.experiments._protocol import (
    ProtocolConfig,
    auc,
    balanced_accuracy,
    begin_single_model,
    rejected,
    score,
)
from idefender_gpu.experiments._common import craft as _craft
from idefender_gpu.experiments._datasets import STAND_IN_NOTE
from idefender_gpu.experiments.paper import SEMIWHITEBOX_TABLE

__all__ = ["SemiWhiteboxConfig", "bisect_strength", "markdown", "run_semiwhitebox"]

#: attack -> (strength range searched, what the strength is)
RANGES = {"FGSM": ((0.0, 1.0), "eps (Linf)"), "BIM": ((0.0, 0.5), "eps (Linf)"),
          "IterativeL2": ((0.0, 12.0), "eps (L2)"), "DeepFool": ((0.0, 5.0), "overshoot")}


@dataclass
class SemiWhiteboxConfig(ProtocolConfig):
    """Settings of :func:`run_semiwhitebox`: :class:`ProtocolConfig`'s, plus

    Attributes
    ----------
    tolerance : float
        Bisection stops once F's adversarial accuracy is within ``tolerance`` of the target.
    max_evaluations : int
        Attack runs per column at most (the closest one is kept).
    max_deepfool_steps : int
        The largest DeepFool step budget tried.
    steps : int
        Steps of Iter-Linf and Iter-L2 (each of 2.5 eps / steps).
    """

    tolerance: float = 0.005
    max_evaluations: int = 14
    max_deepfool_steps: int = 50
    steps: int = 10

    _parameter_constraints = {"tolerance": [Interval(Real, 0.0, 1.0, closed="neither")],
                              "max_evaluations": [Interval(Integral, 2, None)],
                              "max_deepfool_steps": [Interval(Integral, 1, None)],
                              "steps": [Interval(Integral, 1, None)]}


def build_attack(model: Any, attack: str, strength: float, max_iter: int = 50,
                 steps: int = 10) -> Callable[[Tensor, Tensor], Tensor]:
    """The attack of a Table 6 column at ``strength`` (eps, or DeepFool's overshoot); the
    iterative ones take ``steps`` steps of ``2.5 eps / steps``."""
    if attack == "FGSM":
        return FGSM(model, eps=strength)
    if attack == "BIM":
        return BIM(model, eps=strength, alpha=(2.5 / steps) * strength, steps=steps)
    if attack == "IterativeL2":
        return IterativeL2(model, eps=strength, alpha=(2.5 / steps) * strength, steps=steps)
    if attack == "DeepFool":
        return DeepFool(model, overshoot=strength, max_iter=max_iter)
    raise ValueError(f"unknown attack {attack!r}")


def bisect_strength(accuracy: Callable[[float], float], target: float, low: float, high: float, *,
                    tolerance: float, max_evaluations: int) -> tuple[float, float, list[tuple[float, float]]]:
    """The strength in ``[low, high]`` whose accuracy (decreasing in it) is closest to ``target``.

    Returns ``(strength, accuracy, trace)``; ``trace`` lists every ``(strength, accuracy)`` tried.
    """
    trace: list[tuple[float, float]] = []

    def tried(s: float) -> float:
        value = accuracy(s)
        trace.append((s, value))
        return value

    if tried(high) > target:  # even the strongest setting is not strong enough
        return high, trace[-1][1], trace
    while len(trace) < max_evaluations:
        mid = 0.5 * (low + high)
        value = tried(mid)
        if abs(value - target) <= tolerance:
            break
        if value > target:
            low = mid
        else:
            high = mid
    best = min(trace, key=lambda t: abs(t[1] - target))
    return best[0], best[1], trace


def _search(config: SemiWhiteboxConfig, model: Any, attack: str, target: float, x: Tensor, y: Tensor,
            device: torch.device) -> dict[str, Any]:
    """Bisection for one column; returns the setting, accuracy, adversarial inputs, trace."""
    kept: dict[tuple[int, float], Tensor] = {}

    def accuracy_at(max_iter: int) -> Callable[[float], float]:
        def run(strength: float) -> float:
            if strength == 0.0 and attack != "DeepFool":
                x_adv = x.clone()
            else:
                x_adv = _craft(build_attack(model, attack, strength, max_iter, config.steps), x, y, config.batch_size, device,
                               f"{attack} {strength:.4g}", config.progress).cpu()
            kept[(max_iter, strength)] = x_adv
            with torch.no_grad():
                pred = torch.cat([model(x_adv[i:i + config.batch_size].to(device)).argmax(1).cpu()
                                  for i in range(0, x_adv.shape[0], config.batch_size)])
            return float((pred == y).double().mean())
        return run

    (low, high), what = RANGES[attack]
    max_iter, trace_all = 50, []
    if attack == "DeepFool":  # the step budget first, at the library's overshoot 0.02
        for max_iter in range(1, config.max_deepfool_steps + 1):
            value = accuracy_at(max_iter)(0.02)
            trace_all.append({"max_iter": max_iter, "overshoot": 0.02, "adv_acc": value})
            if value <= target or abs(value - target) <= config.tolerance:
                break
        if abs(value - target) > config.tolerance:
            if max_iter > 1:
                max_iter, low, high = max_iter - 1, 0.02, high
            else:
                low, high = 0.0, 0.02
            strength, value, trace = bisect_strength(accuracy_at(max_iter), target, low, high,
                                                     tolerance=config.tolerance,
                                                     max_evaluations=config.max_evaluations)
            trace_all += [{"max_iter": max_iter, "overshoot": s, "adv_acc": a} for s, a in trace]
        best = min(trace_all, key=lambda t: abs(t["adv_acc"] - target))
        max_iter, strength, value = best["max_iter"], best["overshoot"], best["adv_acc"]
    else:
        strength, value, trace = bisect_strength(accuracy_at(max_iter), target, low, high,
                                                 tolerance=config.tolerance, max_evaluations=config.max_evaluations)
        trace_all = [{what.split()[0]: s, "adv_acc": a} for s, a in trace]
    return {"strength": strength, "strength_is": what, "max_iter": max_iter if attack == "DeepFool" else None,
            "adv_acc": value, "x_adv": kept[(max_iter, strength)], "trace": trace_all}


def run_semiwhitebox(config: SemiWhiteboxConfig) -> dict[str, Any]:
    """Run the Table 6 protocol; return the results (JSON-able but for ``results['curves']``)."""
    run = begin_single_model(config, "semi-white-box")
    device, timer, start, model, defence = run.device, run.timer, run.start, run.model, run.defence
    x, y, natural, results = run.x, run.y, run.natural, run.results
    n = x.shape[0]
    records = []
    table, paper_dataset, columns = SEMIWHITEBOX_TABLE
    for label, attack, target, paper in columns:
        started = time.perf_counter()
        with timer("bisection", f"{label}: bisection of the attack strength on {n} images"):
            found = _search(config, model, attack, target, x, y, device)
        adv = score(found["x_adv"], model, defence, config.batch_size, device)
        successful = adv["pred"] != natural["pred"]
        delta = (found["x_adv"] - x).flatten(1)
        record: dict[str, Any] = {
            "column": label, "attack": attack, "target_adv_acc": target, "adv_acc": found["adv_acc"],
            "clean_acc": float((natural["pred"] == y).double().mean()),
            "strength": found["strength"], "strength_is": found["strength_is"], "max_iter": found["max_iter"],
            "within_tolerance": abs(found["adv_acc"] - target) <= config.tolerance,
            "bisection": found["trace"], "n": int(n), "n_successful": int(successful.sum()),
            "mean_linf": float(delta.abs().amax(1).mean()), "mean_l2": float(delta.norm(dim=1).mean()),
            "auc": auc(natural["idefender"], adv["idefender"]),
            "auc_successful": auc(natural["idefender"], adv["idefender"][successful]),
            "mahalanobis_auc": auc(natural["mahalanobis"], adv["mahalanobis"]),
            "paper": paper, "paper_dataset": paper_dataset,
        }
        for family, by_keep in defence.thresholds["idefender"].items():
            for keep, th in by_keep.items():
                nat_r, adv_r = rejected(natural, "idefender", th), rejected(adv, "idefender", th)
                tag = f"id{round(100 * keep)}_{family}"
                record[f"{tag}_balanced"] = balanced_accuracy(nat_r, adv_r)
                record[f"{tag}_detected"] = rate(adv_r)
                record[f"{tag}_natural_rejected"] = rate(nat_r)
        records.append(record)
        add_curve(results, "roc_semiwhitebox_table6.png", "semi-white-box (Table 6 protocol), I-defender",
                  f"{label} (ours {100 * found['adv_acc']:.2f}%)", natural["idefender"], adv["idefender"], record["auc"])
        logger.info("%s: %s %.4g gives adv acc %.4f (target %.4f), AUC %.4f: %.1f s", label, found["strength_is"],
                    found["strength"], found["adv_acc"], target, record["auc"], time.perf_counter() - started)
    results["records"] = records
    profile = config.profile()
    results["architecture"], results["paper_same_dataset"] = profile.roles[0].model, profile.paper_same_dataset
    return finish(results, timer, start)


def markdown(results: dict[str, Any], figures: list[str]) -> str:
    """report.md of the semi-white-box protocol."""
    table, paper_dataset, _ = SEMIWHITEBOX_TABLE
    recs = results["records"]
    head = " | ".join(r["column"] for r in recs)
    sep = "|---" * (len(recs) + 1) + "|"
    stand_in, same = bool(results.get("stand_in")), bool(results.get("paper_same_dataset"))
    dataset = results["dataset"].removesuffix("-stand-in")
    arch = results.get("architecture", "F")
    steps = results["config"].get("steps", 10)
    other = "the same dataset and network" if same else "another dataset and network"
    out = [STAND_IN_NOTE, ""] if stand_in else []
    out += [f"# I-defender semi-white-box protocol ({table}) on {results['dataset']}, model {arch}", "",
            "Command: `idefender-gpu reproduce semi-whitebox --dataset " + dataset
            + (" --stand-in" if stand_in else "") + "`", "",
           *setup_lines(results), "",
           f"## Attack strengths found by bisection (model {arch}'s adversarial accuracy on the attacked images)", "",
           "| column | attack | strength | target adv acc | ours | within tolerance | mean Linf | mean L2 | evaluations |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in recs:
        strength = f"{r['strength_is']} {r['strength']:.4g}" + (f", max_iter {r['max_iter']}" if r["max_iter"] else "")
        out.append(f"| {r['column']} | {r['attack']} | {strength} | {pct(r['target_adv_acc'])} | {100 * r['adv_acc']:.2f}% "
                   f"| {'yes' if r['within_tolerance'] else 'no'} | {fmt(r['mean_linf'], 3)} | {fmt(r['mean_l2'], 2)} "
                   f"| {len(r['bisection'])} |")
    out += ["", f"## Detection (ours on {results['dataset']}; the paper's rows are on {paper_dataset}, {other}, "
                f"in %)", "",
            f"| method | {head} |", sep]
    rows = [("I-defender AUC (score)", "auc"), ("I-defender AUC, successful only", "auc_successful"),
            ("ID-95 held-out thresholds, (TPR+TNR)/2", "id95_heldout_balanced"),
            ("ID-99 held-out thresholds, (TPR+TNR)/2", "id99_heldout_balanced"),
            ("ID-95 training thresholds, (TPR+TNR)/2", "id95_train_balanced"),
            ("ID-99 training thresholds, (TPR+TNR)/2", "id99_train_balanced"),
            ("Mahalanobis AUC", "mahalanobis_auc")]
    for name, key in rows:
        out.append(f"| {name} | " + " | ".join(fmt(100 * r[key] if r[key] is not None else None, 2) for r in recs) + " |")
    for method in ("ID-95", "ID-99", "SVM", "mSVM", "Subnet"):
        out.append(f"| paper {method} ({paper_dataset}) | " + " | ".join(f"{r['paper'][method]:.2f}" for r in recs) + " |")
    out += ["", "| detection rate of adversarial inputs | " + head + " |", sep]
    for tag in ("id95_heldout", "id99_heldout", "id95_train", "id99_train"):
        out.append(f"| {tag} detected / natural rejected | " + " | ".join(
            f"{pct(r[tag + '_detected'])} / {pct(r[tag + '_natural_rejected'])}" for r in recs) + " |")
    if figures:
        out += ["", "## ROC curves", ""] + [f"![ROC]({name})" for name in figures]
    out += ["", "## Notes", "",
            "- Balanced sets: the attacked natural images are the negatives, all their adversarial versions "
            "the positives (SafetyNet's protocol, which the paper follows).",
            "- The paper's ID-95 / ID-99 rows are AUCs of thresholded detectors; a thresholded detector's ROC "
            "has one point, so its AUC is (TPR + TNR) / 2, which is what our ID rows give.",
            f"- Iter-Linf and Iter-L2: {steps} steps of 2.5 eps / {steps}; DeepFool: all classes, the step budget and "
            "overshoot bisected (its eps is the minimal perturbation itself).",
            f"- The paper's numbers are {table} on {paper_dataset} (WRN34-8)"
            + (": the same protocol, dataset and network." if same else
               ", not on this dataset and network: beside ours for the shape of the comparison only.")]
    return "\n".join(out) + "\n"
