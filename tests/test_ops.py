"""qwenvl.ops, the one layer that chooses: QWENVL_ISA and its errors, the fallbacks (no kernels, a
failed build), what ``qwenvl info`` reports, and the build cache's key."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from gguf_fixtures import write_tiny_gguf

from qwenvl import ops
from qwenvl.cli import main as cli_main
from qwenvl.ops import build, isa, native


@pytest.fixture
def choose(monkeypatch):
    """choose(**env) sets QWENVL_* variables and makes the next op choose anew (undone after the test)."""

    def set_env(**env: str) -> None:
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        ops.kernels.cache_clear()

    yield set_env
    ops.kernels.cache_clear()


def test_auto_is_the_best_isa_this_cpu_runs(choose) -> None:
    choose(QWENVL_ISA="auto")
    runs = isa.runnable()
    assert runs[0] == "scalar" and runs == [name for name in isa.ISAS if name in runs]
    assert isa.best() == runs[-1] or (runs[-1] == "amx" and isa.best() == "avx512")
    assert ops.path() == isa.best()


def test_an_unknown_isa_is_a_one_line_error(choose) -> None:
    choose(QWENVL_ISA="sse9")
    with pytest.raises(isa.IsaError) as error:
        ops.kernels()
    message = str(error.value)
    assert "\n" not in message and "QWENVL_ISA=sse9" in message and "scalar, avx2, avx512, amx" in message


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("ops") / "tiny.gguf"
    write_tiny_gguf(path, hidden=64, ffn=128)
    return path


def test_an_isa_the_cpu_lacks_is_a_one_line_error_naming_what_it_runs(choose, capsys, tiny_gguf) -> None:
    lacking = [name for name in isa.ISAS if name not in isa.runnable()]
    if not lacking:
        pytest.skip("this CPU runs every ISA")
    choose(QWENVL_ISA=lacking[-1])
    with pytest.raises(isa.IsaError, match=f"runs {', '.join(isa.runnable())}"):
        ops.kernels()
    assert cli_main(["info", str(tiny_gguf)]) == 2  # the CLI: exit 2, one line
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"QWENVL_ISA={lacking[-1]}" in err


def test_without_kernels_every_op_is_torch(choose) -> None:
    choose(QWENVL_KERNELS="0")
    assert ops.kernels() is None and ops.path() == "torch" and ops.describe()["isa"] == "torch"
    x, delta, weight = torch.randn(3, 20), torch.randn(3, 20), torch.rand(20)
    h, normed = ops.add_rms_norm(x, delta, weight, 1e-6)
    assert torch.equal(h, x + delta) and torch.equal(normed, F.rms_norm(x + delta, (20,), weight, 1e-6))
    gate_up = torch.randn(3, 40)
    assert torch.equal(ops.swiglu(gate_up), F.silu(gate_up[:, :20]) * gate_up[:, 20:])
    assert ops.decode_attention([torch.zeros(1, 1, 4, 8)], [torch.zeros(1, 1, 4, 8)], [0], torch.float32) is None


def test_a_failed_build_warns_once_and_falls_back_to_torch(choose, monkeypatch, tmp_path) -> None:
    failing = tmp_path / "c++"
    failing.write_text("#!/bin/sh\necho 'c++: fatal error: no space left on device' >&2\nexit 1\n")
    failing.chmod(0o755)
    monkeypatch.setenv("CXX", str(failing))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    native.load.cache_clear()
    try:
        choose(QWENVL_ISA="scalar")
        with pytest.warns(UserWarning, match="no space left on device.*falling back to torch") as warned:
            assert ops.kernels() is None
        assert len(warned) == 1
        assert ops.path() == "torch"  # chosen once: no second warning
    finally:
        native.load.cache_clear()


def test_info_names_the_path(choose, capsys, tiny_gguf) -> None:
    choose(QWENVL_ISA="scalar")
    assert cli_main(["info", str(tiny_gguf), "--json"]) == 0
    kernels = json.loads(capsys.readouterr().out)["kernels"]
    assert kernels == {
        "isa": "scalar",
        "extensions": [],
        "amx_tiles": False,
        "cpu_runs": isa.runnable(),
        "requested": "scalar",
        "quantized_activations": "--kernel q8 (prompts and decoding)",
    }
    assert cli_main(["info", str(tiny_gguf)]) == 0
    text = capsys.readouterr().out
    assert "kernels         scalar (this CPU runs scalar" in text
    assert "activations     exact (fp32/bf16) by default; --kernel q8 quantizes activations" in text


def test_the_cache_key_holds_sources_compiler_flags_and_cpu() -> None:
    scalar = isa.ISAS["scalar"]
    flags = build.compile_flags(scalar, frozenset())
    key = build.build_key(scalar, "c++", flags, frozenset({"avx2"}))
    assert key == build.build_key(scalar, "c++", flags, frozenset({"avx2"}))
    assert key != build.build_key(scalar, "c++", flags, frozenset({"avx2", "avx512f"}))  # another CPU
    assert key != build.build_key(scalar, "c++", [*flags, "-O2"], frozenset({"avx2"}))
    assert key != build.build_key(isa.ISAS["avx2"], "c++", flags, frozenset({"avx2"}))


def test_the_cache_key_follows_the_isa_s_sources_and_every_header(monkeypatch, tmp_path) -> None:
    """Editing a header rebuilds every ISA; editing one ISA's source file rebuilds that ISA only."""
    copy = tmp_path / "csrc"
    for path in build.source_files():
        (copy / path.relative_to(build.CSRC)).parent.mkdir(parents=True, exist_ok=True)
        (copy / path.relative_to(build.CSRC)).write_bytes(path.read_bytes())
    monkeypatch.setattr(build, "CSRC", copy)
    scalar, avx512 = isa.ISAS["scalar"], isa.ISAS["avx512"]

    def keys() -> tuple[str, str]:
        return tuple(
            build.build_key(i, "c++", build.compile_flags(i, frozenset()), frozenset()) for i in (scalar, avx512)
        )

    before = keys()
    (copy / "x86" / "avx512.cpp").write_text((copy / "x86" / "avx512.cpp").read_text() + "\n// edited\n")
    after_source = keys()
    assert after_source[0] == before[0] and after_source[1] != before[1]
    (copy / "common.h").write_text((copy / "common.h").read_text() + "\n// edited\n")
    after_header = keys()
    assert after_header[0] != after_source[0] and after_header[1] != after_source[1]
    avx512 = isa.ISAS["avx512"]
    assert "-mavx512bf16" in avx512.build_flags(avx512.cpu_flags | {"avx512_bf16", "avx512_vbmi2"})
    assert "-mavx512bf16" not in avx512.build_flags(avx512.cpu_flags)
    assert all("-march=native" not in i.build_flags(i.cpu_flags) for i in isa.ISAS.values())
