"""CUDA readiness of the mixtures, checked on the CPU (issue 16).

A CUDA generator cannot exist on a CPU-only machine, so the random calls are checked by
what they are given: every ``torch.rand/randn/randint`` that takes a generator must also
be told the generator's device, and every ``torch.multinomial`` must get its input on the
generator's device (a CUDA generator with CPU parameters raises there). The
``storage_device != device`` paths run on the CPU with blocks of groups.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from conftest import make_blobs

from idefender_gpu.mixture import BatchedGaussianMixture, GaussianMixture
from idefender_gpu.mixture import _stream as mixture_stream

COVARIANCE_TYPES = ["full", "tied", "diag", "spherical"]


@pytest.fixture()
def random_calls(monkeypatch):
    """Record ``(function, device given, generator device)`` of every seeded random call."""
    calls = []
    for name in ("rand", "randn", "randint"):
        real = getattr(torch, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            gen = kwargs.get("generator")
            if gen is not None:
                given = kwargs.get("device")
                calls.append((_name, None if given is None else torch.device(given), gen.device))
            return _real(*args, **kwargs)

        monkeypatch.setattr(torch, name, spy)
    real_multinomial = torch.multinomial

    def multinomial(input, *args, **kwargs):
        gen = kwargs.get("generator")
        if gen is not None:
            calls.append(("multinomial", input.device, gen.device))
        return real_multinomial(input, *args, **kwargs)

    monkeypatch.setattr(torch, "multinomial", multinomial)
    return calls


def _assert_on_generator_device(calls):
    assert calls, "precondition: seeded random calls were made"
    for name, given, generator_device in calls:
        assert given is not None, f"torch.{name} with a generator but no device= (defaults to the CPU)"
        assert given == generator_device, (name, given, generator_device)


@pytest.mark.parametrize("init_params", ["kmeans", "k-means++", "random", "random_from_data"])
def test_every_random_call_uses_the_generators_device(random_calls, init_params):
    """Issue 16 items 1-2: fits (in memory and streamed), a torch.Generator as random_state,
    and sample() with parameters on a storage device."""
    X, y = make_blobs([60, 80, 50], 3, 2, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = GaussianMixture(2, init_params=init_params, random_state=torch.Generator().manual_seed(3),
                             max_iter=5).fit(X)
        gm.sample(7)
        bgm = BatchedGaussianMixture(2, init_params=init_params, random_state=0, max_iter=5,
                                     group_block_size=2, storage_device="cpu").fit(X, y)
        bgm.sample(4)
        GaussianMixture(2, init_params=init_params, random_state=torch.Generator().manual_seed(1),
                        max_iter=3).fit_stream([X[:90], X[90:]])
    _assert_on_generator_device(random_calls)


def test_seed_from_a_torch_generator_is_drawn_on_its_device(random_calls):
    from idefender_gpu.mixture._core import seed_of

    generator = torch.Generator().manual_seed(5)
    seed = seed_of(generator)
    assert random_calls == [("randint", torch.device("cpu"), torch.device("cpu"))]
    assert seed == int(torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(5)))


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_sample_with_blocks_and_a_storage_device_equals_one_block(covariance_type):
    """The storage_device path of sample(): the draws are made on the compute device, then
    placed block by block; the result equals the one-block sample."""
    X, y = make_blobs([60, 80, 50, 70], 3, 2, seed=1)
    common = dict(covariance_type=covariance_type, random_state=0, init_params="random_from_data")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        one = BatchedGaussianMixture(2, **common).fit(X, y)
        blocked = BatchedGaussianMixture(2, group_block_size=3, storage_device="cpu", device="cpu",
                                         **common).fit(X, y)
    samples_one, labels_one = one.sample(11)
    samples_blocked, labels_blocked = blocked.sample(11)
    np.testing.assert_array_equal(labels_blocked, labels_one)
    np.testing.assert_allclose(samples_blocked, samples_one, rtol=1e-12, atol=1e-12)
    assert samples_one.shape == (4, 11, 3)


def test_nccl_buffers_live_on_the_tensors_device():
    """Issue 16 item 5: a rank computing on cuda:1 without torch.cuda.set_device(1) must
    not hand NCCL a buffer on cuda:0 (the current device); host tables follow its GPU."""
    from types import SimpleNamespace

    from idefender_gpu.distributed import DataParallel

    def setting(backend, bound=None):
        made = DataParallel.__new__(DataParallel)  # no process group needed for the routing
        made.backend, made.group, made._cuda_device = backend, SimpleNamespace(bound_device_id=bound), None
        return made

    nccl = setting("nccl")
    assert nccl._comm_device(torch.device("cuda", 1)) == torch.device("cuda", 1)
    assert nccl._comm_device(torch.device("cpu")) == torch.device("cuda", 1)  # the rank's GPU
    assert nccl._comm_device(torch.device("cuda", 3)) == torch.device("cuda", 3)
    bound = setting("nccl", bound=torch.device("cuda", 2))
    assert bound._comm_device(torch.device("cpu")) == torch.device("cuda", 2)  # before any GPU tensor
    assert setting("gloo")._comm_device(torch.device("cuda", 1)) == torch.device("cpu")
    assert setting("cpu:gloo,cuda:nccl")._comm_device(torch.device("cuda", 1)) == torch.device("cuda", 1)


@pytest.mark.parametrize("batched", [False, True])
def test_streaming_validates_on_the_first_pass_only(monkeypatch, batched):
    """Issue 16 "would be slow" item 3: the batches are validated (finite check, label
    range: host syncs) once, on the first pass; the EM passes only convert them."""
    X, y = make_blobs([120, 150], 3, 2, seed=2)
    batches = [(X[i:i + 64], y[i:i + 64]) for i in range(0, len(X), 64)]
    counted = {"check_array": 0, "check_labels": 0}
    for name in counted:
        real = getattr(mixture_stream, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            counted[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(mixture_stream, name, spy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if batched:
            model = BatchedGaussianMixture(2, random_state=0, tol=0.0, max_iter=8).fit_stream(batches)
        else:
            model = GaussianMixture(2, random_state=0, tol=0.0, max_iter=8).fit_stream([b[0] for b in batches])
    n_iter = int(np.max(model.n_iter_))
    assert n_iter == 8  # many passes over the data...
    assert counted["check_array"] == len(batches)  # ...one validation of each batch
    assert counted["check_labels"] == (len(batches) if batched else 0)


def test_later_passes_reject_a_batch_of_another_width():
    X, _ = make_blobs([100], 3, 1, seed=0)
    passes = iter(range(100))

    def data():
        first = next(passes) < 2  # the peek at the first batch, then the validating pass
        return [X if first else X[:, :2]]

    with pytest.raises(ValueError, match=r"X must have shape \(batch, 3\) on every pass"):
        GaussianMixture(1, random_state=0).fit_stream(data)


def test_fitted_parameters_are_one_copy():
    """The public arrays are views of the one fitted state: nothing to reconcile, and an
    assignment is what scoring uses."""
    X, _ = make_blobs([100, 80], 2, 2, seed=4)
    model = GaussianMixture(2, random_state=0).fit(X)
    assert not {"weights_", "means_", "covariances_", "precisions_", "precisions_cholesky_"} & set(vars(model))
    before = model.score_samples(X)
    model.means_ = model.means_ + 1.0
    after = model.score_samples(X)
    assert not np.allclose(before, after)
    model.means_ = model.means_ - 1.0
    np.testing.assert_allclose(model.score_samples(X), before, rtol=1e-12, atol=1e-12)
    with pytest.raises(AttributeError):
        GaussianMixture(2).means_  # noqa: B018 - not fitted: no attribute
