"""Tests of ``idefender_gpu.attacks`` (issue 6): oracles, invariants, contract, errors.

Oracles: FGSM against the closed-form cross-entropy gradient of a linear softmax
classifier, ``W^T (softmax(Wx + b) - onehot(y))``; DeepFool against the closed-form
minimal L2 distance to the nearest boundary of a linear multi-class classifier,
``min_k |f_k - f_y| / ||w_k - w_y||``; the gray-box objective (paper Eq. 6) against a
direct evaluation of its two terms; ``DefendedModel``'s argmax against the detector's own
``reject``. Invariants over an attack table (ids from ``repr``): the eps ball, the bounds,
adversarial accuracy <= clean accuracy, monotone success rates, restored modes, detached
outputs on the input's device.

The toy problem (module fixture, fixed seeds, about 2 s): 8x8 grey images of a horizontal
bar, a vertical bar or the diagonal (3 classes) on a noisy background, a tiny CNN trained
on them, and an ``IDefender`` fitted on its first fully connected layer.
"""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import tol, train_bars
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from idefender_gpu.attacks import (
    BIM,
    FGSM,
    Attack,
    DeepFool,
    DefendedModel,
    GrayBox,
    IterativeL2,
    MarginPGD,
)
from idefender_gpu.exceptions import NotFittedError

try:
    from idefender_gpu import IDefender
except ImportError:  # pragma: no cover - the detector (its own issue) is not merged yet
    IDefender = None


# --------------------------------------------------------------------------------------
# The toy problem
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread for this module (restored after): the tensors here are tiny, and
    on busy cores several threads per op made the file about 5x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def toy():
    """Trained TinyCNN (eval mode), train/test data; global RNG state untouched."""
    model, x_train, y_train, x_test, y_test = train_bars()
    return SimpleNamespace(model=model, x_train=x_train, y_train=y_train, x=x_test, y=y_test)


def fit_detector(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    """An ``IDefender`` fitted on ``model``'s fc1 output (one Gaussian per class)."""
    if IDefender is None:
        pytest.skip("idefender_gpu.IDefender is not available yet")
    loader = DataLoader(TensorDataset(x, y), batch_size=300)
    return IDefender(model, "fc1", n_components=1, random_state=0, progress=False).fit(loader)


@pytest.fixture(scope="module")
def detector(toy):
    """The toy classifier's fitted ``IDefender``."""
    return fit_detector(toy.model, toy.x_train, toy.y_train)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def success_rate(model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of the correctly classified samples that the attack misclassifies."""
    with torch.no_grad():
        correct = model(x).argmax(1) == y
        fooled = model(x_adv).argmax(1) != y
    return float((correct & fooled).sum()) / max(int(correct.sum()), 1)


def max_other_log_density(detector, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``max_{k != y} log p(H(x) | k)``, the detector term of paper Eq. 6: ``(B,)``."""
    with torch.no_grad():
        log_density = detector.log_density(x)
    true = F.one_hot(y, log_density.shape[1]).bool()
    return log_density.masked_fill(true, float("-inf")).amax(1)


# --------------------------------------------------------------------------------------
# The attack table (ids from repr)
# --------------------------------------------------------------------------------------

_ID_MODEL = nn.Linear(1, 1)
_ID_DETECTOR = SimpleNamespace(log_density=lambda x: x)

# (factory(model, detector), norm of the threat model, eps or None for DeepFool)
ATTACKS = [
    (lambda m, d: FGSM(m, eps=0.1), "linf", 0.1),
    (lambda m, d: BIM(m, eps=0.1, alpha=0.025, steps=10), "linf", 0.1),
    (lambda m, d: BIM(m, eps=0.1, alpha=0.025, steps=10, random_start=True), "linf", 0.1),
    (lambda m, d: IterativeL2(m, eps=1.0, alpha=0.25, steps=10), "l2", 1.0),
    (lambda m, d: IterativeL2(m, eps=1.0, alpha=0.25, steps=10, random_start=True), "l2", 1.0),
    (lambda m, d: DeepFool(m), "l2", None),
    (lambda m, d: GrayBox(m, d, base="fgsm", alpha=1.0, eps=0.1), "linf", 0.1),
    (lambda m, d: GrayBox(m, d, base="bim", alpha=1.0, eps=0.1, step_size=0.025), "linf", 0.1),
    (lambda m, d: GrayBox(m, d, base="l2", alpha=1.0, eps=1.0, step_size=0.25, objective="hinge"), "l2", 1.0),
    (lambda m, d: MarginPGD(m, eps=0.1, steps=10), "linf", 0.1),
    (lambda m, d: MarginPGD(m, eps=1.0, norm="l2", steps=10, n_targets=1), "l2", 1.0),
]
ATTACK_IDS = [repr(factory(_ID_MODEL, _ID_DETECTOR)) for factory, _, _ in ATTACKS]
NEEDS_DETECTOR = [isinstance(factory(_ID_MODEL, _ID_DETECTOR), GrayBox) for factory, _, _ in ATTACKS]


def build(index: int, model: nn.Module, request) -> Attack:
    """Attack ``index`` of the table on ``model`` (with the fitted detector if it needs one)."""
    factory = ATTACKS[index][0]
    det = request.getfixturevalue("detector") if NEEDS_DETECTOR[index] else None
    return factory(model, det)


def norms(delta: torch.Tensor, norm: str) -> torch.Tensor:
    flat = delta.flatten(1)
    return flat.abs().amax(1) if norm == "linf" else flat.norm(dim=1)


# --------------------------------------------------------------------------------------
# Oracles on a linear softmax classifier
# --------------------------------------------------------------------------------------


def linear_model(n_features: int, n_classes: int, device, seed: int = 0) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(n_features, n_classes)).double()
    with torch.no_grad():
        model[1].weight.copy_(torch.randn(n_classes, n_features, generator=generator, dtype=torch.float64))
        model[1].bias.copy_(torch.randn(n_classes, generator=generator, dtype=torch.float64))
    return model.to(device)


@pytest.mark.parametrize("targeted", [False, True], ids=["untargeted", "targeted"])
def test_fgsm_matches_closed_form_gradient_sign(device, targeted, seed):
    """x_adv = clip(x +/- eps * sign(W^T (softmax(Wx + b) - onehot(y)))), paper Eq. 1."""
    model = linear_model(12, 4, device)
    W, b = model[1].weight.detach(), model[1].bias.detach()
    x = torch.rand(32, 3, 4, dtype=torch.float64, device=device)
    x[:4] = 0.0  # some samples on the lower bound: the clamp is part of the oracle
    y = torch.randint(0, 4, (32,), device=device)
    eps = 0.05
    probs = torch.softmax(x.flatten(1) @ W.T + b, dim=1)  # (B, K)
    grad = (probs - F.one_hot(y, 4).double()) @ W  # (B, D): d CE / d x
    direction = -1.0 if targeted else 1.0
    expected = (x.flatten(1) + direction * eps * grad.sign()).clamp(0, 1).reshape(x.shape)

    x_adv = FGSM(model, eps=eps, targeted=targeted)(x, y)

    torch.testing.assert_close(x_adv, expected, **tol(torch.float64))


@pytest.mark.parametrize("overshoot", [0.0, 0.02, 0.1])
def test_deepfool_matches_closed_form_minimal_distance(device, overshoot, seed):
    """For a linear classifier, ||x_adv - x|| = (1 + overshoot) min_k |f_k - f_y| / ||w_k - w_y||.

    Wide bounds, so the box never constrains the step; every class is a candidate.
    """
    n_classes = 5
    model = linear_model(20, n_classes, device)
    W = model[1].weight.detach()
    x = torch.rand(64, 20, dtype=torch.float64, device=device)
    with torch.no_grad():
        logits = model(x)
    y = logits.argmax(1)
    f_diff = logits - logits.gather(1, y[:, None])  # (B, K)
    w_diff = W[None] - W[y][:, None]  # (B, K, D)
    dist = f_diff.abs() / w_diff.norm(dim=-1)  # (B, K)
    dist = dist.masked_fill(F.one_hot(y, n_classes).bool(), float("inf"))
    d_min, nearest = dist.min(1)  # (B,)

    attack = DeepFool(model, overshoot=overshoot, num_classes=None, bounds=(-1e3, 1e3))
    x_adv = attack(x, y)
    delta = x_adv - x

    with torch.no_grad():
        assert (model(x_adv).argmax(1) != y).all()
    normal = w_diff[torch.arange(64), nearest]  # (B, D): w_l - w_y
    # One step of length |f'_l| / ||w'_l|| plus the reference implementation's margin of
    # 1e-4 on |f'_l| (at most 1e-4 / ||w'_l||), scaled by 1 + overshoot.
    length = delta.norm(dim=1)
    lower = (1 + overshoot) * d_min
    upper = (1 + overshoot) * (d_min + 1e-4 / normal.norm(dim=1))
    assert (length >= lower * (1 - 1e-12)).all() and (length <= upper * (1 + 1e-12)).all()
    torch.testing.assert_close(length, lower, rtol=1e-2, atol=0)  # within 1% of the closed form
    # ... along the normal of the nearest boundary.
    cosine = F.cosine_similarity(delta, normal, dim=1)
    torch.testing.assert_close(cosine, torch.ones_like(cosine), **tol(torch.float64))


def test_deepfool_leaves_misclassified_samples_and_limits_candidates(seed):
    """Samples wrong from the start are not moved; num_classes=2 only crosses to the runner-up."""
    model = linear_model(20, 6, "cpu")
    x = torch.rand(40, 20, dtype=torch.float64)
    with torch.no_grad():
        logits = model(x)
    top2 = logits.topk(2, dim=1).indices
    y = top2[:, 0].clone()
    y[:10] = top2[:10, 1]  # wrong labels: already "adversarial"
    x_adv = DeepFool(model, num_classes=2, bounds=(-1e3, 1e3))(x, y)
    torch.testing.assert_close(x_adv[:10], x[:10], rtol=0, atol=0)
    with torch.no_grad():
        predicted = model(x_adv[10:]).argmax(1)
    assert torch.equal(predicted, top2[10:, 1])


# --------------------------------------------------------------------------------------
# Invariants over the attack table
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("index", range(len(ATTACKS)), ids=ATTACK_IDS)
def test_stays_in_eps_ball_and_bounds(toy, index, request, seed):
    attack = build(index, toy.model, request)
    _, norm, eps = ATTACKS[index]
    x_adv = attack(toy.x, toy.y)
    assert x_adv.shape == toy.x.shape and x_adv.dtype == toy.x.dtype
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    if eps is not None:
        # float32 round-off of x + delta in [0, 1]
        assert float(norms(x_adv - toy.x, norm).max()) <= eps * (1 + 1e-5) + 1e-6


@pytest.mark.parametrize("index", range(len(ATTACKS)), ids=ATTACK_IDS)
def test_adversarial_accuracy_not_above_clean(toy, index, request, seed):
    attack = build(index, toy.model, request)
    x_adv = attack(toy.x, toy.y)
    clean, adversarial = accuracy(toy.model, toy.x, toy.y), accuracy(toy.model, x_adv, toy.y)
    assert clean > 0.9  # the toy classifier learned the task
    assert adversarial <= clean
    assert not torch.equal(x_adv, toy.x)


@pytest.mark.statistical
@pytest.mark.parametrize(
    "family",
    [
        [lambda m, e=e: FGSM(m, eps=e) for e in (0.05, 0.1, 0.2, 0.3)],
        [lambda m, e=e: BIM(m, eps=e, alpha=e / 4) for e in (0.05, 0.1, 0.2)],
        [lambda m, s=s: BIM(m, eps=0.1, alpha=0.01, steps=s) for s in (3, 10, 30)],
        [lambda m, e=e: IterativeL2(m, eps=e, alpha=e / 4) for e in (0.5, 1.0, 2.0)],
        [lambda m, s=s: IterativeL2(m, eps=1.0, alpha=0.1, steps=s) for s in (3, 10, 30)],
    ],
    ids=["FGSM-eps", "BIM-eps", "BIM-steps", "L2-eps", "L2-steps"],
)
def test_success_rate_monotone_in_eps_and_steps(toy, family):
    """A larger eps or more steps never lowers the success rate.

    Seeded and deterministic (no random start). Per sample, monotonicity is not a theorem
    (an iterate can cross back), so this is a statistical check over 300 samples; the
    grids were chosen with success rates from about 0% to 100%, and the last rate must
    be strictly higher than the first.
    """
    rates = [success_rate(toy.model, toy.x, make(toy.model)(toy.x, toy.y), toy.y) for make in family]
    assert all(a <= b for a, b in zip(rates, rates[1:])), rates
    assert rates[-1] > rates[0], rates


@pytest.mark.parametrize("index", range(len(ATTACKS)), ids=ATTACK_IDS)
def test_output_detached_on_input_device_and_model_untouched(toy, index, request, device, seed):
    model = toy.model if device.type == "cpu" else copy.deepcopy(toy.model).to(device)
    det = None
    if NEEDS_DETECTOR[index]:
        det = request.getfixturevalue("detector") if device.type == "cpu" else fit_detector(
            model, toy.x_train.to(device), toy.y_train.to(device))
    attack = ATTACKS[index][0](model, det)
    x, y = toy.x[:32].to(device).requires_grad_(True), toy.y[:32].to(device)
    before = [p.detach().clone() for p in model.parameters()]
    x_adv = attack(x, y)
    assert x_adv.device == x.device and x_adv.dtype == x.dtype
    assert not x_adv.requires_grad and x_adv.grad_fn is None
    assert x.grad is None
    for p, p0 in zip(model.parameters(), before):
        assert p.grad is None
        assert torch.equal(p.detach(), p0)


@pytest.mark.parametrize("index", range(len(ATTACKS)), ids=ATTACK_IDS)
def test_restores_mixed_training_modes(toy, index, request, seed):
    """Eval mode during the attack (dropout off: two calls agree), each module's mode after."""
    model = copy.deepcopy(toy.model)
    model.train()
    model.conv.eval()  # mixed modes must come back exactly
    modes = {name: m.training for name, m in model.named_modules()}
    factory = ATTACKS[index][0]
    det = None
    if NEEDS_DETECTOR[index]:
        fitted = request.getfixturevalue("detector")
        det = SimpleNamespace(model=model, log_density=fitted.log_density, thresholds_=fitted.thresholds_)
    attack = factory(model, det)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        first = attack(toy.x[:64], toy.y[:64])
        torch.manual_seed(1)
        second = attack(toy.x[:64], toy.y[:64])
    assert torch.equal(first, second)
    assert {name: m.training for name, m in model.named_modules()} == modes


class _FailsOnBatch(nn.Module):
    """Raises on a batch larger than one sample (after the one-sample probe succeeds)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)

    def forward(self, x):
        if x.shape[0] > 1:
            raise RuntimeError("boom")
        return self.linear(x)


@pytest.mark.parametrize(
    "make", [lambda m: BIM(m, eps=0.1, alpha=0.02), lambda m: DeepFool(m)], ids=["BIM", "DeepFool"]
)
def test_restores_mode_on_exception(make):
    model = _FailsOnBatch().train()
    with pytest.raises(RuntimeError, match="boom"):
        make(model)(torch.rand(5, 4), torch.zeros(5, dtype=torch.int64))
    assert model.training and model.linear.training


def test_works_inside_no_grad_and_keeps_no_state(toy):
    attack = BIM(toy.model, eps=0.1, alpha=0.025)
    with torch.no_grad():
        first = attack(toy.x[:50], toy.y[:50])
    second = attack(toy.x[:50], toy.y[:50])
    assert torch.equal(first, second)
    assert not torch.equal(first, toy.x[:50])


def test_targeted_bim_reaches_targets(toy):
    target = (toy.y + 1) % 3
    x_adv = BIM(toy.model, eps=0.3, alpha=0.05, steps=20, targeted=True)(toy.x, target)
    with torch.no_grad():
        hit = (toy.model(x_adv).argmax(1) == target).float().mean()
    assert hit > 0.9


def test_integer_labels_of_any_width_accepted(toy):
    attack = FGSM(toy.model, eps=0.1)
    assert torch.equal(attack(toy.x[:8], toy.y[:8].int()), attack(toy.x[:8], toy.y[:8]))


def test_custom_bounds(seed):
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    x = torch.rand(10, 16) * 255
    x_adv = BIM(model, eps=8.0, alpha=2.0, bounds=(0.0, 255.0))(x, torch.zeros(10, dtype=torch.int64))
    assert float(x_adv.max()) <= 255 and float(x_adv.min()) >= 0
    assert float((x_adv - x).abs().max()) <= 8.0 + 1e-4
    with pytest.raises(ValueError, match=r"bounds \[0.0, 1.0\]"):
        FGSM(model, eps=0.1)(x, torch.zeros(10, dtype=torch.int64))


# --------------------------------------------------------------------------------------
# GrayBox (paper Eq. 6)
# --------------------------------------------------------------------------------------

GRAYBOX_BASES = [
    ("fgsm", FGSM, dict(eps=0.1), dict()),
    ("bim", BIM, dict(eps=0.1), dict(step_size=0.025)),
    ("l2", IterativeL2, dict(eps=1.0), dict(step_size=0.25)),
]


@pytest.mark.parametrize(
    "base, base_cls, shared, extra, random_start",
    [(*row, False) for row in GRAYBOX_BASES] + [(*row, True) for row in GRAYBOX_BASES[1:]],
    ids=[row[0] for row in GRAYBOX_BASES] + [row[0] + "-random-start" for row in GRAYBOX_BASES[1:]],
)
@pytest.mark.parametrize("objective", ["paper", "hinge"])
def test_graybox_alpha_zero_is_its_base_attack(toy, detector, base, base_cls, shared, extra, objective, random_start):
    gray = GrayBox(toy.model, detector, base=base, alpha=0.0, objective=objective,
                   random_start=random_start, **shared, **extra)
    plain_kwargs = dict(shared)
    if extra:
        plain_kwargs.update(alpha=extra["step_size"], random_start=random_start)
    plain = base_cls(toy.model, **plain_kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        expected = plain(toy.x, toy.y)
        torch.manual_seed(3)
        got = gray(toy.x, toy.y)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("objective", ["paper", "hinge"])
@pytest.mark.parametrize("base, base_cls, shared, extra", GRAYBOX_BASES, ids=[b[0] for b in GRAYBOX_BASES])
def test_graybox_gate_closed_is_its_base_attack(toy, detector, base, base_cls, shared, extra, objective):
    """Thresholds at -inf: every class accepts, so the detector term of Eq. 6 (and the hinge) is 0."""
    accepting = SimpleNamespace(model=toy.model, log_density=detector.log_density,
                                thresholds_=torch.full((3,), float("-inf")))
    gray = GrayBox(toy.model, accepting, base=base, alpha=5.0, objective=objective, **shared, **extra)
    plain_kwargs = dict(shared, **({"alpha": extra["step_size"]} if extra else {}))
    assert torch.equal(gray(toy.x, toy.y), base_cls(toy.model, **plain_kwargs)(toy.x, toy.y))


@pytest.mark.parametrize("alpha", [0.01, 1.0])
def test_graybox_fgsm_matches_eq6_gradient_sign(toy, detector, alpha):
    """Thresholds at +inf (all classes reject, gate open): one FGSM step on
    J(x, y) + alpha * max_{k != y} log p(H(x) | k), the gradient taken here directly."""
    rejecting = SimpleNamespace(model=toy.model, log_density=detector.log_density,
                                thresholds_=torch.full((3,), float("inf")))
    x, y, eps = toy.x[:64], toy.y[:64], 0.05
    x_var = x.clone().requires_grad_(True)
    log_density = detector.log_density(x_var)  # (B, 3)
    others = torch.stack([log_density[torch.arange(64), (y + 1) % 3],
                          log_density[torch.arange(64), (y + 2) % 3]], dim=1)
    objective = F.cross_entropy(toy.model(x_var), y, reduction="sum") + alpha * others.max(1).values.sum()
    (grad,) = torch.autograd.grad(objective, x_var)
    expected = (x + eps * grad.sign()).clamp(0, 1)

    got = GrayBox(toy.model, rejecting, base="fgsm", alpha=alpha, eps=eps)(x, y)

    torch.testing.assert_close(got, expected, **tol(torch.float32))


def test_graybox_hinge_matches_its_formula(toy, detector):
    """One FGSM step on J(x, y) + alpha * min(0, log p(H(x) | t) - TH_t), t the best wrong class."""
    thresholds = detector.thresholds_ + 1e4  # every class rejects: the hinge is active
    shifted = SimpleNamespace(model=toy.model, log_density=detector.log_density, thresholds_=thresholds)
    x, y, eps, alpha = toy.x[:64], toy.y[:64], 0.05, 0.1
    x_var = x.clone().requires_grad_(True)
    logits = toy.model(x_var)
    target = logits.detach().scatter(1, y[:, None], float("-inf")).argmax(1)
    margin = detector.log_density(x_var).gather(1, target[:, None])[:, 0] - thresholds[target]
    objective = F.cross_entropy(logits, y, reduction="sum") + alpha * margin.clamp(max=0).sum()
    (grad,) = torch.autograd.grad(objective, x_var)
    expected = (x + eps * grad.sign()).clamp(0, 1)

    got = GrayBox(toy.model, shifted, base="fgsm", alpha=alpha, eps=eps, objective="hinge")(x, y)

    torch.testing.assert_close(got, expected, **tol(torch.float32))


@pytest.mark.parametrize("objective", ["paper", "hinge"])
@pytest.mark.parametrize("base, base_cls, shared, extra", GRAYBOX_BASES, ids=[b[0] for b in GRAYBOX_BASES])
def test_graybox_raises_detector_likelihood_over_its_base(toy, detector, base, base_cls, shared, extra, objective):
    """On a fitted IDefender, max_{k != s} log p(H(x_adv) | k) is higher on average than
    for the base attack with the same budget (deterministic: no random start)."""
    plain_kwargs = dict(shared, **({"alpha": extra["step_size"]} if extra else {}))
    x_base = base_cls(toy.model, **plain_kwargs)(toy.x, toy.y)
    x_gray = GrayBox(toy.model, detector, base=base, alpha=1.0, objective=objective, **shared, **extra)(toy.x, toy.y)
    base_ll = max_other_log_density(detector, x_base, toy.y)
    gray_ll = max_other_log_density(detector, x_gray, toy.y)
    assert float(gray_ll.mean()) > float(base_ll.mean())


def test_graybox_needs_a_fitted_detector(toy):
    unfitted = SimpleNamespace(model=toy.model, log_density=lambda x: x)
    with pytest.raises(NotFittedError, match="thresholds_"):
        GrayBox(toy.model, unfitted, eps=0.1, step_size=0.01)(toy.x[:4], toy.y[:4])
    wrong = SimpleNamespace(model=toy.model, log_density=lambda x: x, thresholds_=torch.zeros(5))
    with pytest.raises(ValueError, match=r"thresholds_ must have shape \(3,\)"):
        GrayBox(toy.model, wrong, eps=0.1, step_size=0.01)(toy.x[:4], toy.y[:4])


# --------------------------------------------------------------------------------------
# DefendedModel: classifier + detector as one (K+1)-class model
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("transform", ["asinh", "linear"])
@pytest.mark.parametrize("scale", [0.1, 1.0, 10.0])
def test_defended_model_argmax_is_reject_or_prediction(toy, detector, scale, transform):
    """argmax over K+1 logits == K exactly where IDefender.reject is True, else the prediction."""
    defended = DefendedModel(detector, scale=scale, transform=transform)
    x_adv = BIM(toy.model, eps=0.2, alpha=0.05)(toy.x, toy.y)
    x = torch.cat([toy.x, x_adv])  # natural (mostly accepted) and adversarial (mostly rejected)
    with torch.no_grad():
        logits = defended(x)
        predicted = toy.model(x).argmax(1)
    rejected = detector.reject(x)
    assert 0 < int(rejected.sum()) < len(x)  # both kinds present
    assert logits.shape == (len(x), 4)
    torch.testing.assert_close(logits[:, :3], toy.model(x).detach(), rtol=0, atol=0)
    expected = torch.where(rejected, torch.full_like(predicted, 3), predicted)
    assert torch.equal(logits.argmax(1), expected)
    assert torch.equal(defended.predict(x), expected)
    assert torch.equal(defended.evades(x, torch.cat([toy.y, toy.y])),
                       (expected != torch.cat([toy.y, toy.y])) & ~rejected)


@pytest.mark.parametrize(
    "kwargs, g",
    [
        (dict(scale=2.0, transform="linear"), lambda m: 2.0 * m),
        (dict(scale=2.0, margin_unit=3.0, transform="linear"), lambda m: 2.0 * m / 3.0),
        (dict(), torch.asinh),
        (dict(scale=0.5, margin_unit=10.0), lambda m: 0.5 * torch.asinh(m / 10.0)),
    ],
    ids=["linear", "linear-unit", "asinh-default", "asinh-scaled"],
)
def test_defended_model_extra_logit_formula_and_gradient(toy, detector, kwargs, g):
    """z_K = max_j z_j + scale * g((TH_c - log p(H(x) | c)) / margin_unit), differentiable in x."""
    defended = DefendedModel(detector, **kwargs)
    x = toy.x[:16].clone().requires_grad_(True)
    logits = defended(x)
    z = toy.model(x)
    c = z.argmax(1)
    log_density = detector.log_density(x).gather(1, c[:, None])[:, 0]
    expected = z.gather(1, c[:, None])[:, 0] + g(detector.thresholds_[c] - log_density)
    torch.testing.assert_close(logits[:, 3], expected, **tol(torch.float32))
    (grad,) = torch.autograd.grad(logits[:, 3].sum(), x)
    (expected_grad,) = torch.autograd.grad(expected.sum(), x)
    torch.testing.assert_close(grad, expected_grad, **tol(torch.float32))


def test_attacks_run_end_to_end_on_the_defended_model(toy, detector):
    """An outside-style targeted attack on the (K+1)-class wrapper evades more often than
    the same attack on the bare classifier."""
    defended = DefendedModel(detector)
    target = (toy.y + 1) % 3
    x_end = BIM(defended, eps=0.2, alpha=0.02, steps=20, targeted=True)(toy.x, target)
    x_bare = BIM(toy.model, eps=0.2, alpha=0.02, steps=20, targeted=True)(toy.x, target)
    assert float(x_end.min()) >= 0 and float(x_end.max()) <= 1
    assert float((x_end - toy.x).abs().max()) <= 0.2 + 1e-6
    assert int(defended.evades(x_end, toy.y).sum()) > int(defended.evades(x_bare, toy.y).sum())


def test_defended_model_errors(toy):
    with pytest.raises(TypeError, match="log_density"):
        DefendedModel(object())
    with pytest.raises(TypeError, match=r"'detector.model' parameter of DefendedModel must be an instance of 'torch.nn"):
        DefendedModel(SimpleNamespace(log_density=lambda x: x, model=None))
    unfitted = SimpleNamespace(model=toy.model, log_density=lambda x: x)
    with pytest.raises(NotFittedError):
        DefendedModel(unfitted)(toy.x[:2])
    with pytest.raises(ValueError, match="scale"):
        DefendedModel(SimpleNamespace(model=toy.model, log_density=lambda x: x), scale=0.0)


# --------------------------------------------------------------------------------------
# Construction, repr, bad input
# --------------------------------------------------------------------------------------


def test_repr_shows_hyperparameters():
    assert repr(BIM(_ID_MODEL, eps=0.1, alpha=0.01)) == (
        "BIM(eps=0.1, alpha=0.01, steps=10, random_start=False, targeted=False, bounds=(0.0, 1.0))"
    )
    assert repr(DeepFool(_ID_MODEL, num_classes=None)) == (
        "DeepFool(overshoot=0.02, max_iter=50, num_classes=None, bounds=(0.0, 1.0))"
    )
    assert repr(GrayBox(_ID_MODEL, _ID_DETECTOR, base="l2", eps=1.0, step_size=0.1, objective="hinge")) == (
        "GrayBox(base='l2', alpha=1.0, eps=1.0, step_size=0.1, steps=10, random_start=False, "
        "objective='hinge', bounds=(0.0, 1.0))"
    )


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: FGSM(_ID_MODEL, 0.1), TypeError, "positional"),
        (lambda: FGSM(_ID_MODEL, eps=0.0), ValueError,
         r"The 'eps' parameter of FGSM must be a float in the range \(0, inf\)\. Got 0\.0 instead\."),
        (lambda: FGSM(_ID_MODEL, eps=float("inf")), ValueError, "'eps' parameter of FGSM .* Got inf instead"),
        (lambda: FGSM(_ID_MODEL, eps="0.1"), TypeError, "'eps' parameter of FGSM must be a float"),
        (lambda: FGSM(lambda x: x, eps=0.1), TypeError, "'model' parameter of FGSM must be an instance of 'torch.nn"),
        (lambda: FGSM(_ID_MODEL, eps=0.1, bounds=(1.0, 0.0)), ValueError, "low < high"),
        (lambda: FGSM(_ID_MODEL, eps=0.1, bounds=(0.0,)), TypeError, "'bounds' parameter of FGSM must be a pair"),
        (lambda: FGSM(_ID_MODEL, eps=0.1, bounds=(0.0, float("inf"))), ValueError, "'bounds' parameter"),
        (lambda: BIM(_ID_MODEL, eps=0.1, alpha=0.01, steps=0), ValueError, "'steps' parameter"),
        (lambda: BIM(_ID_MODEL, eps=0.1, alpha=0.01, steps=2.0), TypeError, "'steps' parameter of BIM must be an int"),
        (lambda: BIM(_ID_MODEL, eps=0.1, alpha=-1.0), ValueError, "'alpha' parameter"),
        (lambda: BIM(_ID_MODEL, eps=0.1, alpha=0.01, random_start=1), TypeError, "'random_start'"),
        (lambda: IterativeL2(_ID_MODEL, eps=1.0), TypeError, "alpha"),
        (lambda: DeepFool(_ID_MODEL, overshoot=-0.1), ValueError, "'overshoot'"),
        (lambda: DeepFool(_ID_MODEL, max_iter=0), ValueError, "'max_iter'"),
        (lambda: DeepFool(_ID_MODEL, num_classes=1), ValueError, "'num_classes'"),
        (lambda: GrayBox(_ID_MODEL, object(), eps=0.1, step_size=0.01), TypeError, "log_density"),
        (lambda: GrayBox(_ID_MODEL, _ID_DETECTOR, base="cw", eps=0.1), ValueError, "'base' parameter"),
        (lambda: GrayBox(_ID_MODEL, _ID_DETECTOR, base="bim", eps=0.1), ValueError, "'step_size' parameter is required"),
        (lambda: GrayBox(_ID_MODEL, _ID_DETECTOR, base="fgsm", eps=0.1, steps=3), ValueError, "not used by base='fgsm'"),
        (lambda: GrayBox(_ID_MODEL, _ID_DETECTOR, eps=0.1, step_size=0.01, alpha=-1.0), ValueError, "'alpha'"),
        (lambda: GrayBox(_ID_MODEL, _ID_DETECTOR, eps=0.1, step_size=0.01, objective="l1"), ValueError, "'objective'"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bad_hyperparameters(make, error, match):
    with pytest.raises(error, match=match):
        make()


# Every real hyper-parameter of every attack: (class, valid keyword arguments, name).
REAL_HYPERPARAMETERS = [
    (FGSM, dict(eps=0.1), "eps"),
    (BIM, dict(eps=0.1, alpha=0.01), "eps"),
    (BIM, dict(eps=0.1, alpha=0.01), "alpha"),
    (IterativeL2, dict(eps=1.0, alpha=0.1), "eps"),
    (IterativeL2, dict(eps=1.0, alpha=0.1), "alpha"),
    (DeepFool, dict(), "overshoot"),
    (GrayBox, dict(eps=0.1, step_size=0.01), "alpha"),
    (GrayBox, dict(eps=0.1, step_size=0.01), "eps"),
    (GrayBox, dict(eps=0.1, step_size=0.01), "step_size"),
    (DefendedModel, dict(), "scale"),
    (DefendedModel, dict(), "margin_unit"),
    (MarginPGD, dict(eps=0.1), "eps"),
]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("cls, kwargs, name", REAL_HYPERPARAMETERS,
                         ids=[f"{c.__name__}-{n}" for c, _, n in REAL_HYPERPARAMETERS])
def test_nan_and_inf_hyperparameters_rejected(cls, kwargs, name, bad):
    """Issue 11: NaN and infinity never pass, for every real hyper-parameter, with
    scikit-learn's message (InvalidParameterError: a ValueError and a TypeError)."""
    from idefender_gpu.exceptions import InvalidParameterError

    args = (_DETECTOR_WITH_MODEL,) if cls is DefendedModel else (_ID_MODEL,)
    if cls is GrayBox:
        args = (_ID_MODEL, _ID_DETECTOR)
    with pytest.raises(InvalidParameterError, match=rf"The '{name}' parameter of {cls.__name__} must be .* Got {bad!r} instead"):
        cls(*args, **{**kwargs, name: bad})
    assert issubclass(InvalidParameterError, ValueError) and issubclass(InvalidParameterError, TypeError)


_DETECTOR_WITH_MODEL = SimpleNamespace(log_density=lambda x: x, model=_ID_MODEL)

_X = torch.rand(4, 1, 8, 8)
_Y = torch.tensor([0, 1, 2, 0])


@pytest.mark.parametrize(
    "x, y, error, match",
    [
        (_X.numpy(), _Y, TypeError, "x must be a torch.Tensor"),
        ((_X * 255).to(torch.uint8), _Y, TypeError, "x must be a floating-point tensor"),
        (_X.flatten(), _Y, ValueError, r"x must have shape \(B, \.\.\.\)"),
        (_X[:0], _Y[:0], ValueError, "B >= 1"),
        (_X + 0.5, _Y, ValueError, r"x must lie within bounds \[0.0, 1.0\]"),
        (_X.masked_fill(_X > 0.9, float("nan")), _Y, ValueError, "x must be finite"),
        (_X, _Y.tolist(), TypeError, "y must be a torch.Tensor"),
        (_X, _Y.float(), TypeError, "y must hold integer labels"),
        (_X, _Y.bool(), TypeError, "y must hold integer labels"),
        (_X, _Y[:3], ValueError, r"y must have shape \(4,\)"),
        (_X, _Y[:, None], ValueError, r"y must have shape \(4,\)"),
        (_X, torch.tensor([0, 1, 3, 0]), ValueError, r"labels in \[0, 3\).*got label 3"),
        (_X, torch.tensor([0, -1, 2, 0]), ValueError, "got label -1"),
    ],
    ids=[
        "numpy-x", "int-x", "1d-x", "empty", "out-of-bounds", "nan", "list-y", "float-y", "bool-y",
        "short-y", "2d-y", "label-too-large", "negative-label",
    ],
)
def test_bad_inputs(toy, x, y, error, match):
    for attack in (FGSM(toy.model, eps=0.1), DeepFool(toy.model)):
        with pytest.raises(error, match=match):
            attack(x, y)


def test_model_must_return_logits():
    model = nn.Sequential(nn.Flatten(0))  # (B, ...) -> 1-D
    with pytest.raises(ValueError, match=r"model must return logits of shape \(B, n_classes\)"):
        FGSM(model, eps=0.1)(_X, _Y)


def test_input_not_modified_in_place(toy):
    x = toy.x[:16].clone()
    for attack in (FGSM(toy.model, eps=0.1), BIM(toy.model, eps=0.1, alpha=0.02),
                   IterativeL2(toy.model, eps=1.0, alpha=0.2), DeepFool(toy.model)):
        attack(x, toy.y[:16])
        assert torch.equal(x, toy.x[:16])


def test_public_names():
    import idefender_gpu.attacks as attacks

    assert set(attacks.__all__) >= {"FGSM", "BIM", "IterativeL2", "DeepFool", "GrayBox", "DefendedModel"}
    assert all(hasattr(attacks, name) for name in attacks.__all__)
    assert math.isclose(FGSM(_ID_MODEL, eps=0.1).step_size, 0.1)
