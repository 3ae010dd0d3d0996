"""Which register holds what in ``mma.sp::ordered_metadata.m16n8k32`` (bf16): checked on the GPU.

The v7 kernel (``src/tilesparse/kernels/csrc/hybrid_mma.cu``) assumes (1) the A-fragment layout of the PTX
ISA, (2) a B fragment with register ``i`` holding K rows ``2t + 8i + {0, 1}`` of column ``g`` (lane = 4g + t),
(3) a metadata layout; two candidates are tested: 1 = the thread pair's registers carry 16 K-columns each of
rows g and g + 8 (low / high half; what the kernel uses), 2 = each carries all 32 K-columns of one row. This script
runs single MMAs on chosen registers and compares with a float64 emulation of each assumption.

    python3 benchmarks/mma_probe.py        # GPU; prints the layouts that match
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from tilesparse.kernels import cuda_driver
from tilesparse.kernels import cuda_mma as cm

PROBE = r"""
extern "C" __global__ void mma_probe(const u32* A, const u32* B, const u32* E, float* D, int sel) {
    const int l = threadIdx.x;
    float d[4] = {0.f, 0.f, 0.f, 0.f};
    const uint4 b = make_uint4(B[4 * l], B[4 * l + 1], B[4 * l + 2], B[4 * l + 3]);
    if (sel == 0) mma_sp<0>(d, A[4 * l], A[4 * l + 1], A[4 * l + 2], A[4 * l + 3], b, E[l]);
    else mma_sp<1>(d, A[4 * l], A[4 * l + 1], A[4 * l + 2], A[4 * l + 3], b, E[l]);
    for (int k = 0; k < 4; ++k) D[4 * l + k] = d[k];
}
"""
NIBS = [0b0100, 0b1000, 0b1100, 0b1001, 0b1101, 0b1110]  # the valid ordered (i0, i1) index pairs


def bf16_bits(v: np.ndarray) -> np.ndarray:
    return (torch.tensor(v, dtype=torch.float32).to(torch.bfloat16).view(torch.int16).numpy().astype(np.uint32)
            & 0xFFFF)


def pack(vals: np.ndarray) -> np.ndarray:
    """[32, 8] values -> [32, 4] u32 registers (element 2i low half of register i)."""
    b = bf16_bits(vals)
    return (b[:, 0::2] | (b[:, 1::2] << 16)).astype(np.uint32)


def run(launch, A, B, E, sel) -> np.ndarray:
    import ctypes

    dev = "cuda"
    t = lambda a: torch.tensor(a.astype(np.int64), dtype=torch.int64).to(torch.int32).to(dev)  # noqa: E731
    D = torch.zeros(32 * 4, dtype=torch.float32, device=dev)
    tensors = [t(A.ravel()), t(B.ravel()), t(E), D]
    vals = [ctypes.c_void_p(x.data_ptr()) for x in tensors] + [ctypes.c_int(sel)]
    params = (ctypes.c_void_p * len(vals))(*[ctypes.addressof(v) for v in vals])
    launch(torch.cuda.current_stream().cuda_stream, ctypes.addressof(params))
    torch.cuda.synchronize()
    return D.view(32, 4).cpu().numpy().astype(np.float64)


def d_matrix(D: np.ndarray) -> np.ndarray:
    """Per-lane accumulators -> D[16, 8] (C layout of m16n8: c0,c1 row g cols 2t,2t+1; c2,c3 row g+8)."""
    out = np.zeros((16, 8))
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for k in range(4):
            out[g + 8 * (k // 2), 2 * t + k % 2] = D[lane, k]
    return out


def b_matrix(bvals: np.ndarray) -> np.ndarray:
    """Assumption (2): per-lane B values [32, 8] -> B[32, 8]."""
    Bm = np.zeros((32, 8))
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for e in range(8):
            Bm[2 * t + 8 * (e // 2) + e % 2, g] = bvals[lane, e]
    return Bm


def a_matrix(avals: np.ndarray, E: np.ndarray, sel: int, meta: int) -> np.ndarray:
    """Assumption (1) + metadata layout ``meta``: per-lane A values [32, 8] -> dense A[16, 32]."""
    pos = {}  # (row, group) -> nibble
    for g in range(8):
        for c in range(2):
            e = int(E[4 * g + 2 * sel + c])
            if meta == 1:
                for jj in range(4):
                    pos[(g, 4 * c + jj)] = (e >> (4 * jj)) & 15
                    pos[(g + 8, 4 * c + jj)] = (e >> (16 + 4 * jj)) & 15
            else:
                for jg in range(8):
                    pos[(g + 8 * c, jg)] = (e >> (4 * jg)) & 15
    Am = np.zeros((16, 32))
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for reg, (row, grp) in enumerate(((g, t), (g + 8, t), (g, t + 4), (g + 8, t + 4))):
            nib = pos[(row, grp)]
            for h, p in enumerate((nib & 3, nib >> 2)):
                Am[row, 4 * grp + p] += avals[lane, 2 * reg + h]
    return Am


def main() -> int:
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 2
    src = cm.configured_source(cm.MmaKey(True, 1, 4, 1, False)) + PROBE
    arch = cuda_driver.target_arch(torch.cuda.get_device_capability())
    kern = cuda_driver.Launcher(cuda_driver.load_kernel(cuda_driver.compile_source(src, "mma_probe", arch), "mma_probe"),
                                torch.cuda.current_device(), (1, 1, 1), (32, 1, 1), 0)
    rng = np.random.default_rng(0)
    # (2) B layout, independent of the metadata layout: every nibble the same, one A value set at a time
    ids = np.arange(1, 257, dtype=np.float64).reshape(32, 8)  # exact in bf16
    B = pack(ids)
    found = {}
    for nib in (0b0100, 0b1110):
        E = np.full(32, sum(nib << (4 * i) for i in range(8)), dtype=np.uint32)
        for grp in range(8):
            for h in range(2):
                av = np.zeros((32, 8))
                lane, reg = (grp, 0) if grp < 4 else (grp - 4, 2)  # row 0 = g 0: lanes 0..3
                av[lane, 2 * reg + h] = 1.0
                D = d_matrix(run(kern, pack(av), B, E, 0))
                k = 4 * grp + ((nib & 3) if h == 0 else (nib >> 2))
                found[k] = D[0]
    Bm = b_matrix(ids)
    b_ok = all(np.array_equal(found[k], Bm[k]) for k in range(32))
    print(f"B layout (register i = K rows 2t+8i+{{0,1}}): {'MATCH' if b_ok else 'NO MATCH'}")
    if not b_ok:
        for k in range(32):
            print(f"  K row {k}: D row 0 = {found[k].astype(int).tolist()} (assumed {Bm[k].astype(int).tolist()})")
    # (1) + (3): random values and random valid metadata in every lane, both selectors
    res = {1: True, 2: True}
    for trial in range(6):
        sel = trial % 2
        av = rng.standard_normal((32, 8)).round(2)
        bv = rng.standard_normal((32, 8)).round(2)
        E = np.array([sum(int(rng.choice(NIBS)) << (4 * i) for i in range(8)) for _ in range(32)], dtype=np.uint32)
        Av, Bv = bf16_bits(av), bf16_bits(bv)
        avq = torch.tensor(Av.astype(np.int32)).to(torch.int16).view(torch.bfloat16).float().numpy()
        bvq = torch.tensor(Bv.astype(np.int32)).to(torch.int16).view(torch.bfloat16).float().numpy()
        D = d_matrix(run(kern, pack(av), pack(bv), E, sel))
        for meta in (1, 2):
            want = a_matrix(avq.astype(np.float64), E, sel, meta) @ b_matrix(bvq.astype(np.float64))
            err = np.abs(D - want).max() / max(1e-9, np.abs(want).max())
            res[meta] &= bool(err < 1e-2)
    for meta in (1, 2):
        print(f"metadata layout {meta}: {'MATCH' if res[meta] else 'NO MATCH'}")
    return 0 if b_ok and (res[1] or res[2]) else 1


if __name__ == "__main__":
    sys.exit(main())
