"""Data-parallel EM on ``torch.distributed`` (private): the data source behind
:func:`idefender_gpu.distributed.data_parallel`.

Each rank holds a shard of the samples, in memory (the padded group layout of ``_memory.InMemorySource``)
or as a stream (``StreamSource``). One EM iteration:

1. one fused pass over the local shard (the backend's ``pass_statistics`` for a shard in
   memory, :meth:`._stream.StreamSource.pass_totals` for a stream; the dense backend's is
   :func:`idefender_gpu.kernels.em_pass`): E-step and the local sums centred on the current
   means, ``counts (G, K)``, ``first (G, K, D)``, ``second`` and the log-likelihood sums
   ``(G,)``, never the ``(G, N, K)`` responsibilities;
2. those sums, flattened with one fault flag per rank into ONE buffer, all-reduced;
3. the same M-step on every rank (:func:`kernels.statistics_to_parameters`), so every rank
   holds identical parameters and takes identical convergence decisions.

Communication per iteration: ``G*K*(1 + D + D*D) + G + world_size`` numbers for ``full``,
independent of N. The per-group sample counts are all-reduced once, before EM; the number
of features, the dtype and the largest group label are checked across ranks before the
first E-step.

Initialisation is identical on every rank and independent of how the samples are split:
each rank keeps, per group, its ``reservoir_size(K)`` rows with the smallest 62-bit hash of
their values (a universal hash salted by the seed); the keys are gathered, the global
smallest are chosen and their rows summed into place, so every rank holds the same sample,
in key order. k-means++ runs on it with the same generator everywhere and Lloyd iterations
run over all shards with all-reduced sums (:func:`._stream.initial_statistics_from_sample`,
the streaming fit's initialisation).

Faults: the local part of every collective is guarded; an exception on one rank sets its
fault flag in the buffer, and every rank raises at the same point (the EM loop reads the
flag through the Cholesky ``info`` it already synchronises on, so an iteration still costs
one host synchronisation).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from idefender_gpu import kernels
from idefender_gpu._validation import ArrayKind, check_array, resolve_device, resolve_dtype
from idefender_gpu.distributed import DataParallel
from idefender_gpu.mixture._core import (
    Config,
    Groups,
    Params,
    Request,
    finish_m_step,
    group_layout,
    labels_for_fit,
    peek,
    seed_of,
)
from idefender_gpu.mixture._stream import StreamSource, initial_statistics_from_sample, reservoir_size

#: Mersenne prime 2^31 - 1: the modulus of the row hash.
_PRIME = 2**31 - 1
#: Key of a padding row (never chosen before a real row).
_NO_KEY = torch.iinfo(torch.int64).max
_DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
_DTYPE_NAMES = {code: str(dtype).replace("torch.", "") for dtype, code in _DTYPE_CODES.items()}


# --------------------------------------------------------------------------------------
# Row hash: seeding sample and 'random' responsibilities that do not depend on the sharding
# --------------------------------------------------------------------------------------


def _halfwords(X: Tensor) -> Tensor:
    """The bits of each row as 16-bit pieces: ``(rows, D)`` float -> ``(rows, D * c)`` int64."""
    if X.dtype == torch.float64:
        bits = X.view(torch.int64)
        pieces = [(bits >> shift) & 0xFFFF for shift in (0, 16, 32, 48)]
    elif X.element_size() == 4:
        bits = X.view(torch.int32).to(torch.int64)
        pieces = [bits & 0xFFFF, (bits >> 16) & 0xFFFF]
    else:  # 16-bit floats
        pieces = [X.view(torch.int16).to(torch.int64) & 0xFFFF]
    return torch.stack(pieces, dim=-1).reshape(X.shape[0], -1)


class _RowHash:
    """62-bit keys of rows from their bits, ``h1 * p + h2`` with ``h_i = Σ_j a_ij w_j mod p``
    over the 16-bit pieces ``w_j`` of the row (``p = 2^31 - 1``; the salts ``a`` come from
    the seed). A row gets the same key on whichever rank, in whichever batch, it lies; equal
    rows get equal keys."""

    def __init__(self, seed: int, memory_budget: int | None) -> None:
        self.seed = seed
        self.memory_budget = memory_budget
        self._salts: dict[tuple[int, torch.device], Tensor] = {}

    def _salt(self, n: int, device: torch.device) -> Tensor:
        """``(2, n)`` salts of the two hashes, then ``(3, ...)`` mixing constants."""
        key = (n, device)
        if key not in self._salts:
            gen = torch.Generator().manual_seed((self.seed ^ 0x5A17_C0DE_D15E) % 2**63)
            self._salts[key] = torch.randint(1, _PRIME, (2, n), generator=gen).to(device)
        return self._salts[key]

    def keys(self, X: Tensor) -> Tensor:
        """``X (..., N, D)`` -> int64 keys ``(..., N)`` in ``[0, p^2)``."""
        rows = X.reshape(-1, X.shape[-1]).contiguous()
        n_pieces = X.shape[-1] * X.element_size() // 2  # 16-bit pieces per row
        salt = self._salt(n_pieces, X.device)
        out = torch.empty(rows.shape[0], dtype=torch.int64, device=X.device)
        step = kernels.chunk_rows(rows.shape[0], 4 * 8 * n_pieces, self.memory_budget, X.device)
        for start in range(0, rows.shape[0], step):
            pieces = _halfwords(rows[start:start + step])  # (c, n_pieces), each < 2^16
            h1 = ((pieces * salt[0]) % _PRIME).sum(-1) % _PRIME  # (c,) terms < 2^31: no overflow
            h2 = ((pieces * salt[1]) % _PRIME).sum(-1) % _PRIME
            out[start:start + step] = h1 * _PRIME + h2
        return out.reshape(X.shape[:-1])

    def uniforms(self, keys: Tensor, n: int, dtype: torch.dtype) -> Tensor:
        """``n`` numbers in ``(0, 1)`` per key: ``(..., N)`` -> ``(..., N, n)``."""
        gen = torch.Generator().manual_seed((self.seed ^ 0x0D15_7A7E) % 2**63)
        mix = torch.randint(1, _PRIME, (3, n), generator=gen).to(keys.device)
        h1, h2 = (keys // _PRIME).unsqueeze(-1), (keys % _PRIME).unsqueeze(-1)
        value = ((h1 * mix[0]) % _PRIME + (h2 * mix[1]) % _PRIME + mix[2]) % _PRIME
        return ((value.to(torch.float64) + 0.5) / _PRIME).to(dtype)


# --------------------------------------------------------------------------------------
# This rank's shard
# --------------------------------------------------------------------------------------


class _LocalMemory:
    """This rank's samples in the padded layout of all G groups (some may be empty here)."""

    def __init__(self, groups: Groups, memory_budget: int | None) -> None:
        self.groups = groups
        self._budget = memory_budget

    def accumulate(self, centres: Tensor, covariance_type: str, resp_of_batch: Callable) -> tuple:
        """Local totals of :func:`kernels.shifted_statistics` and of ``log p(x)``."""
        g = self.groups
        weight = g.weight  # (G, N), None without padding
        resp, log_prob_norm = resp_of_batch(g.X, weight, slice(None))  # (G, N, K), (G, N) | None
        if weight is not None:
            resp = resp * weight.unsqueeze(-1)
        counts, first, second = kernels.shifted_statistics(g.X, resp, centres, covariance_type,
                                                           memory_budget=self._budget)
        if log_prob_norm is None:
            log_lik = centres.new_zeros(centres.shape[0])
        elif weight is None:
            log_lik = log_prob_norm.sum(-1)  # (G,)
        else:
            log_lik = torch.where(weight > 0, log_prob_norm, 0).sum(-1)
        return counts, first, second, log_lik

    def em_totals(self, params: Params, cfg: Config) -> tuple:
        """One fused pass of the backend: local ``(counts, first, second, Σ log p(x))``."""
        g = self.groups
        log_lik, counts, first, second = cfg.backend.pass_statistics(
            g.X, g.weight, params, cfg.covariance_type, cfg.memory_budget)
        return counts, first, second, log_lik

    def reservoir(self, size: int, row_hash: _RowHash) -> tuple[Tensor, Tensor]:
        """Per group, the ``size`` local rows with the smallest keys: keys ``(G, size)``
        (ascending, ``_NO_KEY`` for missing rows) and rows ``(G, size, D)`` (zeros there)."""
        X, weight = self.groups.X, self.groups.dense_weight()
        keys = row_hash.keys(X).masked_fill(weight == 0, _NO_KEY)  # (G, N)
        if keys.shape[1] < size:
            missing = size - keys.shape[1]
            keys = torch.cat([keys, keys.new_full((keys.shape[0], missing), _NO_KEY)], dim=1)
            X = torch.cat([X, X.new_zeros(X.shape[0], missing, X.shape[2])], dim=1)
        chosen_keys, chosen = keys.topk(size, dim=1, largest=False)  # (G, size), sorted
        rows = torch.gather(X, 1, chosen.unsqueeze(-1).expand(-1, -1, X.shape[2]))
        return chosen_keys, rows

    def block(self, start: int, stop: int, device: torch.device) -> _LocalMemory:
        return _LocalMemory(self.groups.block(start, stop, device), self._budget)


class _LocalStream:
    """This rank's batches (a ``StreamSource`` whose reservoir keys are row hashes)."""

    def __init__(self, stream: StreamSource, n_groups: int) -> None:
        self.stream = stream
        self.n_groups = n_groups

    def accumulate(self, centres: Tensor, covariance_type: str, resp_of_batch: Callable) -> tuple:
        return self.stream._accumulate(centres, covariance_type, resp_of_batch)

    def em_totals(self, params: Params, cfg: Config) -> tuple:
        return self.stream.pass_totals(params, cfg)

    def reservoir(self, size: int, row_hash: _RowHash) -> tuple[Tensor, Tensor]:
        keys, rows = self.stream.sample_keys, self.stream.sample  # (G_local, size), (G_local, size, D)
        missing = self.n_groups - keys.shape[0]
        if missing:
            keys = torch.cat([keys, keys.new_full((missing, size), _NO_KEY)])
            rows = torch.cat([rows, rows.new_zeros(missing, size, rows.shape[2])])
        return keys, rows

    def block(self, start: int, stop: int, device: torch.device):
        return self.stream.block(start, stop, device)  # raises: not supported by fit_stream


# --------------------------------------------------------------------------------------
# The data-parallel data source
# --------------------------------------------------------------------------------------


def _statistics_shapes(G: int, K: int, D: int, covariance_type: str) -> list[tuple[int, ...]]:
    """Shapes of ``(counts, first, second, log_lik)``: :func:`kernels.statistics_shapes` + ``(G,)``."""
    return [*kernels.statistics_shapes(covariance_type, G, K, D), (G,)]


class DistributedSource:
    """An EM data source over the shards of all ranks (see the module docstring).

    Parameters
    ----------
    setting : DataParallel
    local : _LocalMemory or _LocalStream
        This rank's shard.
    counts : Tensor of shape (G,)
        Global sample counts per group (all-reduced), compute dtype and device.
    seed : int
        Rank 0's seed from ``random_state``: the initialisation's generator and the row hash.
    n_features : int
    memory_budget : int or None
    device : torch.device
        The compute device.
    kind : ArrayKind
        How this rank's input arrived.
    """

    def __init__(self, setting: DataParallel, local, counts: Tensor, seed: int, n_features: int,
                 memory_budget: int | None, device: torch.device, kind: ArrayKind) -> None:
        self.setting = setting
        self.local = local
        self.counts = counts
        self.device = device
        self.kind = kind
        self.seed = seed
        self.n_features = n_features
        self._budget = memory_budget
        self._hash = _RowHash(seed, memory_budget)
        self._sample: tuple[Tensor, Tensor] | None = None
        self._fault: tuple[Tensor, BaseException | None] | None = None

    def make_generator(self, random_state: Any, device: torch.device) -> torch.Generator:
        """The initialisation's generator, from rank 0's seed (the same on every rank)."""
        generator = torch.Generator(device=device)
        generator.manual_seed(self.seed)
        return generator

    def block(self, start: int, stop: int, device: torch.device) -> DistributedSource:
        return DistributedSource(self.setting, self.local.block(start, stop, device),
                                 self.counts[start:stop].to(device), self.seed, self.n_features,
                                 self._budget, device, self.kind)

    @property
    def groups(self) -> Groups:
        """This rank's samples in the padded layout (an in-memory shard only)."""
        return self.local.groups

    def _accumulate(self, centres: Tensor, covariance_type: str, resp_of_batch: Callable,
                    what: str = "a pass of the initialisation") -> list[Tensor]:
        """Totals over all ranks of the local :meth:`accumulate` (one all-reduce)."""
        G, K, D = centres.shape
        return self.setting.sum_parts(
            lambda: self.local.accumulate(centres, covariance_type, resp_of_batch),
            _statistics_shapes(G, K, D, covariance_type), centres.dtype, centres.device, what)

    # -- EM ------------------------------------------------------------------------------

    def em_step(self, params: Params, cfg: Config):
        """One iteration: mean log-likelihood ``(G,)``, new parameters, Cholesky ``info``
        (set to -1 everywhere when a rank failed; :meth:`check_info` then raises)."""
        ctype = cfg.covariance_type
        G, K, D = params.means.shape
        (counts, first, second, log_lik), flags, exc = self.setting.reduce_parts(
            lambda: self.local.em_totals(params, cfg),
            _statistics_shapes(G, K, D, ctype), params.means.dtype, params.means.device,
            "an EM iteration")
        stats = kernels.statistics_to_parameters(counts, first, second, params.stats_centres, cfg.reg_covar,
                                                 ctype)
        new_params, info = finish_m_step(*stats, cfg)
        self._fault = (flags, exc)
        info = torch.where(flags.any(), torch.full_like(info, -1), info)  # no host sync here
        return log_lik / self.counts, new_params, info

    def check_info(self, info: Tensor, covariance_type: str, dtype: torch.dtype, failed: Tensor) -> None:
        """Raise on every rank for a failed rank, else for a failed Cholesky factorisation."""
        if self._fault is not None:
            flags, exc = self._fault
            self.setting.check(flags, exc, "an EM iteration (the E-step on its shard)")
        kernels.check_cholesky_info(info, covariance_type, dtype, failed)

    # -- initialisation --------------------------------------------------------------------

    def _seeding_sample(self, n_components: int) -> tuple[Tensor, Tensor]:
        """The same ``(G, R, D)`` sample and ``(G, R)`` weights on every rank (cached)."""
        if self._sample is not None:
            return self._sample
        setting, counts = self.setting, self.counts
        G, D, R, W = counts.shape[0], self.n_features, reservoir_size(n_components), setting.world_size
        local: dict[str, Tensor] = {}

        def own_keys():
            keys, local["rows"] = self.local.reservoir(R, self._hash)  # (G, R), (G, R, D)
            table = torch.zeros(W, G, R, dtype=torch.int64, device=counts.device)
            table[setting.rank] = keys
            return [table]

        (table,) = setting.sum_parts(own_keys, [(W, G, R)], torch.int64, counts.device,
                                     "gathering the seeding sample's keys")
        merged = table.permute(1, 0, 2).reshape(G, W * R)  # (G, W * R)
        chosen_keys, chosen = merged.topk(R, dim=1, largest=False)  # (G, R), ascending keys
        owner, slot = chosen // R, chosen % R

        def own_rows():
            rows = torch.gather(local["rows"], 1, slot.unsqueeze(-1).expand(-1, -1, D))  # (G, R, D)
            return [torch.where((owner == setting.rank).unsqueeze(-1), rows, 0)]

        (sample,) = setting.sum_parts(own_rows, [(G, R, D)], counts.dtype, counts.device,
                                      "gathering the seeding sample's rows")
        self._sample = (sample, (chosen_keys != _NO_KEY).to(counts.dtype))
        return self._sample

    def initial_statistics(self, method: str, gen: torch.Generator, cfg: Config) -> tuple[Tensor, Tensor, Tensor]:
        """``(nk, means, covariances)`` of ``init_params``, identical on every rank."""
        sample, weight = self._seeding_sample(cfg.n_components)
        K = cfg.n_components

        def random_resp(Xp, w, present):
            resp = self._hash.uniforms(self._hash.keys(Xp), K, Xp.dtype)  # (G, N, K)
            return resp / resp.sum(-1, keepdim=True), None

        return initial_statistics_from_sample(method, gen, cfg, sample, weight, self._accumulate,
                                              random_resp)


# --------------------------------------------------------------------------------------
# Entry points (called by the estimators' fit / fit_stream inside data_parallel)
# --------------------------------------------------------------------------------------


def _agree(table: list[list[int]], estimator_name: str) -> tuple[int, int, int]:
    """Check ``[n_features, n_groups, n_samples, dtype code]`` rows across ranks;
    returns ``(n_features, G, total samples)``."""
    features = [row[0] for row in table]
    if len(set(features)) > 1:
        got = ", ".join(f"{d} on rank {r}" for r, d in enumerate(features))
        raise ValueError(
            f"X must have the same number of features on every rank of a data-parallel fit of "
            f"{estimator_name}; got {got}"
        )
    codes = [row[3] for row in table]
    if len(set(codes)) > 1:
        got = ", ".join(f"{_DTYPE_NAMES.get(c, c)} on rank {r}" for r, c in enumerate(codes))
        raise ValueError(
            f"the compute dtype must be the same on every rank of a data-parallel fit; got {got} "
            "(pass dtype= to the estimator)"
        )
    n_total = sum(row[2] for row in table)
    if n_total < 2:
        raise ValueError(
            f"Found {n_total} sample(s) over all ranks while a minimum of 2 is required by "
            f"{estimator_name}."
        )
    return features[0], max(row[1] for row in table), n_total


def _global_counts(setting: DataParallel, local_counts: Callable[[], Tensor], G: int, dtype: torch.dtype,
                   device: torch.device) -> Tensor:
    """``(G,)`` sample counts over all ranks (summed exactly, in float64)."""
    (counts,) = setting.sum_parts(lambda: [local_counts().to(torch.float64)], [(G,)], torch.float64,
                                  device, "counting the samples of each group")
    return counts.to(dtype)


def open_memory_shard(request: Request, X: Any, y: Any, setting: DataParallel) -> DistributedSource:
    """The data-parallel source of ``fit`` on this rank's shard ``X`` (``y``): validate
    locally, agree across ranks, count the groups over all ranks."""
    name = request.estimator_name

    def validate():
        raw, kind = peek(X)
        dtype = resolve_dtype(request.dtype, raw)
        device = resolve_device(request.device, raw, kind.numpy)
        X_t, kind = check_array(X, dtype=dtype, device=request.storage(device),
                                estimator_name=name, ensure_min_samples=1)
        n_samples, D = X_t.shape
        y_t, n_groups = labels_for_fit(request, y, n_samples, device)
        return ([D, n_groups, n_samples, _DTYPE_CODES.get(dtype, -1), seed_of(request.random_state)],
                (X_t, y_t, kind, device, dtype))

    (X_t, y_t, kind, device, dtype), table = setting.exchange(
        validate, 5, "validating its shard of the samples")
    D, G, _ = _agree([row[:4] for row in table], name)
    seed = table[0][4]  # rank 0's draw when random_state is None
    layout: dict[str, Any] = {}

    def local_counts() -> Tensor:
        layout["value"] = group_layout(X_t, y_t, G)
        return layout["value"][0].counts

    counts = _global_counts(setting, local_counts, G, dtype, device)
    groups = layout["value"][0]
    return DistributedSource(setting, _LocalMemory(groups, request.memory_budget), counts, seed, D,
                             request.memory_budget, device, kind)


def open_stream_shard(request: Request, data: Any, setting: DataParallel) -> DistributedSource:
    """The data-parallel source of ``fit_stream`` on this rank's batches: one first pass
    per rank (validation, counts, hash-keyed reservoir), agreement across ranks."""
    name = request.estimator_name
    _, seeds = setting.exchange(lambda: ([seed_of(request.random_state)], None), 1,
                                "drawing the random seed")
    seed = seeds[0][0]
    row_hash = _RowHash(seed, request.memory_budget)

    def first_pass():
        stream = StreamSource(
            data, request,
            lambda device: torch.Generator(device=device).manual_seed(seed),
            row_keys=row_hash.keys,
        )
        return ([stream.n_features, stream.counts.shape[0], int(stream.counts.sum()),
                 _DTYPE_CODES.get(stream.dtype, -1)], stream)

    stream, table = setting.exchange(first_pass, 4, "reading its batches (first pass)")
    D, G, _ = _agree(table, name)

    def local_counts() -> Tensor:
        counts = stream.counts.to(torch.float64)
        return torch.cat([counts, counts.new_zeros(G - counts.shape[0])])

    counts = _global_counts(setting, local_counts, G, stream.dtype, stream.device)
    return DistributedSource(setting, _LocalStream(stream, G), counts, seed, D, request.memory_budget,
                             stream.device, stream.kind)
