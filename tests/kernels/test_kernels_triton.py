"""Triton kernels vs the float64 reference, on the CPU through TRITON_INTERPRET=1 (small shapes)."""

from __future__ import annotations

import pytest
import torch

from kernels_testutil import CASES, case_id, interp, make_layer  # noqa: F401 (fixtures)

from tilesparse.kernels import ops
from tilesparse.kernels.ops import KernelConfig as C
from tilesparse.kernels.reference import reference_linear_f64, rel_error

TOL = 1e-2  # bf16 / fp16 operands, fp32 accumulation


def _run(x, p, bias, cfg):
    out = torch.full((x.shape[0], p.out_features), float("nan"), dtype=x.dtype)  # poison
    ops.launch_triton(x, p, bias, cfg, out)
    return out


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_modes_match_reference(interp, make_layer, case, dtype):
    N, K, tile, fs, fz = case
    W, mask, p = make_layer(N, K, tile, fs, fz, dtype, seed=N * K)
    bias = torch.randn(N).to(dtype)
    configs = [
        (1, C("triton", 0, 1, 16, 64, 1, 4, 3, False), None),
        (3, C("triton", 0, 4, 16, 64, 2, 4, 3, True), bias),
        (2, C("triton", 3, 2, 16, 64, 4, 4, 3, True), None),
        (1, C("triton", 3, 1, 16, 32, 1, 4, 3, False), bias),
        (5, C("triton", 1, 16, 32, 64, 1, 4, 3, True), bias),
        (17, C("triton", 1, 32, 32, 64, 2, 4, 3, False), None),
        (33, C("triton", 2, 32, 32, 32, 1, 4, 3, True), bias),
        (40, C("triton", 2, 32, 32, 64, 1, 4, 3, False), None),
    ]
    if case is not CASES[0]:  # every mode on the first case, a subset on the others
        configs = configs[::2]
    else:  # pipelined / unrolled K loops (tl.range num_stages / loop_unroll_factor)
        configs += [
            (1, C("triton", 3, 1, 16, 32, 2, 4, 3, True, 3, 2), bias),
            (3, C("triton", 0, 4, 16, 64, 1, 8, 3, True, 4, 0), None),
            (16, C("triton", 1, 16, 32, 64, 2, 4, 3, True, 3, 0), bias),
        ]
    for M, cfg, b in configs:
        cfg = ops._fit(cfg, p)
        x = torch.randn(M, K).to(dtype)
        out = _run(x, p, b, cfg)
        err = rel_error(out, reference_linear_f64(x, p, b))
        assert err < TOL, f"M={M} {cfg.short()}: rel err {err:.3e}"


HEURISTIC_LAYERS = [  # N, K, tile: tile width a power of two or not, tile rows 16 or 128 (partial edge tiles)
    (48, 96, (16, 32)),
    (136, 96, (128, 64)),
    (40, 144, (16, 48)),
    (136, 120, (128, 80)),
]


def _heuristic_path(M, tile):
    """What :func:`ops.heuristic_config` should pick for a layer with 2:4 tiles."""
    if M <= 64 and tile[1] in (32, 64) and (M == 1 or tile[0] % 32 == 0):
        return "stream", 0 if M == 1 else 1
    return "unpack", None


@pytest.mark.parametrize("layer", HEURISTIC_LAYERS, ids=lambda c: f"{c[0]}x{c[1]}-t{c[2][0]}x{c[2][1]}")
def test_public_path_heuristic_configs(interp, make_layer, layer):
    """Without tuning (the CPU interpreter) ``hybrid_linear`` runs the heuristic's choice: stream kernel or
    unpack + ``F.linear``, on every tile size the kernels accept."""
    from tilesparse.kernels.reference import reference_linear

    N, K, tile = layer
    _, _, p = make_layer(N, K, tile, 0.5, 0.2, torch.bfloat16, seed=N + K)
    bias = torch.randn(N).bfloat16()
    for i, M in enumerate((1, 3, 16, 40, 65, 200)):
        cfg = ops.heuristic_config(M, p)
        path, mode = _heuristic_path(M, tile)
        assert (cfg.path, cfg.mode if path == "stream" else None) == (path, mode), (M, cfg.short())
        assert ops._fit(cfg, p) == cfg
        x = torch.randn(M, K).bfloat16()
        b = bias if i % 2 else None
        y = ops.hybrid_linear(x, p, b, use_triton=True)
        if path == "unpack":  # the same unpacked weight through the same F.linear
            assert torch.equal(y, reference_linear(x, p, b)), M
        else:
            assert rel_error(y, reference_linear_f64(x, p, b)) < TOL, (M, cfg.short())


def test_heuristic_runs_on_every_supported_tile_size(make_layer):
    """For every tile size that is a multiple of 16 the heuristic's choice fits the layer; a plain dense layer
    runs ``F.linear`` on its weight."""
    for tr in (16, 32, 48, 96, 128):
        for tc in (16, 48, 64, 80, 128):
            _, _, p = make_layer(2 * tr, 2 * tc, (tr, tc), 0.5)
            assert ops.kernel_supported(p)
            for M in (1, 2, 16, 64, 65, 1000):
                cfg = ops.heuristic_config(M, p)
                assert ops._fit(cfg, p) == cfg, (tr, tc, M, cfg.short())
                if cfg.path == "stream":
                    assert cfg.bm >= M and cfg.mode in (0, 1)
                else:
                    assert cfg.path == "unpack"
    _, _, pd = make_layer(64, 64, (32, 32), 0.0)
    assert pd.is_plain_dense() and ops.heuristic_config(3, pd) == C("dense")


def test_3d_and_noncontiguous_input(interp, make_layer):
    _, _, p = make_layer(100, 200, (32, 64), 0.5, 0.2, torch.float16, seed=3)
    bias = torch.randn(100).half()
    x = torch.randn(2, 5, 400).half()[:, :, ::2]  # stride 2 along in
    assert not x.is_contiguous()
    y = ops.hybrid_linear(x, p, bias, use_triton=True)
    assert y.shape == (2, 5, 100)
    assert rel_error(y, reference_linear_f64(x.reshape(-1, 200), p, bias).reshape(2, 5, 100)) < TOL
    xt = torch.randn(200, 6).half().t()  # transposed view
    assert rel_error(ops.hybrid_linear(xt, p, bias, use_triton=True), reference_linear_f64(xt, p, bias)) < TOL


def test_split_k_counter_reset(interp, make_layer):
    """The split-K semaphore must be left at zero: the same launch twice gives the same, right result."""
    _, _, p = make_layer(64, 256, (32, 64), 0.5, 0.0, torch.bfloat16, seed=7)
    cfg = C("triton", 1, 16, 32, 64, 4, 4, 3, True)
    x = torch.randn(4, 256).bfloat16()
    a, b = _run(x, p, None, cfg), _run(x, p, None, cfg)
    assert torch.equal(a, b)
    assert rel_error(a, reference_linear_f64(x, p, None)) < TOL


def test_unpack_kernel_exact(interp, make_layer):
    W, mask, p = make_layer(100, 200, (32, 64), 0.5, 0.2, torch.bfloat16, seed=11)
    assert torch.equal(ops.unpack_triton(p), W * mask)


def test_unpack_path(interp, make_layer):
    _, _, p = make_layer(100, 200, (32, 64), 0.5, 0.2, torch.bfloat16, seed=12)
    x = torch.randn(70, 200).bfloat16()
    y = ops.run_config(x, p, None, C("unpack"))
    assert rel_error(y, reference_linear_f64(x, p, None)) < TOL


def test_small_tiles_fall_back_to_fma_mode(make_layer):
    _, _, p = make_layer(64, 64, (16, 16), 0.5)
    cfg = ops._fit(C("triton", 1, 16, 64, 128, 4, 4, 3, True), p)
    assert cfg.mode == 0 and cfg.bn == 16 and cfg.bk == 16


def test_candidates_fit_the_tiles(make_layer):
    _, _, p = make_layer(256, 256, (64, 64), 0.5)
    for M in (1, 4, 16, 64, 512):
        cands = ops.candidate_configs(M, p)
        assert cands
        for c in cands:
            if c.path == "triton":
                assert 64 % c.bn == 0 and 64 % c.bk == 0


def test_bad_inputs_raise(interp, make_layer):
    _, _, p = make_layer(64, 64, (32, 32), 0.5, 0.0, torch.bfloat16)
    with pytest.raises(TypeError, match="dtype"):
        ops.hybrid_linear(torch.randn(3, 64), p, use_triton=True)
    with pytest.raises(ValueError, match="in_features=64"):
        ops.hybrid_linear(torch.randn(3, 63).bfloat16(), p, use_triton=True)
    with pytest.raises(ValueError, match="bias"):
        ops.hybrid_linear(torch.randn(3, 64).bfloat16(), p, torch.randn(10).bfloat16(), use_triton=True)
    with pytest.raises(TypeError, match="torch.Tensor"):
        ops.hybrid_linear([[1.0] * 64], p)
    _, _, p8 = make_layer(32, 32, (8, 8), 0.5, 0.0, torch.bfloat16)
    with pytest.raises(ValueError, match="multiples of 16"):
        ops.hybrid_linear(torch.randn(3, 32).bfloat16(), p8, use_triton=True)
    # the default path takes such a layer through the reference
    y = ops.hybrid_linear(torch.randn(3, 32).bfloat16(), p8)
    assert y.shape == (3, 32)


def test_empty_batch(interp, make_layer):
    _, _, p = make_layer(64, 64, (32, 32), 0.5, 0.0, torch.bfloat16)
    y = ops.hybrid_linear(torch.randn(0, 64).bfloat16(), p, use_triton=True)
    assert y.shape == (0, 64)


def test_prepared_runners_are_cached_per_layer_and_rebuilt_after_tuning_changes(monkeypatch):
    """hybrid_linear chooses, fits and prepares a layer's launch once per token count (and bias or not), keeps
    it on the layer, and rebuilds it when the tuning table changes or the workspaces are released."""
    from kernels_testutil import random_layer

    from tilesparse.kernels.reference import reference_linear

    p = random_layer(128, 256, (64, 64), 0.5)[2]
    chosen, ran = [], []

    def choose(x2, packed, bias):
        chosen.append(x2.shape[0])
        return ops.heuristic_config(x2.shape[0], packed)

    def run(x2, packed, bias, cfg):  # the kernels cannot run here: the reference stands in
        ran.append(cfg)
        return reference_linear(x2, packed, bias)

    monkeypatch.setattr(ops, "choose_config", choose)
    monkeypatch.setattr(ops, "run_config", run)
    x = torch.randn(3, 256).bfloat16()
    b = torch.randn(128).bfloat16()
    for _ in range(3):
        y = ops.hybrid_linear(x, p, use_triton=True)
    assert chosen == [3] and len(ran) == 3
    assert torch.equal(y, reference_linear(x, p, None))
    ops.hybrid_linear(x, p, b, use_triton=True)  # with bias: its own launch
    ops.hybrid_linear(x[:1], p, use_triton=True)  # another token count
    ops.hybrid_linear(x, p, use_triton=True)
    assert chosen == [3, 3, 1]
    ops._TUNED[("some", "key")] = ran[0]  # the tuning table moved: prepared again
    try:
        ops.hybrid_linear(x, p, use_triton=True)
        assert chosen == [3, 3, 1, 3]
        ops.release_workspaces()
        ops.hybrid_linear(x, p, use_triton=True)
        assert chosen == [3, 3, 1, 3, 3]
    finally:
        ops._TUNED.pop(("some", "key"))
    forced = ran[0]
    ops.hybrid_linear(x, p, config=forced, use_triton=True)  # a forced configuration is not chosen
    assert len(chosen) == 5
    p.rebuild_layout()  # a new layout drops the layer's prepared launches
    ops.hybrid_linear(x, p, use_triton=True)
    assert len(chosen) == 6


def test_tuning_table_counts_its_changes():
    t = ops._TuneTable()
    g = t.gen
    t["a"] = 1
    t.update(b=2)
    t.setdefault("c", 3)
    del t["a"]
    t.pop("b")
    t.clear()
    assert t.gen == g + 6 and not t
