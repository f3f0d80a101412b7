"""The decoder: the text model of Qwen2 / Qwen2.5, the language half of Qwen2-VL / Qwen2.5-VL, and
Qwen (v1) and Llama, which share its structure (weights/layout.py maps their checkpoints onto it).

Blocks as in the paper: token embedding → N × [RMSNorm → GQA attention (q/k/v bias, (M-)RoPE) → residual,
RMSNorm → SwiGLU MLP → residual] → RMSNorm → lm_head. q/k/v and gate/up are fused into one matmul each;
which projections have a bias is the config's. Qwen (v1) adds dynamic NTK and logn attention past its
training length (models/rope.py).
The model holds weights only; positions, the KV cache and the request's rope factor (``rope_alpha``)
belong to the request and come in as arguments.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..config import TextConfig
from ..engine.kv_cache import BlockSequence, RowsKVView, SegmentsKVView, decode_kernel
from ..weights.layout import QWEN2, Layout
from .rope import (
    apply_rope_heads,
    dynamic_ntk_alpha,
    logn_scale,
    ntk_inv_freq,
    rope_cos_sin,
    rope_inv_freq,
    signed_sin,
)


class AttentionView(Protocol):
    """One layer's KV cache for one forward call (engine/kv_cache.py): stores the call's keys and
    values, returns the queries' attention over everything cached so far."""

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.add_and_norm(x, None)[1]

    def add_and_norm(self, x: torch.Tensor, delta: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(h, RMSNorm(h)) for h = x + delta (the residual add), or h = x without delta."""
        return ops.add_rms_norm(x, delta, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.qkv_sizes = [self.num_heads * self.head_dim] + [self.num_kv_heads * self.head_dim] * 2
        self.qkv_proj = nn.Linear(cfg.hidden_size, sum(self.qkv_sizes), bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=cfg.o_bias)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: AttentionView | None,
        q_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``q_scale`` [B, 1, L, 1]: a factor on each position's rotated query (Qwen's logn attention)."""
        batch, length, _ = x.shape
        heads = self.qkv_proj(x).view(batch, length, -1, self.head_dim)  # q heads, k heads, v heads
        q_and_k = apply_rope_heads(heads[:, :, : self.num_heads + self.num_kv_heads], cos, sin)
        q = q_and_k[:, :, : self.num_heads].transpose(1, 2)
        if q_scale is not None:
            q = q * q_scale
        k = q_and_k[:, :, self.num_heads :].transpose(1, 2)
        v = heads[:, :, self.num_heads + self.num_kv_heads :].transpose(1, 2)
        if cache is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=length > 1, enable_gqa=True)
        else:
            out = cache.attend(q, k, v)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), gate and up fused."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(ops.swiglu(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: AttentionView | None,
        q_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        attended = self.self_attn(self.input_layernorm(x), cos, sin, cache, q_scale)
        x, normed = self.post_attention_layernorm.add_and_norm(x, attended)  # x + attention, and its norm
        return x + self.mlp(normed)


class TextModel(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.config = cfg
        # an uninitialized table (the loader sets it): random init on the meta device would import
        # sympy for torch's meta kernels, ~60 MB of RSS for nothing
        table = torch.empty(cfg.vocab_size, cfg.hidden_size)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, _weight=table)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta)  # a plain tensor: never on the meta device
        self._decoder_step: tuple[ops.DecoderStep | None] | None = None  # built at the first decode step

    @property
    def dtype(self) -> torch.dtype:
        return self.norm.weight.dtype

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def rope_alpha(self, prompt_length: int) -> float:
        """The rope factor of a request with this prompt length (Qwen's dynamic NTK; 1 for the others)."""
        cfg = self.config
        return float(dynamic_ntk_alpha(prompt_length, cfg.seq_length)) if cfg.use_dynamic_ntk else 1.0

    def forward(
        self,
        embeds: torch.Tensor,
        position_ids: torch.Tensor,
        cache: BlockSequence | None = None,
        start: int = 0,
        rope_alpha: float = 1.0,
    ) -> torch.Tensor:
        """Hidden states [B, L, H] after the final norm, for embeddings [B, L, H] at ids [3, B, L].

        With a cache, keys/values are written at ``start`` … ``start + L`` and attention covers all before.
        ``rope_alpha``: the request's ``rope_alpha(prompt length)``.
        """
        length = embeds.shape[1]
        if cache is not None and length == 1 and embeds.shape[0] == 1:  # a decode step: one row
            return self.decode(embeds, position_ids, [cache], [start], [rope_alpha])
        alphas = None if rope_alpha == 1.0 else torch.full(position_ids.shape[1:], rope_alpha)
        cos, sin, q_scale = self._rope(position_ids, embeds.dtype, alphas)
        mask = causal_mask(start, length) if cache is not None and start > 0 and length > 1 else None
        if cache is not None:
            cache.prepare_write(start, length)
        x = embeds
        for index, layer in enumerate(self.layers):
            view = cache.view(index, start, length, mask) if cache is not None else None
            x = layer(x, cos, sin, view, q_scale)
        return self.norm(x)

    def decode(
        self,
        embeds: torch.Tensor,
        position_ids: torch.Tensor,
        caches: Sequence[BlockSequence],
        starts: Sequence[int],
        rope_alphas: Sequence[float] | None = None,
    ) -> torch.Tensor:
        """One decode step for B independent requests: hidden states [B, 1, H] for embeddings [B, 1, H]
        at ids [3, B, 1]. Row i's key/value goes to ``caches[i]`` at ``starts[i]``; it attends to that
        cache only. The projections run once for all rows (the weights are read once per step).
        ``rope_alphas``: each request's ``rope_alpha`` (default 1)."""
        alphas = None
        if rope_alphas is not None and any(alpha != 1.0 for alpha in rope_alphas):
            alphas = torch.tensor(list(rope_alphas))[:, None].expand(position_ids.shape[1:])
        cos, sin, q_scale = self._rope(position_ids, embeds.dtype, alphas)
        for cache, start in zip(caches, starts):
            cache.prepare_write(start, 1)
        kernel = decode_kernel(caches, starts, embeds.dtype)
        x = ops.decode_layers(self.decoder_step(), embeds, cos, sin, kernel, q_scale)
        if x is None:  # the layers one by one
            x = embeds
            for index, layer in enumerate(self.layers):
                x = layer(x, cos, sin, RowsKVView(caches, starts, index, kernel), q_scale)
        return self.norm(x)

    def decoder_step(self) -> ops.DecoderStep | None:
        """All layers of a decode step in one native call, where ``ops`` has one for these weights
        (built once, at the first decode step; ``load_weights`` drops it)."""
        if self._decoder_step is None:
            cfg = self.config
            parts = [
                ops.LayerParts(
                    layer.input_layernorm.weight,
                    layer.self_attn.qkv_proj,
                    layer.self_attn.o_proj,
                    layer.post_attention_layernorm.weight,
                    layer.mlp.gate_up_proj,
                    layer.mlp.down_proj,
                )  # fmt: skip
                for layer in self.layers
            ]
            step = ops.decoder_step(
                parts, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.rms_norm_eps
            )
            self._decoder_step = (step,)
        return self._decoder_step[0]

    def forward_segments(
        self,
        embeds: torch.Tensor,
        position_ids: torch.Tensor,
        caches: Sequence[BlockSequence],
        starts: Sequence[int],
        lengths: Sequence[int],
        rope_alphas: Sequence[float] | None = None,
    ) -> torch.Tensor:
        """Prompt chunks of several requests in one call: embeddings [1, N, H] at ids [3, 1, N], the
        first ``lengths[0]`` tokens request 0's (written to ``caches[0]`` at ``starts[0]``), and so on.
        Hidden states [1, N, H]; each segment attends to its own cache only. ``rope_alphas``: each
        request's ``rope_alpha`` (default 1)."""
        alphas = None
        if rope_alphas is not None and any(alpha != 1.0 for alpha in rope_alphas):
            alphas = torch.tensor(list(rope_alphas)).repeat_interleave(torch.tensor(list(lengths)))[None]
        cos, sin, q_scale = self._rope(position_ids, embeds.dtype, alphas)
        masks = [causal_mask(s, n) if s > 0 and n > 1 else None for s, n in zip(starts, lengths)]
        for cache, s, n in zip(caches, starts, lengths):
            cache.prepare_write(s, n)
        x = embeds
        for index, layer in enumerate(self.layers):
            views = [cache.view(index, s, n, mask) for cache, s, n, mask in zip(caches, starts, lengths, masks)]
            x = layer(x, cos, sin, SegmentsKVView(views, lengths), q_scale)
        return self.norm(x)

    def _rope(
        self, position_ids: torch.Tensor, dtype: torch.dtype, alphas: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """cos and signed sin [B, L, 1, head_dim] in ``dtype``, shared by every layer of a call, for
        position ids [3, B, L] whose tokens belong to requests with rope factors ``alphas`` [B, L]
        (None: all 1); and the queries' logn factors [B, 1, L, 1] (None where the model has none)."""
        cfg = self.config
        cos, sin = rope_cos_sin(position_ids, self.inv_freq, cfg.mrope_section)
        for alpha in alphas.unique().tolist() if alphas is not None and cfg.use_dynamic_ntk else ():
            if alpha != 1.0:  # tokens of a request whose prompt outgrew seq_length: an NTK-scaled base
                scaled = rope_cos_sin(position_ids, ntk_inv_freq(cfg.head_dim, cfg.rope_theta, alpha), None)
                rows = (alphas == alpha)[..., None]
                cos, sin = torch.where(rows, scaled[0], cos), torch.where(rows, scaled[1], sin)
        q_scale = None
        if cfg.use_logn_attn and int(position_ids[0].max()) + 1 > cfg.seq_length:  # else all factors are 1
            q_scale = logn_scale(position_ids[0], cfg.seq_length).to(dtype)[:, None, :, None]
        return cos.to(dtype).unsqueeze(2), signed_sin(sin).to(dtype).unsqueeze(2), q_scale

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def load_weights(self, tensors: Mapping[str, torch.Tensor], layout: Layout = QWEN2) -> None:
        """Load from checkpoint tensors named as ``layout`` names them (any known prefix; see
        weights/layout.py): shapes checked, q/k/v and gate/up fused, the output projection tied to
        the embedding when the config says so."""
        state = layout.module_state(self.config, tensors)
        if self.config.tie_word_embeddings:
            state["lm_head.weight"] = state["embed_tokens.weight"]
        dtype = self.dtype
        self.load_state_dict({name: t.to(dtype) for name, t in state.items()}, assign=True, strict=True)
        self._decoder_step = None
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight


def causal_mask(start: int, length: int) -> torch.Tensor:
    """Bool mask [L, start + L]: query i (at position start + i) sees keys 0 … start + i."""
    keys = torch.arange(start + length)
    queries = torch.arange(start, start + length)
    return keys[None, :] <= queries[:, None]
