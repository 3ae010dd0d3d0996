// Hybrid (dense / 2:4 tile) linear for 1-64 tokens on sparse tensor cores: v8 decode kernel.
//
// Same weight fragments and MMAs as v7 (hybrid_mma.cu), without v7's per-batch block barrier:
//   * block (chunk, j) covers steps [j SPB, (j + 1) SPB) of its tile-row (fewer at the row's end), and its x
//     for all of them is staged into shared memory once, at the start, by 16-byte loads (in the fragment
//     order v7 uses) -- one __syncthreads per block instead of one per batch of SB steps, and 8x fewer, simpler
//     copy instructions than v7's 4-byte cp.async;
//   * the first input column of every step comes from a per-layer step table (``steps[r * S + s]``, built
//     once per layer by cuda_mma.py) instead of the CSR column lists; as the block's step range does not
//     depend on the tile-row, the table and x loads go out first, before the weights (otherwise x queues
//     behind the weight loads: per-block timeline, benchmarks/mma_timeline.py).
// The warps then stream their weights with the next batch's loads in flight during this batch's MMAs and
// never wait for each other; the two register sets alternate by batch (the loop is unrolled: no copies) and
// the steps' offsets are compile-time constants folded into the loads. Macros: DT_BF16, NOCT, WARPS, SB as
// v7; SPB = steps per block (split is chosen on the host so that every block has at most SPB; shared memory
// SPB * NOCT KB); PF = 1 first sends all the block's weight bytes towards L2 (bulk prefetch, sm_90); PROBE = 1
// adds a per-block timeline output (benchmarks/mma_timeline.py).
// (helpers: mma_common.cuh, prepended by cuda_mma.py)

#define TPB (WARPS * 32)
#define MIN_BLOCKS (512 / TPB)  // at most 128 registers per thread: 16 warps per SM
#define BR (WARPS * 16)
#define XS_WORDS (SPB * NOCT * 256)
#define XPIECES (SPB * NOCT * 64)  // 16-byte pieces of x per block: 8 columns of one token of one step
#define XI ((XPIECES + TPB - 1) / TPB)  // pieces per thread (cuda_mma.py keeps this <= 8: registers)
#define NBATCH ((SPB + SB - 1) / SB)

extern "C" __global__ void __launch_bounds__(TPB, MIN_BLOCKS) KNAME(
    const u16* __restrict__ x, u16* __restrict__ out, const u16* __restrict__ bias,
    float* __restrict__ ws, int* __restrict__ cnt,
    const u16* __restrict__ spv, const unsigned char* __restrict__ spm, const u16* __restrict__ dnv,
    const int* __restrict__ steps, const long long* __restrict__ row_info,
    int M, int N, int sx, int so, int split, int chunks_per_tr, int TR, int S
#if PROBE
    , long long* __restrict__ probe
#endif
    ) {
#if PROBE  // per-block timeline (benchmarks/mma_timeline.py): global timer and SM clock at the phase boundaries
    long long g0, c0;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(g0)::"memory");
    asm volatile("mov.u64 %0, %%clock64;" : "=l"(c0)::"memory");
#endif
    __shared__ __align__(16) u32 xs[XS_WORDS];
    __shared__ int s_last;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int chunk = blockIdx.x, j = blockIdx.y;
    const int r = chunk / chunks_per_tr, b = chunk - r * chunks_per_tr;
    const int row0 = r * TR + b * BR;
    if (row0 >= N) return;
    grid_dep_wait();  // programmatic launch: x and the outputs only once the grid before has finished
    // x of all the block's steps -> shared memory in fragment order [step][octet][half][lane][4 words].
    // Piece p = (step i, token n, 8-column chunk ch) of the step's 64 columns; tokens >= M are zeros. The
    // step table row is padded (zeros) to a multiple of 32 steps, so all SPB entries exist; pieces of steps
    // beyond the tile-row's last are loaded (from column 0) but never read. Loaded first -- they need only
    // the step table -- so that they do not queue behind the weights; stored after the weights' loads are out.
    const int* srow = steps + (long long)r * S + j * SPB;
    uint4 xv[XI];
#pragma unroll
    for (int q = 0; q < XI; ++q) {
        const int p = tid + q * TPB;
        const int ch = p & 7, n = (p >> 3) & (NOCT * 8 - 1), i = p / (NOCT * 64);
        xv[q] = make_uint4(0, 0, 0, 0);
        if ((XPIECES % TPB == 0 || p < XPIECES) && n < M) xv[q] = ldg16(x + (long long)n * sx + srow[i] + 8 * ch);
    }

    const TileRow L = tile_row(row_info, r);
    const int n_sp = L.sp_len >> 6, n_all = n_sp + (L.dn_len >> 6);
    const int s_beg = j * SPB, s_end = min(s_beg + SPB, n_all);  // block j: steps [j SPB, (j + 1) SPB)
    const int rows_tr = min(TR, N - r * TR);
    const int wrow = b * BR + warp * 16;  // the warp's first row inside the tile-row
    const bool wvalid = wrow < rows_tr;   // N % 16 == 0: a slab is wholly inside or wholly beyond
    const RowPtrs A = row_ptrs(L, spv, spm, dnv, wvalid ? wrow + g : 0, t);

    float acc[NOCT][4];
    zero_acc(acc);

    // this warp's weights of steps k0 .. k0 + SB - 1 of the block (k0 is a compile-time constant after
    // unrolling, so the offsets fold into the loads) into register set `buf` (as v7): 2:4 step = rows g, g+8
    // in W0, W1, their metadata in W2; dense step = the two 32-column halves of rows g, g+8 in W0..W3
    const int nsteps = s_end - s_beg, nsp = n_sp - s_beg;  // the block's steps; the first nsp are 2:4
    const u16* spB = A.sp + 32 * s_beg;
    const u16* spB8 = spB + 8 * L.sp_stride;
    const unsigned char* mB = A.mt + 8 * s_beg;
    const unsigned char* mB8 = mB + 8 * L.mt_stride;
    const u16* dnB = A.dn + 64 * ((long long)s_beg - n_sp);
    const u16* dnB8 = dnB + 8 * L.dn_stride;
    uint4 W0[2][SB], W1[2][SB], W2[2][SB], W3[2][SB];
    auto load_w = [&](const int k0, const int buf) {
#pragma unroll
        for (int i = 0; i < SB; ++i) {
            const int k = k0 + i;
            if (k < nsteps && wvalid) {
                if (k < nsp) {
                    W0[buf][i] = ldg16(spB + 32 * k);
                    W1[buf][i] = ldg16(spB8 + 32 * k);
                    const uint2 mg = ldg8(mB + 8 * k), mg8 = ldg8(mB8 + 8 * k);
                    W2[buf][i] = make_uint4(mg.x, mg.y, mg8.x, mg8.y);
                } else {
                    W0[buf][i] = ldg16(dnB + 64 * k);
                    W1[buf][i] = ldg16(dnB8 + 64 * k);
                    W2[buf][i] = ldg16(dnB + 64 * k + 32);
                    W3[buf][i] = ldg16(dnB8 + 64 * k + 32);
                }
            }
        }
    };
#if PF
    // all the weight bytes of the block's steps set moving into L2 at once (one bulk prefetch per row and kind:
    // lanes 0-15 take the warp's 16 rows), so that the register loads of the later batches hit L2
    if (wvalid && lane < 16 && nsteps > 0) {
        const RowPtrs P = row_ptrs(L, spv, spm, dnv, wrow + lane, 0);
        const int nsp_b = max(0, min(nsp, nsteps)), ndn_b = nsteps - nsp_b;
        if (nsp_b > 0) {
            prefetch_l2(P.sp + 32 * s_beg, 64 * nsp_b);
            const unsigned char* m = P.mt + 8 * s_beg;
            for (int o = 0; o < 8 * nsp_b; o += 128) asm volatile("prefetch.global.L2 [%0];" ::"l"(m + o));
            asm volatile("prefetch.global.L2 [%0];" ::"l"(m + 8 * nsp_b - 1));
        }
        if (ndn_b > 0) prefetch_l2(P.dn + 64 * max(0, s_beg - n_sp), 128 * ndn_b);
    }
#endif
    load_w(0, 0);
#pragma unroll
    for (int q = 0; q < XI; ++q) {
        const int p = tid + q * TPB;
        const int ch = p & 7, n = (p >> 3) & (NOCT * 8 - 1), i = p / (NOCT * 64);
        if (XPIECES % TPB == 0 || p < XPIECES) {
            u32* base = xs + (i * NOCT + (n >> 3)) * 256 + (n & 7) * 16;
            if (s_beg + i < n_sp) {
                // column 8 ch + 2 w = 32 a + 16 h + 8 s + 4 bb + 2 c: MMA s, quad position 2 h + c,
                // register a + 2 bb (v7's stage map)
                u32* d = base + (ch & 1) * 128 + 8 * ((ch >> 1) & 1) + (ch >> 2);
                d[0] = xv[q].x;
                d[4] = xv[q].y;
                d[2] = xv[q].z;
                d[6] = xv[q].w;
            } else {
                // column 8 ch + 2 w = 32 u + 8 t + 2 w: sub-step u, quad position t, word w
                *reinterpret_cast<uint4*>(base + (ch >> 2) * 128 + (ch & 3) * 4) = xv[q];
            }
        }
    }
    __syncthreads();

#if PROBE
    long long c1;
    asm volatile("mov.u64 %0, %%clock64;" : "=l"(c1)::"memory");
#endif
    // two register sets, alternating by batch (compile-time indices: no copies)
#pragma unroll
    for (int bt = 0; bt < NBATCH; ++bt) {
        if (bt * SB < nsteps) {
            if (bt + 1 < NBATCH) load_w((bt + 1) * SB, (bt + 1) & 1);
            if (wvalid) {
                const int cur = bt & 1;
#pragma unroll
                for (int i = 0; i < SB; ++i) {
                    const int k = bt * SB + i;
                    if (k < nsteps) {
                        const u32* xb = xs + (k * NOCT) * 256 + lane * 4;
                        mma_step(acc, W0[cur][i], W1[cur][i], W2[cur][i], W3[cur][i], xb, k < nsp, t);
                    }
                }
            }
        }
    }
#if PROBE
    long long c2;
    asm volatile("mov.u64 %0, %%clock64;" : "=l"(c2) : "f"(acc[0][0]) : "memory");
#endif
    // (a block past its tile-row's last step adds nothing: it only counts itself in)
    write_out(acc, out, bias, ws, cnt, &s_last, M, N, so, split, chunk, r * TR + wrow + g,
              wvalid && (split == 1 || nsteps > 0),
              row0, min(BR, rows_tr - b * BR), tid, TPB);
#if PROBE
    if (tid == 0) {
        long long c3, g1;
        asm volatile("mov.u64 %0, %%clock64;" : "=l"(c3)::"memory");
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(g1)::"memory");
        u32 smid;
        asm("mov.u32 %0, %%smid;" : "=r"(smid));
        long long* pr = probe + 8 * ((long long)blockIdx.y * gridDim.x + blockIdx.x);
        pr[0] = g0; pr[1] = c0; pr[2] = c1; pr[3] = c2; pr[4] = c3; pr[5] = g1; pr[6] = smid;
    }
#endif
}
