"""Write the black-box experiment's outputs: ``results.json``, ``report.md`` and ROC PNGs.

``results.json`` is an object: ``records`` (one per threat model and attack setting, with
``dataset``, ``attack``, ``eps``, ``auc``, ``auc_successful``, ``tpr_at_5fpr``,
``clean_acc``, ``adv_acc``, ``seed`` and more), plus ``config``, ``data``, ``models``,
``detector``, ``machine``, ``timings`` and, when run, ``ablation``. ``report.md`` puts the
paper's numbers in columns beside ours. The figures are the analogues of the paper's
Figures 2-5: ROC curves of I-defender under FGSM at every eps, and under every method.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

from idefender_gpu.experiments.paper import FGSM_TABLES, SETTINGS_TABLES

__all__ = ["FIGURES", "FIGURE_DPI", "FIGURE_INCHES", "command_line", "format_fgsm_table", "load_text", "markdown_report",
           "write_outputs"]

#: file name -> (threat model, which curves, title)
FIGURES = {
    "roc_blackbox_fgsm.png": ("black-box", "fgsm", "black-box FGSM (E -> F)"),
    "roc_blackbox_methods.png": ("black-box", "methods", "black-box, all methods (E -> F)"),
    "roc_semiwhitebox_fgsm.png": ("semi-white-box", "fgsm", "semi-white-box FGSM (F's gradients)"),
    "roc_semiwhitebox_methods.png": ("semi-white-box", "methods", "semi-white-box, all methods"),
}

DATASET_TITLES = {"fashion-mnist": "Fashion-MNIST", "mnist": "MNIST"}

#: ROC figures: width in inches and resolution (6.4 in at 150 dpi: 960 x 816 px, 9-point legends)
FIGURE_INCHES, FIGURE_DPI = 6.4, 150


def _clean(value: Any) -> Any:
    """JSON-safe copy: NaN/inf floats become None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _f(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}"


def _pct(value: Any) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _records(results: dict[str, Any], threat: str, attack: str | None = None) -> list[dict[str, Any]]:
    return [r for r in results["records"] if r["threat_model"] == threat
            and (attack is None or r["attack"] == attack)]


def format_fgsm_table(results: dict[str, Any]) -> str:
    """The black-box FGSM table with the paper's columns (Tables 3 / 5), in markdown."""
    dataset = results["dataset"]
    paper = FGSM_TABLES.get(dataset)
    lines = [
        "| eps | F clean acc | F adv acc | AUC (all) | AUC (successful) | TPR @ 5% FPR | ID-95 detected "
        "| ID-99 detected | Mahalanobis AUC | paper I-defender AUC | paper Defense-GAN AUC | ours >= paper |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in _records(results, "black-box", "FGSM"):
        ok = "-" if r["paper_auc"] is None or r["auc"] is None else (
            "yes" if round(r["auc"], 4) >= r["paper_auc"] else "no")
        lines.append(
            f"| {r['eps']:.2f} | {_f(r['clean_acc'], 3)} | {_f(r['adv_acc'], 3)} | **{_f(r['auc'])}** "
            f"| {_f(r['auc_successful'])} | {_f(r['tpr_at_5fpr'], 3)} | {_pct(r['id95_detection'])} "
            f"| {_pct(r['id99_detection'])} | {_f(r['mahalanobis_auc'])} | {_f(r['paper_auc'])} "
            f"| {_f(r['paper_defense_gan_auc'], 3)} | {ok} |"
        )
    if paper:
        lines.append("")
        lines.append(f"Paper columns: {paper['table']} ({DATASET_TITLES.get(dataset, dataset)}; Defense-GAN "
                     f"with {paper['defense_gan']}, as copied by the paper from Samangouei et al.).")
    return "\n".join(lines)


def _settings_table(results: dict[str, Any]) -> str:
    dataset = results["dataset"]
    if dataset not in SETTINGS_TABLES:
        return ""
    table, rows = SETTINGS_TABLES[dataset]
    ours = [r for r in _records(results, "black-box", "FGSM") if r["eps"] is not None and abs(r["eps"] - 0.3) < 1e-9]
    lines = [f"### {table} analogue: FGSM eps = 0.3, black-box", "",
             "| Method | GD runs | iterations per run | detection AUC |", "|---|---|---|---|"]
    if ours:
        lines.append(f"| **I-defender, this run (seed {results['seed']})** | N/A | N/A | **{_f(ours[0]['auc'])}** |")
        lines.append(f"| Mahalanobis baseline, this run | N/A | N/A | {_f(ours[0]['mahalanobis_auc'])} |")
    for method, runs, iters, auc in rows:
        who = f"{method} (paper)"
        lines.append(f"| {who} | {runs if runs else 'N/A'} | {iters if iters else 'N/A'} | {auc:.3f} |")
    return "\n".join(lines)


def _attack_table(results: dict[str, Any], threat: str) -> str:
    lines = [
        "| attack | mean Linf | mean L2 | source adv acc | F clean acc | F adv acc | successful | AUC (all) "
        "| AUC (successful) | TPR @ 5% FPR | ID-95 detected | ID-99 detected | ID-95 (successful) "
        "| Mahalanobis AUC | Mahalanobis AUC (successful) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in _records(results, threat):
        lines.append(
            f"| {r['label']} | {_f(r['mean_linf'], 3)} | {_f(r['mean_l2'], 2)} | {_f(r['source_adv_acc'], 3)} "
            f"| {_f(r['clean_acc'], 3)} | {_f(r['adv_acc'], 3)} | {r['n_successful']}/{r['n']} "
            f"| {_f(r['auc'])} | {_f(r['auc_successful'])} | {_f(r['tpr_at_5fpr'], 3)} "
            f"| {_pct(r['id95_detection'])} | {_pct(r['id99_detection'])} "
            f"| {_pct(r['id95_detection_successful'])} | {_f(r['mahalanobis_auc'])} "
            f"| {_f(r['mahalanobis_auc_successful'])} |"
        )
    return "\n".join(lines)


def _ablation_table(results: dict[str, Any]) -> str:
    ablation = results.get("ablation")
    if not ablation:
        return ""
    eps_list = ablation["eps"]
    head = " | ".join(f"eps {e:.2f}" for e in eps_list)
    lines = [f"| layers | D | K | covariance | estimator | reg_covar | EM max_iter | fit s | natural test rejected, "
             f"ID-95 held-out | ... training-data ID-95 | {head} |",
             "|---|---|---|---|---|---|---|---|---|---|" + "---|" * len(eps_list)]
    for row in ablation["rows"]:
        cells = " | ".join(_f(a) for a in row["auc"]) if row.get("auc") else " | ".join(
            "-" for _ in eps_list)
        note = f" ({row['error']})" if row.get("error") else ""
        lines.append(f"| `{'+'.join(row['layers'])}`{note} | {row.get('n_features', '-')} | {row['n_components']} "
                     f"| {row['covariance_type']} | {row.get('covariance_estimator', 'empirical')} "
                     f"| {row['reg_covar']:g} | {row.get('max_iter', 100)} "
                     f"| {_f(row.get('fit_seconds'), 1)} | {_pct(row.get('natural_test_rejected_id95'))} "
                     f"| {_pct(row.get('natural_test_rejected_id95_train'))} "
                     f"| {cells} |")
    paper = FGSM_TABLES.get(results["dataset"])
    if paper:
        cells = " | ".join(_f(paper["rows"].get(round(e, 2), (None, None))[1]) for e in eps_list)
        lines.append(f"| paper ({paper['table']}) | | | | | | | | | | {cells} |")
    return "\n".join(lines)


#: config field -> (option, default) for :func:`command_line`
_OPTIONS = {
    "seed": ("--seed", None), "epochs": ("--epochs", None), "n_train": ("--n-train", None),
    "n_test": ("--n-test", None), "n_other": ("--n-other", 1000), "n_calibrate": ("--n-calibrate", 10000),
    "substitute": ("--substitute", "jacobian"), "holdout": ("--holdout", 150), "n_holdout": ("--n-holdout", 1000),
    "layers": ("--layers", ["conv2"]),
    "n_components": ("--components", 1), "covariance_type": ("--covariance", "full"),
    "reg_covar": ("--reg-covar", 1e-4), "batch_size": ("--batch-size", 500),
}


def command_line(cfg: dict[str, Any]) -> str:
    """The ``idefender-gpu reproduce blackbox`` command that reproduces a run's config."""
    parts = ["idefender-gpu reproduce blackbox", f"--dataset {cfg['dataset']}"]
    for key, (option, default) in _OPTIONS.items():
        value = cfg.get(key)
        if key in ("seed", "epochs"):
            parts.append(f"{option} {value}")
        elif value is None and default is not None and key in ("n_other", "n_calibrate"):
            parts.append(f"{option} all")
        elif value is not None and value != default:
            parts.append(f"{option} {','.join(value) if isinstance(value, list) else value}")
    threats = cfg.get("threat_models", ["black-box", "semi-white-box"])
    if len(threats) == 1:
        parts.append(f"--threat {threats[0]}")
    if cfg.get("ablation"):
        parts.append("--ablation")
    return " ".join(parts)


def _holdout_note(results: dict[str, Any]) -> str:
    holdout = results["data"].get("holdout", 0)
    return f" (the first {holdout} test images are the attacker's and left out)" if holdout else ""


def _thresholds_line(results: dict[str, Any]) -> str:
    """What the ID-95 / ID-99 thresholds are calibrated on, and what they reject of new natural inputs."""
    det, data = results["detector"], results["data"]
    train = (f"the paper's thresholds, keeping 95% / 99% of each class's natural training data (ID-99: of the first "
             f"{data.get('n_calibrate_id99', '-')} training images)")
    if not data.get("n_holdout"):
        return (f"ID-95 / ID-99 thresholds: {train}; they reject {_pct(det['natural_test_rejected_id95'])} / "
                f"{_pct(det['natural_test_rejected_id99'])} of the natural test inputs.")
    return (f"ID-95 / ID-99 thresholds (the columns below): keep 95% / 99% of each class's held-out natural test "
            f"images (the last {data['n_holdout']} test images in use, left out of the evaluation); they reject "
            f"{_pct(det['natural_test_rejected_id95'])} / {_pct(det['natural_test_rejected_id99'])} of the natural "
            f"evaluation inputs. With {train} instead, {_pct(det.get('natural_test_rejected_id95_train'))} / "
            f"{_pct(det.get('natural_test_rejected_id99_train'))} (results.json: `id95_detection_train`, "
            f"`id99_detection_train`).")


def load_text(machine: dict[str, Any]) -> str:
    """``"; load average 1.2/0.9/0.8 at the start, 2.0/1.5/1.0 at the end"`` (1/5/15 min) from
    :func:`machine_info`'s fields, or ``""`` when they are missing (older results)."""
    parts = [f"{'/'.join(f'{v:.2f}' for v in machine[key])} {when}"
             for key, when in (("load_average_start", "at the start"), ("load_average", "at the end"))
             if machine.get(key)]
    return "; load average (1/5/15 min, `uptime`) " + ", ".join(parts) if parts else ""


def markdown_report(results: dict[str, Any], figures: list[str]) -> str:
    """The report: setup, the paper's tables beside ours, all attacks, figures, notes."""
    dataset = results["dataset"]
    title = DATASET_TITLES.get(dataset, dataset)
    cfg, det, models = results["config"], results["detector"], results["models"]
    paper = FGSM_TABLES.get(dataset, {})
    seeds = ", ".join(f"model {name} seed {info['seed']}" for name, info in models.items())
    layer_desc = ", ".join(f"`{layer}` ({width} features)" for layer, width in det["n_features"].items())
    timings = results["timings"]
    machine = results["machine"]
    cmd = command_line(cfg)
    out = [
        f"# I-defender black-box experiment on {title} (paper Section 4.1)",
        "",
        f"Command: `{cmd}`",
        "",
        f"- Seeds: {results['seed']} ({seeds}; mixtures' k-means random_state {results['seed']}).",
        f"- Data: {results['data']['n_train']} training images; evaluation on {results['data']['n_test']} test "
        f"images{_holdout_note(results)} from "
        f"`{results['data']['source']}` (content SHA-256 `{results['data']['sha256'][:16]}...`), pixels in [0, 1].",
        "- Models (Table 1; Adam, lr 1e-3, batch 128): "
        + "; ".join(f"{name}: {info.get('training', '')}, accuracy {info['test_accuracy']:.4f} on the "
                    f"evaluation set"
                    + (" (cached checkpoint)" if info["cached"] else
                       f" (trained in {info['train_seconds']:.0f} s)" if info.get("train_seconds") else "")
                    for name, info in models.items()) + ".",
        f"- I-defender: layer(s) {layer_desc} of model F, K = {det['n_components']} "
        f"{det['covariance_type']}-covariance Gaussian(s) per class, reg_covar {det['reg_covar']:g}; "
        f"score = {det['score']}. " + _thresholds_line(results),
        f"- Baseline: {det['baseline']}, same layer(s).",
        f"- Machine: {machine['device']}" + (f" ({machine['gpu']})" if machine.get("gpu") else
                                             f", {machine['cpu_threads']} CPU thread(s)")
        + f", torch {machine['torch']}. Wall time {timings['total']:.0f} s "
        + "(" + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items() if k != "total") + ")"
        + load_text(machine) + ".",
        "",
        f"## Black-box FGSM: ours beside the paper ({paper.get('table', 'no paper table')})",
        "",
        "AUC: natural test inputs (negatives) against adversarial versions of the same inputs "
        "(positives), crafted on model E and fed to model F; \"successful\": adversarial inputs whose F "
        "prediction differs from F's prediction on the natural input. ID-95/ID-99 detected: fraction "
        "of adversarial inputs rejected by the thresholds.",
        "",
        format_fgsm_table(results),
        "",
    ]
    settings = _settings_table(results)
    if settings:
        out += [settings, ""]
    for threat, heading in (("black-box", "Black-box: every attack, crafted on model E "
                             f"({paper.get('methods_figure', 'Figures 4-5')} analogue)"),
                            ("semi-white-box", "Semi-white-box: every attack, crafted with model F's own "
                             "gradients (no knowledge of the detector)")):
        if _records(results, threat):
            out += [f"## {heading}", "", _attack_table(results, threat), ""]
    ablation = _ablation_table(results)
    if ablation:
        abl = results["ablation"]
        out += ["## What was tried: layer, K and covariance (black-box FGSM AUC)", "",
                f"Each row refits I-defender on model F's natural training hidden states and scores the same "
                f"natural and black-box FGSM inputs ({abl.get('note', '')}).", "", ablation, ""]
    if figures:
        out += ["## ROC curves", ""]
        for name in figures:
            threat, kind, caption = FIGURES[name]
            out.append(f"![{caption}]({name})")
        out.append("")
    out += [
        "## Notes",
        "",
        "- Layer: the paper models fully connected hidden states only, and model F has none: its "
        "only fully connected layer is the output. The hidden state feeding that layer is F's second "
        "convolution, 128 x 3 x 3 = 1152 features. I-defender models it before the ReLU (`conv2`, "
        "the pre-activation): a Gaussian mixture fits the pre-activations far better than the "
        "post-ReLU values (`fc:input`), whose dead units put point masses at 0. See the table above "
        "(when run with `--ablation`) for the alternatives measured.",
        "- Attacks run on inputs in [0, 1], untargeted, on the true labels. FGSM at the paper's eps; "
        "BIM (Linf) eps 0.1 and iterative L2 eps 2.0, 10 iterations each with step 2.5 * eps / 10 "
        "(the paper gives 10 iterations and no eps for Figures 4-5; eps 0.1 is the smallest FGSM eps "
        "of Tables 3/5 and an L2 radius of 2.0 is about the L2 size of an FGSM eps 0.1 perturbation "
        "after clipping); DeepFool overshoot 0.02, at most 50 iterations, all 10 classes.",
        f"- Evaluation sets: every AUC uses all {results['data']['n_test']} natural test inputs as negatives. "
        f"Black-box FGSM attacks all of them; every other setting attacks the first "
        f"{cfg.get('n_other') or results['data']['n_test']} (column `successful`: successful / attacked).",
        ("- Black-box, as in Defense-GAN's experiment that the paper repeats: the attacker holds the first "
         f"{results['data'].get('holdout', 150)} test images, trains model E as a substitute by Papernot et al.'s "
         "Jacobian-based augmentation (6 rounds of 10 epochs, lambda 0.1, labels queried from F) and crafts "
         "the attacks on E. "
         if cfg.get("substitute", "jacobian") == "jacobian" else
         "- Black-box: model E is trained on the training set with the true labels (another seed), and the "
         "attacks are crafted on E. ")
        + "Semi-white-box: the same attacks computed with F's own gradients.",
        "- The paper's numbers are quoted from its Tables 2-5 (Defense-GAN columns copied there from "
        "Samangouei et al., 2018); the paper's own seeds and training details are not published.",
    ]
    return "\n".join(out) + "\n"


def draw_roc(path: Path, lines: list[tuple[str, Any, Any]], title: str, legend_fontsize: int = 9) -> bool:
    """One ROC figure (``(label, fpr, tpr)`` per curve, a chance line, ``title`` in two short
    lines) saved at :data:`FIGURE_DPI`; False (with a warning) without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        warnings.warn("matplotlib is not installed: the ROC figures are skipped (pip install matplotlib)",
                      stacklevel=3)
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(FIGURE_INCHES, FIGURE_INCHES * 0.85))
    for label, fpr, tpr in lines:
        ax.plot(fpr, tpr, lw=1.6, label=label)
    ax.plot([0, 1], [0, 1], color="0.7", lw=1.0, ls=":", label="chance (AUC 0.5)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false positive rate (natural inputs rejected)", fontsize=10)
    ax.set_ylabel("true positive rate (adversarial inputs detected)", fontsize=10)
    ax.set_title(title, fontsize=11)
    ax.tick_params(labelsize=9)
    ax.grid(True, color="0.92", lw=0.6)
    ax.legend(fontsize=legend_fontsize, loc="lower right", framealpha=0.9)
    fig.tight_layout()
    fig.savefig(path, dpi=FIGURE_DPI)
    plt.close(fig)
    return True


def _plot(results: dict[str, Any], name: str, path: Path) -> bool:
    threat, kind, caption = FIGURES[name]
    curves = results.get("curves", {}).get(threat)
    if not curves:
        return False
    if kind == "fgsm":
        items = [(label, c) for label, c in curves.items() if c["attack"] == "FGSM"]
    else:
        fgsm = [(label, c) for label, c in curves.items() if c["attack"] == "FGSM"]
        items = fgsm[:1] + [(label, c) for label, c in curves.items() if c["attack"] != "FGSM"]
    aucs = {r["label"]: r["auc"] for r in _records(results, threat)}
    lines = [(f"{label} (AUC {_f(aucs.get(label))})", *curve["idefender"])
             for label, curve in items if curve["idefender"] is not None]
    # Two short lines, so the title fits the figure whatever the caption's length.
    title = f"I-defender, {DATASET_TITLES.get(results['dataset'], results['dataset'])}\n{caption}"
    return draw_roc(path, lines, title)


def write_outputs(results: dict[str, Any], out: Any) -> dict[str, Path]:
    """Write ``results.json``, ``report.md`` and the ROC PNGs into ``out`` (created).

    Returns
    -------
    paths : dict of str to Path
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    figures = []
    for name in FIGURES:
        if _plot(results, name, out / name):
            figures.append(name)
            paths[name] = out / name
    data = {k: v for k, v in results.items() if k != "curves"}
    paths["results.json"] = out / "results.json"
    paths["results.json"].write_text(json.dumps(_clean(data), indent=2) + "\n")
    paths["report.md"] = out / "report.md"
    paths["report.md"].write_text(markdown_report(results, figures))
    return paths
