"""Hugging Face checkpoints: resolve a directory or hub id, read its json files and tensors."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from ..errors import ModelFileError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_FILE = "pytorch_model.bin"
PICKLE_INDEX_FILE = "pytorch_model.bin.index.json"


def looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def resolve_model_dir(name: str | os.PathLike) -> Path:
    """A local checkpoint directory, or a hub id fetched into (or found in) huggingface_hub's cache."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ModelFileError(f"{path}: not a checkpoint directory (a GGUF file needs the GGUF loader)")
    if not looks_like_hub_id(str(name)):
        raise ModelFileError(f"{name}: no such model directory")
    return _download_from_hub(str(name))


def _download_from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.tiktoken", "tokenizer.model"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except Exception:
        pass
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as exc:  # offline, unknown repo, gated repo...
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelFileError(
            f"{repo_id}: not in the local Hugging Face cache and could not be downloaded ({reason})"
        ) from None


def read_json(path: Path, *, required: bool = True) -> dict[str, Any] | None:
    if not path.is_file():
        if required:
            raise ModelFileError(f"{path}: file not found")
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelFileError(f"{path}: invalid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ModelFileError(f"{path}: expected a JSON object")
    return data


def weight_files(model_dir: Path) -> list[Path]:
    """The tensor files of a checkpoint, in the order transformers would read them."""
    for index_name in (INDEX_FILE, PICKLE_INDEX_FILE):
        index_path = model_dir / index_name
        if index_path.is_file():
            weight_map = (read_json(index_path) or {}).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ModelFileError(f"{index_path}: missing 'weight_map'")
            files = [model_dir / name for name in sorted(set(weight_map.values()))]
            for file in files:
                if not file.is_file():
                    raise ModelFileError(f"{file}: shard listed in {index_name} is missing")
            return files
    for name in (SINGLE_FILE, PICKLE_FILE):
        if (model_dir / name).is_file():
            return [model_dir / name]
    raise ModelFileError(f"{model_dir}: no {SINGLE_FILE}, {INDEX_FILE} or {PICKLE_FILE} found")


def iter_tensors(model_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) for every tensor of the checkpoint, one shard at a time."""
    for file in weight_files(model_dir):
        if file.suffix == ".safetensors":
            yield from _iter_safetensors(file)
        else:
            yield from _iter_pickle(file)


def _iter_safetensors(file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    try:
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                yield name, handle.get_tensor(name)
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelFileError(f"{file}: unreadable safetensors file ({exc})") from None


def _iter_pickle(file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # weights_only refuses arbitrary pickles: that is the point
        raise ModelFileError(f"{file}: cannot load as a weights-only PyTorch checkpoint ({exc})") from None
    if not isinstance(state, dict):
        raise ModelFileError(f"{file}: expected a state dict")
    yield from state.items()


def load_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    return dict(iter_tensors(model_dir))
