"""The native libraries at the C level: the C++ driver (tests/csrc/kernel_driver.cpp) checks every ISA
library this machine runs against the scalar reference, through the C ABI; the ctypes mirrors match
the header; every ISA compiles, the ones this CPU cannot run included; the sources ship in the package.

The driver loads the libraries with dlopen and includes only qk_abi.h, so a cross-compiled driver runs
under qemu-user with another architecture's libraries: ``run_driver(cxx, libraries, runner=[...])``.
"""

from __future__ import annotations

import ctypes
import fnmatch
import os
import subprocess
import tomllib
from pathlib import Path

import pytest

from qwenvl.ops import abi, build, isa

DRIVER = Path(__file__).parent / "csrc" / "kernel_driver.cpp"
ROOT = Path(__file__).parent.parent
CXX = build.compiler()
needs_compiler = pytest.mark.skipif(CXX is None, reason="no C++ compiler")


def compile_program(cxx: str, source: Path | str, out: Path, *flags: str) -> Path:
    """A program built from ``source`` (a path, or C++ text) with qwenvl/csrc on the include path."""
    if isinstance(source, str):
        text, source = source, out.with_suffix(".cpp")
        source.write_text(text)
    result = subprocess.run(
        [cxx, "-O2", "-std=c++17", f"-I{build.CSRC}", str(source), "-o", str(out), *flags, "-ldl"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def run_driver(driver: Path, libraries: list[Path], runner: list[str] = ()) -> subprocess.CompletedProcess:
    """The driver on the reference (the first library) and the others; ``runner`` (e.g. qemu-aarch64 -L
    /usr/aarch64-linux-gnu) runs a cross-compiled driver."""
    env = {**os.environ, "OMP_WAIT_POLICY": "passive"}  # idle OpenMP threads sleep instead of spinning
    return subprocess.run([*runner, str(driver), *map(str, libraries)], capture_output=True, text=True, env=env)


@pytest.fixture(scope="module")
def driver(tmp_path_factory) -> Path:
    return compile_program(CXX, DRIVER, tmp_path_factory.mktemp("driver") / "kernel_driver")


@needs_compiler
def test_every_isa_this_cpu_runs_matches_the_scalar_reference(driver) -> None:
    names = isa.runnable()
    libraries = [build.build_library(isa.ISAS[name]) for name in names]
    result = run_driver(driver, [libraries[0], *libraries])
    assert result.returncode == 0, result.stdout + result.stderr
    summaries = [line for line in result.stdout.splitlines() if line.endswith("failures")]
    assert [line.split(":")[0] for line in summaries] == [names[0], *names]
    assert all(line.endswith(" 0 failures") and int(line.split()[1]) > 10_000 for line in summaries), summaries


@needs_compiler
def test_the_driver_catches_a_wrong_library(driver, tmp_path) -> None:
    """A library whose Q8_0 weights are off by one code: the driver must say so (and fail)."""
    scalar = build.build_library(isa.ISAS["scalar"])
    wrong = tmp_path / "csrc"
    wrong.mkdir()
    for path in build.source_files():
        target = wrong / path.relative_to(build.CSRC)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(path.read_text())
    formats = wrong / "formats.h"
    text = formats.read_text()
    assert "(float)(int8_t)b[2 + i] * s->s0[0]" in text
    formats.write_text(text.replace("(float)(int8_t)b[2 + i] * s->s0[0]", "(float)((int8_t)b[2 + i] + 1) * s->s0[0]"))
    objects = []
    for source in isa.ISAS["scalar"].all_sources():
        obj = tmp_path / (source.replace("/", "_") + ".o")
        flags = [*build.compile_flags(isa.ISAS["scalar"], frozenset()), f"-I{wrong}"]
        flags = [f for f in flags if f != f"-I{build.CSRC}"]
        subprocess.run([CXX, *flags, "-c", str(wrong / source), "-o", str(obj)], check=True, capture_output=True)
        objects.append(str(obj))
    library = tmp_path / "libwrong.so"
    subprocess.run([CXX, "-shared", "-fopenmp", *objects, "-o", str(library)], check=True, capture_output=True)
    result = run_driver(driver, [scalar, library])
    assert result.returncode == 1
    assert "FAIL scalar: Q8_0 dequant fp32 differs" in result.stdout


@needs_compiler
def test_ctypes_mirrors_match_the_header(tmp_path) -> None:
    """Every ctypes struct of qwenvl/ops/abi.py has the header's size and field offsets."""
    lines = ["#include <stddef.h>", "#include <stdio.h>", '#include "qk_abi.h"', "int main(void) {"]
    for struct in abi.STRUCTS:
        lines.append(f'  printf("{struct.__name__} %zu\\n", sizeof({struct.__name__}));')
        for name, _ in struct._fields_:
            lines.append(f'  printf("{struct.__name__}.{name} %zu\\n", offsetof({struct.__name__}, {name}));')
    lines += ["  return 0;", "}"]
    program = compile_program(CXX, "\n".join(lines), tmp_path / "layout")
    printed = dict(
        line.split() for line in subprocess.run([program], capture_output=True, text=True).stdout.splitlines()
    )
    expected = {}
    for struct in abi.STRUCTS:
        expected[struct.__name__] = str(ctypes.sizeof(struct))
        for name, _ in struct._fields_:
            expected[f"{struct.__name__}.{name}"] = str(getattr(struct, name).offset)
    assert printed == expected
    header = (build.CSRC / "qk_abi.h").read_text()
    assert f"#define QK_ABI_VERSION {abi.ABI_VERSION}" in header
    assert all(f"QK_API int {name}(const {struct.__name__}* call);" in header for name, struct in abi.CALLS.items())


@needs_compiler
@pytest.mark.parametrize("name", [n for n in isa.ISAS if n not in isa.runnable()] or [None])
def test_isas_this_cpu_cannot_run_still_compile(name, tmp_path) -> None:
    """The libraries of the other CPUs (AMX here, or AVX-512 on an AVX2 machine) build with this compiler,
    so a source change cannot break them unseen; they are not loaded. Built at -O1 (the same sources,
    instruction-set flags and errors, a third of -O3's compile time: nothing runs them here)."""
    if name is None:
        pytest.skip("this CPU runs every ISA: each is built and tested by the other tests")
    target = isa.ISAS[name]
    cpu = target.cpu_flags.union(*(needed for needed, _ in target.optional))
    if target.machines and isa.machine() not in target.machines:
        pytest.skip(f"{name} is for {', '.join(target.machines)}, and this compiler targets {isa.machine()}")
    flags = ["-O1" if flag == "-O3" else flag for flag in build.compile_flags(target, cpu)]
    assert "-O1" in flags
    library = tmp_path / build.library_name(target)
    build._build(build.compiler(), flags, target.all_sources(), library)
    assert library.stat().st_size > 0


def test_sources_ship_in_the_wheel_and_the_sdist() -> None:
    """Every file under qwenvl/csrc matches the package data (the wheel) and MANIFEST.in (the sdist)."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["qwenvl"]
    manifest = (ROOT / "MANIFEST.in").read_text()
    assert "recursive-include qwenvl/csrc *.h *.cpp" in manifest
    for path in build.source_files():
        relative = path.relative_to(build.CSRC.parent).as_posix()
        assert any(fnmatch.fnmatchcase(relative, p) and p.count("/") == relative.count("/") for p in patterns), relative
    sources = {s for name in isa.ISAS for s in isa.ISAS[name].all_sources()}
    assert all((build.CSRC / s).is_file() for s in sources)
