"""Host-side cost of one eager ``hybrid_linear`` call per kernel path (GPU).

    PYTHONPATH=src python3 benchmarks/launch_overhead.py [--profile] [--out table.md]

A small layer (512x1024, half the tiles 2:4) whose kernels take a few microseconds, so that an eager loop of
calls is bound by the host: the time per call of ``--calls`` back-to-back calls (one synchronisation at the end)
is what Python and the launch cost, per path (the path forced with ``config=``; the tuned choice for the dense
path). ``F.linear`` on the same shape is the floor. Further rows: a ``HybridLinear`` module with its tuned
eager choice (what a model's forward pays), and the pieces of a prepared mma launch (the output allocation,
the current-stream query, the driver call with the ``CUkernel`` handle and with the ``CUfunction`` of
``cuKernelGetFunction``). ``--profile`` adds the top functions of a cProfile run per path (internal time)
to the output.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import io
import pstats
import sys
import time

import torch

from tilesparse.kernels import HybridLinear, ops
from tilesparse.kernels.ops import KernelConfig as C

sys.path.insert(0, __file__.rpartition("/")[0])
from _table import emit  # noqa: E402
from kernel_speed import random_packed  # noqa: E402


def _per_call_us(fn, calls: int, rounds: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) / calls * 1e6)
    return best


def _profile(fn, calls: int, top: int = 12) -> str:
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(top)
    return s.getvalue()


def _launch_pieces(M: int, packed, x) -> list[tuple[str, object]]:
    """The parts of a prepared v7 launch, each alone (empty when no v7 configuration fits)."""
    v7 = next((c for n, c in paths(M, packed) if n == "mma v7"), None)
    if v7 is None:
        return []
    from cuda.bindings import driver

    from tilesparse.kernels import cuda_driver

    launch = ops.prepare_mma(packed, v7, M, False)
    out = torch.empty(M, packed.out_features, device="cuda", dtype=torch.bfloat16)
    plain = launch._plain
    stream = torch.cuda.current_stream().cuda_stream
    fn = cuda_driver.check(driver.cuKernelGetFunction(plain._kernel), "cuKernelGetFunction")
    g, b, smem, params = plain._grid, plain._block, plain._smem, launch._address
    return [("mma v7 prepared launch (output given)", lambda: launch(x, out)),
            ("  torch.empty (the output)", lambda: torch.empty(M, packed.out_features, device="cuda",
                                                                dtype=torch.bfloat16)),
            ("  torch.cuda.current_stream()", lambda: torch.cuda.current_stream().cuda_stream),
            ("  cuLaunchKernel, CUkernel", lambda: driver.cuLaunchKernel(plain._kernel, *g, *b, smem, stream,
                                                                         params, 0)),
            ("  cuLaunchKernel, CUfunction", lambda: driver.cuLaunchKernel(fn, *g, *b, smem, stream, params, 0))]


def paths(M: int, packed) -> list[tuple[str, C]]:
    """(label, configuration) per kernel path that can run ``M`` tokens of ``packed``: each family's first
    candidate that fits the layer."""
    fams = [("stream (v6)", lambda c: c.path == "stream"), ("mma v7", lambda c: c.path == "mma" and c.mode == 0),
            ("mma v9", lambda c: c.path == "mma" and c.mode == 9), ("unpack + cuBLAS", lambda c: c.path == "unpack")]
    cands = ops.candidate_configs(M, packed, force_kernel=True) + ops.candidate_configs(256, packed, True)
    out = []
    for name, pick in fams:
        c = next((c for c in cands if pick(c)), None)
        if c is not None:
            out.append((name, c))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="1,16")
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 2
    N, K = 512, 1024
    p, W, _ = random_packed(N, K, 0.5, (128, 128), torch.bfloat16, "cuda", seed=1)
    pd, Wd, _ = random_packed(N, K, 0.0, (128, 128), torch.bfloat16, "cuda", seed=1)  # all dense: stored as W
    rows, profiles = [], []
    for M in (int(t) for t in args.tokens.split(",")):
        x = torch.randn(M, K, device="cuda").bfloat16()
        cases = [("F.linear (floor)", lambda: torch.nn.functional.linear(x, Wd)),
                 ("hybrid_linear, all-dense layer", lambda: ops.hybrid_linear(x, pd))]
        cases += [(f"hybrid_linear, {n}", lambda c=c: ops.hybrid_linear(x, p, config=c)) for n, c in paths(M, p)]
        layer = HybridLinear(p)
        cases.append(("HybridLinear module, tuned eager choice", lambda: layer(x)))
        cases += _launch_pieces(M, p, x)
        for name, fn in cases:
            us = _per_call_us(fn, args.calls)
            rows.append((M, name, us))
            print(f"M={M:3d} {name:34s} {us:7.1f} us per call", flush=True)
            if args.profile and name != "F.linear (floor)":
                profiles.append(f"### M={M}, {name}\n```\n{_profile(fn, args.calls // 4)}```\n")
    props = torch.cuda.get_device_properties(0)
    lines = [f"# Host cost of an eager hybrid_linear call ({props.name})", "",
             f"Measured {datetime.date.today().isoformat()}, torch {torch.__version__}, triton "
             f"{__import__('triton').__version__}; layer {N}x{K} bf16 (half the tiles 2:4 except the all-dense "
             f"row), {args.calls} back-to-back calls, best of 5 rounds.",
             f"Command: `PYTHONPATH=src python3 benchmarks/launch_overhead.py {' '.join(sys.argv[1:])}`", "",
             "| tokens | call | us per call |", "|---|---|---|"]
    lines += [f"| {M} | {n} | {us:.1f} |" for M, n, us in rows]
    text = "\n".join(lines) + "\n" + ("\n" + "\n".join(profiles) if profiles else "")
    emit(text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
