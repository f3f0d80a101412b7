"""What a loaded model holds in memory (docs/engine.md, "Memory"): the GGUF's blocks are views of its
file mapping, loading imports nothing it does not use, and large freed tensors go back to the system."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from gguf.constants import GGMLQuantizationType as Q
from gguf_fixtures import write_tiny_gguf

import qwenvl
from qwenvl.quant.linear import BlockQuantLinear, QuantEmbedding


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    """Block formats throughout (gate and up of one format lie back to back, as llama.cpp writes them)."""

    def types(name: str) -> Q:
        return Q.F32 if name.endswith(("norm.weight", ".bias")) else Q.Q8_0

    path = tmp_path_factory.mktemp("memory") / "tiny.gguf"
    write_tiny_gguf(path, tied=False, types=types)
    return path


def _file_mappings(path: Path) -> list[tuple[int, int]]:
    """The address ranges where this process maps ``path`` (from /proc/self/maps)."""
    ranges = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) >= 6 and fields[5] == str(path):
                start, stop = (int(part, 16) for part in fields[0].split("-"))
                ranges.append((start, stop))
    return ranges


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc/self/maps (Linux)")
def test_gguf_blocks_are_views_of_the_file_mapping(tiny_gguf):
    model = qwenvl.load(tiny_gguf, dtype="float32")
    text = model.text_model
    ranges = _file_mappings(tiny_gguf.resolve())
    assert ranges, "the GGUF is not memory-mapped"

    def mapped(tensor: torch.Tensor) -> bool:
        start, stop = tensor.data_ptr(), tensor.data_ptr() + tensor.numel() * tensor.element_size()
        return any(low <= start and stop <= high for low, high in ranges)

    layer = text.layers[0]
    views = {
        "embed_tokens": text.embed_tokens,
        "lm_head": text.lm_head,
        "o_proj": layer.self_attn.o_proj,
        "gate_up_proj": layer.mlp.gate_up_proj,  # gate and up lie back to back in the file: one view
        "down_proj": layer.mlp.down_proj,
    }
    for name, module in views.items():
        assert isinstance(module, BlockQuantLinear | QuantEmbedding), name
        assert mapped(module.blocks), f"{name}: its blocks were copied out of the file mapping"


def test_loading_imports_neither_sympy_nor_pyav(tiny_gguf):
    """Random init on the meta device pulls in sympy (~60 MB); PyAV maps FFmpeg (~19 MB): a text
    model that runs a prompt needs neither."""
    script = (
        "import sys, qwenvl\n"
        f"model = qwenvl.load({str(tiny_gguf)!r}, dtype='float32')\n"
        "generation = model.generate([5, 17, 3, 40], temperature=0, max_tokens=3, ignore_eos=True)\n"
        "for _ in generation: pass\n"
        "print(sorted(m for m in ('sympy', 'mpmath', 'av') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"
