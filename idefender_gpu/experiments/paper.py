"""The paper's numbers for the black-box experiment (Zheng & Hong, Section 4.1, Tables 2-5).

Detection AUC under FGSM crafted on model E and used against model F; the Defense-GAN
columns are copied by the paper from Samangouei et al. (2018).
"""

from __future__ import annotations

__all__ = ["FGSM_TABLES", "GRAYBOX_ALPHAS", "GRAYBOX_ATTACKS", "GRAYBOX_TABLES", "IMAGENET_ALPHAS",
           "IMAGENET_ATTACKS", "IMAGENET_TABLE", "IMAGENET_TARGET_CLEAN_ACC", "SEMIWHITEBOX_TABLE",
           "SETTINGS_TABLES", "fgsm_paper_auc"]

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


#: Table 6 (CIFAR-10, WRN34-8; semi-white-box): (column label, attack, target adversarial
#: accuracy of the classifier, {method: AUC in %}). SafetyNet (SVM, mSVM) and Subnetwork were
#: trained on the first column's attack.
SEMIWHITEBOX_TABLE = ("Table 6", "CIFAR-10", [
    ("Iter-Linf 13.14%", "BIM", 0.1314, {"SVM": 83.6, "mSVM": 92.52, "Subnet": 98.235, "ID-95": 81.28,
                                          "ID-99": 79.04}),
    ("Iter-L2 10.80%", "IterativeL2", 0.1080, {"SVM": 84.840, "mSVM": 93.915, "Subnet": 98.660, "ID-95": 79.398,
                                               "ID-99": 74.173}),
    ("FGSM 27.84%", "FGSM", 0.2784, {"SVM": 75.545, "mSVM": 74.480, "Subnet": 68.980, "ID-95": 87.464,
                                     "ID-99": 90.485}),
    ("DeepFool 24.53%", "DeepFool", 0.2453, {"SVM": 78.305, "mSVM": 86.635, "Subnet": 49.270, "ID-95": 87.636,
                                             "ID-99": 90.709}),
    ("Iter-Linf 29.56%", "BIM", 0.2956, {"SVM": 76.330, "mSVM": 76.670, "Subnet": 49.295, "ID-95": 78.730,
                                         "ID-99": 74.580}),
    ("FGSM 45.68%", "FGSM", 0.4568, {"SVM": 61.755, "mSVM": 60.895, "Subnet": 49.27, "ID-95": 85.024,
                                     "ID-99": 87.596}),
])

#: Tables 7 and 8's attacks on CIFAR-10: (label, GrayBox base, eps on [0, 1] pixels), and the
#: weights alpha of Eq. 6's detector term
GRAYBOX_ATTACKS = (("Iter-Linf eps=0.013", "bim", 0.013), ("Iter-Linf eps=0.0085", "bim", 0.0085),
                   ("Iter-L2 eps=0.47", "l2", 0.47), ("FGSM eps=0.075", "fgsm", 0.075))
GRAYBOX_ALPHAS = (1e-3, 1e-2, 1e-1)

#: Tables 7 and 8 (CIFAR-10, WRN34-8 Source and Target; WRN46-8), detection AUC in %, as
#: extracted from the paper: four rows per column, in the paper's order, under an alpha
#: column whose labels the extraction garbled ("1e-3 1e-2 1e-1"); the Iter-Linf eps 0.0085
#: and FGSM eps 0.075 columns' values did not survive the extraction.
GRAYBOX_TABLES = {
    "Table 7": {"Iter-Linf eps=0.013 (Target / Source)": [(85.203, 76.450), (83.261, 58.967), (83.875, 59.459),
                                                           (83.945, 59.554)],
                "Iter-L2 eps=0.47 (Target / Source)": [(86.249, 75.786), (84.740, 69.243), (85.406, 71.179),
                                                        (85.576, 72.027)]},
    "Table 8": {"Iter-Linf eps=0.013 (WRN-34 / WRN-46)": [(85.203, 87.549), (83.261, 87.555), (83.875, 87.637),
                                                           (83.945, 87.553)],
                "Iter-L2 eps=0.47 (WRN-34 / WRN-46)": [(86.249, 86.23), (84.740, 86.215), (85.406, 85.844),
                                                        (85.576, 85.528)]},
}


#: Table 9's attacks on ImageNet (VGG19 Source and Target): (label, GrayBox base, eps). The
#: paper does not say on which pixel scale its eps are; we apply them to [0, 1] pixels (see
#: ``_datasets.PROFILES["imagenet"]``'s notes and ``--eps-scale``)
IMAGENET_ATTACKS = (("FGSM eps=0.3", "fgsm", 0.3), ("Iter-Linf eps=0.019", "bim", 0.019),
                    ("Iter-L2 eps=12.5", "l2", 12.5))
IMAGENET_ALPHAS = (1e-2, 1e-1, 1.0)
#: Table 9: the Target VGG19's clean accuracy on the natural data, in %
IMAGENET_TARGET_CLEAN_ACC = 71.028
#: Table 9 (ImageNet, gray-box, crafted on Source, evaluated on Target): alpha -> attack label
#: -> (Target adversarial accuracy %, Target I-defender detection AUC %)
IMAGENET_TABLE = {
    1e-2: {"FGSM eps=0.3": (70.892, 62.685), "Iter-Linf eps=0.019": (62.636, 97.201),
           "Iter-L2 eps=12.5": (59.032, 93.832)},
    1e-1: {"FGSM eps=0.3": (70.892, 62.801), "Iter-Linf eps=0.019": (62.646, 97.211),
           "Iter-L2 eps=12.5": (59.016, 93.837)},
    1.0: {"FGSM eps=0.3": (70.892, 62.612), "Iter-Linf eps=0.019": (62.648, 97.215),
          "Iter-L2 eps=12.5": (59.010, 93.834)},
}
