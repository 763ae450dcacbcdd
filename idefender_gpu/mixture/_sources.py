"""The one factory of EM data sources (private).

:func:`open_source` picks the source a fit reads its samples from: in memory
(``_memory``), streamed batches (``_stream``), or, inside
:func:`idefender_gpu.distributed.data_parallel`, this rank's shard of either
(``_distributed``). Every source implements :class:`~idefender_gpu.mixture._core.DataSource`;
the estimators call this factory and then the core, never a source's internals.
"""

from __future__ import annotations

from typing import Any

from idefender_gpu.distributed import current as current_data_parallel
from idefender_gpu.mixture._core import DataSource, Request
from idefender_gpu.mixture._distributed import open_memory_shard, open_stream_shard
from idefender_gpu.mixture._memory import open_memory
from idefender_gpu.mixture._stream import open_stream

_NO_DATA = object()


def open_source(request: Request, X: Any = _NO_DATA, y: Any = None, *, stream: Any = _NO_DATA) -> DataSource:
    """The data source of one fit: ``X`` (and ``y``) in memory, or ``stream`` (re-iterable
    batches); data-parallel inside :func:`~idefender_gpu.distributed.data_parallel`.

    Parameters
    ----------
    request : Request
        The estimator's settings.
    X, y : array-like, optional
        The samples (and group labels) of an in-memory fit.
    stream : iterable or callable, optional
        The batches of a streaming fit (instead of ``X``).

    Returns
    -------
    source : DataSource
        Validated and laid out, ready for :func:`~idefender_gpu.mixture._core.fit_blocks`.
    """
    setting = current_data_parallel()
    if stream is not _NO_DATA:
        if setting is not None:
            return open_stream_shard(request, stream, setting)
        return open_stream(request, stream)
    if setting is not None:
        return open_memory_shard(request, X, y, setting)
    return open_memory(request, X, y)
