"""What a running server allows: keys, sizes, media sources, per-prompt media counts."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import QwenVLError
from ..media.limits import MAX_VIDEO_FRAMES, MAX_VIDEO_SECONDS, VIDEO_DECODE_TIMEOUT

MEDIA_KINDS = ("image", "video")
DEFAULT_MM_LIMITS = {"image": 8, "video": 2}


@dataclass(frozen=True)
class ServerSettings:
    """Limits and access rules of one server (the ``qwenvl serve`` flags)."""

    model_id: str
    api_key: str | None = None
    max_body_bytes: int = 32 * 2**20
    default_max_tokens: int = 512
    allowed_local_media_path: Path | None = None  # file:// URLs must resolve under it; None: refused
    allowed_media_domains: tuple[str, ...] = ()  # http(s) hosts; "*.example.com" takes subdomains
    mm_limits: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_MM_LIMITS))
    media_timeout: float = 10.0  # seconds for one whole download, redirects included
    max_media_bytes: int = 32 * 2**20  # one downloaded or local media file
    ui: bool = True  # serve the chat page at GET / (``--no-ui``: off)
    cors_origins: tuple[str, ...] = ()  # origins browsers may call from ("*": any); none by default
    max_video_frames: int = MAX_VIDEO_FRAMES  # frames a video may have (to the end of the part used)
    max_video_seconds: float = MAX_VIDEO_SECONDS  # its length in seconds (likewise)
    video_decode_timeout: float = VIDEO_DECODE_TIMEOUT  # seconds to decode one video's frames
    # Connections and the queue: every wait is bounded.
    header_timeout: float = 10.0  # a request's headers, from its first byte (or the connection's opening)
    body_timeout: float = 60.0  # its body, from the end of the headers; else 408
    keep_alive_timeout: float = 5.0  # an idle keep-alive connection is closed after this
    limit_concurrency: int | None = 256  # connections + requests at once, else 503 (uvicorn's)
    max_waiting: int = 1024  # requests waiting for a batch slot, else 429
    queue_timeout: float = 120.0  # seconds a request may wait for a batch slot, else 503
    started: int = field(default_factory=lambda: int(time.time()))

    def video_limits(self) -> dict[str, float]:
        """The video limits as ``Model.prepare`` options."""
        return {
            "max_video_frames": self.max_video_frames,
            "max_video_seconds": self.max_video_seconds,
            "video_decode_timeout": self.video_decode_timeout,
        }


def parse_mm_limits(text: str | None) -> dict[str, int]:
    """``image=4,video=1`` → {"image": 4, "video": 1}, over the defaults."""
    limits = dict(DEFAULT_MM_LIMITS)
    for entry in (text or "").split(","):
        if not entry.strip():
            continue
        kind, equals, count = entry.partition("=")
        kind = kind.strip()
        if not equals or kind not in MEDIA_KINDS or not count.strip().isdigit():
            raise QwenVLError(f"--limit-mm-per-prompt: expected image=N,video=N, got {entry.strip()!r}")
        limits[kind] = int(count)
    return limits


def parse_domains(text: str | None) -> tuple[str, ...]:
    """``a.com, *.b.org`` → ("a.com", "*.b.org"), lower-cased."""
    domains = tuple(part.strip().lower().rstrip(".") for part in (text or "").split(",") if part.strip())
    for domain in domains:
        if "/" in domain or ":" in domain or "@" in domain:
            raise QwenVLError(
                f"--allowed-media-domains: give host names only (no scheme, port or path), got {domain!r}"
            )
    return domains


def local_media_root(path: str | None) -> Path | None:
    if path is None:
        return None
    root = Path(path).expanduser()
    if not root.is_dir():
        raise QwenVLError(f"--allowed-local-media-path: not a directory: {path}")
    return root.resolve()
