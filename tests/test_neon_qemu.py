"""The NEON path (qwenvl/csrc/arm/neon.cpp) on an x86 machine: the scalar and NEON libraries and the C++
driver (tests/csrc/kernel_driver.cpp) cross-compiled with Debian's g++-aarch64-linux-gnu, the driver run
under qemu-user. It checks every format's dequantization and GEMV (1-16 rows, fp32/bf16 x and y, odd
strides, K not a multiple of 32 for the float formats) bit for bit against the scalar reference.

Skipped, with the packages to install, where the cross compiler or qemu is missing (.ci/run installs
them). On an AArch64 machine the NEON library is one of those tests/test_native_driver.py runs natively.
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from pathlib import Path

import pytest
from test_native_driver import DRIVER, compile_program, run_driver

from qwenvl.ops import build, isa

CROSS = "aarch64-linux-gnu-g++"
QEMU = "qemu-aarch64"
SYSROOT = Path("/usr/aarch64-linux-gnu")  # the cross toolchain's libc, libstdc++ and libgomp
RUNNER = [QEMU, "-L", str(SYSROOT)]
# /proc/cpuinfo "Features" of an ARMv8.0 core (NEON only) and of one with the dot-product and fp16 extensions
BASE_CPU = frozenset({"fp", "asimd", "evtstrm", "cpuid"})
EXTENDED_CPU = BASE_CPU | {"fphp", "asimdhp", "asimddp", "asimdrdm", "atomics"}

needs_qemu = pytest.mark.skipif(
    shutil.which(CROSS) is None or shutil.which(QEMU) is None or not SYSROOT.is_dir(),
    reason="the NEON driver needs g++-aarch64-linux-gnu and qemu-user (apt-get install g++-aarch64-linux-gnu "
    "qemu-user)",
)


def summaries(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.endswith("failures")]


@needs_qemu
def test_neon_is_bit_for_bit_the_scalar_reference_under_qemu(tmp_path) -> None:
    """Both NEON builds (ARMv8.0, and ARMv8.2 with dot products and fp16) against the scalar library, in one
    qemu run with a NEON build whose products are fused into the sums (-ffp-contract=fast): that one is
    within the error bound but not the reference's bits, and the driver must say so."""
    driver = compile_program(CROSS, DRIVER, tmp_path / "kernel_driver")
    scalar = build.build_library(isa.ISAS["scalar"], cxx=CROSS, cpu=BASE_CPU)
    neon = [build.build_library(isa.ISAS["neon"], cxx=CROSS, cpu=cpu) for cpu in (BASE_CPU, EXTENDED_CPU)]
    assert len(set(neon)) == 2  # two builds: the flags differ
    fused = dataclasses.replace(isa.ISAS["neon"], flags=(*isa.ISAS["neon"].flags, "-ffp-contract=fast"))
    wrong = build.build_library(fused, cxx=CROSS, cpu=BASE_CPU)
    result = run_driver(driver, [scalar, *neon, wrong], runner=RUNNER)
    lines = summaries(result.stdout)  # the reference checked against the double products first
    assert [line.split(":")[0] for line in lines] == ["scalar", "neon", "neon", "neon"], result.stderr
    assert all(int(line.split()[1]) > 10_000 for line in lines), lines
    assert all(line.endswith(" 0 failures") for line in lines[:3]), result.stdout
    # the fused build: the bit-for-bit check fails (only that library prints FAIL lines), the bound holds
    assert not lines[3].endswith(" 0 failures") and result.returncode == 1
    failures = [line for line in result.stdout.splitlines() if line.startswith("FAIL")]
    assert failures and all(line.endswith(": not bit for bit the reference's") for line in failures), failures
    # what each build names as its extensions (qk_extensions, shown by `qwenvl info`)
    assert [extensions(driver.parent, library) for library in neon] == ["", "dotprod fp16"]


EXTENSIONS = """#include <dlfcn.h>
#include <stdio.h>
int main(int argc, char** argv) {
  void* lib = dlopen(argv[1], RTLD_NOW);
  if (!lib) return 2;
  printf("[%s]", ((const char* (*)(void))dlsym(lib, "qk_extensions"))());
  return 0;
}
"""


def extensions(folder: Path, library: Path) -> str:
    """qk_extensions() of an AArch64 library, under qemu."""
    program = folder / "extensions"
    if not program.exists():
        compile_program(CROSS, EXTENSIONS, program)
    printed = subprocess.run([*RUNNER, str(program), str(library)], capture_output=True, text=True, check=True)
    return printed.stdout.removeprefix("[").removesuffix("]")


def test_auto_picks_neon_on_an_arm_cpu(monkeypatch) -> None:
    monkeypatch.setattr(isa, "machine", lambda: "aarch64")
    monkeypatch.setattr(isa, "cpu_flags", lambda: EXTENDED_CPU)
    assert isa.runnable() == ["scalar", "neon"]
    assert isa.check("auto") == "neon"
    with pytest.raises(isa.IsaError, match=r"avx2: this CPU is aarch64 \(avx2 is for x86_64, .*it runs scalar, neon"):
        isa.check("avx2")
    monkeypatch.setattr(isa, "cpu_flags", lambda: frozenset({"fp"}))  # no Advanced SIMD: scalar
    assert isa.check("auto") == "scalar"
    with pytest.raises(isa.IsaError, match="QWENVL_ISA=neon: this CPU lacks asimd"):
        isa.check("neon")


def test_neon_is_not_offered_on_x86(monkeypatch) -> None:
    monkeypatch.setattr(isa, "machine", lambda: "x86_64")
    monkeypatch.setattr(isa, "cpu_flags", lambda: frozenset({"asimd", "avx2", "fma", "f16c"}))
    assert "neon" not in isa.runnable()
    with pytest.raises(isa.IsaError, match=r"^QWENVL_ISA=neon: this CPU is x86_64 \(neon is for aarch64, arm64\)"):
        isa.check("neon")


@pytest.mark.parametrize(
    ("features", "march"),
    [
        (BASE_CPU, "-march=armv8-a"),
        (BASE_CPU | {"asimddp"}, "-march=armv8.2-a+dotprod"),
        (BASE_CPU | {"fphp", "asimdhp"}, "-march=armv8.2-a+fp16"),
        (EXTENDED_CPU, "-march=armv8.2-a+dotprod+fp16"),
    ],
)
def test_neon_flags_follow_the_cpu_features(features, march) -> None:
    """The last -march is the one the compiler uses; exact sums are never fused."""
    flags = isa.ISAS["neon"].build_flags(features)
    assert [f for f in flags if f.startswith("-march=")][-1] == march
    assert "-ffp-contract=off" in flags
