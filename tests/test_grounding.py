"""Grounding: parsing both models' box conventions, mapping them onto the original image with the resize
the preprocessing did, clamping, the API's result fields, and `qwenvl run --boxes`."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from scripted import script_answer
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

import qwenvl
from qwenvl.cli import main as cli_main
from qwenvl.config import PreprocessConfig
from qwenvl.grounding import (
    NORMALIZED_1000,
    RESIZED_PIXELS,
    ImageGeometry,
    draw_boxes,
    ground,
    parse_mentions,
    save_image,
    text_with_markers,
    to_original,
)
from qwenvl.media.image import preprocess_image, smart_resize

QWEN2_VL_ANSWER = "<|object_ref_start|>the dog<|object_ref_end|><|box_start|>(100,200),(500,900)<|box_end|>"
QWEN2_5_VL_ANSWER = '```json\n[\n  {"bbox_2d": [28, 56, 140, 112], "label": "the dog"}\n]\n```'


def geometry(width, height, resized_width, resized_height, index=0):
    return ImageGeometry(index, width, height, resized_width, resized_height)


# ----------------------------------------------------------------------------------------------
# parsing


def test_qwen2_vl_box_tokens():
    text = (
        "Here: <|object_ref_start|>a cat<|object_ref_end|><|box_start|>(12,34),(560,780)<|box_end|> and "
        "<|object_ref_start|>two dogs<|object_ref_end|><|box_start|>( 1 , 2 ) , ( 3 , 4 )<|box_end|>"
        "<|box_start|>(5,6),(7,8)<|box_end|> then <|box_start|>(9,9),(10,10)<|box_end|>"
    )
    mentions = parse_mentions(text)
    assert [(m.kind, m.label, m.coords) for m in mentions] == [
        ("box", "a cat", (12, 34, 560, 780)),
        ("box", "two dogs", (1, 2, 3, 4)),
        ("box", "two dogs", (5, 6, 7, 8)),  # a box right after another shares its reference
        ("box", None, (9, 9, 10, 10)),  # text in between: no label
    ]


def test_qwen2_5_vl_json_boxes_and_points():
    text = (
        'Sure.\n```json\n[\n {"bbox_2d": [10, 20, 30.5, 40], "label": "cup"},\n'
        ' {"point_2d": [7, 8], "label": "handle"},\n {"bbox_2d": [1, 2, 3, 4]}\n]\n```'
    )
    mentions = parse_mentions(text)
    assert [(m.kind, m.label, m.coords) for m in mentions] == [
        ("box", "cup", (10, 20, 30.5, 40)),
        ("point", "handle", (7, 8)),
        ("box", None, (1, 2, 3, 4)),
    ]


@pytest.mark.parametrize(
    "text",
    [
        "<|box_start|>(1,2),(3)<|box_end|>",
        "<|box_start|>(1,2),(3,4),(5,6)<|box_end|>",
        "<|box_start|>(a,b),(c,d)<|box_end|>",
        "<|box_start|>(1,2),(3,4)",  # never closed (an answer cut by max_tokens)
        "(1,2),(3,4)",  # no tokens: not a box
        '{"bbox_2d": [1, 2, 3]}',
        '{"bbox_2d": [1, 2, 3, "4"]}',
        '{"bbox_2d": [1, 2, 3, true]}',
        '{"bbox_2d": [1, 2, 3, 4],}',  # not JSON
        "{'bbox_2d': [1, 2, 3, 4]}",  # not JSON
        '{"bbox_2d": [1, 2, 3, 4]',  # cut off
        '{"point_2d": [1, 2, 3]}',
        '{"box": [1, 2, 3, 4]}',
        '[{"bbox_2d": [NaN, 2, 3, 4]}]',
        '{"bbox_2d": [1e999, 2, 3, 4]}',
    ],
)
def test_malformed_boxes_are_ignored(text):
    assert parse_mentions(text) == []


def test_malformed_entries_do_not_hide_good_ones():
    text = '[{"bbox_2d": [1, 2, 3]}, {"bbox_2d": [5, 6, 7, 8], "label": "ok"}, {"point_2d": "x"}]'
    assert [(m.label, m.coords) for m in parse_mentions(text)] == [("ok", (5, 6, 7, 8))]


# ----------------------------------------------------------------------------------------------
# mapping


def test_normalized_1000_maps_onto_the_original_size():
    image = geometry(640, 480, 644, 476)
    (box,) = ground(QWEN2_VL_ANSWER, [image], NORMALIZED_1000)
    assert box.coords == pytest.approx((64.0, 96.0, 320.0, 432.0))
    assert box.raw == (100, 200, 500, 900) and box.label == "the dog"
    assert not box.clamped and not box.outside and box.image == 0


def test_resized_pixels_map_with_the_resize_ratio():
    image = geometry(1000, 500, 980, 504)  # smart_resize(500, 1000) with the default budget
    (box,) = ground(QWEN2_5_VL_ANSWER, [image], RESIZED_PIXELS)
    assert box.coords == pytest.approx((28 * 1000 / 980, 56 * 500 / 504, 140 * 1000 / 980, 112 * 500 / 504))


def test_boxes_refer_to_the_last_image():
    images = [geometry(100, 100, 112, 112, 0), geometry(300, 200, 308, 196, 1)]
    (box,) = ground(QWEN2_VL_ANSWER, images, NORMALIZED_1000)
    assert box.image == 1 and box.coords == pytest.approx((30, 40, 150, 180))
    assert ground(QWEN2_VL_ANSWER, [], NORMALIZED_1000) == []
    assert ground(QWEN2_VL_ANSWER, images, None) == []


def test_boxes_outside_the_image_are_clamped_and_reported():
    image = geometry(200, 100, 196, 112)
    text = (
        '[{"bbox_2d": [-28, 56, 300, 90]}, {"bbox_2d": [250, 10, 400, 50]}, {"point_2d": [-5, 20]},'
        ' {"point_2d": [98, 56]}, {"bbox_2d": [150, 100, 10, 20]}]'
    )
    partly, wholly, point_out, point_in, reversed_box = ground(text, [image], RESIZED_PIXELS)
    assert partly.clamped and not partly.outside
    assert partly.coords == pytest.approx((0, 56 * 100 / 112, 200, 90 * 100 / 112))
    assert wholly.clamped and wholly.outside
    assert wholly.coords[0] == wholly.coords[2] == 200  # nothing left: a line on the edge
    assert point_out.clamped and point_out.outside and point_out.coords[0] == 0
    assert not point_in.clamped and point_in.coords == pytest.approx((100, 50))
    assert not reversed_box.clamped  # corners given in the other order: sorted, not an error
    assert reversed_box.coords == pytest.approx((10 * 200 / 196, 20 * 100 / 112, 150 * 200 / 196, 100 * 100 / 112))
    normalized = ground("<|box_start|>(-10,0),(1000,1200)<|box_end|>", [image], NORMALIZED_1000)[0]
    assert normalized.clamped and not normalized.outside and normalized.coords == (0, 0, 200, 100)


def test_json_of_a_box():
    (box,) = ground(QWEN2_VL_ANSWER, [geometry(333, 211, 336, 224)], NORMALIZED_1000)
    out = box.to_json()
    assert out == {
        "image": 0,
        "kind": "box",
        "label": "the dog",
        "box": [33.3, 42.2, 166.5, 189.9],
        "raw": [100, 200, 500, 900],
        "convention": "normalized_1000",
        "clamped": False,
        "outside": False,
    }
    json.dumps(out)


# Sizes (width, height) and pixel budgets: odd sizes, the max_pixels branch (shrink), the min_pixels
# branch (grow), the 200:1 aspect limit both ways.
SIZES = [
    ((37, 53), {}),
    ((999, 17), {}),
    ((4000, 20), {}),
    ((20, 4000), {}),
    ((1001, 777), {"max_pixels": 100 * 28 * 28}),
    ((3001, 2999), {"max_pixels": 64 * 28 * 28}),
    ((30, 31), {"min_pixels": 56 * 56 * 4}),
    ((9, 11), {}),
]
CFG = PreprocessConfig(min_pixels=4 * 28 * 28, max_pixels=400 * 28 * 28)


@pytest.mark.parametrize(("size", "budget"), SIZES, ids=[f"{w}x{h}" for (w, h), _ in SIZES])
def test_preprocessing_reports_the_resize_it_did(size, budget):
    width, height = size
    image = Image.fromarray(np.random.default_rng(width).integers(0, 256, (height, width, 3), dtype=np.uint8))
    prepared = preprocess_image(image, CFG, **budget)
    min_pixels, max_pixels = budget.get("min_pixels", CFG.min_pixels), budget.get("max_pixels", CFG.max_pixels)
    resized_height, resized_width = smart_resize(height, width, 28, min_pixels, max_pixels)
    assert prepared.original_size == (width, height)
    assert prepared.resized_size == (resized_width, resized_height)
    _, grid_h, grid_w = prepared.grid_thw
    assert (grid_w * 14, grid_h * 14) == prepared.resized_size
    processor = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)
    hf_grid = processor(images=image, return_tensors="np")["image_grid_thw"][0]
    assert (int(hf_grid[2]) * 14, int(hf_grid[1]) * 14) == prepared.resized_size  # what transformers resizes to
    # the resized image's corners are the original's corners, in both conventions
    geo = geometry(width, height, *prepared.resized_size)
    whole = to_original(parse_mentions(f'{{"bbox_2d": [0, 0, {resized_width}, {resized_height}]}}')[0], geo,
                        RESIZED_PIXELS)  # fmt: skip
    assert whole.coords == pytest.approx((0, 0, width, height)) and not whole.clamped
    centre = to_original(parse_mentions("<|box_start|>(500,500),(500,500)<|box_end|>")[0], geo, NORMALIZED_1000)
    assert centre.coords == pytest.approx((width / 2, height / 2, width / 2, height / 2))
    # one resized pixel maps to width / resized_width original pixels
    pixel = to_original(parse_mentions('{"point_2d": [1, 1]}')[0], geo, RESIZED_PIXELS)
    assert pixel.coords == pytest.approx((width / resized_width, height / resized_height))


# ----------------------------------------------------------------------------------------------
# the text the boxes are read from


class FakeTokens:
    """Ids 0..: one character each; 90..: grounding markers; 99: EOS (skipped)."""

    markers = {90: "<|box_start|>", 91: "<|box_end|>"}

    def decode(self, ids):
        return "".join(chr(ord("a") + i) if i < 26 else "" for i in ids)


def test_text_with_markers_keeps_grounding_tokens_and_follows_a_stop_cut():
    tokens = FakeTokens()
    ids = [0, 1, 90, 2, 91, 3, 99]
    assert text_with_markers(tokens.decode, ids, tokens.markers, "abcd") == "ab<|box_start|>c<|box_end|>d"
    assert text_with_markers(tokens.decode, ids, tokens.markers) == "ab<|box_start|>c<|box_end|>d"
    assert text_with_markers(tokens.decode, ids, tokens.markers, "ab") == "ab"  # a stop string cut at "c"
    assert text_with_markers(tokens.decode, ids, tokens.markers, "abc") == "ab<|box_start|>c<|box_end|>"
    assert text_with_markers(tokens.decode, [0, 1], tokens.markers, "ab") == "ab"


# ----------------------------------------------------------------------------------------------
# through the model: result fields


@pytest.fixture(scope="module")
def qwen2_vl(make_vl):
    return qwenvl.load(make_vl("default"), dtype="float32")


@pytest.fixture(scope="module")
def qwen2_5_vl(make_vl):
    return qwenvl.load(make_vl("qwen2_5_vl", arch="qwen2_5_vl"), dtype="float32")


def noise_image(width, height, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def ask(model, image, max_pixels=None, **options):
    content = [{"type": "image", "image": image}, {"type": "text", "text": "Where is the dog?"}]
    return model.chat([{"role": "user", "content": content}], temperature=0, max_tokens=64, max_pixels=max_pixels,
                      **options)  # fmt: skip


def test_chat_result_has_images_and_qwen2_vl_boxes(qwen2_vl, monkeypatch):
    script_answer(monkeypatch, qwen2_vl.tokenizer, QWEN2_VL_ANSWER)
    result = ask(qwen2_vl, noise_image(301, 157))
    assert result.text == "the dog(100,200),(500,900)"  # special tokens are not part of the text
    (image,) = result.images
    assert (image.width, image.height) == (301, 157)
    assert (image.resized_width, image.resized_height) == (308, 168)
    (box,) = result.boxes
    assert box.label == "the dog" and box.coords == pytest.approx((30.1, 31.4, 150.5, 141.3))


def test_chat_result_qwen2_5_vl_boxes_in_resized_pixels(qwen2_5_vl, monkeypatch):
    script_answer(monkeypatch, qwen2_5_vl.tokenizer, QWEN2_5_VL_ANSWER)
    result = ask(qwen2_5_vl, noise_image(1001, 500), max_pixels=64 * 28 * 28)
    (image,) = result.images
    assert (image.width, image.height) == (1001, 500)
    assert (image.resized_width, image.resized_height) == smart_resize(500, 1001, max_pixels=64 * 28 * 28)[::-1]
    (box,) = result.boxes
    sx, sy = 1001 / image.resized_width, 500 / image.resized_height
    assert box.coords == pytest.approx((28 * sx, 56 * sy, 140 * sx, 112 * sy))
    assert box.convention == RESIZED_PIXELS


def test_a_stop_string_cuts_the_boxes_after_it(qwen2_vl, monkeypatch):
    two = QWEN2_VL_ANSWER + " and <|object_ref_start|>cat<|object_ref_end|><|box_start|>(1,1),(2,2)<|box_end|>"
    script_answer(monkeypatch, qwen2_vl.tokenizer, two)
    assert [b.label for b in ask(qwen2_vl, noise_image(64, 64)).boxes] == ["the dog", "cat"]
    result = ask(qwen2_vl, noise_image(64, 64), stop=[" and"])
    assert result.text == "the dog(100,200),(500,900)" and [b.label for b in result.boxes] == ["the dog"]


def test_text_only_prompts_have_no_images_or_boxes(qwen2_vl, monkeypatch):
    script_answer(monkeypatch, qwen2_vl.tokenizer, QWEN2_VL_ANSWER)
    result = qwen2_vl.chat([{"role": "user", "content": "Hi"}], max_tokens=40)
    assert result.images == [] and result.boxes == []


# ----------------------------------------------------------------------------------------------
# drawing and `qwenvl run --boxes`


def test_draw_boxes_changes_the_edges_only():
    image = Image.new("RGB", (200, 100), (128, 128, 128))
    (box,) = ground(QWEN2_VL_ANSWER, [geometry(200, 100, 196, 112)], NORMALIZED_1000)
    drawn = np.asarray(draw_boxes(image, [box]))
    x1, y1, x2, y2 = (round(v) for v in box.coords)  # (20, 20, 100, 90)
    assert (drawn[60, x1] != 128).any() and (drawn[60, x2 - 1] != 128).any() and (drawn[y2 - 1, 60] != 128).any()
    assert (drawn[55, 60] == 128).all()  # inside the box, away from its edges and label
    assert (drawn[5, 150] == 128).all()  # outside


def test_save_image_replaces_through_a_temporary_file(tmp_path):
    out = tmp_path / "out.png"
    out.write_bytes(b"old")
    save_image(Image.new("RGB", (4, 4), (1, 2, 3)), out)
    assert Image.open(out).getpixel((0, 0)) == (1, 2, 3)
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]


@pytest.fixture(scope="module")
def vl_dir(make_vl):
    return make_vl("default")


def run_cli(*args):
    return cli_main(["run", *map(str, args), "--dtype", "float32", "--temperature", "0", "-n", "64"])


def test_run_boxes_writes_the_image_with_the_boxes(vl_dir, tmp_path, monkeypatch, capsys):
    source = tmp_path / "in.png"
    Image.new("RGB", (333, 250), (128, 128, 128)).save(source)
    qwen2_tokenizer = qwenvl.load(vl_dir, dtype="float32").tokenizer
    script_answer(monkeypatch, qwen2_tokenizer, QWEN2_VL_ANSWER)
    out = tmp_path / "boxes.png"
    assert run_cli(vl_dir, "--image", source, "-p", "Find the dog.", "--boxes", out, "--json") == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["images"] == [{"index": 0, "original": {"width": 333, "height": 250},
                                 "resized": {"width": 336, "height": 252}}]  # fmt: skip
    (box,) = report["boxes"]
    assert box["box"] == [33.3, 50.0, 166.5, 225.0] and box["label"] == "the dog"
    assert "1 box(es) drawn" in captured.err
    drawn = np.asarray(Image.open(out).convert("RGB")).astype(int)
    assert drawn.shape == (250, 333, 3)
    x1, y1, x2, y2 = 33, 50, 166, 225
    changed = (drawn != 128).any(axis=2)
    assert changed[(y1 + y2) // 2, x1] and changed[(y1 + y2) // 2, x2] and changed[y2, (x1 + x2) // 2]
    assert changed[y1 + 1, (x1 + x2) // 2]  # top edge (under the label)
    assert not changed[(y1 + y2) // 2, (x1 + x2) // 2]  # the middle of the box
    assert not changed[10, 300] and not changed[240, 5]  # far outside it


def test_run_boxes_without_boxes_writes_the_image_unmarked(vl_dir, tmp_path, monkeypatch, capsys):
    source = tmp_path / "in.png"
    Image.new("RGB", (60, 40), (10, 20, 30)).save(source)
    script_answer(monkeypatch, qwenvl.load(vl_dir, dtype="float32").tokenizer, "No dog here.")
    out = tmp_path / "out.jpg"
    assert run_cli(vl_dir, "--image", source, "-p", "Find the dog.", "--boxes", out) == 0
    assert "no boxes" in capsys.readouterr().err
    assert Image.open(out).size == (60, 40)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "--boxes needs an --image"),
        (["--image", "{src}", "--boxes", "{tmp}/out.unknown"], "cannot tell the image format"),
        (["--image", "{src}", "--boxes", "{tmp}/missing/out.png"], "no such directory"),
        (["--image", "{src}", "--boxes", "{src}"], "that is an input image"),
    ],
    ids=["no-image", "suffix", "directory", "input"],
)
def test_run_boxes_refuses_bad_outputs_before_loading(tmp_path, capsys, extra, message):
    source = tmp_path / "in.png"
    Image.new("RGB", (8, 8)).save(source)
    extra = [part.format(src=source, tmp=tmp_path) for part in extra]
    if not extra:
        extra = ["--boxes", str(tmp_path / "out.png")]
    # no model argument and a missing directory: the check must come before any loading
    code = cli_main(["run", str(tmp_path / "no-model-here"), "-p", "x", *extra])
    assert code == 2
    assert message in capsys.readouterr().err
    assert source.read_bytes()[:4] == b"\x89PNG"
