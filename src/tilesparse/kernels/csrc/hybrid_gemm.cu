// Hybrid (dense / 2:4 tile) linear as a GEMM on sparse tensor cores, for 16 tokens and more (v10).
//
// Y[M, N] = X[M, K] @ W^T for one packed layer (tilesparse.kernels.format), compiled at run time by NVRTC
// (tilesparse/kernels/cuda_gemm.py) with these macros:
//   DT_BF16   1 = bfloat16, 0 = float16
//   BM        weight rows per block (a multiple of 16 * WM dividing the tile rows)
//   BT        tokens per block (a multiple of 8 * WN)
//   WM, WN    warps along the rows and along the tokens; a warp owns (BM / WM) rows x (BT / WN) tokens
//   NST       shared-memory stages (2-6)
//   HAS_BIAS  1 = add bias
//   NOCT      token octets per warp (BT / WN / 8; named for the shared helpers)
//
// Work: block (x, j) = BM rows of one tile-row (row chunk x / ntb), tokens [BT * tb, BT * tb + BT) with tb = x % ntb,
// and the j-th of `split` equal parts of that tile-row's 64-column steps (its 2:4 steps first, then its
// dense steps, in the order of the stored values). Every step is one shared-memory stage filled by 16-byte
// cp.async copies, NST - 1 steps ahead of the tensor cores: the block's weight rows of the step (2:4: the 64
// bytes of kept values and the 8 bytes of positions of each row; dense: its 128 bytes) and the 64 input columns
// of its tokens. Rows of 128 bytes are stored with their 16-byte chunks swizzled (chunk c of row r at c ^ (r & 7)),
// so that ldmatrix reads eight rows of one chunk without bank conflicts. ldmatrix gives the operands in the
// natural K order: a 2:4 step is two mma.sp.m16n8k32 (kept values 16h..16h+15 of the row, positions in bits
// 32h..32h+31 of the row's 8 metadata bytes: the selected thread pair 0, 1 reads 16 bits each), a dense step four
// mma.m16n8k16.
// split > 1: fp32 atomics into ws[M, N] (kept zero between calls); the last block of a (chunk, token block) to
// arrive writes the output and clears its part of ws and its counter cnt[tb * n_chunks + chunk].

// (helpers: mma_common.cuh, prepended by cuda_gemm.py)

#define TPB (WM * WN * 32)
#define WR (BM / WM)  // rows per warp
#define WT (BT / WN)  // tokens per warp
#define MT (WR / 16)  // 16-row MMA tiles per warp
#define W_BYTES (BM * 128)
#define M_BYTES (BM * 8)
#define X_BYTES (BT * 128)
#define STAGE_BYTES (W_BYTES + M_BYTES + X_BYTES)
#define MAX_STEPS 512  // 64-column steps per block (cuda_gemm.py picks split so that this holds)

__device__ __forceinline__ void cp_async16(u32 dst, const void* src, bool ok) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" :: "r"(dst), "l"(src), "r"(ok ? 16 : 0));
}

__device__ __forceinline__ void cp_async8(u32 dst, const void* src, bool ok) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;" :: "r"(dst), "l"(src), "r"(ok ? 8 : 0));
}

__device__ __forceinline__ void ldsm4(u32 (&r)[4], u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}

__device__ __forceinline__ void ldsm2(u32 (&r)[2], u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];" : "=r"(r[0]), "=r"(r[1]) : "r"(addr));
}

// byte offset of 16-byte chunk c of row r in a swizzled block of 128-byte rows
__device__ __forceinline__ u32 swz(int r, int c) { return (u32)(r * 128 + ((c ^ (r & 7)) << 4)); }

extern "C" __global__ void __launch_bounds__(TPB) KNAME(
    const u16* __restrict__ x, u16* __restrict__ out, const u16* __restrict__ bias,
    float* __restrict__ ws, int* __restrict__ cnt,
    const u16* __restrict__ spv, const unsigned char* __restrict__ spm, const u16* __restrict__ dnv,
    const int* __restrict__ sp_cols, const int* __restrict__ sp_ptr,
    const int* __restrict__ dn_cols, const int* __restrict__ dn_ptr,
    const long long* __restrict__ row_info,
    int M, int N, int sx, int so, int split, int chunks_per_tr, int TR, int log2_tc, int n_chunks) {
    extern __shared__ __align__(128) unsigned char smem[];
    __shared__ int s_cb[MAX_STEPS];
    __shared__ int s_last;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = warp % WM, wn = warp / WM;
    const int g = lane >> 2, t = lane & 3;
    const int ntb = (M + BT - 1) / BT;  // token blocks; a row chunk's token blocks are consecutive blocks (L2 reuse)
    const int chunk = blockIdx.x / ntb, tb = blockIdx.x - chunk * ntb, j = blockIdx.y;
    const int r = chunk / chunks_per_tr, b = chunk - r * chunks_per_tr;
    const int row0 = r * TR + b * BM;  // the block's first output row
    const int tok0 = tb * BT;
    if (row0 >= N || tok0 >= M) return;
    grid_dep_wait();
    const TileRow L = tile_row(row_info, r);
    const int n_sp = L.sp_len >> 6, n_all = n_sp + (L.dn_len >> 6);
    const int s_beg = (int)((long long)n_all * j / split), s_end = (int)((long long)n_all * (j + 1) / split);
    const int nsteps = s_end - s_beg;
    const int brow = b * BM;                                      // first row inside the tile-row
    const int rows_here = min(BM, min(TR, N - r * TR) - brow);    // a multiple of 16 (N % 16 == 0)
    const int sp_p0 = sp_ptr[r], dn_p0 = dn_ptr[r];
    for (int i = tid; i < nsteps; i += TPB)  // first input column of every step of this block
        s_cb[i] = step_column(s_beg + i, n_sp, sp_cols, dn_cols, sp_p0, dn_p0, log2_tc);
    __syncthreads();
    const u32 s_base = (u32)__cvta_generic_to_shared(smem);

    // the block's i-th step into stage `slot` (rows past the layer and tokens past M are zero-filled)
    auto load_stage = [&](int i, int slot) {
        const u32 sw = s_base + slot * STAGE_BYTES, sm = sw + W_BYTES, sxb = sm + M_BYTES;
        const int st = s_beg + i;
        if (st < n_sp) {
            for (int idx = tid; idx < BM * 4; idx += TPB) {
                const int row = idx >> 2, c = idx & 3;
                const bool ok = row < rows_here;
                const u16* src = spv + L.sp_off + (long long)(brow + (ok ? row : 0)) * L.sp_stride + 32 * st + 8 * c;
                cp_async16(sw + swz(row, c), src, ok);
            }
            for (int row = tid; row < BM; row += TPB) {
                const bool ok = row < rows_here;
                cp_async8(sm + 8 * row, spm + L.mt_off + (long long)(brow + (ok ? row : 0)) * L.mt_stride + 8 * st,
                          ok);
            }
        } else {
            const int sd = st - n_sp;
            for (int idx = tid; idx < BM * 8; idx += TPB) {
                const int row = idx >> 3, c = idx & 7;
                const bool ok = row < rows_here;
                const u16* src = dnv + L.dn_off + (long long)(brow + (ok ? row : 0)) * L.dn_stride + 64 * sd + 8 * c;
                cp_async16(sw + swz(row, c), src, ok);
            }
        }
        const int cb = s_cb[i];
        for (int idx = tid; idx < BT * 8; idx += TPB) {
            const int n = idx >> 3, c = idx & 7;
            const bool ok = tok0 + n < M;
            cp_async16(sxb + swz(n, c), x + (ok ? (long long)(tok0 + n) * sx + cb + 8 * c : 0), ok);
        }
    };

    float acc[MT][NOCT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int o = 0; o < NOCT; ++o) acc[mt][o][0] = acc[mt][o][1] = acc[mt][o][2] = acc[mt][o][3] = 0.f;

    const int wr0 = wm * WR, wt0 = wn * WT;
    const int arow = lane & 15, ahi = lane >> 4;  // ldmatrix of A: row (0-15) and chunk (+0 / +1) of this lane
    // one 2:4 step: two mma.sp per (row tile, token octet)
    auto mma_sparse_step = [&](u32 sw, u32 sm, u32 sxb) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            u32 a[MT][4], e[MT];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                const int row = wr0 + 16 * mt + arow;
                ldsm4(a[mt], sw + swz(row, 2 * h + ahi));
                const u16* m0 = reinterpret_cast<const u16*>(smem + (sm - s_base) + 8 * (wr0 + 16 * mt + g));
                e[mt] = (u32)m0[2 * h + (t & 1)] | ((u32)m0[32 + 2 * h + (t & 1)] << 16);  // rows g, g + 8
            }
#pragma unroll
            for (int o = 0; o < NOCT; ++o) {
                u32 bx[4];
                ldsm4(bx, sxb + swz(wt0 + 8 * o + (lane & 7), 4 * h + (lane >> 3)));
                const uint4 bv = make_uint4(bx[0], bx[1], bx[2], bx[3]);
#pragma unroll
                for (int mt = 0; mt < MT; ++mt)
                    if (wr0 + 16 * mt < rows_here)  // (rows past the layer: zero values, no valid positions)
                        mma_sp<0>(acc[mt][o], a[mt][0], a[mt][1], a[mt][2], a[mt][3], bv, e[mt]);
            }
        }
    };
    // one dense step: four k16 sub-steps of one mma per (row tile, token octet)
    auto mma_dense_step = [&](u32 sw, u32 sxb) {
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
            u32 a[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) ldsm4(a[mt], sw + swz(wr0 + 16 * mt + arow, 2 * kk + ahi));
#pragma unroll
            for (int o = 0; o < NOCT; o += 2) {
                u32 bx[4];
                if (o + 1 < NOCT) {
                    ldsm4(bx, sxb + swz(wt0 + 8 * (o + ahi) + (lane & 7), 2 * kk + ((lane >> 3) & 1)));
                } else {
                    u32 b2[2];
                    ldsm2(b2, sxb + swz(wt0 + 8 * o + (lane & 7), 2 * kk + ((lane >> 3) & 1)));
                    bx[0] = b2[0];
                    bx[1] = b2[1];
                    bx[2] = bx[3] = 0;
                }
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    if (wr0 + 16 * mt >= rows_here) continue;
                    mma_dense(acc[mt][o], a[mt][0], a[mt][1], a[mt][2], a[mt][3], bx[0], bx[1]);
                    if (o + 1 < NOCT) mma_dense(acc[mt][o + 1], a[mt][0], a[mt][1], a[mt][2], a[mt][3], bx[2], bx[3]);
                }
            }
        }
    };

    // pipeline: NST - 1 steps in flight ahead of the tensor cores
#pragma unroll
    for (int s = 0; s < NST - 1; ++s) {
        if (s < nsteps) load_stage(s, s);
        asm volatile("cp.async.commit_group;");
    }
    for (int i = 0; i < nsteps; ++i) {
        asm volatile("cp.async.wait_group %0;" :: "n"(NST - 2) : "memory");  // step i has landed (own copies)
        __syncthreads();  // everyone's copies of step i landed; everyone is done with step i - 1's stage
        const int nx = i + NST - 1;
        if (nx < nsteps) load_stage(nx, nx % NST);
        asm volatile("cp.async.commit_group;");
        const u32 sw = s_base + (i % NST) * STAGE_BYTES;
        if (s_beg + i < n_sp) mma_sparse_step(sw, sw + W_BYTES, sw + W_BYTES + M_BYTES);
        else mma_dense_step(sw, sw + W_BYTES + M_BYTES);
    }
    asm volatile("cp.async.wait_group 0;" ::: "memory");

    // results: element k of (mt, o) is row wr0 + 16 mt + g + 8 (k >> 1), token wt0 + 8 o + 2 t + (k & 1)
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int o = 0; o < NOCT; ++o)
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                const int rr = wr0 + 16 * mt + g + 8 * (k >> 1), tok = tok0 + wt0 + 8 * o + 2 * t + (k & 1);
                if (rr < rows_here && tok < M) {
                    if (split == 1) store_out(out, bias, so, tok, row0 + rr, acc[mt][o][k]);
                    else atomicAdd(ws + (long long)tok * N + row0 + rr, acc[mt][o][k]);
                }
            }
    if (split == 1) return;
    __threadfence();
    __syncthreads();
    int* c = cnt + (long long)tb * n_chunks + chunk;
    if (tid == 0) s_last = atomicAdd(c, 1) == split - 1;
    __syncthreads();
    if (!s_last) return;
    __threadfence();
    const int ntok = min(BT, M - tok0);
    for (int idx = tid; idx < ntok * rows_here; idx += TPB) {
        const int tok = tok0 + idx / rows_here, row = row0 + idx % rows_here;
        float* w = ws + (long long)tok * N + row;
        const float v = ld_cg(w);
        *w = 0.f;
        store_out(out, bias, so, tok, row, v);
    }
    if (tid == 0) *c = 0;
}
