"""The implementations a workload run times: ours and the references.

One class per implementation, each with ``fit(groups, max_iter, tol)`` over a range of
groups from the shared :class:`~idefender_gpu.bench.workloads.BenchData`:

* ``idefender_gpu[<backend>]``: :class:`~idefender_gpu.mixture.BatchedGaussianMixture`, all
  groups (or blocks of them) in one batched fit;
* ``sklearn_numpy`` / ``sklearn_array_api``: scikit-learn's ``GaussianMixture``, a loop over
  the groups, on NumPy or (``array_api_dispatch=True``, ``SCIPY_ARRAY_API=1`` set before SciPy
  is imported) on torch tensors;
* ``torchgmm``: torchgmm's ``GaussianMixture`` (optional; :data:`TORCHGMM_INSTALL`).

:func:`reference_skip` decides up front, without allocating, whether a reference cannot run
here (its per-group copies would not fit in the memory available).
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import warnings
from typing import Any

import numpy as np
import torch
from torch import Tensor

from idefender_gpu import kernels
from idefender_gpu.bench.timing import available_memory_bytes
from idefender_gpu.bench.workloads import BenchData, Workload, precisions_init
from idefender_gpu.mixture import BatchedGaussianMixture

__all__ = [
    "REFERENCES",
    "TORCHGMM_INSTALL",
    "make_implementation",
    "reference_memory_estimate",
    "reference_skip",
]

#: The references a workload run tries, in order.
REFERENCES = ("sklearn_numpy", "sklearn_array_api", "torchgmm")

#: One command that installs the torchgmm reference into an environment that already holds
#: torch, without pulling another torch (``pip check`` then still names torchgmm's declared
#: ``anndata`` and ``session-info``, which it never imports).
TORCHGMM_INSTALL = ("pip install --no-deps torchgmm==0.1.4 pytorch-lightning==2.6.6 "
                    "torchmetrics==1.9.0 lightning-utilities==0.15.3 pyyaml")

#: Fraction of the available memory a reference's estimate may take before it is skipped.
MEMORY_FRACTION = 0.8


class Implementation:
    """One implementation under test: ``fit(groups, max_iter, tol)`` over a range of groups."""

    name = ""
    notes = ""

    def __init__(self, data: BenchData, workload: Workload, device: torch.device) -> None:
        self.data, self.workload, self.device = data, workload, device
        self.probe_groups = workload.n_groups if workload.n_groups <= 10 else 2

    def fit(self, groups: range, max_iter: int, tol: float) -> dict[str, np.ndarray]:
        """Per group of ``groups``: ``lower_bound``, ``n_iter``, ``converged`` (NumPy)."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """What the record says about this implementation (JSON-able)."""
        return {"device": str(self.device), "notes": self.notes}


class Ours(Implementation):
    """``idefender_gpu[<backend>]``: :class:`BatchedGaussianMixture` on blocks of groups."""

    notes = "BatchedGaussianMixture: all groups in one batched fit"

    def __init__(self, data, workload, device, backend: str, group_block: int | None,
                 memory_budget: int | None) -> None:
        super().__init__(data, workload, device)
        self.backend, self.memory_budget = backend, memory_budget
        self.name = f"idefender_gpu[{backend}]"
        self.X, self.y = data.X.to(device), data.y.to(device)
        self.order = data.order.to(device)
        self.weights, self.means = data.weights.to(device), data.means.to(device)
        self.prec_diag = data.prec_diag.to(device)
        self.group_block = group_block or _auto_group_block(workload, device)
        self.probe_groups = min(workload.n_groups, self.group_block)
        if self.group_block < workload.n_groups:
            self.notes = (
                f"BatchedGaussianMixture on blocks of {self.group_block} groups, one block after "
                "another, each block's fitted parameters dropped after its fit (a benchmark of "
                "the EM work: G*K*D^2 float32 covariances of all groups would not fit on the "
                "device, nor, several times over, in host memory for storage_device)"
            )

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "backend": self.backend, "group_block": self.group_block}

    def fit(self, groups, max_iter, tol):
        w, out = self.workload, []
        for start in range(groups.start, groups.stop, self.group_block):
            stop = min(start + self.group_block, groups.stop)
            if start == 0 and stop == w.n_groups:
                X, y = self.X, self.y
            else:
                rows = self.order[self.data.offsets[start]:self.data.offsets[stop]]
                X, y = self.X[rows], self.y[rows] - start
            model = BatchedGaussianMixture(
                w.n_components, covariance_type=w.covariance_type, tol=tol, reg_covar=w.reg_covar,
                max_iter=max_iter, weights_init=self.weights[start:stop],
                means_init=self.means[start:stop],
                precisions_init=precisions_init(self.prec_diag[start:stop], w.covariance_type),
                device=self.device, backend=self.backend, memory_budget=self.memory_budget,
            )
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model.fit(X, y)
            out.append((model.lower_bound_.cpu().numpy(), model.n_iter_.cpu().numpy(),
                        model.converged_.cpu().numpy()))
        return {key: np.concatenate([o[i] for o in out])
                for i, key in enumerate(("lower_bound", "n_iter", "converged"))}


def _auto_group_block(workload: Workload, device: torch.device) -> int:
    """Groups per batched fit: all of them, unless the device memory would not hold them."""
    w = workload
    if device.type != "cuda":
        return w.n_groups
    free, _ = torch.cuda.mem_get_info(device)
    n_max = -(-w.n_samples // w.n_groups) * 1.1
    cov = math.prod(kernels.precision_shape(w.covariance_type, None, w.n_components, w.n_features))
    # ~10 parameter-sized arrays (covariances, factors, M-step temporaries, inits) and a few
    # copies of the padded samples, in float32.
    per_group = 4 * (10 * cov + 4 * n_max * w.n_features + 4 * n_max * w.n_components)
    return int(max(1, min(w.n_groups, 0.5 * free // per_group)))


class Sklearn(Implementation):
    """``sklearn_numpy`` / ``sklearn_array_api``: scikit-learn, one fit per group; each
    group's arrays are made once and kept (see :func:`reference_memory_estimate`)."""

    def __init__(self, data, workload, device, array_api: bool) -> None:
        super().__init__(data, workload, device if array_api else torch.device("cpu"))
        import sklearn  # noqa: F401 - ImportError: recorded as skipped

        self.array_api = array_api
        self.name = "sklearn_array_api" if array_api else "sklearn_numpy"
        self.notes = ("scikit-learn GaussianMixture, one fit per group (a Python loop), same "
                      "explicit inits" + (" on torch tensors, array_api_dispatch=True, "
                                          "SCIPY_ARRAY_API=1" if array_api else " on NumPy"))
        if array_api and os.environ.get("SCIPY_ARRAY_API") != "1":
            raise RuntimeError("SCIPY_ARRAY_API=1 must be set before SciPy is imported "
                               "(idefender-gpu bench sets it and restarts itself)")
        self._parts: dict[int, tuple] = {}

    def _part(self, g: int) -> tuple:
        if g not in self._parts:
            d, ctype = self.data, self.workload.covariance_type
            arrays = (d.X[d.rows(g, g + 1)], d.weights[g], d.means[g],
                      precisions_init(d.prec_diag[g], ctype))
            if self.array_api:
                arrays = tuple(a.to(self.device) for a in arrays)
            else:
                arrays = tuple(a.cpu().numpy() for a in arrays)
            self._parts[g] = arrays
        return self._parts[g]

    def fit(self, groups, max_iter, tol):
        import sklearn
        from sklearn.mixture import GaussianMixture as SkGaussianMixture

        w = self.workload
        out = {"lower_bound": [], "n_iter": [], "converged": []}
        with warnings.catch_warnings(), sklearn.config_context(array_api_dispatch=self.array_api):
            warnings.simplefilter("ignore")
            for g in groups:
                X, weights, means, precisions = self._part(g)
                model = SkGaussianMixture(
                    w.n_components, covariance_type=w.covariance_type, tol=tol,
                    reg_covar=w.reg_covar, max_iter=max_iter, weights_init=weights,
                    means_init=means, precisions_init=precisions, init_params="random_from_data",
                ).fit(X)
                out["lower_bound"].append(float(model.lower_bound_))
                out["n_iter"].append(int(model.n_iter_))
                out["converged"].append(bool(model.converged_))
        return {k: np.array(v) for k, v in out.items()}


class TorchGMM(Implementation):
    """``torchgmm``: torchgmm's ``GaussianMixture``, one fit per group (optional install)."""

    name = "torchgmm"

    def __init__(self, data, workload, device) -> None:
        super().__init__(data, workload, device)
        from importlib.metadata import version

        try:
            from torchgmm.bayes import GaussianMixture  # noqa: F401
        except ImportError as exc:  # recorded as skipped, with the command that installs it
            raise ImportError(f"{exc}; install it with: {TORCHGMM_INSTALL}") from exc

        self.version = version("torchgmm")
        self.notes = (
            f"torchgmm {self.version} (PyTorch Lightning): one mixture per call, so a Python loop "
            "over the groups; it takes only init_means (our means_init) and computes its own "
            "initial covariances and weights from the data, so its iterations and "
            "log-likelihoods are not from our initialisation; tol is its convergence_tolerance "
            "on the mean negative log-likelihood; each call builds a Lightning Trainer"
        )
        for name in ("lightning.pytorch", "pytorch_lightning", "lightning_fabric", "lightning"):
            logging.getLogger(name).setLevel(logging.ERROR)
        self._parts: dict[int, tuple[Tensor, Tensor]] = {}

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "version": self.version}

    def fit(self, groups, max_iter, tol):
        from torchgmm.bayes import GaussianMixture as TgGaussianMixture

        w, d = self.workload, self.data
        accelerator = "gpu" if self.device.type == "cuda" else "cpu"
        out = {"lower_bound": [], "n_iter": [], "converged": []}
        for g in groups:
            if g not in self._parts:
                self._parts[g] = (d.X[d.rows(g, g + 1)].to(self.device), d.means[g].to(self.device))
            X, means = self._parts[g]
            model = TgGaussianMixture(
                w.n_components, covariance_type=w.covariance_type, init_means=means,
                convergence_tolerance=tol, covariance_regularization=w.reg_covar,
                trainer_params={"max_epochs": max_iter, "accelerator": accelerator, "devices": 1,
                                "enable_progress_bar": False, "logger": False,
                                "enable_checkpointing": False, "enable_model_summary": False},
            )
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                model.fit(X)
            out["lower_bound"].append(-float(model.nll_))
            out["n_iter"].append(int(model.num_iter_))
            out["converged"].append(bool(model.converged_))
        return {k: np.array(v) for k, v in out.items()}


def make_implementation(name: str, data: BenchData, workload: Workload, device: torch.device,
                         group_block: int | None = None,
                         memory_budget: int | None = None) -> Implementation:
    if name.startswith("idefender_gpu["):
        backend = name[len("idefender_gpu["):-1]
        return Ours(data, workload, device, backend, group_block, memory_budget)
    if name == "sklearn_numpy":
        return Sklearn(data, workload, device, array_api=False)
    if name == "sklearn_array_api":
        return Sklearn(data, workload, device, array_api=True)
    if name == "torchgmm":
        return TorchGMM(data, workload, device)
    raise ValueError(f"unknown implementation {name!r}; expected one of "
                     f"idefender_gpu[<backend>], {', '.join(REFERENCES)}")


def _parameter_size(workload: Workload) -> int:
    """Elements of one group's precisions in ``workload``'s covariance type."""
    K, D = workload.n_components, workload.n_features
    return {"full": K * D * D, "tied": D * D, "diag": K * D, "spherical": K}[workload.covariance_type]


def reference_memory_estimate(name: str, workload: Workload, itemsize: int = 4) -> dict[str, int]:
    """Bytes a reference holds at its peak, estimated from the shapes alone.

    ``cache_bytes``: the per-group copies a reference keeps across its fits (scikit-learn:
    every group's samples, weights, means and ``precisions_init``; torchgmm: samples and
    means); ``fit_bytes``: one group's fit (scikit-learn's covariances, precisions and
    their factors, ``4 K D^2`` for 'full', and a few ``(n_g, D)`` / ``(n_g, K)`` temporaries).
    For workload c1 (1,281,167 x 4096, 1000 groups, K=1) scikit-learn's cache is 21 GB of
    samples and 67 GB of ``(K, D, D)`` inits.
    """
    w = workload
    G, K, D = w.n_groups, w.n_components, w.n_features
    n_max = -(-w.n_samples // G)
    params = _parameter_size(w)
    if name.startswith("sklearn"):
        cache = w.n_samples * D + G * (K + K * D + params)
        fit = 4 * params + 3 * n_max * D + 4 * n_max * K
    elif name == "torchgmm":
        cache = w.n_samples * D + G * K * D
        fit = 4 * params + 3 * n_max * D + 4 * n_max * K
    else:
        raise ValueError(f"no memory estimate for {name!r}; expected one of {', '.join(REFERENCES)}")
    cache, fit = itemsize * cache, itemsize * fit
    return {"cache_bytes": cache, "fit_bytes": fit, "total_bytes": cache + fit}


def reference_skip(name: str, workload: Workload, device: torch.device,
                   available_bytes: int | None = None) -> dict[str, Any] | None:
    """Why reference ``name`` cannot run on ``workload`` here, or ``None`` if it can.

    The estimate of :func:`reference_memory_estimate` is compared with
    :data:`MEMORY_FRACTION` of ``available_bytes`` (default: :func:`available_memory_bytes`
    of the memory the reference uses: the host for ``sklearn_numpy``, ``device`` for the
    others). Returns the record entry: ``skipped`` (the reason, with both figures),
    ``memory_estimate_bytes`` and ``memory_available_bytes``.
    """
    if name not in REFERENCES:
        return None
    where = torch.device("cpu") if name == "sklearn_numpy" else torch.device(device)
    estimate = reference_memory_estimate(name, workload)
    if available_bytes is None:
        available_bytes = available_memory_bytes(where)
    if estimate["total_bytes"] <= MEMORY_FRACTION * available_bytes:
        return None
    kind = "device memory" if where.type == "cuda" else "host memory"
    return {
        "skipped": (f"memory: estimated {estimate['total_bytes'] / 1e9:.1f} GB "
                    f"({estimate['cache_bytes'] / 1e9:.1f} GB of per-group copies of the data and "
                    f"inits, {estimate['fit_bytes'] / 1e9:.2f} GB for one group's fit) > "
                    f"{100 * MEMORY_FRACTION:.0f}% of the {available_bytes / 1e9:.1f} GB of {kind} "
                    f"available on {where}"),
        "memory_estimate_bytes": estimate["total_bytes"],
        "memory_available_bytes": int(available_bytes),
    }
