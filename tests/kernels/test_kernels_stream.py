"""Streaming decode kernel (``hybrid_stream_kernel``) vs the float64 reference, on the CPU through
TRITON_INTERPRET=1 (small shapes). Mode 2 (inline-PTX shift expansion) runs as mode 1 here (``_fit`` maps it),
``benchmarks/kernel_speed.py --check`` covers it on the GPU."""

from __future__ import annotations

import pytest
import torch

from kernels_testutil import (CASES, case_id, check_config, check_configs, interp,  # noqa: F401 (fixtures)
                              make_layer, row_kinds_outputs, rows_layer, run_poisoned)

from tilesparse.kernels import ops
from tilesparse.kernels.ops import KernelConfig as C
from tilesparse.kernels.reference import reference_linear_f64, rel_error

TOL = 1e-2


def _stream(mode, bm, bn, ts, td, split=1, pref=1, warps=4, xt=0):
    return C("stream", mode=mode, bm=bm, bn=bn, split=split, warps=warps, ts=ts, td=td, pref=pref, xt=xt)


def _run(x, p, bias, cfg):
    return run_poisoned(ops.launch_stream, x, p, bias, cfg)


def _check(x, p, bias, cfg):
    return check_config(ops.launch_stream, x, p, bias, cfg, TOL)


FMA = [  # one token
    (1, _stream(0, 1, 8, 2, 2, 1, 1)),
    (1, _stream(0, 1, 16, 1, 1, 2, 0)),
    (1, _stream(0, 1, 4, 4, 2, 3, 1)),
    (1, _stream(0, 1, 8, 4, 1, 2, 1, xt=1)),  # one accumulator (dense chunk = a quarter of the 2:4 one), x per tile
]
DOT = [  # tensor cores (needs tiles of >= 32 rows)
    (16, _stream(1, 16, 32, 2, 1, 1, 1)),
    (5, _stream(2, 16, 32, 1, 1, 2, 0)),
    (20, _stream(1, 32, 32, 2, 2, 3, 1)),
    (7, _stream(2, 16, 32, 1, 1, 1, 1, xt=1)),
]


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stream_matches_reference(interp, make_layer, case, dtype):
    N, K, tile, fs, fz = case
    _, _, p = make_layer(N, K, tile, fs, fz, dtype, seed=N + K + 1)
    check_configs(_check, p, FMA + (DOT if tile[0] >= 32 else []), dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stream_row_kinds_and_reset(interp, dtype):
    """All-dense, all-2:4 and all-zero tile-rows (the latter's output is the bias alone); the split-K arrival
    counters are left at zero, so the same launch twice gives the same result."""
    p = rows_layer(dtype, seed=6)
    for cfg, x, b, y in row_kinds_outputs(_check, p, FMA + DOT, dtype):
        if cfg.split > 1:
            assert torch.equal(y, _run(x, p, b, ops._fit(cfg, p)))
            assert not ops._WS[("stream_cnt", "cpu", torch.int32)].any()


def test_stream_fit_and_candidates(make_layer):
    _, _, p = make_layer(128, 128, (16, 16), 0.5)
    assert ops._fit(_stream(1, 16, 64, 2, 1), p) is None  # tensor cores need 32-row blocks
    assert ops._fit(_stream(0, 4, 8, 2, 1), p) is None  # FMA: one token
    f = ops._fit(_stream(0, 1, 64, 2, 1), p)
    assert f.bn == 16
    _, _, p2 = make_layer(128, 128, (32, 16), 0.5, dtype=torch.float16)
    f = ops._fit(_stream(1, 16, 32, 1, 1), p2)
    assert (f.ts, f.td) == (4, 2)  # planes of 16 groups, dense chunks of 32 columns
    _, _, p3 = make_layer(96, 96, (48, 48), 0.5)
    assert ops._fit(_stream(0, 1, 8, 2, 1), p3) is None  # tile columns not a power of 2
    _, _, p4 = make_layer(128, 128, (32, 32), 0.5)
    for M in (1, 4, 16, 64, 65):
        st = [c for c in ops.candidate_configs(M, p4) if c.path == "stream"]
        assert bool(st) == (M <= 64)
        assert all(c.bm >= M for c in st)
        assert any(c.mode == 0 for c in st) == (M == 1)


def test_stream_too_many_tokens_and_noncontiguous(interp, make_layer):
    _, _, p = make_layer(100, 200, (32, 64), 0.5, 0.2, torch.float16, seed=3)
    with pytest.raises(ValueError, match="tokens"):
        ops.launch_stream(torch.randn(2, 200).half(), p, None, ops._fit(_stream(0, 1, 8, 2, 1), p),
                          torch.empty(2, 100).half())
    x = torch.randn(3, 400).half()[:, ::2]
    y = ops.run_config(x, p, None, ops._fit(_stream(1, 16, 32, 2, 1, 2), p))
    assert rel_error(y, reference_linear_f64(x, p, None)) < TOL
    x1 = torch.randn(1, 400).half()[:, ::2]
    y1 = ops.run_config(x1, p, None, ops._fit(_stream(0, 1, 8, 2, 1), p))
    assert rel_error(y1, reference_linear_f64(x1, p, None)) < TOL
