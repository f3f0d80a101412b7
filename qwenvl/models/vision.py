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
from ..weights.layout import VISION_PREFIXES

ROPE_THETA = 10000.0


QUICK_GELU_SCALE = 1.702


def _quick_gelu(x: Tensor) -> Tensor:
    """x * sigmoid(1.702 x) computed as silu(1.702 x) / 1.702: SiLU is one vectorised pass, far
    cheaper than a separate sigmoid and product in bf16. Overwrites x (a fresh fc1 output)."""
    return F.silu(x.mul_(QUICK_GELU_SCALE), inplace=True).div_(QUICK_GELU_SCALE)


def _silu_inplace(x: Tensor) -> Tensor:
    return F.silu(x, inplace=True)


ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "quick_gelu": _quick_gelu,
    "gelu": F.gelu,
    "gelu_new": partial(F.gelu, approximate="tanh"),
    "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh"),
    "silu": _silu_inplace,
    "swish": _silu_inplace,
    "relu": partial(F.relu, inplace=True),
}


def _activation(name: str) -> Callable[[Tensor], Tensor]:
    if name not in ACTIVATIONS:
        raise ModelFileError(f"config: unsupported vision hidden_act {name!r} (supported: {', '.join(ACTIVATIONS)})")
    return ACTIVATIONS[name]


def _onednn_bf16_linear_available() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    except (AttributeError, RuntimeError):
        return False


ONEDNN_BF16_LINEAR = _onednn_bf16_linear_available()


class Linear(nn.Linear):
    """nn.Linear whose bf16 matmul adds the bias, and optionally SiLU or a residual, inside oneDNN's kernel.

    F.linear with a bias copies the bias into the output and has the matmul accumulate onto it:
    an extra pass over the output that costs 10-30% of the matmul at these shapes (measured with
    2 threads, 1024-4000 rows); a separate activation or residual add is one more pass, and one
    more OpenMP region (a whole scheduler tick when another process holds a core). oneDNN's
    linear (the op torch.compile's CPU backend emits) applies them to the output tile while it is
    in cache; same weights, no repacking. float32 keeps F.linear.
    """

    def _fused(self, x: Tensor) -> bool:
        return ONEDNN_BF16_LINEAR and self.bias is not None and x.dtype == self.weight.dtype == torch.bfloat16

    def forward(self, x: Tensor) -> Tensor:
        if self._fused(x):
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)

    def forward_silu(self, x: Tensor) -> Tensor:
        """silu(linear(x))."""
        if self._fused(x):
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "swish", [], "")
        return F.silu(F.linear(x, self.weight, self.bias), inplace=True)

    def forward_plus(self, x: Tensor, residual: Tensor) -> Tensor:
        """linear(x) + residual."""
        if self._fused(x) and residual.dtype == torch.bfloat16 and residual.is_contiguous():
            return torch.ops.mkldnn._linear_pointwise.binary(x, residual, self.weight, self.bias, "add")
        return F.linear(x, self.weight, self.bias).add_(residual)


def _linear(n_in: int, n_out: int, dtype: torch.dtype, bias: bool = True) -> Linear:
    """A Linear with uninitialised weights (load_weights fills them; random init would be wasted)."""
    layer = Linear(n_in, n_out, bias=bias, device="meta", dtype=dtype)
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
    """The config's norm with its epsilon (1e-6 in every published model; an mmproj states its own)."""
    if config.variant == "qwen2_5_vl":
        return RMSNorm(dim, config.norm_eps, dtype)
    return nn.LayerNorm(dim, eps=config.norm_eps, dtype=dtype)


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


@dataclass(frozen=True)
class Rotary:
    """Per-token rotation tables [N, 1, 1, head_dim] in the compute dtype, built once per forward call.

    Each pair (i, i + head_dim/2) turns by the token's angle (the rotate_half convention):
    rotated = x * cos + swap_halves(x) * signed_sin, with signed_sin = [-sin | sin].
    """

    cos: Tensor
    signed_sin: Tensor

    @classmethod
    def from_angles(cls, angles: Tensor, dtype: torch.dtype) -> Rotary:
        """angles [N, head_dim/2] (fp32) → tables in ``dtype``."""
        cos, sin = angles.cos(), angles.sin()
        full_cos = torch.cat((cos, cos), dim=-1)
        signed_sin = torch.cat((-sin, sin), dim=-1)
        shape = (angles.shape[0], 1, 1, 2 * angles.shape[1])
        return cls(full_cos.to(dtype).view(shape), signed_sin.to(dtype).view(shape))

    def apply(self, x: Tensor) -> Tensor:
        """x [N, k, heads, head_dim] (q and k together) → a new contiguous rotated tensor."""
        first, second = x.chunk(2, dim=-1)
        swapped = torch.cat((second, first), dim=-1)
        return swapped.mul_(self.signed_sin).addcmul_(x, self.cos)


@dataclass(frozen=True)
class SegmentPlan:
    """Attention restricted to consecutive segments (frames or windows) of the token sequence.

    ``runs`` are (first token, segment count, segment length) of back-to-back segments of equal
    length: each run is one SDPA call on a view of q/k/v, with no gather.
    """

    runs: tuple[tuple[int, int, int], ...]

    @classmethod
    def from_lengths(cls, lengths: Sequence[int]) -> SegmentPlan:
        runs: list[list[int]] = []
        start = 0
        for n in lengths:
            if n <= 0:
                continue
            if runs and runs[-1][2] == n:
                runs[-1][1] += 1
            else:
                runs.append([start, 1, n])
            start += n
        return cls(tuple((first, count, n) for first, count, n in runs))


def _run_attention(q: Tensor, k: Tensor, v: Tensor, run: tuple[int, int, int]) -> Tensor:
    """One run of ``count`` segments of ``length`` tokens of q/k/v [N, heads, head_dim] → [rows, heads*head_dim]."""
    first, count, length = run
    rows = count * length

    def per_segment(x: Tensor) -> Tensor:
        return x[first : first + rows].unflatten(0, (count, length)).transpose(1, 2)

    out = F.scaled_dot_product_attention(per_segment(q), per_segment(k), per_segment(v))
    # SDPA's CPU kernel writes [count, length, heads, head_dim] memory: this reshape is a view.
    return out.transpose(1, 2).reshape(rows, -1)


def segment_attention(q: Tensor, k: Tensor, v: Tensor, plan: SegmentPlan) -> Tensor:
    """Softmax attention of q/k/v [N, heads, head_dim] within each segment of plan → [N, heads*head_dim]."""
    outs = [_run_attention(q, k, v, run) for run in plan.runs]
    return outs[0] if len(outs) == 1 else torch.cat(outs)


class VisionAttention(nn.Module):
    def __init__(self, config: VisionConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.qkv = _linear(config.hidden_size, 3 * config.hidden_size, dtype)
        self.proj = _linear(config.hidden_size, config.hidden_size, dtype)

    def forward(self, x: Tensor, rotary: Rotary, plan: SegmentPlan, residual: Tensor) -> Tensor:
        """residual + attention(x)."""
        qkv = self.qkv(x).view(x.shape[0], 3, self.num_heads, -1)
        q, k = rotary.apply(qkv[:, :2]).unbind(1)
        return self.proj.forward_plus(segment_attention(q, k, qkv[:, 2], plan), residual)


class VisionMLP(nn.Module):
    """Qwen2-VL: fc1 → activation (QuickGELU) → fc2."""

    def __init__(self, config: VisionConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.act = _activation(config.hidden_act)
        self.fc1 = _linear(config.hidden_size, config.intermediate_size, dtype)
        self.fc2 = _linear(config.intermediate_size, config.hidden_size, dtype)

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        """residual + mlp(x)."""
        return self.fc2.forward_plus(self.act(self.fc1(x)), residual)


class VisionGatedMLP(nn.Module):
    """Qwen2.5-VL: down(act(gate(x)) * up(x)), all with biases."""

    def __init__(self, config: VisionConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.act = _activation(config.hidden_act)
        self.silu = config.hidden_act in ("silu", "swish")
        self.gate_proj = _linear(config.hidden_size, config.intermediate_size, dtype)
        self.up_proj = _linear(config.hidden_size, config.intermediate_size, dtype)
        self.down_proj = _linear(config.intermediate_size, config.hidden_size, dtype)

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        """residual + mlp(x)."""
        gate = self.gate_proj.forward_silu(x) if self.silu else self.act(self.gate_proj(x))
        return self.down_proj.forward_plus(gate.mul_(self.up_proj(x)), residual)


class VisionBlock(nn.Module):
    def __init__(self, config: VisionConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.norm1 = _norm(config, config.hidden_size, dtype)
        self.norm2 = _norm(config, config.hidden_size, dtype)
        self.attn = VisionAttention(config, dtype)
        mlp = VisionGatedMLP if config.variant == "qwen2_5_vl" else VisionMLP
        self.mlp = mlp(config, dtype)

    def forward(self, x: Tensor, rotary: Rotary, plan: SegmentPlan) -> Tensor:
        x = self.attn(self.norm1(x), rotary, plan, residual=x)
        return self.mlp(self.norm2(x), residual=x)


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


def rotary_angles(positions: Tensor, head_dim: int, theta: float = ROPE_THETA) -> Tensor:
    """Angles [N, head_dim/2] in fp32 from (row, col) positions [N, 2]: head_dim/4 frequencies
    turn with the row, the same head_dim/4 frequencies with the column."""
    half = head_dim // 2
    inv_freq = 1.0 / (theta ** (torch.arange(0, half, 2, dtype=torch.float) / half))
    return (positions[..., None].float() * inv_freq).flatten(1)  # [N, row angles | col angles]


def frame_lengths(grid: Sequence[tuple[int, int, int]]) -> list[int]:
    """Patches per attention segment when attention spans a whole frame."""
    return [h * w for t, h, w in grid for _ in range(t)]


def window_layout(grid: Sequence[tuple[int, int, int]], merge: int, side: int) -> tuple[Tensor, list[int]]:
    """Qwen2.5-VL windows of side × side merged tokens (smaller at the right and bottom edges).

    Returns the new order of merged tokens and the length in patches of each window, in that order.
    Frames and images stay in order; inside a frame the windows come largest first (raster order
    among equals), so that windows of one size are back to back and share one attention call;
    inside a window the tokens keep their raster order. Attention inside a window does not depend
    on where the window sits in the sequence, and the caller restores the original order at the end.
    """
    orders, lengths, offset = [], [], 0
    for t, h, w in grid:
        rows, cols = h // merge, w // merge
        windows_across = math.ceil(cols / side)
        window = (torch.arange(rows)[:, None] // side * windows_across + torch.arange(cols) // side).flatten()
        sizes = torch.bincount(window)  # merged tokens per window, every window non-empty
        by_size = torch.argsort(-sizes, stable=True)
        rank = torch.empty_like(by_size)
        rank[by_size] = torch.arange(len(by_size))
        frame_order = torch.argsort(rank[window], stable=True)
        frame_tokens = rows * cols
        orders += [frame_order + offset + frame * frame_tokens for frame in range(t)]
        lengths += (sizes[by_size] * merge * merge).tolist() * t
        offset += t * frame_tokens
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

        rotary = Rotary.from_angles(rotary_angles(positions, config.head_dim), x.dtype)
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
        short = name[len(prefix) :]
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
