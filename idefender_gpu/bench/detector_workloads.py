"""Detector workloads: IDefender fitted and scored at ImageNet scale on synthetic hidden states.

``idefender-gpu bench --workload imagenet-cpu | imagenet-width | detector-overhead``
(:data:`DETECTOR_WORKLOADS`, :func:`run_detector_workload`):

* **imagenet-cpu**: 1,281,167 states x 1024 features, 1000 classes, one Gaussian per class,
  through :class:`~idefender_gpu.IDefender` on a model whose hidden state is its input
  (:func:`state_model`: the classifier reads the class from the first ``n_classes``
  coordinates, ``B x n_classes`` work): the streamed fit (moments pass, closed-form
  parameters, thresholds pass) and ``score`` on 50,000 held-out states. Batches are made on
  the fly (:class:`SyntheticLoader`, never all states in memory), sorted by class as
  torchvision's ``ImageFolder`` yields them, or shuffled (``order``).
* **imagenet-width**: 128,000 x 4096, 100 classes (ImageNet's 1,280 samples per class),
  with the empirical and the Ledoit-Wolf covariance; everything finite, and the AUC of
  held-out states presented as another class (scored under it) against the same states
  under their own class.
* **detector-overhead**: ``detector.score(x)`` against ``model(x)`` on the same batch, for
  Model F on Fashion-MNIST-shaped inputs and for torchvision's VGG19 (random weights).

Each fit variant runs in a fresh subprocess (``isolate=True``), so its peak RSS (``VmHWM``)
is its own; seconds per phase, the data generation's share, GFLOP/s per phase against the
dense float32 matmul rate of the same run. Imports the public API and the harness's
:mod:`~idefender_gpu.bench.timing` only.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from idefender_gpu.bench.timing import clock, machine_info, matmul_probe, sync

logger = logging.getLogger("idefender_gpu.bench")

__all__ = ["DETECTOR_WORKLOADS", "ClassCodeHead", "ClassStates", "DetectorWorkload", "SyntheticLoader",
           "memory_status", "run_detector_workload", "scaled_detector_workload", "state_model"]

GIB = 2**30


@dataclass(frozen=True)
class DetectorWorkload:
    """A detector benchmark shape.

    ``kind`` is ``'fit'`` (a streamed fit and held-out scoring per variant: each of
    ``orders`` x ``estimators``; the loader yields ``batch_size`` states, the held-out
    states are scored ``score_batch_size`` at a time) or ``'overhead'`` (score against
    forward, ``models``, on one batch of ``batch_size``).
    ``targets`` are the issue's (seconds of one variant, peak RSS bytes, AUC, overhead).
    """

    name: str
    kind: str
    n_train: int
    n_test: int
    n_features: int
    n_classes: int
    batch_size: int = 4096
    score_batch_size: int = 50_000
    orders: tuple[str, ...] = ("sorted",)
    estimators: tuple[str, ...] = ("empirical",)
    reg_covar: float = 1e-4
    rank: int = 32
    auc: bool = False
    models: tuple[str, ...] = ()
    image_size: int = 224
    repeats: int = 3
    targets: tuple[tuple[str, float], ...] = ()
    description: str = ""


DETECTOR_WORKLOADS: dict[str, DetectorWorkload] = {
    "imagenet-cpu": DetectorWorkload(
        "imagenet-cpu", "fit", 1_281_167, 50_000, 1024, 1000,
        targets=(("seconds", 300.0), ("peak_rss_bytes", 10 * GIB)),
        description="ImageNet-1k train-set count, 1024-d synthetic states, 1000 classes, K=1 full, "
                    "streamed fit + thresholds + scoring 50,000 held-out states"),
    "imagenet-width": DetectorWorkload(
        "imagenet-width", "fit", 128_000, 12_800, 4096, 100, estimators=("empirical", "ledoit-wolf"),
        auc=True, targets=(("seconds", 600.0), ("auc", 0.99)),
        description="1,280 states per class for 4096 features (ImageNet's ratio), 100 classes, K=1, "
                    "empirical and Ledoit-Wolf covariances; states of one class presented as another"),
    "detector-overhead": DetectorWorkload(
        "detector-overhead", "overhead", 2000, 64, 4096, 100, batch_size=16, models=("F", "vgg19"),
        targets=(("vgg19_overhead_fraction", 0.10),),
        description="detector.score(x) against model(x) on the same batch: Model F (1x28x28, 10 "
                    "classes) and torchvision's VGG19 (random weights, its last Linear's 4096-d input, "
                    "100 classes fitted on synthetic states)"),
}


def scaled_detector_workload(workload: DetectorWorkload, *, n_train: int | None = None,
                             n_test: int | None = None, n_features: int | None = None,
                             n_classes: int | None = None, batch_size: int | None = None,
                             scale: float | None = None, **changes: Any) -> DetectorWorkload:
    """``workload`` with some fields overridden; ``scale`` multiplies ``n_train`` and
    ``n_test`` (at least 2 training states and 1 held-out state per class)."""
    for key, value in (("n_train", n_train), ("n_test", n_test), ("n_features", n_features),
                       ("n_classes", n_classes), ("batch_size", batch_size)):
        if value is not None:
            changes[key] = value
    out = replace(workload, **changes)
    if scale is not None:
        out = replace(out, n_train=max(2 * out.n_classes, int(round(out.n_train * scale))),
                      n_test=max(out.n_classes, int(round(out.n_test * scale))))
    return out


# -- synthetic states ---------------------------------------------------------------------

class ClassStates:
    """Class-conditional synthetic hidden states ``μ_c + s_c z A + σ_c ⊙ ε`` (float32).

    ``A (rank, D)`` is shared, ``s_c`` and ``σ_c (D,)`` are per class, so every class has
    its own covariance ``s_c² AᵀA + diag(σ_c²)``. Where ``D >= n_classes`` the mean of
    class ``c`` is raised by ``margin`` at coordinate ``c``, which :class:`ClassCodeHead`
    reads as the class (a classifier that costs ``B x n_classes``).
    """

    def __init__(self, n_classes: int, n_features: int, *, rank: int = 32, seed: int = 0,
                 device: torch.device | str = "cpu", margin: float = 12.0) -> None:
        g = torch.Generator().manual_seed(seed)
        C, D, r = n_classes, n_features, min(rank, n_features)
        centres = torch.randn(C, D, generator=g)
        if D >= C:
            centres[torch.arange(C), torch.arange(C)] += margin
        self.device = torch.device(device)
        self.centres = centres.to(self.device)  # (C, D)
        self.factor = (torch.randn(r, D, generator=g) / r**0.5).to(self.device)  # (r, D)
        self.scales = (0.5 + 1.5 * torch.rand(C, generator=g)).to(self.device)  # (C,)
        self.noise = (0.3 + 0.7 * torch.rand(C, D, generator=g)).to(self.device)  # (C, D)

    def sample(self, labels: Tensor, generator: torch.Generator) -> Tensor:
        """States ``(B, D)`` of the classes ``labels (B,)`` (on the device)."""
        B, (r, D) = labels.shape[0], self.factor.shape
        z = torch.randn(B, r, generator=generator, device=self.device)  # (B, r)
        eps = torch.randn(B, D, generator=generator, device=self.device)  # (B, D)
        h = torch.addcmul(self.centres[labels], self.noise[labels], eps)  # (B, D)
        return h.addmm_(z * self.scales[labels, None], self.factor)


def _class_counts(n: int, n_classes: int) -> Tensor:
    counts = torch.full((n_classes,), n // n_classes, dtype=torch.int64)
    counts[: n % n_classes] += 1
    return counts


class SyntheticLoader:
    """A re-iterable loader of ``(states, labels)`` batches made on the fly.

    Labels are sorted by class (``'sorted'``: ``ImageFolder`` without shuffling) or in a
    fixed random order (``'shuffled'``); batch ``i`` is generated from its own seed, so every
    pass yields the same data and never more than one batch exists. Each pass records its
    start, end and generation seconds in :attr:`passes`.
    """

    def __init__(self, states: ClassStates, n: int, batch_size: int, *, order: str = "sorted",
                 seed: int = 0, labels: Tensor | None = None) -> None:
        C = states.centres.shape[0]
        if labels is None:
            labels = torch.repeat_interleave(torch.arange(C), _class_counts(n, C))
            if order == "shuffled":
                labels = labels[torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1))]
            elif order != "sorted":
                raise ValueError(f"order must be 'sorted' or 'shuffled'; got {order!r}")
        self.states, self.labels, self.batch_size, self.seed = states, labels.to(states.device), batch_size, seed
        self.passes: list[dict[str, float]] = []

    def __len__(self) -> int:
        return -(-self.labels.shape[0] // self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        device = self.states.device
        record = {"start": time.perf_counter(), "generate_seconds": 0.0, "batches": 0}
        self.passes.append(record)
        generator = torch.Generator(device=device)
        for index in range(len(self)):
            t0 = time.perf_counter()
            generator.manual_seed(self.seed * 1_000_003 + index)
            labels = self.labels[index * self.batch_size:(index + 1) * self.batch_size]
            x = self.states.sample(labels, generator)
            sync(device)
            record["generate_seconds"] += time.perf_counter() - t0
            record["batches"] += 1
            yield x, labels
        sync(device)
        record["end"] = time.perf_counter()


class ClassCodeHead(nn.Module):
    """Logits ``h[:, :n_classes]``: the class coded in the states by :class:`ClassStates`."""

    def __init__(self, n_classes: int) -> None:
        super().__init__()
        self.n_classes = n_classes
        self.register_buffer("scale", torch.ones(()))  # the model's device and dtype

    def forward(self, h: Tensor) -> Tensor:
        return h[:, :self.n_classes] * self.scale


def state_model(n_classes: int) -> nn.Module:
    """A classifier whose hidden state ``"head:input"`` is its input."""
    return nn.Sequential(OrderedDict([("state", nn.Identity()), ("head", ClassCodeHead(n_classes))]))


def memory_status() -> dict[str, int]:
    """``VmRSS`` and ``VmHWM`` (peak RSS) of this process in bytes (``{}`` off Linux)."""
    out = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


# -- one fit variant ----------------------------------------------------------------------

def _flops(w: DetectorWorkload) -> dict[str, float]:
    """Our count of each phase's floating-point work (multiply-adds count 2)."""
    N, T, C, D = float(w.n_train), float(w.n_test), float(w.n_classes), float(w.n_features)
    return {"moments_pass": 2 * N * D * D,  # per-class Gram matrices of the centred states
            "parameters": C * (D**3 / 3 + D**3),  # Cholesky and the triangular inverse per class
            "thresholds_pass": 2 * N * D * D,  # (h - μ_c) P_c under the true class
            "scoring": 2 * T * D * D}  # under the predicted class


def _all_finite(t: Tensor, block_bytes: int = 2**26) -> bool:
    """Whether every value of ``t`` is finite, checked in blocks of rows (``torch.isfinite`` of
    a whole 4 GB tensor would take another 7 GB of temporaries)."""
    flat = t.reshape(t.shape[0], -1) if t.ndim > 1 else t.reshape(-1, 1)
    step = max(1, block_bytes // max(1, flat.shape[1] * flat.element_size()))
    return all(bool(torch.isfinite(flat[i:i + step]).all()) for i in range(0, flat.shape[0], step))


def _fit_variant(spec: dict[str, Any]) -> dict[str, Any]:
    """One fit, thresholds and held-out scoring of a ``'fit'`` workload (this process)."""
    from idefender_gpu import IDefender
    from idefender_gpu.metrics import roc_auc_score

    w = DetectorWorkload(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec["workload"].items()})
    device, order, estimator, seed = torch.device(spec["device"]), spec["order"], spec["estimator"], spec["seed"]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    memory: dict[str, Any] = {"start": memory_status()}
    states = ClassStates(w.n_classes, w.n_features, rank=w.rank, seed=seed, device=device)
    model = state_model(w.n_classes).to(device)
    loader = SyntheticLoader(states, w.n_train, w.batch_size, order=order, seed=seed)
    detector = IDefender(model, layers="head:input", n_components=1, covariance_estimator=estimator,
                         reg_covar=w.reg_covar, progress=False)
    t_fit = time.perf_counter()
    detector.fit(loader)
    sync(device)
    t_end = time.perf_counter()
    memory["after_fit"] = memory_status()
    first, second = loader.passes[0], loader.passes[1]
    seconds = {"moments_pass": first["end"] - t_fit, "parameters": second["start"] - first["end"],
               "thresholds_pass": t_end - second["start"]}
    generate = {"moments_pass": first["generate_seconds"], "thresholds_pass": second["generate_seconds"]}
    # held-out states: uniformly random classes (a batch touches many classes)
    g = torch.Generator().manual_seed(seed + 2)
    test_labels = torch.randint(0, w.n_classes, (w.n_test,), generator=g)
    # scored score_batch_size at a time (default: all 50,000 in one call): every call reads the
    # factors of almost every class, so smaller calls cost more (detector-overhead times one batch)
    test = SyntheticLoader(states, w.n_test, w.score_batch_size, seed=seed + 3, labels=test_labels)
    scores, predicted, labels, wrong_scores, wrong_classes, score_s, wrong_s = [], [], [], [], [], 0.0, 0.0
    for x, y in test:
        dt, s = clock(lambda: detector.score(x), device)
        score_s += dt
        scores.append(s)
        with torch.no_grad():
            predicted.append(model(x).argmax(1))
        labels.append(y)
        if w.auc:  # the same states presented as another class, scored under it
            other = (y + torch.randint(1, w.n_classes, y.shape, generator=g).to(y.device)) % w.n_classes
            with torch.no_grad():
                dt, s = clock(lambda: detector.log_density(x, classes=other), device)
            wrong_s += dt
            wrong_scores.append(s)
            wrong_classes.append(other)
    generate["scoring"] = test.passes[0]["generate_seconds"]
    seconds["scoring"] = score_s + generate["scoring"]  # like the passes: the data's making included
    memory["after_scoring"] = memory_status()
    scores, predicted, labels = torch.cat(scores), torch.cat(predicted), torch.cat(labels)
    thresholds = detector.thresholds_.to(scores.device)
    finite = {"means": all(_all_finite(t) for t in detector.means_.values()),
              "precisions_cholesky": all(_all_finite(t) for t in detector.precisions_cholesky_.values()),
              "thresholds": _all_finite(thresholds), "scores": _all_finite(scores)}
    quality: dict[str, Any] = {
        "classifier_accuracy": float((predicted == labels).float().mean()),
        "natural_reject_rate": float((scores < thresholds[predicted]).float().mean()),
        "keep": float(detector.keep_),
    }
    if w.auc:
        wrong, other = torch.cat(wrong_scores), torch.cat(wrong_classes)
        finite["wrong_class_scores"] = _all_finite(wrong)
        both = torch.cat([scores, wrong]).double().cpu()
        is_wrong = torch.cat([torch.zeros_like(scores), torch.ones_like(wrong)]).cpu()
        # -score: lower log-density = more likely presented as the wrong class; -inf ranks last
        quality["auc_wrong_class"] = float(roc_auc_score(-torch.nan_to_num(both, neginf=-1e300), is_wrong))
        quality["wrong_class_reject_rate"] = float((wrong < thresholds[other]).float().mean())
        quality["wrong_class_scoring_seconds"] = wrong_s
    flops = _flops(w)
    phases = {}
    for name, s in seconds.items():
        gen = generate.get(name, 0.0)
        phases[name] = {"seconds": s, "data_generation_seconds": gen, "flops": flops[name],
                        "gflops": flops[name] / s / 1e9 if s > 0 else None,
                        "gflops_without_generation": flops[name] / (s - gen) / 1e9 if s - gen > 0 else None}
    result = {"order": order, "estimator": estimator, "phases": phases,
              "fit_seconds": t_end - t_fit, "total_seconds": sum(seconds.values()),
              "seconds_without_generation": sum(seconds.values()) - sum(generate.values()),
              "finite": finite, "all_finite": all(finite.values()), "quality": quality,
              "memory": memory, "peak_rss_bytes": memory_status().get("VmHWM"),
              "parameter_bytes": w.n_classes * w.n_features * (w.n_features + 1) * 4,
              "state_bytes": w.n_train * w.n_features * 4}
    if device.type == "cuda":
        result["cuda_max_memory_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    return result


def _runner_main(spec_path: str, out_path: str) -> None:
    """Entry point of a variant's subprocess."""
    spec = json.loads(Path(spec_path).read_text())
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    Path(out_path).write_text(json.dumps(_fit_variant(spec)))


def _in_subprocess(spec: dict[str, Any], timeout: float | None) -> dict[str, Any]:
    """:func:`_fit_variant` in a fresh process (its own peak RSS); its ``ru_maxrss`` added."""
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_path.write_text(json.dumps(spec))
        code = ("import sys; from idefender_gpu.bench.detector_workloads import _runner_main; "
                "_runner_main(*sys.argv[1:])")
        with open(Path(tmp) / "log.txt", "w+") as log:
            proc = subprocess.Popen([sys.executable, "-c", code, str(spec_path), str(out_path)],
                                    stdout=log, stderr=subprocess.STDOUT)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                return {"error": f"timed out after {timeout:.0f} s"}
            log.seek(0)
            tail = log.read()[-2000:]
        if proc.returncode != 0:
            return {"error": f"subprocess failed ({proc.returncode}): {tail}"}
        return json.loads(out_path.read_text())


# -- score against forward ------------------------------------------------------------------

def _best_seconds(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up
    return min(clock(fn, device)[0] for _ in range(repeats))


def _overhead_of(model: nn.Module, detector: Any, x: Tensor, device: torch.device, repeats: int) -> dict[str, Any]:
    with torch.no_grad():
        forward = _best_seconds(lambda: model(x), device, repeats)
    score = _best_seconds(lambda: detector.score(x), device, repeats)
    return {"batch": int(x.shape[0]), "input_shape": list(x.shape[1:]), "forward_seconds": forward,
            "score_seconds": score, "score_over_forward": score / forward,
            "overhead_fraction": (score - forward) / forward, "repeats": repeats}


def _overhead_model_f(w: DetectorWorkload, device: torch.device, seed: int) -> dict[str, Any]:
    """Model F (random weights) on 1x28x28 inputs, 10 classes, fitted on random images."""
    from idefender_gpu import IDefender
    from idefender_gpu.models import ModelF

    torch.manual_seed(seed)
    model = ModelF(10).to(device).eval()
    g = torch.Generator().manual_seed(seed)
    n = max(20, w.n_train)
    x = torch.rand(n, 1, 28, 28, generator=g)
    y = torch.arange(n) % 10
    batches = [(x[i:i + 256].to(device), y[i:i + 256].to(device)) for i in range(0, n, 256)]
    detector = IDefender(model, n_components=1, progress=False).fit(batches)
    xb = torch.rand(max(w.batch_size, 1) * 16, 1, 28, 28, generator=g).to(device)
    out = _overhead_of(model, detector, xb, device, w.repeats)
    out.update(layer=detector.layers_[0], n_features=detector.n_features_[detector.layers_[0]], n_classes=10,
               fitted_on="random 1x28x28 images with balanced labels")
    return out


class _HeadView(nn.Module):
    """``classifier.6`` of VGG19 (the same module) behind identities: its input is the input."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.classifier = nn.Sequential(*[nn.Identity() for _ in range(6)], head)

    def forward(self, h: Tensor) -> Tensor:
        return self.classifier(h)


def _overhead_vgg19(w: DetectorWorkload, device: torch.device, seed: int) -> dict[str, Any]:
    """torchvision's VGG19 with ``n_classes`` outputs (random weights, no download)."""
    from idefender_gpu import IDefender

    try:
        import torchvision
    except ImportError as exc:
        return {"skipped": f"torchvision is not installed ({exc}); README's install has it "
                           "(pip install torchvision==0.29.1)"}
    torch.manual_seed(seed)
    vgg = torchvision.models.vgg19(weights=None, num_classes=w.n_classes).to(device).eval()
    head = vgg.classifier[6]  # Linear(4096, n_classes): the detector models its input
    # The Gaussians are fitted on synthetic 4096-d states through a view of VGG19 that shares its
    # last Linear under the same name (the convolutional part would cost ~20 GFLOP per training
    # image), then the detector is bound to the full VGG19: only scoring is measured.
    view = _HeadView(head)
    states = ClassStates(w.n_classes, head.in_features, rank=w.rank, seed=seed, device=device)
    loader = SyntheticLoader(states, max(2 * w.n_classes, w.n_train), 1024, seed=seed)
    detector = IDefender(view, layers="classifier.6:input", n_components=1, reg_covar=w.reg_covar,
                         progress=False).fit(loader)
    detector.model = vgg
    detector.input_shape_ = (3, w.image_size, w.image_size)
    x = torch.rand(w.batch_size, 3, w.image_size, w.image_size,
                   generator=torch.Generator().manual_seed(seed)).to(device)
    out = _overhead_of(vgg, detector, x, device, w.repeats)
    out.update(layer="classifier.6:input", n_features=head.in_features, n_classes=w.n_classes,
               fitted_on=f"{loader.labels.shape[0]} synthetic states through a view sharing VGG19's last Linear")
    return out


# -- entry point -----------------------------------------------------------------------------

def run_detector_workload(workload: DetectorWorkload | str, *, device: str | torch.device | None = None,
                          seed: int = 0, isolate: bool = True, orders: tuple[str, ...] | None = None,
                          estimators: tuple[str, ...] | None = None, limit_minutes: float | None = None,
                          probe: bool = True) -> dict[str, Any]:
    """Run one detector workload; a JSON-able record (``benchmark: 'detector_workload'``).

    Parameters
    ----------
    workload : DetectorWorkload or str
        One of :data:`DETECTOR_WORKLOADS` (or a scaled copy).
    device : str or torch.device, optional
        Default CUDA if available.
    seed : int
    isolate : bool, default=True
        Each fit variant in a fresh subprocess (its own peak RSS); False: in this process
        (tests; peaks then include what ran before).
    orders, estimators : tuple of str, optional
        The variants of a ``'fit'`` workload (default the workload's).
    limit_minutes : float, optional
        Time limit of one variant's subprocess.
    probe : bool, default=True
        Measure the dense float32 matmul rate of the device (``matmul_probe``).
    """
    w = DETECTOR_WORKLOADS[workload] if isinstance(workload, str) else workload
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    record: dict[str, Any] = {"benchmark": "detector_workload", "machine": machine_info(device),
                              "workload": {**asdict(w), "dtype": "float32", "seed": seed},
                              "targets": dict(w.targets)}
    t0 = time.perf_counter()
    if probe:  # the default probe shape for the full-size workloads, a small one for tiny ones
        record["matmul_probe"] = matmul_probe(device, size=None if w.n_features >= 1024 else 256)
    rate = record.get("matmul_probe", {}).get("gflops")
    results: dict[str, Any] = {}
    if w.kind == "fit":
        for order in orders or w.orders:
            for estimator in estimators or w.estimators:
                name = f"{order}/{estimator}"
                logger.info("%s %s: fit, thresholds, scoring", w.name, name)
                spec = {"workload": asdict(w), "device": str(device), "order": order, "estimator": estimator,
                        "seed": seed, "threads": torch.get_num_threads()}
                timeout = None if limit_minutes is None else 60.0 * limit_minutes
                result = _in_subprocess(spec, timeout) if isolate else _fit_variant(spec)
                if rate and "phases" in result:
                    for phase in result["phases"].values():
                        if phase["gflops"] is not None:
                            phase["fraction_of_matmul_peak"] = phase["gflops"] / rate
                if "total_seconds" in result:
                    logger.info("%s %s: %.1f s, peak RSS %.2f GiB", w.name, name, result["total_seconds"],
                                (result.get("peak_rss_bytes") or 0) / GIB)
                results[name] = result
        record["checks"] = _checks(w, results)
    else:
        builders = {"F": _overhead_model_f, "vgg19": _overhead_vgg19}
        for name in w.models:
            logger.info("%s %s: score against forward", w.name, name)
            try:
                results[name] = builders[name](w, device, seed)
            except Exception as exc:  # noqa: BLE001 - recorded, the other model goes on
                results[name] = {"error": f"{type(exc).__name__}: {exc}"}
        vgg = results.get("vgg19", {})
        if "overhead_fraction" in vgg:
            record["checks"] = {"vgg19_overhead_fraction": vgg["overhead_fraction"],
                                "vgg19_overhead_within_target": vgg["overhead_fraction"] <= 0.10}
    record["results"] = results
    record["wall_seconds"] = time.perf_counter() - t0
    return record


def _checks(w: DetectorWorkload, results: dict[str, Any]) -> dict[str, Any]:
    """Each variant against the workload's targets."""
    targets = dict(w.targets)
    out: dict[str, Any] = {}
    for name, r in results.items():
        if "error" in r:
            out[name] = {"error": r["error"]}
            continue
        check: dict[str, Any] = {"all_finite": r["all_finite"]}
        if "seconds" in targets:
            check["seconds_within_target"] = r["total_seconds"] <= targets["seconds"]
        if "peak_rss_bytes" in targets and r.get("peak_rss_bytes"):
            check["peak_rss_within_target"] = r["peak_rss_bytes"] <= targets["peak_rss_bytes"]
        if "auc" in targets and "auc_wrong_class" in r["quality"]:
            check["auc_within_target"] = r["quality"]["auc_wrong_class"] >= targets["auc"]
        out[name] = check
    return out
