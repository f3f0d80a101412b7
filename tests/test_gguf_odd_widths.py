"""GGUF files of checkpoints whose widths are not multiples of 32, run on the block kernels.

An MLP of 200 (K = 200 for the down projection: F32 / F16 / BF16 rows with a tail, and the F16
fallback that a Q8_0 file keeps for it) and a Qwen2.5-VL vision MLP of 3420 (the published width).
The f32 file must answer exactly as the HF checkpoint under transformers; every type must answer as
its own weights dequantized once (``kernel="dense"`` in fp32: the same values, multiplied by torch).
"""

from __future__ import annotations

import pytest
import torch
from gguf_vl_fixtures import MEDIA, image_messages, sequence_logits, write_test_image

import qwenvl
from qwenvl.convert import convert_hf, quantize_gguf

ODD = {
    "qwen2_vl-ffn200": dict(arch="qwen2_vl", hidden=64, heads=4, kv_heads=2, ffn=200, mrope_section=[2, 3, 3]),
    "qwen2_5_vl-ffn200-v3420": dict(
        arch="qwen2_5_vl",
        hidden=64,
        heads=4,
        kv_heads=2,
        ffn=200,
        mrope_section=[2, 3, 3],
        vision={"depth": 2, "window_size": 56, "fullatt_block_indexes": [1], "intermediate_size": 3420},
    ),
}
TOKENS = 16


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> str:
    return write_test_image(tmp_path_factory.mktemp("odd-img") / "picture.png", 120, 90)


@pytest.fixture(scope="module")
def files(make_vl, tmp_path_factory):
    made: dict[str, dict[str, tuple]] = {}

    def get(name: str) -> dict[str, tuple]:
        if name not in made:
            hf_dir = make_vl(name, **ODD[name])
            out = tmp_path_factory.mktemp(f"odd-{name}")
            text32, mmproj = (f.path for f in convert_hf(hf_dir, out, out_type="f32", progress=False))
            kinds = {"f32": text32}
            for kind in ("f16", "bf16", "q8_0"):
                kinds[kind] = quantize_gguf(text32, out / f"text-{kind}.gguf", kind, progress=False).path
            made[name] = {"hf": hf_dir, "mmproj": mmproj, **kinds}
        return made[name]

    return get


@pytest.mark.parametrize("name", list(ODD))
def test_f32_gguf_on_block_kernels_answers_as_transformers(files, image, name):
    from test_vl import hf_inputs, hf_model

    got = files(name)
    messages = image_messages(image)
    inputs = hf_inputs(got["hf"], messages, [image])
    with torch.inference_mode():
        out = hf_model(got["hf"], ODD[name]["arch"]).generate(**inputs, do_sample=False, max_new_tokens=TOKENS)
    expected = out[0, inputs["input_ids"].shape[1] :].tolist()
    model = qwenvl.load(got["f32"], mmproj=got["mmproj"], dtype="float32", kernel="blocks")
    assert model.chat(messages, temperature=0, max_tokens=TOKENS, **MEDIA).token_ids == expected


@pytest.mark.parametrize("kind", ["f32", "f16", "bf16", "q8_0"])
@pytest.mark.parametrize("name", list(ODD))
def test_block_kernels_answer_as_the_dequantized_weights(files, image, name, kind):
    got = files(name)
    messages = image_messages(image)
    dense = qwenvl.load(got[kind], mmproj=got["mmproj"], dtype="float32", kernel="dense")
    blocks = qwenvl.load(got[kind], mmproj=got["mmproj"], dtype="float32", kernel="blocks")
    expected = dense.chat(messages, temperature=0, max_tokens=TOKENS, **MEDIA).token_ids
    assert blocks.chat(messages, temperature=0, max_tokens=TOKENS, **MEDIA).token_ids == expected
    want, have = sequence_logits(dense, messages, expected), sequence_logits(blocks, messages, expected)
    assert (have - want).abs().max().item() <= 1e-4 * want.abs().max().item()
