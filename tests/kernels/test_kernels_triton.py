"""The public Triton path (the heuristic's stream / unpack choice), ``unpack_kernel`` and the autotuner's candidate
lists, against the float64 reference, on the CPU through TRITON_INTERPRET=1 (small shapes)."""

from __future__ import annotations

import pytest
import torch

from kernels_testutil import interp, make_layer  # noqa: F401 (fixtures)

from tilesparse.kernels import ops
from tilesparse.kernels.ops import KernelConfig as C
from tilesparse.kernels.reference import reference_linear_f64, rel_error

TOL = 1e-2  # bf16 / fp16 operands, fp32 accumulation


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
    """For every tile size that is a multiple of 16 the heuristic's choice fits the layer (stream or unpack); a
    plain dense layer gets ``"dense"``."""
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


def test_unpack_kernel_exact(interp, make_layer):
    W, mask, p = make_layer(100, 200, (32, 64), 0.5, 0.2, torch.bfloat16, seed=11)
    assert torch.equal(ops.unpack_triton(p), W * mask)


def test_unpack_path(interp, make_layer):
    _, _, p = make_layer(100, 200, (32, 64), 0.5, 0.2, torch.bfloat16, seed=12)
    x = torch.randn(70, 200).bfloat16()
    y = ops.run_config(x, p, None, C("unpack"))
    assert rel_error(y, reference_linear_f64(x, p, None)) < TOL


def test_candidates_fit_the_layer(make_layer):
    """Every candidate is already fitted to the layer; the stream (and on a GPU mma) kernels' candidates at 1-64
    tokens, ``"unpack"`` above 64 tokens and wherever none of those fits; ``"dense"`` alone for a plain dense
    layer unless ``force_kernel``."""
    for tile, kinds in (((64, 64), {"stream"}), ((16, 16), {"stream", "unpack"}), ((48, 48), {"unpack"})):
        _, _, p = make_layer(4 * tile[0], 4 * tile[1], tile, 0.5)
        seen = set()
        for M in (1, 4, 16, 64, 65, 512):
            cands = ops.candidate_configs(M, p)
            assert cands and len(set(cands)) == len(cands)
            for c in cands:
                assert ops._fit(c, p) == c, c.short()
                assert c.path in ("stream", "mma", "unpack") and (c.bm >= M or c.path == "unpack"), c.short()
            if M > 64:
                assert cands == [C("unpack")]
            else:  # unpack only where no kernel candidate fits
                assert (C("unpack") in cands) == all(c.path == "unpack" for c in cands)
                seen |= {c.path for c in cands}
        assert seen == kinds, tile  # at 1-64 tokens
    _, _, pd = make_layer(128, 128, (64, 64), 0.0)
    assert ops.candidate_configs(1, pd) == [C("dense")] == ops.candidate_configs(512, pd)
    forced = ops.candidate_configs(1, pd, force_kernel=True)
    assert forced[0] == C("dense") and {c.path for c in forced[1:]} == {"stream"}
    assert ops.candidate_configs(512, pd, force_kernel=True) == [C("dense"), C("unpack")]


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
    chosen, ran, eager_calls = [], [], []

    def choose(x2, packed, bias, eager=False):
        chosen.append(x2.shape[0])
        eager_calls.append(eager)
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
    assert all(eager_calls)  # no CUDA graph is being captured: the eager choice


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
