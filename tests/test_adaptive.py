"""Tests of the adaptive attacker's library part (issue 13 item 3): ``MarginPGD`` and the
well-scaled ``DefendedModel``.

The toy problem of ``tests/conftest.py`` (8x8 bars, a tiny CNN) with an ``IDefender`` on its
fc1 layer. Oracles and invariants: the reject decision of the (K+1) logits equals the
detector's own ``reject`` (also one ulp from the threshold, and for a Mahalanobis detector
scoring under the closest class); input dtypes are cast; the output width is exposed and
accepted by ART; APGD's checkpoints are the paper's; MarginPGD stays in the eps ball and the
bounds, never returns a point of lower margin than the clean input, runs its targeted losses
in the documented order, and is at least as strong as torchattacks' PGD (and as BIM) at the
same eps and steps.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import train_bars
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from idefender_gpu import IDefender, MahalanobisDetector
from idefender_gpu.attacks import BIM, DefendedModel, MarginPGD
from idefender_gpu.attacks.margin import apgd_checkpoints


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread for this module (restored after): the tensors here are tiny."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def toy():
    model, x_train, y_train, x, y = train_bars()
    loader = DataLoader(TensorDataset(x_train, y_train), batch_size=300)
    detector = IDefender(model, "fc1", n_components=1, random_state=0, progress=False).fit(loader)
    return SimpleNamespace(model=model, loader=loader, detector=detector, x=x[:150], y=y[:150])


def reference_reject(detector, x: torch.Tensor) -> torch.Tensor:
    """Paper Eq. 5 written out for a stand-in detector: log p(H(x) | c) < TH_c, c predicted."""
    with torch.no_grad():
        c = detector.model(x).argmax(1)
        score = detector.log_density(x).gather(1, c[:, None])[:, 0]
    return score < torch.as_tensor(detector.thresholds_)[c]


def margin_of(defended: DefendedModel, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Untargeted margin of MarginPGD: best wrong class minus max(true class, rejected)."""
    with torch.no_grad():
        z = defended(x)
    rows = torch.arange(len(y))
    wrong = z.clone()
    wrong[rows, y] = float("-inf")
    wrong[:, -1] = float("-inf")
    return wrong.amax(1) - torch.maximum(z[rows, y], z[:, -1])


# --------------------------------------------------------------------------------------
# DefendedModel: an exact reject decision, well scaled, typed
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [1.0, 1e-6], ids=["scale-1", "scale-1e-6"])
def test_reject_decision_exact_one_ulp_from_the_threshold(toy, scale):
    """Thresholds placed exactly at, and one ulp above, one sample's log-density per class:
    "equal" is accepted (Eq. 5 is strict), "one ulp below" is rejected, even where the margin
    is far below the resolution of the logits (scale 1e-6: the push to the next float)."""
    x = toy.x[:60]
    with torch.no_grad():
        c = toy.model(x).argmax(1)
        score = toy.detector.log_density(x).gather(1, c[:, None])[:, 0]
    first = torch.tensor([int((c == k).nonzero()[0, 0]) for k in range(3)])  # one sample per class
    for thresholds, expected in ((score[first], False), (torch.nextafter(score[first], score[first] + 1), True)):
        stand_in = SimpleNamespace(model=toy.model, log_density=toy.detector.log_density, thresholds_=thresholds)
        defended = DefendedModel(stand_in, scale=scale)
        predicted = defended.predict(x)
        rejected = reference_reject(stand_in, x)
        assert bool((rejected[first] == expected).all())
        assert torch.equal(predicted == 3, rejected)
        assert torch.equal(predicted[~rejected], c[~rejected])


def test_reject_decision_exact_for_a_closest_class_detector(toy):
    """MahalanobisDetector(score_class='closest') scores under argmax_c log p(H(x) | c)."""
    maha = MahalanobisDetector(toy.model, "fc1", progress=False).fit(toy.loader)
    assert maha.score_class == "closest"
    x = torch.cat([toy.x, BIM(toy.model, eps=0.2, alpha=0.05)(toy.x, toy.y)])
    rejected = maha.reject(x)
    assert 0 < int(rejected.sum()) < len(x)
    defended = DefendedModel(maha)
    with torch.no_grad():
        predicted = toy.model(x).argmax(1)
    assert torch.equal(defended.predict(x), torch.where(rejected, torch.full_like(predicted, 3), predicted))


def test_default_reject_logit_is_well_scaled(toy):
    """The default (asinh) keeps the reject logit within a few logits of the class logits,
    with an input gradient of the same order; the linear one does not (issue 13: 140x)."""
    x = toy.x[:64].clone().requires_grad_(True)
    ratios, gaps = {}, {}
    for name, defended in (("asinh", DefendedModel(toy.detector)),
                           ("linear", DefendedModel(toy.detector, transform="linear"))):
        z = defended(x)
        gaps[name] = float((z[:, 3] - z[:, :3].amax(1)).detach().abs().median())
        (g_reject,) = torch.autograd.grad(z[:, 3].sum(), x)
        (g_class,) = torch.autograd.grad(defended(x)[:, :3].amax(1).sum(), x)
        ratios[name] = float((g_reject.flatten(1).norm(dim=1) / g_class.flatten(1).norm(dim=1)).median())
    assert gaps["asinh"] < gaps["linear"] and gaps["asinh"] < 10
    assert ratios["asinh"] < ratios["linear"] and ratios["asinh"] < 10


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_inputs_cast_to_the_model_dtype(toy, dtype):
    """float64/float16 inputs with a float32 model: logits in float32, equal to casting first;
    gradients come back in the input's dtype."""
    defended = DefendedModel(toy.detector)
    x = toy.x[:16].to(dtype)
    z = defended(x)
    assert z.dtype == torch.float32 and z.shape == (16, 4)
    torch.testing.assert_close(z, defended(x.float()), rtol=0, atol=0)
    x_var = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(defended(x_var).sum(), x_var)
    assert grad.dtype == dtype
    x_adv = MarginPGD(defended, eps=0.1, steps=5)(x, toy.y[:16])
    assert x_adv.dtype == dtype and float((x_adv.float() - x.float()).abs().max()) <= 0.1 + 1e-3


def test_output_width_attributes(toy):
    defended = DefendedModel(toy.detector)
    assert (defended.n_classes, defended.n_outputs, defended.reject_index) == (3, 4, 3)
    assert defended(toy.x[:2]).shape[1] == defended.n_outputs
    unfitted = DefendedModel(SimpleNamespace(model=toy.model, log_density=lambda x: x))
    with pytest.raises(ValueError, match="needs a fitted detector"):
        unfitted.n_outputs


def test_art_accepts_the_output_width(toy):
    """ART's PyTorchClassifier with nb_classes=n_outputs predicts (B, K + 1), and its
    targeted PGD runs end to end (the recipe of DefendedModel's docstring)."""
    art_classification = pytest.importorskip("art.estimators.classification", reason="ART not installed")
    from art.attacks.evasion import ProjectedGradientDescent

    defended = DefendedModel(toy.detector).eval()
    x, y = toy.x[:32], toy.y[:32]
    classifier = art_classification.PyTorchClassifier(
        model=defended, loss=nn.CrossEntropyLoss(), input_shape=tuple(x.shape[1:]),
        nb_classes=defended.n_outputs, clip_values=(0.0, 1.0), device_type="cpu")
    assert classifier.predict(x.numpy()).shape == (32, 4)
    attack = ProjectedGradientDescent(classifier, eps=0.2, eps_step=0.05, max_iter=5, targeted=True, verbose=False)
    x_adv = torch.as_tensor(attack.generate(x.numpy(), y=((y + 1) % 3).numpy()))
    assert float((x_adv - x).abs().max()) <= 0.2 + 1e-5


# --------------------------------------------------------------------------------------
# MarginPGD
# --------------------------------------------------------------------------------------


def test_apgd_checkpoints_are_the_papers():
    """p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06) (Croce & Hein 2020)."""
    assert apgd_checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert apgd_checkpoints(1) == [1]
    assert all(0 < w <= s for s in (3, 10, 40) for w in apgd_checkpoints(s))


@pytest.mark.parametrize("norm, eps", [("linf", 0.2), ("l2", 1.5)])
def test_margin_pgd_ball_bounds_and_best_kept(toy, norm, eps, seed):
    """Inside the eps ball and the bounds; no sample ends with a lower margin than at x;
    samples that evade at x are returned unchanged."""
    defended = DefendedModel(toy.detector)
    x, y = toy.x.clone(), toy.y.clone()
    y[:5] = (y[:5] + 1) % 3  # wrong labels: some of these evade already at x
    x_adv = MarginPGD(defended, eps=eps, norm=norm, steps=10, n_restarts=2, n_targets=1)(x, y)
    delta = (x_adv - x).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    assert float(size.max()) <= eps * (1 + 1e-5) + 1e-6
    assert float(x_adv.min()) >= 0 and float(x_adv.max()) <= 1
    before, after = margin_of(defended, x, y), margin_of(defended, x_adv, y)
    assert bool((after >= before).all())
    evading = before > 0
    assert bool(evading.any())
    assert torch.equal(x_adv[evading], x[evading])
    assert int((after > 0).sum()) > int(evading.sum())


@pytest.mark.parametrize("eps", [0.2, 0.3])
def test_margin_pgd_at_least_as_strong_as_torchattacks_pgd(toy, eps, seed):
    """On DefendedModel at the same eps and steps: the evasion rate of MarginPGD is no lower
    than the best of torchattacks' targeted PGD over every target (issue 13)."""
    torchattacks = pytest.importorskip("torchattacks", reason="torchattacks not installed")
    defended = DefendedModel(toy.detector).eval()
    x, y, steps = toy.x, toy.y, 20
    ours = MarginPGD(defended, eps=eps, steps=steps, n_targets=2)(x, y)
    theirs = []
    for shift in (1, 2):
        pgd = torchattacks.PGD(defended, eps=eps, alpha=eps / 8, steps=steps, random_start=True)
        pgd.set_mode_targeted_by_label(quiet=True)
        theirs.append(defended.evades(pgd(x, (y + shift) % 3), y))
    rate_ours = float(defended.evades(ours, y).float().mean())
    rate_theirs = float(torch.stack(theirs).any(0).float().mean())  # per sample, either target
    assert rate_ours >= rate_theirs > 0, (rate_ours, rate_theirs)


def test_margin_pgd_is_a_margin_attack_on_a_plain_classifier(toy, seed):
    """No reject logit: an ordinary margin attack, at least as strong as BIM (same eps, steps)."""
    model, x, y = toy.model, toy.x, toy.y
    x_margin = MarginPGD(model, eps=0.1, steps=20)(x, y)
    x_bim = BIM(model, eps=0.1, alpha=0.01, steps=20)(x, y)
    with torch.no_grad():
        fooled_margin = (model(x_margin).argmax(1) != y).float().mean()
        fooled_bim = (model(x_bim).argmax(1) != y).float().mean()
    assert float(fooled_margin) >= float(fooled_bim) > 0


def test_margin_pgd_reject_index_checked(toy):
    with pytest.raises(ValueError, match=r"reject_index must be an output index .*got 7"):
        MarginPGD(toy.model, eps=0.1, reject_index=7)(toy.x[:4], toy.y[:4])
    with pytest.raises(ValueError, match="'norm' parameter of MarginPGD"):
        MarginPGD(toy.model, eps=0.1, norm="l1")
    with pytest.raises(ValueError, match="'n_targets' parameter of MarginPGD"):
        MarginPGD(toy.model, eps=0.1, n_targets=-1)
    assert MarginPGD(toy.model, eps=0.1)._reject() is None
    assert MarginPGD(DefendedModel(toy.detector), eps=0.1)._reject() == 3


def test_margin_pgd_targeted_losses(toy, monkeypatch):
    """targeted_loss: the cross-entropy over all K + 1 outputs is z_t - logsumexp(z); 'both'
    runs, per target, the margin then the cross-entropy, on the samples not yet evaded."""
    defended = DefendedModel(toy.detector).eval()
    x, y = toy.x[:8], toy.y[:8]
    attack = MarginPGD(defended, eps=0.01, steps=2, n_targets=2)
    assert attack.targeted_loss == "both"
    with torch.no_grad():
        z = defended(x)
    target = (y + 1) % 3
    torch.testing.assert_close(attack._margins(z, y, target, "ce"), z.gather(1, target[:, None])[:, 0] - z.logsumexp(1))
    rows = torch.arange(8)
    others = z.clone()
    others[rows, target] = float("-inf")
    torch.testing.assert_close(attack._margins(z, y, target, "margin"), z[rows, target] - others.amax(1))
    seen = []

    def never_evades(xb, yb, tb, kind="margin"):
        seen.append((tb is None, kind, len(xb)))
        return xb.clone(), torch.full((len(xb),), -1.0)

    monkeypatch.setattr(attack, "_run", never_evades)
    attack(x, y)
    clean = int((margin_of(defended, x, y) <= 0).sum())
    assert seen == [(True, "margin", clean)] + [(False, kind, clean) for _ in range(2) for kind in ("margin", "ce")]
    assert "targeted_loss='ce'" in repr(MarginPGD(defended, eps=0.01, targeted_loss="ce"))
    with pytest.raises(ValueError, match="'targeted_loss' parameter of MarginPGD"):
        MarginPGD(defended, eps=0.01, targeted_loss="dlr")


def test_auto_margin_unit_is_half_the_feature_count(toy):
    """margin_unit='auto': D / 2 nats for a detector of D features (the same decision as any
    unit, the asinh of margin / (D / 2)); a detector without n_features_ is told to pass a number."""
    width = sum(toy.detector.n_features_.values())
    auto = DefendedModel(toy.detector, margin_unit="auto")
    assert auto.unit == width / 2
    x = toy.x[:32]
    torch.testing.assert_close(auto(x), DefendedModel(toy.detector, margin_unit=width / 2)(x), rtol=0, atol=0)
    assert torch.equal(auto.predict(x), DefendedModel(toy.detector).predict(x))
    bare = DefendedModel(SimpleNamespace(model=toy.model, log_density=toy.detector.log_density,
                                         thresholds_=toy.detector.thresholds_), margin_unit="auto")
    with pytest.raises(ValueError, match="margin_unit='auto' needs"):
        bare(x)
    with pytest.raises(ValueError, match="'margin_unit' parameter of DefendedModel"):
        DefendedModel(toy.detector, margin_unit="wide")
