"""One view over every kind of model file: what a loader hands to the model builder."""

from __future__ import annotations

import dataclasses
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
from ..models.vision import VisionTransformer, vision_weights
from ..tokenizer import Tokenizer
from . import hf
from .layout import VISION_PREFIXES, canonical_name, layout_for


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
    # before the tokenizer, and before anything is built or allocated: the weights must fit the config
    check_weight_shapes(config, hf.tensor_shapes(directory), str(config_path))
    tokenizer = Tokenizer.from_dir(directory)
    generation_path = directory / "generation_config.json"
    preprocess_path = directory / "preprocessor_config.json"
    generation = generation_config_from_hf(
        hf.read_json(generation_path, required=False), _config_eos(raw, str(config_path)), str(generation_path)
    )
    return Checkpoint(
        source=str(directory),
        config=config,
        tokenizer=tokenizer,
        generation_config=with_chat_stops(generation, config.arch, tokenizer),
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


_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def check_weight_shapes(config: ModelConfig, shapes: Mapping[str, tuple[int, ...]], where: str) -> None:
    """The config's sizes against the tensors' shapes, before any model is built: the layer and block
    counts first (so an absurd depth never builds anything), then every tensor the decoder (its
    architecture's layout) and the vision tower need. One line naming the config field or the tensor."""
    layout = layout_for(config.arch)
    stored = {canonical_name(name): name for name in shapes if not name.startswith(VISION_PREFIXES)}
    text = {name: shapes[original] for name, original in stored.items()}
    layers = layout.block_count(text)
    if config.text.num_hidden_layers != layers:
        raise ModelFileError(
            f"{where}: num_hidden_layers is {config.text.num_hidden_layers} but the weights hold {layers} decoder layers"
        )
    _compare(where, layout.hf_shapes(config.text), text, lambda name: stored.get(name, name))
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
