"""Configuration dataclasses, built from HF json files or GGUF metadata (one place for both).

HF configs come in two shapes that transformers both reads:
- the nested form (transformers >= 4.5x / 5.x): ``{"text_config": {...}, "vision_config": {...}}``;
- the older flat form: text fields at the top level, ``vision_config`` nested,
  rope settings in ``rope_scaling`` (``{"type": "mrope", "mrope_section": [...]}``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .config_fields import (
    MAX_CONTEXT,
    MAX_HEADS,
    MAX_LAYERS,
    MAX_PATCH,
    MAX_PIXELS,
    MAX_VOCAB,
    MAX_WIDTH,
    Fields,
    check_range,
)
from .errors import ModelFileError

# Architectures we run, keyed by the names config.json uses.
ARCHITECTURES = {
    "Qwen2ForCausalLM": "qwen2",
    "Qwen2VLForConditionalGeneration": "qwen2_vl",
    "Qwen2_5_VLForConditionalGeneration": "qwen2_5_vl",
    "QWenLMHeadModel": "qwen",
    "LlamaForCausalLM": "llama",
}
MODEL_TYPES = {"qwen2": "qwen2", "qwen2_vl": "qwen2_vl", "qwen2_5_vl": "qwen2_5_vl", "qwen": "qwen", "llama": "llama"}
TEXT_ARCHS = ("qwen2", "qwen", "llama")  # the decoder-only ones

# Qwen2 vocabulary special ids (shared/reference.md).
IMAGE_TOKEN_ID = 151655
VIDEO_TOKEN_ID = 151656
VISION_START_TOKEN_ID = 151652
VISION_END_TOKEN_ID = 151653

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class TextConfig:
    """The Qwen2 decoder (also the language half of Qwen2-VL / Qwen2.5-VL)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    # None for plain 1-D RoPE (Qwen2); else the split of head_dim/2 rotary frequencies into
    # temporal / height / width sections (M-RoPE).
    mrope_section: tuple[int, ...] | None = None
    # Which projections carry a bias (Qwen2: q/k/v only; Llama: none by default).
    qkv_bias: bool = True
    o_bias: bool = False
    mlp_bias: bool = False
    # Qwen (v1) beyond its training length ``seq_length`` (modeling_qwen.py): dynamic NTK scales the
    # rope base by a factor fixed per request from its prompt length; logn scales queries past it.
    seq_length: int = 0
    use_dynamic_ntk: bool = False
    use_logn_attn: bool = False

    def __post_init__(self) -> None:
        _check_sizes(self, _TEXT_SIZES)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ModelFileError(
                f"config: num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.mrope_section is not None and sum(self.mrope_section) != self.head_dim // 2:
            raise ModelFileError(
                f"config: mrope_section {list(self.mrope_section)} must sum to head_dim/2 = {self.head_dim // 2}"
            )
        if (self.use_dynamic_ntk or self.use_logn_attn) and self.seq_length < 2:
            raise ModelFileError(
                f"config: seq_length {self.seq_length}: dynamic NTK / logn attention need one of 2 or more"
            )


@dataclass(frozen=True)
class VisionConfig:
    """The ViT of Qwen2-VL (``variant="qwen2_vl"``) or Qwen2.5-VL (``variant="qwen2_5_vl"``)."""

    variant: str
    depth: int
    hidden_size: int  # the ViT width ("embed_dim" in Qwen2-VL's config)
    num_heads: int
    intermediate_size: int  # MLP width (Qwen2-VL: embed_dim * mlp_ratio)
    out_hidden_size: int  # the PatchMerger's output width = the text model's hidden size
    hidden_act: str = "quick_gelu"
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    # Qwen2.5-VL only:
    window_size: int = 112
    fullatt_block_indexes: tuple[int, ...] = ()
    tokens_per_second: float = 4.0
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        _check_sizes(self, _VISION_SIZES)
        if self.variant == "qwen2_5_vl":
            for index in self.fullatt_block_indexes:
                check_range("config", "vision fullatt_block_indexes", index, 0, self.depth - 1)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch row: C * T * P * P (1176 for 3 * 2 * 14 * 14)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size


# Sanity bounds of the sizes (checked whatever the source: config.json or GGUF metadata).
_TEXT_SIZES = {
    "vocab_size": MAX_VOCAB,
    "hidden_size": MAX_WIDTH,
    "intermediate_size": MAX_WIDTH,
    "num_hidden_layers": MAX_LAYERS,
    "num_attention_heads": MAX_HEADS,
    "num_key_value_heads": MAX_HEADS,
    "head_dim": MAX_WIDTH,
    "max_position_embeddings": MAX_CONTEXT,
}
_VISION_SIZES = {
    "depth": MAX_LAYERS,
    "hidden_size": MAX_WIDTH,
    "num_heads": MAX_HEADS,
    "intermediate_size": MAX_WIDTH,
    "out_hidden_size": MAX_WIDTH,
    "in_channels": MAX_PATCH,
    "patch_size": MAX_PATCH,
    "temporal_patch_size": MAX_PATCH,
    "spatial_merge_size": MAX_PATCH,
    "window_size": MAX_WIDTH,
}


def _check_sizes(config: Any, sizes: dict[str, int]) -> None:
    """Every size a positive integer within its sanity bound (one line naming the field otherwise)."""
    kind = "vision " if isinstance(config, VisionConfig) else ""
    for name, high in sizes.items():
        check_range("config", f"{kind}{name}", getattr(config, name), 1, high)


@dataclass(frozen=True)
class PreprocessConfig:
    """Image preprocessing (preprocessor_config.json), as Qwen2VLImageProcessor uses it."""

    min_pixels: int = 4 * 28 * 28
    max_pixels: int = 16384 * 28 * 28
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size


@dataclass(frozen=True)
class GenerationConfig:
    """Defaults from generation_config.json; request arguments override them."""

    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0


@dataclass(frozen=True)
class ModelConfig:
    arch: str  # "qwen2" | "qwen2_vl" | "qwen2_5_vl" | "qwen" | "llama"
    text: TextConfig
    vision: VisionConfig | None = None
    image_token_id: int = IMAGE_TOKEN_ID
    video_token_id: int = VIDEO_TOKEN_ID
    vision_start_token_id: int = VISION_START_TOKEN_ID
    vision_end_token_id: int = VISION_END_TOKEN_ID

    @property
    def is_vision(self) -> bool:
        return self.vision is not None


# ----------------------------------------------------------------------------------------------
# HF json → dataclasses


def detect_arch(raw: dict[str, Any], where: str = "config.json") -> str:
    fields = Fields(raw, where)
    architectures = fields.value("architectures", [])
    if not isinstance(architectures, list) or not all(isinstance(name, str) for name in architectures):
        raise fields.fail("architectures", "a list of strings", architectures)
    for name in architectures:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    model_type = raw.get("model_type")
    if model_type in MODEL_TYPES:
        return MODEL_TYPES[model_type]
    shown = (architectures or [model_type])[0]
    raise ModelFileError(f"{where}: unsupported architecture {shown!r} (qwenvl runs {', '.join(ARCHITECTURES)})")


def _rope_settings(section: Fields, top: Fields) -> tuple[float, tuple[int, ...] | None]:
    rope = None
    for fields, key in ((section, "rope_parameters"), (section, "rope_scaling"), (top, "rope_scaling")):
        if fields.value(key, None):  # the first one set (an empty object counts as unset)
            rope = fields.section(key)
            break
    theta = top.number("rope_theta", 1_000_000.0, above=0)
    theta = section.number("rope_theta", theta, above=0)
    mrope = None
    if rope is not None:
        theta = rope.number("rope_theta", theta, above=0)
        mrope = rope.integers("mrope_section", None, low=0, high=MAX_WIDTH, max_length=8)
    return theta, (mrope or None)


def text_config_from_hf(raw: dict[str, Any], arch: str, where: str = "config.json") -> TextConfig:
    top = Fields(raw, where)
    section = top.section("text_config") if top.has("text_config") else top
    assert section is not None
    heads = section.integer("num_attention_heads", high=MAX_HEADS)
    hidden = section.integer("hidden_size")
    theta, mrope = _rope_settings(section, top)
    head_dim = section.integer("head_dim", hidden // heads or 1)
    if arch != "qwen2" and mrope is None:
        mrope = (16, 24, 24)  # transformers' default for Qwen2-VL / Qwen2.5-VL
    tie = top.flag("tie_word_embeddings", False) or section.flag("tie_word_embeddings", False)
    try:
        return TextConfig(
            vocab_size=section.integer("vocab_size", high=MAX_VOCAB),
            hidden_size=hidden,
            intermediate_size=section.integer("intermediate_size"),
            num_hidden_layers=section.integer("num_hidden_layers", high=MAX_LAYERS),
            num_attention_heads=heads,
            num_key_value_heads=section.integer("num_key_value_heads", heads, high=MAX_HEADS),
            head_dim=head_dim,
            rms_norm_eps=section.number("rms_norm_eps", 1e-6, low=0, high=1),
            rope_theta=theta,
            max_position_embeddings=section.integer("max_position_embeddings", 32768, high=MAX_CONTEXT),
            tie_word_embeddings=tie,
            mrope_section=mrope,
        )
    except ModelFileError as error:  # the dataclass's own checks, which do not know the file
        raise ModelFileError(f"{where}: {str(error).removeprefix('config: ')}") from None


VISION_ACTIVATIONS = ("quick_gelu", "gelu", "gelu_pytorch_tanh", "silu", "swish")


def qwen_text_config_from_hf(raw: dict[str, Any], where: str = "config.json") -> TextConfig:
    """Qwen (v1)'s config.json (configuration_qwen.py's names and defaults). Its ``intermediate_size``
    is twice the MLP width (w1 and w2 each have half)."""
    fields = Fields(raw, where)
    heads = fields.integer("num_attention_heads", high=MAX_HEADS)
    hidden = fields.integer("hidden_size")
    rotary_pct = fields.number("rotary_pct", 1.0, above=0, high=1)
    if rotary_pct != 1.0:
        raise ModelFileError(f"{where}: rotary_pct {rotary_pct} is not supported (qwenvl rotates whole heads)")
    bias = not fields.flag("no_bias", True)
    ntk, logn = fields.flag("use_dynamic_ntk", True), fields.flag("use_logn_attn", True)
    # both scale from seq_length: then it must be there
    seq_length = fields.integer("seq_length", high=MAX_CONTEXT) if ntk or logn else fields.integer("seq_length", 0)
    return _text_config(
        where,
        vocab_size=fields.integer("vocab_size", high=MAX_VOCAB),
        hidden_size=hidden,
        intermediate_size=fields.integer("intermediate_size", high=2 * MAX_WIDTH) // 2,
        num_hidden_layers=fields.integer("num_hidden_layers", high=MAX_LAYERS),
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=fields.integer("kv_channels", hidden // heads or 1),
        rms_norm_eps=fields.number("layer_norm_epsilon", 1e-6, low=0, high=1),
        rope_theta=fields.number("rotary_emb_base", 10000.0, above=0),
        max_position_embeddings=fields.integer("max_position_embeddings", 8192, high=MAX_CONTEXT),
        tie_word_embeddings=fields.flag("tie_word_embeddings", False),
        o_bias=bias,
        mlp_bias=bias,
        seq_length=seq_length,
        use_dynamic_ntk=ntk,
        use_logn_attn=logn,
    )


def llama_text_config_from_hf(raw: dict[str, Any], where: str = "config.json") -> TextConfig:
    """LlamaForCausalLM's config.json (LlamaConfig's defaults: rope base 10000, no biases unless
    ``attention_bias`` / ``mlp_bias``, untied head). Rope scaling other than none is refused."""
    fields = Fields(raw, where)
    rope = None
    for key in ("rope_parameters", "rope_scaling"):
        if fields.value(key, None):
            rope = fields.section(key)
            break
    kind = "default"
    if rope is not None:
        kind = rope.text("rope_type", rope.text("type", "default"))
    if kind != "default":
        raise ModelFileError(f"{where}: rope scaling {kind!r} is not supported (qwenvl runs Llama's plain rope)")
    activation = fields.text("hidden_act", "silu")
    if activation != "silu":
        raise ModelFileError(f"{where}: hidden_act {activation!r} is not supported (Llama's is silu)")
    heads = fields.integer("num_attention_heads", high=MAX_HEADS)
    hidden = fields.integer("hidden_size")
    theta = fields.number("rope_theta", 10000.0, above=0)
    if rope is not None:
        theta = rope.number("rope_theta", theta, above=0)
    attention_bias = fields.flag("attention_bias", False)
    return _text_config(
        where,
        vocab_size=fields.integer("vocab_size", high=MAX_VOCAB),
        hidden_size=hidden,
        intermediate_size=fields.integer("intermediate_size"),
        num_hidden_layers=fields.integer("num_hidden_layers", high=MAX_LAYERS),
        num_attention_heads=heads,
        num_key_value_heads=fields.integer("num_key_value_heads", heads, high=MAX_HEADS) or heads,
        head_dim=fields.integer("head_dim", hidden // heads or 1),
        rms_norm_eps=fields.number("rms_norm_eps", 1e-6, low=0, high=1),
        rope_theta=theta,
        max_position_embeddings=fields.integer("max_position_embeddings", 2048, high=MAX_CONTEXT),
        tie_word_embeddings=fields.flag("tie_word_embeddings", False),
        qkv_bias=attention_bias,
        o_bias=attention_bias,
        mlp_bias=fields.flag("mlp_bias", False),
    )


def _text_config(where: str, **values: Any) -> TextConfig:
    """A TextConfig, its own checks' errors naming the file."""
    try:
        return TextConfig(**values)
    except ModelFileError as error:
        raise ModelFileError(f"{where}: {str(error).removeprefix('config: ')}") from None


TEXT_CONFIG_READERS = {"qwen": qwen_text_config_from_hf, "llama": llama_text_config_from_hf}


def vision_config_from_hf(raw: dict[str, Any], arch: str, text: TextConfig, where: str = "config.json") -> VisionConfig:
    section = Fields(raw, where).section("vision_config", required=True)
    assert section is not None
    channels = section.integer("in_chans", 3, high=MAX_PATCH)
    common = dict(
        variant=arch,
        depth=section.integer("depth", high=MAX_LAYERS),
        num_heads=section.integer("num_heads", high=MAX_HEADS),
        in_channels=section.integer("in_channels", channels, high=MAX_PATCH),
        patch_size=section.integer("patch_size", 14, high=MAX_PATCH),
        temporal_patch_size=section.integer("temporal_patch_size", 2, high=MAX_PATCH),
        spatial_merge_size=section.integer("spatial_merge_size", 2, high=MAX_PATCH),
    )
    try:
        if arch == "qwen2_vl":
            embed_dim = section.integer("embed_dim")
            ratio = section.number("mlp_ratio", 4.0, above=0, high=64)
            return VisionConfig(
                hidden_size=embed_dim,
                intermediate_size=max(1, int(embed_dim * ratio)),
                out_hidden_size=section.integer("hidden_size", text.hidden_size),
                hidden_act=section.text("hidden_act", "quick_gelu", choices=VISION_ACTIVATIONS),
                **common,
            )
        depth = common["depth"]
        return VisionConfig(
            hidden_size=section.integer("hidden_size"),
            intermediate_size=section.integer("intermediate_size"),
            out_hidden_size=section.integer("out_hidden_size", text.hidden_size),
            hidden_act=section.text("hidden_act", "silu", choices=VISION_ACTIVATIONS),
            window_size=section.integer("window_size", 112),
            fullatt_block_indexes=section.integers("fullatt_block_indexes", (7, 15, 23, 31), high=max(depth - 1, 0)),
            tokens_per_second=section.number("tokens_per_second", 4.0, above=0, high=1e6),
            **common,
        )
    except ModelFileError as error:
        raise ModelFileError(f"{where}: {str(error).removeprefix('config: ')}") from None


def model_config_from_hf(raw: dict[str, Any], where: str = "config.json") -> ModelConfig:
    arch = detect_arch(raw, where)
    reader = TEXT_CONFIG_READERS.get(arch)
    text = reader(raw, where) if reader is not None else text_config_from_hf(raw, arch, where)
    vision = vision_config_from_hf(raw, arch, text, where) if arch not in TEXT_ARCHS else None
    fields = Fields(raw, where)
    vocab = text.vocab_size - 1
    return ModelConfig(
        arch=arch,
        text=text,
        vision=vision,
        image_token_id=fields.integer("image_token_id", IMAGE_TOKEN_ID, low=0, high=max(vocab, IMAGE_TOKEN_ID)),
        video_token_id=fields.integer("video_token_id", VIDEO_TOKEN_ID, low=0, high=max(vocab, VIDEO_TOKEN_ID)),
        vision_start_token_id=fields.integer(
            "vision_start_token_id", VISION_START_TOKEN_ID, low=0, high=max(vocab, VISION_START_TOKEN_ID)
        ),
        vision_end_token_id=fields.integer(
            "vision_end_token_id", VISION_END_TOKEN_ID, low=0, high=max(vocab, VISION_END_TOKEN_ID)
        ),
    )


def preprocess_config_from_hf(raw: dict[str, Any] | None, where: str = "preprocessor_config.json") -> PreprocessConfig:
    if not raw:
        return PreprocessConfig()
    fields = Fields(raw, where)
    size = fields.section("size") or Fields({}, where, "size.")
    defaults = PreprocessConfig()
    min_pixels = size.integer("shortest_edge", defaults.min_pixels, high=MAX_PIXELS)
    max_pixels = size.integer("longest_edge", defaults.max_pixels, high=MAX_PIXELS)
    min_pixels = fields.integer("min_pixels", min_pixels, high=MAX_PIXELS)
    max_pixels = fields.integer("max_pixels", max_pixels, high=MAX_PIXELS)
    if min_pixels > max_pixels:
        raise ModelFileError(f"{where}: min_pixels ({min_pixels}) is larger than max_pixels ({max_pixels})")
    return PreprocessConfig(
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        patch_size=fields.integer("patch_size", defaults.patch_size, high=MAX_PATCH),
        temporal_patch_size=fields.integer("temporal_patch_size", defaults.temporal_patch_size, high=MAX_PATCH),
        merge_size=fields.integer("merge_size", defaults.merge_size, high=MAX_PATCH),
        image_mean=fields.numbers("image_mean", defaults.image_mean, length=3),  # type: ignore[arg-type]
        image_std=fields.numbers("image_std", defaults.image_std, length=3, above=0),  # type: ignore[arg-type]
    )


def _id_tuple(fields: Fields, key: str) -> tuple[int, ...]:
    value = fields.value(key, None)
    if value is None:
        return ()
    if isinstance(value, list):
        return fields.integers(key, low=0, high=MAX_VOCAB)
    return (fields.integer(key, low=0, high=MAX_VOCAB),)


def generation_config_from_hf(
    raw: dict[str, Any] | None, fallback_eos: tuple[int, ...] = (), where: str = "generation_config.json"
) -> GenerationConfig:
    fields = Fields(raw or {}, where)
    eos = _id_tuple(fields, "eos_token_id") or fallback_eos
    return GenerationConfig(
        eos_token_ids=eos,
        pad_token_id=fields.integer("pad_token_id", None, low=0, high=MAX_VOCAB),
        do_sample=fields.flag("do_sample", False),
        temperature=fields.number("temperature", 1.0, low=0) or 1.0,
        top_k=fields.integer("top_k", 0, low=0, high=MAX_VOCAB),
        top_p=fields.number("top_p", 1.0, low=0, high=1) or 1.0,
        min_p=fields.number("min_p", 0.0, low=0, high=1),
        repetition_penalty=fields.number("repetition_penalty", 1.0, low=0) or 1.0,
    )


__all__ = [
    "TextConfig",
    "VisionConfig",
    "PreprocessConfig",
    "GenerationConfig",
    "ModelConfig",
    "model_config_from_hf",
    "preprocess_config_from_hf",
    "generation_config_from_hf",
    "detect_arch",
]
