"""Export a GGUF text model as a Hugging Face checkpoint directory (Qwen2ForCausalLM).

The weights are dequantized one tensor at a time and streamed into a single ``model.safetensors``
(its header is known up front from the GGUF shapes), so exporting needs memory for one tensor, not
for the model. Everything is written into a hidden directory next to ``out_dir`` and renamed into
place at the end: an ``out_dir`` that exists is always complete.

Stop tokens (generation_config.json ``eos_token_id``): the GGUF's ``eos_token_id``, then its
``eot_token_id`` / ``eom_token_id`` when the file names them; nothing is added from outside the file.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import sys
from pathlib import Path
from typing import Any, BinaryIO

import torch
from tqdm import tqdm

from ..errors import ModelFileError
from .gguf import GGUFModel, read_gguf

SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def export_hf(
    gguf_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Write config, weights and tokenizer of a GGUF text model as an HF checkpoint; return out_dir.

    float32 keeps every dequantized value exactly; bfloat16 / float16 round most of them.
    """
    if dtype not in SAFETENSORS_DTYPES:
        raise ValueError(f"dtype must be one of {list(SAFETENSORS_DTYPES)}, not {dtype}")
    out_dir = Path(out_dir)
    _check_target(out_dir, overwrite)
    with read_gguf(gguf_path) as model:
        if model.config.arch != "qwen2":
            raise ModelFileError(
                f"{model.path}: export_hf writes Qwen2ForCausalLM; a {model.config.arch} text model is not exported"
            )
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        try:
            _write_checkpoint(model, staging, dtype, progress)
            _move_into_place(staging, out_dir, overwrite)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return out_dir


def _write_checkpoint(model: GGUFModel, directory: Path, dtype: torch.dtype, progress: bool) -> None:
    write_safetensors(model, directory / "model.safetensors", dtype, progress=progress)
    (directory / "tokenizer.json").write_text(model.tokenizer_json, encoding="utf-8")
    _write_json(directory / "tokenizer_config.json", tokenizer_config(model))
    _write_json(directory / "generation_config.json", generation_config(model))
    _write_json(directory / "config.json", hf_config(model, dtype))  # last: a config means complete


def _check_target(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ModelFileError(f"{out_dir}: exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise ModelFileError(f"{out_dir}: exists and is not empty (pass overwrite=True to replace it)")


def _move_into_place(staging: Path, out_dir: Path, overwrite: bool) -> None:
    _check_target(out_dir, overwrite)
    if not out_dir.exists():
        staging.rename(out_dir)
        return
    old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
    out_dir.rename(old)
    staging.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# Weights


def write_safetensors(model: GGUFModel, path: Path, dtype: torch.dtype, *, progress: bool = False) -> None:
    """Stream every tensor of ``model`` (dequantized, cast to dtype) into one safetensors file."""
    item_size = torch.empty((), dtype=dtype).element_size()
    entries: dict[str, Any] = {}
    offset = 0
    for name in model.hf_names():
        shape = list(model.info(name).shape)
        size = item_size * _numel(shape)
        entries[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    header = json.dumps({"__metadata__": {"format": "pt"}, **entries}, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the format pads the header to 8 bytes
    with open(path, "wb") as handle, tqdm(
        total=offset, unit="B", unit_scale=True, desc="export", disable=not progress, file=sys.stderr
    ) as bar:
        handle.write(struct.pack("<Q", len(header)))
        handle.write(header)
        for name in entries:
            written = _write_tensor(handle, model.tensor(name).to(dtype))
            bar.update(written)


def _write_tensor(handle: BinaryIO, tensor: torch.Tensor) -> int:
    data = tensor.contiguous().view(torch.uint8).numpy()  # little-endian like the format (CPU torch)
    handle.write(memoryview(data).cast("B"))
    return data.nbytes


def _numel(shape: list[int]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


# ----------------------------------------------------------------------------------------------
# json files


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def hf_config(model: GGUFModel, dtype: torch.dtype) -> dict[str, Any]:
    """config.json, in the shape of the published Qwen2 / Qwen2.5 ones."""
    text = model.config.text
    config = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "attention_dropout": 0.0,
        "bos_token_id": model.bos_token_id,
        "eos_token_id": model.eos_token_id,
        "pad_token_id": model.pad_token_id,
        "hidden_act": "silu",
        "hidden_size": text.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": text.intermediate_size,
        "max_position_embeddings": text.max_position_embeddings,
        "max_window_layers": text.num_hidden_layers,
        "num_attention_heads": text.num_attention_heads,
        "num_hidden_layers": text.num_hidden_layers,
        "num_key_value_heads": text.num_key_value_heads,
        "rms_norm_eps": text.rms_norm_eps,
        "rope_scaling": None,
        "rope_theta": text.rope_theta,
        "sliding_window": text.max_position_embeddings,
        "tie_word_embeddings": text.tie_word_embeddings,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": text.vocab_size,
    }
    if text.head_dim != text.hidden_size // text.num_attention_heads:
        config["head_dim"] = text.head_dim
    return config


def tokenizer_config(model: GGUFModel) -> dict[str, Any]:
    """tokenizer_config.json: the special tokens, the added-token table and the chat template."""
    added = {
        str(token_id): {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": special,
        }
        for token_id, content, special in model.added_tokens
    }
    config: dict[str, Any] = {
        "add_bos_token": model.add_bos_token,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "bos_token": model.bos_token,
        "clean_up_tokenization_spaces": False,
        "eos_token": model.token_text(model.eos_token_id),
        "errors": "replace",
        "model_max_length": model.config.text.max_position_embeddings,
        "pad_token": model.token_text(model.pad_token_id),
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    if model.chat_template is not None:
        config["chat_template"] = model.chat_template
    return config


def generation_config(model: GGUFModel) -> dict[str, Any]:
    eos = list(model.eos_token_ids)
    config: dict[str, Any] = {
        "bos_token_id": model.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else eos,
        "pad_token_id": model.pad_token_id,
    }
    return {key: value for key, value in config.items() if value not in (None, [])}


__all__ = ["export_hf", "write_safetensors", "hf_config", "tokenizer_config", "generation_config"]
