"""Qwen2-VL / Qwen2.5-VL with images, end to end, against transformers on tiny random checkpoints.

transformers' side is built the way its processor would build it (AutoProcessor needs torchvision,
which cannot be installed here): the HF tokenizer renders the chat template, each <|image_pad|> is
expanded to t·h·w/4 copies, Qwen2VLImageProcessorPil makes the pixel values.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import qwenvl
from qwenvl.cli import main as cli_main

IMAGE_PAD, VIDEO_PAD = 151655, 151656
MIN_PIXELS, MAX_PIXELS = 56 * 56, 160 * 160

CONFIGS = {
    "qwen2_vl-d2": dict(arch="qwen2_vl", hidden=64, heads=4, kv_heads=2, ffn=128, mrope_section=[2, 3, 3]),
    "qwen2_vl-d3-h4": dict(
        arch="qwen2_vl",
        hidden=96,
        heads=4,
        kv_heads=1,
        ffn=128,
        mrope_section=[4, 4, 4],
        tie=True,
        vision={"depth": 3, "embed_dim": 48, "num_heads": 4, "mlp_ratio": 3},
    ),
    "qwen2_5_vl-w56": dict(
        arch="qwen2_5_vl",
        hidden=64,
        heads=4,
        kv_heads=2,
        ffn=128,
        mrope_section=[2, 3, 3],
        vision={"depth": 2, "window_size": 56, "fullatt_block_indexes": [1]},
    ),
    "qwen2_5_vl-w84-d4": dict(
        arch="qwen2_5_vl",
        hidden=80,
        heads=4,
        kv_heads=2,
        ffn=96,
        mrope_section=[4, 3, 3],
        tie=True,
        vision={
            "depth": 4,
            "hidden_size": 48,
            "num_heads": 3,
            "intermediate_size": 64,
            "window_size": 84,
            "fullatt_block_indexes": [0, 3],
        },
    ),
    "qwen2_5_vl-nofull": dict(
        arch="qwen2_5_vl",
        hidden=64,
        heads=2,
        kv_heads=1,
        ffn=64,
        mrope_section=[6, 5, 5],
        vision={"depth": 2, "window_size": 112, "fullatt_block_indexes": []},
    ),
}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Four images of different sizes and contents, saved as files."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths = []
    for index, (w, h) in enumerate([(100, 150), (140, 90), (64, 64), (200, 60)]):
        y, x = np.mgrid[0:h, 0:w]
        base = np.stack([x * 255 // w, y * 255 // h, (x + y) % 256], axis=-1)
        noise = rng.integers(0, 60, size=(h, w, 3))
        path = folder / f"image{index}.png"
        Image.fromarray((base + noise).clip(0, 255).astype(np.uint8)).save(path)
        paths.append(str(path))
    return paths


def _image_item(path):
    return {"type": "image", "image": path}


def conversations(images):
    a, b, c, d = images
    return {
        "one-image-then-text": [
            {"role": "user", "content": [_image_item(a), {"type": "text", "text": "What is this?"}]}
        ],
        "text-between-two": [
            {"role": "system", "content": "You are terse."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "First:"},
                    _image_item(b),
                    {"type": "text", "text": "and second:"},
                    _image_item(c),
                    {"type": "text", "text": "Compare them."},
                ],
            },
        ],
        "three-images-text-after": [
            {
                "role": "user",
                "content": [
                    _image_item(a),
                    _image_item(d),
                    _image_item(c),
                    {"type": "text", "text": "Which is widest?"},
                ],
            }
        ],
        "two-turns": [
            {"role": "user", "content": [_image_item(d), {"type": "text", "text": "Describe it."}]},
            {"role": "assistant", "content": "A colourful gradient."},
            {"role": "user", "content": [{"type": "text", "text": "And this one?"}, _image_item(b)]},
        ],
    }


def hf_inputs(directory, messages, image_paths):
    from transformers import AutoTokenizer
    from transformers.image_utils import load_image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer = AutoTokenizer.from_pretrained(directory)
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    processor = Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    pixels = processor([load_image(p) for p in image_paths], return_tensors="pt")
    grids = pixels["image_grid_thw"]
    pieces = text.split("<|image_pad|>")
    assert len(pieces) == len(grids) + 1
    expanded = pieces[0] + "".join(
        "<|image_pad|>" * int(grid.prod() // 4) + piece for grid, piece in zip(grids, pieces[1:])
    )
    ids = torch.tensor([tokenizer.encode(expanded)])
    kinds = (ids == IMAGE_PAD).int() + 2 * (ids == VIDEO_PAD).int()
    return dict(input_ids=ids, pixel_values=pixels["pixel_values"], image_grid_thw=grids, mm_token_type_ids=kinds)


def hf_model(directory, arch):
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

    cls = Qwen2VLForConditionalGeneration if arch == "qwen2_vl" else Qwen2_5_VLForConditionalGeneration
    return cls.from_pretrained(directory, dtype=torch.float32).eval()


def our_prompt_logits(model, prompt):
    text = model.text_model
    with torch.inference_mode():
        ids = torch.tensor([prompt.input_ids])
        embeds = text.embed(ids)
        slots = torch.isin(ids[0], torch.tensor(prompt.visual_token_ids))
        embeds[0, slots] = prompt.visual_embeds
        return text.logits(text(embeds, prompt.position_ids[:, None, :]))[0]


def image_paths_of(messages):
    return [
        item["image"]
        for m in messages
        if isinstance(m["content"], list)
        for item in m["content"]
        if item.get("type") == "image"
    ]


@pytest.mark.parametrize("config_name", CONFIGS)
def test_images_match_transformers(make_vl, images, config_name):
    options = dict(CONFIGS[config_name])
    directory = make_vl(config_name, **options)
    ours = qwenvl.load(directory, dtype="float32")
    reference = hf_model(directory, options["arch"])
    worst = {"vision": 0.0, "logits": 0.0}
    for name, messages in conversations(images).items():
        paths = image_paths_of(messages)
        inputs = hf_inputs(directory, messages, paths)
        prompt = ours.prepare(messages, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
        assert prompt.input_ids == inputs["input_ids"][0].tolist(), name
        with torch.inference_mode():
            features = reference.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
            expected_vision = torch.cat(list(features.pooler_output))
            expected_logits = reference(**inputs).logits[0]
            out = reference.generate(**inputs, do_sample=False, max_new_tokens=24)
        worst["vision"] = max(worst["vision"], (prompt.visual_embeds - expected_vision).abs().max().item())
        worst["logits"] = max(worst["logits"], (our_prompt_logits(ours, prompt) - expected_logits).abs().max().item())
        result = ours.chat(messages, temperature=0, max_tokens=24, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
        assert result.token_ids == out[0, inputs["input_ids"].shape[1] :].tolist(), name
    print(config_name, worst)
    assert worst["vision"] <= 1e-4 and worst["logits"] <= 1e-3


def test_cli_with_images_matches_transformers(make_vl, images, capsys):
    options = dict(CONFIGS["qwen2_5_vl-w56"])
    directory = make_vl("qwen2_5_vl-w56", **options)
    messages = [
        {
            "role": "user",
            "content": [_image_item(images[0]), _image_item(images[1]), {"type": "text", "text": "Compare them"}],
        }
    ]
    inputs = hf_inputs(directory, messages, images[:2])
    with torch.inference_mode():
        out = hf_model(directory, options["arch"]).generate(**inputs, do_sample=False, max_new_tokens=24)
    code = cli_main(
        [
            "run",
            str(directory),
            "--image",
            images[0],
            "--image",
            images[1],
            "-p",
            "Compare them",
            "--temperature",
            "0",
            "--max-tokens",
            "24",
            "--json",
            "--dtype",
            "float32",
            "--min-pixels",
            str(MIN_PIXELS),
            "--max-pixels",
            str(MAX_PIXELS),
        ]
    )
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tokens"] == out[0, inputs["input_ids"].shape[1] :].tolist()
    assert result["prompt_tokens"] == inputs["input_ids"].shape[1]


def test_vision_cache_reuses_encodings(make_vl, images):
    ours = qwenvl.load(make_vl("qwen2_vl-d2", **CONFIGS["qwen2_vl-d2"]), dtype="float32")
    first = [{"role": "user", "content": [_image_item(images[0]), {"type": "text", "text": "Hi"}]}]
    ours.chat(first, temperature=0, max_tokens=2)
    misses = ours.vision_cache.misses
    follow_up = first + [{"role": "assistant", "content": "Hello"}, {"role": "user", "content": "More?"}]
    ours.chat(follow_up, temperature=0, max_tokens=2)
    assert ours.vision_cache.misses == misses and ours.vision_cache.hits >= 1
    ours.chat(first, temperature=0, max_tokens=2, max_pixels=64 * 64)  # another pixel budget: encoded anew
    assert ours.vision_cache.misses == misses + 1


def test_image_to_text_only_model_is_an_error(make_qwen2, images):
    from qwenvl.errors import MediaError

    ours = qwenvl.load(make_qwen2("default"), dtype="float32")
    with pytest.raises(MediaError, match="text-only"):
        ours.chat([{"role": "user", "content": [_image_item(images[0]), {"type": "text", "text": "Hi"}]}])
