"""What a running server allows: keys, sizes, media sources, per-prompt media counts."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import QwenVLError

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
    started: int = field(default_factory=lambda: int(time.time()))


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
