"""Compile the library's Triton kernels for sm_90 on a machine without a GPU.

Triton's CPU interpreter runs code that its compiler refuses (a name bound to tensors of two shapes in the two
branches of an ``if``, for one), so a kernel that passes every interpreted test can still fail on its first GPU
call. Run in a process without ``TRITON_INTERPRET``: each launcher below is called on CPU tensors with its kernel
replaced by a recorder, and every recorded launch (arguments, constexprs, ``num_warps`` / ``num_stages``) is
compiled by ``triton.compile`` for ``GPUTarget("cuda", 90, 32)`` down to a cubin through Triton's own ptxas.
Prints one ``compiled <case>: <n> launches`` line per case; exits 1 naming the first case that fails.

    PYTHONPATH=src:tests/kernels python3 tests/kernels/compile_sm90.py [case ...]
"""

from __future__ import annotations

import contextlib
import sys
import traceback

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

TARGET = GPUTarget("cuda", 90, 32)
DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int8: "i8",
          torch.uint8: "u8", torch.int16: "i16", torch.int32: "i32", torch.int64: "i64", torch.bool: "i1"}


class Recorder:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args, **kwargs)`` records the launch."""

    def __init__(self, jit):
        self.jit, self.calls = jit, []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((args, dict(kwargs)))


def _arg_type(value) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + DTYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for {type(value).__name__}")


def compile_launch(jit, args: tuple, kwargs: dict):
    """``triton.compile`` of one recorded launch of ``jit`` for :data:`TARGET`."""
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    bound = {**dict(zip(jit.arg_names, args)), **kwargs}
    signature, constexprs = {}, {}
    for param in jit.params:
        value = bound[param.name]
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            constexprs[param.name] = value
        else:
            signature[param.name] = _arg_type(value)
    return triton.compile(ASTSource(jit, signature, constexprs), target=TARGET, options=options)


@contextlib.contextmanager
def recording(module, name: str):
    """Replace ``module.name`` (a jitted kernel) by a :class:`Recorder` while the block runs."""
    jit = getattr(module, name)
    rec = Recorder(jit)
    setattr(module, name, rec)
    try:
        yield rec
    finally:
        setattr(module, name, jit)


# ------------------------------------------------------------------------------------------------ cases
def _q4_decode():
    from kernels_testutil import q4_layer

    from tilesparse.kernels import triton_q4

    with recording(triton_q4, "hybrid_q4_kernel") as rec:
        for group in (128, 48):  # one scale per tile / gathered per weight
            p = q4_layer(72, 256, (32, 128), group, seed=1)
            for M, cfg in ((1, {}), (1, {"bn": 16, "ts": 1, "td": 1, "pref": True}), (3, {"split": 2}),
                           (16, {}), (16, {"dot": False})):
                x = torch.randn(M, 256).to(torch.bfloat16)
                triton_q4.q4_linear_triton(x, p, torch.randn(72).to(torch.bfloat16), **cfg)
    return rec


def _q4_unpack():
    from kernels_testutil import q4_layer

    from tilesparse.kernels import triton_q4

    with recording(triton_q4, "unpack_q4_kernel") as rec:
        triton_q4.unpack_q4_triton(q4_layer(72, 256, (32, 128), 128, seed=2))
        triton_q4.unpack_q4_triton(q4_layer(40, 96, (16, 32), 48, seed=3), dtype=torch.float16)
    return rec


def _unpack16():
    from kernels_testutil import random_layer

    from tilesparse.kernels import ops, triton_hybrid

    with recording(triton_hybrid, "unpack_kernel") as rec:
        ops.unpack_triton(random_layer(128, 256, (64, 128), 0.5, 0.2)[2])
    return rec


def _stream():
    from kernels_testutil import random_layer

    from tilesparse.kernels import ops, triton_stream

    p = random_layer(128, 256, (64, 64), 0.5, 0.2)[2]
    with recording(triton_stream, "hybrid_stream_kernel") as rec:
        for M in (1, 16):
            cfgs = ops.stream_candidates(M)
            picked = {(c.mode, c.pref, c.split > 1, c.xt): c for c in cfgs}  # one per kind of variant
            for cfg in picked.values():
                cfg = ops._fit_stream(cfg, p)
                if cfg is None:
                    continue
                x = torch.randn(M, 256).to(torch.bfloat16)
                ops.launch_stream(x, p, None, cfg, torch.empty(M, 128, dtype=torch.bfloat16))
    return rec


def _fused_mask():
    from tilesparse.learning import fused_triton as ft
    from tilesparse.masks.tiles import TileGrid

    grid = TileGrid(96, 128, 32, 64)
    with recording(ft, "_fwd_kernel") as fwd, recording(ft, "_bwd_kernel") as bwd, \
            recording(ft, "_noise_kernel") as noise:
        for dtype in (torch.bfloat16, torch.float32):
            w = torch.randn(96, 128).to(dtype)
            logits = torch.randn(6, 96, 32, requires_grad=True)
            tiles = torch.rand(*grid.shape, requires_grad=True)
            ids = torch.randint(0, 6, (96, 32), dtype=torch.uint8)
            for kw in ({"logits": logits, "tiles": tiles, "seed": 3, "record_sq": True},  # PATCH-Joint
                       {"logits": logits, "hard": True, "seed": 3},  # MaskLLM
                       {"ids": ids, "tiles": tiles, "noise": False}):  # PATCH-Tile
                out, _ = ft.fused_masked_weight(w, grid, **kw)
                out.float().sum().backward()
        ft.gumbel_noise_from_seed(5, (6, 96, 32))
    return [fwd, bwd, noise]


CASES = {"q4_decode": _q4_decode, "q4_unpack": _q4_unpack, "unpack16": _unpack16, "stream": _stream,
         "fused_mask": _fused_mask}


def main(names) -> int:
    for name in names or CASES:
        try:
            recs = CASES[name]()
            recs = recs if isinstance(recs, list) else [recs]
            for rec in recs:
                if not rec.calls:
                    raise RuntimeError(f"no launch of {rec.jit.__name__}")
                for args, kwargs in rec.calls:
                    compile_launch(rec.jit, args, kwargs)
        except Exception:  # noqa: BLE001 - report which case failed and why
            print(f"FAILED {name}\n{traceback.format_exc()}", flush=True)
            return 1
        print(f"compiled {name}: {sum(len(r.calls) for r in recs)} launches", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
