"""The ``idefender-gpu`` command end to end (the console entry point, in a subprocess).

The bench subcommand's own tests (workloads, fit to tol, convergence, skips) are in
``tests/test_bench.py``; the error paths of every subcommand in ``tests/test_cli_errors.py``.
"""

from __future__ import annotations

import subprocess
import sys


def test_unknown_subcommand_fails_cleanly():
    done = subprocess.run([sys.executable, "-m", "idefender_gpu.cli", "nope"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2
    assert "invalid choice" in done.stderr
