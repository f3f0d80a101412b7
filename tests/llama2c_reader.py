"""A reader of llama2.c's model files, written from its format (run.c / runq.c's read_checkpoint and
memory_map_weights), and its forward pass (run.c's: rope on pairs (2i, 2i + 1), RMSNorm eps 1e-5,
GQA by h // (n_heads / n_kv_heads)), for tests. llama2.c itself is not used here."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


@dataclass
class Llama2c:
    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    seq_len: int
    shared: bool
    weights: dict[str, torch.Tensor]  # tok, att_norm[l], wq[l] ..., final_norm, cls
    version: int
    group_size: int | None = None


def _take(data: bytes, offset: int, count: int, dtype: str) -> tuple[np.ndarray, int]:
    size = np.dtype(dtype).itemsize * count
    if offset + size > len(data):
        raise ValueError(f"the file ends at {len(data)}, a tensor needs bytes up to {offset + size}")
    return np.frombuffer(data, dtype=dtype, count=count, offset=offset).copy(), offset + size


def read_llama2c(path: Path) -> Llama2c:
    data = path.read_bytes()
    magic = struct.unpack_from("<I", data, 0)[0]
    if magic == 0x616B3432:
        return _read_v2(data)
    dim, hidden, layers, heads, kv_heads, vocab, seq_len = struct.unpack_from("<7i", data, 0)
    shared, vocab = vocab > 0, abs(vocab)
    head = dim // heads
    kv = kv_heads * head
    offset = 28
    weights = {}

    def take(name: str, *shape: int) -> None:
        nonlocal offset
        values, offset = _take(data, offset, int(np.prod(shape)), "<f4")
        weights[name] = torch.from_numpy(values.reshape(shape))

    take("tok", vocab, dim)
    for kind, shape in (("att_norm", (dim,)), ("wq", (dim, dim)), ("wk", (kv, dim)), ("wv", (kv, dim))):
        for layer in range(layers):
            take(f"{kind}{layer}", *shape)
    for kind, shape in (("wo", (dim, dim)), ("ffn_norm", (dim,)), ("w1", (hidden, dim))):
        for layer in range(layers):
            take(f"{kind}{layer}", *shape)
    for kind, shape in (("w2", (dim, hidden)), ("w3", (hidden, dim))):
        for layer in range(layers):
            take(f"{kind}{layer}", *shape)
    take("final_norm", dim)
    take("freq_cos", seq_len, head // 2)
    take("freq_sin", seq_len, head // 2)
    if not shared:
        take("cls", vocab, dim)
    if offset != len(data):
        raise ValueError(f"{len(data) - offset} bytes after the last tensor")
    weights["cls"] = weights.get("cls", weights["tok"])
    return Llama2c(dim, hidden, layers, heads, kv_heads, vocab, seq_len, shared, weights, 0)


def _read_v2(data: bytes) -> Llama2c:
    version = struct.unpack_from("<i", data, 4)[0]
    dim, hidden, layers, heads, kv_heads, vocab, seq_len = struct.unpack_from("<7i", data, 8)
    shared, group = struct.unpack_from("<Bi", data, 36)
    if version != 2 or any(data[41:256]):
        raise ValueError("not a version-2 header")
    head = dim // heads
    kv = kv_heads * head
    offset = 256
    weights = {}

    def floats(name: str, *shape: int) -> None:
        nonlocal offset
        values, offset = _take(data, offset, int(np.prod(shape)), "<f4")
        weights[name] = torch.from_numpy(values.reshape(shape))

    def quantized(name: str, *shape: int) -> None:
        nonlocal offset
        count = int(np.prod(shape))
        values, offset = _take(data, offset, count, "i1")
        scales, offset = _take(data, offset, count // group, "<f4")
        dequantized = values.astype(np.float32).reshape(-1, group) * scales[:, None]
        weights[name] = torch.from_numpy(dequantized.reshape(shape))

    for kind in ("att_norm", "ffn_norm"):
        for layer in range(layers):
            floats(f"{kind}{layer}", dim)
    floats("final_norm", dim)
    quantized("tok", vocab, dim)
    for kind, shape in (("wq", (dim, dim)), ("wk", (kv, dim)), ("wv", (kv, dim)), ("wo", (dim, dim))):
        for layer in range(layers):
            quantized(f"{kind}{layer}", *shape)
    for kind, shape in (("w1", (hidden, dim)), ("w2", (dim, hidden)), ("w3", (hidden, dim))):
        for layer in range(layers):
            quantized(f"{kind}{layer}", *shape)
    if not shared:
        quantized("cls", vocab, dim)
    if offset != len(data):
        raise ValueError(f"{len(data) - offset} bytes after the last tensor")
    weights["cls"] = weights.get("cls", weights["tok"])
    return Llama2c(dim, hidden, layers, heads, kv_heads, vocab, seq_len, bool(shared), weights, 2, group)


def _rmsnorm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))


def _rope_pairs(x: torch.Tensor, head: int) -> torch.Tensor:
    """run.c's rope on x [L, heads * head]: pairs (2i, 2i + 1) of each head turn by pos / 10000^(2i / head)."""
    length = x.shape[0]
    freqs = 1.0 / 10000.0 ** (torch.arange(0, head, 2).float() / head)
    angles = torch.arange(length).float()[:, None] * freqs  # [L, head / 2]
    pairs = x.view(length, -1, head // 2, 2)
    cos, sin = angles.cos()[:, None], angles.sin()[:, None]
    first, second = pairs[..., 0], pairs[..., 1]
    return torch.stack((first * cos - second * sin, first * sin + second * cos), dim=-1).view_as(x)


def forward(model: Llama2c, ids: list[int]) -> torch.Tensor:
    """Logits [L, vocab] of run.c's forward over a whole sequence (causal)."""
    w, head = model.weights, model.dim // model.n_heads
    repeat = model.n_heads // model.n_kv_heads
    x = w["tok"][torch.tensor(ids)]
    length = len(ids)
    mask = torch.ones(length, length).tril().bool()
    for layer in range(model.n_layers):
        h = _rmsnorm(x, w[f"att_norm{layer}"])
        q = _rope_pairs(h @ w[f"wq{layer}"].T, head).view(length, model.n_heads, head)
        k = _rope_pairs(h @ w[f"wk{layer}"].T, head).view(length, model.n_kv_heads, head)
        v = (h @ w[f"wv{layer}"].T).view(length, model.n_kv_heads, head)
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) / head**0.5
        attention = scores.masked_fill(~mask, float("-inf")).softmax(-1)
        out = torch.einsum("hqk,khd->qhd", attention, v).reshape(length, -1)
        x = x + out @ w[f"wo{layer}"].T
        h = _rmsnorm(x, w[f"ffn_norm{layer}"])
        x = x + (torch.nn.functional.silu(h @ w[f"w1{layer}"].T) * (h @ w[f"w3{layer}"].T)) @ w[f"w2{layer}"].T
    return _rmsnorm(x, w["final_norm"]) @ w["cls"].T


def read_tokenizer_bin(path: Path, vocab_size: int) -> tuple[int, list[tuple[float, bytes]]]:
    """(max token length, [(score, bytes)] for each id), as run.c's build_tokenizer reads it."""
    data = path.read_bytes()
    (max_length,) = struct.unpack_from("<I", data, 0)
    offset, entries = 4, []
    for _ in range(vocab_size):
        score, length = struct.unpack_from("<fi", data, offset)
        offset += 8
        entries.append((score, data[offset : offset + length]))
        offset += length
    if offset != len(data):
        raise ValueError(f"{len(data) - offset} bytes after the last token")
    return max_length, entries
