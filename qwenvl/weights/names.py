"""HF ↔ GGUF tensor-name tables: ``NameTable`` (the decoders' tables are built from weights/layout.py)
and the vision tower's.

HF names are the keys of the published safetensors checkpoints: the Qwen2-VL / Qwen2.5-VL vision tower
under ``visual.``. GGUF names are llama.cpp's (``gguf.constants.TENSOR_NAMES``, as
``convert_hf_to_gguf.py`` writes them). In a row, ``{N}`` stands for a block index; the ``.weight`` /
``.bias`` suffix is carried over unchanged.

The vision tables only hold plain renames: llama.cpp's converter also
splits ``visual.blocks.N.attn.qkv`` into ``v.blk.N.attn_{q,k,v}`` (thirds along the output rows)
and the Conv3d ``visual.patch_embed.proj.weight`` into two Conv2d kernels ``v.patch_embd.weight``
and ``v.patch_embd.weight.1`` (temporal slices 0 and 1): ``VisionTensor`` below describes those
(``vision_layout_from_hf`` / ``vision_layout_from_gguf``, ``split_vision`` / ``join_vision``).

mmproj files written by llama.cpp's older ``qwen2_vl_surgery.py`` name the vision MLP the other
way round (LLaVA's convention): the first layer (``fc1`` / ``up_proj``) is ``ffn_down`` and the
second (``fc2`` / ``down_proj``) is ``ffn_up``; the ``*_LEGACY`` tables read them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

SUFFIXES = (".weight", ".bias")

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
QWEN2_VL_VISION_LEGACY_ROWS = _VISION_COMMON_ROWS + (
    ("visual.blocks.{N}.mlp.fc1", "v.blk.{N}.ffn_down"),
    ("visual.blocks.{N}.mlp.fc2", "v.blk.{N}.ffn_up"),
)
QWEN2_5_VL_VISION_LEGACY_ROWS = _VISION_COMMON_ROWS + (
    ("visual.blocks.{N}.mlp.gate_proj", "v.blk.{N}.ffn_gate"),
    ("visual.blocks.{N}.mlp.up_proj", "v.blk.{N}.ffn_down"),
    ("visual.blocks.{N}.mlp.down_proj", "v.blk.{N}.ffn_up"),
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


QWEN2_VL_VISION = NameTable(QWEN2_VL_VISION_ROWS)
QWEN2_5_VL_VISION = NameTable(QWEN2_5_VL_VISION_ROWS)
QWEN2_VL_VISION_LEGACY = NameTable(QWEN2_VL_VISION_LEGACY_ROWS)
QWEN2_5_VL_VISION_LEGACY = NameTable(QWEN2_5_VL_VISION_LEGACY_ROWS)


def vision_table(variant: str, *, legacy: bool = False) -> NameTable:
    """The vision rename table of ``variant`` ("qwen2_vl" / "qwen2_5_vl"), current or legacy layout."""
    if variant == "qwen2_vl":
        return QWEN2_VL_VISION_LEGACY if legacy else QWEN2_VL_VISION
    if variant == "qwen2_5_vl":
        return QWEN2_5_VL_VISION_LEGACY if legacy else QWEN2_5_VL_VISION
    raise KeyError(f"unknown vision variant {variant!r}")


def gguf_to_hf_name(name: str, table: NameTable) -> str:
    """``v.blk.3.ln1.bias`` → ``visual.blocks.3.norm1.bias``; KeyError if not in the table."""
    return table.to_hf(name)


def hf_to_gguf_name(name: str, table: NameTable) -> str:
    """``visual.blocks.3.norm1.bias`` → ``v.blk.3.ln1.bias``; KeyError if not in the table."""
    return table.to_gguf(name)


# ----------------------------------------------------------------------------------------------
# Vision tensors that are not plain renames

HF_PATCH_EMBED = "visual.patch_embed.proj.weight"
GGUF_PATCH_EMBED = ("v.patch_embd.weight", "v.patch_embd.weight.1")  # temporal slices 0 and 1
# A placeholder the legacy surgery script writes (zeros, unused by Qwen2-VL): skipped when reading.
GGUF_PLACEHOLDERS = ("v.position_embd.weight",)
_HF_QKV = re.compile(r"visual\.blocks\.(?P<N>\d+)\.attn\.qkv(?P<suffix>\.weight|\.bias)")
_GGUF_QKV = re.compile(r"v\.blk\.(?P<N>\d+)\.attn_(?P<part>[qkv])(?P<suffix>\.weight|\.bias)")

SAME, ROWS, TEMPORAL = "same", "rows", "temporal"


@dataclass(frozen=True)
class VisionTensor:
    """One HF vision tensor and the GGUF tensors holding it.

    ``join``: ``"same"`` (one tensor, renamed), ``"rows"`` (the fused q/k/v: its thirds along dim 0
    are attn_q, attn_k, attn_v) or ``"temporal"`` (the Conv3d kernel [embed, C, T, P, P]: each
    temporal slice is one Conv2d kernel [embed, C, P, P]).
    """

    hf_name: str
    gguf_names: tuple[str, ...]
    join: str


def vision_layout_from_hf(hf_name: str, table: NameTable) -> VisionTensor:
    """Where an HF vision tensor (``visual.…``) goes in an mmproj file; KeyError if unknown."""
    if hf_name == HF_PATCH_EMBED:
        return VisionTensor(hf_name, GGUF_PATCH_EMBED, TEMPORAL)
    match = _HF_QKV.fullmatch(hf_name)
    if match:
        parts = tuple(f"v.blk.{match['N']}.attn_{p}{match['suffix']}" for p in "qkv")
        return VisionTensor(hf_name, parts, ROWS)
    return VisionTensor(hf_name, (table.to_gguf(hf_name),), SAME)


def vision_layout_from_gguf(gguf_names: Sequence[str], table: NameTable) -> list[VisionTensor]:
    """The HF vision tensors an mmproj file holds, in file order; KeyError on a tensor no table knows.

    A split tensor appears where its first piece is; its pieces must all be present.
    """
    layouts: dict[str, VisionTensor] = {}
    for name in gguf_names:
        if name in GGUF_PLACEHOLDERS:
            continue
        match = _GGUF_QKV.fullmatch(name)
        if name in GGUF_PATCH_EMBED:
            layout = VisionTensor(HF_PATCH_EMBED, GGUF_PATCH_EMBED, TEMPORAL)
        elif match:
            layout = vision_layout_from_hf(f"visual.blocks.{match['N']}.attn.qkv{match['suffix']}", table)
        else:
            hf_name = table.to_hf(name)
            layout = VisionTensor(hf_name, (name,), SAME)
        layouts.setdefault(layout.hf_name, layout)
    present = set(gguf_names)
    for layout in layouts.values():
        missing = [name for name in layout.gguf_names if name not in present]
        if missing:
            raise KeyError(f"missing tensor {missing[0]!r} (part of {layout.hf_name})")
    return list(layouts.values())


def split_vision(tensor: torch.Tensor, join: str) -> list[torch.Tensor]:
    """An HF vision tensor as its GGUF pieces (``join`` from its VisionTensor)."""
    if join == ROWS:
        if tensor.shape[0] % 3:
            raise ValueError(f"a fused qkv tensor needs a multiple of 3 rows, got {list(tensor.shape)}")
        return [part.contiguous() for part in tensor.chunk(3, dim=0)]
    if join == TEMPORAL:
        if tensor.ndim != 5 or tensor.shape[2] != len(GGUF_PATCH_EMBED):
            raise ValueError(f"the patch embedding must be [embed, C, 2, P, P], got {list(tensor.shape)}")
        return [part.contiguous() for part in tensor.unbind(dim=2)]
    return [tensor]


def join_vision(pieces: Sequence[torch.Tensor], join: str) -> torch.Tensor:
    """Inverse of ``split_vision``."""
    if join == ROWS:
        return torch.cat(list(pieces), dim=0)
    if join == TEMPORAL:
        return torch.stack(list(pieces), dim=2)
    (tensor,) = pieces
    return tensor


__all__ = [
    "NameTable",
    "QWEN2_VL_VISION",
    "QWEN2_5_VL_VISION",
    "QWEN2_VL_VISION_LEGACY",
    "QWEN2_5_VL_VISION_LEGACY",
    "VisionTensor",
    "vision_table",
    "vision_layout_from_hf",
    "vision_layout_from_gguf",
    "split_vision",
    "join_vision",
    "gguf_to_hf_name",
    "hf_to_gguf_name",
]
