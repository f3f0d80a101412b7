"""Vision projector GGUF files ("mmproj", llama.cpp architecture ``clip``) of Qwen2-VL and Qwen2.5-VL.

Two layouts are read:

- llama.cpp's current converter (``convert_hf_to_gguf.py --mmproj``): ``clip.projector_type``
  ``qwen2vl_merger`` / ``qwen2.5vl_merger``, ``clip.use_silu`` for Qwen2.5-VL, its window-attention
  pattern as ``clip.vision.n_wa_pattern`` (block i attends fully when (i + 1) % n == 0);
- the older ``qwen2_vl_surgery.py``: ``clip.has_qwen2vl_merger``, ``clip.use_gelu`` / ``clip.use_silu``,
  Qwen2.5-VL marked by ``clip.use_glu_mlp`` / ``clip.use_rms_norm``, ``clip.vision.fullatt_block_indexes``
  and ``clip.vision.window_size``, the MLP named the LLaVA way round (see names.py) and a
  placeholder ``v.position_embd.weight``.

The vision config comes from the keys where they are reliable and from the tensor shapes otherwise
(``clip.vision.feed_forward_length`` holds the text width for Qwen2-VL in llama.cpp's files and 0 in
the surgery script's). Tensors are read under their HF names (``model.visual.…``), the split q/k/v
and Conv3d kernels joined back.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import CLIP_MEAN, CLIP_STD, PreprocessConfig, VisionConfig
from ..config_fields import MAX_HEADS, MAX_LAYERS, MAX_WIDTH, check_range
from ..errors import ModelFileError
from . import names
from .gguf import GGUFFile, GGUFTensorInfo, can_dequantize, open_gguf_file

PROJECTOR_VARIANTS = {"qwen2vl_merger": "qwen2_vl", "qwen2.5vl_merger": "qwen2_5_vl"}
VARIANT_PROJECTORS = {variant: projector for projector, variant in PROJECTOR_VARIANTS.items()}
LLAMA_CPP_WINDOW = 112  # clip.cpp's Qwen2.5-VL attention window, in pixels (not stored by its converter)
DEFAULT_TOKENS_PER_SECOND = 2.0  # every published Qwen2.5-VL (not stored by llama.cpp)
LEGACY_MARKER = "clip.has_qwen2vl_merger"
WINDOW_SIZE_KEY = "clip.vision.window_size"
FULLATT_KEY = "clip.vision.fullatt_block_indexes"
N_WA_PATTERN_KEY = "clip.vision.n_wa_pattern"
TOKENS_PER_SECOND_KEY = "clip.vision.tokens_per_second"  # written by qwenvl when not the published 2
HF_PREFIX = "model."  # vision tensors are handed out as model.visual.… (transformers 5 names)


def _float32_value(value: float) -> float:
    """A float32 metadata value as the shortest decimal that reads back to it (1e-6, not 9.99e-07)."""
    return float(str(np.float32(value)))


def _normalization(values: Any, default: tuple[float, float, float], key: str, where: str) -> tuple[float, ...]:
    """image_mean / image_std; the float32 copy of CLIP's constants reads back as those constants."""
    if values is None:
        raise ModelFileError(f"{where}: missing metadata key '{key}'")
    if len(values) != 3:
        raise ModelFileError(f"{where}: {key} must hold 3 values, got {len(values)}")
    if all(np.float32(v) == np.float32(d) for v, d in zip(values, default)):
        return default
    return tuple(_float32_value(v) for v in values)


def fullatt_from_pattern(n_wa_pattern: int, depth: int) -> tuple[int, ...]:
    """clip.cpp's rule: block i attends to the whole frame when (i + 1) % n_wa_pattern == 0."""
    return tuple(i for i in range(depth) if (i + 1) % n_wa_pattern == 0)


def pattern_from_fullatt(fullatt: tuple[int, ...], depth: int) -> int | None:
    """The n_wa_pattern that gives exactly these full-attention blocks, or None if none does."""
    for n in range(1, depth + 2):  # depth + 1: no block attends fully
        if fullatt_from_pattern(n, depth) == tuple(sorted(fullatt)):
            return n
    return None


class MMProj:
    """A Qwen2-VL / Qwen2.5-VL mmproj GGUF: vision config, preprocessing values, HF-named tensors."""

    def __init__(self, file: GGUFFile):
        self.file = file
        self.path = file.path
        self.metadata = file.metadata
        where = str(self.path)
        infos = file.tensor_infos
        self.variant = _variant(self.metadata, infos, where)
        hidden = _require(self.metadata, "clip.vision.embedding_length", where)
        check_range(where, "clip.vision.embedding_length", hidden, 1, MAX_WIDTH)
        hidden = int(hidden)
        self.legacy = _ffn_swapped(self.metadata, infos, hidden)
        self.table = names.vision_table(self.variant, legacy=self.legacy)
        try:
            layouts = names.vision_layout_from_gguf(list(infos), self.table)
        except KeyError as error:
            raise ModelFileError(f"{where}: {_key_error_text(error)} (a {self.variant} vision projector)") from None
        self.layouts = {layout.hf_name: layout for layout in layouts}
        self.vision = self._vision_config(hidden, where)
        self.projection_dim = self.vision.out_hidden_size
        self.preprocess_config = self._preprocess_config(where)
        self._check_tensors(where)

    # -- config --------------------------------------------------------------------------------
    def _shape(self, hf_name: str, where: str) -> tuple[int, ...]:
        layout = self.layouts.get(hf_name)
        if layout is None:
            raise ModelFileError(f"{where}: missing tensor for {hf_name}")
        return self.file.tensor_infos[layout.gguf_names[0]].shape

    def _vision_config(self, hidden: int, where: str) -> VisionConfig:
        meta = self.metadata
        depth = _require(meta, "clip.vision.block_count", where)
        heads = _require(meta, "clip.vision.attention.head_count", where)
        check_range(where, "clip.vision.block_count", depth, 1, MAX_LAYERS)
        check_range(where, "clip.vision.attention.head_count", heads, 1, MAX_HEADS)
        depth, heads = int(depth), int(heads)
        patch_shape = self._shape(names.HF_PATCH_EMBED, where)  # one temporal slice [embed, C, P, P]
        if len(patch_shape) != 4:
            raise ModelFileError(f"{where}: v.patch_embd.weight has shape {list(patch_shape)}, expected 4 dims")
        first_mlp = "up_proj" if self.variant == "qwen2_5_vl" else "fc1"
        intermediate = self._shape(f"visual.blocks.0.mlp.{first_mlp}.weight", where)[0]
        merger_in = self._shape("visual.merger.mlp.0.weight", where)[-1]
        out_hidden = self._shape("visual.merger.mlp.2.weight", where)[0]
        merge = int(meta.get("clip.vision.spatial_merge_size") or math.isqrt(max(merger_in // hidden, 1)))
        projection = meta.get("clip.vision.projection_dim")
        if projection is not None and int(projection) != out_hidden:
            raise ModelFileError(
                f"{where}: clip.vision.projection_dim is {projection} but mm.2.weight outputs {out_hidden}"
            )
        fullatt: tuple[int, ...] = ()
        if self.variant == "qwen2_5_vl":
            fullatt = self._fullatt(depth, where)
        try:
            return VisionConfig(
                variant=self.variant,
                depth=depth,
                hidden_size=hidden,
                num_heads=heads,
                intermediate_size=intermediate,
                out_hidden_size=out_hidden,
                hidden_act=_activation(meta),
                in_channels=patch_shape[1],
                patch_size=patch_shape[-1],
                temporal_patch_size=len(names.GGUF_PATCH_EMBED),
                spatial_merge_size=merge,
                window_size=int(meta.get(WINDOW_SIZE_KEY) or LLAMA_CPP_WINDOW),
                fullatt_block_indexes=fullatt,
                tokens_per_second=float(meta.get(TOKENS_PER_SECOND_KEY) or DEFAULT_TOKENS_PER_SECOND),
                norm_eps=_float32_value(meta.get("clip.vision.attention.layer_norm_epsilon", 1e-6)),
            )
        except ModelFileError as error:
            raise ModelFileError(f"{where}: {error}") from None

    def _fullatt(self, depth: int, where: str) -> tuple[int, ...]:
        explicit = self.metadata.get(FULLATT_KEY)
        if explicit is not None:
            indexes = tuple(int(i) for i in explicit)
            bad = [i for i in indexes if not 0 <= i < depth]
            if bad:
                raise ModelFileError(f"{where}: {FULLATT_KEY} holds block {bad[0]}, outside 0..{depth - 1}")
            return indexes
        pattern = self.metadata.get(N_WA_PATTERN_KEY)
        if pattern is None:
            raise ModelFileError(f"{where}: missing metadata key '{N_WA_PATTERN_KEY}' (Qwen2.5-VL window attention)")
        if int(pattern) < 1:
            raise ModelFileError(f"{where}: {N_WA_PATTERN_KEY} must be at least 1, got {pattern}")
        return fullatt_from_pattern(int(pattern), depth)

    def _preprocess_config(self, where: str) -> PreprocessConfig:
        meta, vision, defaults = self.metadata, self.vision, PreprocessConfig()
        return PreprocessConfig(
            min_pixels=int(meta.get("clip.vision.image_min_pixels") or defaults.min_pixels),
            max_pixels=int(meta.get("clip.vision.image_max_pixels") or defaults.max_pixels),
            patch_size=vision.patch_size,
            temporal_patch_size=vision.temporal_patch_size,
            merge_size=vision.spatial_merge_size,
            image_mean=_normalization(meta.get("clip.vision.image_mean"), CLIP_MEAN, "clip.vision.image_mean", where),
            image_std=_normalization(meta.get("clip.vision.image_std"), CLIP_STD, "clip.vision.image_std", where),
        )

    def _check_tensors(self, where: str) -> None:
        """Every tensor the vision model needs, with its shape, and nothing else."""
        from ..models.vision import VisionTransformer

        with torch.device("meta"):
            expected = {f"visual.{n}": tuple(p.shape) for n, p in VisionTransformer(self.vision).named_parameters()}
        for hf_name, shape in expected.items():
            if hf_name not in self.layouts:
                raise ModelFileError(f"{where}: missing tensor {self._gguf_name(hf_name)} ({hf_name})")
            got = self.shape(hf_name)
            if got != shape:
                raise ModelFileError(
                    f"{where}: tensor {self.layouts[hf_name].gguf_names[0]} gives {hf_name} the shape {list(got)}, "
                    f"expected {list(shape)}"
                )
        extra = sorted(set(self.layouts) - set(expected))
        if extra:
            name = self.layouts[extra[0]].gguf_names[0]
            raise ModelFileError(
                f"{where}: unexpected tensor {name} for a {self.vision.depth}-block {self.variant} ViT"
            )
        for layout in self.layouts.values():
            for name in layout.gguf_names:
                kind = self.file.tensor_infos[name].ggml_type
                if not can_dequantize(kind):
                    raise ModelFileError(f"{where}: tensor {name} has unsupported tensor type {kind.name}")

    def _gguf_name(self, hf_name: str) -> str:
        try:
            return names.vision_layout_from_hf(hf_name, self.table).gguf_names[0]
        except KeyError:
            return hf_name

    # -- tensors -------------------------------------------------------------------------------
    def shape(self, hf_name: str) -> tuple[int, ...]:
        """The HF shape of a vision tensor (``visual.…``), pieces joined."""
        layout = self.layouts[hf_name]
        shapes = [self.file.tensor_infos[name].shape for name in layout.gguf_names]
        if layout.join == names.ROWS:
            return (sum(s[0] for s in shapes), *shapes[0][1:])
        if layout.join == names.TEMPORAL:
            return (*shapes[0][:2], len(shapes), *shapes[0][2:])
        return shapes[0]

    def infos(self, hf_name: str) -> list[GGUFTensorInfo]:
        return [self.file.tensor_infos[name] for name in self.layouts[hf_name].gguf_names]

    def hf_names(self) -> list[str]:
        """HF names without the ``model.`` prefix (``visual.…``), in file order."""
        return list(self.layouts)

    def tensor(self, hf_name: str) -> torch.Tensor:
        """One vision tensor (``visual.…``), dequantized to float32, pieces joined."""
        layout = self.layouts[hf_name]
        pieces = [self.file.tensor(name) for name in layout.gguf_names]
        return names.join_vision(pieces, layout.join)

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for hf_name in self.layouts:
            yield hf_name, self.tensor(hf_name)

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> MMProj:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class VisionTensors(Mapping[str, torch.Tensor]):
    """``model.visual.…`` → float32 tensor, dequantized when looked up (nothing is kept)."""

    def __init__(self, mmproj: MMProj):
        self._mmproj = mmproj
        self._names = {HF_PREFIX + name: name for name in mmproj.hf_names()}

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._mmproj.tensor(self._names[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


# ----------------------------------------------------------------------------------------------
# Metadata


def _require(metadata: dict[str, Any], key: str, where: str) -> Any:
    if key not in metadata:
        raise ModelFileError(f"{where}: missing metadata key '{key}'")
    return metadata[key]


def _key_error_text(error: KeyError) -> str:
    text = str(error.args[0]) if error.args else str(error)
    return text.replace("unknown GGUF tensor name", "unexpected tensor")


def _variant(metadata: dict[str, Any], infos: dict[str, GGUFTensorInfo], where: str) -> str:
    arch = metadata.get("general.architecture")
    if arch != "clip":
        raise ModelFileError(
            f"{where}: not a vision projector (architecture {arch!r}; an mmproj file has architecture 'clip')"
        )
    if metadata.get("clip.has_vision_encoder") is False:
        raise ModelFileError(f"{where}: this mmproj has no vision encoder")
    projector = metadata.get("clip.projector_type") or metadata.get("clip.vision.projector_type")
    if projector is None and metadata.get(LEGACY_MARKER):
        projector = "qwen2vl_merger"
    if projector not in PROJECTOR_VARIANTS:
        raise ModelFileError(
            f"{where}: unsupported projector type {projector!r}; qwenvl reads {', '.join(PROJECTOR_VARIANTS)}"
        )
    variant = PROJECTOR_VARIANTS[projector]
    # The surgery script wrote "qwen2vl_merger" for Qwen2.5-VL too, with these marks
    gated = any(name.endswith(".ffn_gate.weight") for name in infos)
    if variant == "qwen2_vl" and (gated or metadata.get("clip.use_glu_mlp") or metadata.get("clip.use_rms_norm")):
        variant = "qwen2_5_vl"
    return variant


def _activation(metadata: dict[str, Any]) -> str:
    """clip.cpp's rule: use_silu → SiLU, use_gelu → GELU, neither → QuickGELU (Qwen2-VL)."""
    if metadata.get("clip.use_silu"):
        return "silu"
    if metadata.get("clip.use_gelu"):
        return "gelu"
    return "quick_gelu"


def _ffn_swapped(metadata: dict[str, Any], infos: dict[str, GGUFTensorInfo], hidden: int) -> bool:
    """Whether the MLP is named the surgery script's way (ffn_down = first layer), as clip.cpp decides:
    ffn_down then takes the ViT width as its input. When the MLP is as wide as the ViT, the shapes
    cannot tell and the surgery script's marker key decides."""
    down, up = infos.get("v.blk.0.ffn_down.weight"), infos.get("v.blk.0.ffn_up.weight")
    if down is None or up is None:
        return False
    if down.shape[-1] != up.shape[-1]:
        return down.shape[-1] == hidden
    return bool(metadata.get(LEGACY_MARKER))


def read_mmproj(path: str | os.PathLike) -> MMProj:
    """Open a Qwen2-VL / Qwen2.5-VL mmproj GGUF: parse and check it, leave the weights on disk."""
    file = open_gguf_file(Path(path))
    try:
        return MMProj(file)
    except BaseException:
        file.close()
        raise


__all__ = [
    "MMProj",
    "VisionTensors",
    "read_mmproj",
    "fullatt_from_pattern",
    "pattern_from_fullatt",
    "PROJECTOR_VARIANTS",
    "VARIANT_PROJECTORS",
    "LLAMA_CPP_WINDOW",
]
