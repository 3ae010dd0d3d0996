"""Flat decode kernel (``hybrid_flat_kernel``) vs the float64 reference, on the CPU through
TRITON_INTERPRET=1 (small shapes). The inline-asm select (mode 5) runs only on the GPU; here mode 5 runs its
plain-Triton twin (the same kernel with ``ASM`` off), and ``benchmarks/kernel_speed.py --check`` covers the asm."""

from __future__ import annotations

import pytest
import torch

from kernels_testutil import (CASES, case_id, check_config, check_configs, interp,  # noqa: F401 (fixtures)
                              make_layer, row_kinds_outputs, rows_layer, run_poisoned)

from tilesparse.kernels import ops
from tilesparse.kernels.ops import KernelConfig as C
from tilesparse.kernels.reference import reference_linear_f64, rel_error

TOL = 1e-2


def _flat(mode, bm, bn, ts, nit, warps=4):
    return C("flat", mode, bm, bn, 0, 1, warps, 1, True, 0, 0, ts, nit)


def _run(x, p, bias, cfg):
    return run_poisoned(ops.launch_flat, x, p, bias, cfg)


def _check(x, p, bias, cfg):
    return check_config(ops.launch_flat, x, p, bias, cfg, TOL)


GATHER = [  # (M, cfg): modes 3 (3-D gather), 4 (int32 pairs), 5 (pairs + asm select on the GPU)
    (1, _flat(5, 1, 32, 2, 1)),
    (1, _flat(4, 1, 16, 4, 2)),
    (3, _flat(5, 4, 16, 1, 2)),
    (3, _flat(3, 4, 32, 2, 1)),
    (2, _flat(4, 2, 64, 8, 1)),
]
DOT = [  # tensor-core mode (needs tiles of >= 32 rows)
    (16, _flat(1, 16, 32, 2, 1)),
    (5, _flat(1, 16, 64, 1, 2)),
    (1, _flat(1, 16, 32, 1, 3)),
]


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_flat_matches_reference(interp, make_layer, case, dtype):
    N, K, tile, fs, fz = case
    _, _, p = make_layer(N, K, tile, fs, fz, dtype, seed=N + K)
    check_configs(_check, p, GATHER + (DOT if tile[0] >= 32 else []), dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_flat_row_kinds(interp, dtype):
    """All-dense, all-2:4 and all-zero tile-rows (the latter's output is the bias alone)."""
    for _ in row_kinds_outputs(_check, rows_layer(dtype, seed=5), GATHER + DOT, dtype):
        pass


def test_flat_counters_reset_and_plans_cached(interp, make_layer):
    """Workspace and arrival counters are left at zero: the same launch twice gives the same result."""
    _, _, p = make_layer(100, 200, (32, 64), 0.5, 0.2, torch.bfloat16, seed=9)
    x = torch.randn(3, 200).bfloat16()
    for cfg in (_flat(5, 4, 32, 1, 1), _flat(1, 16, 32, 1, 2)):
        f = ops._fit(cfg, p)
        a, b = _run(x, p, None, f), _run(x, p, None, f)
        assert torch.equal(a, b)
        assert rel_error(a, reference_linear_f64(x, p, None)) < TOL
        ws = ops._WS[("flat_ws", "cpu", torch.float32)]
        cnt = ops._WS[("flat_cnt", "cpu", torch.int32)]
        assert not ws.any() and not cnt.any()
    n = len(p._flat_plans)
    _run(x, p, None, ops._fit(_flat(5, 4, 32, 1, 1), p))
    assert len(p._flat_plans) == n  # plan reused
    p.rebuild_layout()
    assert not getattr(p, "_flat_plans", {})  # dropped with the layout


def test_flat_plan_programs(make_layer):
    """One program per (row block, item); items of a tile-row: ceil(n_sparse / (ts*nit)) + ceil(n_dense / (td*nit))."""
    _, _, p = make_layer(100, 200, (32, 64), 0.5, 0.2, torch.bfloat16, seed=4)
    plan = ops.flat_plan(p, 16, 2, 1, 1)
    sp = (p.sp_ptr[1:] - p.sp_ptr[:-1]).tolist()
    dn = (p.dn_ptr[1:] - p.dn_ptr[:-1]).tolist()
    items = [max(1, -(-s // 2) + d) for s, d in zip(sp, dn)]
    blocks = [2, 2, 2, 2]  # 32-row tile-rows in blocks of 16 rows; rows 96..99 -> one block in the last
    blocks[-1] = 1
    assert plan.n_programs == sum(i * b for i, b in zip(items, blocks))
    assert plan.n_blocks == sum(blocks)
    assert (plan.desc[:, 8] >= 1).all()


def test_flat_fit_and_candidates(make_layer, monkeypatch):
    _, _, p = make_layer(128, 128, (16, 16), 0.5)
    assert ops._fit(_flat(1, 16, 64, 1, 1), p) is None  # tensor cores need 32-row blocks
    f = ops._fit(_flat(5, 1, 64, 1, 1), p)
    assert f.bn == 16 and f.ts == 1
    _, _, p2 = make_layer(128, 128, (32, 16), 0.5, dtype=torch.float16)
    f = ops._fit(_flat(1, 16, 32, 1, 1), p2)
    assert f.ts == 4  # dense chunk widened to 2 tiles of 16 = 32 columns
    assert ops._fit(_flat(5, 1, 32, 2, 1), p2).mode == 4  # asm select is bf16-only
    _, _, p3 = make_layer(96, 96, (48, 48), 0.5)
    assert ops._fit(_flat(5, 1, 32, 2, 1), p3) is None  # tile columns not a power of 2
    _, _, p4 = make_layer(128, 128, (32, 32), 0.5)
    assert not any(c.path == "flat" for c in ops.candidate_configs(4, p4))  # opt-in (TILESPARSE_FLAT=1)
    monkeypatch.setattr(ops, "FLAT_CANDIDATES", True)
    for M in (1, 4, 16, 17):
        flat = [c for c in ops.candidate_configs(M, p4) if c.path == "flat"]
        assert bool(flat) == (M <= 16)
        assert all(c.bm >= M for c in flat)


def test_flat_too_many_tokens(interp, make_layer):
    _, _, p = make_layer(64, 64, (32, 32), 0.5)
    with pytest.raises(ValueError, match="tokens"):
        ops.launch_flat(torch.randn(5, 64).bfloat16(), p, None, ops._fit(_flat(5, 4, 32, 1, 1), p),
                        torch.empty(5, 64).bfloat16())


def test_flat_noncontiguous_input(interp, make_layer):
    _, _, p = make_layer(100, 200, (32, 64), 0.5, 0.2, torch.float16, seed=3)
    x = torch.randn(3, 400).half()[:, ::2]
    for cfg in (_flat(4, 4, 32, 2, 1), _flat(1, 16, 32, 2, 1)):
        y = ops.run_config(x, p, None, ops._fit(cfg, p))
        assert rel_error(y, reference_linear_f64(x, p, None)) < TOL


def _persist(bn, ts, ctas=1, warps=4):
    return C("flat", 6, 1, bn, 0, 1, warps, 1, True, 0, 0, ts, 1, ctas)


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_persistent_matches_reference(interp, make_layer, case, dtype):
    """One token, programs walking several items each (the CPU grid is 2 x ctas programs)."""
    N, K, tile, fs, fz = case
    _, _, p = make_layer(N, K, tile, fs, fz, dtype, seed=N * 3 + K)
    bias = torch.randn(N).to(dtype)
    for i, cfg in enumerate((_persist(32, 2, 1), _persist(16, 4, 3), _persist(64, 2, 100))):
        x = torch.randn(1, K).to(dtype)
        _check(x, p, bias if i % 2 == 0 else None, cfg)


def test_persistent_row_kinds_and_reset(interp):
    p = rows_layer(torch.bfloat16, seed=5)
    bias = torch.randn(p.out_features).bfloat16()
    x = torch.randn(1, p.in_features).bfloat16()
    f = ops._fit(_persist(32, 2, 2), p)
    a = _check(x, p, bias, f)
    assert torch.equal(a[:, 64:96], bias[64:96][None])
    assert torch.equal(a, _run(x, p, bias, f))
    assert ops._fit(C("flat", 6, 4, 32, 0, 1, 4, 1, True, 0, 0, 2, 1, 2), p) is None  # one token only
    assert ops._fit(_persist(32, 1), p) is None  # needs an even number of 2:4 tiles per item
    # odd storage offset: x is copied before its int32 view
    xo = torch.randn(1, p.in_features + 1).bfloat16()[:, 1:]
    assert rel_error(ops.run_config(xo, p, None, f), reference_linear_f64(xo, p, None)) < TOL
