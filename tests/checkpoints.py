"""Tiny random checkpoints built with transformers itself, saved as real HF checkpoint directories.

They carry the real Qwen2 tokenizer (built from qwen.tiktoken) and the real chat templates, so prompts
are tokenized exactly as for the published models; only the weights are random and small.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

DATA = Path(__file__).parent / "data"
QWEN_VOCAB = 151936
TEMPLATES = {
    "qwen2": DATA / "qwen2_5_chat_template.jinja",
    "qwen2_vl": DATA / "qwen2_vl_chat_template.jinja",
    "qwen2_5_vl": DATA / "qwen2_vl_chat_template.jinja",
}


def _scale_weights(model: torch.nn.Module, seed: int, std: float) -> None:
    """Random weights large enough that greedy choices are clear-cut (not near-ties)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or ".norm" in name or "layernorm" in name or "ln_q" in name:
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=generator))
            else:
                param.copy_(std * torch.randn(param.shape, generator=generator))


def _finish_dir(model, directory: Path, tokenizer_dir: Path, arch: str, eos: list[int]) -> Path:
    model.save_pretrained(directory, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, directory / name)
    shutil.copy(TEMPLATES[arch], directory / "chat_template.jinja")
    generation = {"eos_token_id": eos, "pad_token_id": 151643, "do_sample": False}
    (directory / "generation_config.json").write_text(json.dumps(generation))
    return directory


def text_config_kwargs(hidden=64, layers=2, heads=4, kv_heads=2, ffn=128, tie=False, vocab=QWEN_VOCAB, theta=1e6):
    return dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        rms_norm_eps=1e-6,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": theta},
        tie_word_embeddings=tie,
        bos_token_id=151643,
        eos_token_id=151645,
    )


def build_qwen2(directory: Path, tokenizer_dir: Path, *, seed: int = 0, std: float = 0.08, **shape) -> Path:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(**text_config_kwargs(**shape))
    model = Qwen2ForCausalLM(config).eval()
    _scale_weights(model, seed, std)
    if config.tie_word_embeddings:
        model.tie_weights()
    return _finish_dir(model, directory, tokenizer_dir, "qwen2", [151645, 151643])


def build_vl(
    directory: Path,
    tokenizer_dir: Path,
    *,
    arch: str = "qwen2_vl",
    seed: int = 0,
    std: float = 0.08,
    mrope_section: list[int] | None = None,
    vision: dict | None = None,
    **shape,
) -> Path:
    """A random tiny Qwen2-VL (arch="qwen2_vl") or Qwen2.5-VL (arch="qwen2_5_vl") checkpoint."""
    text = text_config_kwargs(**shape)
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    section = mrope_section or _default_section(head_dim)
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": section}
    tie = text.pop("tie_word_embeddings")
    torch.manual_seed(seed)
    if arch == "qwen2_vl":
        from transformers import Qwen2VLConfig as Config
        from transformers import Qwen2VLForConditionalGeneration as Model

        vision_config = {
            "depth": 2,
            "embed_dim": 32,
            "num_heads": 2,
            "mlp_ratio": 2,
            "hidden_size": text["hidden_size"],
        }
    else:
        from transformers import Qwen2_5_VLConfig as Config
        from transformers import Qwen2_5_VLForConditionalGeneration as Model

        vision_config = {
            "depth": 2,
            "hidden_size": 32,
            "num_heads": 2,
            "intermediate_size": 48,
            "out_hidden_size": text["hidden_size"],
            "window_size": 56,
            "fullatt_block_indexes": [1],
            "tokens_per_second": 2,
        }
    vision_config.update(vision or {})
    config = Config(text_config=text, vision_config=vision_config, tie_word_embeddings=tie)
    model = Model(config).eval()
    _scale_weights(model, seed, std)
    if tie:
        model.tie_weights()
    return _finish_dir(model, directory, tokenizer_dir, arch, [151645, 151643])


def _default_section(head_dim: int) -> list[int]:
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


# ----------------------------------------------------------------------------------------------
# Qwen (v1): QWenLMHeadModel checkpoints, as the hub publishes them (transformer.*, qwen.tiktoken)

# Qwen2 name → Qwen (v1) name; q|k|v become c_attn, gate is w2 and up is w1 (c_proj(w1(x) * silu(w2(x)))).
_QWEN_V1_NAMES = {
    "model.embed_tokens.weight": "transformer.wte.weight",
    "model.norm.weight": "transformer.ln_f.weight",
    "lm_head.weight": "lm_head.weight",
    "input_layernorm.weight": "ln_1.weight",
    "post_attention_layernorm.weight": "ln_2.weight",
    "self_attn.o_proj.weight": "attn.c_proj.weight",
    "mlp.gate_proj.weight": "mlp.w2.weight",
    "mlp.up_proj.weight": "mlp.w1.weight",
    "mlp.down_proj.weight": "mlp.c_proj.weight",
}


def qwen_v1_state(qwen2_state: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """A Qwen2 (MHA) state dict renamed and fused as a QWenLMHeadModel stores it."""
    state = {}
    for name, new in _QWEN_V1_NAMES.items():
        if name in qwen2_state:
            state[new] = qwen2_state[name]
    for i in range(layers):
        old, new = f"model.layers.{i}.", f"transformer.h.{i}."
        for name, renamed in _QWEN_V1_NAMES.items():
            if old + name in qwen2_state:
                state[new + renamed] = qwen2_state[old + name]
        for kind in ("weight", "bias"):
            parts = [qwen2_state[f"{old}self_attn.{p}_proj.{kind}"] for p in "qkv"]
            state[f"{new}attn.c_attn.{kind}"] = torch.cat(parts)
    return {name: tensor.contiguous() for name, tensor in state.items()}


def qwen2_state_from_v1(state: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """The inverse of ``qwen_v1_state``: what transformers' Qwen2ForCausalLM loads."""
    back = {new: old for old, new in _QWEN_V1_NAMES.items()}
    out = {back[n]: t for n, t in state.items() if n in back}
    for i in range(layers):
        old, new = f"model.layers.{i}.", f"transformer.h.{i}."
        for name, renamed in _QWEN_V1_NAMES.items():
            if new + renamed in state:
                out[old + name] = state[new + renamed]
        for kind in ("weight", "bias"):
            q, k, v = state[f"{new}attn.c_attn.{kind}"].chunk(3)
            out |= {f"{old}self_attn.q_proj.{kind}": q, f"{old}self_attn.k_proj.{kind}": k}
            out[f"{old}self_attn.v_proj.{kind}"] = v
    return out


def qwen_v1_config(hidden=64, layers=2, heads=4, ffn=128, vocab=QWEN_VOCAB, seq_length=2048, **flags) -> dict:
    """config.json of a QWenLMHeadModel (configuration_qwen.py's names; intermediate_size = 2 × MLP width)."""
    return {
        "architectures": ["QWenLMHeadModel"],
        "model_type": "qwen",
        "auto_map": {
            "AutoConfig": "configuration_qwen.QWenConfig",
            "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel",
        },
        "vocab_size": vocab,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "kv_channels": hidden // heads,
        "intermediate_size": 2 * ffn,
        "layer_norm_epsilon": 1e-6,
        "rotary_emb_base": 10000,
        "rotary_pct": 1.0,
        "max_position_embeddings": 8192,
        "seq_length": seq_length,
        "use_dynamic_ntk": flags.get("use_dynamic_ntk", True),
        "use_logn_attn": flags.get("use_logn_attn", True),
        "no_bias": True,
        "tie_word_embeddings": False,
        "scale_attn_weights": True,
        "bf16": False,
        "fp16": False,
        "fp32": True,
    }


def build_qwen_v1(directory: Path, *, seed: int = 0, std: float = 0.08, seq_length: int = 2048, **shape) -> Path:
    """A random tiny Qwen (v1) checkpoint: transformer.* safetensors, config.json, qwen.tiktoken (the
    real one), tokenizer_config.json and generation_config.json as Qwen-7B-Chat ships them."""
    from safetensors.torch import save_file
    from tokenizer_fixtures import QWEN_TIKTOKEN
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = qwen_v1_config(seq_length=seq_length, **shape)
    torch.manual_seed(seed)
    qwen2 = Qwen2ForCausalLM(Qwen2Config(**qwen2_kwargs_for(config))).eval()
    _scale_weights(qwen2, seed, std)
    directory.mkdir(parents=True, exist_ok=True)
    state = qwen_v1_state(dict(qwen2.state_dict()), config["num_hidden_layers"])
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    shutil.copy(QWEN_TIKTOKEN, directory / "qwen.tiktoken")
    tokenizer_config = {"model_max_length": 8192, "tokenizer_class": "QWenTokenizer", "auto_map": {}}
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    generation = {"chat_format": "chatml", "eos_token_id": 151643, "pad_token_id": 151643, "max_window_size": 6144}
    (directory / "generation_config.json").write_text(json.dumps(generation))
    return directory


def qwen2_kwargs_for(config: dict, theta: float | None = None) -> dict:
    """Qwen2Config arguments computing what a Qwen (v1) config computes below its seq_length
    (``theta``: another rope base, for the NTK-scaled reference)."""
    return text_config_kwargs(
        hidden=config["hidden_size"],
        layers=config["num_hidden_layers"],
        heads=config["num_attention_heads"],
        kv_heads=config["num_attention_heads"],
        ffn=config["intermediate_size"] // 2,
        vocab=config["vocab_size"],
        theta=theta or config["rotary_emb_base"],
    )


# ----------------------------------------------------------------------------------------------
# Llama: LlamaForCausalLM with a SentencePiece tokenizer.model (and LLaVA's <image> added token)


def build_llama(
    directory: Path,
    spm_model: Path,
    *,
    seed: int = 0,
    std: float = 0.08,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    ffn: int = 160,
    tie: bool = False,
    theta: float = 10000.0,
    added: tuple[str, ...] = ("<image>",),
    tokenizer_config: dict | None = None,
) -> Path:
    """A random tiny Llama checkpoint with the tokenizer files a slow LlamaTokenizer reads:
    tokenizer.model, tokenizer_config.json, special_tokens_map.json and added_tokens.json."""
    import sentencepiece
    from spm_fixtures import write_tokenizer_files
    from transformers import LlamaConfig, LlamaForCausalLM

    pieces = sentencepiece.SentencePieceProcessor(model_file=str(spm_model)).get_piece_size()
    config = LlamaConfig(
        vocab_size=pieces + len(added),
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        rms_norm_eps=1e-5,
        max_position_embeddings=2048,
        rope_parameters={"rope_type": "default", "rope_theta": theta},
        tie_word_embeddings=tie,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    _scale_weights(model, seed, std)
    if tie:
        model.tie_weights()
    model.save_pretrained(directory, safe_serialization=True)
    extra = {
        "special_tokens_map": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>"}
    }
    if added:
        extra["added_tokens"] = {token: pieces + i for i, token in enumerate(added)}
    write_tokenizer_files(directory, spm_model, tokenizer_config, **extra)
    (directory / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0})
    )
    return directory


# Meta's original layout: HF name (model.layers.{N}. stripped) → (Meta name, dim its shards split)
_META_NAMES = {
    "model.embed_tokens.weight": ("tok_embeddings.weight", 1),
    "model.norm.weight": ("norm.weight", None),
    "lm_head.weight": ("output.weight", 0),
    "input_layernorm.weight": ("attention_norm.weight", None),
    "self_attn.q_proj.weight": ("attention.wq.weight", 0),
    "self_attn.k_proj.weight": ("attention.wk.weight", 0),
    "self_attn.v_proj.weight": ("attention.wv.weight", 0),
    "self_attn.o_proj.weight": ("attention.wo.weight", 1),
    "post_attention_layernorm.weight": ("ffn_norm.weight", None),
    "mlp.gate_proj.weight": ("feed_forward.w1.weight", 0),
    "mlp.down_proj.weight": ("feed_forward.w2.weight", 1),
    "mlp.up_proj.weight": ("feed_forward.w3.weight", 0),
}


def to_meta_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """HF's rotate-half rows → Meta's interleaved pairs (the inverse of HF's convert_llama_weights_to_hf permute)."""
    rows, cols = weight.shape
    return weight.view(heads, 2, rows // heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def write_meta(directory: Path, hf_dir: Path, shards: int, tokenizer_above: bool = True) -> Path:
    """An HF Llama checkpoint rewritten as Meta ships it: params.json, consolidated.0N.pth model-parallel
    shards (q / k interleaved), tokenizer.model in the directory above."""
    from safetensors.torch import load_file

    config = json.loads((hf_dir / "config.json").read_text())
    state = load_file(str(hf_dir / "model.safetensors"))
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    meta: dict[str, tuple[torch.Tensor, int | None]] = {}
    for name, tensor in state.items():
        layer = None
        if name.startswith("model.layers."):
            layer, rest = name.removeprefix("model.layers.").split(".", 1)
            new, dim = _META_NAMES[rest]
            new = f"layers.{layer}.{new}"
        else:
            new, dim = _META_NAMES[name]
        if new.endswith("attention.wq.weight"):
            tensor = to_meta_rows(tensor, heads)
        elif new.endswith("attention.wk.weight"):
            tensor = to_meta_rows(tensor, kv_heads)
        meta[new] = (tensor, dim)
    directory.mkdir(parents=True, exist_ok=True)
    for rank in range(shards):
        part = {name: (t if dim is None else t.chunk(shards, dim=dim)[rank]).clone() for name, (t, dim) in meta.items()}
        torch.save(part, directory / f"consolidated.{rank:02d}.pth")
    params = {
        "dim": config["hidden_size"],
        "n_layers": config["num_hidden_layers"],
        "n_heads": heads,
        "n_kv_heads": kv_heads,
        "vocab_size": -1,
        "multiple_of": 32,
        "norm_eps": config["rms_norm_eps"],
        "rope_theta": config.get("rope_parameters", {}).get("rope_theta", 10000.0),
    }
    (directory / "params.json").write_text(json.dumps(params))
    target = (directory.parent if tokenizer_above else directory) / "tokenizer.model"
    shutil.copy(hf_dir / "tokenizer.model", target)
    return directory
