"""How much video one request may make the process decode: checked on the container's frame count and
duration before any frame is decoded, then a time budget on the decoding itself (docs/video.md)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import MediaError

MAX_VIDEO_FRAMES = 7200  # 4 minutes at 30 fps
MAX_VIDEO_SECONDS = 600.0  # 10 minutes
VIDEO_DECODE_TIMEOUT = 60.0  # seconds to decode one video's frames

# Option names (API keywords, ``Model.prepare`` media options) → VideoLimits fields.
LIMIT_OPTIONS = {
    "max_video_frames": "max_frames",
    "max_video_seconds": "max_seconds",
    "video_decode_timeout": "decode_timeout",
}


@dataclass(frozen=True)
class VideoLimits:
    """Bounds on one video: frames and seconds decoded (from its start to the end of the part used) and
    the wall-clock seconds that decoding may take."""

    max_frames: int = MAX_VIDEO_FRAMES
    max_seconds: float = MAX_VIDEO_SECONDS
    decode_timeout: float = VIDEO_DECODE_TIMEOUT

    def __post_init__(self) -> None:
        for name, option in ((f, o) for o, f in LIMIT_OPTIONS.items()):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise MediaError(f"{option} must be a positive number, got {value!r}")
        if self.max_frames != int(self.max_frames):
            raise MediaError(f"max_video_frames must be a whole number, got {self.max_frames!r}")

    def check(self, label: str, frames: int, seconds: float) -> None:
        """Refuse a video whose decoded part would have more frames or seconds than allowed."""
        if frames > self.max_frames:
            raise MediaError(
                f"{label}: {frames} frames to decode, more than the {int(self.max_frames)}-frame limit "
                "(--max-video-frames; or use video_end to take an earlier part)"
            )
        if seconds > self.max_seconds:
            raise MediaError(
                f"{label}: {seconds:.1f} s of video to decode, more than the {self.max_seconds:g} s limit "
                "(--max-video-seconds; or use video_end to take an earlier part)"
            )


def video_limits(options: dict | None = None) -> VideoLimits:
    """VideoLimits from API options (``max_video_frames``, ...); unset ones take the defaults."""
    values = {field: options[name] for name, field in LIMIT_OPTIONS.items() if (options or {}).get(name) is not None}
    return VideoLimits(**values)


__all__ = ["VideoLimits", "video_limits", "MAX_VIDEO_FRAMES", "MAX_VIDEO_SECONDS", "VIDEO_DECODE_TIMEOUT"]
