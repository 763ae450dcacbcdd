"""The layers of ``idefender_gpu.mixture`` (issue 11 item 1): the EM core imports no data
source and no estimator, the sources import the core and never an estimator, the factory
is the only module that knows every source, and every source is a ``DataSource``."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import torch

import idefender_gpu.mixture as mixture_package

MIXTURE = Path(mixture_package.__file__).parent
PREFIX = "idefender_gpu."

#: module -> the project modules it may import (anything else in the project is a violation)
ALLOWED = {
    "_core": {"kernels", "_validation", "mixture._backends"},
    "_memory": {"kernels", "_validation", "mixture._core", "mixture._kmeans"},
    "_stream": {"kernels", "_validation", "mixture._core", "mixture._kmeans"},
    "_distributed": {"kernels", "_validation", "distributed", "mixture._core", "mixture._stream"},
    "_sources": {"distributed", "mixture._core", "mixture._memory", "mixture._stream", "mixture._distributed"},
    "_inits": {"kernels", "_validation"},
    "_base": {"kernels", "_param_validation", "_validation", "exceptions", "mixture._backends",
              "mixture._core", "mixture._inits", "mixture._sources"},
}


def _project_imports(path: Path) -> set[str]:
    """Project modules imported anywhere in ``path`` (function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            if name.startswith(PREFIX):
                found.add(name[len(PREFIX):])
    return found


@pytest.mark.parametrize("module", sorted(ALLOWED))
def test_imports_point_down_the_layers(module):
    imported = _project_imports(MIXTURE / f"{module}.py")
    allowed = ALLOWED[module]
    # "from idefender_gpu.mixture._core import Params" gives "mixture._core" and "mixture._core.Params"
    bad = {name for name in imported
           if not any(name == ok or name.startswith(ok + ".") for ok in allowed)
           }
    assert not bad, f"{module} imports {sorted(bad)}"


def test_every_source_is_a_data_source():
    from idefender_gpu.mixture._core import DataSource, Request
    from idefender_gpu.mixture._distributed import DistributedSource
    from idefender_gpu.mixture._memory import open_memory
    from idefender_gpu.mixture._stream import open_stream

    X = np.random.default_rng(0).normal(size=(40, 3))
    request = Request("GaussianMixture", False, 2, 1, None, "cpu", 0, None)
    assert isinstance(open_memory(request, X, None), DataSource)
    assert isinstance(open_stream(request, [X[:20], X[20:]]), DataSource)
    members = [name for name in dir(DataSource) if not name.startswith("_")]
    assert {"em_step", "initial_statistics", "block", "make_generator", "check_info"} <= set(members)
    for name in ("em_step", "initial_statistics", "block", "make_generator", "check_info"):
        assert callable(getattr(DistributedSource, name)), name


def test_the_memory_source_reports_the_compute_device_and_counts():
    from idefender_gpu.mixture._core import Request
    from idefender_gpu.mixture._memory import open_memory

    X = np.random.default_rng(0).normal(size=(30, 2))
    y = np.repeat([0, 1, 2], 10)
    source = open_memory(Request("BatchedGaussianMixture", True, 2, None, "float64", "cpu", 0, None), X, y)
    assert source.device == torch.device("cpu") and source.n_features == 2 and source.kind.numpy
    np.testing.assert_array_equal(source.counts.numpy(), [10, 10, 10])
    assert tuple(source.groups.X.shape) == (3, 10, 2) and source.groups.weight is None
