"""Image loading and preprocessing vs transformers' Qwen2VLImageProcessorPil (computed live).

Every parity case runs transformers' processor the way a user would: on the same file path / data URI
(transformers loads it itself: EXIF-rotate + convert("RGB")) or the same PIL image object (transformers
composites transparency onto white), and ours as ``preprocess_image(load_image(x), cfg)``.
Sizes below are PIL's (width, height).
"""

from __future__ import annotations

import base64
import http.server
import io
import random
import struct
import threading
import time
import urllib.parse
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
    Qwen2VLImageProcessorPil,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
    smart_resize as hf_smart_resize,
)

from qwenvl.config import PreprocessConfig
from qwenvl.errors import MediaError
from qwenvl.media.image import load_image, preprocess_image, smart_resize

SMALL = {"min_pixels": 4 * 28 * 28, "max_pixels": 64 * 28 * 28}  # keeps every case small and fast
CFG = PreprocessConfig(**SMALL)
TOLERANCE = 1e-6


# ----------------------------------------------------------------------------------------------
# helpers


def hf_preprocess(source, cfg: PreprocessConfig, min_pixels: int, max_pixels: int):
    processor = Qwen2VLImageProcessorPil(
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        patch_size=cfg.patch_size,
        temporal_patch_size=cfg.temporal_patch_size,
        merge_size=cfg.merge_size,
        image_mean=list(cfg.image_mean),
        image_std=list(cfg.image_std),
    )
    out = processor(images=source, return_tensors="np")
    return torch.from_numpy(out["pixel_values"]), tuple(int(x) for x in out["image_grid_thw"][0])


def assert_parity(ours_source, hf_source, cfg: PreprocessConfig = CFG, **budget) -> tuple[int, int, int]:
    min_pixels = budget.get("min_pixels", cfg.min_pixels)
    max_pixels = budget.get("max_pixels", cfg.max_pixels)
    ours = preprocess_image(load_image(ours_source), cfg, **budget)
    theirs, theirs_grid = hf_preprocess(hf_source, cfg, min_pixels, max_pixels)
    assert ours.grid_thw == theirs_grid
    assert ours.pixel_values.dtype == torch.float32
    assert ours.pixel_values.shape == theirs.shape
    diff = (ours.pixel_values - theirs).abs().max().item()
    assert diff <= TOLERANCE, f"max abs diff {diff}"
    return ours.grid_thw


def textured(width: int, height: int, seed: int, channels: int = 3) -> np.ndarray:
    """Gradients plus noise: uint8 [height, width, channels], with real edges for bicubic to work on."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = [(x * (97 + 13 * c) + y * (61 + 7 * c)) % 256 for c in range(channels)]
    noise = rng.integers(0, 64, size=(height, width, channels))
    return ((np.stack(base, axis=-1) + noise) % 256).astype(np.uint8)


def rgb(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(textured(width, height, seed), "RGB")


def rgba(width: int, height: int, seed: int = 1) -> Image.Image:
    pixels = textured(width, height, seed, channels=4)
    pixels[: height // 3, :, 3] = 0  # fully transparent band (its RGB must not show)
    pixels[-(height // 4) :, :, 3] = 255
    return Image.fromarray(pixels, "RGBA")


def la(width: int, height: int, seed: int = 2) -> Image.Image:
    return Image.fromarray(textured(width, height, seed, channels=2), "LA")


def palette(width: int, height: int, seed: int = 3, transparent_index: int | None = None) -> Image.Image:
    rng = np.random.default_rng(seed)
    image = Image.fromarray((textured(width, height, seed, channels=1)[..., 0] % 16).astype(np.uint8), "P")
    image.putpalette(rng.integers(0, 256, size=16 * 3).astype(np.uint8).tobytes())
    if transparent_index is not None:
        image.info["transparency"] = transparent_index
    return image


def grey(width: int, height: int, seed: int = 4) -> Image.Image:
    return Image.fromarray(textured(width, height, seed, channels=1)[..., 0], "L")


def cmyk(width: int, height: int, seed: int = 5) -> Image.Image:
    return Image.fromarray(textured(width, height, seed, channels=4), "CMYK")


def sixteen_bit(width: int, height: int, seed: int = 6) -> Image.Image:
    pixels = textured(width, height, seed, channels=1)[..., 0].astype(np.uint16) * 257
    pixels[:, : width // 2] //= 300  # half of it in the 0..255 range, half above
    image = Image.fromarray(pixels)  # uint16 -> "I;16"
    assert image.mode == "I;16"
    return image


def bilevel(width: int, height: int, seed: int = 7) -> Image.Image:
    return grey(width, height, seed).convert("1")


def int32(width: int, height: int, seed: int = 8) -> Image.Image:
    return Image.fromarray(textured(width, height, seed, channels=1)[..., 0].astype(np.int32) - 40)


def float32(width: int, height: int, seed: int = 9) -> Image.Image:
    return Image.fromarray(textured(width, height, seed, channels=1)[..., 0].astype(np.float32) * 1.3)


def rgb_with_trns(width: int, height: int, seed: int = 10) -> Image.Image:
    image = Image.fromarray((textured(width, height, seed) // 32 * 32).astype(np.uint8), "RGB")
    image.info["transparency"] = (0, 32, 64)
    return image


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height, with no real pixel data behind it."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def data_uri(image: Image.Image, fmt: str = "PNG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buffer.getvalue()).decode()}"


def saved(image: Image.Image, path: Path, **save_args) -> str:
    image.save(path, **save_args)
    return str(path)


# ----------------------------------------------------------------------------------------------
# parity on PIL images (transformers' convert_to_rgb path, no EXIF)

PIL_CASES = {
    "rgb_517x333": (lambda: rgb(517, 333), {}),
    "rgb_333x517_large_budget": (lambda: rgb(333, 517), {"max_pixels": 1024 * 28 * 28}),
    "rgb_odd_331x127": (lambda: rgb(331, 127, seed=11), {}),
    "rgb_tiny_50x10": (lambda: rgb(50, 10), {}),
    "rgb_tiny_1x1": (lambda: rgb(1, 1), {}),
    "rgb_tiny_7x3": (lambda: rgb(7, 3), {}),
    "rgb_above_max_900x700": (lambda: rgb(900, 700, seed=12), {"max_pixels": 16 * 28 * 28}),
    "rgb_above_max_tiny_budget": (lambda: rgb(400, 300, seed=13), {"min_pixels": 28 * 28, "max_pixels": 28 * 28}),
    "rgb_aspect_178_5000x28": (lambda: rgb(5000, 28), {"max_pixels": 40 * 28 * 28}),
    "rgb_aspect_200_25x5000": (lambda: rgb(25, 5000), {"max_pixels": 40 * 28 * 28}),
    "rgb_aspect_199_13x2600": (lambda: rgb(2600, 13), {}),
    "rgba": (lambda: rgba(97, 61), {}),
    "la": (lambda: la(61, 97), {}),
    "p_opaque": (lambda: palette(120, 80), {}),
    "p_transparent": (lambda: palette(120, 80, transparent_index=3), {}),
    "l": (lambda: grey(77, 55), {}),
    "cmyk": (lambda: cmyk(70, 90), {}),
    "i16": (lambda: sixteen_bit(64, 48), {}),
    "bilevel_1": (lambda: bilevel(45, 45), {}),
    "i32": (lambda: int32(40, 60), {}),
    "f32": (lambda: float32(60, 40), {}),
    "rgb_with_transparency_key": (lambda: rgb_with_trns(50, 70), {}),
}


@pytest.mark.parametrize("name", list(PIL_CASES))
def test_pil_image_matches_transformers(name):
    build, budget = PIL_CASES[name]
    image = build()
    assert_parity(image, image, **budget)


def test_transparency_is_composited_on_white():
    image = rgba(56, 56)
    ours = preprocess_image(load_image(image), CFG)
    fully_transparent_white = (1.0 - np.array(CFG.image_mean)) / np.array(CFG.image_std)
    first_row = ours.pixel_values[0].reshape(3, CFG.temporal_patch_size, 14, 14)[:, 0, 0, 0]
    assert torch.allclose(first_row, torch.tensor(fully_transparent_white, dtype=torch.float32), atol=1e-5)


def test_other_patch_geometry_and_statistics_match_transformers():
    cfg = PreprocessConfig(
        min_pixels=4 * 32 * 32,
        max_pixels=48 * 32 * 32,
        patch_size=16,
        temporal_patch_size=2,
        merge_size=2,
        image_mean=(0.5, 0.5, 0.5),
        image_std=(0.5, 0.5, 0.5),
    )
    grid = assert_parity(rgb(301, 203, seed=20), rgb(301, 203, seed=20), cfg)
    assert grid[1] % 2 == 0 and grid[2] % 2 == 0


def test_budget_comes_from_config_unless_overridden():
    image = rgb(517, 333)
    cfg = PreprocessConfig(min_pixels=4 * 28 * 28, max_pixels=16 * 28 * 28)
    assert_parity(image, image, cfg)  # the config's budget
    wide = preprocess_image(image, cfg, max_pixels=64 * 28 * 28)
    assert wide.grid_thw != preprocess_image(image, cfg).grid_thw
    assert_parity(image, image, cfg, max_pixels=64 * 28 * 28)


# ----------------------------------------------------------------------------------------------
# parity on files and URIs (transformers' load_image path: EXIF-rotated, plain convert("RGB"))

FILE_CASES = {
    "png_rgb": (lambda: rgb(333, 517), "case.png", {}),
    "jpeg_rgb": (lambda: rgb(211, 157, seed=21), "case.jpg", {"quality": 90}),
    "webp_rgb": (lambda: rgb(150, 100, seed=22), "case.webp", {}),
    "gif_palette": (lambda: palette(90, 70), "case.gif", {}),
    "bmp_rgb": (lambda: rgb(63, 81, seed=23), "case.bmp", {}),
    "png_rgba": (lambda: rgba(97, 61), "rgba.png", {}),
    "png_la": (lambda: la(61, 97), "la.png", {}),
    "png_p_transparent": (lambda: palette(80, 60, transparent_index=3), "p.png", {}),
    "png_l": (lambda: grey(77, 55), "l.png", {}),
    "png_i16": (lambda: sixteen_bit(64, 48), "i16.png", {}),
    "png_1": (lambda: bilevel(45, 45), "bilevel.png", {}),
    "tiff_cmyk": (lambda: cmyk(70, 90), "cmyk.tiff", {}),
    "jpeg_cmyk": (lambda: cmyk(70, 90), "cmyk.jpg", {}),
}


@pytest.mark.parametrize("name", list(FILE_CASES))
def test_file_matches_transformers(name, tmp_path):
    build, filename, save_args = FILE_CASES[name]
    path = saved(build(), tmp_path / filename, **save_args)
    assert_parity(path, path)
    with Image.open(path) as opened:  # the same file opened by the user: the PIL-image path
        assert_parity(opened, opened)


def test_exif_rotated_jpeg(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    path = saved(rgb(300, 120, seed=24), tmp_path / "rotated.jpg", exif=exif, quality=95)

    assert load_image(path).size == (120, 300)  # a file path is shown upright
    upright = assert_parity(path, path)
    with Image.open(path) as opened:  # a PIL image is taken as it is stored, as transformers does
        assert load_image(opened).size == (300, 120)
        stored = assert_parity(opened, opened)
    assert upright == (stored[0], stored[2], stored[1])


def test_data_uri_matches_transformers():
    uri = data_uri(rgb(123, 77, seed=25))
    assert_parity(uri, uri)
    jpeg_uri = data_uri(rgba(60, 40).convert("RGB"), "JPEG")
    assert_parity(jpeg_uri, jpeg_uri)


def test_file_uri_path_object_and_bytes(tmp_path):
    path = saved(rgba(88, 66), tmp_path / "my image.png")
    uri = "file://" + urllib.parse.quote(path)
    assert_parity(uri, path)
    assert_parity(Path(path), path)
    assert_parity(Path(path).read_bytes(), path)


# ----------------------------------------------------------------------------------------------
# smart_resize and aspect-ratio limits


def test_smart_resize_matches_transformers():
    rng = random.Random(0)
    checked = 0
    for _ in range(3000):
        height, width = rng.choice([rng.randint(1, 60), rng.randint(1, 4000)]), rng.randint(1, 4000)
        factor = rng.choice([28, 32])
        min_pixels = rng.choice([factor * factor, 4 * factor * factor, 56 * 56])
        max_pixels = rng.choice([factor * factor * 4, factor * factor * 64, 14 * 14 * 4 * 1280])
        try:
            expected = hf_smart_resize(height, width, factor, min_pixels, max_pixels)
        except ValueError:
            with pytest.raises(MediaError, match="aspect ratio"):
                smart_resize(height, width, factor, min_pixels, max_pixels)
            continue
        assert smart_resize(height, width, factor, min_pixels, max_pixels) == expected, (height, width)
        checked += 1
    assert checked > 2000


@pytest.mark.parametrize("size", [(2500, 10), (10, 2500), (500, 2)])
def test_aspect_ratio_above_200_is_refused_by_both(size):
    image = rgb(*size)
    with pytest.raises(MediaError, match="aspect ratio"):
        preprocess_image(load_image(image), CFG)
    with pytest.raises(ValueError, match="aspect ratio"):
        hf_preprocess(image, CFG, CFG.min_pixels, CFG.max_pixels)


# ----------------------------------------------------------------------------------------------
# errors


def assert_media_error(call, match: str) -> MediaError:
    with pytest.raises(MediaError, match=match) as caught:
        call()
    assert "\n" not in str(caught.value)
    return caught.value


def test_missing_file(tmp_path):
    error = assert_media_error(lambda: load_image(str(tmp_path / "nope.png")), "not found")
    assert "nope.png" in str(error)
    assert_media_error(lambda: load_image(tmp_path), "not a file")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_file(tmp_path, fmt):
    path = tmp_path / f"cut.{fmt.lower()}"
    rgb(200, 150, seed=30).save(path, format=fmt)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert_media_error(lambda: load_image(str(path)), "corrupt")


def test_corrupt_and_non_image_files(tmp_path):
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    assert_media_error(lambda: load_image(str(garbage)), "garbage.png")
    text = tmp_path / "notes.txt"
    text.write_text("hello, not an image\n")
    assert_media_error(lambda: load_image(str(text)), "not an image")
    assert_media_error(lambda: load_image(b"plain bytes"), "not an image")


def test_zero_size_image():
    assert_media_error(lambda: load_image(Image.new("RGB", (0, 10))), "zero size")
    assert_media_error(lambda: preprocess_image(Image.new("RGB", (10, 0)), CFG), "zero size")
    assert_media_error(lambda: load_image(png_header_only(0, 10)), "not an image")


def test_decompression_bomb(tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header_only(100_000, 100_000))  # past Pillow's hard limit
    assert_media_error(lambda: load_image(str(bomb)), "decompression bomb")
    just_above = tmp_path / "big.png"
    just_above.write_bytes(png_header_only(10_000, 10_000))  # where Pillow only warns
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        assert_media_error(lambda: load_image(str(just_above)), "decompression bomb")
    assert_media_error(lambda: load_image(rgb(40, 40), max_image_pixels=1000), "1000-pixel limit")


def test_bad_data_uris():
    assert_media_error(lambda: load_image("data:image/png;base64,@@not*base64@@"), "invalid base64")
    assert_media_error(lambda: load_image("data:image/png;base64,iVBORw0KGgo"), "invalid base64")
    assert_media_error(lambda: load_image("data:image/png,rawpixels"), "base64")
    junk = base64.b64encode(b"definitely not an image").decode()
    assert_media_error(lambda: load_image(f"data:image/png;base64,{junk}"), "not an image")
    big = data_uri(rgb(64, 64))
    assert_media_error(lambda: load_image(big, max_bytes=100), "byte limit")


def test_unsupported_source_type():
    assert_media_error(lambda: load_image(12345), "unsupported image source")


# ----------------------------------------------------------------------------------------------
# http(s): a local server on 127.0.0.1 only

DRIP_SECONDS = 0.1
SLOW_SECONDS = 1.0


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's naming)
        routes = self.server.routes
        if self.path == "/slow":
            time.sleep(SLOW_SECONDS)
        if self.path == "/drip":
            self.send_response(200)
            self.send_header("Content-Length", "30")
            self.end_headers()
            for _ in range(30):  # bounded: 3 s at most
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(DRIP_SECONDS)
            return
        body = routes.get(self.path.removesuffix("-stream"))
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        if not self.path.endswith("-stream"):  # -stream: no Content-Length, read until close
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class _QuietServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # clients that gave up (timeouts) break the pipe; that is the point of those tests


@pytest.fixture(scope="module")
def image_server(tmp_path_factory):
    path = tmp_path_factory.mktemp("served") / "served.png"
    rgba(99, 77).save(path)
    server = _QuietServer(("127.0.0.1", 0), _Handler)
    server.routes = {"/image.png": path.read_bytes(), "/slow": path.read_bytes(), "/big": bytes(300_000)}
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", str(path)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def no_proxy(monkeypatch):
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


def test_http_image_matches_transformers_on_the_same_file(image_server, no_proxy):
    base, path = image_server
    assert_parity(f"{base}/image.png", path)
    assert_parity(f"{base}/image.png-stream", path)


def test_http_errors(image_server, no_proxy):
    base, _ = image_server
    assert_media_error(lambda: load_image(f"{base}/missing.png"), "HTTP 404")
    assert_media_error(lambda: load_image(f"{base}/big", max_bytes=100_000), "100000-byte limit")
    assert_media_error(lambda: load_image(f"{base}/big-stream", max_bytes=100_000), "100000-byte limit")
    assert_media_error(lambda: load_image(f"{base}/image.png", allow_remote=False), "remote images are disabled")


@pytest.mark.parametrize("route", ["/slow", "/drip"])
def test_http_timeout(image_server, no_proxy, route):
    base, _ = image_server
    start = time.monotonic()
    assert_media_error(lambda: load_image(base + route, timeout=0.3), "timed out")
    assert time.monotonic() - start < SLOW_SECONDS
