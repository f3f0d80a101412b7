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
