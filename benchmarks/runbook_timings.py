"""Per-step timings for README's GPU runbook (issue 14, item 5), in one short run.

Each step measures a throughput after a warm-up (CUDA synchronised around every clock
read) under its own time cap, then extrapolates it to the full pipeline. An extrapolation
is arithmetic on the measured rate (its formula and inputs are in the record), never a
measurement. Steps (``--steps``, comma-separated, default all):

* ``wrn-train``: ``train_classifier`` (SGD Nesterov, batch 128, AMP on CUDA: the recipe of
  ``idefender-gpu train``) on stand-in CIFAR-10 batches, WRN-34-8 and WRN-46-8; seconds per
  step from two runs of different lengths (their difference cancels the call's setup) ->
  one 50,000-image epoch and the 200-epoch schedule. A whole epoch when it fits the cap.
* ``wrn-features``: eval forward of WRN-34-8 with the detector's hook (``fc:input``, 512
  features) -> CIFAR-10's 50,000 training + 10,000 test images.
* ``vgg19-forward``: torchvision's VGG19 (random weights, nothing downloads), 224x224,
  float32, hook ``classifier.6:input`` -> one pass over ImageNet's 1,281,167 training images,
  the detector fit's two passes, the 50,000 validation images.
* ``vgg19-attack-step``: forward + backward to the input of VGG19 (one iterative attack step)
  -> Table 9's crafting: ``n_attack`` x 3 alphas x (10 Iter-Linf + 10 Iter-L2 + 1 FGSM) steps.
* ``jpeg-decode``: seeded JPEGs of ImageNet's typical size (500x375, quality 90) written in
  the class-folder layout in a temporary folder, read by a DataLoader over
  ``idefender_gpu.data.imagenet_folder(root, "train", transform="eval")`` with 0 and W
  workers -> one pass over 1,281,167 images with 16 workers (the H200 machine's cores).
* ``detector-fit``: IDefender (K=1, full) streamed fit at D = 4096 on synthetic states, 1,281
  per class (``idefender_gpu.bench``'s ``imagenet-width`` workload, scaled to a slice of the
  classes, in its own process) -> seconds per class of each phase -> 1000 classes.

Usage (JSON to ``--out``, rewritten after each step; a table on stdout; exit status 1 when
a step failed or was skipped)::

    python benchmarks/runbook_timings.py --device cuda --out runbook_timings.json   # ~80 s on one H200
    python benchmarks/runbook_timings.py --device cpu --threads 2 --out runbook_cpu.json  # ~2.5-3 min
    python benchmarks/runbook_timings.py --quick        # a few seconds: tiny models, a smoke run
    python benchmarks/runbook_timings.py --summary runbook_timings.json   # one line of a record

Caps per step: :data:`CAPS` (``--cap-s`` sets them all; ``--budget-s`` shrinks them to what
the whole run has left). Sizes per profile (``cuda``, ``cpu``, ``quick``): :data:`SIZES`.
``--quick`` uses tiny models and sizes (WRN-10-1 for every network, 32x32 inputs, D = 32),
so its numbers say nothing about the runbook. ``benchmarks/gpu_check.sh`` runs the CUDA
line (``--budget-s 85``) as its last step. Do not put a record in ``benchmarks/results/``
itself (its ``*.json`` are the bench harness's records): use a sub-folder.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

_STARTED = time.perf_counter()  # before torch's import: --budget-s counts it

import torch  # noqa: E402
from torch import nn  # noqa: E402

_ROOT = str(Path(__file__).resolve().parents[1])
sys.path.insert(0, _ROOT)  # this checkout's package, however the script is run
from idefender_gpu.bench.detector_workloads import memory_status  # noqa: E402
from idefender_gpu.bench.timing import machine_info, sync  # noqa: E402

STEPS = ("wrn-train", "wrn-features", "vgg19-forward", "vgg19-attack-step", "jpeg-decode", "detector-fit")

#: The full pipeline's counts the extrapolations use.
PIPELINE = {
    "cifar10_train": 50_000, "cifar10_test": 10_000, "wrn_epochs": 200, "wrn_batch": 128,
    "imagenet_train": 1_281_167, "imagenet_val": 50_000, "imagenet_classes": 1000,
    "fit_passes": 2,  # the K=1 detector fit: moments pass, then thresholds pass
    "table9_alphas": 3, "table9_steps_per_alpha": 10 + 10 + 1,  # Iter-Linf, Iter-L2 (10 steps), FGSM (1)
    "n_attack": 1000,  # the reproduce commands' default --n-attack
    "decode_workers": 16,  # the H200 machine's CPU cores
}

#: Sizes per profile: 'cuda' (one H200, ~90 s), 'cpu' (2 cores, ~2-3 min), 'quick' (a smoke run).
SIZES: dict[str, dict[str, dict[str, Any]]] = {
    "cuda": {
        "wrn-train": {"models": ("wrn-34-8", "wrn-46-8"), "batch": 128, "warmup": 3, "probe": 5},
        "wrn-features": {"model": "wrn-34-8", "batch": 512, "warmup": 3},
        "vgg19-forward": {"model": "vgg19", "image": 224, "batch": 64, "warmup": 2},
        "vgg19-attack-step": {"model": "vgg19", "image": 224, "batch": 32, "warmup": 2},
        "jpeg-decode": {"images": 384, "batch": 16, "workers": 8},
        "detector-fit": {"classes": 100, "features": 4096, "per_class": 1281},
    },
    "cpu": {
        "wrn-train": {"models": ("wrn-34-8", "wrn-46-8"), "batch": 8, "warmup": 1, "probe": 1, "max_steps": 40},
        "wrn-features": {"model": "wrn-34-8", "batch": 16, "warmup": 1},
        "vgg19-forward": {"model": "vgg19", "image": 224, "batch": 2, "warmup": 1},
        "vgg19-attack-step": {"model": "vgg19", "image": 224, "batch": 2, "warmup": 1},
        "jpeg-decode": {"images": 128, "batch": 16, "workers": 2},
        "detector-fit": {"classes": 2, "features": 4096, "per_class": 1281},
    },
    "quick": {
        "wrn-train": {"models": ("wrn-10-1",), "batch": 8, "warmup": 1, "probe": 1, "max_steps": 3,
                      "min_run_steps": 3},  # always a second run: the two-run method is tested
        "wrn-features": {"model": "wrn-10-1", "batch": 16, "warmup": 1, "max_iters": 2},
        "vgg19-forward": {"model": "wrn-10-1", "image": 32, "batch": 4, "warmup": 1, "max_iters": 2},
        "vgg19-attack-step": {"model": "wrn-10-1", "image": 32, "batch": 4, "warmup": 1, "max_iters": 2},
        "jpeg-decode": {"images": 12, "batch": 4, "workers": 1, "max_passes": 1},
        "detector-fit": {"classes": 3, "features": 32, "per_class": 1281},
    },
}
#: Default cap of each step, in seconds, per profile (setup included).
CAPS = {"cuda": {"wrn-train": 20, "wrn-features": 7, "vgg19-forward": 9, "vgg19-attack-step": 8,
                 "jpeg-decode": 10, "detector-fit": 18},  # 72 s: gpu_check.sh gives the script 90 s
        "cpu": {"wrn-train": 60, "wrn-features": 12, "vgg19-forward": 15, "vgg19-attack-step": 15,
                "jpeg-decode": 20, "detector-fit": 40},
        "quick": {step: 5 for step in STEPS}}
JPEG_SIZE = (375, 500)  # (H, W): ImageNet's typical image
JPEG_QUALITY = 90
EXTRAPOLATION = "extrapolation"


# -- helpers ---------------------------------------------------------------------------------

class Step:
    """What one step knows: device, sizes, its deadline, the run's options."""

    def __init__(self, name: str, device: torch.device, sizes: dict[str, Any], cap: float,
                 args: argparse.Namespace, shared: dict[str, Any]) -> None:
        self.name, self.device, self.sizes, self.cap, self.args, self.shared = name, device, sizes, cap, args, shared
        self.start = time.perf_counter()
        self.deadline = self.start + cap

    def left(self) -> float:
        return self.deadline - time.perf_counter()


def extrapolate(what: str, seconds: float, formula: str, **inputs: Any) -> dict[str, Any]:
    """One extrapolation entry: arithmetic on measured rates, labelled as such."""
    return {"kind": EXTRAPOLATION, "what": what, "seconds": seconds, "formula": formula, "inputs": inputs}


def timed_loop(fn: Callable[[], Any], step: Step, *, warmup: int, max_iters: int | None = None,
               min_iters: int = 1, share: float = 1.0) -> dict[str, Any]:
    """Seconds of ``fn()`` repeated after ``warmup`` untimed calls, until ``share`` of the step's
    time left is spent (at least ``min_iters``, at most ``max_iters`` calls). The host's clock
    decides when to stop; the interval is read after a device synchronisation."""
    for _ in range(warmup):
        fn()
    sync(step.device)
    stop = time.perf_counter() + max(0.0, share * step.left())
    iters, t0 = 0, time.perf_counter()
    while iters < min_iters or (time.perf_counter() < stop and (max_iters is None or iters < max_iters)):
        fn()
        iters += 1
    sync(step.device)
    return {"seconds": time.perf_counter() - t0, "iterations": iters, "warmup_iterations": warmup}


def build(name: str, device: torch.device, **kwargs: Any) -> nn.Module:
    """``build_model(name)`` with its parameters made (and initialised) on ``device``."""
    from idefender_gpu.models import build_model

    with torch.device(device):
        return build_model(name, **kwargs).to(device)


def shared_model(step: Step, name: str) -> nn.Module:
    """One model per name for the run (VGG19 is built once for its two steps)."""
    key = ("model", name)
    if key not in step.shared:
        step.shared[key] = build(name, step.device)
    return step.shared[key]


def forward_flops(name: str, image: int) -> float | None:
    """Floating-point operations of one image's forward pass through ``build_model(name)``
    (``torch.utils.flop_counter``, multiply-adds counted 2, on the meta device: nothing is
    computed); None where the counter fails."""
    from torch.utils.flop_counter import FlopCounterMode

    try:
        with torch.device("meta"):
            model = build(name, torch.device("meta")).eval()
            x = torch.empty(1, 3, image, image)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(x)
        return float(counter.get_total_flops())
    except Exception:  # noqa: BLE001 - a figure for context only
        return None


def with_flops(entry: dict[str, Any], name: str, image: int, rate: float, factor: float = 1.0,
               what: str = "forward") -> None:
    """Add the model's forward FLOPs per image and the rate they imply (``factor`` x forward
    for training or attack steps: an approximation, said so)."""
    flops = forward_flops(name, image)
    if flops:
        entry["forward_gflop_per_image"] = flops / 1e9
        entry["achieved_tflops"] = factor * flops * rate / 1e12
        entry["achieved_tflops_counts"] = what


def precision_flags(device: torch.device) -> dict[str, Any]:
    """The float32 paths of this run: TF32 for convolutions (cuDNN) and for matmuls."""
    flags = {"dtype": "float32"}
    if device.type == "cuda":
        flags.update(cudnn_allow_tf32=bool(torch.backends.cudnn.allow_tf32),
                     cuda_matmul_allow_tf32=bool(torch.backends.cuda.matmul.allow_tf32),
                     float32_matmul_precision=torch.get_float32_matmul_precision(),
                     cudnn_benchmark=bool(torch.backends.cudnn.benchmark))
    return flags


# -- steps -------------------------------------------------------------------------------------

def _train_run(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, step: Step) -> float:
    from idefender_gpu.models._train import TrainConfig, train_classifier

    config = TrainConfig(epochs=1, batch_size=step.sizes["batch"])
    sync(step.device)
    t0 = time.perf_counter()
    train_classifier(model, x[: steps * config.batch_size], y[: steps * config.batch_size], config,
                     device=step.device, max_steps=steps, progress=False)
    sync(step.device)
    return time.perf_counter() - t0


def step_wrn_train(step: Step) -> dict[str, Any]:
    """``train_classifier`` runs of growing length per model: a warm-up run, a probe of ``probe``
    steps, then runs as long as the model's share of the cap allows (at most a whole epoch),
    each sized from the rate of the runs before it (with a 1.2 margin). The difference of
    the last two runs over their difference in steps is the time of one step without the
    call's setup (re-initialisation, optimizer, the batch order)."""
    from idefender_gpu.data import stand_in_dataset

    sizes, device = step.sizes, step.device
    batch, epoch_steps = sizes["batch"], math.ceil(PIPELINE["cifar10_train"] / sizes["batch"])
    max_steps = min(epoch_steps, sizes.get("max_steps", epoch_steps))
    n_images = min(PIPELINE["cifar10_train"], max_steps * batch)
    base = stand_in_dataset("cifar10", n_train=min(2048, n_images), n_test=1)
    repeats = math.ceil(n_images / base.x_train.shape[0])
    x = base.x_train.to(device).repeat(repeats, 1, 1, 1)[:n_images]  # stand-in batches, on the device
    y = base.y_train.to(device).repeat(repeats)[:n_images]
    out: dict[str, Any] = {"batch": batch, "data": "stand-in CIFAR-10 images (seeded, repeated), 3x32x32",
                           "amp": device.type == "cuda", "models": {}}
    models = sizes["models"]
    for index, name in enumerate(models):
        share_end = time.perf_counter() + step.left() / (len(models) - index)
        model = build(name, device)
        warm_s = _train_run(model, x, y, sizes["warmup"], step)
        runs = [(sizes["probe"], _train_run(model, x, y, sizes["probe"], step))]
        while runs[-1][0] < max_steps:
            (n, t), previous = runs[-1], runs[-2] if len(runs) > 1 else None
            per_step = t / n if previous is None else max(t - previous[1], 1e-9) / (n - previous[0])
            setup = 0.0 if previous is None else max(0.0, t - n * per_step)
            fits = int((share_end - time.perf_counter() - setup) / (1.2 * per_step))
            n_next = min(max_steps, max(fits, sizes.get("min_run_steps", 0) if len(runs) == 1 else 0))
            if n_next <= n:
                break
            runs.append((n_next, _train_run(model, x, y, n_next, step)))
        entry: dict[str, Any] = {"parameters": sum(p.numel() for p in model.parameters()),
                                 "warmup": {"steps": sizes["warmup"], "seconds": warm_s},
                                 "runs": [{"steps": n, "seconds": t} for n, t in runs],
                                 "whole_epoch": runs[-1][0] == epoch_steps}
        if len(runs) > 1:
            (n1, t1), (n2, t2) = runs[-2], runs[-1]
            per_step = max(t2 - t1, 1e-9) / (n2 - n1)
            entry["method"] = "two runs: (last run's seconds - the one before's) / (their difference in steps)"
        else:
            per_step = runs[0][1] / runs[0][0]
            entry["method"] = "one run: probe seconds / probe steps (no time for a longer run; setup included)"
        rate = batch / per_step
        entry.update(seconds_per_step=per_step, images_per_second=rate)
        with_flops(entry, name, 32, rate, 3.0, "3 x forward (forward + backward, approximately)")
        entry["extrapolated"] = [
            extrapolate("one 50,000-image epoch", epoch_steps * per_step, "ceil(50000 / batch) * seconds_per_step",
                        steps=epoch_steps, seconds_per_step=per_step),
            extrapolate("the 200-epoch schedule (training steps only, no per-epoch test pass or saves)",
                        PIPELINE["wrn_epochs"] * epoch_steps * per_step,
                        "200 * ceil(50000 / batch) * seconds_per_step", epochs=PIPELINE["wrn_epochs"],
                        steps=epoch_steps, seconds_per_step=per_step)]
        if batch != PIPELINE["wrn_batch"]:
            entry["note"] = f"batch {batch}, not the recipe's {PIPELINE['wrn_batch']}: a CPU figure"
        out["models"][name] = entry
        del model
    return out


def _forward_rate(step: Step, model: nn.Module, batch: int, image: int, layer: str) -> dict[str, Any]:
    from idefender_gpu.features import attach

    x = torch.rand(batch, 3, image, image, generator=torch.Generator().manual_seed(0)).to(step.device)
    model.eval()
    with attach(model, layer) as hooks, torch.no_grad():
        def forward() -> None:
            model(x)
            hooks.pop()

        timing = timed_loop(forward, step, warmup=step.sizes["warmup"], max_iters=step.sizes.get("max_iters"))
    timing.update(batch=batch, image=image, layer=layer,
                  images_per_second=batch * timing["iterations"] / timing["seconds"],
                  **precision_flags(step.device))
    return timing


def step_wrn_features(step: Step) -> dict[str, Any]:
    from idefender_gpu.models import hidden_layer

    name = step.sizes["model"]
    out = _forward_rate(step, build(name, step.device), step.sizes["batch"], 32, hidden_layer(name))
    rate, n = out["images_per_second"], PIPELINE["cifar10_train"] + PIPELINE["cifar10_test"]
    with_flops(out, name, 32, rate)
    out["model"] = name
    out["extrapolated"] = [extrapolate("hidden states of CIFAR-10's 50,000 train + 10,000 test images, one model",
                                       n / rate, "(50000 + 10000) / images_per_second", images=n,
                                       images_per_second=rate)]
    return out


def step_vgg19_forward(step: Step) -> dict[str, Any]:
    from idefender_gpu.models import hidden_layer

    name, sizes = step.sizes["model"], step.sizes
    out = _forward_rate(step, shared_model(step, name), sizes["batch"], sizes["image"], hidden_layer(name))
    rate, n_train, n_val = out["images_per_second"], PIPELINE["imagenet_train"], PIPELINE["imagenet_val"]
    out["model"] = name
    with_flops(out, name, sizes["image"], rate)
    out["extrapolated"] = [
        extrapolate("one pass over ImageNet's 1,281,167 training images (network only, decoding apart)",
                    n_train / rate, "1281167 / images_per_second", images=n_train, images_per_second=rate),
        extrapolate("one model's I-defender fit: moments pass + thresholds pass, no state cache",
                    PIPELINE["fit_passes"] * n_train / rate, "2 * 1281167 / images_per_second",
                    passes=PIPELINE["fit_passes"], images=n_train, images_per_second=rate),
        extrapolate("Table 9's two VGG19s (Source, Target): their fits + the 50,000 validation images each",
                    2 * (PIPELINE["fit_passes"] * n_train + n_val) / rate,
                    "2 * (2 * 1281167 + 50000) / images_per_second", models=2, images_per_second=rate)]
    return out


def step_vgg19_attack_step(step: Step) -> dict[str, Any]:
    name, sizes, device = step.sizes["model"], step.sizes, step.device
    model = shared_model(step, name).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(sizes["batch"], 3, sizes["image"], sizes["image"], generator=g).to(device)
    with torch.no_grad():
        n_classes = model(x[:1]).shape[1]
    y = torch.randint(0, n_classes, (sizes["batch"],), generator=g).to(device)

    def attack_step() -> None:
        xa = x.detach().requires_grad_(True)
        loss = nn.functional.cross_entropy(model(xa), y)
        torch.autograd.grad(loss, xa)

    out = timed_loop(attack_step, step, warmup=sizes["warmup"], max_iters=sizes.get("max_iters"))
    rate = sizes["batch"] * out["iterations"] / out["seconds"]
    n_attack = step.args.n_attack
    steps = n_attack * PIPELINE["table9_alphas"] * PIPELINE["table9_steps_per_alpha"]
    out.update(model=name, batch=sizes["batch"], image=sizes["image"], image_steps_per_second=rate,
               **precision_flags(device))
    with_flops(out, name, sizes["image"], rate, 2.0, "2 x forward (forward + backward to the input, approximately)")
    out["extrapolated"] = [extrapolate(
        f"Table 9's crafting on Source: {n_attack} images x 3 alphas x (10 + 10 + 1) steps (the detector's "
        "term of Eq. 6 not counted)", steps / rate, "n_attack * 3 * 21 / image_steps_per_second",
        n_attack=n_attack, image_steps=steps, image_steps_per_second=rate)]
    return out


def _write_jpeg(root: Path, index: int, seed: int) -> int:
    """Image ``index``: two octaves of upsampled uniform noise plus per-pixel noise (seeded by
    ``(seed, index)``; about 90 KB at quality 90, ImageNet's files average about 110 KB), in
    ``root/train/<one of 4 class folders>/``. Returns its size in bytes."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    height, width = JPEG_SIZE
    image = 0.25 * torch.rand(1, 3, height, width, generator=g)
    for cells, weight in ((4, 0.45), (32, 0.35)):
        noise = torch.rand(1, 3, max(1, cells * height // width), cells, generator=g)
        image += weight * nn.functional.interpolate(noise, size=(height, width), mode="bilinear",
                                                    align_corners=False)
    pixels = (image[0].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    path = root / "train" / f"n{index % 4:08d}" / f"image_{index:05d}.JPEG"
    Image.fromarray(pixels).save(path, quality=JPEG_QUALITY)
    return path.stat().st_size


def _write_jpegs(root: Path, n: int, seed: int = 0) -> dict[str, Any]:
    """``n`` JPEGs of ``JPEG_SIZE`` (:func:`_write_jpeg`) in the class-folder layout, written by
    a pool of threads (torch and PIL release the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    for c in range(4):
        (root / "train" / f"n{c:08d}").mkdir(parents=True, exist_ok=True)
    t0, threads = time.perf_counter(), torch.get_num_threads()
    torch.set_num_threads(1)  # one intra-op thread per writer thread
    try:
        with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
            sizes = list(pool.map(lambda i: _write_jpeg(root, i, seed), range(n)))
    finally:
        torch.set_num_threads(threads)
    return {"images": n, "size_hw": list(JPEG_SIZE), "quality": JPEG_QUALITY, "mean_bytes": sum(sizes) / max(1, n),
            "content": "seeded noise: 2 upsampled octaves + per-pixel noise", "write_seconds": time.perf_counter() - t0}


def _loader_rate(dataset: Any, workers: int, batch: int, step: Step, share: float) -> dict[str, Any]:
    """Images per second of a DataLoader over ``dataset`` with ``workers`` workers, after a
    warm-up (one pass with persistent workers; one batch with none), for ``share`` of the
    step's time left (whole passes with workers). With no worker the decoding runs here with
    one torch thread, as in a DataLoader worker."""
    from torch.utils.data import DataLoader

    loader = DataLoader(dataset, batch_size=batch, num_workers=workers, persistent_workers=workers > 0)
    threads = torch.get_num_threads()
    try:
        if workers:
            for _ in loader:
                pass
        else:
            torch.set_num_threads(1)
            next(iter(loader))
        stop = time.perf_counter() + max(0.0, share * step.left())
        images, passes, t0 = 0, 0, time.perf_counter()
        while images == 0 or (time.perf_counter() < stop and passes < step.sizes.get("max_passes", 10**6)):
            passes += 1
            for xb, _ in loader:
                images += xb.shape[0]
                if workers == 0 and time.perf_counter() >= stop and images >= 2 * batch:
                    break
        seconds = time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)
        del loader  # stops persistent workers
    rate = images / seconds
    return {"workers": workers, "images": images, "passes": passes, "seconds": seconds, "images_per_second": rate,
            "images_per_second_per_worker": rate / max(1, workers)}


def step_jpeg_decode(step: Step) -> dict[str, Any]:
    from idefender_gpu.data import imagenet_folder

    sizes = step.sizes
    workers = sizes["workers"] if step.args.workers is None else step.args.workers
    with tempfile.TemporaryDirectory(prefix="runbook-jpeg-") as tmp:
        written = _write_jpegs(Path(tmp), sizes["images"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # 4 class folders, not 1000
            dataset = imagenet_folder(tmp, "train", transform="eval")
        runs = [_loader_rate(dataset, 0, sizes["batch"], step, 0.3)]
        if workers > 0:
            runs.append(_loader_rate(dataset, workers, sizes["batch"], step, 0.9))
    best = runs[-1]
    per_worker = best["images_per_second_per_worker"] if best["workers"] else best["images_per_second"]
    cores, n_train, n_val = PIPELINE["decode_workers"], PIPELINE["imagenet_train"], PIPELINE["imagenet_val"]
    out = {"written": written, "transform": "eval: Resize(256), CenterCrop(224), ToTensor", "batch": sizes["batch"],
           "runs": runs, "cpu_count": os.cpu_count(), "images_per_second_per_worker": per_worker,
           "note": "files read from the page cache (written just before): disk reads not measured"}
    out["extrapolated"] = [
        extrapolate(f"decoding one pass over 1,281,167 training images with {cores} workers (linear in workers)",
                    n_train / (per_worker * cores), "1281167 / (images_per_second_per_worker * 16)",
                    workers=cores, images_per_second_per_worker=per_worker),
        extrapolate(f"decoding the 50,000 validation images with {cores} workers", n_val / (per_worker * cores),
                    "50000 / (images_per_second_per_worker * 16)", workers=cores,
                    images_per_second_per_worker=per_worker)]
    if best["workers"]:  # the bound if 16 workers each decoded as fast as one process alone
        single = runs[0]["images_per_second"]
        out["extrapolated"].append(extrapolate(
            f"decoding one training pass at the 0-worker rate on each of {cores} cores (a lower bound)",
            n_train / (single * cores), "1281167 / (images_per_second with 0 workers * 16)", workers=cores,
            images_per_second_0_workers=single))
    return out


def step_detector_fit(step: Step) -> dict[str, Any]:
    """``imagenet-width`` scaled to ``classes`` classes (1,281 states each, one estimator, no AUC)
    through ``run_detector_workload``: in its own process (its own peak RSS, killed at the cap),
    in this one for ``--quick``."""
    from idefender_gpu.bench.detector_workloads import DETECTOR_WORKLOADS, run_detector_workload, \
        scaled_detector_workload

    sizes = step.sizes
    classes = sizes["classes"] if step.args.classes is None else step.args.classes
    features, per_class = sizes["features"], sizes["per_class"]
    workload = scaled_detector_workload(DETECTOR_WORKLOADS["imagenet-width"], n_classes=classes,
                                        n_train=classes * per_class, n_test=classes, n_features=features,
                                        estimators=("empirical",), auc=False, name="runbook-detector-fit")
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([_ROOT, *filter(None, [saved])])  # the child imports this checkout
    try:
        record = run_detector_workload(workload, device=step.device, isolate=not step.args.quick, probe=False,
                                       limit_minutes=max(step.left(), 1.0) / 60)
    finally:
        if saved is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = saved
    result = record["results"]["sorted/empirical"]
    if "error" in result:
        raise RuntimeError(f"detector fit: {result['error']}")
    out: dict[str, Any] = {"classes": classes, "features": features, "states_per_class": per_class,
                           "covariance": "full, K=1, empirical", "phases": {}, "extrapolated": []}
    total_c = PIPELINE["imagenet_classes"]
    for phase in ("moments_pass", "parameters", "thresholds_pass"):
        entry = result["phases"][phase]
        work = entry["seconds"] - entry["data_generation_seconds"]  # the real states come from the network
        out["phases"][phase] = {"seconds": entry["seconds"],
                                "data_generation_seconds": entry["data_generation_seconds"],
                                "seconds_per_class": work / classes}
        out["extrapolated"].append(extrapolate(
            f"{phase} for 1000 classes (synthetic-state generation excluded)", total_c * work / classes,
            "1000 * (measured_seconds - data_generation_seconds) / classes", classes=classes,
            measured_seconds=entry["seconds"],
            data_generation_seconds=entry["data_generation_seconds"]))
    works = [e["seconds"] for e in out["extrapolated"]]
    out["extrapolated"].append(extrapolate("the whole fit for 1000 classes (the three phases)", sum(works),
                                           "sum of the three phases' extrapolations", phases=works))
    out["note"] = ("linear in the classes: at 1000 classes the factors alone take parameter_bytes_1000_classes "
                   "(where they are kept, device or host, may change the cost); gpu_check.sh's imagenet-cpu "
                   "workload fits all 1000 classes at D = 1024")
    out["peak_rss_bytes"] = result.get("peak_rss_bytes")
    out["isolated_process"] = not step.args.quick
    if "cuda_max_memory_allocated_bytes" in result:
        out["cuda_max_memory_allocated_bytes"] = result["cuda_max_memory_allocated_bytes"]
    out["parameter_bytes"] = result["parameter_bytes"]
    out["parameter_bytes_1000_classes"] = total_c * features * (features + 1) * 4
    return out


STEP_FUNCTIONS: dict[str, Callable[[Step], dict[str, Any]]] = {
    "wrn-train": step_wrn_train, "wrn-features": step_wrn_features, "vgg19-forward": step_vgg19_forward,
    "vgg19-attack-step": step_vgg19_attack_step, "jpeg-decode": step_jpeg_decode,
    "detector-fit": step_detector_fit}


# -- run, table, command line --------------------------------------------------------------------

def combined(steps: dict[str, Any]) -> list[dict[str, Any]]:
    """One ImageNet pass bounded by the slower of decoding and the network, when both were measured."""
    vgg, jpeg = steps.get("vgg19-forward", {}), steps.get("jpeg-decode", {})
    if "images_per_second" not in vgg or "images_per_second_per_worker" not in jpeg:
        return []
    decode = jpeg["images_per_second_per_worker"] * PIPELINE["decode_workers"]
    rate = min(vgg["images_per_second"], decode)
    return [extrapolate("one ImageNet training pass, decoding (16 workers) and VGG19 overlapped: the slower bounds it",
                        PIPELINE["imagenet_train"] / rate, "1281167 / min(vgg19 images/s, 16 * decode images/s/worker)",
                        vgg19_images_per_second=vgg["images_per_second"], decode_images_per_second=decode)]


def write(record: dict[str, Any], path: str | None) -> None:
    """The record as JSON at ``path`` (atomically: a killed run leaves the last complete file)."""
    if path:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".partial")
        partial.write_text(json.dumps(record, indent=2) + "\n")
        partial.replace(target)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every selected step under its cap; a JSON-able record, written to ``args.out`` after
    each step (``complete`` False until the last)."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    profile = "quick" if args.quick else ("cuda" if device.type == "cuda" else "cpu")
    record: dict[str, Any] = {
        "benchmark": "runbook_timings", "profile": profile, "machine": machine_info(device),
        "note": ("Seconds, iterations and rates are measured here; every 'extrapolated' entry is arithmetic "
                 "on a measured rate (formula and inputs given), not a measurement."
                 + (" --quick: tiny models and sizes, a smoke run: no figure here is the runbook's."
                    if args.quick else "")),
        "pipeline": PIPELINE, "steps_selected": list(args.steps), "complete": False, "steps": {}}
    if device.type == "cuda":
        record["machine"].update(gpu_memory_bytes=torch.cuda.get_device_properties(device).total_memory,
                                 cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    shared: dict[str, Any] = {}
    t0 = time.perf_counter()
    for name in args.steps:
        cap = args.cap_s if args.cap_s is not None else CAPS[profile][name]
        if args.budget_s is not None:  # what the whole run has left (2 s kept for the last write)
            cap = min(cap, args.budget_s - (time.perf_counter() - _STARTED) - 2.0)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        step = Step(name, device, SIZES[profile][name], cap, args, shared)
        if cap < 1.0:
            result = {"skipped": f"--budget-s {args.budget_s:g} spent before this step"}
        else:
            try:
                result = STEP_FUNCTIONS[name](step)
            except Exception as exc:  # noqa: BLE001 - recorded; the other steps go on
                result = {"error": f"{type(exc).__name__}: {exc}"}
        result.update(cap_seconds=cap, wall_seconds=time.perf_counter() - step.start)
        if device.type == "cuda":  # this process's peak in the step (detector-fit's own process: its entry)
            result["step_cuda_max_memory_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
        record["steps"][name] = result
        record["wall_seconds"] = time.perf_counter() - t0
        write(record, args.out)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    shared.clear()
    record["extrapolated"] = combined(record["steps"])
    record["wall_seconds"] = time.perf_counter() - t0
    record["complete"] = True
    record["peak_rss_bytes"] = memory_status().get("VmHWM")  # this process (detector-fit's: its entry)
    write(record, args.out)
    return record


def _fmt_seconds(s: float) -> str:
    if s >= 3600:
        return f"{s / 3600:.1f} h"
    return f"{s / 60:.1f} min" if s >= 120 else f"{s:.3g} s"


def table(record: dict[str, Any]) -> str:
    """The record as text: one line per measurement, one per extrapolation (marked '~')."""
    m = record["machine"]
    lines = [f"runbook timings ({record['profile']}) on {m.get('gpu') or m['cpu']}: torch {m['torch']}, "
             f"{m['torch_threads']} threads, load average {m.get('load_average')}",
             record["note"], "", "| step | measured | rate | extrapolated (~) |", "|---|---|---|---|"]

    def rows(name: str, entry: dict[str, Any], label: str) -> None:
        if "error" in entry or "skipped" in entry:
            why = f"error: {entry['error']}" if "error" in entry else f"skipped: {entry['skipped']}"
            lines.append(f"| {label} | {why} | | |")
            return
        rate = next((f"{entry[k]:.4g} {k.replace('_', ' ')}" for k in
                     ("images_per_second", "image_steps_per_second", "images_per_second_per_worker") if k in entry), "")
        if entry.get("achieved_tflops"):
            rate += f" ({entry['achieved_tflops']:.3g} TFLOP/s)"
        measured = (f"{entry['seconds']:.3g} s / {entry['iterations']} iterations" if "iterations" in entry
                    else f"{entry.get('wall_seconds', 0):.3g} s wall")
        if "seconds_per_step" in entry:
            measured = f"{entry['seconds_per_step']:.4g} s per step ({entry['method'].split(':')[0]})"
        if "phases" in entry:
            measured = ", ".join(f"{p} {v['seconds_per_class']:.3g} s/class" for p, v in entry["phases"].items())
        extra = "; ".join(f"{e['what']}: {_fmt_seconds(e['seconds'])}" for e in entry.get("extrapolated", []))
        lines.append(f"| {label} | {measured} | {rate} | {extra} |")

    for name, entry in record["steps"].items():
        if "models" in entry:
            for model, sub in entry["models"].items():
                rows(name, sub, f"{name} {model}")
        else:
            rows(name, entry, name + (f" {entry['model']}" if "model" in entry else ""))
    for e in record.get("extrapolated", []):
        lines.append(f"| combined | | | {e['what']}: {_fmt_seconds(e['seconds'])} |")
    return "\n".join(lines)


def summary_line(record: dict[str, Any]) -> str:
    """One line: each step's main rate, or its error; whether the run was complete."""
    m = record["machine"]
    parts = []
    for name, entry in record["steps"].items():
        if "error" in entry:
            parts.append(f"{name} error ({entry['error'][:80]})")
        elif "skipped" in entry:
            parts.append(f"{name} skipped ({entry['skipped']})")
        elif "models" in entry:
            parts += [f"{name} {model} {sub['images_per_second']:.3g} img/s "
                      f"(~{_fmt_seconds(sub['extrapolated'][0]['seconds'])}/epoch)"
                      for model, sub in entry["models"].items()]
        elif "phases" in entry:
            parts.append(f"{name} ~{_fmt_seconds(entry['extrapolated'][-1]['seconds'])} for 1000 classes")
        else:
            rate = next((entry[k] for k in ("images_per_second", "image_steps_per_second",
                                            "images_per_second_per_worker") if k in entry), float("nan"))
            parts.append(f"{name} {rate:.3g}/s")
    missing = [s for s in record.get("steps_selected", []) if s not in record["steps"]]
    tail = "" if record.get("complete", True) else f"; INCOMPLETE (not run: {', '.join(missing) or '?'})"
    return (f"runbook timings ({record['profile']}) on {m.get('gpu') or m['cpu']}, {record['wall_seconds']:.0f} s: "
            + "; ".join(parts) + tail)


def parse_steps(text: str) -> tuple[str, ...]:
    """``"all"`` or comma-separated names of :data:`STEPS` (ValueError naming the bad one)."""
    names = STEPS if text == "all" else tuple(s.strip() for s in text.split(",") if s.strip())
    bad = [s for s in names if s not in STEPS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown step {bad[0]!r} (expected 'all' or a comma-separated list of "
                                         f"{', '.join(STEPS)})" if bad else "no step named")
    return names


def _positive(kind: type) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}; got {text!r}") from None
        if not value > 0 or (kind is float and not math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}; got {text!r}")
        return value
    return parse


class _Parser(argparse.ArgumentParser):
    """Errors in one line (no usage block), exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="runbook_timings.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    parser.add_argument("--steps", type=parse_steps, default=STEPS, metavar="LIST",
                        help=f"'all' (default) or a comma-separated list of: {', '.join(STEPS)}")
    parser.add_argument("--quick", action="store_true", help="tiny models and sizes: a smoke run of every step")
    parser.add_argument("--cap-s", type=_positive(float), default=None, metavar="S",
                        help="time cap of every step in seconds (default per step: " +
                             ", ".join(f"{k} {v}" for k, v in CAPS["cuda"].items()) + " on CUDA)")
    parser.add_argument("--budget-s", type=_positive(float), default=None, metavar="S",
                        help="seconds for the whole run, imports included: a step's cap shrinks to what is "
                             "left, a step with under 1 s is skipped (gpu_check.sh: 85 under its 90 s limit)")
    parser.add_argument("--workers", type=int, default=None, metavar="W",
                        help="DataLoader workers of jpeg-decode (also timed with 0; default 8 on CUDA, 2 on CPU)")
    parser.add_argument("--classes", type=_positive(int), default=None, metavar="C",
                        help="classes of detector-fit (default 100 on CUDA, 2 on CPU)")
    parser.add_argument("--n-attack", type=_positive(int), default=PIPELINE["n_attack"], metavar="N",
                        help="attacked images in Table 9's extrapolation (default %(default)s)")
    parser.add_argument("--threads", type=_positive(int), default=None, help="torch.set_num_threads")
    parser.add_argument("--out", default=None, metavar="FILE", help="write the JSON record there")
    parser.add_argument("--summary", default=None, metavar="FILE",
                        help="print one line of the record in FILE (the GPU check's summary) and exit")
    args = parser.parse_args(argv)
    if args.workers is not None and args.workers < 0:
        parser.error(f"--workers: expected an int >= 0; got {args.workers}")
    if args.device is not None:
        try:
            device = torch.device(args.device)
        except RuntimeError:
            parser.error(f"--device: expected a device such as cuda, cuda:0 or cpu; got {args.device!r}")
        if device.type == "cuda" and not torch.cuda.is_available():
            parser.error(f"--device {args.device}: no CUDA device here (torch.cuda.is_available() is False)")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.summary:
        print(summary_line(json.loads(Path(args.summary).read_text())))
        return 0
    record = run(args)
    print(table(record))
    failed = [name for name, entry in record["steps"].items() if "error" in entry or "skipped" in entry]
    if failed:
        print(f"runbook_timings: steps failed or skipped: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
