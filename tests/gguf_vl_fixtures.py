"""Shared helpers of the GGUF conversion tests: tiny VL checkpoints, teacher forcing, legacy mmproj
files (the layout of llama.cpp's old qwen2_vl_surgery.py) and llama.cpp through llama-cpp-python."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import gguf
import numpy as np
import torch

import qwenvl
from qwenvl.weights import names

MIN_PIXELS, MAX_PIXELS = 56 * 56, 160 * 160
MEDIA = {"min_pixels": MIN_PIXELS, "max_pixels": MAX_PIXELS}

# The same names and shapes as tests/test_vl.py's, so a full run builds each checkpoint once.
VL_CONFIGS = {
    "qwen2_vl-d2": dict(arch="qwen2_vl", hidden=64, heads=4, kv_heads=2, ffn=128, mrope_section=[2, 3, 3]),
    "qwen2_5_vl-w56": dict(
        arch="qwen2_5_vl",
        hidden=64,
        heads=4,
        kv_heads=2,
        ffn=128,
        mrope_section=[2, 3, 3],
        vision={"depth": 2, "window_size": 56, "fullatt_block_indexes": [1]},
    ),
}
# Twins with weights of std 0.02 instead of 0.08. The 0.08 nets are chosen for clear-cut greedy
# choices, and they amplify any perturbation layer after layer: a 4-bit copy, whose matrices are each
# within a few % of the originals (its bytes are llama.cpp's, tests/test_gguf_quant.py), still gets a
# logits cosine of only ~0.98 there. At 0.02 the perturbation passes through about as it would in
# a trained model, so the logits measure the format, not the random net's chaos.
LOW_BIT_CONFIGS = {f"{name}-std02": dict(config, std=0.02) for name, config in VL_CONFIGS.items()}
ALL_CONFIGS = VL_CONFIGS | LOW_BIT_CONFIGS


def image_messages(path: str, text: str = "Describe the picture.") -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "image": path}, {"type": "text", "text": text}]}]


def write_test_image(path: Path, width: int, height: int, seed: int = 0) -> str:
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // width, y * 255 // height, (x * y) % 256], axis=-1)
    pixels = (base + rng.integers(0, 50, size=(height, width, 3))).clip(0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)
    return str(path)


def sequence_logits(model: qwenvl.api.Model, messages: list[dict], continuation: list[int]) -> torch.Tensor:
    """Logits [len(continuation), vocab] predicting each continuation token (teacher forcing)."""
    prompt = model.prepare(messages, **MEDIA)
    text = model.text_model
    ids = torch.tensor([prompt.input_ids + continuation])
    last = int(prompt.position_ids[:, -1].max())
    extra = torch.arange(last + 1, last + 1 + len(continuation)).expand(3, -1)
    positions = torch.cat([prompt.position_ids, extra], dim=1)[:, None, :]
    with torch.inference_mode():
        embeds = text.embed(ids)
        if prompt.visual_embeds is not None:
            slots = torch.isin(ids[0], torch.tensor(prompt.visual_token_ids))
            embeds[0, slots] = prompt.visual_embeds.to(embeds.dtype)
        logits = text.logits(text(embeds, positions))[0]
    start = len(prompt.input_ids) - 1
    return logits[start : start + len(continuation)]


# ----------------------------------------------------------------------------------------------
# The legacy layout (llama.cpp's examples/llava/qwen2_vl_surgery.py)


def write_legacy_mmproj(hf_dir: Path, path: Path, dtype: type = np.float32) -> None:
    """An mmproj as qwen2_vl_surgery.py wrote it: MLP named the LLaVA way round (fc1/up_proj →
    ffn_down, fc2/down_proj → ffn_up), a placeholder position embedding, clip.has_qwen2vl_merger,
    use_gelu/use_silu flags and, for Qwen2.5-VL, use_glu_mlp / use_rms_norm /
    fullatt_block_indexes / window_size."""
    model = qwenvl.load(hf_dir, dtype="float32")
    vision = model.config.vision
    assert vision is not None
    qwen25 = vision.variant == "qwen2_5_vl"
    table = names.vision_table(vision.variant, legacy=True)
    writer = gguf.GGUFWriter(path, "clip")
    writer.add_description("image encoder for Qwen2VL")
    writer.add_file_type(0 if dtype == np.float32 else 1)
    writer.add_bool("clip.has_text_encoder", False)
    writer.add_bool("clip.has_vision_encoder", True)
    writer.add_bool("clip.has_qwen2vl_merger", True)
    writer.add_string("clip.projector_type", "qwen2vl_merger")
    writer.add_bool("clip.use_silu", qwen25)
    writer.add_bool("clip.use_gelu", False)
    if qwen25:
        writer.add_bool("clip.use_glu_mlp", True)
        writer.add_bool("clip.use_rms_norm", True)
        writer.add_array("clip.vision.fullatt_block_indexes", list(vision.fullatt_block_indexes))
        writer.add_uint32("clip.vision.window_size", vision.window_size)
    for name, tensor in model.vision_model.state_dict().items():
        layout = names.vision_layout_from_hf(f"visual.{name}", table)
        for gguf_name, piece in zip(layout.gguf_names, names.split_vision(tensor, layout.join)):
            data = piece.numpy()
            writer.add_tensor(gguf_name, data if data.ndim <= 1 else data.astype(dtype))
    writer.add_tensor("v.position_embd.weight", np.zeros([10, 10], dtype=np.float32))
    writer.add_uint32("clip.vision.patch_size", vision.patch_size)
    writer.add_uint32("clip.vision.image_size", 560)
    writer.add_uint32("clip.vision.embedding_length", vision.hidden_size)
    writer.add_uint32("clip.vision.projection_dim", vision.out_hidden_size)
    writer.add_uint32("clip.vision.attention.head_count", vision.num_heads)
    writer.add_float32("clip.vision.attention.layer_norm_epsilon", 1e-6)
    writer.add_uint32("clip.vision.block_count", vision.depth)
    writer.add_uint32("clip.vision.feed_forward_length", 0)
    writer.add_name(hf_dir.name)
    writer.add_array("clip.vision.image_mean", list(model.preprocess_config.image_mean))
    writer.add_array("clip.vision.image_std", list(model.preprocess_config.image_std))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# ----------------------------------------------------------------------------------------------
# llama.cpp (llama-cpp-python), when installed


def llama_cpp_available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def llama_cpp_model(path: Path, n_ctx: int = 512, logits_all: bool = False):
    """A llama_cpp.Llama on a GGUF, with the AMX extra buffer type off (it crashes on this CPU)."""
    import llama_cpp
    import llama_cpp.llama_cpp as low_level

    default_params = low_level.llama_model_default_params

    def params():
        result = default_params()
        result.use_extra_bufts = False
        return result

    low_level.llama_model_default_params = params
    try:
        return llama_cpp.Llama(
            model_path=str(path), n_ctx=n_ctx, logits_all=logits_all, verbose=False, n_threads=2, seed=0
        )
    finally:
        low_level.llama_model_default_params = default_params


def llama_cpp_converter() -> Path | None:
    """llama.cpp's convert_hf_to_gguf.py: $QWENVL_LLAMA_CPP_DIR/convert_hf_to_gguf.py, if set and present."""
    directory = os.environ.get("QWENVL_LLAMA_CPP_DIR")
    if not directory:
        return None
    script = Path(directory) / "convert_hf_to_gguf.py"
    return script if script.is_file() else None


def llama_cpp_image_embeddings(text_path: Path, mmproj_path: Path, pixels: np.ndarray) -> np.ndarray:
    """llama.cpp's (mtmd / clip.cpp) vision embeddings [tokens, hidden] of one RGB image [H, W, 3] uint8."""
    import ctypes

    import llama_cpp.mtmd_cpp as mtmd

    llm = llama_cpp_model(text_path)
    params = mtmd.mtmd_context_params_default()
    params.use_gpu, params.n_threads, params.warmup, params.print_timings = False, 2, False, False
    context = mtmd.mtmd_init_from_file(str(mmproj_path).encode(), llm.model, params)
    if not context:
        raise RuntimeError(f"llama.cpp could not load {mmproj_path}")
    height, width, _ = pixels.shape
    data = (ctypes.c_uint8 * pixels.size).from_buffer_copy(np.ascontiguousarray(pixels).tobytes())
    bitmap = mtmd.mtmd_bitmap_init(width, height, data)
    chunks = mtmd.mtmd_input_chunks_init()
    prompt = b"<|im_start|>user\n" + mtmd.mtmd_default_marker() + b"<|im_end|>\n"
    text = mtmd.mtmd_input_text(text=prompt, text_len=len(prompt), add_special=False, parse_special=True)
    try:
        if mtmd.mtmd_tokenize(context, chunks, ctypes.byref(text), (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap), 1):
            raise RuntimeError("mtmd_tokenize failed")
        for index in range(mtmd.mtmd_input_chunks_size(chunks)):
            chunk = mtmd.mtmd_input_chunks_get(chunks, index)
            if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                tokens = mtmd.mtmd_input_chunk_get_n_tokens(chunk)
                if mtmd.mtmd_encode_chunk(context, chunk):
                    raise RuntimeError("mtmd_encode_chunk failed")
                out = mtmd.mtmd_get_output_embd(context)
                return np.ctypeslib.as_array(out, shape=(tokens * llm.n_embd(),)).reshape(tokens, -1).copy()
        raise RuntimeError("no image chunk")
    finally:
        mtmd.mtmd_input_chunks_free(chunks)
        mtmd.mtmd_bitmap_free(bitmap)
        mtmd.mtmd_free(context)
