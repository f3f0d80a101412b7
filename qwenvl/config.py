"""Configuration dataclasses, built from HF json files or GGUF metadata (one place for both).

HF configs come in two shapes that transformers both reads:
- the nested form (transformers >= 4.5x / 5.x): ``{"text_config": {...}, "vision_config": {...}}``;
- the older flat form: text fields at the top level, ``vision_config`` nested,
  rope settings in ``rope_scaling`` (``{"type": "mrope", "mrope_section": [...]}``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch row: C * T * P * P (1176 for 3 * 2 * 14 * 14)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size


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


def _require(section: dict[str, Any], key: str, where: str) -> Any:
    if key not in section or section[key] is None:
        raise ModelFileError(f"{where}: missing field '{key}'")
    return section[key]


def detect_arch(raw: dict[str, Any], where: str = "config.json") -> str:
    for name in raw.get("architectures") or []:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    model_type = raw.get("model_type")
    if model_type in MODEL_TYPES:
        return MODEL_TYPES[model_type]
    shown = (raw.get("architectures") or [model_type])[0]
    raise ModelFileError(f"{where}: unsupported architecture {shown!r} (qwenvl runs {', '.join(ARCHITECTURES)})")


def _rope_settings(section: dict[str, Any], top: dict[str, Any]) -> tuple[float, tuple[int, ...] | None]:
    rope = section.get("rope_parameters") or section.get("rope_scaling") or top.get("rope_scaling") or {}
    theta = rope.get("rope_theta", section.get("rope_theta", top.get("rope_theta", 1_000_000.0)))
    mrope = rope.get("mrope_section")
    return float(theta), (tuple(int(x) for x in mrope) if mrope else None)


def text_config_from_hf(raw: dict[str, Any], arch: str, where: str = "config.json") -> TextConfig:
    section = raw.get("text_config") or raw
    heads = int(_require(section, "num_attention_heads", where))
    hidden = int(_require(section, "hidden_size", where))
    theta, mrope = _rope_settings(section, raw)
    head_dim = int(section.get("head_dim") or hidden // heads)
    if arch != "qwen2" and mrope is None:
        mrope = (16, 24, 24)  # transformers' default for Qwen2-VL / Qwen2.5-VL
    tie = bool(raw.get("tie_word_embeddings", False) or section.get("tie_word_embeddings", False))
    return TextConfig(
        vocab_size=int(_require(section, "vocab_size", where)),
        hidden_size=hidden,
        intermediate_size=int(_require(section, "intermediate_size", where)),
        num_hidden_layers=int(_require(section, "num_hidden_layers", where)),
        num_attention_heads=heads,
        num_key_value_heads=int(section.get("num_key_value_heads") or heads),
        head_dim=head_dim,
        rms_norm_eps=float(section.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        max_position_embeddings=int(section.get("max_position_embeddings", 32768)),
        tie_word_embeddings=tie,
        mrope_section=mrope,
    )


def qwen_text_config_from_hf(raw: dict[str, Any], where: str = "config.json") -> TextConfig:
    """Qwen (v1)'s config.json (configuration_qwen.py's names and defaults). Its ``intermediate_size``
    is twice the MLP width (w1 and w2 each have half)."""
    heads = int(_require(raw, "num_attention_heads", where))
    hidden = int(_require(raw, "hidden_size", where))
    rotary_pct = float(raw.get("rotary_pct", 1.0))
    if rotary_pct != 1.0:
        raise ModelFileError(f"{where}: rotary_pct {rotary_pct} is not supported (qwenvl rotates whole heads)")
    bias = not bool(raw.get("no_bias", True))
    ntk, logn = bool(raw.get("use_dynamic_ntk", True)), bool(raw.get("use_logn_attn", True))
    seq_length = int(_require(raw, "seq_length", where)) if ntk or logn else int(raw.get("seq_length") or 0)
    return TextConfig(
        vocab_size=int(_require(raw, "vocab_size", where)),
        hidden_size=hidden,
        intermediate_size=int(_require(raw, "intermediate_size", where)) // 2,
        num_hidden_layers=int(_require(raw, "num_hidden_layers", where)),
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=int(raw.get("kv_channels") or hidden // heads),
        rms_norm_eps=float(raw.get("layer_norm_epsilon", 1e-6)),
        rope_theta=float(raw.get("rotary_emb_base", 10000.0)),
        max_position_embeddings=int(raw.get("max_position_embeddings", 8192)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        o_bias=bias,
        mlp_bias=bias,
        seq_length=seq_length,
        use_dynamic_ntk=ntk,
        use_logn_attn=logn,
    )


def llama_text_config_from_hf(raw: dict[str, Any], where: str = "config.json") -> TextConfig:
    """LlamaForCausalLM's config.json (LlamaConfig's defaults: rope base 10000, no biases unless
    ``attention_bias`` / ``mlp_bias``, untied head). Rope scaling other than none is refused."""
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        raise ModelFileError(f"{where}: rope scaling {kind!r} is not supported (qwenvl runs Llama's plain rope)")
    if raw.get("hidden_act", "silu") != "silu":
        raise ModelFileError(f"{where}: hidden_act {raw['hidden_act']!r} is not supported (Llama's is silu)")
    heads = int(_require(raw, "num_attention_heads", where))
    hidden = int(_require(raw, "hidden_size", where))
    attention_bias = bool(raw.get("attention_bias", False))
    return TextConfig(
        vocab_size=int(_require(raw, "vocab_size", where)),
        hidden_size=hidden,
        intermediate_size=int(_require(raw, "intermediate_size", where)),
        num_hidden_layers=int(_require(raw, "num_hidden_layers", where)),
        num_attention_heads=heads,
        num_key_value_heads=int(raw.get("num_key_value_heads") or heads),
        head_dim=int(raw.get("head_dim") or hidden // heads),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope.get("rope_theta", raw.get("rope_theta", 10000.0))),
        max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        qkv_bias=attention_bias,
        o_bias=attention_bias,
        mlp_bias=bool(raw.get("mlp_bias", False)),
    )


TEXT_CONFIG_READERS = {"qwen": qwen_text_config_from_hf, "llama": llama_text_config_from_hf}


def vision_config_from_hf(raw: dict[str, Any], arch: str, text: TextConfig, where: str = "config.json") -> VisionConfig:
    section = raw.get("vision_config")
    if not isinstance(section, dict):
        raise ModelFileError(f"{where}: missing field 'vision_config'")
    where = f"{where} vision_config"
    if arch == "qwen2_vl":
        embed_dim = int(_require(section, "embed_dim", where))
        return VisionConfig(
            variant=arch,
            depth=int(_require(section, "depth", where)),
            hidden_size=embed_dim,
            num_heads=int(_require(section, "num_heads", where)),
            intermediate_size=int(embed_dim * float(section.get("mlp_ratio", 4))),
            out_hidden_size=int(section.get("hidden_size") or text.hidden_size),
            hidden_act=section.get("hidden_act", "quick_gelu"),
            in_channels=int(section.get("in_channels", section.get("in_chans", 3))),
            patch_size=int(section.get("patch_size", 14)),
            temporal_patch_size=int(section.get("temporal_patch_size", 2)),
            spatial_merge_size=int(section.get("spatial_merge_size", 2)),
        )
    return VisionConfig(
        variant=arch,
        depth=int(_require(section, "depth", where)),
        hidden_size=int(_require(section, "hidden_size", where)),
        num_heads=int(_require(section, "num_heads", where)),
        intermediate_size=int(_require(section, "intermediate_size", where)),
        out_hidden_size=int(section.get("out_hidden_size") or text.hidden_size),
        hidden_act=section.get("hidden_act", "silu"),
        in_channels=int(section.get("in_channels", section.get("in_chans", 3))),
        patch_size=int(section.get("patch_size", 14)),
        temporal_patch_size=int(section.get("temporal_patch_size", 2)),
        spatial_merge_size=int(section.get("spatial_merge_size", 2)),
        window_size=int(section.get("window_size", 112)),
        fullatt_block_indexes=tuple(int(i) for i in section.get("fullatt_block_indexes", (7, 15, 23, 31))),
        tokens_per_second=float(section.get("tokens_per_second", 4)),
    )


def model_config_from_hf(raw: dict[str, Any], where: str = "config.json") -> ModelConfig:
    arch = detect_arch(raw, where)
    reader = TEXT_CONFIG_READERS.get(arch)
    text = reader(raw, where) if reader is not None else text_config_from_hf(raw, arch, where)
    vision = vision_config_from_hf(raw, arch, text, where) if arch not in TEXT_ARCHS else None
    return ModelConfig(
        arch=arch,
        text=text,
        vision=vision,
        image_token_id=int(raw.get("image_token_id", IMAGE_TOKEN_ID)),
        video_token_id=int(raw.get("video_token_id", VIDEO_TOKEN_ID)),
        vision_start_token_id=int(raw.get("vision_start_token_id", VISION_START_TOKEN_ID)),
        vision_end_token_id=int(raw.get("vision_end_token_id", VISION_END_TOKEN_ID)),
    )


def preprocess_config_from_hf(raw: dict[str, Any] | None) -> PreprocessConfig:
    if not raw:
        return PreprocessConfig()
    size = raw.get("size") or {}
    defaults = PreprocessConfig()
    return PreprocessConfig(
        min_pixels=int(raw.get("min_pixels") or size.get("shortest_edge") or defaults.min_pixels),
        max_pixels=int(raw.get("max_pixels") or size.get("longest_edge") or defaults.max_pixels),
        patch_size=int(raw.get("patch_size", defaults.patch_size)),
        temporal_patch_size=int(raw.get("temporal_patch_size", defaults.temporal_patch_size)),
        merge_size=int(raw.get("merge_size", defaults.merge_size)),
        image_mean=tuple(float(x) for x in raw.get("image_mean", defaults.image_mean)),
        image_std=tuple(float(x) for x in raw.get("image_std", defaults.image_std)),
    )


def _id_tuple(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def generation_config_from_hf(raw: dict[str, Any] | None, fallback_eos: tuple[int, ...] = ()) -> GenerationConfig:
    raw = raw or {}
    eos = _id_tuple(raw.get("eos_token_id")) or fallback_eos
    return GenerationConfig(
        eos_token_ids=eos,
        pad_token_id=raw.get("pad_token_id"),
        do_sample=bool(raw.get("do_sample", False)),
        temperature=float(raw.get("temperature", 1.0) or 1.0),
        top_k=int(raw.get("top_k", 0) or 0),
        top_p=float(raw.get("top_p", 1.0) or 1.0),
        min_p=float(raw.get("min_p", 0.0) or 0.0),
        repetition_penalty=float(raw.get("repetition_penalty", 1.0) or 1.0),
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
