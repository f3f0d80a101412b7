"""Export a GGUF model as a Hugging Face checkpoint directory.

A ``qwen2`` text GGUF becomes a Qwen2ForCausalLM checkpoint; a ``qwen2vl`` text GGUF with its vision
projector (mmproj) becomes a Qwen2VLForConditionalGeneration / Qwen2_5_VLForConditionalGeneration one,
named as the published checkpoints (``model.layers.…``, ``visual.…``, ``lm_head``), with a
``preprocessor_config.json`` carrying the mmproj's image mean / std. A ``llama`` GGUF becomes a
LlamaForCausalLM checkpoint (q / k back in HF's row order), a ``qwen`` one a QWenLMHeadModel checkpoint
(``transformer.…``, Qwen's config names); their tokenizer is written as tokenizer.json.

The weights are dequantized one tensor at a time and streamed into a single ``model.safetensors``
(its header is known up front from the GGUF shapes), so exporting needs memory for one tensor, not
for the model. Everything is written into a hidden directory next to ``out_dir`` and renamed into
place at the end: an ``out_dir`` that exists is always complete.

Stop tokens (generation_config.json ``eos_token_id``): the GGUF's ``eos_token_id``, then its
``eot_token_id`` / ``eom_token_id`` when the file names them; nothing is added from outside the file.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import sys
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch
from tqdm import tqdm

from ..config import TEXT_ARCHS, ModelConfig
from ..durable import created_dirs_removed_on_failure, flush, fsync_path, partial_path, remove_stale_partials
from ..errors import ModelFileError
from .gguf import GGUFModel, read_gguf, vl_model_config

SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
VL_CLASSES = {"qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"}


@dataclass(frozen=True)
class ExportTensor:
    name: str  # as the HF checkpoint stores it
    shape: tuple[int, ...]
    load: Callable[[], torch.Tensor]  # float32, dequantized


def export_hf(
    gguf_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    mmproj: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Write config, weights and tokenizer of a GGUF model (and its mmproj) as an HF checkpoint; return out_dir.

    float32 keeps every dequantized value exactly; bfloat16 / float16 round most of them.
    """
    if dtype not in SAFETENSORS_DTYPES:
        raise ValueError(f"dtype must be one of {list(SAFETENSORS_DTYPES)}, not {dtype}")
    out_dir = Path(out_dir)
    for source in (gguf_path, mmproj):
        if source is not None:
            _check_not_inside(Path(source), out_dir)
    _check_target(out_dir, overwrite)
    with ExitStack() as stack:
        model = stack.enter_context(read_gguf(gguf_path))
        projector = None
        if model.config.arch not in TEXT_ARCHS and mmproj is None:
            raise ModelFileError(
                f"{model.path}: a {model.config.arch} text model: exporting it needs its vision projector (--mmproj)"
            )
        if mmproj is not None:
            from .mmproj import read_mmproj

            projector = stack.enter_context(read_mmproj(mmproj))
            config = vl_model_config(model, projector)
        else:
            config = model.config
        stack.enter_context(created_dirs_removed_on_failure(out_dir.parent))
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_partials(out_dir.parent)  # left by killed runs
        staging = partial_path(out_dir)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        try:
            _write_checkpoint(model, projector, config, staging, dtype, progress)
            _move_into_place(staging, out_dir, overwrite)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return out_dir


def _write_checkpoint(
    model: GGUFModel, projector: Any, config: ModelConfig, directory: Path, dtype: torch.dtype, progress: bool
) -> None:
    write_safetensors(export_tensors(model, projector), directory / "model.safetensors", dtype, progress=progress)
    (directory / "tokenizer.json").write_text(model.tokenizer_json, encoding="utf-8")
    _write_json(directory / "tokenizer_config.json", tokenizer_config(model))
    _write_json(directory / "generation_config.json", generation_config(model))
    if projector is not None:
        _write_json(directory / "preprocessor_config.json", preprocessor_config(projector))
        _write_json(directory / "config.json", hf_vl_config(model, config, dtype))  # last: a config means complete
    else:
        _write_json(directory / "config.json", TEXT_CONFIGS[model.config.arch](model, dtype))


def export_tensors(model: GGUFModel, projector: Any = None) -> list[ExportTensor]:
    """Every tensor of the checkpoint, named as the published checkpoints (and transformers' save)
    name them: model.layers.…, lm_head.…, visual.…"""
    tensors = [ExportTensor(n, model.info(n).shape, lambda n=n: model.tensor(n)) for n in model.hf_names()]
    if projector is not None:
        tensors += [ExportTensor(n, projector.shape(n), lambda n=n: projector.tensor(n)) for n in projector.hf_names()]
    return tensors


def _check_target(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ModelFileError(f"{out_dir}: exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise ModelFileError(f"{out_dir}: exists and is not empty (pass --force, or overwrite=True, to replace it)")


def _check_not_inside(source: Path, out_dir: Path) -> None:
    """Replacing out_dir must never delete the input file."""
    source, target = source.resolve(), out_dir.resolve()
    if source == target or target in source.parents:
        raise ModelFileError(f"{out_dir}: holds the input {source.name}; export into another directory")


def _move_into_place(staging: Path, out_dir: Path, overwrite: bool) -> None:
    """Rename the flushed staging directory to out_dir (the old one moved aside, then deleted)."""
    _check_target(out_dir, overwrite)
    flush(staging)
    if not out_dir.exists():
        staging.rename(out_dir)
        fsync_path(out_dir.parent)
        return
    old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
    out_dir.rename(old)
    staging.rename(out_dir)
    fsync_path(out_dir.parent)
    shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# Weights


def write_safetensors(
    tensors: Sequence[ExportTensor], path: Path, dtype: torch.dtype, *, progress: bool = False
) -> None:
    """Stream the tensors (each loaded, cast to dtype, then freed) into one safetensors file."""
    item_size = torch.empty((), dtype=dtype).element_size()
    entries: dict[str, Any] = {}
    offset = 0
    for tensor in tensors:
        size = item_size * _numel(list(tensor.shape))
        entries[tensor.name] = {
            "dtype": SAFETENSORS_DTYPES[dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    header = json.dumps({"__metadata__": {"format": "pt"}, **entries}, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the format pads the header to 8 bytes
    with (
        open(path, "wb") as handle,
        tqdm(total=offset, unit="B", unit_scale=True, desc="export", disable=not progress, file=sys.stderr) as bar,
    ):
        handle.write(struct.pack("<Q", len(header)))
        handle.write(header)
        for tensor in tensors:
            written = _write_tensor(handle, tensor.load().to(dtype))
            bar.update(written)


def _write_tensor(handle: BinaryIO, tensor: torch.Tensor) -> int:
    data = tensor.contiguous().view(torch.uint8).numpy()  # little-endian like the format (CPU torch)
    handle.write(memoryview(data).cast("B"))
    return data.nbytes


def _numel(shape: list[int]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


# ----------------------------------------------------------------------------------------------
# json files


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def hf_config(model: GGUFModel, dtype: torch.dtype) -> dict[str, Any]:
    """config.json, in the shape of the published Qwen2 / Qwen2.5 ones."""
    text = model.config.text
    config = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "attention_dropout": 0.0,
        "bos_token_id": model.bos_token_id,
        "eos_token_id": model.eos_token_id,
        "pad_token_id": model.pad_token_id,
        "hidden_act": "silu",
        "hidden_size": text.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": text.intermediate_size,
        "max_position_embeddings": text.max_position_embeddings,
        "max_window_layers": text.num_hidden_layers,
        "num_attention_heads": text.num_attention_heads,
        "num_hidden_layers": text.num_hidden_layers,
        "num_key_value_heads": text.num_key_value_heads,
        "rms_norm_eps": text.rms_norm_eps,
        "rope_scaling": None,
        "rope_theta": text.rope_theta,
        "sliding_window": text.max_position_embeddings,
        "tie_word_embeddings": text.tie_word_embeddings,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": text.vocab_size,
    }
    if text.head_dim != text.hidden_size // text.num_attention_heads:
        config["head_dim"] = text.head_dim
    return config


def qwen_config(model: GGUFModel, dtype: torch.dtype) -> dict[str, Any]:
    """config.json of a QWenLMHeadModel (configuration_qwen.py's names; intermediate_size = 2 × MLP)."""
    text = model.config.text
    config = {
        "architectures": ["QWenLMHeadModel"],
        "model_type": "qwen",
        "vocab_size": text.vocab_size,
        "hidden_size": text.hidden_size,
        "num_hidden_layers": text.num_hidden_layers,
        "num_attention_heads": text.num_attention_heads,
        "kv_channels": text.head_dim,
        "intermediate_size": 2 * text.intermediate_size,
        "layer_norm_epsilon": text.rms_norm_eps,
        "rotary_emb_base": text.rope_theta,
        "rotary_pct": 1.0,
        "max_position_embeddings": text.max_position_embeddings,
        "use_dynamic_ntk": text.use_dynamic_ntk,
        "use_logn_attn": text.use_logn_attn,
        "no_bias": not text.o_bias,
        "tie_word_embeddings": text.tie_word_embeddings,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if text.seq_length:
        config["seq_length"] = text.seq_length
    return config


def llama_config(model: GGUFModel, dtype: torch.dtype) -> dict[str, Any]:
    """config.json of a LlamaForCausalLM, as transformers saves one."""
    text = model.config.text
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": text.qkv_bias,
        "mlp_bias": text.mlp_bias,
        "bos_token_id": model.bos_token_id,
        "eos_token_id": model.eos_token_id,
        "pad_token_id": model.pad_token_id,
        "hidden_act": "silu",
        "hidden_size": text.hidden_size,
        "head_dim": text.head_dim,
        "intermediate_size": text.intermediate_size,
        "max_position_embeddings": text.max_position_embeddings,
        "num_attention_heads": text.num_attention_heads,
        "num_hidden_layers": text.num_hidden_layers,
        "num_key_value_heads": text.num_key_value_heads,
        "rms_norm_eps": text.rms_norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": text.rope_theta},
        "tie_word_embeddings": text.tie_word_embeddings,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "vocab_size": text.vocab_size,
    }
    return config


def tokenizer_config(model: GGUFModel) -> dict[str, Any]:
    """tokenizer_config.json: the special tokens, the added-token table and the chat template."""
    added = {
        str(token_id): {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": special,
        }
        for token_id, content, special in model.added_tokens
    }
    config: dict[str, Any] = {
        "add_bos_token": model.add_bos_token,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "bos_token": model.bos_token,
        "clean_up_tokenization_spaces": False,
        "eos_token": model.token_text(model.eos_token_id),
        "errors": "replace",
        "model_max_length": model.config.text.max_position_embeddings,
        "pad_token": model.token_text(model.pad_token_id),
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    if model.config.arch == "llama":  # the tokenizer.json holds the vocabulary; these name its specials
        config |= {"tokenizer_class": "LlamaTokenizer", "add_eos_token": model.add_eos_token, "legacy": True}
        vocab = model.sentencepiece_vocab
        config |= {"add_prefix_space": None, "unk_token": model.token_text(vocab.unk_id) if vocab else None}
    elif model.config.arch == "qwen":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
    if model.chat_template is not None:
        config["chat_template"] = model.chat_template
    return config


def hf_vl_config(model: GGUFModel, config: ModelConfig, dtype: torch.dtype) -> dict[str, Any]:
    """config.json of a Qwen2-VL / Qwen2.5-VL checkpoint, in transformers 5's nested form."""
    text, vision = config.text, config.vision
    assert vision is not None
    text_config = {
        key: value
        for key, value in hf_config(model, dtype).items()
        if key not in ("architectures", "model_type", "tie_word_embeddings", "torch_dtype")
    }
    text_config["model_type"] = f"{config.arch}_text"
    text_config["rope_parameters"] = {
        "rope_type": "default",
        "rope_theta": text.rope_theta,
        "mrope_section": list(text.mrope_section or ()),
    }
    text_config.pop("rope_theta")
    text_config.pop("rope_scaling")
    vision_config: dict[str, Any] = {
        "depth": vision.depth,
        "hidden_act": vision.hidden_act,
        "in_channels": vision.in_channels,
        "num_heads": vision.num_heads,
        "patch_size": vision.patch_size,
        "spatial_merge_size": vision.spatial_merge_size,
        "temporal_patch_size": vision.temporal_patch_size,
    }
    if config.arch == "qwen2_vl":
        vision_config.update(
            embed_dim=vision.hidden_size,
            hidden_size=vision.out_hidden_size,
            mlp_ratio=_ratio(vision.intermediate_size, vision.hidden_size),
            model_type="qwen2_vl_vision",
        )
    else:
        vision_config.update(
            hidden_size=vision.hidden_size,
            intermediate_size=vision.intermediate_size,
            out_hidden_size=vision.out_hidden_size,
            window_size=vision.window_size,
            fullatt_block_indexes=list(vision.fullatt_block_indexes),
            tokens_per_second=_integral(vision.tokens_per_second),
            model_type="qwen2_5_vl_vision",
        )
    return {
        "architectures": [VL_CLASSES[config.arch]],
        "model_type": config.arch,
        "image_token_id": config.image_token_id,
        "video_token_id": config.video_token_id,
        "vision_start_token_id": config.vision_start_token_id,
        "vision_end_token_id": config.vision_end_token_id,
        "text_config": text_config,
        "vision_config": vision_config,
        "tie_word_embeddings": text.tie_word_embeddings,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


TEXT_CONFIGS = {"qwen2": hf_config, "qwen": qwen_config, "llama": llama_config}


def _ratio(numerator: int, denominator: int) -> int | float:
    """An int when exact (transformers 5 types Qwen2-VL's mlp_ratio as int), else the float."""
    return numerator // denominator if numerator % denominator == 0 else numerator / denominator


def _integral(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


def preprocessor_config(projector: Any) -> dict[str, Any]:
    """preprocessor_config.json: the mmproj's normalization and the model's patching."""
    pre = projector.preprocess_config
    return {
        "image_processor_type": "Qwen2VLImageProcessor",
        "do_resize": True,
        "do_rescale": True,
        "do_normalize": True,
        "do_convert_rgb": True,
        "rescale_factor": 1 / 255,
        "image_mean": list(pre.image_mean),
        "image_std": list(pre.image_std),
        "min_pixels": pre.min_pixels,
        "max_pixels": pre.max_pixels,
        "size": {"shortest_edge": pre.min_pixels, "longest_edge": pre.max_pixels},
        "patch_size": pre.patch_size,
        "temporal_patch_size": pre.temporal_patch_size,
        "merge_size": pre.merge_size,
    }


def generation_config(model: GGUFModel) -> dict[str, Any]:
    eos = list(model.eos_token_ids)
    config: dict[str, Any] = {
        "bos_token_id": model.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else eos,
        "pad_token_id": model.pad_token_id,
    }
    return {key: value for key, value in config.items() if value not in (None, [])}


__all__ = [
    "ExportTensor",
    "export_hf",
    "export_tensors",
    "write_safetensors",
    "hf_config",
    "hf_vl_config",
    "preprocessor_config",
    "tokenizer_config",
    "generation_config",
]
