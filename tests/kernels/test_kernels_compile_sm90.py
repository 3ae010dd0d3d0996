"""The library's Triton kernels compile for sm_90 without a GPU (``compile_sm90.py``): the interpreter that runs
the other kernel tests accepts code the compiler refuses."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent


@pytest.mark.parametrize("case", ["q4_decode", "q4_unpack", "unpack16", "stream", "fused_mask"])
def test_triton_kernels_compile_for_hopper(case):
    """Each launcher's launches (several configurations) compile to a cubin for sm_90 through Triton's ptxas, in
    a process without TRITON_INTERPRET."""
    triton = pytest.importorskip("triton")
    if "nvidia" not in getattr(triton.backends, "backends", {}):
        pytest.skip("this Triton has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    src = str(HERE.parent.parent / "src")
    env["PYTHONPATH"] = os.pathsep.join([src, str(HERE), env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, str(HERE / "compile_sm90.py"), case], env=env, capture_output=True,
                         text=True, timeout=900, check=False)
    assert run.returncode == 0 and f"compiled {case}" in run.stdout, (run.stdout + run.stderr)[-3000:]
