"""HF checkpoint → GGUF (the text model and, for VL models, the mmproj) and GGUF → GGUF re-quantization.

The files are the ones llama.cpp's ``convert_hf_to_gguf.py`` writes, key for key and tensor for
tensor (``tests/test_gguf_convert.py`` compares them): architecture ``qwen2`` / ``qwen2vl`` (M-RoPE
sections as 4 ints) with ``tokenizer.ggml.*`` (pre-tokenizer ``qwen2``, merges, special ids, chat
template), and an mmproj with architecture ``clip``, ``clip.vision.*`` keys, q/k/v split and the Conv3d
patch embedding as two Conv2d kernels. Beyond llama.cpp's converter, qwenvl writes
``clip.vision.window_size`` when the window is not 112 pixels, ``clip.vision.fullatt_block_indexes``
when the full-attention blocks follow no ``n_wa_pattern`` and ``clip.vision.tokens_per_second`` when it
is not 2 (llama.cpp hard-codes those three).

Tensor types, as llama.cpp / qwen.cpp choose them: 1-D tensors and norms stay F32; every other weight
gets the requested type, except that below 8 bits the output projection (output.weight, or
token_embd.weight when tied) is Q6_K as llama-quantize keeps it; a row length that is not a multiple
of the type's block size falls back to a wider type (K-quants: Q2_K/Q3_K → Q4_0, Q4_K → Q5_0,
Q5_K → Q5_1, Q6_K → Q8_0; 32-blocks → F16). Every exception is said in the summary. The mmproj's
patch embedding is F16 in an F16 file and F32 otherwise.

Output goes to a hidden temporary file next to the target, renamed into place when complete; an
input is never overwritten.
"""

from __future__ import annotations

import os
import struct
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf.constants import GGML_QUANT_SIZES, GGML_QUANT_VERSION, GGMLQuantizationType, LlamaFileType
from safetensors import safe_open
from tqdm import tqdm

from .config import ModelConfig, PreprocessConfig, model_config_from_hf, preprocess_config_from_hf
from .durable import commit, created_dirs_removed_on_failure, partial_path, remove_stale_partials
from .errors import ModelFileError, QwenVLError
from .quant import ggml as ggml_quant
from .weights import hf, names
from .weights.gguf_meta import general_metadata, text_metadata, vocab_tokens
from .weights.layout import GGUF_ARCH_OF, Layout, canonical_name, layout_for, permute_rows
from .weights.mmproj import LLAMA_CPP_WINDOW, VARIANT_PROJECTORS, pattern_from_fullatt

Q = GGMLQuantizationType

CONVERT_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
MMPROJ_TYPES = ("f32", "f16", "q8_0")
QUANTIZE_TYPES = CONVERT_TYPES + ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k")
FILE_TYPES = {
    Q.F32: LlamaFileType.ALL_F32,
    Q.F16: LlamaFileType.MOSTLY_F16,
    Q.BF16: LlamaFileType.MOSTLY_BF16,
    Q.Q8_0: LlamaFileType.MOSTLY_Q8_0,
    Q.Q4_0: LlamaFileType.MOSTLY_Q4_0,
    Q.Q4_1: LlamaFileType.MOSTLY_Q4_1,
    Q.Q5_0: LlamaFileType.MOSTLY_Q5_0,
    Q.Q5_1: LlamaFileType.MOSTLY_Q5_1,
    Q.Q2_K: LlamaFileType.MOSTLY_Q2_K,
    Q.Q3_K: LlamaFileType.MOSTLY_Q3_K_S,
    Q.Q4_K: LlamaFileType.MOSTLY_Q4_K_S,
    Q.Q5_K: LlamaFileType.MOSTLY_Q5_K_S,
    Q.Q6_K: LlamaFileType.MOSTLY_Q6_K,
}
# When a row does not split into whole blocks: llama.cpp's fallbacks (IQ4_NL replaced by Q4_0).
FALLBACK = {
    Q.Q2_K: Q.Q4_0,
    Q.Q3_K: Q.Q4_0,
    Q.Q4_K: Q.Q5_0,
    Q.Q5_K: Q.Q5_1,
    Q.Q6_K: Q.Q8_0,
    Q.Q8_0: Q.F16,
    Q.Q4_0: Q.F16,
    Q.Q4_1: Q.F16,
    Q.Q5_0: Q.F16,
    Q.Q5_1: Q.F16,
}
# Below 8 bits the output projection is stored as Q6_K (llama.cpp's llama-quantize rule)
LOW_BIT = {Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K}


def ggml_type(name: str) -> GGMLQuantizationType:
    """ "q4_0" → Q4_0 (the names of --type)."""
    try:
        return Q[name.upper()]
    except KeyError:
        raise QwenVLError(f"unknown tensor type {name!r}; choose from {', '.join(QUANTIZE_TYPES)}") from None


# ----------------------------------------------------------------------------------------------
# Planning: which tensors, which types


@dataclass
class PlannedTensor:
    """One tensor of an output file: its GGUF name, torch-order shape, type, and how to get its values."""

    name: str
    shape: tuple[int, ...]
    ggml_type: GGMLQuantizationType
    load: Callable[[], np.ndarray] = field(repr=False)  # float32 values in ``shape``
    note: str = ""  # why the type is not the requested one
    raw: Callable[[], np.ndarray] | None = field(default=None, repr=False)  # bytes already in ggml_type

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def n_bytes(self) -> int:
        block, size = GGML_QUANT_SIZES[self.ggml_type]
        return self.n_elements // block * size

    @property
    def byte_shape(self) -> tuple[int, ...]:
        block, size = GGML_QUANT_SIZES[self.ggml_type]
        return (*self.shape[:-1], self.shape[-1] // block * size)

    def encode(self) -> np.ndarray:
        """The bytes to store."""
        if self.raw is not None:
            return self.raw()
        values = self.load()
        if tuple(values.shape) != self.shape:
            raise ModelFileError(f"tensor {self.name}: shape {list(values.shape)}, expected {list(self.shape)}")
        return ggml_quant.quantize(values, self.ggml_type)


def tensor_type(
    name: str, shape: Sequence[int], requested: GGMLQuantizationType, *, mmproj: bool = False, tied: bool = False
) -> tuple[GGMLQuantizationType, str]:
    """The type a tensor is stored in, and a note when it is not the requested one.

    ``tied``: the model has no output.weight, token_embd.weight serves as the output projection.
    """
    if len(shape) <= 1 or name.endswith("_norm.weight"):
        return Q.F32, ""
    if mmproj and name in names.GGUF_PATCH_EMBED:
        return (Q.F16 if requested == Q.F16 else Q.F32), ""
    if not name.endswith(".weight"):
        return Q.F32, ""
    target, note = requested, ""
    if requested in LOW_BIT and (name == "output.weight" or (tied and name == "token_embd.weight")):
        target = Q.Q6_K  # llama.cpp's quantize keeps the output projection at 6 bits
        note = f"the output projection is kept at {Q.Q6_K.name}, as llama.cpp does"
    chosen = target
    while shape[-1] % ggml_quant.block_size(chosen):
        chosen = FALLBACK[chosen]
    if chosen != target:
        block = ggml_quant.block_size(target)
        reason = f"rows of {shape[-1]} are not a multiple of {target.name}'s block of {block}"
        note = f"{note}; {reason}" if note else reason
    if chosen != requested:
        return chosen, f"{note}: {chosen.name}"
    return chosen, ""


# ----------------------------------------------------------------------------------------------
# Reading an HF checkpoint


@dataclass
class SourceTensor:
    name: str  # canonical: model.…, lm_head.…, visual.…
    shape: tuple[int, ...]
    load: Callable[[], torch.Tensor] = field(repr=False)


class _LastLoaded:
    """Loads through a one-entry cache: a fused tensor split into 3 pieces is read once."""

    def __init__(self) -> None:
        self._key: str | None = None
        self._value: torch.Tensor | None = None

    def get(self, key: str, load: Callable[[], torch.Tensor]) -> torch.Tensor:
        if key != self._key:
            self._key, self._value = None, None  # free the previous one first
            self._value = load().float()
            self._key = key
        assert self._value is not None
        return self._value


def source_tensors(directory: Path) -> list[SourceTensor]:
    """Every tensor of an HF checkpoint, in file order, shapes read from the headers."""
    tensors: list[SourceTensor] = []
    for file in hf.weight_files(directory):
        tensors += _safetensors_entries(file) if file.suffix == ".safetensors" else _pickle_entries(file)
    return tensors


def _safetensors_entries(file: Path) -> list[SourceTensor]:
    try:
        with safe_open(str(file), framework="pt") as handle:
            shapes = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
    except Exception as exc:  # safetensors raises its own error types on a bad header
        raise ModelFileError(f"{file}: unreadable safetensors file ({exc})") from None

    def loader(name: str) -> Callable[[], torch.Tensor]:
        def load() -> torch.Tensor:
            with safe_open(str(file), framework="pt") as handle:
                return handle.get_tensor(name)

        return load

    return [SourceTensor(canonical_name(n), shape, loader(n)) for n, shape in shapes.items()]


def _pickle_entries(file: Path) -> list[SourceTensor]:
    state = dict(hf.iter_pickle(file))
    return [SourceTensor(canonical_name(n), tuple(t.shape), lambda t=t: t) for n, t in state.items()]


@dataclass
class HFSource:
    directory: Path
    raw_config: dict[str, Any]
    config: ModelConfig
    preprocess: PreprocessConfig
    tensors: list[SourceTensor]
    vocab_file: Path  # tokenizer.json, or qwen.tiktoken for Qwen (v1)

    @property
    def name(self) -> str:
        return self.directory.resolve().name


def read_hf_source(directory: str | os.PathLike) -> HFSource:
    from .weights.meta import is_meta_dir

    if is_meta_dir(Path(directory).expanduser()) and not (Path(directory).expanduser() / "config.json").is_file():
        return read_meta_source(Path(directory).expanduser())
    path = hf.resolve_model_dir(directory)
    config_path = path / "config.json"
    raw = hf.read_json(config_path) or {}
    config = model_config_from_hf(raw, where=str(config_path))
    vocab_file = path / VOCAB_FILES.get(config.arch, "tokenizer.json")
    if not vocab_file.is_file():
        raise ModelFileError(f"{vocab_file}: missing (the exported vocabulary comes from it)")
    preprocess = preprocess_config_from_hf(hf.read_json(path / "preprocessor_config.json", required=False))
    return HFSource(path, raw, config, preprocess, source_tensors(path), vocab_file)


def read_meta_source(directory: Path) -> HFSource:
    """Meta's params.json + consolidated.*.pth, merged and renamed (weights/meta.py), as an HF source."""
    from .weights.meta import load_meta, tokenizer_file

    params, text, tensors = load_meta(directory)
    config = ModelConfig(arch="llama", text=text)
    sources = [SourceTensor(name, tuple(t.shape), lambda t=t: t) for name, t in tensors.items()]
    return HFSource(directory, dict(params), config, PreprocessConfig(), sources, tokenizer_file(directory))


# The file the GGUF vocabulary comes from, when it is not tokenizer.json
VOCAB_FILES = {"qwen": "qwen.tiktoken", "llama": "tokenizer.model"}


def plan_text(source: HFSource, requested: GGMLQuantizationType) -> list[PlannedTensor]:
    """The text GGUF's tensors (decoder and lm_head), llama.cpp-named, in checkpoint order."""
    layout = layout_for(source.config.arch)
    cache = _LastLoaded()
    planned = []
    for tensor in source.tensors:
        if tensor.name.startswith("visual.") or tensor.name.endswith("rotary_emb.inv_freq"):
            continue
        if tensor.name == layout.output_name and source.config.text.tie_word_embeddings:
            continue  # tied: llama.cpp reads token_embd for the output
        try:
            gguf_name = layout.to_gguf(tensor.name)
        except KeyError:
            raise ModelFileError(
                f"{source.directory}: unexpected tensor {tensor.name} in a {source.config.arch} checkpoint"
            ) from None
        chosen, note = tensor_type(gguf_name, tensor.shape, requested, tied=source.config.text.tie_word_embeddings)
        heads = layout.rope_heads(tensor.name, source.config.text)

        def load(t: SourceTensor = tensor, heads: int | None = heads) -> np.ndarray:
            values = cache.get(t.name, t.load)
            return (values if heads is None else permute_rows(values, heads)).numpy()  # llama's q/k: interleaved

        planned.append(PlannedTensor(gguf_name, tensor.shape, chosen, load, note))
    _check_complete(planned, layout, source.config, source.directory)
    return planned


def plan_mmproj(source: HFSource, requested: GGMLQuantizationType) -> list[PlannedTensor]:
    """The mmproj's tensors: renamed, q/k/v split in thirds, the Conv3d kernel in two temporal slices."""
    from .models.vision import weight_names

    vision = source.config.vision
    assert vision is not None
    if vision.temporal_patch_size != len(names.GGUF_PATCH_EMBED):
        raise ModelFileError(
            f"{source.directory}: an mmproj stores a temporal patch of 2 frames, "
            f"this ViT has {vision.temporal_patch_size}"
        )
    present = {tensor.name for tensor in source.tensors}
    missing = [f"visual.{name}" for name in weight_names(vision) if f"visual.{name}" not in present]
    if missing:
        raise ModelFileError(f"{source.directory}: missing tensor {missing[0]}")
    table = names.vision_table(source.config.arch)
    cache = _LastLoaded()
    planned = []
    for tensor in source.tensors:
        if not tensor.name.startswith("visual."):
            continue
        try:
            layout = names.vision_layout_from_hf(tensor.name, table)
        except KeyError:
            raise ModelFileError(f"{source.directory}: unexpected vision tensor {tensor.name}") from None
        for index, (gguf_name, shape) in enumerate(zip(layout.gguf_names, _piece_shapes(tensor.shape, layout.join))):
            chosen, note = tensor_type(gguf_name, shape, requested, mmproj=True)

            def load(t: SourceTensor = tensor, i: int = index, join: str = layout.join) -> np.ndarray:
                return names.split_vision(cache.get(t.name, t.load), join)[i].numpy()

            planned.append(PlannedTensor(gguf_name, shape, chosen, load, note))
    return planned


def _piece_shapes(shape: tuple[int, ...], join: str) -> list[tuple[int, ...]]:
    if join == names.ROWS:
        return [(shape[0] // 3, *shape[1:])] * 3
    if join == names.TEMPORAL:
        return [(*shape[:2], *shape[3:])] * shape[2]
    return [shape]


def _check_complete(planned: list[PlannedTensor], layout: Layout, config: ModelConfig, where: Path) -> None:
    present = {tensor.name: tensor.shape for tensor in planned}
    for name, shape in layout.gguf_shapes(config.text).items():
        if name not in present:
            raise ModelFileError(f"{where}: missing tensor {layout.to_hf(name)}")
        if present[name] != shape:
            raise ModelFileError(
                f"{where}: tensor {layout.to_hf(name)} has shape {list(present[name])}, config needs {list(shape)}"
            )


# ----------------------------------------------------------------------------------------------
# Metadata


def mmproj_metadata(writer: gguf.GGUFWriter, source: HFSource, file_type: LlamaFileType) -> None:
    """clip.* keys, in the order llama.cpp's converter writes them, then qwenvl's three extras."""
    config, vision = source.config, source.config.vision
    assert vision is not None
    raw_vision = source.raw_config.get("vision_config") or {}
    general_metadata(writer, source.directory, gguf.GGUFType.MMPROJ, source.name)
    writer.add_file_type(file_type)
    writer.add_clip_has_vision_encoder(True)
    writer.add_vision_projection_dim(config.text.hidden_size)
    writer.add_vision_image_size(int(raw_vision.get("image_size", 560)))
    writer.add_vision_patch_size(vision.patch_size)
    writer.add_vision_embedding_length(vision.hidden_size)
    # llama.cpp writes Qwen2-VL's vision_config.hidden_size (the merger's output) here
    ffn = vision.out_hidden_size if config.arch == "qwen2_vl" else vision.intermediate_size
    writer.add_vision_feed_forward_length(ffn)
    writer.add_vision_block_count(vision.depth)
    writer.add_vision_head_count(vision.num_heads)
    writer.add_vision_image_mean(list(source.preprocess.image_mean))
    writer.add_vision_image_std(list(source.preprocess.image_std))
    writer.add_clip_projector_type(VARIANT_PROJECTORS[config.arch])
    if config.arch == "qwen2_5_vl":
        writer.add_vision_use_silu(True)
        pattern = pattern_from_fullatt(vision.fullatt_block_indexes, vision.depth)
        if pattern is not None:
            writer.add_vision_n_wa_pattern(pattern)
    writer.add_vision_attention_layernorm_eps(vision.norm_eps)
    if vision.hidden_act not in ("quick_gelu", "silu"):
        writer.add_vision_use_gelu(True)
    if config.arch == "qwen2_5_vl":
        if vision.window_size != LLAMA_CPP_WINDOW:
            writer.add_uint32("clip.vision.window_size", vision.window_size)
        if pattern_from_fullatt(vision.fullatt_block_indexes, vision.depth) is None:
            writer.add_array("clip.vision.fullatt_block_indexes", list(vision.fullatt_block_indexes))
        if vision.tokens_per_second != 2:
            writer.add_float32("clip.vision.tokens_per_second", vision.tokens_per_second)
    writer.add_quantization_version(GGML_QUANT_VERSION)


# ----------------------------------------------------------------------------------------------
# Writing


class _Writer(gguf.GGUFWriter):
    """GGUFWriter with the long metadata arrays (151k tokens, types, merges) packed in bulk; gguf
    packs them one Python call per item, which takes seconds. Same bytes."""

    def _pack_val(self, val: Any, vtype: Any, add_vtype: bool, sub_type: Any = None) -> bytes:
        if vtype != gguf.GGUFValueType.ARRAY or not isinstance(val, list) or len(val) < 1024:
            return super()._pack_val(val, vtype, add_vtype, sub_type=sub_type)
        if all(type(item) is str for item in val):
            element = gguf.GGUFValueType.STRING
            encoded = [item.encode("utf-8") for item in val]
            body = b"".join(struct.pack("<Q", len(item)) + item for item in encoded)
        elif all(type(item) is int for item in val) and sub_type in (None, gguf.GGUFValueType.INT32):
            element = gguf.GGUFValueType.INT32
            body = np.asarray(val, dtype="<i4").tobytes()
        else:
            return super()._pack_val(val, vtype, add_vtype, sub_type=sub_type)
        head = struct.pack("<I", vtype) if add_vtype else b""
        return head + struct.pack("<IQ", element, len(val)) + body


@dataclass
class WrittenFile:
    path: Path
    architecture: str
    tensors: list[PlannedTensor]
    requested: GGMLQuantizationType

    @property
    def n_bytes(self) -> int:
        return self.path.stat().st_size


def write_gguf(
    path: Path,
    architecture: str,
    tensors: list[PlannedTensor],
    add_metadata: Callable[[gguf.GGUFWriter], None],
    *,
    requested: GGMLQuantizationType,
    inputs: Sequence[Path] = (),
    force: bool = False,
    progress: bool = True,
) -> WrittenFile:
    """Write a GGUF file tensor by tensor (one in memory at a time), via a temporary file."""
    check_output(path, inputs, force)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(path.parent)  # left by killed runs
    partial = partial_path(path)
    writer = _Writer(partial, architecture)
    try:
        for tensor in tensors:
            writer.add_tensor_info(tensor.name, tensor.byte_shape, np.dtype(np.uint8), tensor.n_bytes, tensor.ggml_type)
        add_metadata(writer)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        total = sum(t.n_bytes for t in tensors)
        with tqdm(total=total, unit="B", unit_scale=True, desc=path.name, disable=not progress, file=sys.stderr) as bar:
            for tensor in tensors:
                data = tensor.encode()
                if data.nbytes != tensor.n_bytes:
                    raise ModelFileError(
                        f"tensor {tensor.name}: {data.nbytes} bytes encoded, {tensor.n_bytes} expected"
                    )
                writer.write_tensor_data(data)
                bar.update(tensor.n_bytes)
        writer.close()
        commit(partial, path)
    except BaseException:
        writer.close()
        partial.unlink(missing_ok=True)
        raise
    return WrittenFile(path, architecture, tensors, requested)


def check_output(path: Path, inputs: Sequence[Path], force: bool) -> None:
    for source in inputs:
        if path.resolve() == source.resolve() or (source.exists() and path.exists() and path.samefile(source)):
            raise QwenVLError(f"{path}: is an input of this command; write the output somewhere else")
    if path.exists() and not force:
        raise QwenVLError(f"{path}: exists (pass --force to replace it)")
    if path.exists() and not path.is_file():
        raise QwenVLError(f"{path}: exists and is not a file")


# ----------------------------------------------------------------------------------------------
# The commands


def default_mmproj_type(text_type: str) -> str:
    """f32 stays f32, f16/bf16 give f16, quantized types give q8_0."""
    return {"f32": "f32", "f16": "f16", "bf16": "f16"}.get(text_type, "q8_0")


def convert_hf(
    hf_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    out_type: str = "f16",
    mmproj_type: str | None = None,
    force: bool = False,
    progress: bool = True,
) -> list[WrittenFile]:
    """Write ``<name>-<TYPE>.gguf`` (and ``mmproj-<name>-<TYPE>.gguf`` for a VL model) into out_dir."""
    if out_type not in CONVERT_TYPES:
        raise QwenVLError(f"--type {out_type!r}: choose from {', '.join(CONVERT_TYPES)}")
    mmproj_type = mmproj_type or default_mmproj_type(out_type)
    if mmproj_type not in MMPROJ_TYPES:
        raise QwenVLError(f"--mmproj-type {mmproj_type!r}: choose from {', '.join(MMPROJ_TYPES)}")
    source = read_hf_source(hf_dir)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise QwenVLError(f"{out_dir}: exists and is not a directory")
    inputs = [p for p in source.directory.iterdir() if p.is_file()]
    text_q = ggml_type(out_type)
    text_path = out_dir / f"{source.name}-{text_q.name}.gguf"
    mm_path = out_dir / f"mmproj-{source.name}-{ggml_type(mmproj_type).name}.gguf"
    targets = [text_path] + ([mm_path] if source.config.is_vision else [])
    for target in targets:  # before writing anything
        check_output(target, inputs, force)
    with created_dirs_removed_on_failure(out_dir):
        return _write_hf_ggufs(source, text_path, mm_path, text_q, mmproj_type, inputs, force, progress)


def _write_hf_ggufs(
    source: Any,
    text_path: Path,
    mm_path: Path,
    text_q: GGMLQuantizationType,
    mmproj_type: str,
    inputs: list[Path],
    force: bool,
    progress: bool,
) -> list[WrittenFile]:
    """convert_hf's writes: the text GGUF, then the mmproj of a VL model."""
    text_arch = GGUF_ARCH_OF[source.config.arch]
    written = [
        write_gguf(
            text_path,
            text_arch,
            plan_text(source, text_q),
            lambda w: text_metadata(w, source, FILE_TYPES[text_q]),
            requested=text_q,
            inputs=inputs,
            force=force,
            progress=progress,
        )
    ]
    if source.config.is_vision:
        mm_q = ggml_type(mmproj_type)
        written.append(
            write_gguf(
                mm_path,
                "clip",
                plan_mmproj(source, mm_q),
                lambda w: mmproj_metadata(w, source, FILE_TYPES[mm_q]),
                requested=mm_q,
                inputs=inputs,
                force=force,
                progress=progress,
            )
        )
    return written


@dataclass
class QwenCppSource:
    """A qwen.cpp file and its qwen.tiktoken, as the GGUF metadata writers see a source."""

    path: Path
    config: ModelConfig
    vocab_file: Path
    directory: Path | None = None
    raw_config: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.stem


def convert_qwencpp(
    path: str | os.PathLike,
    tiktoken: str | os.PathLike | None,
    out_dir: str | os.PathLike,
    *,
    out_type: str | None = None,
    force: bool = False,
    progress: bool = True,
) -> WrittenFile:
    """A qwen.cpp GGML file → ``<name>-<TYPE>.gguf`` (llama.cpp's "qwen"). Without ``out_type`` every
    tensor keeps its stored type, bytes copied as they are (the file's blocks are GGUF's); with one,
    tensors are re-quantized as ``quantize`` does."""
    from .tokenizer import Tokenizer
    from .weights.qwencpp import check_vocabulary, read_qwencpp

    if out_type is not None and out_type not in QUANTIZE_TYPES:
        raise QwenVLError(f"--type {out_type!r}: choose from {', '.join(QUANTIZE_TYPES)}")
    path, out_dir = Path(path), Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise QwenVLError(f"{out_dir}: exists and is not a directory")
    with read_qwencpp(path) as model:
        if tiktoken is None:
            raise ModelFileError(f"{path}: a qwen.cpp file carries no vocabulary: pass its qwen.tiktoken (--tiktoken)")
        check_vocabulary(model, Tokenizer.from_tiktoken(tiktoken), tiktoken)
        requested = ggml_type(out_type) if out_type is not None else model.header.dtype
        target = out_dir / f"{path.stem}-{requested.name}.gguf"
        check_output(target, [path, Path(tiktoken)], force)
        planned = []
        for hf_name, info in ((name, model.info(name)) for name in model.hf_names()):
            gguf_name = model.layout.to_gguf(hf_name)
            chosen, note = info.ggml_type, ""
            if out_type is not None:
                chosen, note = tensor_type(gguf_name, info.shape, requested)
            raw = (lambda n=hf_name: np.array(model.raw(n))) if info.ggml_type == chosen else None
            load = lambda n=hf_name: model.tensor(n).numpy()  # noqa: E731
            planned.append(PlannedTensor(gguf_name, info.shape, chosen, load, note, raw))
        source = QwenCppSource(path, model.config, Path(tiktoken))
        with created_dirs_removed_on_failure(out_dir):
            return write_gguf(
                target,
                GGUF_ARCH_OF["qwen"],
                planned,
                lambda w: text_metadata(w, source, FILE_TYPES[requested]),
                requested=requested,
                inputs=[path, Path(tiktoken)],
                force=force,
                progress=progress,
            )


def quantize_gguf(
    in_path: str | os.PathLike,
    out_path: str | os.PathLike,
    out_type: str,
    *,
    force: bool = False,
    progress: bool = True,
) -> WrittenFile:
    """Re-quantize a GGUF (a text model or an mmproj): same metadata and tensors, new types.

    Tensors already in their target type are copied byte for byte; the others are dequantized
    and quantized again (quantizing an already-quantized tensor adds its error to the first one).
    """
    from .weights.gguf import open_gguf_file
    from .weights.mmproj import MMProj

    in_path, out_path = Path(in_path), Path(out_path)
    requested = ggml_type(out_type)
    if out_type not in QUANTIZE_TYPES:
        raise QwenVLError(f"TYPE {out_type!r}: choose from {', '.join(QUANTIZE_TYPES)}")
    check_output(out_path, [in_path], force)
    with open_gguf_file(in_path) as source:
        is_mmproj = source.architecture == "clip"
        if is_mmproj:
            if out_type not in MMPROJ_TYPES:
                raise QwenVLError(f"{in_path}: an mmproj is written as {', '.join(MMPROJ_TYPES)}, not {out_type}")
            MMProj(source)  # checks it is a Qwen2-VL / Qwen2.5-VL projector
        else:
            source.text_model()  # checks it is a qwen2 / qwen2vl text model
        planned = []
        tied = "output.weight" not in source.tensor_infos
        for name, info in source.tensor_infos.items():
            chosen, note = tensor_type(name, info.shape, requested, mmproj=is_mmproj, tied=tied)
            raw = (lambda n=name: np.array(source.raw(n))) if info.ggml_type == chosen else None
            load = lambda n=name: source.tensor(n).numpy()  # noqa: E731
            planned.append(PlannedTensor(name, info.shape, chosen, load, note, raw))

        def add_metadata(writer: gguf.GGUFWriter) -> None:
            copy_metadata(writer, source, FILE_TYPES[requested])

        return write_gguf(
            out_path,
            source.architecture or "",
            planned,
            add_metadata,
            requested=requested,
            inputs=[in_path],
            force=force,
            progress=progress,
        )


def copy_metadata(writer: gguf.GGUFWriter, source: Any, file_type: LlamaFileType) -> None:
    """Every key of the source, in order, with general.file_type replaced."""
    for key, value in source.metadata.items():
        if key in ("general.architecture", "general.quantization_version"):
            continue
        if key == "general.file_type":
            writer.add_file_type(file_type)
            continue
        kind, element = source.value_types[key]
        writer.add_key_value(key, value, kind, sub_type=element)
    if "general.file_type" not in source.metadata:
        writer.add_file_type(file_type)
    writer.add_quantization_version(GGML_QUANT_VERSION)


# ----------------------------------------------------------------------------------------------
# Summary


def _size(n_bytes: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.2f} {unit}"
    return f"{n_bytes} B"


def summary_table(written: WrittenFile, max_notes: int = 8) -> str:
    """Tensors, parameters and bytes per type, the total, and the fallbacks."""
    rows: dict[str, list[int]] = {}
    for tensor in written.tensors:
        row = rows.setdefault(tensor.ggml_type.name, [0, 0, 0])
        row[0] += 1
        row[1] += tensor.n_elements
        row[2] += tensor.n_bytes
    lines = [f"{written.path} ({written.architecture}, {written.requested.name})"]
    lines.append(f"  {'type':<6} {'tensors':>8} {'parameters':>14} {'size':>12}")
    for kind, (count, elements, n_bytes) in sorted(rows.items(), key=lambda item: -item[1][2]):
        lines.append(f"  {kind:<6} {count:>8} {elements:>14,} {_size(n_bytes):>12}")
    total = [sum(r[i] for r in rows.values()) for i in range(3)]
    lines.append(f"  {'total':<6} {total[0]:>8} {total[1]:>14,} {_size(total[2]):>12}   file {_size(written.n_bytes)}")
    notes = [t for t in written.tensors if t.note]
    for tensor in notes[:max_notes]:
        lines.append(f"  fallback: {tensor.name} {list(tensor.shape)}: {tensor.note}")
    if len(notes) > max_notes:
        lines.append(f"  fallback: … and {len(notes) - max_notes} more tensors alike")
    return "\n".join(lines)


__all__ = [
    "CONVERT_TYPES",
    "MMPROJ_TYPES",
    "QUANTIZE_TYPES",
    "PlannedTensor",
    "WrittenFile",
    "convert_hf",
    "convert_qwencpp",
    "quantize_gguf",
    "summary_table",
    "tensor_type",
    "vocab_tokens",
]
