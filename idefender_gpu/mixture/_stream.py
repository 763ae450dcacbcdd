"""Streaming EM: fit from batches that are re-read on every pass (private).

Exact EM, one pass over the data per iteration: each batch is scored under the current
parameters of the groups it holds, and its sufficient statistics, centred on the current
means (:func:`idefender_gpu.kernels.shifted_statistics`), are added to per-group totals;
the M-step turns the totals into the new parameters. The samples are never all in
memory, and the result equals the in-memory fit on the same data (to round-off).

Initialisation from the stream: a first pass validates the batches, counts each group's
samples and keeps a uniform sample of at most ``RESERVOIR_SIZE(K)`` rows per group (a
bottom-k sketch of random keys). ``random_from_data`` and ``k-means++`` pick their seeds
in that sample; ``kmeans`` seeds k-means++ on it, then runs Lloyd passes over the stream;
``random`` draws random responsibilities during one pass.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator

import torch
from torch import Tensor

from idefender_gpu import kernels
from idefender_gpu._validation import ArrayKind, _to_tensor_any, check_array, check_labels, resolve_device, resolve_dtype
from idefender_gpu.mixture._core import (
    Config,
    Params,
    Request,
    finish_m_step,
    make_generator,
    padded,
    peek,
    present_groups,
)
from idefender_gpu.mixture._kmeans import _sq_dist, kmeans_plusplus


def _to_device(tensor: Tensor, device: torch.device, dtype: torch.dtype | None = None) -> Tensor:
    """``tensor`` on ``device`` (in ``dtype``). A CPU tensor bound for CUDA goes through
    pinned memory, asynchronously: a copy from pageable memory would synchronise the
    stream (wait for the work queued so far) on every batch. Batches from a
    ``DataLoader(pin_memory=True)`` are pinned already and are not copied on the host."""
    if device.type == "cuda" and tensor.device.type == "cpu":
        if dtype is not None and tensor.dtype != dtype:
            tensor = tensor.to(dtype)  # cast on the host: the copy then moves final bytes only
        if not tensor.is_pinned():
            tensor = tensor.pin_memory()
        return tensor.to(device=device, non_blocking=True)
    return tensor.to(device=device, dtype=dtype)


def reservoir_size(n_components: int) -> int:
    """Rows kept per group for seeding: ``max(256, 20 K)``."""
    return max(256, 20 * n_components)


class StreamSource:
    """Re-iterable batches of ``X`` or ``(X, y)`` as an EM data source
    (a :class:`~idefender_gpu.mixture._core.DataSource`).

    The first pass (at construction) validates every batch (finite values, the number of
    features, labels in range), resolves the dtype, device and G, counts each group's
    samples and keeps the seeding sample. Later passes trust what the first pass checked
    and make no host synchronisation of their own when the labels arrive on the CPU (as
    from a ``DataLoader``): the layout of each batch's groups is computed there and only
    the samples and their indices move to the device. Labels on the device cost one
    synchronisation per batch (``torch.unique``).

    Parameters
    ----------
    data : iterable or callable
        Re-iterable batches (a DataLoader, a list), or a callable returning a fresh
        iterable. Each batch is ``X``, ``(X,)`` or ``(X, y)``.
    request : Request
        The estimator's settings (``batched``: whether ``y`` holds group labels; otherwise
        it is ignored and every sample belongs to group 0).
    parent_generator : callable
        ``device -> torch.Generator``; the reservoir's random keys come from a generator
        derived from it.
    row_keys : callable, optional
        ``Xp (u, n, D) -> (u, n)`` int64 keys of the rows; the reservoir keeps the rows with
        the smallest keys. Default: random keys from the generator (the data-parallel fit
        passes a hash of each row's values, the same whichever rank holds the row).
    """

    make_generator = staticmethod(make_generator)
    check_info = staticmethod(kernels.check_cholesky_info)

    def __init__(self, data, request: Request, parent_generator: Callable,
                 row_keys: Callable | None = None) -> None:
        if isinstance(data, Iterator):
            raise TypeError(
                "data must be re-iterable (a DataLoader, a list of batches, or a callable "
                "returning an iterable): it is read once per EM iteration; got a one-shot "
                f"iterator ({type(data).__name__})"
            )
        if not (callable(data) or isinstance(data, Iterable)):
            raise TypeError(f"data must be an iterable of batches; got {type(data).__name__}")
        self._data = data
        self._batched = request.batched
        self._n_groups = request.n_groups
        self._name = request.estimator_name
        self._budget = request.memory_budget
        self._row_keys = row_keys
        self.n_components = request.n_components
        self.dtype, self.device = request.dtype, request.device
        self.kind: ArrayKind | None = None
        self.n_features: int | None = None
        self._first_pass(parent_generator)

    # -- reading -------------------------------------------------------------------------

    def _iterate(self) -> Iterator[tuple[Any, Any]]:
        data = self._data() if callable(self._data) else self._data
        for batch in data:
            if isinstance(batch, (tuple, list)):
                yield batch[0], (batch[1] if len(batch) > 1 else None)
            else:
                yield batch, None

    def _validated_batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        """The first pass: validated ``(X (B, D), y (B,))`` on the compute device and dtype."""
        for X, y in self._iterate():
            X_t, kind = check_array(X, dtype=self.dtype, device=self.device,
                                    estimator_name=self._name, n_features=self.n_features)
            if self.kind is None:
                self.kind = kind
            if self._batched:
                y_t = check_labels(y, X_t.shape[0], X_t.device, self._n_groups)
            else:
                y_t = torch.zeros(X_t.shape[0], dtype=torch.int64, device=X_t.device)
            if X_t.shape[0]:
                yield X_t, y_t

    def _batches(self) -> Iterator[tuple[Tensor, Tensor | None, Tensor]]:
        """A later pass: ``(Xp (u, n, D), weight (u, n) or None, present (u,))`` per batch,
        the padded layout of the groups the batch holds (already validated: no checks)."""
        whole = torch.zeros(1, dtype=torch.int64, device=self.device)  # group 0
        for X, y in self._iterate():
            X_t, _ = _to_tensor_any(X, "X")
            if X_t.ndim != 2 or X_t.shape[1] != self.n_features:
                raise ValueError(
                    f"X must have shape (batch, {self.n_features}) on every pass, as on the "
                    f"first; got shape {tuple(X_t.shape)}"
                )
            if not X_t.shape[0]:
                continue
            X_t = _to_device(X_t, self.device, self.dtype)
            if not self._batched:  # one group: the batch is its layout
                yield X_t.unsqueeze(0), None, whole
                continue
            y_t, _ = _to_tensor_any(y, "y")
            # The layout from the labels where they are (no device sync on the CPU).
            present, local, rows, n_max = present_groups(y_t.to(torch.int64))
            local, rows, present = (_to_device(t, self.device) for t in (local, rows, present))
            Xp, weight = padded(X_t, local, rows, present.shape[0], n_max)
            yield Xp, weight, present

    def _first_pass(self, parent_generator: Callable) -> None:
        """Resolve dtype/device/D from the first batch; count groups; reservoir sample."""
        data = self._data() if callable(self._data) else self._data
        first = next(iter(data), None)
        if first is None:
            raise ValueError("data must yield at least one batch; got an empty stream")
        X0 = first[0] if isinstance(first, (tuple, list)) else first
        raw, kind = peek(X0)
        self.dtype = resolve_dtype(self.dtype, raw)
        self.device = resolve_device(self.device, raw, kind.numpy)
        # The reservoir's keys come from a generator derived from random_state, so they do
        # not repeat the draws of the initialisation that follows.
        parent = parent_generator(self.device)
        seed = int(torch.randint(0, 2**62, (1,), generator=parent, device=parent.device))
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)
        R = reservoir_size(self.n_components)
        no_key = torch.inf if self._row_keys is None else torch.iinfo(torch.int64).max
        counts = keys = sample = None
        for X, y in self._validated_batches():
            if self.n_features is None:
                self.n_features = X.shape[1]
            G = int(y.max()) + 1 if self._n_groups is None else self._n_groups
            if counts is None or counts.shape[0] < G:  # grow per-group buffers
                old = 0 if counts is None else counts.shape[0]
                grow = G - old
                new_counts = X.new_zeros(grow, dtype=torch.int64)
                new_keys = X.new_full((grow, R), no_key, dtype=X.dtype if self._row_keys is None
                                      else torch.int64)
                new_sample = X.new_zeros(grow, R, X.shape[1])
                counts = new_counts if counts is None else torch.cat([counts, new_counts])
                keys = new_keys if keys is None else torch.cat([keys, new_keys])
                sample = new_sample if sample is None else torch.cat([sample, new_sample])
            counts += torch.bincount(y, minlength=counts.shape[0])
            # bottom-R random keys per group: a uniform sample without replacement
            present, local, rows, n_max = present_groups(y)
            Xp, weight = padded(X, local, rows, present.shape[0], n_max)
            if self._row_keys is None:
                batch_keys = torch.rand(weight.shape, generator=self.generator, device=X.device,
                                        dtype=X.dtype)
            else:
                batch_keys = self._row_keys(Xp)
            batch_keys = batch_keys.masked_fill(weight == 0, no_key)
            all_keys = torch.cat([keys[present], batch_keys], dim=1)  # (u, R + n_max)
            all_rows = torch.cat([sample[present], Xp], dim=1)  # (u, R + n_max, D)
            best = all_keys.topk(R, dim=1, largest=False).indices  # (u, R)
            keys[present] = torch.gather(all_keys, 1, best)
            sample[present] = torch.gather(all_rows, 1, best.unsqueeze(-1).expand(-1, -1, X.shape[1]))
        if counts is None:
            raise ValueError("data must yield at least one sample; got only empty batches")
        if self._n_groups is None:
            self._n_groups = counts.shape[0]
        self.counts = counts.to(self.dtype)  # (G,)
        self.sample = sample  # (G, R, D)
        self.sample_keys = keys  # (G, R)
        self.sample_weight = (keys != no_key).to(self.dtype)  # (G, R)

    # -- EM --------------------------------------------------------------------------------

    def block(self, start: int, stop: int, device):
        raise ValueError(
            "group_block_size and storage_device are not supported by fit_stream yet: each "
            "block would re-read the whole stream; fit in memory or leave them as None"
        )

    def _accumulate(self, centres: Tensor, covariance_type: str, resp_of_batch) -> tuple:
        """One pass: totals of :func:`kernels.shifted_statistics` and of ``log p(x)``."""
        G, K, D = centres.shape
        counts = centres.new_zeros(G, K)
        first = centres.new_zeros(G, K, D)
        second = centres.new_zeros((G, D, D) if covariance_type == "tied" else
                                   (G, K, D, D) if covariance_type == "full" else (G, K, D))
        log_lik = centres.new_zeros(G)
        for Xp, weight, present in self._batches():
            resp, log_prob_norm = resp_of_batch(Xp, weight, present)  # (u, n, K), (u, n) | None
            if weight is not None:
                resp = resp * weight.unsqueeze(-1)
            c, f, s = kernels.shifted_statistics(Xp, resp, centres[present], covariance_type,
                                                 memory_budget=self._budget)
            counts.index_add_(0, present, c)
            first.index_add_(0, present, f)
            second.index_add_(0, present, s)
            if log_prob_norm is not None:
                if weight is not None:
                    log_prob_norm = torch.where(weight > 0, log_prob_norm, 0)
                log_lik.index_add_(0, present, log_prob_norm.sum(-1))
        return counts, first, second, log_lik

    def pass_totals(self, params: Params, cfg: Config) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """One pass: totals ``(counts, first, second, Σ log p(x))`` centred on the current
        means (the order of :meth:`_accumulate`; a data-parallel shard all-reduces them).

        Each batch is one fused pass of the dense backend (:func:`kernels.em_pass`) on
        the groups it holds, added to the totals (no ``(n, K)`` responsibilities kept)."""
        G, K, D = params.means.shape
        ctype = cfg.covariance_type
        log_weights, centres = params.weights.log(), params.stats_centres
        shapes = kernels.statistics_shapes(ctype, G, K, D)
        counts, first, second = (params.means.new_zeros(shape) for shape in shapes)
        log_lik = params.means.new_zeros(G)
        for Xp, weight, present in self._batches():
            ll, c, f, s = kernels.em_pass(Xp, log_weights[present], params.means[present],
                                          params.prec_chol[present], ctype, sample_weight=weight,
                                          memory_budget=cfg.memory_budget, centres=centres[present])
            for total, part in ((log_lik, ll), (counts, c), (first, f), (second, s)):
                total.index_add_(0, present, part)
        return counts, first, second, log_lik

    def em_step(self, params: Params, cfg: Config):
        """One pass: mean log-likelihood ``(G,)``, new parameters, Cholesky ``info``."""
        counts, first, second, log_lik = self.pass_totals(params, cfg)
        stats = kernels.statistics_to_parameters(counts, first, second, params.stats_centres,
                                                 cfg.reg_covar, cfg.covariance_type)
        return (log_lik / self.counts, *finish_m_step(*stats, cfg))

    def initial_statistics(self, method: str, gen: torch.Generator, cfg: Config) -> tuple[Tensor, Tensor, Tensor]:
        """``(nk, means, covariances)`` of ``init_params`` computed from the stream."""
        K = cfg.n_components

        def random_resp(Xp, w, present):
            resp = torch.rand(*Xp.shape[:2], K, generator=gen, device=Xp.device, dtype=Xp.dtype)
            return resp / resp.sum(-1, keepdim=True), None

        return initial_statistics_from_sample(method, gen, cfg, self.sample, self.sample_weight,
                                              self._accumulate, random_resp)


def initial_statistics_from_sample(method: str, gen: torch.Generator, cfg, sample: Tensor,
                                   weight: Tensor, accumulate: Callable,
                                   random_resp: Callable) -> tuple[Tensor, Tensor, Tensor]:
    """``(nk, means, covariances)`` of ``init_params`` from a sample and passes over the data.

    ``sample (G, R, D)`` with ``weight (G, R)`` (ones first, then zeros) is a uniform sample
    of each group; ``accumulate(centres, covariance_type, resp_of_batch)`` is one pass over
    all the data (totals of :func:`kernels.shifted_statistics` and of ``log p(x)``);
    ``random_resp(Xp, weight, present)`` gives the ``'random'`` responsibilities of a batch.
    ``random_from_data`` and ``k-means++`` pick their seeds in the sample; ``kmeans`` seeds
    k-means++ on it, then runs Lloyd passes over the data.
    """
    K = cfg.n_components
    G, R, D = sample.shape
    n_valid = weight.sum(-1).long()  # (G,)
    if method in ("random_from_data", "k-means++"):
        if method == "k-means++":
            seeds = kmeans_plusplus(sample, weight, n_valid, K, gen, cfg.memory_budget)
        else:
            keys = torch.rand(G, R, generator=gen, device=sample.device, dtype=sample.dtype)
            seeds = keys.masked_fill(weight == 0, -1.0).topk(K, dim=-1).indices
        resp = sample.new_zeros(G, R, K)
        resp[torch.arange(G, device=sample.device).unsqueeze(-1), seeds,
             torch.arange(K, device=sample.device)] = 1
        # One-hot responsibilities on the seeds only: the in-memory semantics.
        return kernels.estimate_gaussian_parameters(sample, resp, cfg.reg_covar,
                                                    cfg.covariance_type, memory_budget=cfg.memory_budget)
    if method == "random":
        centres = ((sample * weight.unsqueeze(-1)).sum(1) / n_valid.unsqueeze(-1)).unsqueeze(1)
        centres = centres.expand(G, K, D).contiguous()
        counts, first, second, _ = accumulate(centres, cfg.covariance_type, random_resp)
        return kernels.statistics_to_parameters(counts, first, second, centres, cfg.reg_covar,
                                                cfg.covariance_type)
    # kmeans: k-means++ on the sample, then Lloyd passes over the data.
    seeds = kmeans_plusplus(sample, weight, n_valid, K, gen, cfg.memory_budget)
    centres = torch.gather(sample, 1, seeds.unsqueeze(-1).expand(-1, -1, D))  # (G, K, D)
    mean = (sample * weight.unsqueeze(-1)).sum(1) / n_valid.unsqueeze(-1)
    var = (((sample - mean.unsqueeze(1)).square() * weight.unsqueeze(-1)).sum(1)
           / n_valid.unsqueeze(-1)).mean(-1)
    threshold = 1e-4 * var  # scikit-learn's tolerance, from the sample's variance

    def hard_resp_to(centres_now):
        """Responsibilities of the nearest of ``centres_now`` (one-hot), per batch."""

        def resp(Xp, w, present):
            labels = _sq_dist(Xp, centres_now[present], cfg.memory_budget).argmin(-1)
            return torch.nn.functional.one_hot(labels, K).to(Xp.dtype), None

        return resp

    for _ in range(300):
        counts, first, _, _ = accumulate(centres, "diag", hard_resp_to(centres))
        moved = torch.where(counts.unsqueeze(-1) > 0, first / counts.clamp_min(1).unsqueeze(-1), 0)
        centres = centres + moved
        if bool((moved.square().sum((-1, -2)) <= threshold).all()):
            break
    counts, first, second, _ = accumulate(centres, cfg.covariance_type, hard_resp_to(centres))
    return kernels.statistics_to_parameters(counts, first, second, centres, cfg.reg_covar,
                                            cfg.covariance_type)


def open_stream(request: Request, data: Any) -> StreamSource:
    """The streaming source of a single-process ``fit_stream``."""
    return StreamSource(data, request, lambda device: make_generator(request.random_state, device))
