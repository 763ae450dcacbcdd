"""Data-parallel EM on torch.distributed (issue 8): two gloo processes on CPU give the
single-process fit; failures on one rank end both processes with an error.

The ranks run ``tests/_distributed_worker.py``: all the fits under one
``torchrun --nproc_per_node=2`` launch (a module fixture), the failures as two plain
processes (so that each rank's own exit status and stderr can be checked). The references
are computed here, in this process, from the same data. The in-memory single-process fit
sums centred covariances in two passes while the data-parallel one sums statistics
centred on the current means over two shards: the same algebra, different float64
round-off, hence ``rtol=1e-10`` rather than equality. The ranks themselves must agree
bitwise (they perform the same M-step on the same all-reduced buffer).
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import _distributed_worker as worker
import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, TensorDataset

from idefender_gpu import IDefender
from idefender_gpu.distributed import current, data_parallel
from idefender_gpu.mixture import BatchedGaussianMixture, GaussianMixture

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")

WORKER = Path(worker.__file__)
LAUNCH_TIMEOUT = 300  # seconds; the launches take ~10-20 s on two busy cores
FITTED = ("weights_", "means_", "covariances_", "precisions_cholesky_", "lower_bound_")
RTOL, ATOL = 1e-10, 1e-12


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    if os.path.exists("/sys/class/net/lo"):  # gloo over loopback only
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _plain_launch(mode: str, out: Path) -> list[subprocess.CompletedProcess]:
    """Two ranks as independent processes (file:// rendezvous); returns both results."""
    init = f"file://{out / 'rendezvous'}"
    procs = [subprocess.Popen([sys.executable, str(WORKER), mode, str(out), init],
                              env={**_env(), "RANK": str(r), "WORLD_SIZE": "2"},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    results = []
    for proc in procs:
        try:
            stdout, stderr = proc.communicate(timeout=LAUNCH_TIMEOUT)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail(f"mode {mode!r}: a rank hung for {LAUNCH_TIMEOUT} s")
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    return results


@pytest.fixture(scope="module")
def parity(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("parity")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(WORKER), "parity", str(out)]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return out


def _load(out: Path, name: str, rank: int) -> dict:
    return dict(np.load(out / f"{name}.rank{rank}.npz"))


def _both(out: Path, name: str) -> dict:
    """Rank 0's result, after checking that rank 1 holds bitwise the same parameters."""
    r0, r1 = _load(out, name, 0), _load(out, name, 1)
    for key, value in r0.items():
        if key not in ("fit_predict", "predict", "writes"):
            np.testing.assert_array_equal(value, r1[key], err_msg=f"{name}: {key} differs across ranks")
    return r0


def _assert_same_fit(got: dict, ref: dict, rtol=RTOL, atol=ATOL) -> None:
    np.testing.assert_array_equal(got["n_iter_"], ref["n_iter_"])
    np.testing.assert_array_equal(got["converged_"], ref["converged_"])
    for key in FITTED:
        np.testing.assert_allclose(got[key], ref[key], rtol=rtol, atol=atol, err_msg=key)
    for key, value in ref.items():
        if key.startswith("lower_bounds_"):
            np.testing.assert_allclose(got[key], value, rtol=rtol, atol=atol, err_msg=key)


def _single_process(estimator, *args) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return worker.mixture_result(estimator.fit(*args))


# --------------------------------------------------------------------------------------
# Parity with one process
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("covariance_type", worker.COVARIANCE_TYPES)
def test_gaussian_mixture_two_ranks_equal_one_process(parity, covariance_type):
    """Uneven shards (65% / 35%), the same parameters, n_iter_ and lower bounds."""
    X, _, _ = worker.scenario_data()
    kwargs = dict(**worker.inits(X, None, covariance_type, False), **worker.PARITY)
    ref = _single_process(GaussianMixture(3, **kwargs), X)
    got = _both(parity, f"gm_{covariance_type}_inits")
    assert ref["n_iter_"] > 5  # the comparison covers a real EM path
    _assert_same_fit(got, ref)


def test_batched_uneven_shards_and_a_group_missing_from_one_rank(parity):
    _, Xg, yg = worker.scenario_data()
    assert not np.any(yg[worker.group_shard(yg, 1)] == 2)  # group 2 only on rank 0
    kwargs = dict(**worker.inits(Xg, yg, "full", True), **worker.PARITY)
    ref = _single_process(BatchedGaussianMixture(2, **kwargs), Xg, yg)
    assert ref["n_iter_"].max() > 5
    _assert_same_fit(_both(parity, "batched_inits"), ref)
    _assert_same_fit(_both(parity, "batched_blocks"), ref)  # group_block_size=2, storage_device


def test_streaming_two_ranks_equal_one_process_in_memory(parity):
    """fit_stream over each rank's uneven batches: the in-memory single-process fit."""
    _, Xg, yg = worker.scenario_data()
    kwargs = dict(**worker.inits(Xg, yg, "full", True), **worker.PARITY)
    ref = _single_process(BatchedGaussianMixture(2, **kwargs), Xg, yg)
    _assert_same_fit(_both(parity, "stream_inits"), ref, rtol=1e-9, atol=1e-11)  # batch sums


@pytest.mark.parametrize("name", ["gm_kmeans", "batched_kmeans_full", "batched_kmeans_diag", "gm_k-means++",
                                  "gm_random", "gm_random_from_data"])
def test_kmeans_initialisation_does_not_depend_on_the_number_of_ranks(parity, name):
    """k-means++ on a sample chosen by row hashes, Lloyd over all shards ('random': row-hash
    responsibilities): two ranks give what one rank gives on all the data."""
    _assert_same_fit(_both(parity, name), _load(parity, f"{name}_world1", 0))


def test_stream_and_in_memory_share_the_initialisation(parity):
    _assert_same_fit(_both(parity, "stream_kmeans"), _both(parity, "batched_kmeans_full"),
                     rtol=1e-9, atol=1e-11)


def test_fit_predict_gives_the_labels_of_the_local_shard(parity):
    for rank in range(2):
        result = _load(parity, "gm_kmeans", rank)
        np.testing.assert_array_equal(result["fit_predict"], result["predict"])
        X, _, _ = worker.scenario_data()
        assert result["predict"].shape == (len(worker.single_shard(len(X), rank)),)


def test_idefender_with_a_distributed_sampler_equals_one_process(parity):
    """Shuffled DistributedSampler shards: the one-process detector; save writes once."""
    x, y = worker.detector_data()
    loader = DataLoader(TensorDataset(x, y), batch_size=50)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = IDefender(worker.detector_model(), **worker.detector_kwargs(1)).fit(loader)
    got = _both(parity, "detector_k1")
    layer = ref.layers_[0]
    expected = {"thresholds": ref.thresholds_, "weights": ref.weights_[layer], "means": ref.means_[layer],
                "prec_chol": ref.precisions_cholesky_[layer], "scores": ref.score(x)}
    for key, value in expected.items():
        np.testing.assert_allclose(got[key], value.numpy(), rtol=RTOL, atol=1e-11, err_msg=key)
    # K = 2 ('kmeans' seeding from the gathered sample): what one rank gives on all the data
    got2, one2 = _both(parity, "detector_k2"), _load(parity, "detector_k2_world1", 0)
    for key in expected:
        np.testing.assert_allclose(got2[key], one2[key], rtol=RTOL, atol=1e-11, err_msg=key)
    for K in (1, 2):  # written by rank 0 only, and loadable
        assert [int(_load(parity, f"detector_k{K}", r)["writes"]) for r in range(2)] == [1, 0]
        loaded = IDefender.load(parity / f"detector_k{K}.safetensors", worker.detector_model())
        np.testing.assert_array_equal(loaded.thresholds_.numpy(), _load(parity, f"detector_k{K}", 0)["thresholds"])


# --------------------------------------------------------------------------------------
# Faults
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def faults(tmp_path_factory):
    out = tmp_path_factory.mktemp("faults")
    tic = time.perf_counter()
    results = _plain_launch("faults", out)
    wall = time.perf_counter() - tic
    records = [json.loads((out / f"faults.rank{r}.json").read_text()) for r in range(2)]
    return results, records, wall


def test_a_failure_on_one_rank_ends_both_processes_with_an_error(faults):
    """NaN in rank 1's shard (left uncaught): both exit non-zero, each with the error text."""
    results, _, wall = faults
    assert all(r.returncode != 0 for r in results), [r.stderr[-2000:] for r in results]
    assert "ValueError: Input X contains NaN." in results[1].stderr
    assert "RankFailedError" in results[0].stderr and "rank 1: ValueError: Input X contains NaN" in results[0].stderr
    assert wall < LAUNCH_TIMEOUT


@pytest.mark.parametrize("scenario, rank1_error, text", [
    ("nan", "ValueError", "Input X contains NaN"),
    ("em_step", "RuntimeError", "injected failure in the E-step"),
    ("empty_stream", "ValueError", "data must yield at least one batch"),
    ("detector_labels", "ValueError", "loader labels must be class labels in [0, n_classes)"),
])
def test_every_rank_raises_soon_naming_the_failing_rank(faults, scenario, rank1_error, text):
    _, records, _ = faults
    rank0, rank1 = records[0][scenario], records[1][scenario]
    assert rank1["error"] == rank1_error and text in rank1["message"]
    assert rank0["error"] == "RankFailedError"
    assert f"rank 1: {rank1_error}: {text}" in rank0["message"]
    assert max(rank0["seconds"], rank1["seconds"]) < 10  # no wait for the 30 s timeout


def test_mismatched_features_are_found_before_the_first_e_step(faults):
    _, records, _ = faults
    for record in records:
        assert record["mismatched_features"]["error"] == "ValueError"
        assert "same number of features on every rank" in record["mismatched_features"]["message"]
        assert "4 on rank 0, 5 on rank 1" in record["mismatched_features"]["message"]


def test_the_process_group_still_works_after_caught_failures(faults):
    _, records, _ = faults
    assert records[0]["still_works"]["error"] is None and records[1]["still_works"]["error"] is None


def test_a_stuck_rank_times_out(tmp_path):
    """Rank 1 never joins: rank 0 raises after its 1.5 s timeout instead of hanging."""
    results = _plain_launch("timeout", tmp_path)
    assert results[0].returncode != 0
    assert "RankFailedError" in results[0].stderr and "did not complete within 1.5 s" in results[0].stderr
    assert json.loads((tmp_path / "timeout.rank0.json").read_text())["seconds"] < 6


# --------------------------------------------------------------------------------------
# In this process: the switch and the row hash
# --------------------------------------------------------------------------------------


def test_data_parallel_needs_a_process_group():
    if dist.is_initialized():
        pytest.skip("a process group is initialised in this process")
    assert current() is None
    with pytest.raises(RuntimeError, match="init_process_group"), data_parallel():
        pass


def test_timeout_is_validated():
    from idefender_gpu.distributed import _check_timeout

    assert _check_timeout(None) is None
    assert _check_timeout(2) == datetime.timedelta(seconds=2)
    assert _check_timeout(datetime.timedelta(minutes=1)).total_seconds() == 60
    with pytest.raises(ValueError, match="positive"):
        _check_timeout(0)
    with pytest.raises(TypeError, match="timeout"):
        _check_timeout("10")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_row_keys_follow_the_rows_not_their_positions(dtype):
    """The seeding sample cannot depend on the sharding: a row's key is a function of its
    values only (any batch, any position), distinct rows get distinct keys."""
    from idefender_gpu.mixture._distributed import _RowHash

    X = torch.randn(500, 7, generator=torch.Generator().manual_seed(0), dtype=dtype)
    keys = _RowHash(seed=5, memory_budget=2048).keys(X)  # several chunks
    perm = torch.randperm(500, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(_RowHash(5, None).keys(X[perm].reshape(4, 125, 7)).reshape(-1), keys[perm],
                               rtol=0, atol=0)
    assert keys.unique().numel() == 500 and bool((keys >= 0).all())
    assert not torch.equal(_RowHash(6, None).keys(X), keys)  # the seed salts the hash
    u = _RowHash(5, None).uniforms(keys, 3, dtype)
    assert u.shape == (500, 3) and bool(((u > 0) & (u < 1)).all()) and abs(float(u.mean()) - 0.5) < 0.05

