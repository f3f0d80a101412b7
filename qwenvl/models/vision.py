"""The vision encoder of Qwen2-VL and Qwen2.5-VL: image/video patches → embeddings for the text model.

One call encodes any number of images (or videos) packed together:

    pixel_values [N, C*T*P*P], grid_thw [images, 3]
      → patch embedding (the Conv3d with kernel == stride, as one matmul)
      → Qwen2.5-VL only: reorder the tokens window by window
      → blocks: pre-norm attention with 2-D rotary positions, then pre-norm MLP
      → PatchMerger: norm, concatenate each 2×2 group of neighbours, MLP → out_hidden_size
      → Qwen2.5-VL only: restore the original order
      → [N / merge², out_hidden_size]

The rows of pixel_values come in the processor's order: image by image, frame by frame (t), and
inside a frame by merge groups in raster order, the merge² patches of a group being consecutive.
Attention never crosses a frame: every frame of every image is its own segment (Qwen2-VL and the
full-attention blocks of Qwen2.5-VL), or a window of a frame is (the other Qwen2.5-VL blocks).
Everything that depends on grid_thw is rebuilt by each forward call; the module only holds weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import VisionConfig
from ..errors import ModelFileError

VISION_PREFIXES = ("model.visual.", "visual.")  # transformers 5 checkpoints, older checkpoints
ROPE_THETA = 10000.0
NORM_EPS = 1e-6


def _quick_gelu(x: Tensor) -> Tensor:
    return x * torch.sigmoid_(1.702 * x)


ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "quick_gelu": _quick_gelu,
    "gelu": F.gelu,
    "gelu_new": partial(F.gelu, approximate="tanh"),
    "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh"),
    "silu": F.silu,
    "swish": F.silu,
    "relu": F.relu,
}


def _activation(name: str) -> Callable[[Tensor], Tensor]:
    if name not in ACTIVATIONS:
        raise ModelFileError(
            f"config: unsupported vision hidden_act {name!r} (supported: {', '.join(ACTIVATIONS)})"
        )
    return ACTIVATIONS[name]


def _linear(n_in: int, n_out: int, dtype: torch.dtype, bias: bool = True) -> nn.Linear:
    """An nn.Linear with uninitialised weights (load_weights fills them; random init would be wasted)."""
    layer = nn.Linear(n_in, n_out, bias=bias, device="meta", dtype=dtype)
    return layer.to_empty(device=torch.get_default_device())


# ----------------------------------------------------------------------------------------------
# Layers


class RMSNorm(nn.Module):
    """Qwen2.5-VL's norm: normalise in fp32, scale in the input dtype (as transformers does)."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def _norm(config: VisionConfig, dim: int, dtype: torch.dtype) -> nn.Module:
    if config.variant == "qwen2_5_vl":
        return RMSNorm(dim, NORM_EPS, dtype)
    return nn.LayerNorm(dim, eps=NORM_EPS, dtype=dtype)


class PatchProjection(nn.Module):
    """The Conv3d weight [embed, C, T, P, P]; with kernel == stride it is a matmul on patch rows."""

    def __init__(self, config: VisionConfig, dtype: torch.dtype) -> None:
        super().__init__()
        patch = config.patch_size
        shape = (config.hidden_size, config.in_channels, config.temporal_patch_size, patch, patch)
        self.weight = nn.Parameter(torch.empty(shape, dtype=dtype))

    def forward(self, patches: Tensor) -> Tensor:
        return F.linear(patches.to(self.weight.dtype), self.weight.view(self.weight.shape[0], -1))


class PatchEmbed(nn.Module):
    def __init__(self, config: VisionConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.proj = PatchProjection(config, dtype)

    def forward(self, patches: Tensor) -> Tensor:
        return self.proj(patches)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x [N, ..., head_dim] by per-token angles, in fp32 (as transformers), back to x's dtype.

    cos/sin [N, head_dim/2] (fp32) rotate each pair (i, i + head_dim/2): the rotate_half convention.
    """
    x32 = x.float()
    x1, x2 = x32.chunk(2, dim=-1)
    shape = (x.shape[0],) + (1,) * (x.ndim - 2) + (cos.shape[-1],)
    cos, sin = cos.view(shape), sin.view(shape)
    out = torch.empty_like(x32)
    first, second = out.chunk(2, dim=-1)
    torch.mul(x1, cos, out=first).addcmul_(x2, sin, value=-1)
    torch.mul(x2, cos, out=second).addcmul_(x1, sin)
    return out.to(x.dtype)


@dataclass(frozen=True)
class SegmentPlan:
    """Attention restricted to consecutive segments (frames or windows) of the token sequence.

    Segments of equal length are batched into one SDPA call: ``groups`` holds, per distinct
    length, the token indices of all segments of that length (None: every token, in order).
    """

    groups: tuple[tuple[int, Tensor | None], ...]

    @classmethod
    def from_lengths(cls, lengths: Sequence[int]) -> SegmentPlan:
        lengths = [n for n in lengths if n > 0]
        if len(set(lengths)) == 1:
            return cls(((lengths[0], None),))
        starts_by_length: dict[int, list[int]] = {}
        start = 0
        for n in lengths:
            starts_by_length.setdefault(n, []).append(start)
            start += n
        return cls(
            tuple(
                (n, (torch.tensor(starts)[:, None] + torch.arange(n)).flatten())
                for n, starts in starts_by_length.items()
            )
        )


def _batched_attention(q: Tensor, k: Tensor, v: Tensor, length: int) -> Tensor:
    """[S*length, heads, head_dim] q/k/v of S back-to-back segments → [S*length, heads*head_dim]."""
    rows, heads, head_dim = q.shape

    def per_segment(x: Tensor) -> Tensor:
        return x.reshape(rows // length, length, heads, head_dim).transpose(1, 2)

    out = F.scaled_dot_product_attention(per_segment(q), per_segment(k), per_segment(v))
    return out.transpose(1, 2).reshape(rows, heads * head_dim)


def segment_attention(q: Tensor, k: Tensor, v: Tensor, plan: SegmentPlan) -> Tensor:
    """Softmax attention of q/k/v [N, heads, head_dim] within each segment of plan → [N, heads*head_dim]."""
    first_length, first_index = plan.groups[0]
    if first_index is None:
        return _batched_attention(q, k, v, first_length)
    out = q.new_empty(q.shape[0], q.shape[1] * q.shape[2])
    for length, index in plan.groups:
        out[index] = _batched_attention(q[index], k[index], v[index], length)
    return out


class VisionAttention(nn.Module):
    def __init__(self, config: VisionConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.qkv = _linear(config.hidden_size, 3 * config.hidden_size, dtype)
        self.proj = _linear(config.hidden_size, config.hidden_size, dtype)

    def forward(self, x: Tensor, rotary: tuple[Tensor, Tensor], plan: SegmentPlan) -> Tensor:
        qkv = self.qkv(x).view(x.shape[0], 3, self.num_heads, -1)
        q, k = apply_rotary(qkv[:, :2], *rotary).unbind(1)
        return self.proj(segment_attention(q, k, qkv[:, 2], plan))


class VisionMLP(nn.Module):
    """Qwen2-VL: fc1 → activation (QuickGELU) → fc2."""

    def __init__(self, config: VisionConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.act = _activation(config.hidden_act)
        self.fc1 = _linear(config.hidden_size, config.intermediate_size, dtype)
        self.fc2 = _linear(config.intermediate_size, config.hidden_size, dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionGatedMLP(nn.Module):
    """Qwen2.5-VL: down(act(gate(x)) * up(x)), all with biases."""

    def __init__(self, config: VisionConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.act = _activation(config.hidden_act)
        self.gate_proj = _linear(config.hidden_size, config.intermediate_size, dtype)
        self.up_proj = _linear(config.hidden_size, config.intermediate_size, dtype)
        self.down_proj = _linear(config.intermediate_size, config.hidden_size, dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class VisionBlock(nn.Module):
    def __init__(self, config: VisionConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.norm1 = _norm(config, config.hidden_size, dtype)
        self.norm2 = _norm(config, config.hidden_size, dtype)
        self.attn = VisionAttention(config, dtype)
        mlp = VisionGatedMLP if config.variant == "qwen2_5_vl" else VisionMLP
        self.mlp = mlp(config, dtype)

    def forward(self, x: Tensor, rotary: tuple[Tensor, Tensor], plan: SegmentPlan) -> Tensor:
        x = x + self.attn(self.norm1(x), rotary, plan)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """Norm over the ViT width, concatenate each merge² group, then Linear → GELU → Linear."""

    def __init__(self, config: VisionConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.width = config.hidden_size * config.spatial_merge_size**2
        self.ln_q = _norm(config, config.hidden_size, dtype)
        self.mlp = nn.Sequential(
            _linear(self.width, self.width, dtype),
            nn.GELU(),
            _linear(self.width, config.out_hidden_size, dtype),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(self.ln_q(x).view(-1, self.width))


# ----------------------------------------------------------------------------------------------
# Per-call layout: positions, segments, windows (all from grid_thw)


def merge_order_positions(grid: Sequence[tuple[int, int, int]], merge: int) -> Tensor:
    """(row, col) of every patch [N, 2], in the processor's merge-group order, repeated per frame."""
    positions = []
    for t, h, w in grid:
        rows = torch.arange(h)[:, None].expand(h, w)
        cols = torch.arange(w)[None, :].expand(h, w)
        # [h, w] → [h/m, m, w/m, m] → [h/m, w/m, m, m]: merge groups in raster order.
        in_merge_order = [
            x.reshape(h // merge, merge, w // merge, merge).transpose(1, 2).flatten() for x in (rows, cols)
        ]
        positions.append(torch.stack(in_merge_order, dim=-1).repeat(t, 1))
    return torch.cat(positions)


def rotary_tables(positions: Tensor, head_dim: int, theta: float = ROPE_THETA) -> tuple[Tensor, Tensor]:
    """cos, sin [N, head_dim/2] in fp32 from (row, col) positions [N, 2]: head_dim/4 frequencies
    turn with the row, the same head_dim/4 frequencies with the column."""
    half = head_dim // 2
    inv_freq = 1.0 / (theta ** (torch.arange(0, half, 2, dtype=torch.float) / half))
    angles = (positions[..., None].float() * inv_freq).flatten(1)  # [N, row angles | col angles]
    return angles.cos(), angles.sin()


def frame_lengths(grid: Sequence[tuple[int, int, int]]) -> list[int]:
    """Patches per attention segment when attention spans a whole frame."""
    return [h * w for t, h, w in grid for _ in range(t)]


def window_layout(grid: Sequence[tuple[int, int, int]], merge: int, side: int) -> tuple[Tensor, list[int]]:
    """Qwen2.5-VL windows of side × side merged tokens (smaller at the right and bottom edges).

    Returns the new order of merged tokens (window by window, row-major inside a window; frames and
    images stay in order) and the length in patches of each window, in that order.
    """
    orders, lengths, offset = [], [], 0
    for t, h, w in grid:
        rows, cols = h // merge, w // merge
        windows_across = math.ceil(cols / side)
        windows_per_frame = math.ceil(rows / side) * windows_across
        window_in_frame = (torch.arange(rows)[:, None] // side * windows_across + torch.arange(cols) // side).flatten()
        window = (torch.arange(t)[:, None] * windows_per_frame + window_in_frame).flatten()
        # A stable sort by window keeps the raster order inside each window.
        orders.append(torch.argsort(window, stable=True) + offset)
        lengths += (torch.bincount(window, minlength=t * windows_per_frame) * merge * merge).tolist()
        offset += t * rows * cols
    return torch.cat(orders), lengths


def _grid_list(
    grid_thw: Tensor | Sequence[Sequence[int]], config: VisionConfig, num_patches: int
) -> list[tuple[int, int, int]]:
    grid_tensor = torch.as_tensor(grid_thw)
    if grid_tensor.ndim != 2 or grid_tensor.shape[1] != 3:
        raise ValueError(f"grid_thw must be [images, 3], got {list(grid_tensor.shape)}")
    grid = [(int(t), int(h), int(w)) for t, h, w in grid_tensor.tolist()]
    merge = config.spatial_merge_size
    for t, h, w in grid:
        if min(t, h, w) < 1 or h % merge or w % merge:
            raise ValueError(f"grid_thw row {[t, h, w]}: t must be positive, h and w positive multiples of {merge}")
    described = sum(t * h * w for t, h, w in grid)
    if described != num_patches:
        raise ValueError(f"grid_thw {[list(g) for g in grid]} describes {described} patches, got {num_patches}")
    return grid


# ----------------------------------------------------------------------------------------------
# The model


class VisionTransformer(nn.Module):
    """The Qwen2-VL / Qwen2.5-VL ViT with its PatchMerger.

    Parameter names are the HF names without prefix. Linear weights are uninitialised until
    load_weights fills them.
    """

    def __init__(self, config: VisionConfig, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if config.variant not in ("qwen2_vl", "qwen2_5_vl"):
            raise ModelFileError(f"config: unknown vision variant {config.variant!r}")
        if config.head_dim * config.num_heads != config.hidden_size or config.head_dim % 4:
            raise ModelFileError(
                f"config: vision hidden_size {config.hidden_size} / num_heads {config.num_heads} "
                "must give a head_dim that is a multiple of 4"
            )
        self.config = config
        self.window_side = config.window_size // config.spatial_merge_size // config.patch_size
        if config.variant == "qwen2_5_vl" and self.window_side < 1:
            raise ModelFileError(
                f"config: vision window_size {config.window_size} is smaller than one merged token "
                f"({config.patch_size * config.spatial_merge_size} pixels)"
            )
        self.patch_embed = PatchEmbed(config, dtype)
        self.blocks = nn.ModuleList(VisionBlock(config, dtype) for _ in range(config.depth))
        self.merger = PatchMerger(config, dtype)
        self.requires_grad_(False)

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embed.proj.weight.dtype

    def forward(self, pixel_values: Tensor, grid_thw: Tensor | Sequence[Sequence[int]]) -> Tensor:
        """pixel_values [N, patch_dim], grid_thw [images, 3] → embeddings [N / merge², out_hidden_size]."""
        config = self.config
        if pixel_values.ndim != 2 or pixel_values.shape[1] != config.patch_dim:
            raise ValueError(f"pixel_values must be [N, {config.patch_dim}], got {list(pixel_values.shape)}")
        grid = _grid_list(grid_thw, config, pixel_values.shape[0])
        merge_unit = config.spatial_merge_size**2

        x = self.patch_embed(pixel_values)
        positions = merge_order_positions(grid, config.spatial_merge_size)
        full_plan = SegmentPlan.from_lengths(frame_lengths(grid))
        plans = [full_plan] * config.depth
        if config.variant == "qwen2_5_vl":
            merged_order, window_lengths = window_layout(grid, config.spatial_merge_size, self.window_side)
            patch_order = (merged_order[:, None] * merge_unit + torch.arange(merge_unit)).flatten()
            x, positions = x[patch_order], positions[patch_order]
            window_plan = SegmentPlan.from_lengths(window_lengths)
            plans = [full_plan if i in config.fullatt_block_indexes else window_plan for i in range(config.depth)]

        rotary = rotary_tables(positions, config.head_dim)
        for block, plan in zip(self.blocks, plans):
            x = block(x, rotary, plan)
        merged = self.merger(x)
        if config.variant == "qwen2_5_vl":
            merged = merged[torch.argsort(merged_order)]
        return merged

    def load_weights(self, tensors: Mapping[str, Tensor]) -> None:
        """Take the vision weights from HF-named tensors (prefix ``model.visual.``, ``visual.`` or none).

        Tensors are converted to the module's dtype; when the dtype already matches they are used
        as they are (no copy), so they may share memory with the given mapping.
        """
        prefix = _vision_prefix(tensors)
        weights = vision_weights(tensors) if prefix else dict(tensors)
        params = dict(self.named_parameters())
        for name, param in params.items():
            if name not in weights:
                raise ModelFileError(f"missing vision tensor '{prefix}{name}'")
            if tuple(weights[name].shape) != tuple(param.shape):
                raise ModelFileError(
                    f"vision tensor '{prefix}{name}': expected shape {list(param.shape)}, "
                    f"got {list(weights[name].shape)}"
                )
        unexpected = sorted(set(weights) - set(params))
        if unexpected:
            raise ModelFileError(
                f"unexpected vision tensor '{prefix}{unexpected[0]}' (config: {self.config.variant}, "
                f"depth {self.config.depth})"
            )
        for name, param in params.items():
            param.data = weights[name].detach().to(param.dtype).contiguous()


def _vision_prefix(tensors: Mapping[str, Tensor]) -> str:
    for name in tensors:
        for prefix in VISION_PREFIXES:
            if name.startswith(prefix):
                return prefix
    return ""


def vision_weights(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The vision tensors of a full checkpoint state dict, keyed by their names without prefix."""
    picked: dict[str, Tensor] = {}
    for name, tensor in tensors.items():
        prefix = next((p for p in VISION_PREFIXES if name.startswith(p)), None)
        if prefix is None:
            continue
        short = name[len(prefix):]
        if short in picked:
            raise ModelFileError(
                f"vision tensor '{short}' appears twice (with prefixes {' and '.join(VISION_PREFIXES)})"
            )
        picked[short] = tensor
    return picked


def weight_names(config: VisionConfig) -> list[str]:
    """The HF names (without prefix) of every tensor the vision model of this config needs."""
    with torch.device("meta"):
        return [name for name, _ in VisionTransformer(config).named_parameters()]


__all__ = [
    "VisionTransformer",
    "vision_weights",
    "weight_names",
    "VISION_PREFIXES",
]
