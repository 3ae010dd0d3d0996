// Hybrid (dense / 2:4 tile) linear for 1-64 tokens on sparse tensor cores: v7 decode kernel.
//
// Y[M, N] = X[M, K] @ W^T for one packed layer (tilesparse.kernels.format), compiled at run time by NVRTC
// (tilesparse/kernels/cuda_mma.py) with these macros:
//   DT_BF16   1 = bfloat16, 0 = float16
//   NOCT      token octets (the MMA's N = 8 tokens each): 1, 2, 4 or 8
//   WARPS     warps per block; each warp owns 16 output rows of one tile-row (a "slab")
//   SB        64-column steps per batch
//   HAS_BIAS  1 = add bias
//
// Work: block (chunk, j) = 16*WARPS rows of one tile-row and the j-th of `split` equal parts of that
// tile-row's 64-column steps (its 2:4 steps first, then its dense steps). 2:4 steps run two
// mma.sp.m16n8k32 per token octet straight on the stored values and the format's own 2-bit positions; dense
// steps run four mma.m16n8k16. The K order inside a step is permuted (identically for W and X) so that a
// thread reads 16 contiguous bytes of W per row. Per batch of SB steps, X is copied into shared memory in
// that fragment order by cp.async (double-buffered) and the next batch's weights are loaded into a second set of
// registers while this batch's MMAs run. Sparse-MMA metadata: the selected thread pair of each quad carries 16
// K-columns each, row g in the low and row g + 8 in the high half (checked by benchmarks/mma_probe.py).
// split > 1: fp32 atomics into ws[M, N] (kept zero between calls) and the last block of a chunk to arrive
// writes the output and clears its part of ws and its counter.

// (helpers: mma_common.cuh, prepended by cuda_mma.py)

#define TPB (WARPS * 32)
#define MIN_BLOCKS (512 / TPB)  // at most 128 registers per thread: 16 warps per SM
#define BR (WARPS * 16)
#define XS_WORDS (SB * NOCT * 256)
#define MAX_STEPS 512  // 64-column steps per block (cuda_mma.py picks split so that this holds)

extern "C" __global__ void __launch_bounds__(TPB, MIN_BLOCKS) KNAME(
    const u16* __restrict__ x, u16* __restrict__ out, const u16* __restrict__ bias,
    float* __restrict__ ws, int* __restrict__ cnt,
    const u16* __restrict__ spv, const unsigned char* __restrict__ spm, const u16* __restrict__ dnv,
    const int* __restrict__ sp_cols, const int* __restrict__ sp_ptr,
    const int* __restrict__ dn_cols, const int* __restrict__ dn_ptr,
    const long long* __restrict__ row_info,
    int M, int N, int sx, int so, int split, int chunks_per_tr, int TR, int log2_tc) {
    __shared__ __align__(16) u32 xs[2 * XS_WORDS];
    __shared__ int s_cb[MAX_STEPS];
    __shared__ int s_last;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int chunk = blockIdx.x, j = blockIdx.y;
    const int r = chunk / chunks_per_tr, b = chunk - r * chunks_per_tr;
    const int row0 = r * TR + b * BR;
    if (row0 >= N) return;
    grid_dep_wait();  // programmatic launch: x and the outputs only once the grid before has finished
    const TileRow L = tile_row(row_info, r);
    const long long sp_stride = L.sp_stride, mt_stride = L.mt_stride, dn_stride = L.dn_stride;
    const int n_sp = L.sp_len >> 6, n_all = n_sp + (L.dn_len >> 6);
    const int s_beg = (int)((long long)n_all * j / split), s_end = (int)((long long)n_all * (j + 1) / split);
    const int rows_tr = min(TR, N - r * TR);
    const int wrow = b * BR + warp * 16;  // the warp's first row inside the tile-row
    const bool wvalid = wrow < rows_tr;   // N % 16 == 0: a slab is wholly inside or wholly beyond
    const int sp_p0 = sp_ptr[r], dn_p0 = dn_ptr[r];
    const RowPtrs A = row_ptrs(L, spv, spm, dnv, wvalid ? wrow + g : 0, t);
    const u16 *spA = A.sp, *dnA = A.dn;
    const unsigned char* mA = A.mt;

    float acc[NOCT][4];
    zero_acc(acc);

    // this warp's weights of the SB steps from s0: 2:4 step = rows g, g+8 in a0, a1, their metadata in a2;
    // dense step = the two 32-column halves of rows g, g+8 in a0..a3
    auto load_w = [&](int s0, uint4 (&a0)[SB], uint4 (&a1)[SB], uint4 (&a2)[SB], uint4 (&a3)[SB]) {
        const int nb = min(SB, s_end - s0);
#pragma unroll
        for (int i = 0; i < SB; ++i) {
            const int st = s0 + i;
            a0[i] = a1[i] = a2[i] = a3[i] = make_uint4(0, 0, 0, 0);
            if (i < nb && wvalid) {
                if (st < n_sp) {
                    const u16* p = spA + 32 * st;
                    a0[i] = ldg16(p);
                    a1[i] = ldg16(p + 8 * sp_stride);
                    const uint2 mg = ldg8(mA + 8 * st), mg8 = ldg8(mA + 8 * mt_stride + 8 * st);
                    a2[i] = make_uint4(mg.x, mg.y, mg8.x, mg8.y);
                } else {
                    const u16* p = dnA + 64 * (st - n_sp);
                    a0[i] = ldg16(p);
                    a1[i] = ldg16(p + 8 * dn_stride);
                    a2[i] = ldg16(p + 32);
                    a3[i] = ldg16(p + 8 * dn_stride + 32);
                }
            }
        }
    };
    // two batches of weights in registers: the next one's loads are in flight during this one's MMAs
    uint4 a0[SB], a1[SB], a2[SB], a3[SB], b0_[SB], b1_[SB], b2_[SB], b3_[SB];
    if (s_beg < s_end) load_w(s_beg, a0, a1, a2, a3);

    // first input column of every step of this block (2:4 steps first, then dense)
    const int nsteps = s_end - s_beg;
    for (int i = tid; i < nsteps; i += TPB)
        s_cb[i] = step_column(s_beg + i, n_sp, sp_cols, dn_cols, sp_p0, dn_p0, log2_tc);
    zero_x(xs, 2 * XS_WORDS, tid, TPB);
    __syncthreads();
    // x of a batch (its tokens < M) -> shared memory in fragment order (stage_x, mma_common.cuh), by 4-byte
    // cp.async
    auto stage = [&](int sb0, u32* dst) {
        stage_x<0>(dst, x, s_cb, sb0, SB, s_beg, s_end, n_sp, M, sx, tid, TPB);
    };
    if (s_beg < s_end) stage(s_beg, xs);

    for (int s0 = s_beg, batch = 0; s0 < s_end; s0 += SB, ++batch) {
        const int nb = min(SB, s_end - s0);
        // 1. the next batch's weights
        if (s0 + SB < s_end) load_w(s0 + SB, b0_, b1_, b2_, b3_);
        // 2. x of this batch has landed (everyone's copies); all warps are done with the other buffer,
        //    which now receives the next batch
        asm volatile("cp.async.wait_group 0;" ::: "memory");
        __syncthreads();
        const u32* xcur = xs + (batch & 1) * XS_WORDS;
        if (s0 + SB < s_end) stage(s0 + SB, xs + ((batch + 1) & 1) * XS_WORDS);
        // 3. tensor cores
        if (wvalid) {
#pragma unroll
            for (int i = 0; i < SB; ++i) {
                if (i < nb) {
                    const int st = s0 + i;
                    const u32* xb = xcur + (i * NOCT) * 256 + lane * 4;
                    mma_step(acc, a0[i], a1[i], a2[i], a3[i], xb, st < n_sp, t);
                }
            }
        }
#pragma unroll
        for (int i = 0; i < SB; ++i) {
            a0[i] = b0_[i];
            a1[i] = b1_[i];
            a2[i] = b2_[i];
            a3[i] = b3_[i];
        }
    }

    write_out(acc, out, bias, ws, cnt, &s_last, M, N, so, split, chunk, r * TR + wrow + g, wvalid,
              row0, min(BR, rows_tr - b * BR), tid, TPB);
}
