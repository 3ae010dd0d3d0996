"""Runs the CUDA source of the mma decode kernels on the CPU (the emulation of ``mma_emulator.h``), for tests of
kernels that no GPU has run yet.

:func:`translate` turns a configured kernel source into host C++: every inline-asm statement becomes a call
``emu::asm_(template, {outputs}, {inputs})`` of the emulator (which implements the handful of PTX instructions
the kernels use, the MMAs with the fragment layouts that ``benchmarks/mma_probe.py`` checked on a GPU), every
``__shared__`` declaration (``extern``: dynamic shared memory, of the largest size a block can have) a static one
poisoned per block, and an ``emu_run`` entry unpacks a ``void*``
parameter array (as ``cuLaunchKernel`` does) into the kernel's arguments. :func:`build` compiles it with g++;
:meth:`Emulated.run` launches a grid on CPU tensors. The GPU-verified v7 kernel runs through the same emulation
in the tests, as a check of the emulation itself.
"""

from __future__ import annotations

import ctypes
import hashlib
import re
import shutil
import subprocess
from pathlib import Path

import torch

HEADER = Path(__file__).with_name("mma_emulator.h")

_ASM = re.compile(r"\basm\s*(?:volatile\s*)?\(")
_OPERAND = re.compile(r'^"([=+]?)(\w)"\s*\((.*)\)$', re.DOTALL)
_SHARED = re.compile(r"^(\s*)__shared__\s+([^;]*?)\b(\w+)((?:\s*\[[^;\]]*\])*)\s*;", re.MULTILINE)
_DYN_SHARED = re.compile(r"^(\s*)extern\s+__shared__\s+([^;]*?)\b(\w+)\s*\[\s*\]\s*;", re.MULTILINE)
_KERNEL = re.compile(r"\bKNAME\s*\(")
DYN_SMEM_BYTES = 232448  # the largest dynamic shared memory of a block (sm_90)


def compiler() -> str | None:
    """The host C++ compiler the emulation needs (``None`` when there is none)."""
    return shutil.which("g++")


def _outside_strings(s: str, start: int = 0):
    """``(index, char)`` of every character of ``s`` from ``start`` that lies outside string literals."""
    j, in_str = start, False
    while j < len(s):
        c = s[j]
        if in_str:
            if c == "\\":
                j += 1
            elif c == '"':
                in_str = False
        elif c == '"':
            in_str = True
        else:
            yield j, c
        j += 1


def _close(src: str, i: int) -> int:
    """Index of the ``)`` matching the ``(`` at ``i`` (string literals skipped)."""
    depth = 0
    for j, c in _outside_strings(src, i):
        if c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
            if depth == 0:
                return j
    raise ValueError(f"unbalanced parentheses from offset {i}")


def _split(s: str, sep: str) -> list[str]:
    """``s`` split at ``sep`` outside string literals and parentheses."""
    parts, depth, start = [], 0, 0
    for j, c in _outside_strings(s):
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif c == sep and depth == 0:
            parts.append(s[start:j])
            start = j + 1
    parts.append(s[start:])
    return parts


def _asm_call(inner: str) -> str:
    parts = _split(inner, ":") + ["", ""]
    ops = []
    for side, text in (("out", parts[1]), ("in", parts[2])):
        args = []
        for op in (o.strip() for o in _split(text, ",")):
            if not op:
                continue
            m = _OPERAND.match(op)
            if m is None:
                raise ValueError(f"inline asm operand not understood: {op!r}")
            args.append(f"emu::out({m[3]})" if side == "out" else f"emu::in_{m[2]}({m[3]})")
        ops.append("{" + ", ".join(args) + "}")
    return f"emu::asm_({parts[0].strip()}, {ops[0]}, {ops[1]})"


def _kernel_params(src: str) -> list[str]:
    """The kernel's parameter types, in order."""
    m = _KERNEL.search(src)
    if m is None:
        raise ValueError("no KNAME( kernel definition in the source")
    close = _close(src, m.end() - 1)
    types = []
    for p in _split(src[m.end():close], ","):
        p = " ".join(p.replace("__restrict__", " ").split())
        name = re.search(r"(\w+)$", p)
        types.append(p[:name.start()].strip())
    return types


def translate(src: str) -> tuple[str, list[str]]:
    """Host C++ for a configured kernel source, and the kernel's parameter types."""
    out, i = ["#include \"mma_emulator.h\"\n"], 0
    while (m := _ASM.search(src, i)) is not None:
        close = _close(src, m.end() - 1)
        out += [src[i:m.start()], _asm_call(src[m.end():close])]
        i = close + 1
    body = "".join(out) + src[i:]
    body = _DYN_SHARED.sub(lambda m: f"{m[1]}static {m[2]}{m[3]}[{DYN_SMEM_BYTES}]; "
                                     f"emu::poison(&{m[3]}, sizeof({m[3]}));", body)
    body = _SHARED.sub(lambda m: f"{m[1]}static {m[2]}{m[3]}{m[4] or ''}; emu::poison(&{m[3]}, sizeof({m[3]}));",
                       body)
    types = _kernel_params(src)
    call = ", ".join(f"*({t}*)p[{k}]" for k, t in enumerate(types))
    body += ("\nEMU_EXPORT int emu_run(void** p, int gx, int gy, int tpb, unsigned seed) {\n"
             f"    return emu::run_grid(gx, gy, tpb, seed, [p] {{ KNAME({call}); }});\n}}\n")
    return body, types


class Emulated:
    """One configured kernel compiled for the host."""

    def __init__(self, lib: ctypes.CDLL, types: list[str]):
        self._lib, self._types = lib, types
        lib.emu_error.restype = ctypes.c_char_p
        lib.emu_register.argtypes = [ctypes.c_void_p, ctypes.c_size_t]

    def run(self, args: list, grid: tuple[int, int], tpb: int, seed: int = 0) -> None:
        """Launch ``grid`` blocks of ``tpb`` threads on ``args`` (CPU tensors for pointers, ``0`` for a null
        pointer, ints); ``AssertionError`` with the emulator's message when it stops (out-of-bounds load, bad
        metadata, deadlock)."""
        if len(args) != len(self._types):
            raise ValueError(f"{len(args)} arguments for {len(self._types)} parameters")
        lib = self._lib
        lib.emu_clear()
        vals = []
        for t, a in zip(self._types, args):
            if isinstance(a, torch.Tensor):
                assert a.device.type == "cpu" and a.is_contiguous(), t
                lib.emu_register(a.data_ptr(), a.numel() * a.element_size())
                vals.append(ctypes.c_void_p(a.data_ptr()))
            elif "*" in t:
                vals.append(ctypes.c_void_p(a))
            else:
                vals.append(ctypes.c_int(a))
        params = (ctypes.c_void_p * len(vals))(*[ctypes.addressof(v) for v in vals])
        if lib.emu_run(params, grid[0], grid[1], tpb, seed):
            raise AssertionError(f"kernel emulation stopped: {lib.emu_error().decode()}")


def build(source: str, workdir: Path) -> Emulated:
    """Translate and compile a configured kernel source (cached in ``workdir`` by content)."""
    text, types = translate(source)
    digest = hashlib.sha1((text + HEADER.read_text()).encode()).hexdigest()[:16]
    so = Path(workdir) / f"emu_{digest}.so"
    if not so.exists():
        cpp = so.with_suffix(".cpp")
        cpp.write_text(text)
        cmd = [compiler(), "-std=c++17", "-O1", "-fPIC", "-shared", "-w", "-fvisibility=hidden", f"-I{HEADER.parent}",
               str(cpp), "-o", str(so)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode:
            raise RuntimeError(f"g++ failed on the translated kernel:\n{res.stderr[-4000:]}")
    return Emulated(ctypes.CDLL(str(so)), types)
