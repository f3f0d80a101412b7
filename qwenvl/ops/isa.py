"""Instruction sets: the native libraries qwenvl can build, what this CPU runs, and what QWENVL_ISA asks for.

One library is built per instruction set from the sources in ``qwenvl/csrc`` (the common files plus the
ISA's own), with that ISA's compiler flags and no ``-march=native``: a library never holds an
instruction the ISA does not name, so forcing a lower ISA on a bigger CPU runs exactly what a smaller
CPU would run. To add an ISA (an int8 file, say): write its source under ``qwenvl/csrc``,
add an ``Isa`` to ``ISAS`` (in order of preference, lowest first) with the CPU flags it needs.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
from dataclasses import dataclass

from ..errors import QwenVLError

ENV = "QWENVL_ISA"
# Sources every library compiles (paths under qwenvl/csrc); each ISA adds its own.
COMMON_SOURCES = (
    "common.cpp",
    "api.cpp",
    "attention.cpp",
    "layers.cpp",
    "decoder.cpp",
    "q8.cpp",
    "x86/q8_avx2.cpp",
    "x86/q8_gemv_avx2.cpp",
)
X86 = ("x86_64", "amd64", "i686", "i386")
ARM64 = ("aarch64", "arm64")
_AVX2 = ("-mavx2", "-mfma", "-mf16c")
_AVX512 = (*_AVX2, "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq")
_AVX512_BF16 = ("-mavx512bf16", "-mavx512vbmi2")
# NEON: base ARMv8-A (Advanced SIMD is part of it); the products and sums of the exact kernels are never
# fused, so they are the scalar path's bits. A CPU with the dot-product / fp16-arithmetic extensions
# (Linux's asimddp, asimdhp + fphp) gets them in the -march (later -march flags replace earlier ones).
_NEON = ("-march=armv8-a", "-ffp-contract=off")
_FP16 = frozenset({"asimdhp", "fphp"})
_NEON_EXTENSIONS = (
    (_FP16, ("-march=armv8.2-a+fp16",)),
    (frozenset({"asimddp"}), ("-march=armv8.2-a+dotprod",)),
    (_FP16 | {"asimddp"}, ("-march=armv8.2-a+dotprod+fp16",)),
)


@dataclass(frozen=True)
class Isa:
    """How to build one library, and where it runs."""

    name: str
    description: str
    machines: tuple[str, ...]  # platform.machine() values (lower case) it can run on; () = any
    cpu_flags: frozenset[str]  # /proc/cpuinfo flags the CPU needs
    flags: tuple[str, ...]  # compiler flags beyond the common ones
    sources: tuple[str, ...]  # its files under qwenvl/csrc, besides COMMON_SOURCES
    # flags added when the CPU has these flags too (e.g. AVX512-BF16 on an AVX-512 CPU)
    optional: tuple[tuple[frozenset[str], tuple[str, ...]], ...] = ()
    needs_tile_grant: bool = False  # AMX: Linux must also grant the tile state to the process

    def build_flags(self, cpu_flags: frozenset[str]) -> tuple[str, ...]:
        """The ISA's compiler flags for a CPU with these flags."""
        extra = [flag for needed, flags in self.optional if needed <= cpu_flags for flag in flags]
        return (*self.flags, *extra)

    def all_sources(self) -> tuple[str, ...]:
        return (*COMMON_SOURCES, *self.sources)


# In order of preference, lowest first: `auto` takes the last one the CPU runs.
ISAS: dict[str, Isa] = {
    isa.name: isa
    for isa in (
        Isa(
            "scalar",
            "portable C++ (the reference)",
            (),
            frozenset(),
            ("-ffp-contract=off",),  # the reference sums are the same bits on every machine
            ("scalar.cpp",),
        ),
        Isa(
            "avx2",
            "AVX2 + FMA + F16C",
            X86,
            frozenset({"avx2", "fma", "f16c"}),
            _AVX2,
            ("x86/avx2.cpp",),
        ),
        Isa(
            "avx512",
            "AVX-512 F/BW/VL/DQ (+ AVX512-BF16 bf16 dot products where the CPU has them)",
            X86,
            frozenset({"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq"}),
            _AVX512,
            ("x86/avx512.cpp",),
            optional=((frozenset({"avx512_bf16", "avx512_vbmi2"}), _AVX512_BF16),),
        ),
        Isa(
            "amx",
            "AMX tiles for batched bf16 rows, on the AVX-512 + AVX512-BF16 path",
            X86,
            frozenset(
                {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16", "avx512_vbmi2"}
                | {"amx_tile", "amx_bf16"}
            ),
            (*_AVX512, *_AVX512_BF16, "-mamx-tile", "-mamx-bf16"),
            ("x86/avx512.cpp", "x86/amx.cpp"),
            needs_tile_grant=True,
        ),
        Isa(
            "neon",
            "AArch64 NEON (bit for bit the scalar path; + dot-product / fp16 flags where the CPU has them)",
            ARM64,
            frozenset({"asimd"}),
            _NEON,
            ("arm/neon.cpp",),
            optional=_NEON_EXTENSIONS,
        ),
    )
}
CHOICES = ("auto", *ISAS)


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (/proc/cpuinfo: "flags" on x86, "Features" on ARM); empty where unknown."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def machine() -> str:
    return platform.machine().lower()


@functools.cache
def tile_state_granted() -> bool:
    """Whether Linux grants this process the AMX tile state (asked once, as the library would)."""
    if not os.path.exists("/proc/cpuinfo") or machine() not in X86[:2]:
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        # syscall(SYS_arch_prctl = 158, ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18)
        return libc.syscall(ctypes.c_long(158), ctypes.c_long(0x1023), ctypes.c_long(18)) == 0
    except (OSError, AttributeError):
        return False


def runs_here(isa: Isa) -> bool:
    """Whether this CPU (and OS) can execute the ISA's library."""
    if isa.machines and machine() not in isa.machines:
        return False
    if not isa.cpu_flags <= cpu_flags():
        return False
    return not isa.needs_tile_grant or tile_state_granted()


def runnable() -> list[str]:
    """The ISAs this machine runs, lowest first (always at least "scalar")."""
    return [name for name, isa in ISAS.items() if runs_here(isa)]


def best() -> str:
    """What ``auto`` picks: the highest ISA the machine runs (AMX left out under QWENVL_AMX=0)."""
    names = [name for name in runnable() if not (name == "amx" and os.environ.get("QWENVL_AMX", "1") == "0")]
    return names[-1]


class IsaError(QwenVLError):
    """QWENVL_ISA names an ISA that does not exist or that this CPU cannot run."""


def check(name: str) -> str:
    """``name`` (an ISA or "auto") as the ISA to use here; IsaError (one line) if the CPU lacks it."""
    if name == "auto":
        return best()
    if name not in ISAS:
        raise IsaError(f"{ENV}={name}: unknown instruction set; choose one of {', '.join(CHOICES)}")
    if not runs_here(ISAS[name]):
        lacking = sorted(ISAS[name].cpu_flags - cpu_flags())
        why = f"lacks {', '.join(lacking)}" if lacking else "cannot run it"
        if ISAS[name].machines and machine() not in ISAS[name].machines:
            why = f"is {machine()} ({name} is for {', '.join(ISAS[name].machines)})"
        if not lacking and ISAS[name].needs_tile_grant:
            why = "has AMX but the kernel does not grant the tile state"
        raise IsaError(f"{ENV}={name}: this CPU {why}; it runs {', '.join(runnable())} (or auto)")
    return name


def requested() -> str:
    """The ISA QWENVL_ISA asks for (default auto: the best this CPU runs); IsaError if it cannot be had."""
    return check(os.environ.get(ENV, "auto").strip().lower() or "auto")
