"""Outputs of the protocol reproductions (private): ``results.json``, ``report.md``, ROC PNGs.

An experiment's results hold ``results["curves"]``: figure file name -> ``{"title": str,
"curves": [{"label", "natural", "adversarial"}]}`` (score tensors; dropped from the JSON).
:func:`write` plots them at the black-box report's size and resolution and writes the
markdown that the experiment's own ``markdown(results, figures)`` returns.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from idefender_gpu.experiments.report import DATASET_TITLES, _clean, draw_roc, load_text

__all__ = ["add_curve", "fmt", "pct", "write"]


def fmt(value: Any, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def pct(value: Any) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def add_curve(results: dict[str, Any], figure: str, title: str, label: str, natural: Any, adversarial: Any,
              auc: float | None) -> None:
    """Keep one ROC curve (natural and adversarial scores) for ``figure``."""
    entry = results.setdefault("curves", {}).setdefault(figure, {"title": title, "curves": []})
    entry["curves"].append({"label": label, "natural": natural, "adversarial": adversarial, "auc": auc})


def _plot(results: dict[str, Any], name: str, path: Path) -> bool:
    import torch

    from idefender_gpu.metrics import roc_curve

    entry = results["curves"][name]
    lines = []
    for curve in entry["curves"]:
        natural, adversarial = curve["natural"], curve["adversarial"]
        if natural.numel() == 0 or adversarial.numel() == 0:
            continue
        scores = torch.cat([-natural, -adversarial])
        labels = torch.cat([torch.zeros(natural.numel()), torch.ones(adversarial.numel())])
        fpr, tpr, _ = roc_curve(scores, labels)
        lines.append((f"{curve['label']} (AUC {fmt(curve['auc'])})", fpr.tolist(), tpr.tolist()))
    title = f"{DATASET_TITLES.get(results['dataset'], results['dataset'])}\n{entry['title']}"
    return draw_roc(path, lines, title, legend_fontsize=8)


def write(results: dict[str, Any], out: Any, markdown: Callable[[dict[str, Any], list[str]], str]) -> dict[str, Path]:
    """Write the ROC PNGs, ``results.json`` and ``report.md`` into ``out`` (created)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    figures = []
    for name in results.get("curves", {}):
        if _plot(results, name, out / name):
            figures.append(name)
            paths[name] = out / name
    data = {k: v for k, v in results.items() if k != "curves"}
    paths["results.json"] = out / "results.json"
    paths["results.json"].write_text(json.dumps(_clean(data), indent=2) + "\n")
    paths["report.md"] = out / "report.md"
    paths["report.md"].write_text(markdown(results, figures))
    return paths


def setup_lines(results: dict[str, Any]) -> list[str]:
    """The report's setup bullets shared by the protocols (data, models, detector, thresholds)."""
    d, det, m = results["data"], results["detector"], results["machine"]
    lines = [
        f"- Data: {d['n_train']} training images; {d['n_eval']} evaluation test images (the first "
        f"{d['n_attack']} attacked) and {d['n_holdout']} held-out test images "
        f"({d.get('holdout', 'the last')}) that calibrate the held-out thresholds, from `{d['source']}`.",
        "- Models: " + "; ".join(f"{name}: {info['training']}, test accuracy {info['test_accuracy']:.4f}"
                                 + (" (cached checkpoint)" if info["cached"] else "")
                                 for name, info in results["models"].items()) + ".",
        f"- I-defender: layer(s) {', '.join(det['layers'])} ({det['n_features']} features), K = "
        f"{det['n_components']} {det['covariance_type']}-covariance Gaussian(s) per class, reg_covar "
        f"{det['reg_covar']:g}; baseline: MahalanobisDetector (shared covariance, closest class), same layer(s).",
        f"- Machine: {m['device']}" + (f" ({m['gpu']})" if m.get("gpu") else f", {m['cpu_threads']} CPU thread(s)")
        + f", torch {m['torch']}; wall time {results['timings']['total']:.0f} s{load_text(m)}.",
        "",
        "Thresholds (natural false rejects on the evaluation set; nominal 5% / 1%):",
        "",
        "| detector | calibrated on | keep | natural test rejected |",
        "|---|---|---|---|",
    ]
    for row in results["thresholds"]:
        who = "I-defender" if row["detector"] == "idefender" else "Mahalanobis"
        lines.append(f"| {who} on model {row['model']} | {row['calibrated_on']} | {row['keep']:.2f} "
                     f"| {pct(row['natural_test_rejected'])} |")
    return lines
