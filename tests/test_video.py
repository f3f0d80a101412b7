"""Video input for Qwen2-VL / Qwen2.5-VL, against the reference pipeline computed live.

The reference is what users of the published models run: qwen-vl-utils 0.0.14's ``fetch_video`` (frame
range, frame count, frame indices, frame size, sample fps), then transformers' Qwen2-VL video processor
(rescale + normalize, ``patchify``), then the transformers model. Both libraries import torchvision, which
cannot be installed here, so they are imported with empty stand-in torchvision modules. What torchvision
would do is then supplied by this file: qwen-vl-utils reads videos through a stand-in ``decord.VideoReader``
that decodes with PyAV (``PyAVReader``), its frame ``resize`` is a check that the test's frames need none
(or, for the size table, a recorder of the size asked for), and the processor's fused rescale + normalize
is written out (``reference_normalize``). Everything else runs the libraries' own code.
"""

from __future__ import annotations

import functools
import http.server
import importlib
import importlib.machinery
import json
import re
import sys
import threading
import types
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

import qwenvl
from qwenvl.cli import main as cli_main
from qwenvl.config import PreprocessConfig
from qwenvl.errors import MediaError
from qwenvl.media.video import decode_video, frame_size, plan_video, sample_frames, video_options

IMAGE_PAD, VIDEO_PAD = 151655, 151656
IMAGE_PIXELS = dict(min_pixels=56 * 56, max_pixels=160 * 160)
SMALL_FRAMES = {"min_pixels": 56 * 56}  # lets 56x84 frames through unresized (the default minimum is 128*28*28)

CONFIGS = {
    "video-qwen2_vl": dict(arch="qwen2_vl", hidden=64, heads=4, kv_heads=2, ffn=128, mrope_section=[2, 3, 3]),
    # tokens_per_second 3: 0.5 s per temporal patch puts time ids 1.5 apart (fractional intervals)
    "video-qwen2_5_vl-tps3": dict(
        arch="qwen2_5_vl",
        hidden=64,
        heads=4,
        kv_heads=2,
        ffn=128,
        mrope_section=[2, 3, 3],
        vision={"depth": 2, "window_size": 56, "fullatt_block_indexes": [1], "tokens_per_second": 3},
    ),
}
# Qwen2-VL's time ids ignore the rate, so the rate-dependent cases run on Qwen2.5-VL only.
CASES = {
    "video-qwen2_vl": ("odd-frame-list", "image-and-video", "two-turns"),
    "video-qwen2_5_vl-tps3": (
        "file-fps4-half-second-grids",
        "file-nframes-segment",
        "odd-frame-list",
        "image-and-video",
    ),
}


# ----------------------------------------------------------------------------------------------
# The reference libraries, imported without torchvision


def _stub_module(name: str) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    return module


@pytest.fixture(scope="module")
def reference_libs():
    """(qwen_vl_utils.vision_process, transformers' Qwen2VLVideoProcessor.patchify)."""
    import transformers.video_processing_utils  # noqa: F401  (decides torchvision is absent, before the stubs)
    from transformers.utils import is_torchvision_available

    assert not is_torchvision_available()
    names = ["torchvision", "torchvision.io", "torchvision.transforms", "torchvision.transforms.functional",
             "torchvision.transforms.v2", "torchvision.transforms.v2.functional"]  # fmt: skip
    saved = {name: sys.modules.get(name) for name in names}
    stubs = {name: _stub_module(name) for name in names}
    stubs["torchvision"].__version__ = "0.0"
    stubs["torchvision"].io = stubs["torchvision.io"]
    stubs["torchvision"].transforms = stubs["torchvision.transforms"]
    stubs["torchvision.transforms"].functional = stubs["torchvision.transforms.functional"]
    stubs["torchvision.transforms"].InterpolationMode = types.SimpleNamespace(BICUBIC="bicubic")
    try:
        sys.modules.update(stubs)
        vision_process = importlib.import_module("qwen_vl_utils.vision_process")
        processing = importlib.import_module("transformers.models.qwen2_vl.video_processing_qwen2_vl")
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    return vision_process, processing.Qwen2VLVideoProcessor.patchify


class PyAVReader:
    """Stands in for decord.VideoReader: every frame decoded with PyAV, at the stream's average rate."""

    frames_by_path: dict[str, tuple[np.ndarray, float]] = {}

    def __init__(self, path: str):
        if path not in self.frames_by_path:
            with av.open(path) as container:
                stream = container.streams.video[0]
                frames = np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(stream)])
                self.frames_by_path[path] = (frames, float(stream.average_rate))
        self.frames, self.fps = self.frames_by_path[path]

    def __len__(self) -> int:
        return len(self.frames)

    def get_avg_fps(self) -> float:
        return self.fps

    def get_batch(self, indices):
        return types.SimpleNamespace(asnumpy=lambda: self.frames[indices])


class SyntheticReader:
    """A decord.VideoReader of ``total`` blank frames at ``fps`` (for the frame-index table)."""

    def __init__(self, total: int, fps: float, height: int = 4, width: int = 6):
        self.total, self.fps, self.shape = total, fps, (height, width, 3)

    def __len__(self) -> int:
        return self.total

    def get_avg_fps(self) -> float:
        return self.fps

    def get_batch(self, indices):
        return types.SimpleNamespace(asnumpy=lambda: np.zeros((len(indices), *self.shape), np.uint8))


def _use_reader(monkeypatch, vision_process, reader_factory) -> None:
    monkeypatch.setitem(sys.modules, "decord", types.SimpleNamespace(VideoReader=reader_factory))
    monkeypatch.setattr(vision_process, "get_video_reader_backend", lambda: "decord")


def _no_resize(video, size, interpolation=None, antialias=None):
    assert list(video.shape[-2:]) == list(size), "test frames must need no resize"
    return video


def reference_normalize(frames: torch.Tensor) -> torch.Tensor:
    """The video processor's torchvision backend: rescale fused into normalize, (x - mean/r) / (std/r)."""
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    mean = torch.tensor(OPENAI_CLIP_MEAN) * (1.0 / (1 / 255))
    std = torch.tensor(OPENAI_CLIP_STD) * (1.0 / (1 / 255))
    return frames.to(torch.float32).sub(mean.view(-1, 1, 1)).div(std.view(-1, 1, 1))


def reference_video(libs, monkeypatch, element: dict):
    """(pixel_values_videos, grid_thw, sample_fps) for one qwen-vl-utils video element."""
    vision_process, hf_patchify = libs
    _use_reader(monkeypatch, vision_process, PyAVReader)
    monkeypatch.setattr(vision_process.transforms.functional, "resize", _no_resize, raising=False)
    frames, sample_fps = vision_process.fetch_video(dict(element), return_video_sample_fps=True)
    normalized = reference_normalize(frames)[None]
    patches, t, h, w = hf_patchify(None, normalized, patch_size=14, merge_size=2, temporal_patch_size=2)
    return patches[0], (t, h, w), sample_fps


# ----------------------------------------------------------------------------------------------
# Frame choice and frame size against qwen-vl-utils


INDEX_CASES = [
    (100, 30.0, {}),
    (100, 30.0, {"fps": 1.0}),
    (50, 25.0, {"fps": 4.0}),
    (7, 30.0, {}),
    (5, 10.0, {}),
    (3, 10.0, {}),
    (3000, 30.0, {}),
    (30000, 30.0, {}),
    (100, 30.0, {"nframes": 10}),
    (100, 30.0, {"nframes": 7}),
    (100, 30.0, {"nframes": 9}),
    (91, 23.976, {"nframes": 12}),
    (100, 30.0, {"fps": 2.0, "min_frames": 8, "max_frames": 12}),
    (250, 25.0, {"video_start": 2.0, "video_end": 6.5}),
    (250, 25.0, {"video_start": 3.3}),
    (250, 25.0, {"video_end": 4.01, "fps": 3.0}),
    (250, 29.97, {"video_start": 1.1, "video_end": 8.2, "fps": 1.5}),
    (250, 25.0, {"video_start": -1.0, "video_end": 100.0}),
    (1000, 59.94, {"video_start": 10.0, "video_end": 12.0, "nframes": 16}),
]
REFUSED_CASES = [
    (100, 30.0, {"nframes": 200}),
    (1, 30.0, {}),
    (250, 25.0, {"video_start": 5.0, "video_end": 5.01}),
    (250, 25.0, {"video_start": 20.0}),
]


@pytest.mark.parametrize("total,fps,element", INDEX_CASES)
def test_frame_indices_match_qwen_vl_utils(reference_libs, monkeypatch, total, fps, element):
    vision_process, _ = reference_libs
    _use_reader(monkeypatch, vision_process, lambda path: SyntheticReader(total, fps))
    _, metadata, expected_fps = vision_process._read_video_decord({"video": "clip.mp4", **element})
    indices, sample_fps = sample_frames(total, fps, video_options(item=element))
    assert indices == list(metadata["frames_indices"])
    assert sample_fps == expected_fps


@pytest.mark.parametrize("total,fps,element", REFUSED_CASES)
def test_frame_choices_qwen_vl_utils_refuses_are_refused(reference_libs, monkeypatch, total, fps, element):
    vision_process, _ = reference_libs
    _use_reader(monkeypatch, vision_process, lambda path: SyntheticReader(total, fps))
    with pytest.raises(ValueError):
        vision_process._read_video_decord({"video": "clip.mp4", **element})
    with pytest.raises(MediaError):
        sample_frames(total, fps, video_options(item=element))


SIZE_CASES = [
    (1080, 1920, 300, 30.0, {}),
    (480, 640, 100, 25.0, {"fps": 4.0}),
    (720, 1280, 30000, 30.0, {}),  # 768 frames share the total budget
    (720, 1280, 3000, 30.0, {"total_pixels": 20000 * 28 * 28}),
    (720, 1280, 100, 30.0, {"max_pixels": 200 * 28 * 28}),
    (90, 120, 100, 30.0, {}),  # grown to the video minimum
    (90, 120, 100, 30.0, {"min_pixels": 56 * 56}),
    (100, 3000, 60, 30.0, {}),
    (1080, 1920, 6000, 30.0, {"total_pixels": 1000 * 28 * 28}),  # budget below the floor of 1.05 * min
]


@pytest.mark.parametrize("height,width,total,fps,element", SIZE_CASES)
def test_frame_size_matches_qwen_vl_utils(reference_libs, monkeypatch, height, width, total, fps, element):
    vision_process, _ = reference_libs

    def read(ele):  # qwen-vl-utils' own frame count, and frames that take no memory (zero strides)
        nframes = vision_process.smart_nframes(ele, total_frames=total, video_fps=fps)
        video = torch.zeros((), dtype=torch.uint8).expand(nframes, 3, height, width)
        return video, {}, nframes / total * fps

    monkeypatch.setitem(vision_process.VIDEO_READER_BACKENDS, "decord", read)
    monkeypatch.setattr(vision_process, "get_video_reader_backend", lambda: "decord")
    asked = []

    def record(video, size, interpolation=None, antialias=None):
        asked.append(tuple(size))
        return torch.zeros(1)

    monkeypatch.setattr(vision_process.transforms.functional, "resize", record, raising=False)
    vision_process.fetch_video({"video": "clip.mp4", **element})
    options = video_options(item=element)
    indices, _ = sample_frames(total, fps, options)
    assert [frame_size(height, width, len(indices), options)] == asked


def test_frame_list_matches_qwen_vl_utils(reference_libs, monkeypatch, tmp_path):
    """Five frames of 115x165: resized as images (PIL) to 112x168, padded to six; pixels compared exactly.

    (qwen-vl-utils 0.0.14 sizes a frame list's images to multiples of 56, twice the patch factor, where
    earlier releases and our code use 28; 115x165 gives 112x168 either way.)
    """
    vision_process, _ = reference_libs
    rng = np.random.default_rng(1)
    paths = []
    for index in range(5):
        path = tmp_path / f"frame{index}.png"
        Image.fromarray(rng.integers(0, 256, (115, 165, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    seen = []

    def keep(video, size, interpolation=None, antialias=None):
        seen.append(video.clone())
        return _no_resize(video, size)

    monkeypatch.setattr(vision_process.transforms.functional, "resize", keep, raising=False)
    element = {"video": paths, "min_pixels": 56 * 56}
    frames, sample_fps = vision_process.fetch_video({**element, "sample_fps": 1.0}, return_video_sample_fps=True)
    plan = plan_video(paths, PreprocessConfig(), video_options(item={**element, "fps": 1.0}))
    assert plan.frame_indices == (0, 1, 2, 3, 4, 4) and plan.sample_fps == sample_fps == 1.0
    assert torch.equal(plan.read_frames(), seen[0])
    video = decode_video(plan)
    assert video.grid_thw == (3, 8, 12) and video.second_per_grid == 2.0


# ----------------------------------------------------------------------------------------------
# Test media


def moving_shapes(count: int, height: int, width: int, seed: int = 0) -> list[np.ndarray]:
    """Frames of a square and a disc moving over a gradient."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    background = np.stack([x * 255 // width, y * 255 // height, np.full_like(x, 90)], axis=-1).astype(np.uint8)
    frames = []
    for i in range(count):
        frame = background.copy()
        top, left = (i * 3) % (height - 12), (i * 5) % (width - 12)
        frame[top : top + 12, left : left + 12] = (240, 40, 40)
        cy, cx = height // 2 + int(height / 4 * np.sin(i / 4)), width // 2 + int(width / 4 * np.cos(i / 4))
        frame[(y - cy) ** 2 + (x - cx) ** 2 < 36] = (30, 220, 60)
        frame[rng.integers(0, height, 20), rng.integers(0, width, 20)] = 255
        frames.append(frame)
    return frames


def write_video(path: Path, frames: list[np.ndarray], fps: int, codec: str, pix_fmt: str = "yuv420p") -> str:
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = pix_fmt
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return str(path)


H264 = "libx264" if "libx264" in av.codecs_available else "mpeg4"


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    folder = tmp_path_factory.mktemp("video-media")
    small = moving_shapes(50, 56, 84)
    frames_dir = folder / "frames"
    frames_dir.mkdir()
    for index, frame in enumerate(moving_shapes(5, 56, 112, seed=3)):  # sides of 56: see the frame-list test
        Image.fromarray(frame).save(frames_dir / f"f{index + 1}.png")  # f1..f5: natural order
    picture = folder / "picture.png"
    Image.fromarray(moving_shapes(1, 84, 56, seed=5)[0]).save(picture)
    return {
        "small": write_video(folder / "small.mp4", small, 25, H264),
        "frames": sorted(str(p) for p in frames_dir.iterdir()),
        "frames_dir": str(frames_dir),
        "picture": str(picture),
        "clip": write_video(folder / "clip.mp4", moving_shapes(30, 336, 336, seed=7), 10, H264),
        "folder": folder,
    }


CONTAINERS = [("webm", "libvpx", "yuv420p"), ("mkv", "libvpx-vp9", "yuv420p"), ("mov", "mjpeg", "yuvj420p"),
              ("avi", "mpeg4", "yuv420p"), ("gif", "gif", "rgb8")]  # fmt: skip


@pytest.mark.parametrize("suffix,codec,pix_fmt", CONTAINERS)
def test_containers_decode_like_the_reference(reference_libs, monkeypatch, tmp_path, suffix, codec, pix_fmt):
    path = write_video(tmp_path / f"clip.{suffix}", moving_shapes(24, 56, 84), 12, codec, pix_fmt)
    element = {"video": path, "fps": 3.0, **SMALL_FRAMES}
    expected, grid, sample_fps = reference_video(reference_libs, monkeypatch, element)
    video = decode_video(plan_video(path, PreprocessConfig(), video_options(item=element)))
    assert video.grid_thw == grid and video.sample_fps == sample_fps
    assert torch.equal(video.pixel_values, expected)


# ----------------------------------------------------------------------------------------------
# End to end against transformers


def hf_model(directory, arch):
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

    cls = Qwen2VLForConditionalGeneration if arch == "qwen2_vl" else Qwen2_5_VLForConditionalGeneration
    return cls.from_pretrained(directory, dtype=torch.float32).eval()


def hf_inputs(libs, monkeypatch, directory, arch, messages):
    """transformers' inputs, built as its processor would from qwen-vl-utils' output."""
    from transformers.image_utils import load_image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer = _hf_tokenizer(directory)
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    parts = [p for m in messages if isinstance(m["content"], list) for p in m["content"] if p["type"] != "text"]
    images = [p["image"] for p in parts if p["type"] == "image"]
    videos = [reference_video(libs, monkeypatch, _qwen_vl_utils_element(p)) for p in parts if p["type"] == "video"]
    inputs = {}
    grids = {"<|image_pad|>": [], "<|video_pad|>": [v[1] for v in videos]}
    if images:
        pixels = Qwen2VLImageProcessorPil(**IMAGE_PIXELS)([load_image(p) for p in images], return_tensors="pt")
        inputs.update(pixel_values=pixels["pixel_values"], image_grid_thw=pixels["image_grid_thw"])
        grids["<|image_pad|>"] = [tuple(g.tolist()) for g in pixels["image_grid_thw"]]
    if videos:
        inputs["pixel_values_videos"] = torch.cat([v[0] for v in videos])
        inputs["video_grid_thw"] = torch.tensor(grids["<|video_pad|>"])
        if arch == "qwen2_5_vl":
            inputs["second_per_grid_ts"] = torch.tensor([2 / v[2] for v in videos])
    pending = {key: iter(value) for key, value in grids.items()}
    pieces = re.split(r"(<\|image_pad\|>|<\|video_pad\|>)", text)
    expanded = "".join(
        piece * (int(np.prod(next(pending[piece]))) // 4) if piece in pending else piece for piece in pieces
    )
    ids = torch.tensor([tokenizer.encode(expanded)])
    kinds = (ids == IMAGE_PAD).int() + 2 * (ids == VIDEO_PAD).int()
    return dict(input_ids=ids, mm_token_type_ids=kinds, **inputs)


@functools.lru_cache(maxsize=4)
def _hf_tokenizer(directory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory)


def _qwen_vl_utils_element(part: dict) -> dict:
    element = {key: value for key, value in part.items() if key != "type"}
    if isinstance(element["video"], list):  # qwen-vl-utils 0.0.14 reads a frame list's rate from sample_fps
        element["sample_fps"] = element.pop("fps", 2.0)
    return element


def our_logits(model, prompt, continuation: list[int]):
    """Logits over the prompt and then ``continuation`` fed back, each new token at ``n + rope_delta``
    (where our decode steps put it)."""
    text = model.text_model
    length = len(prompt.input_ids)
    with torch.inference_mode():
        ids = torch.tensor([prompt.input_ids + continuation])
        embeds = text.embed(ids)
        slots = torch.isin(ids[0], torch.tensor(prompt.visual_token_ids))
        embeds[0, slots] = prompt.visual_embeds
        after = (torch.arange(length, length + len(continuation)) + prompt.rope_delta).expand(3, -1)
        positions = torch.cat([prompt.position_ids, after], dim=1)
        return text.logits(text(embeds, positions[:, None, :]))[0]


def _video(source, **options):
    return {"type": "video", "video": source, **options}


def _user(*parts):
    return {"role": "user", "content": [{"type": "text", "text": p} if isinstance(p, str) else p for p in parts]}


def conversations(media):
    small, frames, picture = media["small"], media["frames"], media["picture"]
    image = {"type": "image", "image": picture}
    return {
        "file-fps4-half-second-grids": [_user(_video(small, fps=4.0, **SMALL_FRAMES), "Describe.")],
        "file-nframes-segment": [
            _user(_video(small, nframes=6, video_start=0.3, video_end=1.7, **SMALL_FRAMES), "And now?")
        ],
        "odd-frame-list": [_user(_video(frames, fps=1.0, **SMALL_FRAMES), "Count.")],
        "image-and-video": [
            _user(image, "This picture and", _video(small, fps=4.0, **SMALL_FRAMES), "this clip: same?")
        ],
        "two-turns": [
            _user(image, "What is it?"),
            {"role": "assistant", "content": "Shapes."},
            _user(_video(frames, fps=2.0, **SMALL_FRAMES), "And this?"),
        ],
    }


@pytest.mark.parametrize("config_name", CONFIGS)
def test_video_prompts_match_transformers(reference_libs, monkeypatch, make_vl, media, config_name):
    options = dict(CONFIGS[config_name])
    directory = make_vl(config_name, **options)
    ours = qwenvl.load(directory, dtype="float32")
    reference = hf_model(directory, options["arch"])
    worst = {"pixels": 0.0, "logits": 0.0}
    for name in CASES[config_name]:
        messages = conversations(media)[name]
        inputs = hf_inputs(reference_libs, monkeypatch, directory, options["arch"], messages)
        length = inputs["input_ids"].shape[1]
        prompt = ours.prepare(messages, **IMAGE_PIXELS)
        assert prompt.input_ids == inputs["input_ids"][0].tolist(), name
        rope_inputs = {k: inputs[k] for k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts") if k in inputs}
        positions, _ = reference.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"], **rope_inputs)
        assert torch.equal(prompt.position_ids, positions[:, 0]), name
        videos = [p for m in messages if isinstance(m["content"], list) for p in m["content"] if p["type"] == "video"]
        plans = [plan_video(v["video"], ours.preprocess_config, video_options(item=v)) for v in videos]
        ours_pixels = torch.cat([decode_video(plan).pixel_values for plan in plans])
        worst["pixels"] = max(worst["pixels"], (ours_pixels - inputs["pixel_values_videos"]).abs().max().item())
        with torch.inference_mode():
            out = reference.generate(
                **inputs, do_sample=False, max_new_tokens=24, output_logits=True, return_dict_in_generate=True
            )
            expected = torch.cat([reference(**inputs).logits[0, :-1], torch.cat(out.logits)])
        tokens = out.sequences[0, length:].tolist()
        logits = our_logits(ours, prompt, tokens[:-1])  # the prompt, then every decode step
        worst["logits"] = max(worst["logits"], (logits - expected).abs().max().item())
        generation = ours.generate(prompt, temperature=0, max_tokens=24)  # what Model.chat runs after prepare
        for _ in generation:
            pass
        assert generation.result.token_ids == tokens, name
    print(config_name, worst)
    assert worst["pixels"] == 0.0 and worst["logits"] <= 1e-3


@pytest.fixture(scope="module")
def clip_model(make_vl):
    options = dict(CONFIGS["video-qwen2_5_vl-tps3"])
    return make_vl("video-qwen2_5_vl-tps3", **options), options["arch"]


def test_real_clip_with_default_sampling_matches_transformers(reference_libs, monkeypatch, clip_model, media):
    """3 s of 336x336 moving shapes at 10 fps, defaults throughout: 6 frames at 2 fps, no resize needed."""
    directory, arch = clip_model
    messages = [_user(_video(media["clip"]), "What happens?")]
    inputs = hf_inputs(reference_libs, monkeypatch, directory, arch, messages)
    assert inputs["video_grid_thw"].tolist() == [[3, 24, 24]]
    with torch.inference_mode():
        out = hf_model(directory, arch).generate(**inputs, do_sample=False, max_new_tokens=24)
    ours = qwenvl.load(directory, dtype="float32")
    result = ours.chat(messages, temperature=0, max_tokens=24)
    assert result.token_ids == out[0, inputs["input_ids"].shape[1] :].tolist()
    assert result.prompt_tokens == inputs["input_ids"].shape[1]
    misses = ours.vision_cache.misses
    ours.chat(messages + [{"role": "assistant", "content": result.text}, _user("More?")], max_tokens=1)
    assert ours.vision_cache.misses == misses  # the clip's encoding is reused on the next turn


def test_cli_video_prompt_matches_transformers(reference_libs, monkeypatch, clip_model, media, capsys):
    directory, arch = clip_model
    messages = [_user(_video(media["clip"], fps=1.0), "What happens?")]
    inputs = hf_inputs(reference_libs, monkeypatch, directory, arch, messages)
    with torch.inference_mode():
        out = hf_model(directory, arch).generate(**inputs, do_sample=False, max_new_tokens=24)
    code = cli_main(
        [
            "run",
            str(directory),
            "--video",
            media["clip"],
            "--fps",
            "1",
            "-p",
            "What happens?",
            "--temperature",
            "0",
            "--max-tokens",
            "24",
            "--json",
            "--dtype",
            "float32",
        ]
    )
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tokens"] == out[0, inputs["input_ids"].shape[1] :].tolist()
    assert result["prompt_tokens"] == inputs["input_ids"].shape[1]


# ----------------------------------------------------------------------------------------------
# Refusals: one clear line, before any decoding or encoding


def test_oversized_video_is_refused_before_encoding(make_vl, media, monkeypatch):
    directory = make_vl("video-qwen2_vl", **CONFIGS["video-qwen2_vl"])
    messages = [_user(_video(media["clip"]), "Hi")]
    monkeypatch.setattr("qwenvl.api.decode_video", lambda plan: pytest.fail("decoded a refused video"))
    small_context = qwenvl.load(directory, dtype="float32", context=300)  # the clip takes 432 tokens
    with pytest.raises(MediaError, match=r"432 tokens.*context holds 300.*--fps") as refused:
        small_context.chat(messages, max_tokens=4)
    assert "\n" not in str(refused.value)
    roomy = qwenvl.load(directory, dtype="float32")
    refusal = r"6 frames of 336x336 needs about \d+ MiB, more than the 10 MiB available.*--video-max-pixels"
    with pytest.raises(MediaError, match=refusal):
        roomy.chat(messages, max_tokens=4, vision_memory_budget=10_000_000)
    assert small_context.vision_cache.misses == roomy.vision_cache.misses == 0


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def _serve(folder: Path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_remote_video_and_download_limit(media):
    server = _serve(media["folder"])
    try:
        url = f"http://127.0.0.1:{server.server_port}/small.mp4"
        local = decode_video(plan_video(media["small"], PreprocessConfig(), video_options(item=SMALL_FRAMES)))
        remote = decode_video(plan_video(url, PreprocessConfig(), video_options(item=SMALL_FRAMES)))
        assert torch.equal(local.pixel_values, remote.pixel_values)
        with pytest.raises(MediaError, match="byte limit"):
            plan_video(url, PreprocessConfig(), max_bytes=1000)
    finally:
        server.shutdown()


def test_bad_videos_give_one_line_errors(make_vl, media, tmp_path, capsys):
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    (tmp_path / "empty.webm").write_bytes(b"")
    (tmp_path / "notes.mkv").write_text("not a video")
    (tmp_path / "no-frames").mkdir()
    one_frame = write_video(tmp_path / "still.gif", moving_shapes(1, 56, 84), 5, "gif", "rgb8")
    cases = {
        str(junk): "junk.mp4: corrupt or unsupported video",
        str(tmp_path / "empty.webm"): "empty.webm: the video file is empty",
        str(tmp_path / "notes.mkv"): "notes.mkv: corrupt or unsupported video",
        str(tmp_path / "missing.mp4"): "video file not found",
        str(tmp_path / "no-frames"): "no frame images",
        one_frame: "1 frame",
        media["picture"]: "is an image, not a video",
    }
    for source, message in cases.items():
        with pytest.raises(MediaError, match=re.escape(message)) as error:
            plan_video(source, PreprocessConfig())
        assert "\n" not in str(error.value)
    config = PreprocessConfig()
    with pytest.raises(MediaError, match="holds no frames"):
        plan_video(media["small"], config, video_options({"video_start": 1.0, "video_end": 1.03}))
    with pytest.raises(MediaError, match="nframes"):
        plan_video(media["small"], config, video_options({"nframes": 64}))
    with pytest.raises(MediaError, match="either fps or nframes"):
        video_options({}, {"fps": 1.0, "nframes": 4})
    directory = make_vl("video-qwen2_vl", **CONFIGS["video-qwen2_vl"])
    code = cli_main(["run", str(directory), "--video", str(junk), "-p", "Hi", "--max-tokens", "2"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "junk.mp4: corrupt or unsupported video" in err


def test_frame_directory_and_item_options(clip_model, media):
    """A directory is its frames in natural order; an item's own fps overrides the request's."""
    config = PreprocessConfig()
    by_dir = plan_video(media["frames_dir"], config, video_options(item=SMALL_FRAMES))
    by_list = plan_video(media["frames"], config, video_options(item=SMALL_FRAMES))
    assert torch.equal(by_dir.read_frames(), by_list.read_frames()) and by_dir.sample_fps == 2.0
    merged = video_options({"fps": 1.0, "video_max_pixels": 5000}, {"nframes": 8})
    assert merged.nframes == 8 and merged.fps is None and merged.max_pixels == 5000
    ours = qwenvl.load(clip_model[0], dtype="float32")  # Qwen2.5-VL: the rate shows in the time ids
    item = [_user(_video(media["frames_dir"], fps=4.0, **SMALL_FRAMES), "Hi")]
    request = [_user(_video(media["frames_dir"], **SMALL_FRAMES), "Hi")]
    item_fps = ours.prepare(item, fps=1.0).position_ids
    assert torch.equal(item_fps, ours.prepare(request, fps=4.0).position_ids)
    assert not torch.equal(item_fps, ours.prepare(request).position_ids)
