"""One rank of the data-parallel tests (``tests/test_distributed.py``); not collected by pytest.

Run as ``torchrun --nproc_per_node=2 tests/_distributed_worker.py MODE OUT`` (env://
rendezvous), or as plain processes with ``RANK``/``WORLD_SIZE`` set and a third argument
``file://...`` (the failure tests, so that each rank's own exit status and stderr can be
read). Every scenario writes ``OUT/<scenario>.rank<r>.npz`` (or ``.json``); the test
compares them with single-process fits computed from the same data (:func:`scenario_data`).

MODE ``parity``: fits to compare; ``faults``: failures caught and recorded, then one left
uncaught (both processes must exit non-zero); ``timeout``: rank 1 never joins, rank 0 must
give up after its ``timeout``.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import time
import warnings

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from conftest import make_blobs

WORLD = 2
TIMEOUT = 30.0  # seconds: the failure scenarios must end far sooner


# --------------------------------------------------------------------------------------
# Data and shards, shared with the test (which fits the same data in one process)
# --------------------------------------------------------------------------------------


def scenario_data():
    """Single mixture ``X (600, 4)``; three groups ``Xg, yg`` of 150/300/110 samples;
    overlapping clusters, so that EM takes many iterations."""
    X, _ = make_blobs(600, 4, 3, seed=3, spread=1.0)
    Xg, yg = make_blobs([150, 300, 110], 4, 2, seed=1, spread=1.0)
    perm = np.random.default_rng(0).permutation(len(Xg))
    return X, Xg[perm], yg[perm]


def single_shard(n: int, rank: int) -> np.ndarray:
    """Uneven contiguous shards: 65% / 35%."""
    cut = int(0.65 * n)
    return np.arange(cut) if rank == 0 else np.arange(cut, n)


def group_shard(y: np.ndarray, rank: int) -> np.ndarray:
    """Group 2 only on rank 0; the other groups split unevenly and interleaved."""
    index = np.arange(len(y))
    other = index[y != 2]
    mine = other[(np.arange(len(other)) % 3 == 0)] if rank == 1 else other[(np.arange(len(other)) % 3 != 0)]
    if rank == 0:
        mine = np.concatenate([mine, index[y == 2]])
    return np.sort(mine)


def inits(X, y, covariance_type, batched):
    """A quick fit's parameters, perturbed: every component alive, EM still has work."""
    from idefender_gpu.mixture import BatchedGaussianMixture, GaussianMixture

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if batched:
            ref = BatchedGaussianMixture(2, covariance_type=covariance_type, random_state=0,
                                         device="cpu").fit(X, y)
        else:
            ref = GaussianMixture(3, covariance_type=covariance_type, random_state=0, device="cpu").fit(X)
    return dict(weights_init=ref.weights_, means_init=ref.means_ * 0.8 + 0.3,
                precisions_init=ref.precisions_, covariance_type=covariance_type)


COMMON = dict(tol=1e-6, max_iter=60, device="cpu")
#: EM from explicit inits runs many iterations: the parity covers the whole path.
PARITY = dict(tol=1e-9, max_iter=200, device="cpu")
COVARIANCE_TYPES = ("full", "tied", "diag", "spherical")


def detector_data():
    """Three classes in 8-D, two well separated sub-clusters each (as in test_detector)."""
    g = torch.Generator().manual_seed(0)
    C, D, n = 3, 8, 160
    y = torch.arange(C).repeat_interleave(n)
    side = (torch.randint(0, 2, (C * n,), generator=g) * 2 - 1).double()
    x = 10.0 * torch.eye(C, D, dtype=torch.float64)[y] + 3.0 * side[:, None] * torch.eye(D, dtype=torch.float64)[5] \
        + torch.randn(C * n, D, generator=g, dtype=torch.float64)
    return x, y


def detector_model():
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def detector_kwargs(n_components):
    return dict(n_components=n_components, random_state=0, dtype="float64", progress=False, tol=1e-6)


# --------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------


def mixture_result(m) -> dict:
    out = {name: np.asarray(getattr(m, name)) for name in
           ("weights_", "means_", "covariances_", "precisions_cholesky_", "n_iter_", "lower_bound_",
            "converged_")}
    bounds = m.lower_bounds_
    if bounds and not np.isscalar(bounds[0]):  # batched: one array (or tensor) per group
        for g, b in enumerate(bounds):
            out[f"lower_bounds_{g}"] = b
    else:
        out["lower_bounds_"] = np.asarray(bounds)
    return out


def save(out_dir, name, rank, values):
    np.savez(os.path.join(out_dir, f"{name}.rank{rank}.npz"), **values)


# --------------------------------------------------------------------------------------
# Modes
# --------------------------------------------------------------------------------------


def parity(out_dir, rank):
    import torch.distributed as dist
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    from idefender_gpu import IDefender
    from idefender_gpu.detector import _io
    from idefender_gpu.distributed import data_parallel
    from idefender_gpu.mixture import BatchedGaussianMixture, GaussianMixture

    X, Xg, yg = scenario_data()
    mine, gmine = single_shard(len(X), rank), group_shard(yg, rank)
    alone = dist.new_group([0])  # rank 0 alone: the same data-parallel algorithm in a world of one
    timings = {}

    def timed(name, fn):
        tic = time.perf_counter()
        fn()
        timings[name] = time.perf_counter() - tic

    def gm_inits():
        for ctype in COVARIANCE_TYPES:
            kwargs = dict(**inits(X, None, ctype, False), **PARITY)  # outside: a plain fit
            with data_parallel(timeout=TIMEOUT):
                gm = GaussianMixture(3, **kwargs).fit(X[mine])
            save(out_dir, f"gm_{ctype}_inits", rank, mixture_result(gm))

    def gm_kmeans():
        kwargs = dict(covariance_type="full", random_state=0, **COMMON)
        with data_parallel(timeout=TIMEOUT):
            gm = GaussianMixture(3, **kwargs).fit(X[mine])
            labels = gm.predict(X[mine])
            fit_predict = GaussianMixture(3, **kwargs).fit_predict(X[mine])
        save(out_dir, "gm_kmeans", rank, {**mixture_result(gm), "fit_predict": fit_predict, "predict": labels})
        if rank == 0:
            with data_parallel(alone, timeout=TIMEOUT):
                save(out_dir, "gm_kmeans_world1", 0, mixture_result(GaussianMixture(3, **kwargs).fit(X)))
        for method in ("k-means++", "random", "random_from_data"):  # n_init=2: the generator stays in step
            kwargs = dict(covariance_type="diag", init_params=method, n_init=2, random_state=3, **COMMON)
            with data_parallel(timeout=TIMEOUT):
                gm = GaussianMixture(3, **kwargs).fit(X[mine])
            save(out_dir, f"gm_{method}", rank, mixture_result(gm))
            if rank == 0:
                with data_parallel(alone, timeout=TIMEOUT):
                    save(out_dir, f"gm_{method}_world1", 0, mixture_result(GaussianMixture(3, **kwargs).fit(X)))

    def batched():
        kwargs = dict(**inits(Xg, yg, "full", True), **PARITY)
        with data_parallel(timeout=TIMEOUT):
            bgm = BatchedGaussianMixture(2, **kwargs).fit(Xg[gmine], yg[gmine])
        save(out_dir, "batched_inits", rank, mixture_result(bgm))
        with data_parallel(timeout=TIMEOUT):  # blocks of groups, parameters kept on a storage device
            bgm = BatchedGaussianMixture(2, group_block_size=2, storage_device="cpu", **kwargs).fit(
                Xg[gmine], yg[gmine])
        save(out_dir, "batched_blocks", rank, mixture_result(bgm))
        for ctype in ("full", "diag"):
            kwargs = dict(covariance_type=ctype, random_state=0, **COMMON)
            with data_parallel(timeout=TIMEOUT):
                bgm = BatchedGaussianMixture(2, **kwargs).fit(Xg[gmine], yg[gmine])
            save(out_dir, f"batched_kmeans_{ctype}", rank, mixture_result(bgm))
            if rank == 0:
                with data_parallel(alone, timeout=TIMEOUT):
                    ref = BatchedGaussianMixture(2, **kwargs).fit(Xg, yg)
                save(out_dir, f"batched_kmeans_{ctype}_world1", 0, mixture_result(ref))

    def stream():
        sizes = (37, 5, 64, 1, 90)
        Xs, ys = Xg[gmine], yg[gmine]
        batches, start, i = [], 0, rank
        while start < len(Xs):
            stop = start + sizes[i % len(sizes)]
            batches.append((torch.from_numpy(Xs[start:stop]), torch.from_numpy(ys[start:stop])))
            start, i = stop, i + 1
        kwargs = dict(**inits(Xg, yg, "full", True), **PARITY)
        with data_parallel(timeout=TIMEOUT):
            bgm = BatchedGaussianMixture(2, **kwargs).fit_stream(batches)
        save(out_dir, "stream_inits", rank, mixture_result(bgm))
        with data_parallel(timeout=TIMEOUT):
            bgm = BatchedGaussianMixture(2, covariance_type="full", random_state=0, **COMMON).fit_stream(batches)
        save(out_dir, "stream_kmeans", rank, mixture_result(bgm))

    def detector():
        x, y = detector_data()
        dataset = TensorDataset(x, y)
        # shuffled shards of 240 samples each (480 = 2 * 240: no padding by repetition)
        sampler = DistributedSampler(dataset, num_replicas=WORLD, rank=rank, shuffle=True, seed=1)
        writes = []
        original = _io.write_detector_file

        def counting(path, config, tensors):
            writes.append(str(path))
            original(path, config, tensors)

        def result(det, n_writes):
            layer = det.layers_[0]
            return {"thresholds": det.thresholds_.numpy(), "weights": det.weights_[layer].numpy(),
                    "means": det.means_[layer].numpy(), "prec_chol": det.precisions_cholesky_[layer].numpy(),
                    "scores": det.score(x).numpy(), "writes": np.array(n_writes)}

        _io.write_detector_file = counting
        try:
            for K in (1, 2):
                del writes[:]
                with data_parallel(timeout=TIMEOUT):
                    det = IDefender(detector_model(), **detector_kwargs(K))
                    det.fit(DataLoader(dataset, batch_size=50, sampler=sampler))
                    det.save(os.path.join(out_dir, f"detector_k{K}.safetensors"))
                save(out_dir, f"detector_k{K}", rank, result(det, len(writes)))
        finally:
            _io.write_detector_file = original
        if rank == 0:  # K = 2 in a world of one, on the whole loader
            with data_parallel(alone, timeout=TIMEOUT):
                det = IDefender(detector_model(), **detector_kwargs(2)).fit(DataLoader(dataset, batch_size=50))
            save(out_dir, "detector_k2_world1", 0, result(det, 0))

    for name, fn in (("gm_inits", gm_inits), ("gm_kmeans", gm_kmeans), ("batched", batched),
                     ("stream", stream), ("detector", detector)):
        timed(name, fn)
    with open(os.path.join(out_dir, f"timings.rank{rank}.json"), "w") as f:
        json.dump(timings, f)


def faults(out_dir, rank):
    from idefender_gpu import kernels
    from idefender_gpu.distributed import data_parallel
    from idefender_gpu.mixture import BatchedGaussianMixture, GaussianMixture

    X, Xg, yg = scenario_data()
    mine = single_shard(len(X), rank)
    record = {}

    def attempt(name, fn):
        tic = time.perf_counter()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with data_parallel(timeout=TIMEOUT):
                    fn()
            record[name] = {"error": None}
        except Exception as exc:  # noqa: BLE001 - recorded for the test
            record[name] = {"error": type(exc).__name__, "message": str(exc)}
        record[name]["seconds"] = time.perf_counter() - tic

    # mismatched number of features, found before the first E-step
    shard = X[mine] if rank == 0 else np.hstack([X[mine], X[mine, :1]])
    attempt("mismatched_features", lambda: GaussianMixture(3, **COMMON).fit(shard))
    # NaN in rank 1's shard
    bad = X[mine].copy()
    if rank == 1:
        bad[5, 2] = np.nan
    attempt("nan", lambda: GaussianMixture(3, **COMMON).fit(bad))
    # a failure inside rank 1's third E-step
    original, calls = kernels.em_pass, []

    def failing(*args, **kwargs):
        calls.append(1)
        if rank == 1 and len(calls) == 3:
            raise RuntimeError("injected failure in the E-step")
        return original(*args, **kwargs)

    kernels.em_pass = failing
    try:
        attempt("em_step", lambda: GaussianMixture(3, **COMMON).fit(X[mine]))
    finally:
        kernels.em_pass = original
    # an empty stream on rank 1
    batches = [(Xg[:100], yg[:100])] if rank == 0 else []
    attempt("empty_stream", lambda: BatchedGaussianMixture(2, **COMMON).fit_stream(batches))
    # labels out of range in rank 1's loader, while collecting the detector's hidden states
    from torch.utils.data import DataLoader, TensorDataset

    from idefender_gpu import IDefender

    x, y = detector_data()
    y = y.clone()
    if rank == 1:
        y[7] = 5
    attempt("detector_labels", lambda: IDefender(detector_model(), **detector_kwargs(1)).fit(
        DataLoader(TensorDataset(x[rank::2], y[rank::2]), batch_size=50)))
    # the group still works after all of this
    attempt("still_works", lambda: GaussianMixture(3, **COMMON).fit(X[mine]))
    with open(os.path.join(out_dir, f"faults.rank{rank}.json"), "w") as f:
        json.dump(record, f)
    # finally an uncaught failure: both processes must exit with an error
    with data_parallel(timeout=TIMEOUT):
        GaussianMixture(3, **COMMON).fit(bad)


def timeout(out_dir, rank):
    from idefender_gpu.distributed import data_parallel
    from idefender_gpu.mixture import GaussianMixture

    X, _, _ = scenario_data()
    done = os.path.join(out_dir, "timeout.rank0.json")
    if rank == 1:  # stuck: never joins; leaves without a word once rank 0 has given up
        deadline = time.monotonic() + 60
        while not os.path.exists(done) and time.monotonic() < deadline:
            time.sleep(0.1)
        os._exit(0)
    tic = time.perf_counter()
    try:
        with data_parallel(timeout=1.5):
            GaussianMixture(3, **COMMON).fit(X[single_shard(len(X), rank)])
    finally:
        with open(done + ".tmp", "w") as f:
            json.dump({"seconds": time.perf_counter() - tic}, f)
        os.replace(done + ".tmp", done)


def main():
    import torch.distributed as dist

    mode, out_dir = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    init = sys.argv[3] if len(sys.argv) > 3 else "env://"
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        {"parity": parity, "faults": faults, "timeout": timeout}[mode](out_dir, rank)
    finally:
        if mode != "timeout":
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
