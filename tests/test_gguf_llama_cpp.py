"""Interoperability with llama.cpp itself, through llama-cpp-python (skipped when it is not installed;
it is not a test dependency: building it takes ~11 minutes).

- our text GGUFs (Qwen2, Qwen v1, Llama with a SentencePiece vocabulary, Qwen2-VL) load in llama.cpp,
  tokenize alike and generate the same greedy tokens;
- llama.cpp's clip (mtmd) encodes images with our mmproj files as qwenvl does;
- llama.cpp's llama_model_quantize writes the tensors and metadata ``qwenvl quantize`` writes;
- (slow, with $QWENVL_LLAMA_CPP_DIR pointing at a llama.cpp checkout) its convert_hf_to_gguf.py
  writes byte for byte the files ``qwenvl convert`` writes.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from gguf_vl_fixtures import (
    VL_CONFIGS,
    llama_cpp_available,
    llama_cpp_converter,
    llama_cpp_image_embeddings,
    llama_cpp_model,
)

import qwenvl
from qwenvl.convert import convert_hf, quantize_gguf
from qwenvl.media.image import preprocess_image
from qwenvl.weights.gguf import open_gguf_file

pytestmark = pytest.mark.skipif(not llama_cpp_available(), reason="llama-cpp-python is not installed")

PROMPT = "<|im_start|>user\nWrite a haiku about tensors, please.<|im_end|>\n<|im_start|>assistant\n"
# llama.cpp's clip uses 112-pixel attention windows for every Qwen2.5-VL (the converter does not store it)
W112 = {
    "qwen2_5_vl-w112": dict(
        VL_CONFIGS["qwen2_5_vl-w56"], vision={"depth": 2, "window_size": 112, "fullatt_block_indexes": [1]}
    )
}


@pytest.fixture(scope="module")
def text_ggufs(make_qwen2, make_qwen_v1, make_vl, tmp_path_factory):
    """f32 GGUFs: a Qwen2 and a Qwen (v1) text model and the two VL pairs (text, mmproj)."""
    out = tmp_path_factory.mktemp("llama-cpp")
    files = {"qwen2": convert_hf(make_qwen2("default"), out, out_type="f32", progress=False)[0].path}
    files["qwen"] = convert_hf(make_qwen_v1("default"), out, out_type="f32", progress=False)[0].path
    for name, config in (VL_CONFIGS | W112).items():
        text, mmproj = convert_hf(make_vl(name, **config), out, out_type="f32", progress=False)
        files[name] = text.path
        files[f"{name}-mmproj"] = mmproj.path
    return files


@pytest.mark.parametrize("name", ["qwen2", "qwen", "qwen2_vl-d2"])
def test_llama_cpp_generates_what_we_generate(text_ggufs, name):
    path = text_ggufs[name]
    llm = llama_cpp_model(path, logits_all=True)
    ours = qwenvl.load(path, dtype="float32")
    ids = ours.tokenizer.encode(PROMPT)
    assert llm.tokenize(PROMPT.encode(), add_bos=False, special=True) == ids
    generation = ours.generate(ids, temperature=0, max_tokens=16)
    for _ in generation:
        pass
    expected = generation.result.token_ids
    theirs = []
    for token in llm.generate(ids, temp=0.0, reset=True):
        theirs.append(token)
        if len(theirs) == len(expected):
            break
    # Both sides' logits along our sequence (llama.cpp: teacher-forced over it)
    sequence = ids + expected
    llm.reset()
    llm.eval(sequence)
    their_logits = torch.tensor(np.array(llm.scores[: len(sequence)]))
    text = ours.text_model
    with torch.inference_mode():
        positions = torch.arange(len(sequence))[None, None, :].expand(3, 1, -1)
        our_logits = text.logits(text(text.embed(torch.tensor([sequence])), positions))[0]
    scale = our_logits.abs().max()
    assert (their_logits - our_logits).abs().max() <= 1e-2 * scale
    # The same greedy tokens, up to a tie: these random nets have a few steps whose top two logits
    # are equal in float32, where float rounding legitimately picks either
    diverged = next((i for i, (a, b) in enumerate(zip(theirs, expected)) if a != b), None)
    if diverged is not None:
        top2 = our_logits[len(ids) - 1 + diverged].topk(2).values
        assert top2[0] - top2[1] <= 1e-3 * scale, f"llama.cpp chose {theirs[diverged]} at step {diverged}"
    else:
        assert theirs == expected


def test_llama_cpp_runs_our_llama_gguf(make_llama, tmp_path):
    """A Llama GGUF with a SentencePiece vocabulary (and an added <image>): llama.cpp tokenizes as
    qwenvl reads the file (BOS, the space before each text fragment) and generates the same tokens."""
    path = convert_hf(make_llama("gqa", heads=4, kv_heads=2), tmp_path, out_type="f32", progress=False)[0].path
    llm = llama_cpp_model(path, logits_all=True)
    ours = qwenvl.load(path, dtype="float32")
    for text in ("the quick brown fox", "describe the <image> picture, please", "héllo 你好 x\n\ny"):
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == ours.tokenizer.encode_raw(text), text
    ids = ours.tokenizer.encode_raw("describe the <image> picture of a lazy dog")
    generation = ours.generate(ids, temperature=0, max_tokens=16, ignore_eos=True)
    for _ in generation:
        pass
    theirs = []
    for token in llm.generate(ids, temp=0.0, reset=True):
        theirs.append(token)
        if len(theirs) == 16:
            break
    assert theirs == generation.result.token_ids


@pytest.mark.parametrize("name, size", [("qwen2_vl-d2", (112, 84)), ("qwen2_5_vl-w112", (252, 168))])
def test_llama_cpp_encodes_images_with_our_mmproj(text_ggufs, name, size):
    """An image whose sides are multiples of 28 (and of at least 8 tokens) is not resized by either
    side. The Qwen2.5-VL one spans 3 × 2 attention windows of 112 pixels."""
    from PIL import Image

    width, height = size
    pixels = np.random.default_rng(4).integers(0, 256, (height, width, 3), dtype=np.uint8)
    theirs = llama_cpp_image_embeddings(text_ggufs[name], text_ggufs[f"{name}-mmproj"], pixels)
    model = qwenvl.load(text_ggufs[name], mmproj=text_ggufs[f"{name}-mmproj"], dtype="float32")
    processed = preprocess_image(Image.fromarray(pixels), model.preprocess_config)
    assert processed.grid_thw == (1, height // 14, width // 14)
    ours = model.encode_pixels(processed.pixel_values, processed.grid_thw).numpy()
    assert ours.shape == theirs.shape
    assert np.abs(ours - theirs).max() <= 1e-2 * np.abs(ours).max()


def test_llama_cpp_quantize_writes_what_we_write(text_ggufs, tmp_path):
    import llama_cpp.llama_cpp as low_level

    source = text_ggufs["qwen2"]
    for kind in ("q4_0", "q5_1", "q8_0"):
        theirs = tmp_path / f"llama-{kind}.gguf"
        params = low_level.llama_model_quantize_default_params()
        params.ftype, params.nthread = getattr(low_level, f"LLAMA_FTYPE_MOSTLY_{kind.upper()}"), 2
        assert low_level.llama_model_quantize(str(source).encode(), str(theirs).encode(), ctypes.byref(params)) == 0
        ours = quantize_gguf(source, tmp_path / f"ours-{kind}.gguf", kind, progress=False).path
        a, b = open_gguf_file(ours), open_gguf_file(theirs)
        assert a.metadata == b.metadata, kind
        assert set(a.tensor_infos) == set(b.tensor_infos)  # llama.cpp writes them in its own order
        for tensor, info in a.tensor_infos.items():
            assert info.ggml_type == b.tensor_infos[tensor].ggml_type, (kind, tensor)
            assert np.array_equal(a.raw(tensor), b.raw(tensor)), (kind, tensor)


# ----------------------------------------------------------------------------------------------
# llama.cpp's converter (needs its source tree)


@pytest.mark.slow
@pytest.mark.skipif(llama_cpp_converter() is None, reason="set QWENVL_LLAMA_CPP_DIR to a llama.cpp checkout")
@pytest.mark.parametrize("kind", ["f32", "f16", "q8_0"])
def test_llama_cpp_converter_writes_our_files(make_vl, tmp_path, kind):
    """Byte-identical files. The ViTs have 4 blocks: llama.cpp's converter cannot name the merger's
    mm.2 for fewer than 3 (its name map stops at the block count), and it needs a preprocessor_config."""
    import json

    configs = {
        "qwen2_vl-d4": dict(VL_CONFIGS["qwen2_vl-d2"], vision={"depth": 4}),
        "qwen2_5_vl-d4": dict(
            VL_CONFIGS["qwen2_5_vl-w56"],
            tie=True,
            vision={"depth": 4, "window_size": 112, "fullatt_block_indexes": [1, 3]},
        ),
    }
    stub = tmp_path / "stub" / "sentencepiece"  # the converter imports it even for BPE vocabularies
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("class SentencePieceProcessor:\n    pass\n")
    for name, config in configs.items():
        hf_dir = make_vl(name, **config)
        preprocessor = hf_dir / "preprocessor_config.json"
        if not preprocessor.exists():
            from qwenvl.config import PreprocessConfig

            defaults = PreprocessConfig()
            normalization = {"image_mean": list(defaults.image_mean), "image_std": list(defaults.image_std)}
            preprocessor.write_text(json.dumps(normalization))
        ours = convert_hf(hf_dir, tmp_path / "ours", out_type=kind, progress=False, force=True)
        for flag, written in zip(([], ["--mmproj"]), ours):
            theirs = tmp_path / f"theirs-{name}-{len(flag)}.gguf"
            env = dict(os.environ, PYTHONPATH=str(stub.parent))
            command = [sys.executable, str(llama_cpp_converter()), str(hf_dir), *flag]
            command += ["--outtype", kind, "--outfile", str(theirs)]
            subprocess.run(command, check=True, env=env, capture_output=True)
            assert written.path.read_bytes() == theirs.read_bytes(), (name, kind, flag)
