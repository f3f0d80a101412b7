"""One declarative table per decoder architecture: where every weight of ``TextModel`` comes from.

A ``Layout`` lists the decoder's weights (``TextModel``'s parameter names; ``{N}`` stands for the block
index) and, for each, the checkpoint tensors ("pieces") that make it up, concatenated along the rows
in table order (q|k|v, gate|up). A piece is named as Hugging Face checkpoints, llama.cpp's GGUF files
and, for Llama, Meta's original checkpoints name it; its rows and the weight's columns are named
dimensions of the config (``dims``). Everything else is derived from the table:

- the HF loader: ``module_state`` (checkpoint tensors → the module's fused state dict);
- the shape checks: ``hf_shapes`` / ``gguf_shapes`` (every tensor a checkpoint must hold);
- the HF ↔ GGUF names: ``to_gguf`` / ``to_hf``, and which GGUF tensors llama.cpp stores with their
  rows interleaved per head (``rope``: its ``permute`` of llama q/k, undone by ``unpermute_rows``);
- the quantized module swap: ``modules`` (which stored tensors make each layer, with its bias);
- Meta's checkpoint names and the dimension its model-parallel shards split (Llama).

Optional tensors: a bias exists when the config's flag (``qkv_bias``, ``o_bias``, ``mlp_bias``) says
so; the output projection is absent from a checkpoint whose embedding is tied to it.

Checkpoint prefixes (``canonical_name``): transformers >= 4.52 / 5 nest a VL model's decoder under
``model.language_model`` and its ViT under ``model.visual``; older VL checkpoints use ``model.*`` /
``visual.*``, older still ``language_model.model.*`` / ``language_model.lm_head``. The tables use the
flat form.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import torch

from ..config import TextConfig
from ..errors import ModelFileError
from .names import NameTable

NORM, LINEAR, EMBEDDING = "norm", "linear", "embedding"
SUFFIXES = (".weight", ".bias")

CHECKPOINT_PREFIXES = (
    ("model.language_model.", "model."),
    ("language_model.model.", "model."),
    ("language_model.lm_head.", "lm_head."),
    ("model.visual.", "visual."),
)
VISION_PREFIXES = ("model.visual.", "visual.")  # as stored; "visual." once canonical


def canonical_name(name: str) -> str:
    """A checkpoint tensor name in the tables' form: ``model.…``, ``lm_head.…``, ``visual.…``, ``transformer.…``."""
    for prefix, replacement in CHECKPOINT_PREFIXES:
        if name.startswith(prefix):
            return replacement + name[len(prefix) :]
    return name


def dims(cfg: TextConfig) -> dict[str, int]:
    """The named dimensions shapes are made of."""
    return {
        "hidden": cfg.hidden_size,
        "vocab": cfg.vocab_size,
        "q": cfg.num_attention_heads * cfg.head_dim,
        "kv": cfg.num_key_value_heads * cfg.head_dim,
        "ffn": cfg.intermediate_size,
    }


@dataclass(frozen=True)
class Piece:
    """One checkpoint tensor (stem: ``.weight`` / ``.bias`` follow) that is part or all of a weight."""

    hf: str
    gguf: str
    rows: tuple[str, ...]  # named dims; their sum is the piece's row count
    rope: str | None = None  # "q" / "kv": GGUF and Meta store these rows interleaved per (key) head
    meta: str | None = None  # Meta's name (params.json + consolidated.*.pth)
    meta_split: int | None = None  # the dim Meta's model-parallel shards split (None: replicated)


@dataclass(frozen=True)
class Weight:
    """One weight of the decoder module and the pieces it is made of."""

    name: str  # TextModel's module path, "{N}" for the block
    kind: str  # NORM, LINEAR or EMBEDDING
    pieces: tuple[Piece, ...]
    cols: str = "hidden"  # input dim (a norm's length is its rows)
    bias: str | None = None  # the TextConfig flag saying it has a bias
    tied: bool = False  # absent when the config ties the output projection to the embedding


@dataclass(frozen=True)
class Module:
    """One module of a concrete model: its path and the stored tensors (HF names) it is made of."""

    path: str
    kind: str
    weights: tuple[str, ...]
    biases: tuple[str, ...] = ()


def in_block(stem: str, layer: int | None) -> str:
    """A table stem with its "{N}" set to block ``layer`` (None: a stem outside the blocks)."""
    return stem if layer is None else stem.replace("{N}", str(layer))


@dataclass(frozen=True)
class Layout:
    """The decoder of one architecture family."""

    name: str
    weights: tuple[Weight, ...]
    # configs (HF intermediate_size, GGUF feed_forward_length) state the MLP width times this
    ffn_factor: int = 1
    names: NameTable = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        rows = tuple((piece.hf, piece.gguf) for weight in self.weights for piece in weight.pieces)
        object.__setattr__(self, "names", NameTable(rows))

    # -- the concrete model -------------------------------------------------------------------
    def _expanded(self, cfg: TextConfig) -> Iterator[tuple[Weight, int | None]]:
        for weight in self.weights:
            if weight.tied and cfg.tie_word_embeddings:
                continue
            if "{N}" in weight.name:
                for layer in range(cfg.num_hidden_layers):
                    yield weight, layer
            else:
                yield weight, None

    def _tensors(self, cfg: TextConfig) -> Iterator[tuple[Piece, str, tuple[int, ...], int | None]]:
        """(piece, suffix, shape, layer) of every tensor a checkpoint of this config holds, in table order."""
        size = dims(cfg)
        for weight, layer in self._expanded(cfg):
            for piece in weight.pieces:
                rows = sum(size[d] for d in piece.rows)
                shape = (rows,) if weight.kind == NORM else (rows, size[weight.cols])
                yield piece, ".weight", shape, layer
                if weight.bias is not None and getattr(cfg, weight.bias):
                    yield piece, ".bias", (rows,), layer

    def hf_shapes(self, cfg: TextConfig) -> dict[str, tuple[int, ...]]:
        """Every decoder tensor an HF checkpoint of this config holds (canonical names) and its shape."""
        return {in_block(p.hf, layer) + suffix: shape for p, suffix, shape, layer in self._tensors(cfg)}

    def gguf_shapes(self, cfg: TextConfig) -> dict[str, tuple[int, ...]]:
        """Every tensor a GGUF of this config holds, by llama.cpp's name, in torch order."""
        return {in_block(p.gguf, layer) + suffix: shape for p, suffix, shape, layer in self._tensors(cfg)}

    def modules(self, cfg: TextConfig, *, tied: bool | None = None) -> list[Module]:
        """The model's modules and the HF tensors each is made of. ``tied``: the output projection
        is the embedding (default: the config's ``tie_word_embeddings``)."""
        tied = cfg.tie_word_embeddings if tied is None else tied
        embedding = next(w for w in self.weights if w.kind == EMBEDDING)
        out = []
        for weight in self.weights:
            layers: list[int | None] = list(range(cfg.num_hidden_layers)) if "{N}" in weight.name else [None]
            source = embedding if weight.tied and tied else weight
            for layer in layers:
                stems = [in_block(piece.hf, layer) for piece in source.pieces]
                has_bias = weight.bias is not None and getattr(cfg, weight.bias)
                out.append(
                    Module(
                        in_block(weight.name, layer),
                        weight.kind,
                        tuple(stem + ".weight" for stem in stems),
                        tuple(stem + ".bias" for stem in stems) if has_bias else (),
                    )
                )
        return out

    @property
    def output_name(self) -> str:
        """The HF name of the output projection's weight (absent from a tied checkpoint)."""
        head = next(w for w in self.weights if w.tied)
        return head.pieces[0].hf + ".weight"

    def gguf_biases(self, gguf_names: Mapping[str, object] | set[str]) -> dict[str, bool]:
        """The config's bias flags as a GGUF's tensors state them (block 0's biases present or not)."""
        flags: dict[str, bool] = {}
        for weight in self.weights:
            if weight.bias is not None and "{N}" in weight.name:
                name = in_block(weight.pieces[0].gguf, 0) + ".bias"
                flags[weight.bias] = flags.get(weight.bias, False) or name in gguf_names
        return flags

    def block_count(self, names: Iterable[str]) -> int:
        """How many decoder blocks tensors of these (canonical) names make: the highest block index + 1."""
        starts = {p.hf.split("{N}")[0] for w in self.weights for p in w.pieces if "{N}" in p.hf}
        pattern = re.compile("^(?:" + "|".join(re.escape(start) for start in sorted(starts)) + r")(\d+)\.")
        found = {int(m[1]) for name in names if (m := pattern.match(name))}
        return max(found) + 1 if found else 0

    # -- names ----------------------------------------------------------------------------------
    def to_gguf(self, hf_name: str) -> str:
        """``model.layers.3.self_attn.q_proj.bias`` → ``blk.3.attn_q.bias``; KeyError if not in the table."""
        return self.names.to_gguf(hf_name)

    def to_hf(self, gguf_name: str) -> str:
        """Inverse of ``to_gguf``; KeyError if not in the table."""
        return self.names.to_hf(gguf_name)

    def piece(self, hf_name: str) -> Piece:
        """The table row of an HF tensor name; KeyError if not in the table."""
        self.names.to_gguf(hf_name)  # KeyError with the table's message
        stem = re.sub(r"\.\d+\.", ".{N}.", hf_name.rsplit(".", 1)[0] + ".")[:-1]
        for weight in self.weights:
            for piece in weight.pieces:
                if piece.hf == stem:
                    return piece
        raise KeyError(f"unknown HF tensor name {hf_name!r}")

    def rope_heads(self, hf_name: str, cfg: TextConfig) -> int | None:
        """The head count llama.cpp's q/k permutation uses for this tensor in a GGUF (None: stored as is)."""
        rope = self.piece(hf_name).rope
        if rope is None:
            return None
        return cfg.num_attention_heads if rope == "q" else cfg.num_key_value_heads

    # -- loading --------------------------------------------------------------------------------
    def module_state(self, cfg: TextConfig, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``TextModel``'s state dict from checkpoint tensors (any known prefix; vision and unknown
        tensors ignored): shapes checked against the config, pieces concatenated, the output
        projection taken from the embedding when tied."""
        named = {canonical_name(name): name for name in tensors}
        expected = self.hf_shapes(cfg)
        for name, shape in expected.items():
            if name not in named:
                raise ModelFileError(f"checkpoint: missing tensor '{name}'")
            actual = tuple(tensors[named[name]].shape)
            if actual != shape:
                raise ModelFileError(
                    f"checkpoint: tensor '{name}' has shape {list(actual)}, config needs {list(shape)}"
                )
        state = {}
        for module in self.modules(cfg):
            for suffix, parts in ((".weight", module.weights), (".bias", module.biases)):
                if parts:
                    pieces = [tensors[named[name]] for name in parts]
                    state[module.path + suffix] = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        return state


def unpermute_rows(tensor: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows interleaved per head (llama.cpp's GGUF llama q/k, Meta's checkpoints: the pairs (2i, 2i+1)
    rotate together) → HF's rotate-half order (pairs (i, i + head_dim/2)). Works on any row-major
    data whose dim 0 is the rows (weights, biases, quantized blocks)."""
    rows = tensor.shape[0]
    return tensor.reshape(heads, rows // heads // 2, 2, *tensor.shape[1:]).transpose(1, 2).reshape(tensor.shape)


def permute_rows(tensor: torch.Tensor, heads: int) -> torch.Tensor:
    """Inverse of ``unpermute_rows``: HF's order → interleaved (what llama.cpp's converter writes)."""
    rows = tensor.shape[0]
    return tensor.reshape(heads, 2, rows // heads // 2, *tensor.shape[1:]).transpose(1, 2).reshape(tensor.shape)


def _decoder(
    *,
    embed: Piece,
    final_norm: Piece,
    head: Piece,
    attn_norm: Piece,
    qkv: tuple[Piece, ...],
    out: Piece,
    ffn_norm: Piece,
    gate_up: tuple[Piece, ...],
    down: Piece,
) -> tuple[Weight, ...]:
    """The weights every decoder here has (the module structure of ``TextModel``)."""
    return (
        Weight("embed_tokens", EMBEDDING, (embed,)),
        Weight("layers.{N}.input_layernorm", NORM, (attn_norm,)),
        Weight("layers.{N}.self_attn.qkv_proj", LINEAR, qkv, bias="qkv_bias"),
        Weight("layers.{N}.self_attn.o_proj", LINEAR, (out,), cols="q", bias="o_bias"),
        Weight("layers.{N}.post_attention_layernorm", NORM, (ffn_norm,)),
        Weight("layers.{N}.mlp.gate_up_proj", LINEAR, gate_up, bias="mlp_bias"),
        Weight("layers.{N}.mlp.down_proj", LINEAR, (down,), cols="ffn", bias="mlp_bias"),
        Weight("norm", NORM, (final_norm,)),
        Weight("lm_head", LINEAR, (head,), tied=True),
    )


def _hf_style(*, q_rope: str | None = None, k_rope: str | None = None, meta: bool = False) -> tuple[Weight, ...]:
    """The ``model.layers.N.*`` naming of Qwen2 and Llama checkpoints."""
    layer = "model.layers.{N}."

    def piece(hf: str, gguf: str, rows: tuple[str, ...], meta_name: str | None, split: int | None, rope=None):
        return Piece(hf, gguf, rows, rope, meta_name if meta else None, split if meta else None)

    return _decoder(
        embed=piece("model.embed_tokens", "token_embd", ("vocab",), "tok_embeddings", 1),
        final_norm=piece("model.norm", "output_norm", ("hidden",), "norm", None),
        head=piece("lm_head", "output", ("vocab",), "output", 0),
        attn_norm=piece(layer + "input_layernorm", "blk.{N}.attn_norm", ("hidden",), "layers.{N}.attention_norm", None),
        qkv=(
            piece(layer + "self_attn.q_proj", "blk.{N}.attn_q", ("q",), "layers.{N}.attention.wq", 0, q_rope),
            piece(layer + "self_attn.k_proj", "blk.{N}.attn_k", ("kv",), "layers.{N}.attention.wk", 0, k_rope),
            piece(layer + "self_attn.v_proj", "blk.{N}.attn_v", ("kv",), "layers.{N}.attention.wv", 0),
        ),
        out=piece(layer + "self_attn.o_proj", "blk.{N}.attn_output", ("hidden",), "layers.{N}.attention.wo", 1),
        ffn_norm=piece(
            layer + "post_attention_layernorm", "blk.{N}.ffn_norm", ("hidden",), "layers.{N}.ffn_norm", None
        ),
        gate_up=(
            piece(layer + "mlp.gate_proj", "blk.{N}.ffn_gate", ("ffn",), "layers.{N}.feed_forward.w1", 0),
            piece(layer + "mlp.up_proj", "blk.{N}.ffn_up", ("ffn",), "layers.{N}.feed_forward.w3", 0),
        ),
        down=piece(layer + "mlp.down_proj", "blk.{N}.ffn_down", ("hidden",), "layers.{N}.feed_forward.w2", 1),
    )


# Qwen2 / Qwen2.5 and the language half of Qwen2-VL / Qwen2.5-VL (GGUF "qwen2" / "qwen2vl"): q/k/v
# with biases, stored as they are.
QWEN2 = Layout("qwen2", _hf_style())

# Qwen (v1), QWenLMHeadModel (GGUF "qwen", as llama.cpp's converter names it): q|k|v stored fused
# with its bias (c_attn); the MLP is c_proj(w1(x) * silu(w2(x))): w2 is the gate, w1 the up
# projection, each half of the config's intermediate_size.
_QWEN_BLOCK = "transformer.h.{N}."
QWEN = Layout(
    "qwen",
    _decoder(
        embed=Piece("transformer.wte", "token_embd", ("vocab",)),
        final_norm=Piece("transformer.ln_f", "output_norm", ("hidden",)),
        head=Piece("lm_head", "output", ("vocab",)),
        attn_norm=Piece(_QWEN_BLOCK + "ln_1", "blk.{N}.attn_norm", ("hidden",)),
        qkv=(Piece(_QWEN_BLOCK + "attn.c_attn", "blk.{N}.attn_qkv", ("q", "kv", "kv")),),
        out=Piece(_QWEN_BLOCK + "attn.c_proj", "blk.{N}.attn_output", ("hidden",)),
        ffn_norm=Piece(_QWEN_BLOCK + "ln_2", "blk.{N}.ffn_norm", ("hidden",)),
        gate_up=(
            Piece(_QWEN_BLOCK + "mlp.w2", "blk.{N}.ffn_gate", ("ffn",)),
            Piece(_QWEN_BLOCK + "mlp.w1", "blk.{N}.ffn_up", ("ffn",)),
        ),
        down=Piece(_QWEN_BLOCK + "mlp.c_proj", "blk.{N}.ffn_down", ("hidden",)),
    ),
    ffn_factor=2,
)

# Llama (LlamaForCausalLM; GGUF "llama"; Meta's params.json + consolidated.NN.pth): HF's names; no
# biases unless the config asks. GGUF and Meta store q and k with their rows interleaved per head
# (llama.cpp's converter permutes them; HF's conversion of Meta's weights undid the same).
LLAMA = Layout("llama", _hf_style(q_rope="q", k_rope="kv", meta=True))

# ModelConfig.arch → its decoder's layout
LAYOUTS = {"qwen2": QWEN2, "qwen2_vl": QWEN2, "qwen2_5_vl": QWEN2, "qwen": QWEN, "llama": LLAMA}
# llama.cpp's architecture names (general.architecture) → ModelConfig.arch. llama.cpp writes the text
# half of both Qwen2-VL and Qwen2.5-VL as "qwen2vl"; the mmproj file tells the two apart.
GGUF_ARCHITECTURES = {"qwen2": "qwen2", "qwen2vl": "qwen2_vl", "qwen": "qwen", "llama": "llama"}
# ModelConfig.arch → the general.architecture ``qwenvl convert`` writes
GGUF_ARCH_OF = {"qwen2": "qwen2", "qwen2_vl": "qwen2vl", "qwen2_5_vl": "qwen2vl", "qwen": "qwen", "llama": "llama"}


def layout_for(arch: str) -> Layout:
    """The decoder layout of a ModelConfig.arch."""
    try:
        return LAYOUTS[arch]
    except KeyError:
        raise ModelFileError(f"no decoder layout for architecture {arch!r}") from None


__all__ = [
    "GGUF_ARCHITECTURES",
    "GGUF_ARCH_OF",
    "LAYOUTS",
    "Layout",
    "Module",
    "Piece",
    "Weight",
    "LLAMA",
    "QWEN",
    "QWEN2",
    "canonical_name",
    "dims",
    "in_block",
    "layout_for",
    "permute_rows",
    "unpermute_rows",
]
