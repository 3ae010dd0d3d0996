"""The decode kernels' machine code, read on the CPU (:mod:`sass`): their main loops keep the next batch's loads
in flight. NVRTC compiles each configuration for sm_90 and Triton's bundled ``cuobjdump`` disassembles it (both
skipped without). A loop unrolled so that a batch's first use of its codes follows the next batch's loads, which
lost the overlap on the H100, is caught."""

from __future__ import annotations

import pytest
import sass

from tilesparse.kernels import cuda_driver
from tilesparse.kernels import cuda_mma as cm
from tilesparse.kernels import cuda_mma_q4 as cq

needs_tools = pytest.mark.skipif(cuda_driver.missing() is not None or sass.cuobjdump() is None,
                                 reason=f"needs NVRTC and Triton's cuobjdump ({cuda_driver.missing()})")


def _word(stall: int, writes: int | None, waits: tuple = ()) -> str:
    ctrl = stall | (7 if writes is None else writes) << 5 | 7 << 8 | sum(1 << k for k in waits) << 11
    return f"0x{ctrl << 41:016x}"


def _listing(rows) -> str:
    """``cuobjdump -sass`` lines for ``(text, stall, writes, waits)`` rows at addresses 0x0000, 0x0010, ..."""
    out = []
    for i, (text, stall, writes, waits) in enumerate(rows):
        out.append(f"        /*{16 * i:04x}*/                   {text} ;   /* 0x000000000000000a */")
        out.append(f"                                                       /* {_word(stall, writes, waits)} */")
    return "\n".join(out)


def test_parse_reads_the_scheduling_bits():
    ins = sass.parse(_listing([("LDG.E.64.CONSTANT R14, desc[UR6][R14.64]", 4, 5, ()),
                               ("@!P0 IMAD.MOV.U32 R48, RZ, RZ, R52", 2, None, (1, 5))]))
    assert [(x.addr, x.opcode, x.stall, x.writes, x.waits) for x in ins] == [
        (0, "LDG.E.64.CONSTANT", 4, 5, frozenset()), (16, "IMAD.MOV.U32", 2, None, frozenset({1, 5}))]


def test_loop_waits_count_waits_on_loads_of_the_same_pass():
    pipelined = [("IMAD.MOV.U32 R8, RZ, RZ, R20", 1, None, (5,)),  # last pass's loads: hidden behind the pass
                 ("LDG.E.64.CONSTANT R20, desc[UR6][R2.64]", 1, 5, ()),
                 ("HMMA.16816.F32.BF16 R4, R8, R12, R4", 1, None, ()),
                 ("@P0 BRA 0x0", 1, None, ())]
    exposed = [("LDG.E.64.CONSTANT R20, desc[UR6][R2.64]", 1, 5, ()),
               ("LOP3.LUT R8, R22, 0xf000f, RZ, 0xc0, !PT", 1, None, (5,)),  # waits for this pass's load
               ("HMMA.16816.F32.BF16 R4, R8, R12, R4", 1, None, ()),
               ("@P0 BRA 0x0", 1, None, ())]
    for rows, expected in ((pipelined, (4, 1, 0, True)), (exposed, (4, 1, 1, False))):
        ins = sass.parse(_listing(rows))
        assert sass.loops(ins) == [(0, 3)] and sass.main_loop(ins) == (0, 3)
        w = sass.loop_waits(ins, (0, 3))
        assert (w.size, w.loads, w.exposed, w.overlapped) == expected


@needs_tools
@pytest.mark.parametrize("key", [cq.MmaQ4Key(True, 1, 4, 2, False), cq.MmaQ4Key(True, 2, 4, 2, False),
                                 cm.make_key(True, 1, 4, 2, False, 7, 0),
                                 cm.make_key(True, 16, 4, 1, False, 7, 0)], ids=lambda k: k.name)
def test_decode_kernels_keep_the_next_batch_in_flight(key):
    """The 4-bit kernel's default configurations (1 and 16 tokens) and v7's."""
    w = sass.main_loop_waits(key)
    assert w.overlapped, w


UNROLLED = '''    auto run_batch = [&](int s0, int buf, uint4 (&cc)[SB], uint2 (&mc)[SB], uint2 (&pc)[SB], uint4 (&cn)[SB],
                         uint2 (&mn)[SB], uint2 (&pn)[SB]) {
        const int nb = min(SB, s_end - s0);
        if (s0 + SB < s_end) {
            load_codes(s0 + SB, cn, mn);
            load_params(s0 + SB, pn);
        }
        asm volatile("cp.async.wait_group 0;" ::: "memory");
        __syncthreads();
        const u32* xcur = xs + buf * XS_WORDS;
        if (s0 + SB < s_end) stage(s0 + SB, xs + (buf ^ 1) * XS_WORDS);
        if (wvalid) {
#pragma unroll
            for (int i = 0; i < SB; ++i) {
                if (i < nb) mma_step_q4(acc, cc[i], mc[i], pc[i], xcur + (i * NOCT) * 256 + lane * 4, s0 + i < n_sp, t);
            }
        }
    };
    for (int s0 = s_beg; s0 < s_end; s0 += 2 * SB) {  // the register sets swap roles: no copies
        run_batch(s0, 0, c, m8, pz, c_n, m8_n, pz_n);
        if (s0 + SB < s_end) run_batch(s0 + SB, 1, c_n, m8_n, pz_n, c, m8, pz);
    }
'''


@needs_tools
def test_an_unrolled_loop_waits_for_the_loads_it_just_issued():
    key = cq.MmaQ4Key(True, 1, 4, 2, False)
    src = key.configured_source()
    a = src.index("    for (int s0 = s_beg, batch = 0; s0 < s_end; s0 += SB, ++batch) {\n        const int nb = min(SB, "
                  "s_end - s0);\n        // 1. the next batch")
    b = src.index("#endif\n    write_out(", a)
    w = sass.main_loop_waits(key, source=src[:a] + UNROLLED + src[b:])
    assert w.loads > 0 and not w.overlapped, w
