"""Data-parallel EM scaling on CPU: one process against two gloo processes, same workload.

Workload: ``GaussianMixture(K, covariance_type='full')`` on N samples of D features, a
fixed number of EM iterations (``tol=0``, explicit initial parameters, so no k-means and
no early stop), float64. Configurations:

* ``plain``: one process, no torch.distributed (the ordinary fit), 1 and 2 threads;
* ``dp1``: ``data_parallel`` in a world of one (1 and 2 threads): the data-parallel
  machinery's own overhead;
* ``dp2``: ``data_parallel`` over two processes, one thread each: the same two cores as
  ``plain`` with 2 threads.

Each configuration runs in fresh processes (plain processes with a ``file://`` rendezvous,
as torchrun would start them), warms up with one iteration, then times one fit. The
configurations run in ``rounds``, interleaved (rotated order each round), so that a change
of load on a shared machine does not favour one of them; the fastest round counts.
Results go to a fresh ``results/bench-distributed-<UTC time>/distributed_cpu.json`` (``--out``
names the file; ``--out benchmarks/results/distributed_cpu.json`` rewrites the committed one).

Usage::

    python benchmarks/bench_distributed.py [--n 200000] [--d 32] [--k 8] [--iters 10] [--rounds 3]

The CPU of a shared machine is noisy: compare figures from the same run only.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings

import numpy as np
import torch

#: The committed record (README cites it); a run writes it only when ``--out`` names it.
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "distributed_cpu.json")


def _data(n: int, d: int, k: int, seed: int = 0):
    """Blobs ``(n, d)`` float64 and explicit initial parameters (the same in every process)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=3.0, size=(k, d))
    labels = rng.integers(0, k, size=n)
    X = centres[labels] + rng.normal(size=(n, d))
    init = dict(weights_init=np.full(k, 1.0 / k), means_init=centres + 0.5 * rng.normal(size=(k, d)),
                precisions_init=np.broadcast_to(np.eye(d), (k, d, d)).copy())
    return X, init


def _worker(args) -> None:
    """One process of one configuration: time the fits, rank 0 writes the result."""
    torch.set_num_threads(args.threads)
    import torch.distributed as dist

    from idefender_gpu.distributed import data_parallel
    from idefender_gpu.mixture import GaussianMixture

    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    X, init = _data(args.n, args.d, args.k)
    shard = X[rank * args.n // world:(rank + 1) * args.n // world]
    parallel = args.mode != "plain"
    if parallel:
        dist.init_process_group("gloo", init_method=args.init, rank=rank, world_size=world)

    def fit(iterations: int) -> tuple[float, float]:
        model = GaussianMixture(args.k, covariance_type="full", tol=0.0, max_iter=iterations,
                                device="cpu", dtype="float64", **init)
        if parallel:
            dist.barrier()
        tic, cpu = time.perf_counter(), time.process_time()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ConvergenceWarning: tol=0 by design
            if parallel:
                with data_parallel():
                    model.fit(shard)
            else:
                model.fit(shard)
        return time.perf_counter() - tic, time.process_time() - cpu

    fit(1)  # warm-up
    seconds, cpu_seconds = fit(args.iters)
    with open(f"{args.out}.rank{rank}", "w") as f:
        json.dump({"seconds": seconds, "cpu_seconds": cpu_seconds}, f)
    if parallel:
        dist.destroy_process_group()


def _run(config: dict, args, tmp: str, round_: int) -> tuple[float, list[float]]:
    """Wall seconds (rank 0) and CPU seconds of each rank of one timed fit of ``config``."""
    out = os.path.join(tmp, f"{config['name']}.{round_}.json")
    init = f"file://{os.path.join(tmp, config['name'] + f'.{round_}.store')}"
    env = dict(os.environ, OMP_NUM_THREADS=str(config["threads"]), MKL_NUM_THREADS=str(config["threads"]))
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--mode", config["mode"],
           "--threads", str(config["threads"]), "--out", out, "--init", init,
           "--n", str(args.n), "--d", str(args.d), "--k", str(args.k), "--iters", str(args.iters)]
    procs = [subprocess.Popen(cmd, env={**env, "RANK": str(r), "WORLD_SIZE": str(config["world"])})
             for r in range(config["world"])]
    codes = [p.wait() for p in procs]
    if any(codes):
        raise RuntimeError(f"configuration {config['name']} failed: exit codes {codes}")
    ranks = []
    for r in range(config["world"]):
        with open(f"{out}.rank{r}") as f:
            ranks.append(json.load(f))
    return ranks[0]["seconds"], [r["cpu_seconds"] for r in ranks]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--d", type=int, default=32)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=None,
                        help="JSON path (default: results/bench-distributed-<UTC time>/"
                             f"distributed_cpu.json; the committed one is {RESULTS})")
    parser.add_argument("--configs", default="plain_1thread,dp1_1thread,dp2_1thread_each,plain_2threads",
                        help="comma-separated configurations to run (also: dp1_2threads)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="plain", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--init", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args)
        return
    if args.out is None:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        args.out = os.path.join("results", f"bench-distributed-{stamp}", "distributed_cpu.json")
    configs = [
        {"name": "plain_1thread", "mode": "plain", "world": 1, "threads": 1},
        {"name": "dp1_1thread", "mode": "dp", "world": 1, "threads": 1},
        {"name": "dp2_1thread_each", "mode": "dp", "world": 2, "threads": 1},
        {"name": "plain_2threads", "mode": "plain", "world": 1, "threads": 2},
        {"name": "dp1_2threads", "mode": "dp", "world": 1, "threads": 2},
    ]
    wanted = args.configs.split(",")
    configs = [c for c in configs if c["name"] in wanted]
    load_before = os.getloadavg()
    seconds: dict[str, list[float]] = {c["name"]: [] for c in configs}
    cpu: dict[str, list[list[float]]] = {c["name"]: [] for c in configs}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            shift = round_ % len(configs)
            for config in configs[shift:] + configs[:shift]:
                wall, cpu_ranks = _run(config, args, tmp, round_)
                seconds[config["name"]].append(wall)
                cpu[config["name"]].append(cpu_ranks)
    results = []
    for c in configs:
        best = min(range(args.rounds), key=lambda i: seconds[c["name"]][i])
        results.append({**c, "seconds": seconds[c["name"]], "best_seconds": seconds[c["name"]][best],
                        "seconds_per_iteration": seconds[c["name"]][best] / args.iters,
                        "cpu_seconds_per_rank": cpu[c["name"]],
                        "cpu_seconds_per_rank_per_iteration_in_best_round":
                            [t / args.iters for t in cpu[c["name"]][best]]})
    by_name = {r["name"]: r for r in results}

    def ratio(a: str, b: str) -> float | None:
        return by_name[a]["best_seconds"] / by_name[b]["best_seconds"] if a in by_name and b in by_name else None

    D, K = args.d, args.k
    report = {
        "benchmark": "data-parallel EM, 1 vs 2 gloo processes on CPU",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "workload": {"N": args.n, "D": D, "K": K, "G": 1, "covariance_type": "full", "dtype": "float64",
                     "em_iterations": args.iters, "rounds": args.rounds, "init": "explicit (no k-means)"},
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "load_average_before": load_before, "load_average_after": os.getloadavg(),
                    "torch": torch.__version__, "note": "shared, noisy CPU (other jobs running)"},
        "allreduce_bytes_per_iteration": 8 * (K * (1 + D + D * D) + 1 + 2),
        "results": results,
        "speedup_2_processes_vs_1_process_1_thread_each": ratio("dp1_1thread", "dp2_1thread_each"),
        "speedup_2_processes_vs_plain_fit_1_thread": ratio("plain_1thread", "dp2_1thread_each"),
        "speedup_2_processes_vs_plain_fit_2_threads": ratio("plain_2threads", "dp2_1thread_each"),
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    for r in results:
        per_rank = ", ".join(f"{t * 1e3:.0f}" for t in r["cpu_seconds_per_rank_per_iteration_in_best_round"])
        print(f"{r['name']:>18}: {r['seconds_per_iteration'] * 1e3:8.1f} ms per EM iteration "
              f"(best of {args.rounds}: {r['best_seconds']:.3f} s for {args.iters}); CPU ms per "
              f"iteration per rank: {per_rank}")
    for key in ("speedup_2_processes_vs_1_process_1_thread_each", "speedup_2_processes_vs_plain_fit_1_thread",
                "speedup_2_processes_vs_plain_fit_2_threads"):
        if report[key] is not None:
            print(f"{key}: {report[key]:.2f}x")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
