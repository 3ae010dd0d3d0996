// Hybrid (dense / 2:4 tile) linear on 4-bit codes for 1-64 tokens on sparse tensor cores: the v7 kernel
// (hybrid_mma.cu) reading the 4-bit packed format (tilesparse.kernels.format_q4).
//
// Y[M, N] = X[M, K] @ W^T, W = scale * (code - zero), compiled at run time by NVRTC
// (tilesparse/kernels/cuda_mma_q4.py) with v7's macros: DT_BF16, NOCT, WARPS, SB, HAS_BIAS, KNAME, and QST.
//
// QST = 0: a warp holds the next batch's codes in registers while this batch's MMAs run (one batch in flight; the
// registers allow SB <= 4), so a batch's loads have one batch's MMAs to land. QST >= 2: the codes, metadata and
// parameters of QST - 1 batches ahead are in flight through shared memory (cp.async into per-lane slots, QST
// stages), x in the same commit groups (QST x buffers).
//
// Structure: v7's. Block (chunk, j) = 16*WARPS rows of one tile-row and the j-th of `split` parts of its
// 64-column steps (2:4 steps first, then dense); a warp owns 16 rows (its "slab"); x is staged per batch of SB
// steps into shared memory in fragment order by cp.async (double-buffered); the next batch's codes are loaded
// while this batch's MMAs run; split > 1 sums through ws / cnt exactly as v7 (write_out). The weights of a step
// are dequantized in registers to the MMA's 16-bit type and handed to v7's mma_step (mma_common.cuh), so the
// A-fragment registers, the metadata register and the x fragments are the ones v7 uses (checked on a GPU by
// benchmarks/mma_probe.py for the 2:4 MMA).
//
// Notation: lane = 4g + t (g = lane >> 2: fragment row group, t = lane & 3: quad position); a warp's 16 rows
// are g and g + 8. A 16-bit pair register holds element "lo" in bits 0-15 and "hi" in bits 16-31. Code bytes
// hold two codes, the lower-indexed one in the low nibble (format_q4). MMA fragments (PTX ISA):
//   m16n8k16 A: reg0 = row g, k 2t..2t+1; reg1 = row g+8, k 2t..2t+1; reg2 = row g, k 2t+8..2t+9;
//               reg3 = row g+8, k 2t+8..2t+9.      B: reg j = k 2t+8j..2t+8j+1 of token column g.
//   m16n8k32 sparse A (the 16 kept of 32): as m16n8k16 A over compressed columns, compressed column c = kept
//               value c & 1 of logical group c >> 1 (groups of 4 K-columns).  B: reg j = k 2t+8j..2t+8j+1.
//   C/D: d0, d1 = row g, token 2t, 2t+1; d2, d3 = row g+8 (write_out).
//
// 2:4 step (64 K-space columns, 32 kept codes = 16 bytes per row): thread t loads the u32 at byte 4t of the
// step's codes of row g and of row g+8 (kept values 8t..8t+7 = K-space groups 4t..4t+3), and the row's 8
// metadata bytes. Byte i of the word = the two kept codes of group 4t+i (p0's low, p1's high) and dequantizes
// to the pair register v7 loads as 16-bit values 8t+2i, 8t+2i+1:
//   byte 0 -> MMA 0 reg0 (row g) / reg1 (row g+8): logical group t       <- K-space group 4t
//   byte 1 -> MMA 0 reg2 / reg3:                    logical group t + 4   <- K-space group 4t + 1
//   byte 2 -> MMA 1 reg0 / reg1, byte 3 -> MMA 1 reg2 / reg3 (K-space groups 4t + 2, 4t + 3).
// The metadata register (meta_reg) and the x order are v7's unchanged: x column e = 32a + 16h + 8s + 4bb + 2c
// of the step goes to MMA s, quad position 2h + c, B register a + 2bb.
//
// Dense step (64 columns, 32 bytes per row): thread t loads the 8 bytes at byte 8t of rows g and g + 8
// (columns 16t..16t+15). Byte b (0..7) = columns 16t+2b (lo), 16t+2b+1 (hi) and goes to sub-step u = b >> 1
// (the step's four m16n8k16), register 0 / 1 (rows g / g+8) for even b, 2 / 3 for odd b. So sub-step u's
// logical k = 2t + c is column 16t + 4u + c and k = 2t + 8 + c is column 16t + 4u + 2 + c (c = 0, 1): the K
// permutation of a step is  column e = 16t + 4u + 2r + c  <->  sub-step u, k = 2t + 8r + c. x is staged in the
// same order: x column e (even) = 16t + 8h + 2j goes to half h, quad position t, word j, and mma_step uses
// word j of half h as B register (j & 1) of sub-step 2h + (j >> 1) -- i.e. columns 16t + 4u + 2r, +1 for
// sub-step u, register r, as the weights. (The 16-bit kernel's dense order, 8-column runs per thread, does not
// apply: here each thread's 16 columns are one contiguous run of 8 code bytes.)
//
// Dequantization of a byte (dequant_byte): a prmt puts the low code in bits 0-3 and the high code in bits
// 16-19, OR-ed with the exponent of MAGIC (128 for bf16, 1024 for fp16: MAGIC + code is exact), then two fma:
// (MAGIC + code) * 1 - (MAGIC + zero) = code - zero (exact, |.| <= 15), then * scale (one rounding to the MMA
// type). A thread's 16 columns of a step (16t..16t+15, either kind) lie in one quantization group: the step's
// (group_size % 64 == 0), or group (col + 16t) / GS = col / GS + 16t / GS of groups of 16 or 32. So a thread needs
// one (scale, zero) per row and step: qp[slab][group][g] = (word of row 16 slab + g, word of row 16 slab + g + 8),
// each word = scale (lo) and -(MAGIC + zero) (hi) in the MMA's type (cuda_mma_q4.param_table), one 8-byte load
// per step.

// (helpers: mma_common.cuh, prepended by cuda_mma_q4.py)

#ifndef QST
#define QST 0
#endif
#define TPB (WARPS * 32)
#define MIN_BLOCKS (512 / TPB)  // at most 128 registers per thread: 16 warps per SM
#define BR (WARPS * 16)
#define XS_WORDS (SB * NOCT * 256)
#define MAX_STEPS 512  // 64-column steps per block (cuda_mma_q4.py checks split against it)

#if DT_BF16
#define Q4_MAGIC 0x43004300u  // 128.0 in both halves (bf16: 128 + c exact for c < 128)
#define Q4_ONE 0x3F803F80u    // 1.0
#else
#define Q4_MAGIC 0x64006400u  // 1024.0 in both halves (fp16: 1024 + c exact for c < 1024)
#define Q4_ONE 0x3C003C00u
#endif
#define Q4_NEG_ZERO 0x80008000u  // -0.0 in both halves: fma(a, b, -0) = a * b

__device__ __forceinline__ u32 ldg4(const void* p) {
    u32 v;
    asm("ld.global.nc.u32 %0, [%1];" : "=r"(v) : "l"(p));
    return v;
}

// cp.async of N = 4 or 8 bytes (zero-filled when !ok; src is then not read)
template <int N>
__device__ __forceinline__ void cp_async(void* dst, const void* src, bool ok) {
    const u32 da = (u32)__cvta_generic_to_shared(dst);
    if (N == 4) {
        asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" :: "r"(da), "l"(src), "r"(ok ? 4 : 0));
    } else {
        asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;" :: "r"(da), "l"(src), "r"(ok ? 8 : 0));
    }
}

// a * b + c on 16-bit pairs in the MMA's type, one rounding
__device__ __forceinline__ u32 hfma2(u32 a, u32 b, u32 c) {
    u32 d;
    asm("fma.rn." MMA_T "x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}

// byte i of q as a pair register: (scale * (low code - zero), scale * (high code - zero)); q4 = q >> 4,
// s2 = (scale, scale), nz2 = (-(MAGIC + zero), -(MAGIC + zero))
__device__ __forceinline__ u32 dequant_byte(u32 q, u32 q4, int i, u32 s2, u32 nz2) {
    // result bytes: 0 = q.byte i (low code in bits 0-3), 2 = q4.byte i (high code in bits 16-19)
    const u32 v = (__byte_perm(q, q4, i | ((i + 4) << 8)) & 0x000F000Fu) | Q4_MAGIC;
    return hfma2(hfma2(v, Q4_ONE, nz2), s2, Q4_NEG_ZERO);
}

// the four bytes of a code word as four pair registers (byte i -> component i: x, y, z, w)
__device__ __forceinline__ uint4 dequant_word(u32 q, u32 s2, u32 nz2) {
    const u32 q4 = q >> 4;
    return make_uint4(dequant_byte(q, q4, 0, s2, nz2), dequant_byte(q, q4, 1, s2, nz2),
                      dequant_byte(q, q4, 2, s2, nz2), dequant_byte(q, q4, 3, s2, nz2));
}

// one 64-column step of a warp on 4-bit codes (layout: file header): dequantize, then v7's mma_step.
// 2:4 step: c.x, c.y = code words of rows g, g+8; (c.z, c.w), m8 = the 8 metadata bytes of rows g, g+8.
// Dense step: (c.x, c.y) = row g's 8 code bytes, (c.z, c.w) = row g+8's. pz = parameter words of rows g, g+8.
__device__ __forceinline__ void mma_step_q4(float (&acc)[NOCT][4], const uint4 c, const uint2 m8, const uint2 pz,
                                            const u32* xb, bool sparse, int t) {
    const u32 sg = __byte_perm(pz.x, 0, 0x1010), zg = __byte_perm(pz.x, 0, 0x3232);
    const u32 sg8 = __byte_perm(pz.y, 0, 0x1010), zg8 = __byte_perm(pz.y, 0, 0x3232);
    if (sparse) {
        mma_step(acc, dequant_word(c.x, sg, zg), dequant_word(c.y, sg8, zg8), make_uint4(c.z, c.w, m8.x, m8.y),
                 make_uint4(0, 0, 0, 0), xb, true, t);
    } else {
        // mma_step's dense operands: w0 / w1 = sub-steps 0, 1 of rows g / g+8, w2 / w3 = sub-steps 2, 3
        mma_step(acc, dequant_word(c.x, sg, zg), dequant_word(c.z, sg8, zg8), dequant_word(c.y, sg, zg),
                 dequant_word(c.w, sg8, zg8), xb, false, t);
    }
}

// lane t's start in row rg of a tile-row: its code bytes of the 2:4 and dense steps, the row's metadata
struct CodePtrs {
    const unsigned char* sp;
    const unsigned char* mt;
    const unsigned char* dn;
};

__device__ __forceinline__ CodePtrs code_ptrs(const TileRow& L, const long long* __restrict__ q4_info, int r,
                                              const unsigned char* spc, const unsigned char* spm,
                                              const unsigned char* dnc, long long rg, int t) {
    const long long* qi = q4_info + 4 * r;  // sp_off, sp_stride, dn_off, dn_stride (bytes)
    return {spc + qi[0] + rg * qi[1] + 4 * t, spm + L.mt_off + rg * L.mt_stride, dnc + qi[2] + rg * qi[3] + 8 * t};
}

extern "C" __global__ void __launch_bounds__(TPB, MIN_BLOCKS) KNAME(
    const u16* __restrict__ x, u16* __restrict__ out, const u16* __restrict__ bias,
    float* __restrict__ ws, int* __restrict__ cnt,
    const unsigned char* __restrict__ spc, const unsigned char* __restrict__ spm,
    const unsigned char* __restrict__ dnc, const u32* __restrict__ qp,
    const int* __restrict__ sp_cols, const int* __restrict__ sp_ptr,
    const int* __restrict__ dn_cols, const int* __restrict__ dn_ptr,
    const long long* __restrict__ row_info, const long long* __restrict__ q4_info,
    int M, int N, int sx, int so, int split, int chunks_per_tr, int TR, int log2_tc, int NG, int GS) {
#if QST
    __shared__ __align__(16) u32 xs[QST * XS_WORDS];
    __shared__ __align__(16) uint4 cs_c[QST][WARPS][SB][32];  // per lane and step: codes (and row g's metadata)
    __shared__ __align__(16) uint2 cs_m[QST][WARPS][SB][32];  // row g+8's metadata (2:4 steps)
    __shared__ __align__(16) uint2 cs_p[QST][WARPS][SB][32];  // the parameter words of rows g, g+8
#else
    __shared__ __align__(16) u32 xs[2 * XS_WORDS];
#endif
    __shared__ int s_cb[MAX_STEPS];
    __shared__ int s_gr[MAX_STEPS];
    __shared__ int s_last;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int chunk = blockIdx.x, j = blockIdx.y;
    const int r = chunk / chunks_per_tr, b = chunk - r * chunks_per_tr;
    const int row0 = r * TR + b * BR;
    if (row0 >= N) return;
    grid_dep_wait();  // programmatic launch: x and the outputs only once the grid before has finished
    const TileRow L = tile_row(row_info, r);
    const long long sp_stride = q4_info[4 * r + 1], mt_stride = L.mt_stride, dn_stride = q4_info[4 * r + 3];
    const int n_sp = L.sp_len >> 6, n_all = n_sp + (L.dn_len >> 6);
    const int s_beg = (int)((long long)n_all * j / split), s_end = (int)((long long)n_all * (j + 1) / split);
    const int rows_tr = min(TR, N - r * TR);
    const int wrow = b * BR + warp * 16;  // the warp's first row inside the tile-row
    const bool wvalid = wrow < rows_tr;   // N % 16 == 0: a slab is wholly inside or wholly beyond
    const int sp_p0 = sp_ptr[r], dn_p0 = dn_ptr[r];
    const CodePtrs A = code_ptrs(L, q4_info, r, spc, spm, dnc, wvalid ? wrow + g : 0, t);
    // + 16 * group: this lane's words (groups of 16 / 32: the lane's columns start 16t / GS groups into the step's)
    const u32* qpw = qp + ((long long)((r * TR + wrow) >> 4) * NG * 8 + g) * 2 + (GS < 64 ? 16 * (16 * t / GS) : 0);

    float acc[NOCT][4];
    zero_acc(acc);
#if QST == 0
    // this warp's codes (and 2:4 metadata) of the SB steps from s0 (layout: mma_step_q4)
    auto load_codes = [&](int s0, uint4 (&c)[SB], uint2 (&m8)[SB]) {
        const int nb = min(SB, s_end - s0);
#pragma unroll
        for (int i = 0; i < SB; ++i) {
            const int st = s0 + i;
            c[i] = make_uint4(0, 0, 0, 0);
            m8[i] = make_uint2(0, 0);
            if (i < nb && wvalid) {
                if (st < n_sp) {
                    const unsigned char* p = A.sp + 16 * st;
                    const uint2 mg = ldg8(A.mt + 8 * st);
                    m8[i] = ldg8(A.mt + 8 * mt_stride + 8 * st);
                    c[i] = make_uint4(ldg4(p), ldg4(p + 8 * sp_stride), mg.x, mg.y);
                } else {
                    const unsigned char* p = A.dn + 32 * (st - n_sp);
                    const uint2 lo = ldg8(p), hi = ldg8(p + 8 * dn_stride);
                    c[i] = make_uint4(lo.x, lo.y, hi.x, hi.y);
                }
            }
        }
    };
    // the (scale, zero) words of rows g, g+8 for the SB steps from s0 (needs s_gr)
    auto load_params = [&](int s0, uint2 (&pz)[SB]) {
        const int nb = min(SB, s_end - s0);
#pragma unroll
        for (int i = 0; i < SB; ++i) {
            pz[i] = make_uint2(0, 0);
            if (i < nb && wvalid) pz[i] = ldg8(qpw + 16 * (long long)s_gr[s0 - s_beg + i]);
        }
    };
    // two batches in registers: the next one's loads are in flight during this one's MMAs
    uint4 c[SB], c_n[SB];
    uint2 m8[SB], m8_n[SB], pz[SB], pz_n[SB];
    if (s_beg < s_end) load_codes(s_beg, c, m8);
#endif

    // first input column and quantization group of every step of this block (2:4 steps first, then dense)
    const int nsteps = s_end - s_beg;
    for (int i = tid; i < nsteps; i += TPB) {
        const int col = step_column(s_beg + i, n_sp, sp_cols, dn_cols, sp_p0, dn_p0, log2_tc);
        s_cb[i] = col;
        s_gr[i] = col / GS;
    }
    zero_x(xs, (QST ? QST : 2) * XS_WORDS, tid, TPB);
    __syncthreads();
#if QST
    // the batch of SB steps from s0 into stage stg: this lane's codes, metadata and parameter words (the layout of
    // mma_step_q4's operands; steps past the block's end or of an idle warp zero-filled), then x by the whole block
    // (stage_x commits the group). Each lane reads back only its own slots.
    auto issue = [&](int s0, int stg) {
        const int nb = min(SB, s_end - s0);
#pragma unroll
        for (int i = 0; i < SB; ++i) {
            const int st = s0 + i;
            const bool ok = i < nb && wvalid;
            uint4* dc = &cs_c[stg][warp][i][lane];
            if (ok && st < n_sp) {
                const unsigned char* p = A.sp + 16 * st;
                cp_async<4>(&dc->x, p, true);
                cp_async<4>(&dc->y, p + 8 * sp_stride, true);
                cp_async<8>(&dc->z, A.mt + 8 * st, true);
                cp_async<8>(&cs_m[stg][warp][i][lane], A.mt + 8 * mt_stride + 8 * st, true);
            } else {
                const unsigned char* p = A.dn + (ok ? 32 * (st - n_sp) : 0);
                cp_async<8>(&dc->x, p, ok);
                cp_async<8>(&dc->z, p + (ok ? 8 * dn_stride : 0), ok);
            }
            cp_async<8>(&cs_p[stg][warp][i][lane], qpw + (ok ? 16 * (long long)s_gr[st - s_beg] : 0), ok);
        }
        stage_x<1>(xs + stg * XS_WORDS, x, s_cb, s0, SB, s_beg, s_end, n_sp, M, sx, tid, TPB);
    };
#pragma unroll
    for (int k = 0; k < QST - 1; ++k) issue(s_beg + k * SB, k);  // (empty groups past the end keep the count)

    for (int s0 = s_beg, batch = 0; s0 < s_end; s0 += SB, ++batch) {
        const int nb = min(SB, s_end - s0), stg = batch % QST;
        // this batch's group has landed (at most the QST - 2 newer ones pending); every warp is past the batch
        // before, whose stage now receives the batch QST - 1 ahead
        asm volatile("cp.async.wait_group %0;" :: "n"(QST - 2) : "memory");
        __syncthreads();
        issue(s0 + (QST - 1) * SB, (batch + QST - 1) % QST);
        if (wvalid) {
            const u32* xcur = xs + stg * XS_WORDS;
#pragma unroll
            for (int i = 0; i < SB; ++i) {
                if (i < nb) {
                    const bool sparse = s0 + i < n_sp;
                    mma_step_q4(acc, cs_c[stg][warp][i][lane], sparse ? cs_m[stg][warp][i][lane] : make_uint2(0, 0),
                                cs_p[stg][warp][i][lane], xcur + (i * NOCT) * 256 + lane * 4, sparse, t);
                }
            }
        }
    }
    asm volatile("cp.async.wait_group %0;" :: "n"(0) : "memory");  // (no copy may target shared memory at exit)
#else
    // x of a batch (its tokens < M) -> shared memory in fragment order (stage_x, mma_common.cuh), by 4-byte
    // cp.async; the column order of each kind: file header
    auto stage = [&](int sb0, u32* dst) {
        stage_x<1>(dst, x, s_cb, sb0, SB, s_beg, s_end, n_sp, M, sx, tid, TPB);
    };
    if (s_beg < s_end) {
        load_params(s_beg, pz);
        stage(s_beg, xs);
    }

    for (int s0 = s_beg, batch = 0; s0 < s_end; s0 += SB, ++batch) {
        const int nb = min(SB, s_end - s0);
        // 1. the next batch's codes and parameters
        if (s0 + SB < s_end) {
            load_codes(s0 + SB, c_n, m8_n);
            load_params(s0 + SB, pz_n);
        }
        // 2. x of this batch has landed (everyone's copies); all warps are done with the other buffer,
        //    which now receives the next batch
        asm volatile("cp.async.wait_group 0;" ::: "memory");
        __syncthreads();
        const u32* xcur = xs + (batch & 1) * XS_WORDS;
        if (s0 + SB < s_end) stage(s0 + SB, xs + ((batch + 1) & 1) * XS_WORDS);
        // 3. dequantize and run the tensor cores
        if (wvalid) {
#pragma unroll
            for (int i = 0; i < SB; ++i) {
                if (i < nb) {
                    const u32* xb = xcur + (i * NOCT) * 256 + lane * 4;
                    mma_step_q4(acc, c[i], m8[i], pz[i], xb, s0 + i < n_sp, t);
                }
            }
        }
        // 4. the next batch becomes this one. These copies are where a warp waits for its loads: they all share
        //    one scoreboard, so a first use of the codes after the next batch's loads were issued (a loop
        //    unrolled by two, without the copies) would wait for those too and lose the overlap.
#pragma unroll
        for (int i = 0; i < SB; ++i) {
            c[i] = c_n[i];
            m8[i] = m8_n[i];
            pz[i] = pz_n[i];
        }
    }
#endif
    write_out(acc, out, bias, ws, cnt, &s_last, M, N, so, split, chunk, r * TR + wrow + g, wvalid,
              row0, min(BR, rows_tr - b * BR), tid, TPB);
}
