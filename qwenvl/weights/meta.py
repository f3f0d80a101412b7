"""Meta's original Llama checkpoints: ``params.json`` + ``consolidated.00.pth`` … (model-parallel shards).

Each shard holds one model-parallel rank's slice of every matrix; they are merged as Meta's layers
split them (seed 003, llama2.c's ``export_meta_llama_bin.py``): the embedding (``tok_embeddings``),
``attention.wo`` and ``feed_forward.w2`` along dim 1, the other matrices along dim 0, 1-D tensors
(norms) taken from the first shard. The split dimension of each tensor is in the Llama layout
(``Piece.meta_split``). Shards load with ``torch.load(weights_only=True)`` (no code runs), memory-mapped.

Meta stores ``wq`` / ``wk`` with their rows interleaved per head (rope pairs (2i, 2i + 1)): they are put
in HF's rotate-half order (``layout.unpermute_rows``, ``wk`` with the key heads' count under GQA), and
every tensor renamed to HF's names, so the result is what HF's conversion script writes.

params.json: ``dim``, ``n_layers``, ``n_heads``, ``n_kv_heads`` (default n_heads), ``vocab_size`` (-1: the
embedding's rows), ``norm_eps``, ``rope_theta`` (default 10000), ``max_seq_len`` (default 2048, Meta's
ModelArgs); the MLP width is read from ``w1``. ``use_scaled_rope`` (Llama 3.1) is refused. The
SentencePiece ``tokenizer.model`` is looked for beside params.json, then in the directory above
(Meta's download layout).
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..config import GenerationConfig, ModelConfig, PreprocessConfig, TextConfig
from ..errors import ModelFileError
from .checkpoint import Checkpoint
from .layout import LLAMA, Piece, in_block, unpermute_rows

PARAMS = "params.json"
SHARD_GLOB = "consolidated.*.pth"
SKIPPED = ("rope.freqs",)  # LLaMA 1's precomputed frequencies: computed, not weights


def is_meta_dir(path: Path) -> bool:
    return path.is_dir() and (path / PARAMS).is_file() and any(path.glob(SHARD_GLOB))


def shard_files(directory: Path) -> list[Path]:
    files = sorted(directory.glob(SHARD_GLOB))
    if not files:
        raise ModelFileError(f"{directory}: no {SHARD_GLOB} beside {PARAMS}")
    return files


def read_params(directory: Path) -> dict[str, Any]:
    path = directory / PARAMS
    try:
        params = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelFileError(f"{path}: not a readable params.json ({error})") from None
    if not isinstance(params, dict):
        raise ModelFileError(f"{path}: expected a JSON object")
    for key in ("dim", "n_layers", "n_heads"):
        if not isinstance(params.get(key), int) or params[key] < 1:
            raise ModelFileError(f"{path}: field '{key}' must be a positive integer")
    if params.get("use_scaled_rope"):
        raise ModelFileError(f"{path}: use_scaled_rope (Llama 3.1's rope scaling) is not supported")
    return params


def _load_shard(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # weights_only refuses arbitrary pickles: that is the point
        reason = " ".join(str(error).split())[:200]
        raise ModelFileError(f"{path}: cannot load as a weights-only PyTorch checkpoint ({reason})") from None
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise ModelFileError(f"{path}: expected a state dict of tensors")
    return state


@functools.cache
def _meta_pieces() -> dict[str, Piece]:
    """Meta stem ("layers.{N}.attention.wq") → its table row."""
    return {piece.meta: piece for weight in LLAMA.weights for piece in weight.pieces if piece.meta}


def merge_shards(files: list[Path]) -> dict[str, torch.Tensor]:
    """Meta's tensors of all ranks merged, by Meta name (seed 003's ``concat_weights``)."""
    shards = [_load_shard(file) for file in files]
    merged = {}
    for name, dim in _check_shards(files, shards).items():
        tensors = [shard[name] for shard in shards]
        merged[name] = tensors[0] if dim is None or len(tensors) == 1 else torch.cat(tensors, dim=dim)
    return merged


def _check_shards(files: list[Path], shards: list[dict[str, torch.Tensor]]) -> dict[str, int | None]:
    """Each tensor's split dim (None: replicated), after checking the shards fit together."""
    names = list(shards[0])
    for file, shard in zip(files[1:], shards[1:]):
        if set(shard) != set(names):
            odd = sorted(set(shard) ^ set(names))[0]
            raise ModelFileError(
                f"{file}: its tensors differ from {files[0].name}'s (e.g. {odd}): shards of different models"
            )
    splits = {}
    for name in names:
        if name in SKIPPED:
            continue
        dim = splits[name] = _split_dim(name)
        first = shards[0][name]
        for file, shard in zip(files[1:], shards[1:]):
            shape = shard[name].shape
            if len(shape) != first.ndim or any(a != b for i, (a, b) in enumerate(zip(shape, first.shape)) if i != dim):
                raise ModelFileError(
                    f"{file}: tensor {name} has shape {list(shape)}, {files[0].name} has "
                    f"{list(first.shape)}: the shards do not belong together"
                )
    return splits


def _split_dim(name: str) -> int | None:
    """The dim Meta's model parallelism splits this tensor along (None: replicated; 1-D tensors are)."""
    stem = name.rsplit(".", 1)[0]
    generic = ".".join("{N}" if part.isdigit() else part for part in stem.split("."))
    piece = _meta_pieces().get(generic)
    return None if piece is None else piece.meta_split


def merged_shapes(files: list[Path]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Each merged tensor's shape and dtype, from the (memory-mapped) shards, without merging them."""
    shards = [_load_shard(file) for file in files]
    out = {}
    for name, dim in _check_shards(files, shards).items():
        shape = list(shards[0][name].shape)
        if dim is not None:
            shape[dim] = sum(shard[name].shape[dim] for shard in shards)
        out[name] = (tuple(shape), shards[0][name].dtype)
    return out


class _Shaped:
    def __init__(self, shape: tuple[int, ...]):
        self.shape = shape


def config_from_shapes(directory: Path) -> TextConfig:
    """The TextConfig of a Meta checkpoint from params.json and the shards' shapes (nothing merged)."""
    shapes = merged_shapes(shard_files(directory))
    return text_config(read_params(directory), {n: _Shaped(s) for n, (s, _) in shapes.items()}, directory / PARAMS)


def text_config(params: dict[str, Any], merged: Mapping[str, Any], where: Path) -> TextConfig:
    dim, heads = params["dim"], params["n_heads"]
    embedding, w1 = merged.get("tok_embeddings.weight"), merged.get("layers.0.feed_forward.w1.weight")
    if embedding is None or w1 is None:
        raise ModelFileError(f"{where}: the shards hold no tok_embeddings / layers.0.feed_forward.w1: not a Llama")
    vocab = params.get("vocab_size", -1)
    try:
        return TextConfig(
            vocab_size=embedding.shape[0] if vocab in (None, -1) else int(vocab),
            hidden_size=dim,
            intermediate_size=w1.shape[0],
            num_hidden_layers=params["n_layers"],
            num_attention_heads=heads,
            num_key_value_heads=int(params.get("n_kv_heads") or heads),
            head_dim=dim // heads,
            rms_norm_eps=float(params.get("norm_eps", 1e-5)),
            rope_theta=float(params.get("rope_theta", 10000.0)),
            max_position_embeddings=int(params.get("max_seq_len", 2048)),
            tie_word_embeddings="output.weight" not in merged,
            qkv_bias=False,
            o_bias=False,
            mlp_bias=False,
        )
    except ModelFileError as error:
        raise ModelFileError(f"{where}: {error}") from None


def hf_state(merged: Mapping[str, torch.Tensor], cfg: TextConfig, where: Path) -> dict[str, torch.Tensor]:
    """Meta's merged tensors under HF's names, q / k in HF's row order."""
    pieces = _meta_pieces()
    out = {}
    for name, tensor in merged.items():
        stem, suffix = name.rsplit(".", 1)
        parts = stem.split(".")
        layer = next((int(p) for p in parts if p.isdigit()), None)
        generic = ".".join("{N}" if p.isdigit() else p for p in parts)
        piece = pieces.get(generic)
        if piece is None:
            raise ModelFileError(f"{where}: unexpected tensor {name} in a Llama checkpoint")
        if piece.rope is not None:
            tensor = unpermute_rows(tensor, cfg.num_attention_heads if piece.rope == "q" else cfg.num_key_value_heads)
        out[f"{in_block(piece.hf, layer)}.{suffix}"] = tensor
    return out


def load_meta(directory: str | os.PathLike) -> tuple[dict[str, Any], TextConfig, dict[str, torch.Tensor]]:
    """(params, config, tensors under HF names) of a Meta checkpoint directory."""
    directory = Path(directory)
    params = read_params(directory)
    merged = merge_shards(shard_files(directory))
    cfg = text_config(params, merged, directory / PARAMS)
    return params, cfg, hf_state(merged, cfg, directory)


def tokenizer_file(directory: Path) -> Path:
    for candidate in (directory / "tokenizer.model", directory.parent / "tokenizer.model"):
        if candidate.is_file():
            return candidate
    raise ModelFileError(f"{directory}: no tokenizer.model beside params.json or in the directory above")


def open_meta_checkpoint(directory: str | os.PathLike) -> Checkpoint:
    from ..tokenizer import Tokenizer

    directory = Path(directory)
    cfg = config_from_shapes(directory)  # the shards are merged only when the weights are asked for
    tokenizer = Tokenizer.from_sentencepiece(tokenizer_file(directory))
    eos = tuple(i for i in (tokenizer.eos_token_id,) if i is not None)
    return Checkpoint(
        source=str(directory),
        config=ModelConfig(arch="llama", text=cfg),
        tokenizer=tokenizer,
        generation_config=GenerationConfig(eos_token_ids=eos),
        preprocess_config=PreprocessConfig(),
        chat_template=None,
        tensors=lambda: load_meta(directory)[2],
    )


__all__ = ["is_meta_dir", "load_meta", "merge_shards", "open_meta_checkpoint"]
