"""Data-parallel fitting on ``torch.distributed``: the :func:`data_parallel` switch.

Started with ``torchrun`` (NCCL on GPUs, gloo on CPUs), each process (rank) holds a shard of
the samples. Inside ``with data_parallel():`` the fits of this library treat their data as
this rank's shard:

* :meth:`GaussianMixture.fit <idefender_gpu.mixture.GaussianMixture.fit>`, ``fit_predict``
  and ``fit_stream``, and the same methods of
  :class:`~idefender_gpu.mixture.BatchedGaussianMixture` (a group may be missing from some
  shards): each EM iteration runs its E-step on the local shard, all-reduces the sufficient
  statistics (counts, first and second moments centred on the current means, log-likelihood
  sums) in one flat buffer, and every rank performs the same M-step, so all ranks hold
  identical parameters. From the same initial parameters the result is the single-process
  fit's, to round-off.
* :meth:`IDefender.fit <idefender_gpu.IDefender.fit>` and ``calibrate`` with a loader over
  this rank's shard (a ``DistributedSampler``): the class mixtures as above, the thresholds
  from every rank's training scores; ``save`` writes the file once, on rank 0.

Communication per EM iteration is one all-reduce of ``G*K*(1 + D + D*D) + G`` numbers
(``full``; ``G*K*(1 + 2D) + G`` for ``diag``), independent of the number of samples.

Initialisation is the same on every rank and does not depend on how the samples are split
or on the number of ranks: ``init_params='kmeans'`` seeds k-means++ on a sample of at most
``max(256, 20 * n_components)`` rows per group gathered across ranks (the rows with the
smallest hash of their values), then runs Lloyd iterations over all shards with
all-reduced sums; ``'k-means++'`` and ``'random_from_data'`` pick their seeds in that
sample; ``'random'`` draws each row's responsibilities from its hash. This is the
initialisation of ``fit_stream``, not of the in-memory ``fit`` (k-means++ over all rows),
so with these methods the seeds, hence the local optimum EM reaches, can differ from a
single-process ``fit``; with ``weights_init``, ``means_init`` and ``precisions_init`` the
result is the single-process one to round-off.

Faults: a rank whose local work raises (a bad shard, NaN, mismatched shapes) makes every
rank raise, instead of leaving the others waiting: the failing rank re-raises its own
exception and the others raise :class:`RankFailedError` naming the failing rank and its
error. Every collective waits at most ``timeout`` (a rank that crashed or is stuck).

Examples
--------
Run with ``torchrun --nproc_per_node=2 fit.py``::

    import torch.distributed as dist
    from idefender_gpu.distributed import data_parallel
    from idefender_gpu.mixture import GaussianMixture

    dist.init_process_group("gloo")            # "nccl" on GPUs
    X_shard = load_my_shard(dist.get_rank())   # (n_rank, n_features)
    with data_parallel(timeout=300):
        gm = GaussianMixture(8, random_state=0).fit(X_shard)
    # every rank now holds the same gm.means_, gm.lower_bound_, ...
"""

from __future__ import annotations

import contextvars
import datetime
import math
from contextlib import contextmanager
from numbers import Real
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import Tensor
from idefender_gpu.exceptions import RankFailedError  # noqa: F401 - re-exported

__all__ = ["DataParallel", "RankFailedError", "current", "data_parallel"]

#: Bytes of each rank's error message exchanged when a rank fails.
_MESSAGE_BYTES = 1024

_ACTIVE: contextvars.ContextVar[DataParallel | None] = contextvars.ContextVar(
    "idefender_gpu_data_parallel", default=None
)


class DataParallel:
    """The active data-parallel setting: a process group, this rank and a timeout.

    Made by :func:`data_parallel`; the fits read it through :func:`current`. Its methods
    are the collectives the fits use; each waits at most ``timeout`` and, where it
    carries a local computation, turns an exception on one rank into an error on every
    rank (private API: the names below may change).

    Attributes
    ----------
    group : ProcessGroup
    rank : int
        This process's rank in ``group``.
    world_size : int
    timeout : datetime.timedelta or None
        Longest wait of one collective; None: the process group's own timeout.
    """

    def __init__(self, group: Any, timeout: datetime.timedelta | None) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.backend = str(dist.get_backend(group))
        self.timeout = timeout
        self._cuda_device: torch.device | None = None  # this rank's GPU, once known

    def __repr__(self) -> str:
        return (f"DataParallel(rank={self.rank}, world_size={self.world_size}, "
                f"backend={self.backend!r}, timeout={self.timeout})")

    # -- plumbing --------------------------------------------------------------------------

    def _comm_device(self, device: torch.device) -> torch.device:
        """Where a collective's buffer must live: CUDA for NCCL, CPU for gloo.

        For NCCL, the device of the tensors themselves (the rank's compute device), not
        ``torch.cuda.current_device()``: a rank that computes on ``cuda:1`` without calling
        ``torch.cuda.set_device(1)`` would otherwise hand NCCL buffers on ``cuda:0``, the same
        GPU as rank 0 (NCCL then fails with a duplicate-GPU error or hangs). A host tensor
        (the tables of fault flags and shapes) goes to the last GPU this rank's collectives
        used, else to the process group's bound device (``init_process_group(device_id=...)``),
        else to the current CUDA device."""
        if self.backend == "nccl":
            if device.type == "cuda" and device.index is not None:
                self._cuda_device = device
                return device
            if self._cuda_device is None:
                bound = getattr(self.group, "bound_device_id", None)
                self._cuda_device = bound if bound is not None else \
                    torch.device("cuda", torch.cuda.current_device())
            return self._cuda_device
        if self.backend == "gloo":
            return torch.device("cpu")
        return device  # a multi-device backend ("cpu:gloo,cuda:nccl") dispatches by device

    def _wait(self, work: Any, what: str) -> None:
        try:
            if self.timeout is None:
                work.wait()
            else:
                work.wait(timeout=self.timeout)
        except RuntimeError as exc:
            limit = "" if self.timeout is None else f" within {self.timeout.total_seconds():g} s"
            raise RankFailedError(
                f"data-parallel fit: rank {self.rank} of {self.world_size}: the collective of "
                f"'{what}' did not complete{limit}: another rank crashed, is stuck, or runs "
                f"different code (see the other ranks' logs): {exc}"
            ) from exc

    def all_reduce(self, tensor: Tensor, what: str, op: Any = None) -> Tensor:
        """Sum (or ``op``) of ``tensor`` over the ranks, on ``tensor``'s device."""
        comm = tensor.to(self._comm_device(tensor.device)).contiguous()
        work = dist.all_reduce(comm, op=dist.ReduceOp.SUM if op is None else op, group=self.group,
                               async_op=True)
        self._wait(work, what)
        return comm.to(tensor.device)

    def all_gather(self, tensor: Tensor, what: str) -> Tensor:
        """``(world_size, *tensor.shape)``: every rank's ``tensor`` (same shape on all)."""
        comm = tensor.to(self._comm_device(tensor.device)).contiguous()
        parts = [torch.empty_like(comm) for _ in range(self.world_size)]
        work = dist.all_gather(parts, comm, group=self.group, async_op=True)
        self._wait(work, what)
        return torch.stack(parts).to(tensor.device)

    # -- faults ----------------------------------------------------------------------------

    def fail(self, exc: BaseException | None, what: str) -> None:
        """Exchange the failing ranks' messages and raise on every rank (a collective:
        call it on every rank once any rank has failed)."""
        row = torch.zeros(self.world_size, _MESSAGE_BYTES, dtype=torch.int32)
        if exc is not None:
            text = f"{type(exc).__name__}: {exc}".encode("utf-8", "replace")[:_MESSAGE_BYTES]
            row[self.rank, : len(text)] = torch.tensor(list(text), dtype=torch.int32)
        table = self.all_reduce(row, f"{what} (error messages)")
        failures = []
        for rank, codes in enumerate(table.tolist()):
            data = bytes(c for c in codes if c)
            if data:
                failures.append(f"rank {rank}: {data.decode('utf-8', 'replace')}")
        summary = "; ".join(failures) or "unknown error"
        if exc is not None:
            if hasattr(exc, "add_note"):
                exc.add_note(f"(data-parallel fit: raised on rank {self.rank} of {self.world_size} "
                             f"while {what}; the other ranks raise RankFailedError)")
            raise exc
        raise RankFailedError(
            f"data-parallel fit failed while {what} on another rank ({summary}); rank "
            f"{self.rank} of {self.world_size} stops too"
        )

    def check(self, flags: Tensor, exc: BaseException | None, what: str) -> None:
        """Raise on every rank if any of the per-rank fault ``flags (world_size,)`` is set."""
        if bool(flags.any()):
            self.fail(exc, what)

    def exchange(self, compute: Callable[[], tuple[Sequence[int], Any]], n_values: int,
                 what: str) -> tuple[Any, list[list[int]]]:
        """Run ``compute() -> (ints, payload)`` locally and gather the ints of every rank.

        Returns ``(payload, table)`` with ``table[rank]`` the ``n_values`` ints of each rank.
        If ``compute`` raises on any rank, every rank raises (see :meth:`fail`).
        """
        exc, payload = None, None
        row = torch.zeros(self.world_size, n_values + 1, dtype=torch.int64)
        try:
            values, payload = compute()
            row[self.rank, 1:] = torch.tensor([int(v) for v in values], dtype=torch.int64)
        except Exception as error:  # noqa: BLE001 - every rank is told, then it is re-raised
            exc = error
            row[self.rank, 0] = 1
        table = self.all_reduce(row, what)
        self.check(table[:, 0], exc, what)
        return payload, table[:, 1:].tolist()

    @contextmanager
    def guard(self, what: str) -> Iterator[None]:
        """Run the block locally; if it raises on any rank, every rank raises."""
        exc = None
        try:
            yield
        except Exception as error:  # noqa: BLE001 - every rank is told, then it is re-raised
            exc = error
        flags = torch.zeros(self.world_size, dtype=torch.int64)
        flags[self.rank] = int(exc is not None)
        self.check(self.all_reduce(flags, what), exc, what)

    def reduce_parts(self, compute: Callable[[], Sequence[Tensor]], shapes: Sequence[tuple[int, ...]],
                     dtype: torch.dtype, device: torch.device,
                     what: str) -> tuple[list[Tensor], Tensor, BaseException | None]:
        """Sum over the ranks of the tensors ``compute()`` returns, in ONE flat all-reduce.

        ``shapes`` are the tensors' shapes (known on every rank, even where ``compute``
        fails). Returns the summed tensors, the per-rank fault flags ``(world_size,)`` (on
        ``device``, not read: the caller decides when to synchronise) and the local
        exception, if any. A failed rank contributes zeros.
        """
        sizes = [math.prod(shape) for shape in shapes]
        exc = None
        try:
            parts = list(compute())
            if [tuple(p.shape) for p in parts] != [tuple(s) for s in shapes]:
                raise AssertionError(f"statistics shapes {[tuple(p.shape) for p in parts]} != {list(shapes)}")
            flags = torch.zeros(self.world_size, dtype=dtype, device=device)
            buffer = torch.cat([p.reshape(-1).to(device=device, dtype=dtype) for p in parts] + [flags])
        except Exception as error:  # noqa: BLE001 - reported through the fault flags
            exc = error
            buffer = torch.zeros(sum(sizes) + self.world_size, dtype=dtype, device=device)
            buffer[sum(sizes) + self.rank] = 1
        buffer = self.all_reduce(buffer, what)
        out = [t.reshape(shape) for t, shape in zip(buffer[: sum(sizes)].split(sizes), shapes)]
        return out, buffer[sum(sizes):], exc

    def sum_parts(self, compute: Callable[[], Sequence[Tensor]], shapes: Sequence[tuple[int, ...]],
                  dtype: torch.dtype, device: torch.device, what: str) -> list[Tensor]:
        """:meth:`reduce_parts`, raising on every rank at once if any rank failed."""
        parts, flags, exc = self.reduce_parts(compute, shapes, dtype, device, what)
        self.check(flags, exc, what)
        return parts

    def gather_rows(self, tensor: Tensor, what: str) -> Tensor:
        """Concatenation over the ranks (in rank order) of ``tensor (n_rank, ...)``."""
        _, table = self.exchange(lambda: ([tensor.shape[0]], None), 1, what)
        sizes = [row[0] for row in table]
        padded = tensor.new_zeros(max(sizes), *tensor.shape[1:])
        padded[: tensor.shape[0]] = tensor
        parts = self.all_gather(padded, what)
        return torch.cat([parts[r, :size] for r, size in enumerate(sizes)])


def current() -> DataParallel | None:
    """The active :class:`DataParallel` setting inside :func:`data_parallel`, else None."""
    return _ACTIVE.get()


def _check_timeout(timeout: Any) -> datetime.timedelta | None:
    if timeout is None or isinstance(timeout, datetime.timedelta):
        seconds = None if timeout is None else timeout.total_seconds()
    elif isinstance(timeout, Real) and not isinstance(timeout, bool):
        seconds = float(timeout)
    else:
        raise TypeError(f"timeout must be None, seconds (a real number) or a datetime.timedelta; got {timeout!r}")
    if seconds is None:
        return None
    if not seconds > 0 or math.isnan(seconds):
        raise ValueError(f"timeout must be positive; got {timeout!r}")
    return datetime.timedelta(seconds=seconds)


@contextmanager
def data_parallel(group: Any = None, *, timeout: Any = None) -> Iterator[DataParallel]:
    """Fit data-parallel inside this block: each rank's data is its shard of the samples.

    Every rank of ``group`` must enter the block and call the same fits, with the same
    estimator parameters, in the same order (collectives match by order). Outside the
    block the fits are single-process again.

    Parameters
    ----------
    group : ProcessGroup, optional
        The ranks that share the fit. Default: the default process group, which must be
        initialised first (``torch.distributed.init_process_group``, e.g. under
        ``torchrun``).
    timeout : float (seconds) or datetime.timedelta, optional
        Longest wait of each collective of the fits, through ``work.wait(timeout)``. A rank
        that crashed or is stuck then makes the others raise :class:`RankFailedError`
        instead of waiting forever. Default: the process group's own timeout
        (``init_process_group(timeout=...)``; 30 minutes for gloo, 10 minutes for NCCL in
        current PyTorch). What a timeout does depends on the backend:

        * gloo: ``wait(timeout)`` blocks the calling thread until the collective completes
          or ``timeout`` passes, then raises; this rank raises :class:`RankFailedError`.
          The collective was abandoned half-way, so the ranks no longer agree on the order
          of collectives: do not reuse the process group for another fit.
        * NCCL: ``wait(timeout)`` blocks the CPU too (it is not only a stream
          synchronisation); on timeout the communicator is aborted and the error is raised
          here as :class:`RankFailedError`. The process group cannot be used again
          afterwards (create a new one), and NCCL's watchdog may also end the process
          when ``TORCH_NCCL_ASYNC_ERROR_HANDLING`` is set (its default tears down on
          errors).

    Yields
    ------
    setting : DataParallel
        With ``rank`` and ``world_size``.

    Raises
    ------
    RuntimeError
        If ``torch.distributed`` is unavailable or no process group is initialised.
    ValueError
        If this process is not a member of ``group``, or ``timeout`` is not positive.

    Notes
    -----
    With NCCL, the buffers of a collective live on the GPU of the fit's tensors (the
    estimator's ``device``); host-side tables (fault flags, shapes) go to the same GPU, or,
    before any GPU tensor was exchanged, to the group's bound device
    (``init_process_group(device_id=...)``) or the current CUDA device: give each rank its
    own GPU (``torch.cuda.set_device(local_rank)`` or ``device_id``), as NCCL requires. Not
    yet run on NCCL (no GPU was available): the CUDA paths are checked on the CPU only.

    The shards may have any sizes and groups (classes) may be missing from some, but
    every rank needs at least one sample. All ranks must run the same library version on
    the same kind of device. ``backend='keops'`` does not apply: the statistics are
    computed by the dense kernels. ``IDefender.save`` inside the block writes once, on
    rank 0. A ``DistributedSampler`` pads a dataset whose size is not a multiple of the
    number of ranks by repeating samples (``drop_last=False``): those repeats are then
    fitted twice; shard without padding for the exact single-process result.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "data_parallel needs an initialised torch.distributed process group: call "
            "torch.distributed.init_process_group('nccl' or 'gloo') first (e.g. under torchrun)"
        )
    group = dist.group.WORLD if group is None else group
    if dist.get_rank(group) < 0:
        raise ValueError("group must contain this process; got a process group it is not a member of")
    setting = DataParallel(group, _check_timeout(timeout))
    token = _ACTIVE.set(setting)
    try:
        yield setting
    finally:
        _ACTIVE.reset(token)
