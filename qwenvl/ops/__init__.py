"""The one place that chooses how an op runs: which native kernels (which instruction set), or torch.

The model files hold modules and math; for RMSNorm, SwiGLU's product, decode attention and the
quantized linear layers they call the functions here, which take the native kernels where they apply
and torch's ops elsewhere.

Choosing (read once per process, at the first op):

- ``QWENVL_ISA=scalar|avx2|avx512|amx|neon|auto`` (default ``auto``: the best this CPU runs). A name the
  CPU cannot run is a one-line error (``IsaError``) naming what it runs.
- ``QWENVL_KERNELS=0``: no native kernels at all (torch's ops; GGUF weights dequantized at load).
- ``QWENVL_AMX=0``: ``auto`` stops at avx512, and no call puts rows on AMX tiles.
- No compiler, or a build that fails: one warning naming the cause, then the scalar kernels if the
  chosen ISA's build failed but theirs works, else torch.

Tests and benchmarks run any ISA the machine runs side by side with ``native.load(isa)``; see
``isa.py`` for the table of ISAs and ``build.py`` for the build and its cache.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from gguf.constants import GGMLQuantizationType
from torch import nn

from . import isa
from .isa import IsaError
from .native import (
    LINEAR_PARTS,
    Q8_TYPES,
    SUPPORTED_TYPES,
    DecodeAttention,
    DecoderStep,
    GemvWeights,
    Kernels,
    LayerWeights,
    check_blocks,
    load,
)

_FLOATS = (torch.float32, torch.bfloat16)


@functools.cache
def kernels() -> Kernels | None:
    """The native kernels this process uses, or None (torch's ops). IsaError if QWENVL_ISA asks for an
    ISA this CPU cannot run."""
    if os.environ.get("QWENVL_KERNELS", "1") == "0":
        return None
    name = isa.requested()
    try:
        return load(name)
    except RuntimeError as error:
        cause = (str(error).strip().splitlines() or ["unknown error"])[-1]
    if name != "scalar":
        try:
            scalar = load("scalar")
        except RuntimeError:
            pass
        else:
            warnings.warn(f"qwenvl: the {name} kernels failed to build ({cause}); using the scalar ones", stacklevel=2)
            return scalar
    warnings.warn(f"qwenvl: native kernels unavailable ({cause}); falling back to torch (slower)", stacklevel=2)
    return None


def path() -> str:
    """The path in use: the ISA of the native kernels ("avx2", "avx512", ...) or "torch"."""
    chosen = kernels()
    return "torch" if chosen is None else chosen.isa


def describe() -> dict[str, Any]:
    """What ``qwenvl info`` and ``qwenvl bench`` report: the path, what the CPU runs, what was asked."""
    chosen = kernels()
    return {
        "isa": path(),
        "extensions": [] if chosen is None else chosen.extensions,
        "amx_tiles": chosen is not None and amx_tiles(chosen),
        "cpu_runs": isa.runnable(),
        "requested": os.environ.get(isa.ENV, "auto"),
        # which paths quantize activations: none by default; --kernel q8 does, prompts and decoding
        "quantized_activations": "--kernel q8 (prompts and decoding)" if chosen is not None else None,
    }


def amx_tiles(chosen: Kernels) -> bool:
    """Whether the GEMV may put bf16 rows on AMX tiles (the library has them; QWENVL_AMX=0 says no)."""
    return chosen.amx and os.environ.get("QWENVL_AMX", "1") != "0"


# ----------------------------------------------------------------------------------------------
# The ops the models call


def add_rms_norm(
    x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, RMSNorm(h)) for h = x + delta (the residual add), or h = x without delta: h / rms(h) in fp32,
    times the weight, rounded once to x's dtype — one native call where it applies, else torch's
    fused op."""
    chosen = kernels()
    fits = x.dtype == weight.dtype and x.dtype in _FLOATS and x.is_contiguous()
    if chosen is not None and fits and (delta is None or (delta.dtype == x.dtype and delta.is_contiguous())):
        return chosen.rms_norm(x, delta, weight, eps)
    h = x if delta is None else x + delta
    return h, F.rms_norm(h, (h.shape[-1],), weight, eps)


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of the fused gate/up projection's output [..., 2·I]: one native call where it
    applies (torch's roundings), else torch's two ops."""
    chosen = kernels()
    if chosen is not None and gate_up.dtype in _FLOATS and gate_up.is_contiguous():
        return chosen.silu_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate).mul_(up)


def decode_attention(
    keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], positions: Sequence[int], dtype: torch.dtype
) -> DecodeAttention | None:
    """The native decode attention for these caches ([layers, kv_heads, capacity, head_dim] each), or
    None where it does not apply (no kernels; a dtype other than fp32/bf16): callers then run SDPA.
    Single-request steps take it too, so a row's result does not depend on the batch."""
    chosen = kernels()
    if chosen is None or dtype not in _FLOATS or keys[0].dtype != dtype:
        return None
    return chosen.decode_attention(keys, values, positions)


def paged_decode_attention(
    keys: torch.Tensor,
    values: torch.Tensor,
    tables: Sequence[torch.Tensor],
    positions: Sequence[int],
    dtype: torch.dtype,
) -> DecodeAttention | None:
    """The native decode attention over a block pool ([blocks, layers, kv_heads, block_size, head_dim]
    keys and values) through each row's block table (int64 block ids), or None where it does not
    apply: callers then gather the rows' keys and run SDPA."""
    chosen = kernels()
    if chosen is None or dtype not in _FLOATS or keys.dtype != dtype:
        return None
    return chosen.paged_decode_attention(keys, values, tables, positions)


class LayerParts(NamedTuple):
    """One decoder layer as the model holds it: the norms' weights and the four linear layers (any
    module; those whose ``decode_gemv()`` gives their ``GemvWeights`` parts can join the fused decode
    step)."""

    input_norm: torch.Tensor
    qkv: nn.Module
    o: nn.Module
    post_norm: torch.Tensor
    gate_up: nn.Module
    down: nn.Module


def decoder_step(
    layers: Sequence[LayerParts], heads: int, kv_heads: int, head_dim: int, eps: float
) -> DecoderStep | None:
    """The fused decode step over these layers (one native call a step for all of them), or None where
    it does not apply: no native kernels, a dtype other than fp32/bf16, or a linear layer that is
    not a block GEMV for decode rows (dense, int8 and int4 layers: torch's kernels). Build it once."""
    chosen = kernels()
    dtype = layers[0].input_norm.dtype
    if chosen is None or dtype not in _FLOATS:
        return None
    built = []
    for part in layers:
        linears = [getattr(m, "decode_gemv", lambda: None)() for m in (part.qkv, part.o, part.gate_up, part.down)]
        norms = (part.input_norm, part.post_norm)
        if any(w is None or not 1 <= len(w) <= LINEAR_PARTS for w in linears) or any(
            t.dtype != dtype or not t.is_contiguous() for t in norms
        ):
            return None
        qkv, o, gate_up, down = linears
        built.append(LayerWeights(part.input_norm, qkv, o, part.post_norm, gate_up, down))
    return DecoderStep(chosen, built, heads, kv_heads, head_dim, eps, dtype)


def decode_layers(
    step: DecoderStep | None,
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    attention: DecodeAttention | None,
    q_scale: torch.Tensor | None,
) -> torch.Tensor | None:
    """Hidden states [B, 1, H] after every decoder layer of a decode step, for x [B, 1, H] with cos and
    signed sin [B, 1, 1, head_dim], through the fused step; or None where it does not apply (no fused
    step; no native attention; logn-scaled queries; a dtype other than the step's; more rows than its
    GEMVs take): the caller then runs the layers one by one."""
    rows = x.shape[0]
    if step is None or attention is None or q_scale is not None or x.dtype != step.dtype or x.shape[1] != 1:
        return None
    if rows > step.max_rows or cos.dtype != step.dtype or sin.dtype != step.dtype:
        return None
    flat = (t.reshape(rows, t.shape[-1]).contiguous() for t in (x, cos, sin))
    return step(*flat, attention).view(x.shape)


def block_kernels(ggml_type: GGMLQuantizationType) -> Kernels | None:
    """The kernels that multiply by this format's blocks as stored, or None (the layer then holds a
    dequantized matrix for torch)."""
    chosen = kernels()
    return chosen if chosen is not None and ggml_type in SUPPORTED_TYPES else None


def q8_kernels(ggml_type: GGMLQuantizationType) -> Kernels | None:
    """The kernels whose activation-quantizing GEMM (``Kernels.gemm_q8``) takes this format, or None
    (the float formats; no kernels)."""
    chosen = kernels()
    return (
        chosen if chosen is not None and ggml_type in Q8_TYPES and chosen.lib.qk_q8_supports(int(ggml_type)) else None
    )


__all__ = [
    "Q8_TYPES",
    "SUPPORTED_TYPES",
    "DecodeAttention",
    "DecoderStep",
    "GemvWeights",
    "IsaError",
    "Kernels",
    "LayerParts",
    "LayerWeights",
    "add_rms_norm",
    "amx_tiles",
    "block_kernels",
    "check_blocks",
    "decode_attention",
    "decode_layers",
    "decoder_step",
    "describe",
    "kernels",
    "load",
    "paged_decode_attention",
    "path",
    "q8_kernels",
    "swiglu",
]
