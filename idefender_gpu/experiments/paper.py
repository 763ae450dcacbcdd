"""The paper's numbers for the black-box experiment (Zheng & Hong, Section 4.1, Tables 2-5).

Detection AUC under FGSM crafted on model E and used against model F; the Defense-GAN
columns are copied by the paper from Samangouei et al. (2018).
"""

from __future__ import annotations

__all__ = ["FGSM_TABLES", "SETTINGS_TABLES", "fgsm_paper_auc"]

#: dataset -> {"table": paper table, "figure": ROC figure, "defense_gan": its GD setting,
#: "rows": {eps: (Defense-GAN AUC, I-defender AUC)}} (Tables 3 and 5)
FGSM_TABLES = {
    "mnist": {
        "table": "Table 3",
        "figure": "Figure 2",
        "methods_figure": "Figure 4",
        "defense_gan": "10 GD runs x 400 iterations",
        "rows": {0.10: (0.914, 0.964), 0.15: (0.975, 0.979), 0.20: (0.989, 0.988),
                 0.25: (0.998, 0.991), 0.30: (0.999, 0.993)},
    },
    "fashion-mnist": {
        "table": "Table 5",
        "figure": "Figure 3",
        "methods_figure": "Figure 5",
        "defense_gan": "10 GD runs x 200 iterations",
        "rows": {0.10: (0.775, 0.9302), 0.15: (0.884, 0.9587), 0.20: (0.940, 0.9722),
                 0.25: (0.969, 0.9807), 0.30: (0.985, 0.9850)},
    },
}

#: dataset -> (paper table, [(method, GD runs, iterations per run, AUC)]) at FGSM eps = 0.3
#: (Tables 2 and 4)
SETTINGS_TABLES = {
    "mnist": ("Table 2", [
        ("I-defender", None, None, 0.993),
        ("Defense-GAN", 10, 800, 1.0),
        ("Defense-GAN", 10, 400, 1.0),
        ("Defense-GAN", 10, 50, 0.985),
        ("Defense-GAN", 5, 100, 0.982),
        ("Defense-GAN", 2, 100, 0.922),
        ("Defense-GAN", 1, 100, 0.836),
    ]),
    "fashion-mnist": ("Table 4", [
        ("I-defender", None, None, 0.985),
        ("Defense-GAN", 10, 800, 0.987),
        ("Defense-GAN", 10, 400, 0.983),
        ("Defense-GAN", 10, 100, 0.965),
        ("Defense-GAN", 5, 100, 0.945),
        ("Defense-GAN", 10, 25, 0.935),
        ("Defense-GAN", 2, 100, 0.876),
        ("Defense-GAN", 1, 100, 0.794),
    ]),
}


def fgsm_paper_auc(dataset: str, eps: float) -> tuple[float | None, float | None]:
    """``(Defense-GAN AUC, I-defender AUC)`` the paper reports for FGSM at ``eps`` (or Nones)."""
    rows = FGSM_TABLES.get(dataset, {}).get("rows", {})
    for key, value in rows.items():
        if abs(key - eps) < 1e-9:
            return value
    return None, None
