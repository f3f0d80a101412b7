"""Image input: load from a path / URI / URL / bytes / PIL image, then preprocess into ViT patches.

Preprocessing reproduces transformers' ``Qwen2VLImageProcessorPil`` (the PIL backend, transformers 5.23)
step for step, so the pixel values agree exactly:

    convert to RGB -> smart_resize -> PIL bicubic resize (uint8) -> x * (1/255) in float64, cast to float32
    -> (x - mean) / std in float32 -> repeat over temporal_patch_size -> flatten in merge-block order.

Loading mirrors what transformers does with the same input, which differs by input kind:

- an encoded file (path, ``file://`` / ``data:`` URI, http(s) URL, raw bytes) goes through
  ``transformers.image_utils.load_image``: the EXIF orientation is applied (``ImageOps.exif_transpose``)
  and the image is converted with a plain ``convert("RGB")``, so an alpha channel is *dropped*, not
  composited (what lies under transparent pixels shows);
- a PIL image is used as given: no EXIF rotation, and at preprocessing time RGBA / LA / PA and palette or
  RGB images with a ``transparency`` entry are alpha-composited onto white (``image_transforms.convert_to_rgb``).

``load_image`` returns exactly what transformers' processor would then work on, and ``preprocess_image``
applies the processor's own RGB conversion, so ``preprocess_image(load_image(x))`` matches the processor
called on ``x`` for both kinds of input.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import io
import math
import struct
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..config import PreprocessConfig
from ..errors import MediaError

ImageSource = str | Path | bytes | bytearray | memoryview | Image.Image

# Pillow's own default decompression-bomb threshold (it only warns between 1x and 2x of it); we refuse
# anything above it outright.
MAX_IMAGE_PIXELS = 89_478_485
MAX_ASPECT_RATIO = 200
RESCALE_FACTOR = 1 / 255
_CHUNK_BYTES = 1 << 16

# What Pillow raises on a corrupt or unsupported file (its decoders are not consistent about it).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError)


@dataclass
class ImageInput:
    """One preprocessed image, ready for the vision encoder."""

    pixel_values: torch.Tensor  # [t*h*w, C*T*P*P] float32, patches in merge-block order
    grid_thw: tuple[int, int, int]  # (1, height / patch_size, width / patch_size)
    original_size: tuple[int, int] = (0, 0)  # (width, height) before smart_resize (after EXIF rotation)
    resized_size: tuple[int, int] = (0, 0)  # (width, height) the model saw: what smart_resize chose


# ----------------------------------------------------------------------------------------------
# Loading


def load_image(
    source: ImageSource,
    *,
    timeout: float = 10.0,
    max_bytes: int = 50 * 2**20,
    allow_remote: bool = True,
    max_image_pixels: int = MAX_IMAGE_PIXELS,
) -> Image.Image:
    """Open an image from a path, ``file://`` / ``data:image/...;base64,`` URI, http(s) URL, bytes or PIL image.

    Encoded inputs come back EXIF-rotated and in RGB mode; a PIL image comes back unchanged (see the module
    docstring). ``max_bytes`` caps downloads, data URIs and raw bytes; ``max_image_pixels`` caps width * height.
    Raises MediaError with a one-line message for anything unreadable.
    """
    if isinstance(source, Image.Image):
        return _checked_pil_image(source, max_image_pixels)
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        _check_byte_count(len(data), max_bytes, "image bytes")
        return _decode(io.BytesIO(data), "image bytes", max_image_pixels)
    if isinstance(source, Path):
        return _load_file(source, max_image_pixels)
    if not isinstance(source, str):
        raise MediaError(f"unsupported image source of type {type(source).__name__}")

    scheme = source.split(":", 1)[0].lower() if ":" in source else ""
    if scheme in ("http", "https"):
        if not allow_remote:
            raise MediaError(f"{_short(source)}: remote images are disabled")
        data = _download(source, timeout, max_bytes)
        return _decode(io.BytesIO(data), _short(source), max_image_pixels)
    if scheme == "data":
        data = _decode_data_uri(source, max_bytes)
        return _decode(io.BytesIO(data), _short(source), max_image_pixels)
    if scheme == "file":
        return _load_file(_file_uri_path(source), max_image_pixels)
    return _load_file(Path(source), max_image_pixels)


def _short(text: str, limit: int = 120) -> str:
    """A source string fit for a one-line message (data URIs can be megabytes long)."""
    text = text.replace("\n", " ")
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"


def _check_byte_count(count: int, max_bytes: int, label: str) -> None:
    if count > max_bytes:
        raise MediaError(f"{label}: larger than the {max_bytes}-byte limit")


def _check_dimensions(size: tuple[int, int], label: str, max_image_pixels: int) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise MediaError(f"{label}: image has zero size ({width}x{height})")
    if width * height > max_image_pixels:
        raise MediaError(
            f"{label}: {width}x{height} image exceeds the {max_image_pixels}-pixel limit (possible decompression bomb)"
        )


def _checked_pil_image(image: Image.Image, max_image_pixels: int) -> Image.Image:
    _check_dimensions(image.size, "image", max_image_pixels)
    try:
        image.load()  # a lazily opened file may still fail here
    except _DECODE_ERRORS as error:
        raise MediaError(f"image: corrupt or unsupported image data ({_one_line(error)})") from None
    return image


def _load_file(path: Path, max_image_pixels: int) -> Image.Image:
    if not path.exists():
        raise MediaError(f"image file not found: {path}")
    if not path.is_file():
        raise MediaError(f"not a file: {path}")
    return _decode(path, str(path), max_image_pixels)


def _file_uri_path(uri: str) -> Path:
    parsed = urllib.parse.urlparse(uri)
    if parsed.netloc not in ("", "localhost"):
        raise MediaError(f"{_short(uri)}: file:// URIs must name a local file")
    return Path(urllib.request.url2pathname(parsed.path))


def _decode(file: Path | io.BytesIO, label: str, max_image_pixels: int) -> Image.Image:
    """Decode an encoded image the way transformers.image_utils.load_image does: EXIF-rotate, then RGB."""
    try:
        with Image.open(file) as opened:
            _check_dimensions(opened.size, label, max_image_pixels)
            upright = ImageOps.exif_transpose(opened)  # decodes the pixels
            return upright.convert("RGB")
    except Image.DecompressionBombError as error:
        raise MediaError(f"{label}: {_one_line(error)}") from None
    except UnidentifiedImageError:
        raise MediaError(f"{label}: not an image, or a format Pillow cannot read") from None
    except PermissionError as error:
        raise MediaError(f"{label}: cannot read ({_one_line(error)})") from None
    except _DECODE_ERRORS as error:
        raise MediaError(f"{label}: corrupt or unsupported image ({_one_line(error)})") from None


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _decode_data_uri(uri: str, max_bytes: int) -> bytes:
    header, comma, payload = uri.partition(",")
    if not comma or not header.lower().endswith(";base64"):
        raise MediaError(f"{_short(uri, 60)}: data URI must look like data:image/...;base64,<data>")
    payload = "".join(payload.split())
    # base64 grows data by 4/3; refuse before decoding anything huge
    _check_byte_count(len(payload) * 3 // 4, max_bytes, "data URI")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise MediaError(f"{_short(uri, 60)}: invalid base64 in data URI") from None


def _download(url: str, timeout: float, max_bytes: int) -> bytes:
    """GET ``url`` into memory, giving up past ``max_bytes`` or ``timeout`` seconds overall."""
    label = _short(url)
    deadline = time.monotonic() + timeout
    request = urllib.request.Request(url, headers={"User-Agent": "qwenvl"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            declared = response.headers.get("Content-Length", "")
            if declared.isdigit():
                _check_byte_count(int(declared), max_bytes, label)
            chunks, total = [], 0
            # read1 returns whatever has arrived, so a server dripping bytes cannot outlast the deadline
            while chunk := response.read1(_CHUNK_BYTES):
                total += len(chunk)
                _check_byte_count(total, max_bytes, label)
                if time.monotonic() > deadline:
                    raise TimeoutError
                chunks.append(chunk)
            return b"".join(chunks)
    except urllib.error.HTTPError as error:
        raise MediaError(f"{label}: HTTP {error.code} {error.reason}") from None
    except urllib.error.URLError as error:
        if isinstance(error.reason, TimeoutError):
            raise MediaError(f"{label}: timed out after {timeout:g} s") from None
        raise MediaError(f"{label}: cannot download ({_one_line(error.reason)})") from None
    except TimeoutError:
        raise MediaError(f"{label}: timed out after {timeout:g} s") from None
    except (OSError, http.client.HTTPException, ValueError) as error:
        raise MediaError(f"{label}: cannot download ({_one_line(error)})") from None


# ----------------------------------------------------------------------------------------------
# Preprocessing


def smart_resize(
    height: int,
    width: int,
    factor: int = 28,
    min_pixels: int = 56 * 56,
    max_pixels: int = 14 * 14 * 4 * 1280,
) -> tuple[int, int]:
    """The (height, width) Qwen2-VL resizes to: multiples of ``factor``, area in [min_pixels, max_pixels].

    Same arithmetic as transformers' ``smart_resize`` (including its quirks: a side rounding to 0 is grown by
    the min_pixels branch, and the min_pixels branch does not re-check max_pixels).
    """
    if height <= 0 or width <= 0:
        raise MediaError(f"image has zero size ({width}x{height})")
    aspect = max(height, width) / min(height, width)
    if aspect > MAX_ASPECT_RATIO:
        raise MediaError(f"image aspect ratio {aspect:.1f} ({width}x{height}) exceeds {MAX_ASPECT_RATIO}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def check_pixel_range(min_pixels: int | None, max_pixels: int | None) -> None:
    """Refuse a min_pixels above max_pixels (the resize would silently break one of them)."""
    if min_pixels is not None and max_pixels is not None and min_pixels > max_pixels:
        raise MediaError(f"min_pixels ({min_pixels}) is above max_pixels ({max_pixels}): lower one or raise the other")


def preprocess_image(
    image: Image.Image,
    config: PreprocessConfig,
    *,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
) -> ImageInput:
    """Resize, normalize and patchify one image exactly as Qwen2VLImageProcessorPil does.

    ``min_pixels`` / ``max_pixels`` override the config's resize budget.
    """
    low = config.min_pixels if min_pixels is None else min_pixels
    high = config.max_pixels if max_pixels is None else max_pixels
    check_pixel_range(low, high)
    rgb = convert_to_rgb(image)
    height, width = smart_resize(rgb.height, rgb.width, factor=config.factor, min_pixels=low, max_pixels=high)
    if height == 0 or width == 0:
        raise MediaError(f"image {rgb.width}x{rgb.height} resizes to zero size: check min_pixels")
    resized = np.asarray(rgb.resize((width, height), Image.Resampling.BICUBIC))  # uint8 [H, W, 3]
    pixels = normalize(rescale(resized), config.image_mean, config.image_std)
    # A still image is its own video of temporal_patch_size identical frames.
    frames = np.broadcast_to(pixels.transpose(2, 0, 1), (config.temporal_patch_size, 3, height, width))
    patches = patchify(frames, config.patch_size, config.temporal_patch_size, config.merge_size)
    grid = (1, height // config.patch_size, width // config.patch_size)
    return ImageInput(
        pixel_values=torch.from_numpy(patches),
        grid_thw=grid,
        original_size=(rgb.width, rgb.height),
        resized_size=(width, height),
    )


def convert_to_rgb(image: Image.Image) -> Image.Image:
    """RGB as transformers' ``convert_to_rgb`` makes it: any transparency is composited onto white."""
    if image.width <= 0 or image.height <= 0:
        raise MediaError(f"image has zero size ({image.width}x{image.height})")
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    try:
        if not has_alpha:
            return image.convert("RGB")
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    except _DECODE_ERRORS as error:
        raise MediaError(f"image mode {image.mode!r} cannot be converted to RGB ({_one_line(error)})") from None


def rescale(pixels: np.ndarray) -> np.ndarray:
    """uint8 -> float32 in [0, 1], multiplying in float64 first as transformers does."""
    return (pixels.astype(np.float64) * RESCALE_FACTOR).astype(np.float32)


def normalize(pixels: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """(x - mean) / std over the last (channel) axis, in float32."""
    return (pixels - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)


def patchify(frames: np.ndarray, patch_size: int, temporal_patch_size: int, merge_size: int) -> np.ndarray:
    """[F, C, H, W] frames -> [grid_t * grid_h * grid_w, C * T * P * P] rows.

    Rows run over time, then merge blocks (merge_size x merge_size neighbouring patches, so the PatchMerger
    can fuse consecutive rows), then patches inside a block; each row is laid out (C, T, P, P).
    """
    num_frames, channels, height, width = frames.shape
    grid_t, grid_h, grid_w = num_frames // temporal_patch_size, height // patch_size, width // patch_size
    patches = frames.reshape(
        grid_t, temporal_patch_size, channels,
        grid_h // merge_size, merge_size, patch_size,
        grid_w // merge_size, merge_size, patch_size,
    )  # fmt: skip
    patches = patches.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    rows = patches.reshape(grid_t * grid_h * grid_w, channels * temporal_patch_size * patch_size * patch_size)
    return np.ascontiguousarray(rows, dtype=np.float32)


__all__ = [
    "ImageInput",
    "ImageSource",
    "load_image",
    "smart_resize",
    "preprocess_image",
    "convert_to_rgb",
    "patchify",
]
