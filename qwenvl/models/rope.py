"""Rotary position embeddings for the text decoder: 1-D RoPE and Qwen2-VL's M-RoPE.

M-RoPE gives every token three position ids (temporal, height, width). The head_dim/2 rotary
frequencies are split into ``mrope_section`` chunks; chunk i rotates by the id of axis i % 3.
Text tokens carry the same id on all three axes, so for text-only input M-RoPE equals 1-D RoPE.

Qwen (v1) past its training length (its published modeling_qwen.py): dynamic NTK raises the rope
base by a factor ``dynamic_ntk_alpha`` of the prompt's length (fixed for the whole request, as
Qwen caches it at the prefill), and logn attention scales the query at position p by
log(p + 1) / log(seq_length) once p + 1 exceeds seq_length (``logn_scale``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import RequestError

TEXT, IMAGE, VIDEO = 0, 1, 2


def rope_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    steps = torch.arange(0, head_dim, 2, dtype=torch.float32, device="cpu")
    return 1.0 / (theta ** (steps / head_dim))


def dynamic_ntk_alpha(length: int, seq_length: int) -> int:
    """Qwen's ``get_ntk_alpha``: 1 for up to ``seq_length`` tokens, then 2^ceil(log2(length / seq_length) + 1) - 1."""
    context_value = math.log(length / seq_length, 2) + 1
    return max(2 ** math.ceil(context_value) - 1, 1)


def ntk_inv_freq(head_dim: int, theta: float, alpha: float) -> torch.Tensor:
    """Inverse frequencies with Qwen's NTK-scaled base theta · alpha^(d / (d - 2)) (computed as Qwen does)."""
    return rope_inv_freq(head_dim, theta * alpha ** (head_dim / (head_dim - 2)) if alpha != 1 else theta)


def logn_scale(positions: torch.Tensor, seq_length: int) -> torch.Tensor:
    """Qwen's logn factor (float32) for each position: log(p + 1) / log(seq_length) where p + 1 > seq_length, else 1."""
    count = positions.double() + 1
    return torch.where(count > seq_length, count.log() / math.log(seq_length), 1.0).float()


def rope_cos_sin(
    position_ids: torch.Tensor, inv_freq: torch.Tensor, mrope_section: Sequence[int] | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [B, L, head_dim] (float32) for position ids [3, B, L]."""
    freqs = position_ids[..., None].float() * inv_freq  # [3, B, L, head_dim/2]
    if mrope_section is None:
        freqs = freqs[0]
    else:
        chunks = freqs.split(list(mrope_section), dim=-1)
        freqs = torch.cat([chunk[axis % 3] for axis, chunk in enumerate(chunks)], dim=-1)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """sin with its first half negated: HF's rotate_half(x) * sin == x.roll(head_dim/2) * signed_sin(sin)."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def apply_rope_heads(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, L, heads, head_dim] by cos / signed sin [B, L, 1, head_dim] (HF's
    ``x * cos + rotate_half(x) * sin`` in three ops; the per-token path runs it once per layer for q
    and k together)."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin_signed)


def text_position_ids(start: int, length: int) -> torch.Tensor:
    """[3, length] ids for plain text continuing at ``start``."""
    return torch.arange(start, start + length).expand(3, -1).clone()


@dataclass(frozen=True)
class VisualSpan:
    """One image or video as the prompt sees it: its patch grid and, for video, seconds per temporal patch."""

    kind: int  # IMAGE or VIDEO
    grid_thw: tuple[int, int, int]
    second_per_grid: float = 1.0


def mrope_position_ids(
    input_ids: Sequence[int],
    spans: Sequence[VisualSpan],
    *,
    image_token_id: int,
    video_token_id: int,
    spatial_merge_size: int,
    tokens_per_second: float | None = None,
) -> tuple[torch.Tensor, int]:
    """M-RoPE ids [3, L] and the rope delta for a prompt, as transformers' ``get_rope_index`` computes them.

    Each run of image/video pad tokens takes the next span. Its tokens get (t, h, w) grid ids offset by
    the running position; the text after it continues at ``start + max(h, w) / merge``.
    ``tokens_per_second`` is set for Qwen2.5-VL, whose temporal ids advance by
    ``tokens_per_second * second_per_grid`` per temporal patch; Qwen2-VL's advance by 1.
    """
    ids = torch.as_tensor(list(input_ids), dtype=torch.long)
    kinds = torch.zeros_like(ids)
    kinds[ids == image_token_id] = IMAGE
    kinds[ids == video_token_id] = VIDEO
    pending = list(spans)
    pieces: list[torch.Tensor] = []
    position = 0
    for kind, length in _runs(kinds.tolist()):
        if kind == TEXT:
            pieces.append(text_position_ids(position, length))
            position += length
            continue
        span = _take_span(pending, kind, length, spatial_merge_size)
        pieces.append(_grid_position_ids(span, position, spatial_merge_size, tokens_per_second))
        position += max(span.grid_thw[1], span.grid_thw[2]) // spatial_merge_size
    if pending:
        raise RequestError(f"prompt has fewer media placeholders than media items ({len(pending)} left over)")
    positions = torch.cat(pieces, dim=1) if pieces else torch.zeros(3, 0, dtype=torch.long)
    delta = int(positions.max()) + 1 - len(ids) if len(ids) else 0
    return positions, delta


def _runs(kinds: list[int]) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for kind in kinds:
        if runs and runs[-1][0] == kind:
            runs[-1] = (kind, runs[-1][1] + 1)
        else:
            runs.append((kind, 1))
    return runs


def _take_span(pending: list[VisualSpan], kind: int, length: int, merge: int) -> VisualSpan:
    name = "image" if kind == IMAGE else "video"
    if not pending or pending[0].kind != kind:
        raise RequestError(f"prompt has a {name} placeholder with no matching {name} input")
    span = pending.pop(0)
    t, h, w = span.grid_thw
    if t * h * w // (merge * merge) != length:
        raise RequestError(
            f"{name} placeholder has {length} tokens, its grid {span.grid_thw} needs {t * h * w // (merge * merge)}"
        )
    return span


def _grid_position_ids(span: VisualSpan, start: int, merge: int, tokens_per_second: float | None) -> torch.Tensor:
    t, h, w = span.grid_thw[0], span.grid_thw[1] // merge, span.grid_thw[2] // merge
    interval: float | torch.Tensor = 1
    if span.kind == VIDEO and tokens_per_second is not None:
        # float32 like transformers' second_per_grid_ts tensor, so the truncation below matches it
        interval = torch.tensor(span.second_per_grid, dtype=torch.float32) * tokens_per_second
    temporal = (torch.arange(t) * interval).long() + start
    height = torch.arange(h) + start
    width = torch.arange(w) + start
    grid = torch.meshgrid(temporal, height, width, indexing="ij")
    return torch.stack(grid).reshape(3, -1)
