"""Adaptive white-box evaluation (beyond the paper): the attacker knows the detector.

The dataset's Source model (model F on Fashion-MNIST / MNIST, WRN-34-8 on CIFAR-10: its
profile in ``_datasets.PROFILES``; a narrow WRN with ``stand_in``) and its I-defender
(held-out ID-95 thresholds: 5% of natural inputs rejected) are wrapped as one
(K+1)-class model, :class:`~idefender_gpu.attacks.DefendedModel`, and attacked end to end
at the dataset's Linf eps (:data:`EPS_BY_DATASET`, on [0, 1] pixels: 0.05 / 0.1 / 0.2 / 0.3
on the MNIST family, 2 / 4 / 8 / 16 of 255 on CIFAR-10, 1 / 2 / 4 / 8 of 255 on ImageNet) by
:class:`~idefender_gpu.attacks.MarginPGD` (APGD's schedule; largest wrong logit minus the
larger of the true and the reject logit; restarts, targets, best point kept). Beside it:
the Mahalanobis baseline under the same attacker, no detector at all (MarginPGD on F), and
the off-the-shelf targeted PGD of torchattacks and of ART on the same ``DefendedModel``
(towards each of the model's ``n_targets`` best wrong classes at the natural input in turn, the first
evasion kept: the recipe ``DefendedModel`` documents), when they import (skipped with the
reason otherwise). Every attack goes through ``DefendedModel(detector,
margin_unit=config.margin_unit)``, by default ``'auto'`` (half the detector's feature count:
the same decision as the default unit, and gradients that every attack here follows better).

Reported per (defence, attack, eps): the attack success rate (of the images F classifies
correctly, the share that end misclassified *and* not rejected), the accuracy with
rejection (the share of attacked images that end correctly classified and accepted), the
share rejected, and the detector's AUC (natural against adversarial scores). The strongest
of our attacks must not be weaker than the off-the-shelf ones: each eps records whether it
is, and the report says so when it is not. Beside the single attacks, a per-image worst case
over every attack run on the same defence and eps (AutoAttack's way of combining attacks:
an image counts as evaded when any attack evaded it, as correct with rejection when every
attack left it correctly classified and accepted) is its own row, ``attack`` ``WORST_CASE``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn

from idefender_gpu._param_validation import Interval, Options, Predicate
from idefender_gpu.attacks import DefendedModel, MarginPGD
from idefender_gpu.experiments._common import finish, batches, logger, rate
from idefender_gpu.experiments._datasets import STAND_IN_NOTE, STAND_IN_STEPS
from idefender_gpu.experiments._outputs import add_curve, fmt, pct, setup_lines
from idefender_gpu.experiments._protocol import (
    ProtocolConfig,
    auc,
    begin_single_model,
    rejected,
    score,
)

__all__ = ["AdaptiveConfig", "EPS", "EPS_BY_DATASET", "STAND_IN_ATTACK", "WORST_CASE", "eps_label", "markdown", "run_adaptive"]

#: The MNIST family's Linf radii (model F on 28 x 28 grey images in [0, 1]).
EPS = (0.05, 0.1, 0.2, 0.3)
#: dataset -> its default Linf radii on [0, 1] pixels (a stand-in uses its real dataset's):
#: CIFAR-10 up to 16/255 (8/255 is the standard budget, RobustBench's), ImageNet up to 8/255
#: (4/255 is RobustBench's ImageNet budget)
EPS_BY_DATASET: dict[str, tuple[float, ...]] = {
    "fashion-mnist": EPS,
    "mnist": EPS,
    "cifar10": (2 / 255, 4 / 255, 8 / 255, 16 / 255),
    "imagenet": (1 / 255, 2 / 255, 4 / 255, 8 / 255),
}
#: the attack counts of a ``--stand-in`` run (unless told otherwise): a pipeline check, no attacker
STAND_IN_ATTACK = {"steps": STAND_IN_STEPS, "n_targets": 1}
#: The ``attack`` of the per-image worst-case rows (any attack run on that defence and eps).
WORST_CASE = "worst case (any attack)"


@dataclass
class AdaptiveConfig(ProtocolConfig):
    """Settings of :func:`run_adaptive`: :class:`ProtocolConfig`'s (``n_attack`` 500), plus

    Attributes
    ----------
    eps : tuple of float, optional
        Linf radii on [0, 1] pixels (None: the dataset's, :data:`EPS_BY_DATASET`;
        :meth:`attack_eps` gives the ones used, and ``to_json`` records them).
    steps : int
        Steps of every attack run (MarginPGD per run; torchattacks / ART PGD).
    n_restarts, n_targets : int
        MarginPGD's restarts and targeted runs.
    external : bool
        Also run torchattacks' and ART's PGD (when they import).
    margin_unit : float or 'auto'
        ``DefendedModel``'s margin unit for both detectors (``'auto'``: half the detector's
        feature count, 576 nats for conv2; the decision is the same for every unit, and the
        wider unit makes every attack on this page stronger: see ``pgd-recipe.md``).
    """

    n_attack: int | None = 500
    eps: tuple[float, ...] | None = None
    steps: int = 40
    n_restarts: int = 1
    n_targets: int = 3
    external: bool = True
    margin_unit: float | str = "auto"

    _parameter_constraints = {
        "eps": [None, Predicate(lambda v: isinstance(v, (tuple, list)) and len(v) > 0
                          and all(isinstance(e, (int, float)) and 0 < e <= 1 for e in v),
                          "a non-empty tuple of floats in (0, 1]")],
        "steps": [Interval(Integral, 1, None)],
        "n_restarts": [Interval(Integral, 1, None)],
        "n_targets": [Interval(Integral, 0, None)],
        "external": ["boolean"],
        "margin_unit": [Interval(Real, 0, None, closed="neither"), Options(str, {"auto"})],
    }

    def attack_eps(self) -> tuple[float, ...]:
        """``eps``, or the dataset's default radii (:data:`EPS_BY_DATASET`)."""
        if self.eps is not None:
            return tuple(float(e) for e in self.eps)
        if self.dataset not in EPS_BY_DATASET:
            raise ValueError(f"eps (--eps) has no default for dataset {self.dataset!r} (defaults exist for "
                             f"{', '.join(sorted(EPS_BY_DATASET))}); give the Linf radii, e.g. --eps 4/255,8/255")
        return EPS_BY_DATASET[self.dataset]

    def validate(self) -> torch.device:
        """Check every setting before any work (the eps too); return the device."""
        device = super().validate()
        self.attack_eps()
        return device

    def to_json(self) -> dict[str, Any]:
        """The settings as JSON, ``eps`` the radii used."""
        out = super().to_json()
        out["eps"] = list(self.attack_eps())
        return out


def eps_label(eps: float) -> str:
    """``eps`` as reports print it: ``'0.1'``, or ``'8/255 (0.0314)'`` for a whole number of
    grey levels that has no short decimal form."""
    levels = round(eps * 255)
    if levels > 0 and abs(eps * 255 - levels) < 1e-6 and float(f"{eps:.4g}") != eps:
        return f"{levels}/255 ({eps:.4f})"
    return f"{eps:g}"


def _ranked_wrong(model: nn.Module, x: Tensor, y: Tensor, k: int, batch_size: int, device: torch.device) -> Tensor:
    """F's ``k`` best-scoring wrong classes at each natural input, best first, ``(N, k)`` on CPU
    (the targets of the off-the-shelf PGD runs, as MarginPGD's targeted runs)."""
    out = []
    with torch.no_grad():
        for sl in batches(x.shape[0], batch_size):
            logits = model(x[sl].to(device)).cpu()
            out.append(logits.scatter(1, y[sl, None], float("-inf")).topk(k, dim=1).indices)
    return torch.cat(out)


def _over_targets(run: Callable[[Tensor, Tensor, Tensor], Tensor],
                  defended: DefendedModel) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """A targeted attack run towards each column of ``targets`` (B, k) in turn, on the samples
    not evaded yet; each sample keeps its first evasion, else the first run's result (the
    documented recipe of :class:`~idefender_gpu.attacks.DefendedModel`)."""
    def attack(x: Tensor, y: Tensor, targets: Tensor) -> Tensor:
        best = run(x, y, targets[:, 0]).detach().to(x.device, x.dtype)
        todo = ~defended.evades(best, y)
        for r in range(1, targets.shape[1]):
            if not bool(todo.any()):
                break
            idx = todo.nonzero().squeeze(1)
            x_r = run(x[idx], y[idx], targets[idx, r]).detach().to(x.device, x.dtype)
            hit = defended.evades(x_r, y[idx])
            best[idx[hit]] = x_r[hit]
            todo[idx[hit]] = False
        return best

    return attack


def _torchattacks(defended: nn.Module, eps: float, steps: int) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    import torchattacks

    pgd = torchattacks.PGD(defended, eps=eps, alpha=2.5 * eps / steps, steps=steps, random_start=True)
    pgd.set_mode_targeted_by_label(quiet=True)
    return lambda x, y, target: pgd(x, target)


def _art(defended: nn.Module, eps: float, steps: int, shape: tuple[int, ...],
         batch_size: int) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    from art.attacks.evasion import ProjectedGradientDescent
    from art.estimators.classification import PyTorchClassifier

    classifier = PyTorchClassifier(model=defended, loss=nn.CrossEntropyLoss(), input_shape=shape,
                                   nb_classes=defended.n_outputs, clip_values=(0.0, 1.0),
                                   device_type="gpu" if next(defended.parameters()).is_cuda else "cpu")
    pgd = ProjectedGradientDescent(classifier, eps=eps, eps_step=2.5 * eps / steps, max_iter=steps, targeted=True,
                                   num_random_init=1, batch_size=batch_size, verbose=False)
    return lambda x, y, target: torch.as_tensor(pgd.generate(x.cpu().numpy(), y=target.cpu().numpy()))


def _external(name: str) -> str | None:
    """None if the library imports, else the reason it is skipped."""
    module = {"torchattacks": "torchattacks", "ART": "art"}[name]
    try:
        __import__(module)
    except Exception as exc:  # ImportError, or a broken install
        return f"{module} does not import here ({type(exc).__name__}: {str(exc).splitlines()[0][:100]})"
    return None


def run_adaptive(config: AdaptiveConfig) -> dict[str, Any]:
    """Run the adaptive evaluation; return the results (JSON-able but for ``results['curves']``)."""
    run = begin_single_model(config, "adaptive")
    device, timer, start, model, defence = run.device, run.timer, run.start, run.model, run.defence
    x, y, natural, results = run.x, run.y, run.natural, run.results
    n = x.shape[0]
    eps_used = config.attack_eps()
    n_ranked = max(1, min(config.n_targets, len(defence.idefender.thresholds_) - 1))
    targets = _ranked_wrong(model, x, y, n_ranked, config.batch_size, device)  # (N, n_ranked)
    correct = natural["pred"] == y
    wrapped = {"I-defender": DefendedModel(defence.idefender, margin_unit=config.margin_unit).eval(),
               "Mahalanobis": DefendedModel(defence.mahalanobis, margin_unit=config.margin_unit).eval(),
               "none": model}
    keys = {"I-defender": "idefender", "Mahalanobis": "mahalanobis", "none": None}
    skipped = {name: _external(name) for name in ("torchattacks", "ART")} if config.external else {
        "torchattacks": "not run (--no-external)", "ART": "not run (--no-external)"}
    results["skipped"] = {k: v for k, v in skipped.items() if v}

    def evaluate(defender: str, attacker: str, eps: float, x_adv: Tensor) -> dict[str, Any]:
        adv = score(x_adv, model, defence, config.batch_size, device)
        key = keys[defender]
        th = None if key is None else defence.thresholds[key]["heldout"][0.95]
        adv_rejected = torch.zeros(n, dtype=torch.bool) if key is None else rejected(adv, key, th)
        wrong = adv["pred"] != y
        shown = key or "idefender"  # without a detector: how I-defender would score these inputs
        return {"defence": defender, "attack": attacker, "eps": eps, "n": int(n), "n_correct": int(correct.sum()),
                "success_rate": rate((wrong & ~adv_rejected)[correct]),
                "accuracy_with_rejection": rate(~wrong & ~adv_rejected),
                "rejected": rate(adv_rejected), "adv_acc": rate(~wrong),
                "auc": auc(natural[shown], adv[shown]), "auc_is": "I-defender" if key is None else defender,
                "max_linf": float((x_adv - x).flatten(1).abs().amax(1).max())}, adv, (wrong & ~adv_rejected,
                                                                                  ~wrong & ~adv_rejected, ~wrong)

    def worst_case(defender: str, eps: float, outcomes: list[tuple[str, tuple[Tensor, Tensor, Tensor]]]
                   ) -> dict[str, Any]:
        """The per-image worst case over ``outcomes`` (attack, (evaded, correct and accepted, correct))."""
        evaded = torch.stack([o[0] for _, o in outcomes]).any(0)
        kept = torch.stack([o[1] for _, o in outcomes]).all(0)
        right = torch.stack([o[2] for _, o in outcomes]).all(0)
        return {"defence": defender, "attack": WORST_CASE, "eps": eps, "n": int(n), "n_correct": int(correct.sum()),
                "success_rate": rate(evaded[correct]), "accuracy_with_rejection": rate(kept), "rejected": None,
                "adv_acc": rate(right), "auc": None, "auc_is": None,
                "max_linf": max(r["max_linf"] for r in records if r["eps"] == eps and r["defence"] == defender),
                "attacks": [name for name, _ in outcomes]}

    records: list[dict[str, Any]] = []
    nat_rejected = rejected(natural, "idefender", defence.thresholds["idefender"]["heldout"][0.95])
    m_rejected = rejected(natural, "mahalanobis", defence.thresholds["mahalanobis"]["heldout"][0.95])
    for defender, nat_r in (("none", torch.zeros(n, dtype=torch.bool)), ("I-defender", nat_rejected),
                            ("Mahalanobis", m_rejected)):
        records.append({"defence": defender, "attack": "no attack", "eps": 0.0, "n": int(n),
                        "n_correct": int(correct.sum()), "success_rate": rate((~correct & ~nat_r)[correct]),
                        "accuracy_with_rejection": rate(correct & ~nat_r), "rejected": rate(nat_r),
                        "adv_acc": rate(correct), "auc": None, "auc_is": None, "max_linf": 0.0})
    for eps in eps_used:
        jobs: list[tuple[str, str, Callable[[Tensor, Tensor, Tensor], Tensor]]] = []
        for defender, wrapper in wrapped.items():
            attack = MarginPGD(wrapper, eps=eps, steps=config.steps, n_restarts=config.n_restarts,
                               n_targets=config.n_targets, reject_index=None if defender == "none" else "auto")
            jobs.append((defender, "MarginPGD", lambda xb, yb, tb, a=attack: a(xb, yb)))
        if not skipped["torchattacks"]:
            jobs.append(("I-defender", "torchattacks PGD (targeted)",
                         _over_targets(_torchattacks(wrapped["I-defender"], eps, config.steps), wrapped["I-defender"])))
        if not skipped["ART"]:
            jobs.append(("I-defender", "ART PGD (targeted)",
                         _over_targets(_art(wrapped["I-defender"], eps, config.steps, tuple(x.shape[1:]),
                                            config.batch_size), wrapped["I-defender"])))
        outcomes: dict[str, list[tuple[str, tuple[Tensor, Tensor, Tensor]]]] = {}
        for defender, attacker, run in jobs:
            started = time.perf_counter()
            torch.manual_seed(config.seed)
            np.random.seed(config.seed)
            try:
                with timer("attack", False):
                    x_adv = torch.cat([run(x[sl].to(device), y[sl].to(device), targets[sl].to(device)).detach()
                                       .to("cpu", x.dtype) for sl in batches(n, config.batch_size)])
            except Exception as exc:  # an outside library's failure is a result, not a crash
                if attacker == "MarginPGD":
                    raise
                results["skipped"][attacker] = (f"failed at eps {eps_label(eps)}: {type(exc).__name__}: "
                                                f"{str(exc)[:160]}")
                continue
            record, adv, outcome = evaluate(defender, attacker, eps, x_adv)
            records.append(record)
            outcomes.setdefault(defender, []).append((attacker, outcome))
            if attacker == "MarginPGD" and defender != "none":
                key = keys[defender]
                add_curve(results, f"roc_adaptive_{key}.png", f"adaptive MarginPGD against {defender}",
                          f"eps {eps_label(eps)}", natural[key], adv[key], record["auc"])
            logger.info("adaptive eps %s, %s vs %s: success %.3f, accuracy with rejection %.3f: %.1f s", eps_label(eps),
                        attacker, defender, record["success_rate"] or 0.0, record["accuracy_with_rejection"] or 0.0,
                        time.perf_counter() - started)
        records.extend(worst_case(defender, eps, done) for defender, done in outcomes.items())
    comparison = []
    for eps in eps_used:
        at = [r for r in records if r["eps"] == eps and r["defence"] == "I-defender"]
        ours = max((r["success_rate"] for r in at if r["attack"] == "MarginPGD"), default=None)
        outside = [r for r in at if r["attack"] not in ("MarginPGD", WORST_CASE)]
        best = max(outside, key=lambda r: r["success_rate"], default=None)
        theirs = None if best is None else best["success_rate"]
        worst = next((r["success_rate"] for r in at if r["attack"] == WORST_CASE), None)
        comparison.append({"eps": eps, "ours": ours, "best_off_the_shelf": theirs,
                           "ours_at_least_as_strong": None if theirs is None or ours is None else ours >= theirs,
                           "best_off_the_shelf_attack": None if best is None else best["attack"],
                           "worst_case": worst,
                           "worst_case_above_ours": None if worst is None or ours is None else worst - ours})
    results["records"], results["comparison"] = records, comparison
    source = config.profile().roles[0]
    results["architecture"], results["model_description"] = source.model, source.what
    results["eps"] = list(eps_used)
    return finish(results, timer, start)


def _negative_result(records: list[dict[str, Any]]) -> list[str]:
    """The report's plain statement of what MarginPGD achieves against I-defender, per eps."""
    nothing, most = [], []
    for eps in sorted({r["eps"] for r in records if r["eps"] > 0}):
        mine = {r["defence"]: r["success_rate"] for r in records if r["eps"] == eps and r["attack"] == "MarginPGD"}
        worst = next((r["success_rate"] for r in records if r["eps"] == eps and r["attack"] == WORST_CASE
                      and r["defence"] == "I-defender"), None)
        ours, bare = mine.get("I-defender"), mine.get("none")
        if ours is None or bare is None:
            continue
        if bare > 0 and ours >= bare - 0.01:  # the attack works without a detector, and as well with it
            nothing.append(eps_label(eps))
        elif max(ours, worst or 0.0) >= 0.5:
            most.append(eps_label(eps))
    out = []
    if nothing:
        out.append(f"**Negative result: at eps {', '.join(nothing)} I-defender stops nothing against this "
                   f"attacker: MarginPGD succeeds as often with the detector as without one (within one point).**")
    if most:
        out.append(f"**At eps {', '.join(most)} the attacker still evades I-defender on at least half of the "
                   f"correctly classified images.**")
    if not out:
        out.append("At every eps here I-defender lowers MarginPGD's success by more than one point, and the "
                   "attacker evades it on fewer than half of the correctly classified images.")
    return out


def markdown(results: dict[str, Any], figures: list[str]) -> str:
    """report.md of the adaptive evaluation."""
    cfg = results["config"]
    stand_in = bool(results.get("stand_in"))
    dataset = cfg.get("dataset", results["dataset"])
    arch = results.get("architecture", "F")
    eps_used = [float(e) for e in cfg["eps"]]
    default = list(EPS_BY_DATASET.get(dataset, ()))
    out = [STAND_IN_NOTE, ""] if stand_in else []
    out += [f"# Adaptive white-box evaluation of I-defender on {results['dataset']}, model {arch}", "",
            "Command: `idefender-gpu reproduce adaptive --dataset " + dataset + (" --stand-in" if stand_in else "")
            + "`", "",
            "Beyond the paper: Zheng & Hong (2018) evaluate black-box, semi-white-box and gray-box attackers "
            "only, and have no adaptive table; there are no paper numbers to set beside these.", "",
            f"- Attacked model: {results.get('model_description', 'model F')} (`{arch}`, the dataset's Source "
            f"model) with its I-defender on layer(s) {', '.join(results['detector']['layers'])}.",
            f"- Linf eps on [0, 1] pixels: {', '.join(eps_label(e) for e in eps_used)}"
            + (f" (the {dataset} default)" if eps_used == default else " (--eps)") + ".",
            "- Defence `none`: no detector at all; MarginPGD on the model alone (its class logits, no reject "
            "output) and nothing rejected. Its AUC column is I-defender's on those inputs: how the detector "
            "would score an attacker who ignores it.",
            *setup_lines(results), "",
            f"Attacks: Linf, {cfg['steps']} steps per run; MarginPGD with {cfg['n_restarts']} restart(s) and "
            f"{cfg['n_targets']} targeted runs; torchattacks / ART PGD targeted at each of the model's "
            f"{max(1, cfg['n_targets'])} best wrong classes in turn (the first evasion kept), step "
            f"2.5 eps / steps, one random start. Detectors use their held-out 95% thresholds; every attack "
            f"runs on `DefendedModel(detector, margin_unit={cfg.get('margin_unit', 1.0)!r})`.", "",
            "## Success rate, accuracy with rejection, AUC", "",
            "Success: of the images the model classifies correctly, the share that end misclassified and not "
            "rejected. Accuracy with rejection: the share of attacked images that end correctly classified and "
            "accepted.", "",
            "| eps | defence | attack | success rate | accuracy with rejection | rejected | model adv acc | AUC |",
            "|---|---|---|---|---|---|---|---|"]
    for r in results["records"]:
        shown = fmt(r["auc"]) + (" (I-defender's, on these inputs)" if r["defence"] == "none" and r["auc"] else "")
        out.append(f"| {eps_label(r['eps'])} | {r['defence']} | {r['attack']} | {pct(r['success_rate'])} "
                   f"| {pct(r['accuracy_with_rejection'])} | {pct(r['rejected'])} | {pct(r['adv_acc'])} | {shown} |")
    out += ["", "## Our strongest attack against the off-the-shelf ones (I-defender)", "",
            "Worst case: an image counts as evaded when any attack run on it evaded it (AutoAttack-style); "
            "the difference to MarginPGD is what MarginPGD alone misses.", "",
            "| eps | MarginPGD success | best off-the-shelf success | ours at least as strong "
            "| worst case (any attack) | worst case above MarginPGD |", "|---|---|---|---|---|---|"]
    weaker = []
    for c in results["comparison"]:
        flag = {True: "yes", False: "**NO**", None: "-"}[c["ours_at_least_as_strong"]]
        if c["ours_at_least_as_strong"] is False:
            weaker.append(eps_label(c["eps"]))
        gain = c.get("worst_case_above_ours")
        out.append(f"| {eps_label(c['eps'])} | {pct(c['ours'])} | {pct(c['best_off_the_shelf'])} | {flag} "
                   f"| {pct(c.get('worst_case'))} | {'-' if gain is None else f'{100 * gain:.1f} points'} |")
    if weaker:
        out += ["", f"**Our margin attack is weaker than an off-the-shelf attack at eps {', '.join(weaker)}: the "
                    f"numbers above understate the attacker there.**"]
    for name, why in results.get("skipped", {}).items():
        out.append(f"- {name}: skipped, {why}")
    if figures:
        out += ["", "## ROC curves under MarginPGD", ""] + [f"![ROC]({name})" for name in figures]
    out += ["", "## What the detector does and does not stop", "",
            "Against an attacker who knows the detector and its parameters (MarginPGD on the defended model), "
            "thresholds rejecting 5% of the held-out natural inputs:", ""]
    for eps in sorted({r["eps"] for r in results["records"] if r["eps"] > 0}):
        mine = {r["defence"]: r for r in results["records"] if r["eps"] == eps and r["attack"] == "MarginPGD"}
        worst = next((r for r in results["records"] if r["eps"] == eps and r["attack"] == WORST_CASE
                      and r["defence"] == "I-defender"), None)
        if {"none", "I-defender"} <= set(mine):
            out.append(f"- eps {eps_label(eps)}: the attack succeeds on {pct(mine['none']['success_rate'])} of the "
                       f"correctly classified images without a detector, {pct(mine['I-defender']['success_rate'])} "
                       f"with I-defender" + (f", {pct(mine['Mahalanobis']['success_rate'])} with the Mahalanobis "
                                             f"baseline" if "Mahalanobis" in mine else "")
                       + (f"; at least one of the attacks succeeds on {pct(worst['success_rate'])} with I-defender"
                          if worst is not None and len(worst.get("attacks", ())) > 1 else "") + ".")
    out += ["", *_negative_result(results["records"])]
    return "\n".join(out) + "\n"
