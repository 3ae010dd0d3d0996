// Hybrid (dense / 2:4 tile) linear for 1-64 tokens on sparse tensor cores: v9 decode kernel (sm_90).
//
// A block that streams its weights through registers (v7) pays three costs once per wave: dependent loads
// before the first MMA, a weight stream limited by the bytes a warp can hold in registers, and the split-K
// tail. v9 moves the weights with the copy engine and keeps the blocks alive:
//   * work items: a row chunk of BR rows x up to SPB 64-column steps of ONE kind (a tile-row's 2:4 steps and its
//     dense steps are cut into items of SPB separately, the two lists interleaved), described by a per-layer
//     item table (cuda_mma.item_table: kind, steps, first step, and the steps' input columns); numbered
//     chunk-major, `split` items per chunk;
//   * a persistent grid (as many blocks per SM as shared memory holds); every block takes one contiguous range
//     of items (stream-K; cuda_mma.block_ranges cuts the item list into ranges of about equal cost, in
//     practice equal item counts): consecutive items of one chunk add into the same registers, and only a
//     chunk split between blocks goes through the fp32 workspace and the arrival counter;
//   * one producer warp fills NST shared-memory stages ahead of the consumers: the item's weights by 2-D tensor
//     copies (cp.async.bulk.tensor; one tensor map per tile-row and kind, cuda_mma.tensor_maps; rows beyond the
//     layer and steps beyond the kind's last are zero-filled, not read), its x by 16-byte cp.async; both complete
//     on the stage's mbarrier (byte count + the lanes' cp.async arrivals);
//   * WARPS consumer warps (16 rows each) wait on the stage's barrier, run v7's MMAs on it and release it;
//   * when launched as a programmatic dependent (opt-in, cuda_mma.pdl_enabled): the first NST items' weight
//     copies go out before griddepcontrol.wait, so they overlap the end of the kernel before; x and the outputs
//     wait for it (without the launch attribute the wait returns at once).
// So the next items' weights and x are in flight while the current one computes and while a tail reduces, and
// the bytes in flight are bounded by shared memory, not registers. (Weights go as 2-D boxes, not one 1-D bulk
// copy per row: on the H200 a copy request costs ~40 ns per SM whatever its size, so per-row copies are bound by
// their count.)
// Fragments: a 2:4 step of row g is 16 bytes at 16 t of its 64 stored bytes (groups 4t..4t+3), a dense step
// the 16 bytes at 16 t of each 64-byte half (v7). x stays in its plain layout [token][step][64 columns]: a
// dense MMA reads 16 contiguous bytes per lane; a sparse MMA s reads 4 words at columns
// 16 h + 8 s + 2 c + {0, 32, 4, 36} (t = 2 h + c), the K order v7 stores x in.
// Macros: DT_BF16, NOCT, WARPS (consumer warps), SPB (steps per item, even), NST (stages), HAS_BIAS, KNAME;
// PROBE = 1 adds a per-block, per-item timeline output (benchmarks/mma_timeline.py).
// (helpers: mma_common.cuh, prepended by cuda_mma.py)

#define TPB ((WARPS + 1) * 32)
#define BR (WARPS * 16)
#define NT (NOCT * 8)
#define DBOX (SPB < 4 ? SPB : 4)        // dense steps per tensor copy (a box row is at most 256 elements)
#define V_BYTES (BR * SPB * 128)          // weight values of one item (dense; 2:4 items use half)
#define M_BYTES (BR * SPB * 8)            // 2:4 metadata of one item
#define XT (SPB * 128 + 16)               // bytes per token of x in a stage
#define STAGE_BYTES (V_BYTES + M_BYTES + NT * XT)
#define IT_W (4 + SPB)                    // ints per item in the item table
#define MAX_ITEMS 64                      // items per block (cuda_mma.block_ranges keeps to it)

__device__ __forceinline__ u32 smem_addr(const void* p) { return (u32)__cvta_generic_to_shared(p); }

__device__ __forceinline__ void mbar_init(u32 bar, u32 count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count) : "memory");
}

__device__ __forceinline__ void mbar_arrive_tx(u32 bar, u32 bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
}

__device__ __forceinline__ void mbar_arrive(u32 bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(bar) : "memory");
}

__device__ __forceinline__ void mbar_wait(u32 bar, u32 parity) {
    u32 done = 0;
    while (!done) {
        asm volatile(
            "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}"
            : "=r"(done) : "r"(bar), "r"(parity) : "memory");
    }
}

// box of a 2-D tensor map (global, 64-byte aligned) at element coordinates (c0 inner, c1 rows) -> shared memory
__device__ __forceinline__ void tensor_copy(u32 dst, const void* tmap, int c0, int c1, u32 bar) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];"
        ::"r"(dst), "l"(tmap), "r"(c0), "r"(c1), "r"(bar) : "memory");
}

__device__ __forceinline__ void cp_async16(u32 dst, const void* src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(src) : "memory");
}

// this lane's arrival on `bar` once all its earlier cp.async have landed (counted in the barrier's init count)
__device__ __forceinline__ void cp_async_arrive(u32 bar) {
    asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];" ::"r"(bar) : "memory");
}

__device__ __forceinline__ u32 lds32(u32 a) {
    u32 v;
    asm volatile("ld.shared.u32 %0, [%1];" : "=r"(v) : "r"(a));
    return v;
}

__device__ __forceinline__ uint2 lds64(u32 a) {
    uint2 v;
    asm volatile("ld.shared.v2.u32 {%0,%1}, [%2];" : "=r"(v.x), "=r"(v.y) : "r"(a));
    return v;
}

__device__ __forceinline__ uint4 lds128(u32 a) {
    uint4 v;
    asm volatile("ld.shared.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(a));
    return v;
}

__device__ __forceinline__ void consumer_sync() { asm volatile("bar.sync 1, %0;" ::"n"(WARPS * 32) : "memory"); }

// a chunk's sums: straight to out when this block covered all of its items, else fp32 atomics into ws and
// the block that brings the chunk's counter to `split` writes the rows out and clears ws and the counter
__device__ __forceinline__ void chunk_out(float (&acc)[NOCT][4], u16* out, const u16* bias, float* ws, int* cnt,
                                          int* s_last, int M, int N, int so, int split, int ncov, int chunk,
                                          int row0, int rows_here, int warp, int lane) {
    const int tid = warp * 32 + lane;
    if (warp * 16 < rows_here) acc_out(acc, out, bias, ws, M, N, so, row0 + warp * 16 + (lane >> 2), lane & 3,
                                       ncov == split);
    if (ncov == split) return;
    __threadfence();
    consumer_sync();
    if (tid == 0) *s_last = atomicAdd(cnt + chunk, ncov) + ncov == split;
    consumer_sync();
    if (!*s_last) return;
    ws_out(out, bias, ws, M, N, so, row0, rows_here, tid, WARPS * 32);
    if (tid == 0) cnt[chunk] = 0;
}

// items: [chunk][split] -> item table row (tile-row r, item j): {kind (1 = 2:4), steps, first step of the kind, 0,
// input column of each step}
extern "C" __global__ void __launch_bounds__(TPB, 1) KNAME(
    const u16* __restrict__ x, u16* __restrict__ out, const u16* __restrict__ bias,
    float* __restrict__ ws, int* __restrict__ cnt, const unsigned char* __restrict__ tmaps,
    const int* __restrict__ items, const int* __restrict__ ranges, int M, int N, int sx, int so, int split,
    int chunks_per_tr, int TR
#if PROBE
    , long long* __restrict__ probe
#endif
    ) {
#if PROBE  // per-block timeline (benchmarks/mma_timeline.py): [entry timer, entry clock, end clock, end
    // timer, then per item: x copies issued (producer), stage full and stage released (consumer warp 0)]
    long long* pr = probe + (long long)blockIdx.x * (4 + 3 * MAX_ITEMS);
    if (threadIdx.x == 0) {
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(pr[0])::"memory");
        pr[1] = clock64();
    }
#define PROBE_AT(slot) pr[slot] = clock64()
#else
#define PROBE_AT(slot)
#endif
    extern __shared__ __align__(128) unsigned char smem[];
    __shared__ __align__(8) u64 bars[2 * NST];  // full[NST], then empty[NST]
    __shared__ int s_items[MAX_ITEMS * IT_W];   // this block's rows of the item table
    __shared__ int s_last;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int i_beg = ranges[blockIdx.x], i_end = ranges[blockIdx.x + 1];  // this block's items (by bytes)
    const u32 sbase = smem_addr(smem), full0 = smem_addr(bars), empty0 = full0 + 8 * NST;

    // x slots of tokens >= M are never copied: zero them once (their MMA columns are not stored either)
    for (int s = 0; s < NST; ++s)
        for (int o = M * XT + 16 * tid; o < NT * XT; o += 16 * TPB)
            *reinterpret_cast<uint4*>(smem + s * STAGE_BYTES + V_BYTES + M_BYTES + o) = make_uint4(0, 0, 0, 0);
    for (int i = tid; i < (i_end - i_beg) * IT_W; i += TPB) {
        const int it = i_beg + i / IT_W, chunk = it / split, r = chunk / chunks_per_tr;
        s_items[i] = items[((long long)r * split + (it - chunk * split)) * IT_W + i % IT_W];
    }
    if (tid == 0) {
        for (int s = 0; s < NST; ++s) {
            mbar_init(full0 + 8 * s, 33);  // the producer's expect_tx arrival + its 32 lanes' cp.async arrivals
            mbar_init(empty0 + 8 * s, WARPS);
        }
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
    __syncthreads();

    if (warp == WARPS) {
        // ---- producer: the stage of item it (k-th of this block) once the consumers have released it. The
        // weights are constant: the first NST items' weights are copied before waiting for the grid this one
        // depends on (programmatic launch, cuda_mma._launch); x only after it.
        const int n = i_end - i_beg, pre = n < NST ? n : NST;
        auto weights = [&](int k) {  // lane 0: the stage's byte count and the item's tensor copies
            const int* cur = s_items + k * IT_W;
            const int chunk = (i_beg + k) / split, r = chunk / chunks_per_tr, b = chunk - r * chunks_per_tr;
            const int kind = cur[0], nst = cur[1], k0 = cur[2];
            const u32 full = full0 + 8 * (k % NST), st = sbase + (k % NST) * STAGE_BYTES;
            const unsigned char* tm = tmaps + (long long)r * 384;
            if (nst == 0) {
                mbar_arrive_tx(full, 0);
            } else if (kind) {
                mbar_arrive_tx(full, BR * SPB * 72);
                tensor_copy(st, tm, 32 * k0, b * BR, full);
                tensor_copy(st + V_BYTES, tm + 128, 8 * k0, b * BR, full);
            } else {
                mbar_arrive_tx(full, BR * SPB * 128);
#pragma unroll
                for (int q = 0; q < SPB / DBOX; ++q)
                    tensor_copy(st + q * BR * DBOX * 128, tm + 256, 64 * (k0 + q * DBOX), b * BR, full);
            }
        };
        if (lane == 0)
            for (int k = 0; k < pre; ++k) weights(k);  // stages start empty
        grid_dep_wait();
        for (int k = 0; k < n; ++k) {
            const int* cur = s_items + k * IT_W;
            const int s = k % NST;
            if (k >= pre) {
                mbar_wait(empty0 + 8 * s, ((k / NST) & 1) ^ 1);
                if (lane == 0) weights(k);
            }
            // x: per step, M tokens x 8 pieces of 16 bytes
            const u32 xs = sbase + s * STAGE_BYTES + V_BYTES + M_BYTES;
            const int nst = cur[1];
#pragma unroll
            for (int q = 0; q < SPB; ++q) {
                const int col = cur[4 + q];
                if (q < nst)
                    for (int p = lane; p < 8 * M; p += 32)
                        cp_async16(xs + (p >> 3) * XT + q * 128 + 16 * (p & 7), x + (long long)(p >> 3) * sx + col + 8 * (p & 7));
            }
            cp_async_arrive(full0 + 8 * s);
            if (lane == 0) PROBE_AT(4 + 3 * k);
        }
        grid_dep_launch();  // this block reads no more input: the next grid may be scheduled
        return;
    }

    // ---- consumers: warp `warp` owns rows 16 warp .. 16 warp + 15 of each item's chunk
    const int g = lane >> 2, t = lane & 3, h = t >> 1, cc = t & 1;
    grid_dep_wait();  // before any write of out / ws / cnt
    float acc[NOCT][4];
    zero_acc(acc);
    int ncov = 0;
    for (int it = i_beg, k = 0; it < i_end; ++it, ++k) {
        const int s = k % NST;
        const int chunk = it / split, j = it - chunk * split, r = chunk / chunks_per_tr, b = chunk - r * chunks_per_tr;
        const int rows_here = max(0, min(BR, min(TR, N - r * TR) - b * BR));
        mbar_wait(full0 + 8 * s, (k / NST) & 1);
        if (tid == 0) PROBE_AT(5 + 3 * k);
        const int2 kn = *reinterpret_cast<const int2*>(s_items + k * IT_W);  // (kind, steps)
        if (warp * 16 < rows_here && kn.y > 0) {
            const u32 st = sbase + s * STAGE_BYTES;
            const u32 xr = st + V_BYTES + M_BYTES + g * XT;
            const int row = warp * 16 + g;
            if (kn.x) {
                const u32 wr = st + row * (SPB * 64), wr8 = wr + 8 * (SPB * 64);
                const u32 mr = st + V_BYTES + row * (SPB * 8), mr8 = mr + 8 * (SPB * 8);
#pragma unroll 2
                for (int q = 0; q < kn.y; ++q) {
                    const uint4 w0 = lds128(wr + 64 * q + 16 * t), w1 = lds128(wr8 + 64 * q + 16 * t);
                    const uint2 mg = lds64(mr + 8 * q), mg8 = lds64(mr8 + 8 * q);
                    const u32 e = meta_reg(((u64)mg.y << 32) | mg.x, ((u64)mg8.y << 32) | mg8.x, t);
#pragma unroll
                    for (int o = 0; o < NOCT; ++o) {
                        const u32 xb = xr + o * 8 * XT + 128 * q + 32 * h + 4 * cc;
                        const uint4 x0 = make_uint4(lds32(xb), lds32(xb + 64), lds32(xb + 8), lds32(xb + 72));
                        const uint4 x1 = make_uint4(lds32(xb + 16), lds32(xb + 80), lds32(xb + 24), lds32(xb + 88));
                        mma_sp<0>(acc[o], w0.x, w1.x, w0.y, w1.y, x0, e);
                        mma_sp<1>(acc[o], w0.z, w1.z, w0.w, w1.w, x1, e);
                    }
                }
            } else {
#pragma unroll 2
                for (int q = 0; q < kn.y; ++q) {
                    // box q / DBOX: [BR rows][DBOX * 128 bytes]
                    const u32 wr = st + (q / DBOX) * (BR * DBOX * 128) + row * (DBOX * 128) + (q % DBOX) * 128 + 16 * t;
                    const uint4 w0 = lds128(wr), w1 = lds128(wr + 8 * DBOX * 128);
                    const uint4 w2 = lds128(wr + 64), w3 = lds128(wr + 8 * DBOX * 128 + 64);
#pragma unroll
                    for (int o = 0; o < NOCT; ++o) {
                        const u32 xb = xr + o * 8 * XT + 128 * q + 16 * t;
                        const uint4 x0 = lds128(xb), x1 = lds128(xb + 64);
                        mma_dense(acc[o], w0.x, w1.x, w0.y, w1.y, x0.x, x0.y);
                        mma_dense(acc[o], w0.z, w1.z, w0.w, w1.w, x0.z, x0.w);
                        mma_dense(acc[o], w2.x, w3.x, w2.y, w3.y, x1.x, x1.y);
                        mma_dense(acc[o], w2.z, w3.z, w2.w, w3.w, x1.z, x1.w);
                    }
                }
            }
        }
        __syncwarp();
        if (lane == 0) mbar_arrive(empty0 + 8 * s);
        if (tid == 0) PROBE_AT(6 + 3 * k);
        ++ncov;
        // the chunk ends here (its last item, or this block's last): its sums leave the registers
        if (j == split - 1 || it == i_end - 1) {
            chunk_out(acc, out, bias, ws, cnt, &s_last, M, N, so, split, ncov, chunk, r * TR + b * BR, rows_here,
                      warp, lane);
            zero_acc(acc);
            ncov = 0;
        }
    }
#if PROBE
    if (tid == 0) {
        pr[2] = clock64();
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(pr[3])::"memory");
    }
#endif
}
