"""``qwenvl info``: what a model file or directory holds, without loading its weights.

For HF checkpoint directories (config.json, safetensors headers, tokenizer files), GGUF text models,
mmproj GGUFs and qwen.cpp GGML files: architecture, parameter count, a histogram of tensor types, context length,
shapes, special tokens and whether a chat template is present.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .errors import ModelFileError
from .runtime import threading_info, threads_note


def model_info(model: str | os.PathLike, mmproj: str | os.PathLike | None = None) -> dict[str, Any]:
    """A JSON-able description of a model (HF directory / hub id, GGUF text model or mmproj GGUF,
    qwen.cpp file, Meta checkpoint) and of the native kernels it would run on here."""
    info = _file_info(model, mmproj)
    info["kernels"] = _kernels()
    info["threading"] = threading_info()
    return info


def _file_info(model: str | os.PathLike, mmproj: str | os.PathLike | None) -> dict[str, Any]:
    from .weights.checkpoint import file_kind

    path = Path(model).expanduser()
    if file_kind(path) == "qwen.cpp":
        if mmproj is not None:
            raise ModelFileError(f"{mmproj}: --mmproj goes with a GGUF model, and {model} is a qwen.cpp file")
        return _qwencpp_info(path)
    if path.is_file():
        info = _gguf_info(path)
        if mmproj is not None:
            projector = _gguf_info(Path(mmproj))
            if "vision" not in projector or info.get("model") is None:
                raise ModelFileError(f"{mmproj}: --mmproj takes the vision GGUF of a text GGUF")
            info["vision"] = projector["vision"]
            info["model"] = info["vision"]["variant"]
        return info
    if mmproj is not None:
        raise ModelFileError(f"{mmproj}: --mmproj goes with a GGUF model, and {model} is not a .gguf file")
    from .weights.meta import is_meta_dir

    if is_meta_dir(path) and not (path / "config.json").is_file():
        return _meta_info(path)
    return _hf_info(model)


def _kernels() -> dict[str, Any]:
    """The native kernels this machine runs the model with (QWENVL_ISA; see qwenvl.ops)."""
    from . import ops

    return ops.describe()


# ----------------------------------------------------------------------------------------------
# GGUF


def _gguf_info(path: Path) -> dict[str, Any]:
    from .weights.gguf import open_gguf_file, read_gguf

    with open_gguf_file(path) as file:
        tensors = [(info.ggml_type.name, _numel(info.shape), info.n_bytes) for info in file.tensor_infos.values()]
        info: dict[str, Any] = {
            "source": str(path),
            "format": "gguf",
            "file_size": path.stat().st_size,
            "architecture": file.architecture,
            "name": file.metadata.get("general.name"),
            "file_type": file.metadata.get("general.file_type"),
            "parameters": sum(n for _, n, _ in tensors),
            "tensor_types": _histogram(tensors),
        }
        if file.architecture != "clip":
            matrices = {i.ggml_type.name for i in file.tensor_infos.values() if len(i.shape) == 2}
            _add_kernels(info["tensor_types"], matrices)
        if file.architecture == "clip":
            from .weights.mmproj import read_mmproj

            with read_mmproj(path) as projector:
                info["vision"] = _vision_info(projector, info["parameters"])
            return info
    with read_gguf(path) as model:
        text = model.config.text
        info.update(
            model=model.config.arch,
            context_length=text.max_position_embeddings,
            **_text_shape(text),
            special_tokens={
                key.removesuffix("_token_id"): {
                    "id": model.metadata[f"tokenizer.ggml.{key}"],
                    "token": model.token_text(model.metadata[f"tokenizer.ggml.{key}"]),
                }
                for key in ("bos_token_id", "eos_token_id", "padding_token_id", "eot_token_id", "eom_token_id")
                if f"tokenizer.ggml.{key}" in model.metadata
            },
            stop_token_ids=list(model.eos_token_ids),
            chat_template=model.chat_template is not None,
        )
    return info


def _qwencpp_info(path: Path) -> dict[str, Any]:
    """A qwen.cpp file: its header, tensor table and special ids (the vocabulary is a separate file)."""
    from .weights.qwencpp import read_qwencpp

    with read_qwencpp(path) as model:
        tensors = [(i.ggml_type.name, _numel(i.shape), i.n_bytes) for i in model.tensor_infos.values()]
        header, text = model.header, model.config.text
        info: dict[str, Any] = {
            "source": str(path),
            "format": "qwen.cpp",
            "file_size": path.stat().st_size,
            "architecture": "QWenLMHeadModel",
            "model": "qwen",
            "name": path.stem,
            "file_type": header.dtype.name,
            "parameters": sum(n for _, n, _ in tensors),
            "tensor_types": _histogram(tensors),
            "context_length": text.max_position_embeddings,
            "seq_length": text.seq_length,
            **_text_shape(text),
            "special_tokens": {
                name: {"id": getattr(header, key), "token": token}
                for name, key, token in (
                    ("eos", "eos_token_id", "<|endoftext|>"),
                    ("pad", "pad_token_id", "<|endoftext|>"),
                    ("im_start", "im_start_id", "<|im_start|>"),
                    ("im_end", "im_end_id", "<|im_end|>"),
                )
            },
            "stop_token_ids": list(model.generation_config.eos_token_ids),
            "chat_template": False,
        }
        matrices = {i.ggml_type.name for i in model.tensor_infos.values() if len(i.shape) == 2}
        _add_kernels(info["tensor_types"], matrices)
    return info


def _add_kernels(histogram: dict[str, dict[str, Any]], matrices: set[str]) -> None:
    """How ``qwenvl.load`` runs each format's matrices (1-D tensors, norms and biases, are dense)."""
    from gguf.constants import GGMLQuantizationType

    from .quant.linear import kernel_note

    for kind, row in histogram.items():
        if kind in matrices:
            row["kernel"], row["kernel_note"] = kernel_note(GGMLQuantizationType[kind])
        else:
            row["kernel"], row["kernel_note"] = "dense", "norms and biases, dense"


def _vision_info(projector: Any, parameters: int) -> dict[str, Any]:
    vision = projector.vision
    return {
        "variant": vision.variant,
        "projector_type": projector.metadata.get("clip.projector_type"),
        "layout": "qwen2_vl_surgery (legacy)" if projector.legacy else "convert_hf_to_gguf",
        "parameters": parameters,
        "depth": vision.depth,
        "hidden_size": vision.hidden_size,
        "heads": vision.num_heads,
        "intermediate_size": vision.intermediate_size,
        "out_hidden_size": vision.out_hidden_size,
        "activation": vision.hidden_act,
        "window_size": vision.window_size if vision.variant == "qwen2_5_vl" else None,
        "fullatt_block_indexes": list(vision.fullatt_block_indexes) if vision.variant == "qwen2_5_vl" else None,
        "image_mean": list(projector.preprocess_config.image_mean),
        "image_std": list(projector.preprocess_config.image_std),
    }


# ----------------------------------------------------------------------------------------------
# HF checkpoints


def _hf_info(model: str | os.PathLike) -> dict[str, Any]:
    from .config import model_config_from_hf
    from .tokenizer import Tokenizer
    from .weights import hf
    from .weights.checkpoint import check_weight_shapes

    directory = hf.resolve_model_dir(model)
    raw = hf.read_json(directory / "config.json") or {}
    config = model_config_from_hf(raw, where=str(directory / "config.json"))
    tensors = list(_hf_tensors(hf.weight_files(directory)))
    check_weight_shapes(config, hf.tensor_shapes(directory), str(directory / "config.json"))
    tokenizer = Tokenizer.from_dir(directory)
    text = config.text
    vision_parameters = sum(n for name, _, n, _ in tensors if "visual." in name)
    info: dict[str, Any] = {
        "source": str(directory),
        "format": "hf",
        "file_size": sum(f.stat().st_size for f in directory.iterdir() if f.is_file()),
        "architecture": (raw.get("architectures") or [raw.get("model_type")])[0],
        "model": config.arch,
        "name": directory.name,
        "parameters": sum(n for _, _, n, _ in tensors),
        "tensor_types": _histogram((kind, n, size) for _, kind, n, size in tensors),
        "context_length": text.max_position_embeddings,
        **_text_shape(text),
        "special_tokens": {
            name: {"id": getattr(tokenizer, f"{name}_token_id"), "token": getattr(tokenizer, f"{name}_token")}
            for name in ("bos", "eos", "pad")
            if getattr(tokenizer, f"{name}_token") is not None
        },
        "chat_template": tokenizer.chat_template is not None,
    }
    if config.vision is not None:
        vision = config.vision
        info["vision"] = {
            "variant": vision.variant,
            "parameters": vision_parameters,
            "depth": vision.depth,
            "hidden_size": vision.hidden_size,
            "heads": vision.num_heads,
            "intermediate_size": vision.intermediate_size,
            "out_hidden_size": vision.out_hidden_size,
            "activation": vision.hidden_act,
        }
    return info


def _meta_info(directory: Path) -> dict[str, Any]:
    """Meta's params.json + consolidated.*.pth: shapes from the shards' headers (memory-mapped, not merged)."""
    from .weights.meta import config_from_shapes, merged_shapes, shard_files, tokenizer_file

    files = shard_files(directory)
    shapes = merged_shapes(files)
    text = config_from_shapes(directory)
    tensors = [(str(dtype).removeprefix("torch.").upper().replace("BFLOAT", "BF").replace("FLOAT", "F"), _numel(s))
               for s, dtype in shapes.values()]  # fmt: skip
    sizes = {"F32": 4, "F16": 2, "BF16": 2}
    return {
        "source": str(directory),
        "format": "meta",
        "file_size": sum(f.stat().st_size for f in files),
        "architecture": f"Llama (params.json, {len(files)} shard{'s' if len(files) > 1 else ''})",
        "model": "llama",
        "name": directory.name,
        "parameters": sum(n for _, n in tensors),
        "tensor_types": _histogram((kind, n, n * sizes.get(kind, 4)) for kind, n in tensors),
        "context_length": text.max_position_embeddings,
        **_text_shape(text),
        "special_tokens": {},
        "tokenizer": str(tokenizer_file(directory)),
        "chat_template": False,
    }


def _hf_tensors(files: Iterable[Path]) -> Iterable[tuple[str, str, int, int]]:
    """(name, dtype, elements, bytes) of every tensor, from the safetensors headers (or a .bin's state)."""
    for file in files:
        if file.suffix != ".safetensors":
            from .weights.hf import iter_pickle

            for name, tensor in iter_pickle(file):
                kind = str(tensor.dtype).removeprefix("torch.").upper().replace("FLOAT", "F").replace("BFLOAT", "BF")
                yield name, kind, tensor.numel(), tensor.numel() * tensor.element_size()
            continue
        from .weights.hf import safetensors_header

        for name, entry in safetensors_header(file).items():
            begin, end = entry["data_offsets"]
            yield name, entry["dtype"], _numel(entry["shape"]), end - begin


# ----------------------------------------------------------------------------------------------
# Shared


def _numel(shape: Iterable[int]) -> int:
    count = 1
    for dim in shape:
        count *= int(dim)
    return count


def _histogram(tensors: Iterable[tuple[str, int, int]]) -> dict[str, dict[str, int]]:
    histogram: dict[str, dict[str, int]] = {}
    for kind, elements, n_bytes in tensors:
        row = histogram.setdefault(kind, {"tensors": 0, "parameters": 0, "bytes": 0})
        row["tensors"] += 1
        row["parameters"] += elements
        row["bytes"] += n_bytes
    return dict(sorted(histogram.items(), key=lambda item: -item[1]["bytes"]))


def _text_shape(text: Any) -> dict[str, Any]:
    return {
        "layers": text.num_hidden_layers,
        "hidden_size": text.hidden_size,
        "heads": text.num_attention_heads,
        "kv_heads": text.num_key_value_heads,
        "head_dim": text.head_dim,
        "intermediate_size": text.intermediate_size,
        "vocab_size": text.vocab_size,
        "rope_theta": text.rope_theta,
        "mrope_section": list(text.mrope_section) if text.mrope_section else None,
        "tied_embeddings": text.tie_word_embeddings,
    }


def _count(n: int) -> str:
    for unit, scale in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def _size(n_bytes: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.2f} {unit}"
    return f"{n_bytes} B"


# What ``qwenvl run`` does with a model that ships no chat template (chat.fallback_template)
NO_TEMPLATE = {
    "qwen": "no (Qwen's ChatML with its default system prompt is used)",
    "llama": "no (a base model: chat is refused, run --raw)",
    None: "no (plain ChatML is used)",
}


def format_info(info: dict[str, Any]) -> str:
    """The description as aligned lines of text."""
    lines = [f"{info['source']}"]

    def add(label: str, value: Any) -> None:
        lines.append(f"  {label:<16}{value}")

    add("format", f"{info['format'].upper()} ({info['architecture']}), {_size(info['file_size'])}")
    if info.get("model"):
        add("model", f"{info['model']}" + (f" — {info['name']}" if info.get("name") else ""))
    add("parameters", f"{_count(info['parameters'])} ({info['parameters']:,})")
    for index, (kind, row) in enumerate(info["tensor_types"].items()):
        runs = f"  {row['kernel_note']}" if "kernel" in row else ""
        add(
            "tensor types" if index == 0 else "",
            f"{kind:<6} {row['tensors']:>5} tensors {_count(row['parameters']):>9} params {_size(row['bytes']):>11}"
            + runs,
        )
    if "layers" in info:
        add("context length", info["context_length"])
        add(
            "text model",
            f"{info['layers']} layers, hidden {info['hidden_size']}, {info['heads']} heads "
            f"({info['kv_heads']} kv) of {info['head_dim']}, ffn {info['intermediate_size']}",
        )
        rope = f"theta {info['rope_theta']:g}" + (f", M-RoPE {info['mrope_section']}" if info["mrope_section"] else "")
        add("rope", rope)
        add("vocabulary", f"{info['vocab_size']} rows" + (", tied to the output" if info["tied_embeddings"] else ""))
        specials = ", ".join(
            f"{name} {entry['token']!r} ({entry['id']})" for name, entry in info["special_tokens"].items()
        )
        add("special tokens", specials or "none")
        add("chat template", "yes" if info["chat_template"] else NO_TEMPLATE.get(info.get("model"), NO_TEMPLATE[None]))
    kernels = info.get("kernels")
    if kernels:
        path = " + ".join([kernels["isa"], *kernels["extensions"]])
        tiles = ", AMX tiles for batched bf16 rows" if kernels["amx_tiles"] else ""
        add(
            "kernels",
            f"{path}{tiles} (this CPU runs {', '.join(kernels['cpu_runs'])}; QWENVL_ISA={kernels['requested']})",
        )
        if kernels.get("quantized_activations"):
            add(
                "activations",
                "exact (fp32/bf16) by default; --kernel q8 quantizes activations to int8 per 32 values, "
                "prompts and decoding (integer dot products, not exact)",
            )
    if info.get("threading"):
        add("threads", threads_note())
    vision = info.get("vision")
    if vision:
        line = (
            f"{vision['variant']}: {vision['depth']} blocks, hidden {vision['hidden_size']}, "
            f"{vision['heads']} heads, ffn {vision['intermediate_size']} ({vision['activation']}), "
            f"merger → {vision['out_hidden_size']}, {_count(vision['parameters'])} params"
        )
        add("vision", line)
        if vision.get("fullatt_block_indexes") is not None:
            add("", f"window {vision['window_size']} px, full attention in blocks {vision['fullatt_block_indexes']}")
        if vision.get("image_mean"):
            add("", f"image mean {vision['image_mean']}, std {vision['image_std']}")
    return "\n".join(lines)


__all__ = ["model_info", "format_info"]
