"""qwen.cpp GGML files written from the layout seed 003 describes (qwen.cpp's convert.py), for tests.

``write_qwencpp`` writes a Qwen (v1) state dict the way ``QwenConverter`` does: the magic, 12 int32
config values, then each tensor (name length, name, ndim, PyTorch shape, GGML type, zero padding to
16 bytes, data), 2-D tensors in the requested type and 1-D ones in F32. Its quantizers follow the
seed's formulas (Q8_0: scale = amax / 127; Q4_0: scale = the signed max / -8, levels + 8; Q4_1 and
Q5_1: (max - min) / 15 or 31 with the min; Q5_0: the signed max / -16, as the seed means it — its
slicing slip is what tests/test_qwencpp.py shows). It returns the dequantized values ("the twin").
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import torch
from gguf import quants as gguf_quants
from gguf.constants import GGMLQuantizationType as Q

TYPES = {"f32": (0, Q.F32), "f16": (1, Q.F16), "q4_0": (2, Q.Q4_0), "q4_1": (3, Q.Q4_1), "q5_0": (6, Q.Q5_0)}
TYPES |= {"q5_1": (7, Q.Q5_1), "q8_0": (8, Q.Q8_0)}


def _fp16_bytes(values: torch.Tensor) -> torch.Tensor:
    return values.half().view(torch.int8)


def quantize_q8_0(t: torch.Tensor) -> torch.Tensor:
    t = t.view(-1, 32)
    scale = t.abs().max(dim=-1, keepdim=True).values / 127
    q = (t / scale).round().clamp(-128, 127).char()
    return torch.cat((_fp16_bytes(scale), q), dim=-1)


def _signed_max(t: torch.Tensor) -> torch.Tensor:
    return torch.take_along_dim(t, t.abs().max(dim=-1, keepdim=True).indices, dim=-1)


def quantize_q4_0(t: torch.Tensor) -> torch.Tensor:
    t = t.view(-1, 32)
    scale = _signed_max(t) / -8
    q = (t / scale + 8).round().clamp(0, 15).char()
    return torch.cat((_fp16_bytes(scale), q[:, :16] | (q[:, 16:] << 4)), dim=-1)


def quantize_q4_1(t: torch.Tensor) -> torch.Tensor:
    t = t.view(-1, 32)
    low, high = t.min(dim=-1, keepdim=True).values, t.max(dim=-1, keepdim=True).values
    scale = (high - low) / 15
    q = ((t - low) / scale).round().clamp(0, 15).char()
    return torch.cat((_fp16_bytes(scale), _fp16_bytes(low), q[:, :16] | (q[:, 16:] << 4)), dim=-1)


def _high_bits(q: torch.Tensor) -> torch.Tensor:
    qh = torch.zeros(q.shape[:-1], dtype=torch.int32)
    for i in range(32):
        qh |= ((q[:, i] & 0x10) >> 4).int() << i
    return qh[..., None].view(torch.int8)


def quantize_q5_0(t: torch.Tensor) -> torch.Tensor:
    t = t.view(-1, 32)
    scale = _signed_max(t) / -16
    q = (t / scale + 16).round().clamp(0, 31).char()
    qs = (q[:, :16] & 0x0F) | (q[:, 16:] << 4)  # the seed writes q[: 16:] here (see test_qwencpp.py)
    return torch.cat((_fp16_bytes(scale), _high_bits(q), qs), dim=-1)


def quantize_q5_1(t: torch.Tensor) -> torch.Tensor:
    t = t.view(-1, 32)
    low, high = t.min(dim=-1, keepdim=True).values, t.max(dim=-1, keepdim=True).values
    scale = (high - low) / 31
    q = ((t - low) / scale).round().clamp(0, 31).char()
    qs = (q[:, :16] & 0x0F) | (q[:, 16:] << 4)
    return torch.cat((_fp16_bytes(scale), _fp16_bytes(low), _high_bits(q), qs), dim=-1)


QUANTIZERS = {"q8_0": quantize_q8_0, "q4_0": quantize_q4_0, "q4_1": quantize_q4_1}
QUANTIZERS |= {"q5_0": quantize_q5_0, "q5_1": quantize_q5_1}


def weight_names(layers: int) -> list[str]:
    """QwenConverter.dump_model's order."""
    names = ["transformer.wte.weight"]
    for i in range(layers):
        block = f"transformer.h.{i}."
        names += [block + n for n in ("ln_1.weight", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight")]
        names += [block + n for n in ("ln_2.weight", "mlp.w1.weight", "mlp.w2.weight", "mlp.c_proj.weight")]
    return names + ["transformer.ln_f.weight", "lm_head.weight"]


def header_values(config: dict, kind: str, seq_length: int | None = None) -> list[int]:
    heads = config["num_attention_heads"]
    return [
        TYPES[kind][0],
        config["vocab_size"],
        config["hidden_size"],
        heads,
        heads,
        config["num_hidden_layers"],
        config["intermediate_size"],
        seq_length or config["seq_length"],
        151643,  # eos (generation_config)
        151643,  # pad
        151644,  # <|im_start|>
        151645,  # <|im_end|>
    ]


def write_qwencpp(path: Path, state: dict[str, torch.Tensor], config: dict, kind: str) -> dict[str, torch.Tensor]:
    """Write the file; return every tensor as the file's data dequantizes (the twin's weights)."""
    twin = {}
    with open(path, "wb") as f:
        f.write(b"ggml")
        f.write(struct.pack("<12i", *header_values(config, kind)))
        for name in weight_names(config["num_hidden_layers"]):
            tensor = state[name].float()
            type_id, qtype = TYPES[kind] if tensor.ndim == 2 else TYPES["f32"]
            f.write(struct.pack("<i", len(name.encode())) + name.encode())
            f.write(struct.pack(f"<{2 + tensor.ndim}i", tensor.ndim, *tensor.shape, type_id))
            if qtype == Q.F32:
                data = tensor.numpy()
            elif qtype == Q.F16:
                data = tensor.half().numpy()
            else:
                data = QUANTIZERS[kind](tensor).numpy()
            f.seek((f.tell() + 15) // 16 * 16)
            data.tofile(f)
            raw = np.frombuffer(data.tobytes(), dtype=np.uint8).reshape(tensor.shape[0], -1)
            values = gguf_quants.dequantize(raw, qtype) if qtype != Q.F32 else data
            twin[name] = torch.from_numpy(np.array(values, dtype=np.float32).reshape(tensor.shape))
    return twin
