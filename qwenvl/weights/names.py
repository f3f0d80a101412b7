"""The single HF ↔ GGUF tensor-name table of the project.

HF names are the keys of the published safetensors checkpoints: the decoder under ``model.`` plus
``lm_head``; the Qwen2-VL / Qwen2.5-VL vision tower under ``visual.``. GGUF names are llama.cpp's
(``gguf.constants.TENSOR_NAMES``, as ``convert_hf_to_gguf.py`` writes them). In a row, ``{N}`` stands
for a block index; the ``.weight`` / ``.bias`` suffix is carried over unchanged.

The GGUF converter stores qwen2 q/k projections as they are (no permutation), so a name is all that
changes for the text model. The vision tables only hold plain renames: llama.cpp's converter also
splits ``visual.blocks.N.attn.qkv`` into ``v.blk.N.attn_{q,k,v}`` (thirds along the output rows)
and the Conv3d ``visual.patch_embed.proj.weight`` into two Conv2d kernels ``v.patch_embd.weight``
and ``v.patch_embd.weight.1`` (temporal slices 0 and 1): those are not renames and are not listed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

SUFFIXES = (".weight", ".bias")

# (HF stem, GGUF stem)
TEXT_ROWS: tuple[tuple[str, str], ...] = (
    ("model.embed_tokens", "token_embd"),
    ("model.norm", "output_norm"),
    ("lm_head", "output"),
    ("model.layers.{N}.input_layernorm", "blk.{N}.attn_norm"),
    ("model.layers.{N}.self_attn.q_proj", "blk.{N}.attn_q"),
    ("model.layers.{N}.self_attn.k_proj", "blk.{N}.attn_k"),
    ("model.layers.{N}.self_attn.v_proj", "blk.{N}.attn_v"),
    ("model.layers.{N}.self_attn.o_proj", "blk.{N}.attn_output"),
    ("model.layers.{N}.post_attention_layernorm", "blk.{N}.ffn_norm"),
    ("model.layers.{N}.mlp.gate_proj", "blk.{N}.ffn_gate"),
    ("model.layers.{N}.mlp.up_proj", "blk.{N}.ffn_up"),
    ("model.layers.{N}.mlp.down_proj", "blk.{N}.ffn_down"),
)

# The vision tower and merger, as llama.cpp's mmproj files name them.
_VISION_COMMON_ROWS: tuple[tuple[str, str], ...] = (
    ("visual.blocks.{N}.norm1", "v.blk.{N}.ln1"),
    ("visual.blocks.{N}.norm2", "v.blk.{N}.ln2"),
    ("visual.blocks.{N}.attn.proj", "v.blk.{N}.attn_out"),
    ("visual.merger.ln_q", "v.post_ln"),
    ("visual.merger.mlp.0", "mm.0"),
    ("visual.merger.mlp.2", "mm.2"),
)
QWEN2_VL_VISION_ROWS = _VISION_COMMON_ROWS + (
    ("visual.blocks.{N}.mlp.fc1", "v.blk.{N}.ffn_up"),
    ("visual.blocks.{N}.mlp.fc2", "v.blk.{N}.ffn_down"),
)
QWEN2_5_VL_VISION_ROWS = _VISION_COMMON_ROWS + (
    ("visual.blocks.{N}.mlp.gate_proj", "v.blk.{N}.ffn_gate"),
    ("visual.blocks.{N}.mlp.up_proj", "v.blk.{N}.ffn_up"),
    ("visual.blocks.{N}.mlp.down_proj", "v.blk.{N}.ffn_down"),
)


def _stem_regex(stem: str) -> re.Pattern[str]:
    body = re.escape(stem).replace(re.escape("{N}"), r"(?P<N>\d+)")
    return re.compile(body + r"(?P<suffix>\.weight|\.bias)")


@dataclass(frozen=True)
class NameTable:
    """A two-way rename table built from (HF stem, GGUF stem) rows."""

    rows: tuple[tuple[str, str], ...]
    _hf: list[tuple[re.Pattern[str], str]] = field(init=False, repr=False, compare=False)
    _gguf: list[tuple[re.Pattern[str], str]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hf", [(_stem_regex(hf), gg) for hf, gg in self.rows])
        object.__setattr__(self, "_gguf", [(_stem_regex(gg), hf) for hf, gg in self.rows])

    @staticmethod
    def _translate(name: str, patterns: list[tuple[re.Pattern[str], str]], kind: str) -> str:
        for pattern, target in patterns:
            match = pattern.fullmatch(name)
            if match:
                stem = target.replace("{N}", match["N"]) if "{N}" in target else target
                return stem + match["suffix"]
        raise KeyError(f"unknown {kind} tensor name {name!r}")

    def to_gguf(self, hf_name: str) -> str:
        return self._translate(hf_name, self._hf, "HF")

    def to_hf(self, gguf_name: str) -> str:
        return self._translate(gguf_name, self._gguf, "GGUF")


TEXT = NameTable(TEXT_ROWS)
QWEN2_VL_VISION = NameTable(QWEN2_VL_VISION_ROWS)
QWEN2_5_VL_VISION = NameTable(QWEN2_5_VL_VISION_ROWS)


def gguf_to_hf_name(name: str, table: NameTable = TEXT) -> str:
    """``blk.3.attn_q.bias`` → ``model.layers.3.self_attn.q_proj.bias``; KeyError if not in the table."""
    return table.to_hf(name)


def hf_to_gguf_name(name: str, table: NameTable = TEXT) -> str:
    """``model.layers.3.self_attn.q_proj.bias`` → ``blk.3.attn_q.bias``; KeyError if not in the table."""
    return table.to_gguf(name)


__all__ = [
    "NameTable",
    "TEXT",
    "QWEN2_VL_VISION",
    "QWEN2_5_VL_VISION",
    "gguf_to_hf_name",
    "hf_to_gguf_name",
]
