"""Why off-the-shelf targeted PGD trails MarginPGD on DefendedModel (issue 13, adaptive item).

Fits I-defender on model F (the cached checkpoint of ``reproduce``: seed 1, 5 epochs) over the
Fashion-MNIST training set, ID-95 thresholds from the last 2000 test images (as ``reproduce
adaptive``), then attacks the first N test images at Linf eps with 40 steps:

- ``margin``: MarginPGD (1 restart, 3 targets) on ``DefendedModel(detector)``; option
  ``loss=margin|ce|both`` (its ``targeted_loss``, default both);
- ``ta``: torchattacks' targeted PGD (alpha = 2.5 eps / 40, random start) towards F's best wrong
  class; options ``targets=3`` (each of the 3 best wrong classes in turn, first evasion kept),
  ``alpha=M`` (alpha = M eps / 40), ``margin_unit=U`` (a number or ``auto``), ``scale=S``
  (DefendedModel's; options of every kind, separated by ``;``);
- ``ownbest``: the same PGD re-implemented, keeping any evading iterate (best-step keeping).

Success: of the images F classifies correctly, the share misclassified and not rejected.

    python pgd_recipe.py 200 "margin,ta,ta:targets=3,ta:margin_unit=300" 0.05,0.1
    python pgd_recipe.py 200 "margin:loss=margin,margin,margin:margin_unit=auto,ta:targets=3;margin_unit=auto" 0.05,0.1
"""

import sys
import time
from pathlib import Path

import torch
import torchattacks
from torch.utils.data import DataLoader, TensorDataset

from idefender_gpu import IDefender
from idefender_gpu.attacks import DefendedModel, MarginPGD
from idefender_gpu.data import load_dataset
from idefender_gpu.models import load_or_train

torch.set_num_threads(1)
N, WHICH, EPS = int(sys.argv[1]), sys.argv[2].split(","), [float(e) for e in sys.argv[3].split(",")]
SAVED = Path(sys.argv[4] if len(sys.argv) > 4 else "idefender-F-conv2.safetensors")
STEPS = 40
data = load_dataset("fashion-mnist", "/usr/share/datasets/fashion-mnist")
F, _ = load_or_train("F", data, seed=1, epochs=5, device="cpu")
if SAVED.is_file():
    det = IDefender.load(SAVED, F)
else:
    det = IDefender(F, ["conv2"], 1, reg_covar=1e-4, random_state=0, memory_budget=64 << 20).fit(
        DataLoader(TensorDataset(data.x_train, data.y_train), batch_size=1000))
    det.calibrate(DataLoader(TensorDataset(data.x_test[8000:], data.y_test[8000:]), batch_size=1000), keep=0.95)
    det.save(SAVED)
x, y = data.x_test[:N], data.y_test[:N]
with torch.no_grad():
    logits = F(x)
correct = logits.argmax(1) == y
ranked = logits.scatter(1, y[:, None], float("-inf")).argsort(1, descending=True)  # best wrong first


def evades(d, xa):
    with torch.no_grad():
        p = d(xa).argmax(1)
    return (p != y[:len(xa)]) & (p != d.reject_index)


def own_pgd(d, eps, alpha, target):
    """torchattacks' targeted PGD (random start, sign steps on -CE), keeping any evading iterate."""
    xa = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1)
    found, best = torch.zeros(len(x), dtype=torch.bool), xa.clone()
    for _ in range(STEPS):
        xa.requires_grad_(True)
        (g,) = torch.autograd.grad(-torch.nn.functional.cross_entropy(d(xa), target), xa)
        xa = (x + (xa.detach() + alpha * g.sign() - x).clamp(-eps, eps)).clamp(0, 1)
        ev = evades(d, xa)
        new = ev & ~found
        best[new], found = xa[new], found | ev
    best[~found] = xa[~found]
    return best


for eps in EPS:
    for w in WHICH:
        torch.manual_seed(0)
        t = time.time()
        kind, _, opts = w.partition(":")
        kw = dict(o.split("=") for o in opts.split(";") if o)
        d = DefendedModel(det, **{k: v if v == "auto" else float(v) for k, v in kw.items()
                                  if k in ("scale", "margin_unit")}).eval()
        ok = torch.zeros(N, dtype=torch.bool)
        if kind == "margin":
            ok = evades(d, MarginPGD(d, eps=eps, steps=STEPS, n_restarts=1, n_targets=3,
                                     targeted_loss=kw.get("loss", "both"))(x, y))
        else:
            for k in range(int(kw.get("targets", 1))):
                if kind == "ta":
                    pgd = torchattacks.PGD(d, eps=eps, alpha=float(kw.get("alpha", 2.5)) * eps / STEPS, steps=STEPS,
                                           random_start=True)
                    pgd.set_mode_targeted_by_label(quiet=True)
                    xa = pgd(x, ranked[:, k])
                else:
                    xa = own_pgd(d, eps, float(kw.get("alpha", 2.5)) * eps / STEPS, ranked[:, k])
                ok |= evades(d, xa)
        print(f"eps {eps} {w}: success {float(ok[correct].double().mean()):.3f} ({time.time() - t:.0f} s)", flush=True)
