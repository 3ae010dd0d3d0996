"""Runs the interpreted-kernel tests in a fresh process when this one imported triton without
TRITON_INTERPRET=1 (e.g. in a full-suite run where transformers imported it first)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kernels_testutil import interpreter_ready

HERE = Path(__file__).resolve().parent


def test_interpreted_kernels_in_subprocess():
    pytest.importorskip("triton")
    if interpreter_ready():
        pytest.skip("the interpreted tests run in this process")
    env = dict(os.environ, TRITON_INTERPRET="1")
    src = str(HERE.parents[1] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    files = [str(HERE / "test_kernels_triton.py"), str(HERE / "test_kernels_linear.py"), str(HERE / "test_kernels_flat.py"),
             str(HERE / "test_kernels_stream.py")]
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "not in_subprocess",
                        *files], cwd=str(HERE.parents[1]), env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and " skipped" not in r.stdout.split("\n")[-2], r.stdout[-2000:]
