"""The sm_90 machine code (SASS) of the CUDA kernels, read on a machine without a GPU.

NVRTC compiles a configuration to a cubin; the ``cuobjdump`` that Triton ships disassembles it. Each instruction
comes with the scheduling bits that the disassembly does not print: in the high 64-bit word of every 128-bit
instruction (Volta to Hopper; NVIDIA does not document them, the layout is the one the public assemblers use),
bits 41-44 hold the stall count, 46-48 the scoreboard a variable-latency instruction (a global load) releases
when done, 52-57 the scoreboards the instruction waits for.

Why it matters: a warp's global loads share a few scoreboards, and a wait on one waits for every load that set it.
A kernel that keeps the next batch's loads in flight while it computes on this one only does so if no instruction
of its loop waits on the loads' scoreboard after it has issued the next batch's loads (:func:`main_loop_waits`).
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

_LINE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;\s*/\* (0x[0-9a-f]{16}) \*/")
_HI = re.compile(r"^\s*/\* (0x[0-9a-f]{16}) \*/")
_BRANCH = re.compile(r"\bBRA\s+(0x[0-9a-f]+)")


@dataclass(frozen=True)
class Instr:
    """One instruction: its address, text (with any ``@P`` guard), opcode and scheduling bits."""

    addr: int
    text: str
    stall: int
    writes: int | None  # the scoreboard it releases when done (variable-latency instructions), or None
    waits: frozenset  # the scoreboards it waits for

    @property
    def opcode(self) -> str:
        words = self.text.split()
        return words[1] if words[0].startswith("@") else words[0]


def cuobjdump() -> str | None:
    """Triton's bundled ``cuobjdump`` (``None`` without one)."""
    try:
        import triton
    except ImportError:
        return None
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(path) if path.exists() else None


def parse(text: str) -> list[Instr]:
    """The instructions of ``cuobjdump -sass`` output (one kernel), with their scheduling bits."""
    lines = text.splitlines()
    out = []
    for i, line in enumerate(lines[:-1]):
        m = _LINE.match(line)
        hi = _HI.match(lines[i + 1]) if m else None
        if not (m and hi):
            continue
        ctrl = int(hi.group(1), 16) >> 41
        wb = (ctrl >> 5) & 7
        out.append(Instr(int(m.group(1), 16), m.group(2), ctrl & 15, None if wb == 7 else wb,
                         frozenset(k for k in range(6) if (ctrl >> 11) >> k & 1)))
    return out


def disassemble(key, arch: str = "sm_90", source: str | None = None) -> list[Instr]:
    """The SASS of one kernel configuration (a key of :func:`tilesparse.kernels.cuda_mma.configured_source`: v7 /
    v9, the 4-bit kernel, the GEMM; or ``source`` compiled under the key's name), compiled by NVRTC for
    ``arch``."""
    from tilesparse.kernels import cuda_driver, cuda_mma

    tool = cuobjdump()
    if tool is None:
        raise RuntimeError("no cuobjdump (Triton's bundled one) to disassemble with")
    image = cuda_driver.compile_source(source or cuda_mma.configured_source(key), key.name, arch)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"{key.name}.cubin"
        path.write_bytes(image)
        text = subprocess.run([tool, "-sass", str(path)], capture_output=True, text=True, check=True).stdout
    return parse(text)


def loops(instrs: list[Instr]) -> list[tuple[int, int]]:
    """``(first, last)`` instruction indices of every loop: a branch back to an earlier address."""
    index = {ins.addr: i for i, ins in enumerate(instrs)}
    spans = []
    for i, ins in enumerate(instrs):
        m = _BRANCH.search(ins.text)
        if m and int(m.group(1), 16) <= ins.addr and int(m.group(1), 16) in index:
            spans.append((index[int(m.group(1), 16)], i))
    return spans


def main_loop(instrs: list[Instr]) -> tuple[int, int]:
    """The smallest loop that holds tensor-core instructions (``HMMA``): a decode kernel's loop over batches."""
    with_mma = [(a, b) for a, b in loops(instrs) if any(x.opcode.startswith("HMMA") for x in instrs[a:b + 1])]
    if not with_mma:
        raise ValueError("no loop with HMMA instructions")
    return min(with_mma, key=lambda s: s[1] - s[0])


@dataclass(frozen=True)
class LoopWaits:
    """How a loop waits for its global loads (``LDG``): ``loads``, the loop's load instructions; ``exposed``, the
    instructions that wait on a scoreboard which a load earlier in the same pass of the loop body set. Those waits
    cover loads of this iteration, so the load latency is not hidden behind the iteration's work; a loop whose loads
    are consumed an iteration later (register double buffering) has none."""

    size: int
    loads: int
    exposed: int

    @property
    def overlapped(self) -> bool:
        return self.loads > 0 and self.exposed == 0


def loop_waits(instrs: list[Instr], span: tuple[int, int]) -> LoopWaits:
    """:class:`LoopWaits` of the loop ``span`` (from :func:`loops`), in the order of the code."""
    body = instrs[span[0]:span[1] + 1]
    pending: set = set()  # scoreboards set by a load earlier in this pass
    loads = exposed = 0
    for x in body:
        if x.waits & pending:
            exposed += 1
            pending -= x.waits
        if x.opcode.startswith("LDG.") and x.writes is not None:
            loads += 1
            pending.add(x.writes)
    return LoopWaits(len(body), loads, exposed)


def main_loop_waits(key, arch: str = "sm_90", source: str | None = None) -> LoopWaits:
    """:func:`loop_waits` of a configuration's main loop (:func:`main_loop`; ``source``: as in
    :func:`disassemble`)."""
    instrs = disassemble(key, arch, source)
    return loop_waits(instrs, main_loop(instrs))


if __name__ == "__main__":  # e.g. PYTHONPATH=src python3 tests/kernels/sass.py 1 4 2 0  (4-bit: M warps sb qst)
    import sys

    from tilesparse.kernels import cuda_mma as cm
    from tilesparse.kernels import cuda_mma_q4 as cq

    M, warps, sb, qst = (int(v) for v in (sys.argv[1:] + ["1", "4", "2", "0"][len(sys.argv) - 1:]))
    key = cq.MmaQ4Key(True, cm.octets(M), warps, sb, False, qst)
    print(key.name, main_loop_waits(key))
