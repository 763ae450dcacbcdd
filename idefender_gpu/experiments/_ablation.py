"""The black-box reproduction's ``--ablation`` (private): detector variants on black-box FGSM."""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from idefender_gpu import IDefender
from idefender_gpu.experiments._common import batches, detection, progress_bar

__all__ = ["run_ablation"]


def _detector_scores(detector: IDefender, x: Tensor, batch_size: int, device: torch.device, desc: str,
                     progress: bool | None) -> Tensor:
    """``detector.score`` of ``x`` batch by batch: ``(N,)`` float64 on CPU."""
    with torch.no_grad():
        return torch.cat([detector.score(x[sl].to(device)).cpu()
                          for sl in progress_bar(batches(x.shape[0], batch_size), desc, progress)]).double()


def run_ablation(config: Any, model: nn.Module, train_loader: DataLoader, x_test: Tensor,
                 fgsm: dict[float, Tensor], device: torch.device, budget: int | None,
                 heldout: tuple[Tensor, Tensor] | None = None) -> dict[str, Any]:
    """Black-box FGSM AUC of every detector variant of ``config.ablation``, and the share of
    natural test inputs its ID-95 thresholds reject: from the training data (as ``fit`` sets
    them) and, given ``heldout`` (held-out natural images and labels), from those."""
    rows = []
    progress = config.progress
    with torch.no_grad():  # the class every score is taken under (I-defender: F's prediction)
        predicted = torch.cat([model(x_test[sl].to(device)).argmax(1).cpu()
                               for sl in batches(x_test.shape[0], config.batch_size)])
    for variant in progress_bar(config.ablation, "ablation", progress, unit="variant"):
        row: dict[str, Any] = asdict(variant)
        row["layers"] = list(variant.layers)
        try:
            started = time.perf_counter()
            detector = IDefender(model, list(variant.layers), variant.n_components,
                                 covariance_type=variant.covariance_type, reg_covar=variant.reg_covar,
                                 max_iter=variant.max_iter, covariance_estimator=variant.covariance_estimator,
                                 random_state=config.seed, memory_budget=budget,
                                 progress=progress).fit(train_loader)
            row["fit_seconds"] = time.perf_counter() - started
            row["n_features"] = sum(detector.n_features_.values())

            natural = _detector_scores(detector, x_test, config.batch_size, device, "ablation: natural",
                                       progress)
            # the fit's ID-95 thresholds (training data) on the natural test inputs
            thresholds = detector.thresholds_.detach().cpu().double()
            row["natural_test_rejected_id95_train"] = float((natural < thresholds[predicted]).double().mean())
            if heldout is not None:  # ... and ID-95 thresholds from the held-out natural images
                detector.calibrate(DataLoader(TensorDataset(*heldout), batch_size=1000), keep=0.95)
                thresholds = detector.thresholds_.detach().cpu().double()
                row["natural_test_rejected_id95"] = float((natural < thresholds[predicted]).double().mean())
            row["auc"] = [detection(natural, _detector_scores(detector, x_adv, config.batch_size, device,
                                                               f"ablation: FGSM eps={eps:g}", progress))[0]
                          for eps, x_adv in fgsm.items()]
        except (ValueError, RuntimeError) as exc:  # e.g. a singular covariance: report, go on
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
        rows.append(row)
    return {"eps": list(fgsm), "rows": rows,
            "note": "K-means initialisation with random_state = seed; AUC over all adversarial inputs"}
