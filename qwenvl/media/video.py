"""Video input: decode with PyAV (or take a list / directory of frame images), sample and resize frames the way
qwen-vl-utils does, then normalize and patchify them the way transformers' Qwen2-VL video processor does.

The pipeline, step by step (qwen-vl-utils 0.0.14 ``fetch_video`` → transformers 5.23 ``Qwen2VLVideoProcessor``):

1. Frame range: ``video_start`` / ``video_end`` (seconds) → first/last frame (``calculate_video_frame_range``).
2. Frame count: ``nframes`` rounded to the frame factor 2, or ``frames / native_fps * fps`` clamped to
   [4, min(768, frames)] and floored to the factor 2 (``smart_nframes``); 2 ≤ count ≤ frames available.
3. Frame indices: ``torch.linspace(first, last, count).round()`` (float32, ties to even).
   The effective rate ``count / frames * native_fps`` is kept: ``second_per_grid = temporal_patch / rate``.
4. Frame size: ``smart_resize`` with min 128·28² and max ``max(min(768·28², total / count · 2), 1.05 · min)``
   pixels per frame, the total budget ``total`` defaulting to 128000·28²·0.9.
5. Resize: bicubic with antialias on float32 tensors, clamped to [0, 255] and rounded back to uint8 — what
   torchvision's tensor ``resize`` does for the uint8 frames qwen-vl-utils hands it (torchvision is not used).
6. Normalize as the video processor's torchvision backend: ``(x - 255·mean) / (255·std)`` in float32.
7. Pad to a multiple of ``temporal_patch_size`` by repeating the last frame, patchify (time, then merge blocks).

A frame list (a list of images or a directory of them) uses all its frames: each is first resized as an
image (``fetch_image``: PIL bicubic, image pixel bounds), an odd list is padded with its last frame, and
``fps`` (default 2.0) is taken as the rate the frames were sampled at. ``nframes`` / ``video_start`` /
``video_end`` apply to video files only.

Limits (``VideoLimits``, docs/video.md): a file's frame count is read from the container (packets are
counted where it gives none, never past the limit) and a video is refused before any frame is decoded
when the part to decode (from its start to ``video_end``, or to its end) has more frames or seconds than
allowed; decoding then has a time budget. Only the frames of the sampling plan are kept in memory.
"""

from __future__ import annotations

import io
import math
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..config import PreprocessConfig, VisionConfig
from ..errors import MediaError
from .image import (
    MAX_ASPECT_RATIO,
    RESCALE_FACTOR,
    _decode_data_uri,
    _download,
    _file_uri_path,
    _one_line,
    _short,
    convert_to_rgb,
    load_image,
    patchify,
    smart_resize,
)
from .limits import VideoLimits

if TYPE_CHECKING:  # PyAV is imported when a video is opened (its FFmpeg libraries are ~19 MB of RSS)
    import av

VideoSource = str | Path | bytes | bytearray | memoryview | Sequence[Any]

# qwen-vl-utils' constants; pixel bounds are in merged tokens, times factor² (28² for patch 14, merge 2)
FPS = 2.0
FRAME_FACTOR = 2
FPS_MIN_FRAMES = 4
FPS_MAX_FRAMES = 768
VIDEO_MIN_TOKENS = 128
VIDEO_MAX_TOKENS = 768
VIDEO_TOTAL_TOKENS = 128000 * 0.9  # qwen-vl-utils: MODEL_SEQ_LEN (128000) * factor² * 0.9
FRAME_IMAGE_MIN_TOKENS = 4  # a frame list's images are first resized as images are
FRAME_IMAGE_MAX_TOKENS = 16384

MAX_VIDEO_BYTES = 256 * 2**20
DOWNLOAD_TIMEOUT = 60.0
FRAME_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")

# Option names: per request (API keyword / CLI flag) and per content item (qwen-vl-utils' keys).
REQUEST_OPTIONS = {
    "fps": "fps",
    "nframes": "nframes",
    "video_start": "video_start",
    "video_end": "video_end",
    "video_min_pixels": "min_pixels",
    "video_max_pixels": "max_pixels",
    "video_total_pixels": "total_pixels",
}
ITEM_OPTIONS = ("fps", "nframes", "video_start", "video_end", "min_pixels", "max_pixels", "total_pixels",
                "min_frames", "max_frames")  # fmt: skip


@dataclass(frozen=True)
class VideoOptions:
    """How to sample and size one video. ``None`` means qwen-vl-utils' default."""

    fps: float | None = None  # frames to sample per second (file) / rate of the frames (frame list)
    nframes: int | None = None  # a fixed frame count instead of fps (files only)
    video_start: float | None = None  # seconds
    video_end: float | None = None
    min_pixels: int | None = None  # per frame
    max_pixels: int | None = None  # per frame
    total_pixels: float | None = None  # for the whole clip, shared out over the frames
    min_frames: int = FPS_MIN_FRAMES
    max_frames: int = FPS_MAX_FRAMES

    def __post_init__(self) -> None:
        if self.fps is not None and self.nframes is not None:
            raise MediaError("video options: give either fps or nframes, not both")
        for name in ("fps", "min_pixels", "max_pixels", "total_pixels", "nframes", "min_frames", "max_frames"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise MediaError(f"video option {name} must be positive, got {value}")
        if self.video_start is not None and self.video_end is not None and self.video_start >= self.video_end:
            raise MediaError(f"video_start ({self.video_start:g} s) must come before video_end ({self.video_end:g} s)")


def video_options(request: Mapping[str, Any] | None = None, item: Mapping[str, Any] | None = None) -> VideoOptions:
    """Merge request-level options (``fps``, ``video_max_pixels``, ...) with one content item's own keys
    (qwen-vl-utils' names: ``fps``, ``max_pixels``, ...); the item wins, and an item's fps or nframes
    replaces the request's choice of either."""
    values = {field: request[name] for name, field in REQUEST_OPTIONS.items() if (request or {}).get(name) is not None}
    own = {key: item[key] for key in ITEM_OPTIONS if (item or {}).get(key) is not None}
    if "fps" in own or "nframes" in own:
        values.pop("fps", None)
        values.pop("nframes", None)
    values.update(own)
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise MediaError(f"video option {key} must be a number, got {value!r}")
    for key in ("nframes", "min_frames", "max_frames", "min_pixels", "max_pixels"):
        if key in values and values[key] != int(values[key]):
            raise MediaError(f"video option {key} must be a whole number, got {values[key]}")
        if key in values:
            values[key] = int(values[key])
    return VideoOptions(**values)


@dataclass
class VideoInput:
    """One preprocessed video, ready for the vision encoder."""

    pixel_values: torch.Tensor  # [t*h*w, C*T*P*P] float32, patches in merge-block order
    grid_thw: tuple[int, int, int]
    second_per_grid: float  # seconds one temporal patch spans: temporal_patch_size / sample_fps
    sample_fps: float
    frame_indices: tuple[int, ...]


@dataclass
class VideoPlan:
    """What a video will become, known before any frame is decoded (so its cost can be checked first)."""

    label: str
    frame_indices: tuple[int, ...]  # into the decoded stream, or the frame list (padding repeats the last)
    sample_fps: float
    native_size: tuple[int, int]  # (height, width) of the source frames
    size: tuple[int, int]  # (height, width) the frames are resized to
    config: PreprocessConfig
    read_frames: Callable[[], torch.Tensor]  # -> uint8 [len(frame_indices), 3, *size]

    @property
    def grid_thw(self) -> tuple[int, int, int]:
        temporal = -(-len(self.frame_indices) // self.config.temporal_patch_size)
        patch = self.config.patch_size
        return temporal, self.size[0] // patch, self.size[1] // patch

    @property
    def num_patches(self) -> int:
        return math.prod(self.grid_thw)

    @property
    def num_tokens(self) -> int:
        """Visual tokens in the prompt: t·h·w / merge²."""
        return self.num_patches // self.config.merge_size**2

    @property
    def second_per_grid(self) -> float:
        return self.config.temporal_patch_size / self.sample_fps

    def describe(self) -> str:
        height, width = self.size
        return f"{len(self.frame_indices)} frames of {width}x{height}"


# ----------------------------------------------------------------------------------------------
# Sampling (qwen-vl-utils: calculate_video_frame_range, smart_nframes, the readers' linspace)


def _floor_to(number: float, factor: int) -> int:
    return math.floor(number / factor) * factor


def _ceil_to(number: float, factor: int) -> int:
    return math.ceil(number / factor) * factor


def frame_range(total_frames: int, video_fps: float, start: float | None, end: float | None) -> tuple[int, int, int]:
    """(first, last, count) frames of the segment [start, end] seconds, as qwen-vl-utils computes them."""
    if start is None and end is None:
        return 0, total_frames - 1, total_frames
    duration = total_frames / video_fps
    first = math.ceil(max(0.0, min(start, duration)) * video_fps) if start is not None else 0
    last = total_frames - 1
    if end is not None:
        last = min(math.floor(max(0.0, min(end, duration)) * video_fps), total_frames - 1)
    if first >= last:
        raise MediaError(
            f"the segment {_segment(start, end)} holds no frames of a {duration:.2f} s video "
            f"({total_frames} frames at {video_fps:g} fps)"
        )
    return first, last, last - first + 1


def _segment(start: float | None, end: float | None) -> str:
    if start is None:
        return f"up to {end:g} s"
    return f"from {start:g} s" if end is None else f"{start:g}-{end:g} s"


def sample_frame_count(total_frames: int, video_fps: float, options: VideoOptions) -> int:
    """How many frames to sample from ``total_frames`` (qwen-vl-utils ``smart_nframes``)."""
    if total_frames < FRAME_FACTOR:
        raise MediaError(
            f"the video has {total_frames} frame(s): a video needs at least {FRAME_FACTOR} (send it as an image)"
        )
    if options.nframes is not None:
        count = round(options.nframes / FRAME_FACTOR) * FRAME_FACTOR
    else:
        fps = FPS if options.fps is None else options.fps
        min_frames = _ceil_to(options.min_frames, FRAME_FACTOR)
        max_frames = _floor_to(min(options.max_frames, total_frames), FRAME_FACTOR)
        count = min(max(total_frames / video_fps * fps, min_frames), max_frames, total_frames)
        count = _floor_to(count, FRAME_FACTOR)
    if not FRAME_FACTOR <= count <= total_frames:
        raise MediaError(f"cannot sample {count} frames from {total_frames}: nframes must give 2 to {total_frames}")
    return count


def sample_frames(total_frames: int, video_fps: float, options: VideoOptions) -> tuple[list[int], float]:
    """Indices of the frames to keep and the effective sampling rate (frames per second)."""
    if total_frames <= 0:
        raise MediaError("the video has no frames")
    if not video_fps > 0:
        raise MediaError(f"the video reports a frame rate of {video_fps}: cannot place frames in time")
    first, last, count = frame_range(total_frames, video_fps, options.video_start, options.video_end)
    nframes = sample_frame_count(count, video_fps, options)
    # float32 linspace and round-half-to-even, exactly as qwen-vl-utils' torch code picks them
    indices = torch.linspace(first, last, nframes).round().long().tolist()
    return indices, nframes / max(count, 1e-6) * video_fps


def frame_size(height: int, width: int, nframes: int, options: VideoOptions, factor: int = 28) -> tuple[int, int]:
    """The (height, width) every frame is resized to: per-frame bounds and the clip's total pixel budget.

    ``options.max_pixels`` lowers the per-frame bound as in qwen-vl-utils; above 768·factor² it raises it.
    """
    if height <= 0 or width <= 0:
        raise MediaError(f"video frames have zero size ({width}x{height})")
    aspect = max(height, width) / min(height, width)
    if aspect > MAX_ASPECT_RATIO:
        raise MediaError(f"video aspect ratio {aspect:.1f} ({width}x{height}) exceeds {MAX_ASPECT_RATIO}")
    min_pixels = options.min_pixels or VIDEO_MIN_TOKENS * factor * factor
    total = options.total_pixels or VIDEO_TOTAL_TOKENS * factor * factor
    frame_max = max(VIDEO_MAX_TOKENS * factor * factor, options.max_pixels or 0)
    max_pixels = max(min(frame_max, total / nframes * FRAME_FACTOR), int(min_pixels * 1.05))
    if options.max_pixels is not None:
        max_pixels = min(options.max_pixels, max_pixels)
    return smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)


# ----------------------------------------------------------------------------------------------
# Frames → patches


def resize_frames(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 [n, 3, H, W] → uint8 [n, 3, *size]: torchvision's tensor bicubic resize (antialiased, float32
    math, clamped, rounded)."""
    if tuple(frames.shape[-2:]) == tuple(size):
        return frames
    resized = F.interpolate(frames.float(), size=list(size), mode="bicubic", align_corners=False, antialias=True)
    return resized.clamp_(0, 255).round_().to(torch.uint8)


def normalize_frames(frames: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Rescale and normalize fused, as the video processor's torchvision backend: (x - 255·mean) / (255·std)."""
    scaled_mean = torch.tensor(mean) * (1.0 / RESCALE_FACTOR)
    scaled_std = torch.tensor(std) * (1.0 / RESCALE_FACTOR)
    return (frames.float() - scaled_mean[:, None, None]) / scaled_std[:, None, None]


def pad_frames(frames: torch.Tensor, multiple: int) -> torch.Tensor:
    """Repeat the last frame until the count is a multiple of ``multiple``."""
    missing = -frames.shape[0] % multiple
    if missing:
        frames = torch.cat([frames, frames[-1:].expand(missing, *frames.shape[1:])])
    return frames


def frames_to_input(frames: torch.Tensor, plan: VideoPlan) -> VideoInput:
    """uint8 frames [n, 3, h, w] (already at plan.size) → normalized patches."""
    config = plan.config
    frames = pad_frames(frames, config.temporal_patch_size)
    pixels = normalize_frames(frames, config.image_mean, config.image_std)
    patches = patchify(pixels.numpy(), config.patch_size, config.temporal_patch_size, config.merge_size)
    return VideoInput(
        pixel_values=torch.from_numpy(patches),
        grid_thw=plan.grid_thw,
        second_per_grid=plan.second_per_grid,
        sample_fps=plan.sample_fps,
        frame_indices=plan.frame_indices,
    )


def decode_video(plan: VideoPlan) -> VideoInput:
    """Read the planned frames and turn them into ViT patches."""
    frames = plan.read_frames()
    if tuple(frames.shape) != (len(plan.frame_indices), 3, *plan.size):
        raise AssertionError(f"read {tuple(frames.shape)} frames for a plan of {plan.describe()}")
    return frames_to_input(frames, plan)


# ----------------------------------------------------------------------------------------------
# Planning: sources, metadata, frame choice


def plan_video(
    source: VideoSource,
    config: PreprocessConfig,
    options: VideoOptions | None = None,
    *,
    timeout: float = DOWNLOAD_TIMEOUT,
    max_bytes: int = MAX_VIDEO_BYTES,
    allow_remote: bool = True,
    limits: VideoLimits | None = None,
) -> VideoPlan:
    """Choose frames and frame size for a video without decoding it.

    ``source``: a video file path, ``file://`` / ``data:`` URI, http(s) URL or raw bytes; a directory of
    frame images; or a list of frames (paths, URLs, PIL images). ``max_bytes`` caps downloads and bytes.
    ``limits``: frames and seconds the decoded part may have, and the decoding's time budget.
    """
    options = options or VideoOptions()
    limits = limits or VideoLimits()
    if isinstance(source, (list, tuple)):
        return _plan_frame_list(list(source), "video frames", config, options, limits)
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        _check_size(len(data), max_bytes, "video bytes")
        return _plan_file(_bytes_opener(data), "video bytes", config, options, limits)
    if isinstance(source, Path):
        return _plan_path(source, config, options, limits)
    if not isinstance(source, str):
        raise MediaError(f"unsupported video source of type {type(source).__name__}")
    scheme = source.split(":", 1)[0].lower() if ":" in source else ""
    if scheme in ("http", "https"):
        if not allow_remote:
            raise MediaError(f"{_short(source)}: remote videos are disabled")
        data = _download(source, timeout, max_bytes)
        return _plan_file(_bytes_opener(data), _short(source), config, options, limits)
    if scheme == "data":
        data = _decode_data_uri(source, max_bytes)
        return _plan_file(_bytes_opener(data), _short(source, 60), config, options, limits)
    if scheme == "file":
        return _plan_path(_file_uri_path(source), config, options, limits)
    return _plan_path(Path(source), config, options, limits)


def _check_size(count: int, max_bytes: int, label: str) -> None:
    if count > max_bytes:
        raise MediaError(f"{label}: larger than the {max_bytes}-byte limit")


def _bytes_opener(data: bytes) -> Callable[[], av.container.InputContainer]:
    return lambda: _av().open(io.BytesIO(data), metadata_errors="ignore")


def _av() -> Any:
    """PyAV, imported on first use (a model that never sees a video does not map FFmpeg)."""
    import av

    return av


def _plan_path(path: Path, config: PreprocessConfig, options: VideoOptions, limits: VideoLimits) -> VideoPlan:
    if not path.exists():
        raise MediaError(f"video file not found: {path}")
    if path.is_dir():
        frames = sorted((p for p in path.iterdir() if p.suffix.lower() in FRAME_EXTENSIONS), key=_natural_key)
        if not frames:
            raise MediaError(f"{path}: no frame images ({', '.join(FRAME_EXTENSIONS)}) in this directory")
        return _plan_frame_list([str(p) for p in frames], str(path), config, options, limits)
    if not path.is_file():
        raise MediaError(f"not a file: {path}")
    if path.suffix.lower() in FRAME_EXTENSIONS:
        raise MediaError(f"{path}: is an image, not a video (send it as an image, or a list/directory of frames)")
    if path.stat().st_size == 0:
        raise MediaError(f"{path}: the video file is empty")
    if not os.access(path, os.R_OK):
        raise MediaError(f"{path}: cannot read (permission denied)")
    return _plan_file(lambda: _av().open(str(path), metadata_errors="ignore"), str(path), config, options, limits)


def _natural_key(path: Path) -> list:
    """frame2.png before frame10.png."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", path.name)]


@dataclass(frozen=True)
class _StreamInfo:
    total_frames: int  # a lower bound when not exact: counting stopped past the frame limit
    fps: float
    height: int
    width: int
    exact: bool = True


def _plan_file(
    open_container: Callable[[], Any], label: str, config: PreprocessConfig, options: VideoOptions, limits: VideoLimits
) -> VideoPlan:
    info = _with_av_errors(label, lambda: _probe(open_container, label, limits))
    try:
        indices, sample_fps = sample_frames(info.total_frames, info.fps, options)
        size = frame_size(info.height, info.width, len(indices), options, config.factor)
    except MediaError as error:
        raise MediaError(f"{label}: {error}") from None
    decoded = indices[-1] + 1  # decoding runs from the first frame to the last one sampled
    if not info.exact and decoded >= info.total_frames:  # the part reaches past where counting stopped
        decoded = info.total_frames
    limits.check(label, decoded, decoded / info.fps)

    def read() -> torch.Tensor:
        return _with_av_errors(label, lambda: _decode_frames(open_container, indices, size, label, limits))

    return VideoPlan(label, tuple(indices), sample_fps, (info.height, info.width), size, config, read)


def _with_av_errors(label: str, action: Callable[[], Any]) -> Any:
    """Run ``action``, turning PyAV / FFmpeg failures into one-line MediaErrors."""
    av = _av()
    try:
        return action()
    except av.error.FileNotFoundError:
        raise MediaError(f"video file not found: {label}") from None
    except av.error.PermissionError:
        raise MediaError(f"{label}: cannot read (permission denied)") from None
    except (av.FFmpegError, EOFError, ValueError) as error:
        raise MediaError(f"{label}: corrupt or unsupported video ({_one_line(error)})") from None


def _probe(open_container: Callable[[], Any], label: str, limits: VideoLimits) -> _StreamInfo:
    with open_container() as container:
        if not container.streams.video:
            raise MediaError(f"{label}: has no video stream")
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = float(rate) if rate else 0.0
        width, height = stream.codec_context.width, stream.codec_context.height
        total = stream.frames
    exact = True
    if total <= 0:  # webm / mkv / gif carry no frame count: count packets (no decoding), up to the limit
        bound = int(limits.max_frames) + 1
        total = _count_packets(open_container, bound, time.monotonic() + limits.decode_timeout, label)
        exact = total < bound
    if total <= 0:
        raise MediaError(f"{label}: the video has no frames")
    if not fps > 0 or not math.isfinite(fps):
        raise MediaError(f"{label}: the video has no usable frame rate")
    if width <= 0 or height <= 0:
        raise MediaError(f"{label}: video frames have zero size ({width}x{height})")
    return _StreamInfo(total, fps, height, width, exact)


def _count_packets(open_container: Callable[[], Any], bound: int, deadline: float, label: str) -> int:
    """The video stream's packets with data, counting no further than ``bound``."""
    count = 0
    with open_container() as container:
        stream = container.streams.video[0]
        for packet in container.demux(stream):
            count += 1 if packet.size else 0
            if count >= bound:
                break
            if time.monotonic() > deadline:
                raise MediaError(f"{label}: reading the video's packets took too long (--video-decode-timeout)")
    return count


def _decode_frames(
    open_container: Callable[[], Any], indices: Sequence[int], size: tuple[int, int], label: str, limits: VideoLimits
) -> torch.Tensor:
    """Decode once from the start, keeping (resized) only the wanted frames; frames the stream turns out not
    to have (its frame count was too high) repeat the last frame it has. Over the time budget: MediaError."""
    wanted = set(indices)
    kept: dict[int, torch.Tensor] = {}
    last_index, last_frame = -1, None
    deadline = time.monotonic() + limits.decode_timeout
    with open_container() as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for index, frame in enumerate(container.decode(stream)):
            last_index, last_frame = index, frame
            if index in wanted:
                kept[index] = _frame_tensor(frame, size)
            if index >= indices[-1]:
                break
            if time.monotonic() > deadline:
                raise _decode_too_slow(label, limits, index + 1, indices[-1] + 1)
        if last_frame is None:
            raise MediaError(f"{label}: no frame could be decoded")
        if last_index not in kept:
            kept[last_index] = _frame_tensor(last_frame, size)
    return torch.stack([kept.get(i, kept[last_index]) for i in indices])


def _decode_too_slow(label: str, limits: VideoLimits, done: int, total: int) -> MediaError:
    return MediaError(
        f"{label}: decoding took more than {limits.decode_timeout:g} s ({done} of {total} frames done) "
        "(--video-decode-timeout; or use fewer frames: video_end, a smaller file)"
    )


def _frame_tensor(frame: av.VideoFrame, size: tuple[int, int]) -> torch.Tensor:
    rgb = torch.from_numpy(frame.to_ndarray(format="rgb24")).permute(2, 0, 1)
    return resize_frames(rgb[None], size)[0]


def _plan_frame_list(
    sources: list[Any], label: str, config: PreprocessConfig, options: VideoOptions, limits: VideoLimits
) -> VideoPlan:
    """All frames of a list, each resized as an image first and then to the clip's frame size, padded to an
    even count. Only the first is read here (for the size); the others when the plan is decoded, one at a
    time, so only frames of the final size are held."""
    if not sources:
        raise MediaError(f"{label}: the frame list is empty")
    fps = FPS if options.fps is None else options.fps
    limits.check(label, len(sources), len(sources) / fps)
    count = len(sources) + len(sources) % FRAME_FACTOR
    first = _frame_image(sources[0], config, options)
    native = (first.height, first.width)
    try:
        size = frame_size(first.height, first.width, count, options, config.factor)
    except MediaError as error:
        raise MediaError(f"{label}: {error}") from None
    indices = list(range(len(sources))) + [len(sources) - 1] * (count - len(sources))

    def read() -> torch.Tensor:
        deadline = time.monotonic() + limits.decode_timeout
        frames = []
        for position, source in enumerate(sources):
            if time.monotonic() > deadline:
                raise _decode_too_slow(label, limits, position, len(sources))
            image = first if position == 0 else _frame_image(source, config, options)
            if (image.height, image.width) != native:
                raise MediaError(
                    f"{label}: frame {position} is {image.width}x{image.height} after resizing but frame 0 is "
                    f"{native[1]}x{native[0]}: all frames must have one size"
                )
            frames.append(resize_frames(torch.from_numpy(np.array(image)).permute(2, 0, 1)[None], size)[0])
        return torch.stack([frames[i] for i in indices])

    return VideoPlan(label, tuple(indices), fps, native, size, config, read)


def _frame_image(source: Any, config: PreprocessConfig, options: VideoOptions) -> Image.Image:
    """One frame of a list, loaded and resized as qwen-vl-utils' fetch_image resizes an image."""
    factor = config.factor
    min_pixels = options.min_pixels or FRAME_IMAGE_MIN_TOKENS * factor * factor
    max_pixels = options.max_pixels or FRAME_IMAGE_MAX_TOKENS * factor * factor
    image = convert_to_rgb(load_image(source))
    height, width = smart_resize(image.height, image.width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
    if (image.width, image.height) != (width, height):
        image = image.resize((width, height), Image.Resampling.BICUBIC)
    return image


# ----------------------------------------------------------------------------------------------
# Cost estimate (checked before decoding)


def vision_encoder_bytes(num_patches: int, vision: VisionConfig, dtype: torch.dtype) -> int:
    """Rough peak memory of encoding ``num_patches`` patches in one call: the float32 pixel rows plus one
    block's live activations (residual, norm, qkv, rotated q/k, attention out, the MLP's wide tensors)."""
    width = torch.finfo(dtype).bits // 8
    per_patch = vision.patch_dim * (4 + width) + width * (8 * vision.hidden_size + 3 * vision.intermediate_size)
    return num_patches * per_patch


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo in bytes (None where it cannot be read)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


__all__ = [
    "VideoInput",
    "VideoOptions",
    "VideoPlan",
    "VideoSource",
    "video_options",
    "frame_range",
    "sample_frame_count",
    "sample_frames",
    "frame_size",
    "resize_frames",
    "normalize_frames",
    "plan_video",
    "decode_video",
    "vision_encoder_bytes",
    "available_memory",
]
