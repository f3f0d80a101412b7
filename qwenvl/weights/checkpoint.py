"""One view over every kind of model file: what a loader hands to the model builder."""

from __future__ import annotations

import os
import re
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
from ..models.text import VISION_PREFIXES, hf_shapes, text_weights
from ..models.vision import VisionTransformer, vision_weights
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
    # before the tokenizer, and before anything is built or allocated: the weights must fit the config
    check_weight_shapes(config, hf.tensor_shapes(directory), str(config_path))
    tokenizer = Tokenizer.from_dir(directory)
    generation_path = directory / "generation_config.json"
    preprocess_path = directory / "preprocessor_config.json"
    return Checkpoint(
        source=str(directory),
        config=config,
        tokenizer=tokenizer,
        generation_config=generation_config_from_hf(
            hf.read_json(generation_path, required=False), _config_eos(raw, str(config_path)), str(generation_path)
        ),
        preprocess_config=preprocess_config_from_hf(
            hf.read_json(preprocess_path, required=False), str(preprocess_path)
        ),
        chat_template=tokenizer.chat_template,
        tensors=lambda: hf.load_tensors(directory),
    )


def _config_eos(raw: dict[str, Any], where: str) -> tuple[int, ...]:
    """config.json's eos_token_id (top level, else text_config's): the fallback stop ids."""
    text = raw.get("text_config") if isinstance(raw.get("text_config"), dict) else raw
    eos = raw.get("eos_token_id", text.get("eos_token_id"))
    return generation_config_from_hf({"eos_token_id": eos}, where=where).eos_token_ids


_LAYER = re.compile(r"^layers\.(\d+)\.")
_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def check_weight_shapes(config: ModelConfig, shapes: Mapping[str, tuple[int, ...]], where: str) -> None:
    """The config's sizes against the tensors' shapes (HF names), before any model is built: the layer
    and block counts first (so an absurd depth never builds anything), then every tensor the decoder and
    the vision tower need. One line naming the config field or the tensor on a mismatch."""
    text = text_weights(shapes)  # type: ignore[arg-type]
    _check_count(where, "num_hidden_layers", config.text.num_hidden_layers, text, _LAYER, "decoder layers")
    if config.text.tie_word_embeddings and "embed_tokens.weight" in text:
        text.setdefault("lm_head.weight", text["embed_tokens.weight"])
    _compare(where, hf_shapes(config.text), text, _text_label(shapes))
    if config.vision is None:
        return
    vision = vision_weights(shapes)  # type: ignore[arg-type]
    _check_count(where, "vision_config.depth", config.vision.depth, vision, _BLOCK, "vision blocks")
    try:
        with torch.device("meta"):  # sizes only: nothing is allocated
            expected = {name: tuple(p.shape) for name, p in VisionTransformer(config.vision).named_parameters()}
    except ModelFileError as error:
        raise ModelFileError(f"{where}: {str(error).removeprefix('config: ')}") from None
    prefix = next((p for p in VISION_PREFIXES if any(n.startswith(p) for n in shapes)), VISION_PREFIXES[-1])
    _compare(where, expected, vision, lambda name: prefix + name)


def _check_count(where: str, field: str, configured: int, tensors: Mapping[str, Any], pattern: re.Pattern, what: str):
    found = {int(m[1]) for name in tensors if (m := pattern.match(name))}
    count = max(found) + 1 if found else 0
    if configured != count:
        raise ModelFileError(f"{where}: {field} is {configured} but the weights hold {count} {what}")


def _compare(
    where: str, expected: Mapping[str, tuple[int, ...]], found: Mapping[str, Any], label: Callable[[str], str]
) -> None:
    for name, shape in expected.items():
        if name not in found:
            raise ModelFileError(f"checkpoint: missing tensor '{label(name)}'")
        if tuple(found[name]) != tuple(shape):
            raise ModelFileError(
                f"checkpoint: tensor '{label(name)}' has shape {list(found[name])}, {where} needs {list(shape)}"
            )


def _text_label(shapes: Mapping[str, Any]) -> Callable[[str], str]:
    """Prefix-stripped decoder name → the checkpoint's own name (as published checkpoints name a missing one)."""
    source = {}
    for name in shapes:
        for short in text_weights({name: None}):  # type: ignore[dict-item]
            source[short] = name
    return lambda short: source.get(short) or (short if short == "lm_head.weight" else f"model.{short}")
