"""Hugging Face checkpoints: resolve a directory or hub id, read its json files and tensors."""

from __future__ import annotations

import json
import os
import struct
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


NOT_A_MODEL = "not a model: expected a checkpoint directory (config.json + weights), a .gguf file or a hub id"


def looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def resolve_model_dir(name: str | os.PathLike) -> Path:
    """A local checkpoint directory, or a hub id fetched into (or found in) huggingface_hub's cache."""
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelFileError(f"{path}: {NOT_A_MODEL} (this folder has no config.json)")
        return path
    if path.exists():
        raise ModelFileError(f"{path}: {NOT_A_MODEL}")
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
            yield from iter_pickle(file)


def _iter_safetensors(file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    try:
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                yield name, handle.get_tensor(name)
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelFileError(f"{file}: unreadable safetensors file ({exc})") from None


def iter_pickle(file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # weights_only refuses arbitrary pickles: that is the point
        raise ModelFileError(f"{file}: cannot load as a weights-only PyTorch checkpoint ({exc})") from None
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise ModelFileError(f"{file}: expected a state dict of tensors")
    yield from state.items()


# safetensors dtypes → bytes per element (the format's own list)
SAFETENSORS_ITEM_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit


def safetensors_header(file: Path) -> dict[str, dict[str, Any]]:
    """The tensor entries of a safetensors file's header (name → dtype, shape, data_offsets), each
    checked: a known dtype, a shape of non-negative integers, offsets inside the file that hold exactly
    the shape's bytes. Anything else is a one-line ModelFileError naming the file and the tensor."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise ModelFileError(f"{file}: unreadable safetensors file (shorter than its 8-byte header length)")
            (length,) = struct.unpack("<Q", prefix)
            if length > min(MAX_HEADER_BYTES, size - 8):
                raise ModelFileError(
                    f"{file}: unreadable safetensors file (header length {length} does not fit the file)"
                )
            header = json.loads(handle.read(length))
    except OSError as exc:
        raise ModelFileError(f"{file}: cannot read ({exc.strerror or exc})") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise ModelFileError(f"{file}: unreadable safetensors file (header: {_one_line(exc)})") from None
    if not isinstance(header, dict):
        raise ModelFileError(f"{file}: unreadable safetensors file (header: not a JSON object)")
    data_bytes = size - 8 - length
    entries = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        entries[name] = _checked_entry(file, name, entry, data_bytes)
    return entries


def _checked_entry(file: Path, name: str, entry: Any, data_bytes: int) -> dict[str, Any]:
    def bad(problem: str) -> ModelFileError:
        return ModelFileError(f"{file}: unreadable safetensors file (header entry {name!r}: {problem})")

    if not isinstance(entry, dict):
        raise bad("not a JSON object")
    dtype = entry.get("dtype")
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_ITEM_BYTES:
        raise bad(f"unknown dtype {json.dumps(dtype)}")
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(type(d) is int and 0 <= d < 2**62 for d in shape):
        raise bad(f"shape must be a list of non-negative integers, got {json.dumps(shape)[:60]}")
    offsets = entry.get("data_offsets")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
        raise bad(f"data_offsets must be [begin, end], got {json.dumps(offsets)[:60]}")
    begin, end = offsets
    numel = 1
    for dim in shape:
        numel *= dim
    if not 0 <= begin <= end <= data_bytes or end - begin != numel * SAFETENSORS_ITEM_BYTES[dtype]:
        raise bad(f"data_offsets {offsets} do not hold {shape} {dtype} values inside the file")
    return {"dtype": dtype, "shape": tuple(shape), "data_offsets": (begin, end)}


def tensor_shapes(model_dir: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape, from the safetensors headers (nothing loaded), or a .bin's mapped state."""
    shapes: dict[str, tuple[int, ...]] = {}
    for file in weight_files(model_dir):
        if file.suffix == ".safetensors":
            shapes.update((name, entry["shape"]) for name, entry in safetensors_header(file).items())
        else:
            shapes.update((name, tuple(tensor.shape)) for name, tensor in iter_pickle(file))
    return shapes


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def load_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    return dict(iter_tensors(model_dir))
