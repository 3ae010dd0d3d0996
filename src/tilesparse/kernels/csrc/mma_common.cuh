// Helpers shared by the sparse-tensor-core decode kernels (hybrid_mma.cu v7, hybrid_mma9.cu v9): loads,
// conversions, the dense and sparse MMAs, the metadata gather, the dependent-launch controls.
// Prepended by tilesparse/kernels/cuda_mma.py.

typedef unsigned int u32;
typedef unsigned long long u64;
typedef unsigned short u16;

#if DT_BF16
#define MMA_T "bf16"
#else
#define MMA_T "f16"
#endif

__device__ __forceinline__ uint4 ldg16(const void* p) {
    uint4 v;
    asm("ld.global.nc.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}

__device__ __forceinline__ uint2 ldg8(const void* p) {
    uint2 v;
    asm("ld.global.nc.v2.u32 {%0,%1}, [%2];" : "=r"(v.x), "=r"(v.y) : "l"(p));
    return v;
}

// programmatic dependent launch (sm_90; both are no-ops for a kernel launched without it, cuda_mma._launch):
// wait until the grids this one depends on have finished and their writes are visible -- every thread calls it
// before its first read of x or first write of out / ws / cnt; and let the next grid be scheduled
__device__ __forceinline__ void grid_dep_wait() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void grid_dep_launch() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

__device__ __forceinline__ float ld_cg(const float* p) {
    float v;
    asm volatile("ld.global.cg.f32 %0, [%1];" : "=f"(v) : "l"(p));
    return v;
}

__device__ __forceinline__ float to_f32(u16 h) {
    float f;
#if DT_BF16
    u32 w = ((u32)h) << 16;
    asm("mov.b32 %0, %1;" : "=f"(f) : "r"(w));
#else
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
#endif
    return f;
}

__device__ __forceinline__ u16 from_f32(float f) {
    u16 h;
#if DT_BF16
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
#else
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
#endif
    return h;
}

// D += A(16x32, 2:4 compressed to 16x16) * B(32x8); sel: which thread pair of a quad holds the metadata
template <int SEL>
__device__ __forceinline__ void mma_sp(float* d, u32 a0, u32 a1, u32 a2, u32 a3, uint4 b, u32 e) {
    asm volatile(
        "mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32." MMA_T "." MMA_T ".f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9,%10,%11}, {%0,%1,%2,%3}, %12, %13;"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b.x), "r"(b.y), "r"(b.z), "r"(b.w), "r"(e), "n"(SEL));
}

// D += A(16x16) * B(16x8)
__device__ __forceinline__ void mma_dense(float* d, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32." MMA_T "." MMA_T ".f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// tile-row r's layout (row_info[r]: lengths, offsets and strides of its 2:4 values, metadata and dense values)
struct TileRow {
    int sp_len, dn_len;
    long long sp_off, sp_stride, mt_off, mt_stride, dn_off, dn_stride;
};

__device__ __forceinline__ TileRow tile_row(const long long* __restrict__ row_info, int r) {
    const long long* ri = row_info + 8 * r;
    return {(int)ri[0], (int)ri[5], ri[1], ri[2], ri[3], ri[4], ri[6], ri[7]};
}

// first input column of step st of a tile-row (64 columns; its 2:4 steps first, then its dense steps): the CSR
// tile columns from sp_cols / dn_cols at the tile-row's offsets sp_p0 / dn_p0, tiles 2^log2_tc columns wide
__device__ __forceinline__ int step_column(int st, int n_sp, const int* __restrict__ sp_cols,
                                           const int* __restrict__ dn_cols, int sp_p0, int dn_p0, int log2_tc) {
    const bool sp = st < n_sp;
    const int pos = 64 * (sp ? st : st - n_sp);
    const int tile = sp ? sp_cols[sp_p0 + (pos >> log2_tc)] : dn_cols[dn_p0 + (pos >> log2_tc)];
    return (tile << log2_tc) + (pos & ((1 << log2_tc) - 1));
}

// x of the block's steps sb0 .. sb0 + sb - 1 (at most; steps from s_beg, their first input columns in s_cb) ->
// shared memory in the MMA's fragment order [step][octet][half][lane][4 words], by 4-byte cp.async, one commit
// group; by nthr threads. Only tokens < M are copied: the token columns past M stay as zero_x left them (they
// only reach outputs that are never written). 2:4 steps: x column e (even) = 32a + 16h + 8s + 4bb + 2c goes to
// MMA s, quad position 2h + c, register a + 2bb. Dense steps, DENSE_ORDER 0 (v7): e = 32u + 8t + 2j to sub-step
// u, quad position t, word j; 1 (the 4-bit kernel): e = 16t + 8h + 2j to half h, quad position t, word j.
template <int DENSE_ORDER>
__device__ __forceinline__ void stage_x(u32* dst, const u16* __restrict__ x, const int* s_cb, int sb0, int sb,
                                        int s_beg, int s_end, int n_sp, int M, int sx, int tid, int nthr) {
    // nthr % 32 == 0: a thread copies the same column pair e = 2 * lane of every token it stages, token
    // (tid >> 5) + k * (nthr >> 5); its word's place in a token's 16 x 16 fragment block, per kind of step
    const int e = 2 * (tid & 31);
    const int o_sp = ((e >> 3) & 1) * 128 + (2 * ((e >> 4) & 1) + ((e >> 1) & 1)) * 4 + (e >> 5) + 2 * ((e >> 2) & 1);
    const int o_dn = DENSE_ORDER == 0 ? (e >> 5) * 128 + ((e >> 3) & 3) * 4 + ((e >> 1) & 3)
                                      : ((e >> 3) & 1) * 128 + (e >> 4) * 4 + ((e >> 1) & 3);
    const int nbb = min(sb, s_end - sb0);
    for (int i = 0; i < nbb; ++i) {
        const int off = i * NOCT * 256 + (sb0 + i < n_sp ? o_sp : o_dn);
        const u16* xi = x + s_cb[sb0 - s_beg + i] + e;
        for (int n = tid >> 5; n < M; n += nthr >> 5) {
            const u32 da = (u32)__cvta_generic_to_shared(dst + off + (n >> 3) * 256 + (n & 7) * 16);
            const u16* src = xi + (long long)n * sx;
            asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" :: "r"(da), "l"(src), "r"(4));
        }
    }
    asm volatile("cp.async.commit_group;");
}

// zero the first `words` 32-bit words of the x buffers, once, before the block's first barrier: stage_x leaves
// the token columns past M untouched
__device__ __forceinline__ void zero_x(u32* xs, int words, int tid, int nthr) {
    for (int i = tid; i < words; i += nthr) xs[i] = 0u;
}

// lane t's start in row rg of a tile-row: its 16 bytes of the 2:4 and dense values, the row's metadata
struct RowPtrs {
    const u16* sp;
    const unsigned char* mt;
    const u16* dn;
};

__device__ __forceinline__ RowPtrs row_ptrs(const TileRow& L, const u16* spv, const unsigned char* spm,
                                            const u16* dnv, long long rg, int t) {
    return {spv + L.sp_off + rg * L.sp_stride + 8 * t, spm + L.mt_off + rg * L.mt_stride,
            dnv + L.dn_off + rg * L.dn_stride + 8 * t};
}

__device__ __forceinline__ void zero_acc(float (&acc)[NOCT][4]) {
#pragma unroll
    for (int o = 0; o < NOCT; ++o) acc[o][0] = acc[o][1] = acc[o][2] = acc[o][3] = 0.f;
}

// nibbles k, k+4, k+8, k+12 of a row's 16 groups (one 64-column step) packed into 16 bits
__device__ __forceinline__ u32 gather4(u64 m, int k) {
    u64 v = (m >> (4 * k)) & 0x000F000F000F000FULL;
    v |= v >> 12;
    return (u32)(v & 0xFFu) | ((u32)(v >> 24) & 0xFF00u);
}

// this thread's metadata register for a 2:4 step (used by MMA (t >> 1) of the step, selector t >> 1)
__device__ __forceinline__ u32 meta_reg(u64 mg, u64 mg8, int t) {
    return gather4(mg, t) | (gather4(mg8, t) << 16);
}

// one 64-column step of a warp: 2:4 (rows g, g+8 in w0, w1, their metadata in w2) by two mma.sp per token octet,
// or dense (the two 32-column halves of rows g, g+8 in w0..w3) by four mma; xb = this lane's x fragments of the
// step in shared memory ([octet][half][lane][4 words])
__device__ __forceinline__ void mma_step(float (&acc)[NOCT][4], const uint4 w0, const uint4 w1, const uint4 w2,
                                         const uint4 w3, const u32* xb, bool sparse, int t) {
    if (sparse) {
        const u32 e = meta_reg(((u64)w2.y << 32) | w2.x, ((u64)w2.w << 32) | w2.z, t);
#pragma unroll
        for (int o = 0; o < NOCT; ++o) {
            const uint4 x0 = *reinterpret_cast<const uint4*>(xb + o * 256);
            const uint4 x1 = *reinterpret_cast<const uint4*>(xb + o * 256 + 128);
            mma_sp<0>(acc[o], w0.x, w1.x, w0.y, w1.y, x0, e);
            mma_sp<1>(acc[o], w0.z, w1.z, w0.w, w1.w, x1, e);
        }
    } else {
#pragma unroll
        for (int o = 0; o < NOCT; ++o) {
            const uint4 x0 = *reinterpret_cast<const uint4*>(xb + o * 256);
            const uint4 x1 = *reinterpret_cast<const uint4*>(xb + o * 256 + 128);
            mma_dense(acc[o], w0.x, w1.x, w0.y, w1.y, x0.x, x0.y);
            mma_dense(acc[o], w0.z, w1.z, w0.w, w1.w, x0.z, x0.w);
            mma_dense(acc[o], w2.x, w3.x, w2.y, w3.y, x1.x, x1.y);
            mma_dense(acc[o], w2.z, w3.z, w2.w, w3.w, x1.z, x1.w);
        }
    }
}

__device__ __forceinline__ void store_out(u16* out, const u16* bias, int so, int tok, int row, float v) {
#if HAS_BIAS
    v += to_f32(bias[row]);
#endif
    out[(long long)tok * so + row] = from_f32(v);
}

// A warp's accumulators (k of octet o = row grow + 8 (k >> 1), token 8 o + 2 t + (k & 1)): straight to out (+ bias)
// when `direct`, else added into ws[M, N] by fp32 atomics
__device__ __forceinline__ void acc_out(const float (&acc)[NOCT][4], u16* out, const u16* bias, float* ws, int M,
                                        int N, int so, int grow, int t, bool direct) {
#pragma unroll
    for (int o = 0; o < NOCT; ++o)
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            const int tok = 8 * o + 2 * t + (k & 1), row = grow + 8 * (k >> 1);
            if (tok < M) {
                if (direct) store_out(out, bias, so, tok, row, acc[o][k]);
                else atomicAdd(ws + (long long)tok * N + row, acc[o][k]);
            }
        }
}

// a row chunk's summed rows [row0, row0 + rows_here) from ws to out (+ bias), clearing ws; by nthr threads
__device__ __forceinline__ void ws_out(u16* out, const u16* bias, float* ws, int M, int N, int so, int row0,
                                       int rows_here, int tid, int nthr) {
    __threadfence();
    for (int idx = tid; idx < M * rows_here; idx += nthr) {
        const int tok = idx / rows_here, row = row0 + (idx - tok * rows_here);
        float* w = ws + (long long)tok * N + row;
        const float v = ld_cg(w);
        *w = 0.f;
        store_out(out, bias, so, tok, row, v);
    }
}

// A block's results (its warps' accumulators, acc_out). split == 1: straight to out (+ bias). split > 1: fp32
// atomics into ws[M, N] (kept zero between calls); the last block of the row chunk to arrive writes out rows
// [row0, row0 + rows_here) and clears them in ws, and its counter.
__device__ __forceinline__ void write_out(float (&acc)[NOCT][4], u16* out, const u16* bias, float* ws, int* cnt,
                                          int* s_last, int M, int N, int so, int split, int chunk, int grow,
                                          bool wvalid, int row0, int rows_here, int tid, int tpb) {
    if (wvalid) acc_out(acc, out, bias, ws, M, N, so, grow, tid & 3, split == 1);
    if (split == 1) return;
    __threadfence();
    __syncthreads();
    if (tid == 0) *s_last = atomicAdd(cnt + chunk, 1) == split - 1;
    __syncthreads();
    if (!*s_last) return;
    ws_out(out, bias, ws, M, N, so, row0, rows_here, tid, tpb);
    if (tid == 0) cnt[chunk] = 0;
}
