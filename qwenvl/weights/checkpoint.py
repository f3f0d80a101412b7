"""One view over every kind of model file: what a loader hands to the model builder."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import (
    GenerationConfig,
    ModelConfig,
    PreprocessConfig,
    generation_config_from_hf,
    model_config_from_hf,
    preprocess_config_from_hf,
)
from ..errors import ModelFileError
from ..tokenizer import Tokenizer
from . import hf


@dataclass
class Checkpoint:
    source: str
    config: ModelConfig
    tokenizer: Tokenizer
    generation_config: GenerationConfig
    preprocess_config: PreprocessConfig
    chat_template: str | None
    tensors: Callable[[], Mapping[str, torch.Tensor]]
    # The text weights as stored (GGUF blocks), for layers that keep them quantized; None for HF files.
    quantized: Any = None


def with_chat_stops(generation: GenerationConfig, arch: str, tokenizer: Tokenizer) -> GenerationConfig:
    """``generation`` with the architecture's chat stop tokens (chat.CHAT_STOP_TOKENS) added to its eos ids."""
    from ..chat import CHAT_STOP_TOKENS

    extra = [tokenizer.token_to_id(token) for token in CHAT_STOP_TOKENS.get(arch, ())]
    ids = tuple(dict.fromkeys([*generation.eos_token_ids, *(i for i in extra if i is not None)]))
    return dataclasses.replace(generation, eos_token_ids=ids)


def open_checkpoint(
    model: str | os.PathLike, mmproj: str | os.PathLike | None = None, tiktoken: str | os.PathLike | None = None
) -> Checkpoint:
    """An HF checkpoint directory / hub id, a GGUF file (with its vision ``mmproj`` GGUF, if any), a
    qwen.cpp GGML file (with the ``qwen.tiktoken`` it needs), or Meta's params.json + consolidated.*.pth."""
    path = Path(model).expanduser()
    kind = file_kind(path)
    if tiktoken is not None and kind != "qwen.cpp" and path.exists():
        raise ModelFileError(f"{tiktoken}: --tiktoken goes with a qwen.cpp GGML file, and {model} is not one")
    if kind == "gguf":
        from .gguf import open_gguf_checkpoint

        return open_gguf_checkpoint(path, mmproj=mmproj)
    if mmproj is not None:
        raise ModelFileError(f"{mmproj}: --mmproj goes with a GGUF model, and {model} is not a .gguf file")
    if kind == "qwen.cpp":
        from .qwencpp import open_qwencpp_checkpoint

        return open_qwencpp_checkpoint(path, tiktoken)
    from .meta import is_meta_dir, open_meta_checkpoint

    if is_meta_dir(path) and not (path / "config.json").is_file():
        return open_meta_checkpoint(path)
    return open_hf_checkpoint(model)


def file_kind(path: Path) -> str | None:
    """ "gguf" or "qwen.cpp" by the file's magic bytes (a ".gguf" name counts, to get GGUF's errors), else None."""
    if not path.is_file():
        return None
    try:
        with open(path, "rb") as handle:
            magic = handle.read(4)
    except OSError:
        magic = b""
    if magic == b"GGUF" or path.suffix.lower() == ".gguf":
        return "gguf"
    if magic == b"ggml":
        return "qwen.cpp"
    return None


def open_hf_checkpoint(model: str | os.PathLike) -> Checkpoint:
    directory = hf.resolve_model_dir(model)
    config_path = directory / "config.json"
    raw = hf.read_json(config_path)
    config = model_config_from_hf(raw, where=str(config_path))
    hf.weight_files(directory)  # fail early, before the tokenizer, on a directory with no weights
    tokenizer = Tokenizer.from_dir(directory)
    text_section = raw.get("text_config") or raw
    config_eos = raw.get("eos_token_id", text_section.get("eos_token_id"))
    fallback_eos = (config_eos,) if isinstance(config_eos, int) else tuple(config_eos or ())
    generation = generation_config_from_hf(
        hf.read_json(directory / "generation_config.json", required=False), fallback_eos
    )
    return Checkpoint(
        source=str(directory),
        config=config,
        tokenizer=tokenizer,
        generation_config=with_chat_stops(generation, config.arch, tokenizer),
        preprocess_config=preprocess_config_from_hf(
            hf.read_json(directory / "preprocessor_config.json", required=False)
        ),
        chat_template=tokenizer.chat_template,
        tensors=lambda: hf.load_tensors(directory),
    )
