"""One view over every kind of model file: what a loader hands to the model builder."""

from __future__ import annotations

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


def open_checkpoint(model: str | os.PathLike, mmproj: str | os.PathLike | None = None) -> Checkpoint:
    """An HF checkpoint directory / hub id, or a GGUF file (with its vision ``mmproj`` GGUF, if any)."""
    path = Path(model).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        from .gguf import open_gguf_checkpoint

        return open_gguf_checkpoint(path, mmproj=mmproj)
    if mmproj is not None:
        raise ModelFileError(f"{mmproj}: --mmproj goes with a GGUF model, and {model} is not a .gguf file")
    return open_hf_checkpoint(model)


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
    return Checkpoint(
        source=str(directory),
        config=config,
        tokenizer=tokenizer,
        generation_config=generation_config_from_hf(
            hf.read_json(directory / "generation_config.json", required=False), fallback_eos
        ),
        preprocess_config=preprocess_config_from_hf(
            hf.read_json(directory / "preprocessor_config.json", required=False)
        ),
        chat_template=tokenizer.chat_template,
        tensors=lambda: hf.load_tensors(directory),
    )
