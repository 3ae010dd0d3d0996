// Host emulation of the mma kernels (src/tilesparse/kernels/csrc: v7 hybrid_mma.cu, hybrid_mma_q4.cu, hybrid_gemm.cu) for
// the CPU tests: the kernels' own source, compiled by g++ after mma_emulator.py has replaced every inline-asm
// statement by a call of emu_asm (below) and every __shared__ declaration by a static one that is poisoned
// (0xFF bytes: NaN as bf16 / fp16, -1 as int) at the start of each block (an extern one, dynamic shared memory,
// gets the largest size a block can have).
//
// Execution: the blocks of the grid one after another (in a random order), the threads of a block as
// coroutines (ucontext) switched at __syncthreads, at warp-collective MMAs and, at random, at any other emulated
// instruction. cp.async copies happen at cp.async.wait_group (so x read before its wait would be stale / NaN).
// Global loads through ld.global.nc / cp.async are checked against the registered tensors. Built with hidden
// visibility, so each configuration's library keeps its own emulator state.
//
// PTX semantics emulated (PTX ISA, "Matrix fragments for mma.m16n8k16" and "... sparse mma.m16n8k32", 16-bit
// types; lane = 4g + t):
//   m16n8k16: A reg r (r = 0..3) holds rows g + 8 (r & 1), K columns 2t + 8 (r >> 1) + {0, 1} (lo, hi);
//             B reg j holds K rows 2t + 8j + {0, 1} of column g; D reg i holds row g + 8 (i >> 1), column 2t + (i & 1).
//   m16n8k32 sparse (ordered metadata): A as above over the 16 compressed columns, compressed column c = kept
//             element c & 1 of logical group c >> 1; B reg j (0..3) = K rows 2t + 8j + {0, 1}; metadata of row m,
//             group G from lane 4 (m % 8) + 2 sel + (G >> 2), bits 16 (m >= 8) + 4 (G & 3): index0 in the low 2
//             bits, index1 in the high 2 (index0 < index1 required).
//   ldmatrix.m8n8.x{1,2,4}.b16: matrix i's eight 16-byte rows at the addresses of lanes 8i..8i+7; register i of
//             lane l = elements 2 (l % 4) + {0, 1} of row l / 4 (from the PTX ISA; not yet checked on a GPU).
// The two MMA layouts are those benchmarks/mma_probe.py checked on a GPU for the v7 kernel.
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <initializer_list>
#include <map>
#include <random>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <vector>

typedef unsigned int u32;
typedef unsigned long long u64;
typedef unsigned short u16;

struct uint4 {
    u32 x, y, z, w;
};
struct uint2 {
    u32 x, y;
};
inline uint4 make_uint4(u32 a, u32 b, u32 c, u32 d) { return {a, b, c, d}; }
inline uint2 make_uint2(u32 a, u32 b) { return {a, b}; }
struct emu_dim3 {
    unsigned x, y, z;
};

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define threadIdx (emu::cur->tidx)
#define blockIdx (emu::block_idx)
using std::max;
using std::min;

namespace emu {

struct Copy {
    char* dst;
    const char* src;
    int n, src_n;
};

struct Barrier {
    int count = 0, arrived = 0;
    unsigned gen = 0;
};

struct Thread {
    ucontext_t ctx;
    emu_dim3 tidx;
    bool done = false;
    const Barrier* wait_bar = nullptr;
    unsigned wait_gen = 0;
    std::vector<char> stack;
    std::vector<Copy> open;                 // cp.async not yet committed
    std::deque<std::vector<Copy>> groups;   // committed, not yet waited for
};

struct WarpMma {
    u32 a[32][4], b[32][4], e[32];
    float c[32][4], d[32][4];
    u32 addr[32], ld[32][4];  // ldmatrix: each lane's row address, each lane's registers
};

inline Thread* cur = nullptr;
inline emu_dim3 block_idx;
inline ucontext_t sched;
inline std::vector<Thread> threads;
inline Barrier block_bar;
inline Barrier warp_bar[32];
inline WarpMma warp_mma[32];
inline std::mt19937 rng;
inline std::function<void()> body;
inline bool failed = false;
inline std::string error;
inline unsigned block_gen = 0;
inline std::map<const void*, unsigned> poisoned;
inline std::vector<std::pair<const char*, const char*>> buffers;  // registered global memory
inline char anchor;                                               // shared addresses are offsets from here

[[noreturn]] inline void fail(const std::string& msg) {
    if (!failed) error = msg;
    failed = true;
    swapcontext(&cur->ctx, &sched);  // never resumed
    std::abort();
}

inline void yield() { swapcontext(&cur->ctx, &sched); }

inline void maybe_yield() {
    if (rng() % 4 == 0) yield();
}

// arrive at b; the last thread to arrive runs `last` and releases the others
template <class F>
inline void arrive(Barrier& b, F&& last) {
    const unsigned g = b.gen;
    if (++b.arrived == b.count) {
        last();
        b.arrived = 0;
        ++b.gen;
        return;
    }
    cur->wait_bar = &b;
    cur->wait_gen = g;
    yield();
    cur->wait_bar = nullptr;
}

inline void poison(void* p, size_t n) {
    unsigned& gen = poisoned[p];
    if (gen != block_gen) {
        std::memset(p, 0xFF, n);
        gen = block_gen;
    }
}

inline void check_global(const void* p, size_t n, const char* what) {
    const char* c = static_cast<const char*>(p);
    for (auto& b : buffers)
        if (c >= b.first && c + n <= b.second) return;
    char msg[160];
    std::snprintf(msg, sizeof msg, "%s: %zu bytes at %p outside every registered tensor (thread %u, block %u,%u)",
                  what, n, p, cur->tidx.x, block_idx.x, block_idx.y);
    fail(msg);
}

// ---------------------------------------------------------------- 16-bit numbers
inline float bits_f(u32 w) {
    float f;
    std::memcpy(&f, &w, 4);
    return f;
}
inline u32 f_bits(float f) {
    u32 w;
    std::memcpy(&w, &f, 4);
    return w;
}
inline double h_val(u16 h, bool bf16) {
    if (bf16) return bits_f((u32)h << 16);
    _Float16 v;
    std::memcpy(&v, &h, 2);
    return (double)v;
}
inline u16 f_to_bf16(float f) {  // round to nearest even
    u32 w = f_bits(f);
    if ((w & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    w += 0x7fffu + ((w >> 16) & 1u);
    return (u16)(w >> 16);
}
inline u16 d_to_h(double v, bool bf16) {  // bf16: through float (exact for the kernels' operands)
    if (bf16) return f_to_bf16((float)v);
    const _Float16 h = (_Float16)v;
    u16 r;
    std::memcpy(&r, &h, 2);
    return r;
}
inline double lo(u32 w, bool bf16) { return h_val((u16)(w & 0xFFFF), bf16); }
inline double hi(u32 w, bool bf16) { return h_val((u16)(w >> 16), bf16); }
inline double half_of(u32 w, int h, bool bf16) { return h ? hi(w, bf16) : lo(w, bf16); }

// ---------------------------------------------------------------- MMAs (the warp's last lane to arrive computes)
inline void mma_dense_all(WarpMma& W, bool bf16) {
    for (int m = 0; m < 16; ++m)
        for (int n = 0; n < 8; ++n) {
            double s = 0;
            for (int k = 0; k < 16; ++k) {
                const double a = half_of(W.a[4 * (m % 8) + (k % 8) / 2][(m >= 8) + 2 * (k >= 8)], k & 1, bf16);
                const double b = half_of(W.b[4 * n + (k % 8) / 2][k / 8], k & 1, bf16);
                s += a * b;
            }
            const int lane = 4 * (m % 8) + n / 2, reg = 2 * (m >= 8) + (n & 1);
            W.d[lane][reg] = (float)((double)W.c[lane][reg] + s);
        }
}

inline void mma_sparse_all(WarpMma& W, bool bf16, int sel) {
    for (int m = 0; m < 16; ++m) {
        double A[32] = {0};
        for (int G = 0; G < 8; ++G) {
            const u32 e = W.e[4 * (m % 8) + 2 * sel + (G >> 2)];
            const u32 nib = (e >> (16 * (m >= 8) + 4 * (G & 3))) & 15u;
            const u32 i0 = nib & 3u, i1 = nib >> 2;
            if (i0 >= i1) {
                char msg[96];
                std::snprintf(msg, sizeof msg, "mma.sp: metadata of row %d, group %d is %u (index0 >= index1)", m, G,
                              nib);
                fail(msg);
            }
            for (int h = 0; h < 2; ++h) {
                const int c = 2 * G + h;
                const double a = half_of(W.a[4 * (m % 8) + (c % 8) / 2][(m >= 8) + 2 * (c >= 8)], h, bf16);
                A[4 * G + (h ? i1 : i0)] = a;
            }
        }
        for (int n = 0; n < 8; ++n) {
            double s = 0;
            for (int k = 0; k < 32; ++k) s += A[k] * half_of(W.b[4 * n + (k % 8) / 2][k / 8], k & 1, bf16);
            const int lane = 4 * (m % 8) + n / 2, reg = 2 * (m >= 8) + (n & 1);
            W.d[lane][reg] = (float)((double)W.c[lane][reg] + s);
        }
    }
}

// ---------------------------------------------------------------- inline asm
struct Op {
    void* p;  // output: the variable
    u64 v;    // input: the value's bits; output: the variable's size
};

template <class T>
inline Op out(T& x) {
    return {(void*)&x, sizeof(T)};
}
inline Op in_r(u32 v) { return {nullptr, v}; }
template <class T>
inline Op in_l(T v) {
    if constexpr (std::is_pointer_v<T>) return {nullptr, (u64)(uintptr_t)v};
    else return {nullptr, (u64)v};
}
inline Op in_f(float f) { return {nullptr, f_bits(f)}; }
inline Op in_h(u16 h) { return {nullptr, h}; }
inline Op in_n(long long n) { return {nullptr, (u64)n}; }

enum Kind {
    LD_V4, LD_V2, LD_U32, LD_CG_F32, MOV_B32, CVT_F32_F16, CVT_BF16_F32, CVT_F16_F32, FMA_X2, MMA_DENSE, MMA_SP,
    CP_ASYNC, CP_COMMIT, CP_WAIT, GRIDDEP, LDSM
};

struct Parsed {
    Kind kind;
    bool bf16;
    long imm;  // cp.async: copy size; wait_group: groups allowed pending (-1: given as operand %0); ldmatrix: x1/2/4
};

inline Parsed parse(const char* tmpl) {
    std::string t(tmpl);
    const size_t a = t.find_first_not_of(" \t");
    const size_t z = t.find_first_of(" \t;", a);
    const std::string mn = t.substr(a, z - a), rest = z == std::string::npos ? "" : t.substr(z);
    const bool bf16 = mn.find("bf16") != std::string::npos;
    auto is = [&](const char* s) { return mn == s; };
    if (is("ld.global.nc.v4.u32")) return {LD_V4, false, 0};
    if (is("ld.global.nc.v2.u32")) return {LD_V2, false, 0};
    if (is("ld.global.nc.u32")) return {LD_U32, false, 0};
    if (is("ld.global.cg.f32")) return {LD_CG_F32, false, 0};
    if (is("mov.b32")) return {MOV_B32, false, 0};
    if (is("cvt.f32.f16")) return {CVT_F32_F16, false, 0};
    if (is("cvt.rn.bf16.f32")) return {CVT_BF16_F32, true, 0};
    if (is("cvt.rn.f16.f32")) return {CVT_F16_F32, false, 0};
    if (is("fma.rn.bf16x2") || is("fma.rn.f16x2")) return {FMA_X2, bf16, 0};
    if (mn.rfind("mma.sync.aligned.m16n8k16.row.col.f32.", 0) == 0) return {MMA_DENSE, bf16, 0};
    if (mn.rfind("mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.", 0) == 0) return {MMA_SP, bf16, 0};
    if (is("cp.async.ca.shared.global") || is("cp.async.cg.shared.global")) {  // "[%0], [%1], SIZE, %2;"
        const size_t c1 = rest.find(','), c2 = rest.find(',', c1 + 1);
        return {CP_ASYNC, false, std::strtol(rest.c_str() + c2 + 1, nullptr, 10)};
    }
    if (is("cp.async.commit_group")) return {CP_COMMIT, false, 0};
    if (is("cp.async.wait_group"))
        return {CP_WAIT, false, rest.find('%') != std::string::npos ? -1 : std::strtol(rest.c_str(), nullptr, 10)};
    if (is("ldmatrix.sync.aligned.m8n8.x1.shared.b16")) return {LDSM, false, 1};
    if (is("ldmatrix.sync.aligned.m8n8.x2.shared.b16")) return {LDSM, false, 2};
    if (is("ldmatrix.sync.aligned.m8n8.x4.shared.b16")) return {LDSM, false, 4};
    if (is("griddepcontrol.wait") || is("griddepcontrol.launch_dependents")) return {GRIDDEP, false, 0};
    std::fprintf(stderr, "mma emulator: no emulation of \"%s\"\n", tmpl);
    std::abort();
}

template <class T>
inline void put(const Op& o, T v) {
    if (o.v != sizeof(T)) fail("inline asm: output operand of the wrong size");
    std::memcpy(o.p, &v, sizeof(T));
}
template <class T>
inline T get_out(const Op& o) {
    T v;
    std::memcpy(&v, o.p, sizeof(T));
    return v;
}

inline void finish_group(std::vector<Copy>& g) {
    for (auto& c : g) {
        if (c.src_n) std::memcpy(c.dst, c.src, c.src_n);
        std::memset(c.dst + c.src_n, 0, c.n - c.src_n);
    }
}

inline void asm_(const char* tmpl, std::initializer_list<Op> outs_, std::initializer_list<Op> ins_) {
    static std::unordered_map<const char*, Parsed> cache;
    auto it = cache.find(tmpl);
    if (it == cache.end()) it = cache.emplace(tmpl, parse(tmpl)).first;
    const Parsed P = it->second;
    const Op* o = outs_.begin();
    const Op* in = ins_.begin();
    const int lane = cur->tidx.x & 31, warp = cur->tidx.x >> 5;
    switch (P.kind) {
        case LD_V4:
        case LD_V2:
        case LD_U32: {
            const int n = P.kind == LD_V4 ? 4 : P.kind == LD_V2 ? 2 : 1;
            const u32* p = (const u32*)(uintptr_t)in[0].v;
            if ((uintptr_t)p % (4 * n)) fail("ld.global.nc: misaligned address");
            check_global(p, 4 * n, "ld.global.nc");
            for (int k = 0; k < n; ++k) put<u32>(o[k], p[k]);
            break;
        }
        case LD_CG_F32: {
            const float* p = (const float*)(uintptr_t)in[0].v;
            check_global(p, 4, "ld.global.cg");
            put<float>(o[0], *p);
            break;
        }
        case MOV_B32: put<float>(o[0], bits_f((u32)in[0].v)); break;
        case CVT_F32_F16: put<float>(o[0], (float)h_val((u16)in[0].v, false)); break;
        case CVT_BF16_F32: put<u16>(o[0], f_to_bf16(bits_f((u32)in[0].v))); break;
        case CVT_F16_F32: put<u16>(o[0], d_to_h(bits_f((u32)in[0].v), false)); break;
        case FMA_X2: {
            const u32 a = (u32)in[0].v, b = (u32)in[1].v, c = (u32)in[2].v;
            const u16 l = d_to_h(lo(a, P.bf16) * lo(b, P.bf16) + lo(c, P.bf16), P.bf16);
            const u16 h = d_to_h(hi(a, P.bf16) * hi(b, P.bf16) + hi(c, P.bf16), P.bf16);
            put<u32>(o[0], (u32)l | ((u32)h << 16));
            break;
        }
        case MMA_DENSE:
        case MMA_SP: {
            WarpMma& W = warp_mma[warp];
            const bool sp = P.kind == MMA_SP;
            for (int k = 0; k < 4; ++k) {
                W.c[lane][k] = get_out<float>(o[k]);
                W.a[lane][k] = (u32)in[k].v;
            }
            for (int k = 0; k < (sp ? 4 : 2); ++k) W.b[lane][k] = (u32)in[4 + k].v;
            int sel = 0;
            if (sp) {
                W.e[lane] = (u32)in[8].v;
                sel = (int)in[9].v;
            }
            arrive(warp_bar[warp], [&] {
                if (sp) mma_sparse_all(W, P.bf16, sel);
                else mma_dense_all(W, P.bf16);
            });
            for (int k = 0; k < 4; ++k) put<float>(o[k], W.d[lane][k]);
            break;
        }
        case CP_ASYNC: {
            char* dst = &anchor + (int)(u32)in[0].v;
            const char* src = (const char*)(uintptr_t)in[1].v;
            const int src_n = (int)in[2].v;
            if (src_n > P.imm) fail("cp.async: src-size > cp-size");
            if ((uintptr_t)dst % P.imm || (src_n && (uintptr_t)src % P.imm)) fail("cp.async: misaligned address");
            if (src_n) check_global(src, src_n, "cp.async");
            cur->open.push_back({dst, src, (int)P.imm, src_n});
            break;
        }
        case CP_COMMIT:
            cur->groups.push_back(std::move(cur->open));
            cur->open.clear();
            break;
        case CP_WAIT:
            while ((long)cur->groups.size() > (P.imm < 0 ? (long)in[0].v : P.imm)) {
                finish_group(cur->groups.front());
                cur->groups.pop_front();
            }
            break;
        case GRIDDEP: break;
        case LDSM: {  // matrix i's rows from lanes 8i..8i+7; lane l gets row l / 4, elements 2 (l % 4) + {0, 1}
            WarpMma& W = warp_mma[warp];
            W.addr[lane] = (u32)in[0].v;
            const int nm = (int)P.imm;
            arrive(warp_bar[warp], [&] {
                for (int i = 0; i < nm; ++i)
                    for (int l = 0; l < 32; ++l) {
                        const char* row = &anchor + (int)W.addr[8 * i + l / 4];
                        if ((uintptr_t)row % 16) fail("ldmatrix: row address not 16-byte aligned");
                        std::memcpy(&W.ld[l][i], row + 4 * (l % 4), 4);
                    }
            });
            for (int i = 0; i < nm; ++i) put<u32>(o[i], W.ld[lane][i]);
            break;
        }
    }
    maybe_yield();
}

// ---------------------------------------------------------------- the grid
inline void trampoline() {
    body();
    cur->done = true;
}

inline int run_grid(int gx, int gy, int tpb, unsigned seed, std::function<void()> fn) {
    rng.seed(seed);
    failed = false;
    error.clear();
    body = std::move(fn);
    std::vector<std::pair<int, int>> blocks;
    for (int y = 0; y < gy; ++y)
        for (int x = 0; x < gx; ++x) blocks.push_back({x, y});
    std::shuffle(blocks.begin(), blocks.end(), rng);
    threads.clear();
    threads.resize(tpb);
    for (auto& th : threads) th.stack.resize(1 << 18);
    for (auto [bx, by] : blocks) {
        block_idx = {(unsigned)bx, (unsigned)by, 0};
        ++block_gen;
        block_bar = Barrier{tpb, 0, 0};
        for (auto& w : warp_bar) w = Barrier{32, 0, 0};
        for (int i = 0; i < tpb; ++i) {
            Thread& th = threads[i];
            th.tidx = {(unsigned)i, 0, 0};
            th.done = false;
            th.wait_bar = nullptr;
            th.open.clear();
            th.groups.clear();
            getcontext(&th.ctx);
            th.ctx.uc_stack.ss_sp = th.stack.data();
            th.ctx.uc_stack.ss_size = th.stack.size();
            th.ctx.uc_link = &sched;
            makecontext(&th.ctx, trampoline, 0);
        }
        std::vector<int> order(tpb);
        for (int i = 0; i < tpb; ++i) order[i] = i;
        for (;;) {
            bool all_done = true, ran = false;
            std::shuffle(order.begin(), order.end(), rng);
            for (int i : order) {
                Thread& th = threads[i];
                if (th.done) continue;
                all_done = false;
                if (th.wait_bar && th.wait_bar->gen == th.wait_gen) continue;
                cur = &th;
                swapcontext(&sched, &th.ctx);
                ran = true;
                if (failed) return 1;
            }
            if (all_done) break;
            if (!ran) {
                error = "deadlock: every live thread waits at a barrier";
                return 1;
            }
        }
    }
    return 0;
}

}  // namespace emu

inline void __syncthreads() {
    emu::arrive(emu::block_bar, [] {});
}
inline void __threadfence() {}
inline float atomicAdd(float* p, float v) {
    const float old = *p;
    *p = old + v;
    return old;
}
inline int atomicAdd(int* p, int v) {
    const int old = *p;
    *p = old + v;
    return old;
}
inline size_t __cvta_generic_to_shared(const void* p) {
    return (size_t)(u32)(int)((const char*)p - &emu::anchor);
}
inline u32 __byte_perm(u32 x, u32 y, u32 s) {
    const u64 v = ((u64)y << 32) | x;
    u32 r = 0;
    for (int k = 0; k < 4; ++k) r |= (u32)((v >> (8 * ((s >> (4 * k)) & 7))) & 0xFF) << (8 * k);
    return r;
}

#define EMU_EXPORT extern "C" __attribute__((visibility("default")))
EMU_EXPORT void emu_register(const void* p, size_t n) {
    emu::buffers.push_back({(const char*)p, (const char*)p + n});
}
EMU_EXPORT void emu_clear() { emu::buffers.clear(); }
EMU_EXPORT const char* emu_error() { return emu::error.c_str(); }
