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
"""

from __future__ import annotations

import time
from numbers import Integral
from dataclasses import dataclass
from typing import Any

from torch import nn

from idefender_gpu._param_validation import Interval, Predicate
from idefender_gpu.attacks import GrayBox
from idefender_gpu.experiments._common import finish, PhaseTimer, logger, rate
from idefender_gpu.experiments._outputs import add_curve, fmt, pct, setup_lines
from idefender_gpu.experiments._datasets import PROFILES, STAND_IN_NOTE, WideF
from idefender_gpu.experiments._protocol import (
    ProtocolConfig,
    auc,
    base_results,
    fit_defence,
    obtain_role,
    prepare,
    rejected,
    score,
    threshold_summary,
)
from idefender_gpu.experiments._common import craft as _craft
from idefender_gpu.experiments.paper import GRAYBOX_TABLES

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
    """

    alphas: tuple[float, ...] | None = None
    attacks: tuple[tuple[str, str, float], ...] | None = None
    wide: bool = True
    steps: int = 10

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
    }

    def resolved(self) -> tuple[tuple[float, ...], tuple[tuple[str, str, float], ...]]:
        """``(alphas, attacks)``: the ones set, else the dataset's."""
        profile = self.profile()
        return (profile.alphas if self.alphas is None else tuple(self.alphas),
                profile.graybox_attacks if self.attacks is None else tuple(self.attacks))

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


def markdown(results: dict[str, Any], figures: list[str]) -> str:
    """report.md of the gray-box protocol."""
    recs = results["records"]
    names = [k for k in ("Source", "Target", "Wide") if k in recs[0]] if recs else []
    stand_in = bool(results.get("stand_in"))
    dataset = results["dataset"].removesuffix("-stand-in")
    archs = results.get("architectures", {})
    out = [STAND_IN_NOTE, ""] if stand_in else []
    out += [f"# I-defender gray-box protocol (Tables 7-8) on {results['dataset']}", "",
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
