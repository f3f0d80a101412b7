"""Building a native library on first use, and its cache.

The sources ship in the package (``qwenvl/csrc``). A library for one ISA is compiled with the system
compiler (``$CXX``, else ``c++`` / ``g++`` / ``clang++``; each source file its own process, in
parallel, then linked) into ``$XDG_CACHE_HOME/qwenvl/kernels/<key>/``. The key hashes the sources,
the compiler and its version, the flags, the CPU's feature flags and the platform: a change to any of
them builds anew, and a cache written on another CPU is never loaded. A build lands under a
temporary name and is renamed into place, so concurrent builds never see half a library. (The key
takes the ISA's own source files and every header: editing one ISA's file rebuilds that ISA only.)

The libraries link ``libgomp.so.1`` (``-fopenmp``); the dynamic loader resolves that soname to the
copy torch has already loaded, so kernels and torch share one OpenMP pool.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .. import status
from .isa import Isa, cpu_flags

CSRC = Path(__file__).resolve().parent.parent / "csrc"
SOURCE_SUFFIXES = (".h", ".cpp")
COMMON_FLAGS = (
    "-O3",
    "-std=c++17",
    "-fPIC",
    "-fopenmp",
    "-fvisibility=hidden",  # only the qk_* ABI is exported
    "-fvisibility-inlines-hidden",
)
# Flags of single files, after the others: the fused decode step does torch's elementwise arithmetic,
# which rounds every product and sum (no multiply-add contracted into an FMA).
SOURCE_FLAGS: dict[str, tuple[str, ...]] = {"decoder.cpp": ("-ffp-contract=off",)}


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "qwenvl" / "kernels"


def compiler() -> str | None:
    """The C++ compiler to use ($CXX first), or None."""
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


@functools.cache
def _compiler_version(cxx: str) -> str:
    return subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout


def source_files() -> list[Path]:
    """Every header and source file under qwenvl/csrc, in a fixed order."""
    return sorted(p for p in CSRC.rglob("*") if p.suffix in SOURCE_SUFFIXES)


def library_name(isa: Isa) -> str:
    return f"libqwenvl_{isa.name}.so"


def build_key(isa: Isa, cxx: str, flags: list[str], cpu: frozenset[str]) -> str:
    """The cache key: the ISA's sources and every header, compiler, flags, CPU flags and platform."""
    digest = hashlib.sha256()
    sources = {CSRC / name for name in isa.all_sources()} | {p for p in source_files() if p.suffix == ".h"}
    for path in sorted(sources):
        digest.update(path.relative_to(CSRC).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    per_file = [f"{name}:{' '.join(extra)}" for name, extra in sorted(SOURCE_FLAGS.items())]
    parts = [isa.name, cxx, _compiler_version(cxx), *flags, *per_file, " ".join(sorted(cpu)), sys.platform]
    digest.update("\0".join(parts).encode())
    return digest.hexdigest()[:16]


def compile_flags(isa: Isa, cpu: frozenset[str]) -> list[str]:
    return [*COMMON_FLAGS, *isa.build_flags(cpu), f'-DQK_ISA_NAME="{isa.name}"', f"-I{CSRC}"]


def build_library(isa: Isa, cxx: str | None = None, cpu: frozenset[str] | None = None) -> Path:
    """The library of ``isa`` (compiled now unless cached); RuntimeError (the compiler's message) if it
    cannot be built. ``cxx`` and ``cpu`` default to the system compiler and this CPU's flags."""
    cxx = cxx or compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (install g++ or set CXX)")
    cpu = cpu_flags() if cpu is None else cpu
    flags = compile_flags(isa, cpu)
    target = cache_root() / build_key(isa, cxx, flags, cpu) / library_name(isa)
    if not target.exists():
        with status.step(f"building the native kernels for {isa.name} (once; cached in {cache_root()})"):
            _build(cxx, flags, isa.all_sources(), target)
    return target


def _build(cxx: str, flags: list[str], sources: tuple[str, ...], target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        objects = [Path(tmp) / (source.replace("/", "_").removesuffix(".cpp") + ".o") for source in sources]

        def compile_one(pair: tuple[str, Path]) -> subprocess.CompletedProcess:
            source, obj = pair
            return subprocess.run(
                [cxx, *flags, *SOURCE_FLAGS.get(source, ()), "-c", str(CSRC / source), "-o", str(obj)],
                capture_output=True,
                text=True,
            )

        with ThreadPoolExecutor(max_workers=max(1, min(len(sources), os.cpu_count() or 1))) as pool:
            results = list(pool.map(compile_one, zip(sources, objects)))
        for result in results:
            if result.returncode != 0:
                raise RuntimeError(result.stderr.strip()[-2000:] or f"{cxx} failed")
        output = Path(tmp) / target.name
        link = [
            cxx,
            *[f for f in flags if not f.startswith(("-D", "-I"))],
            "-shared",
            *map(str, objects),
            "-o",
            str(output),
        ]
        result = subprocess.run(link, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(result.stderr.strip()[-2000:] or f"{cxx} failed to link")
        os.replace(output, target)
