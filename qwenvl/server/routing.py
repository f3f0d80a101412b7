"""Which replica should answer a request: the key of its leading prefix, and a consistent-hash ring.

A chat client re-sends the whole conversation every turn, so the turns of one conversation share their
beginning: the system prompt and the first user message (with its images). ``prefix_key`` hashes exactly
that, so every turn of a conversation gets the same key, and ``HashRing`` maps the key to the same
replica for as long as that replica lives; a replica joining or leaving moves only the keys it owns.
Pure functions of the request body: no Ray here (qwenvl/server/ray_router.py applies them).
"""

from __future__ import annotations

import bisect
import hashlib
import json
import threading
from collections.abc import Iterable
from typing import Any

CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"
PREFIX_CHARS = 1024  # a raw completion prompt is keyed by its first PREFIX_CHARS characters
PREFIX_TOKENS = 256  # ... or its first PREFIX_TOKENS token ids
LEADING_ROLES = ("system", "developer")
VIRTUAL_NODES = 64  # points per replica on the ring: keys spread within a few % of evenly


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def prefix_key(path: str, body: bytes) -> str | None:
    """The routing key of a request, or None when it has no prefix worth keeping together.

    Chat: the leading system / developer messages and the first user message, each content part as
    its text or, for an image or video, the digest of its URL (a data: URI's digest is its bytes').
    Completions: the first PREFIX_CHARS characters of the prompt, or its first PREFIX_TOKENS ids.
    Anything else (another route, a body that is not JSON): None.
    """
    if path not in (CHAT_PATH, COMPLETIONS_PATH) or not body:
        return None
    try:
        request = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(request, dict):
        return None
    leading = _chat_prefix(request.get("messages")) if path == CHAT_PATH else _completion_prefix(request.get("prompt"))
    if leading is None:
        return None
    return _digest(json.dumps(leading, ensure_ascii=False, sort_keys=True).encode())


def _chat_prefix(messages: Any) -> list[Any] | None:
    if not isinstance(messages, list):
        return None
    prefix: list[Any] = []
    for message in messages:
        if not isinstance(message, dict):
            return None
        role = message.get("role")
        prefix.append([role, _content_key(message.get("content"))])
        if role not in LEADING_ROLES:
            break  # the first message after the system prompt ends the prefix (normally the user's)
    return prefix or None


def _content_key(content: Any) -> Any:
    """Text as is; media parts as the digest of their URL; other parts by their type."""
    if not isinstance(content, list):
        return content
    parts = []
    for part in content:
        if not isinstance(part, dict):
            parts.append(repr(part))
            continue
        kind = part.get("type")
        if kind == "text":
            parts.append(["text", part.get("text")])
        elif kind in ("image_url", "video_url", "input_audio"):
            source = part.get(kind)
            url = source.get("url") if isinstance(source, dict) else source
            parts.append([kind, _digest(str(url).encode())])
        else:
            parts.append([str(kind)])
    return parts


def _completion_prefix(prompt: Any) -> Any:
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of prompts: the first one's
    if isinstance(prompt, str):
        return ["text", prompt[:PREFIX_CHARS]] if prompt else None
    if isinstance(prompt, list) and prompt:
        return ["ids", prompt[:PREFIX_TOKENS]]
    return None


def _point(label: str) -> int:
    return int.from_bytes(hashlib.blake2b(label.encode(), digest_size=8).digest(), "big")


class HashRing:
    """Consistent hashing: every member owns VIRTUAL_NODES points of a 64-bit ring; a key belongs to the
    first point clockwise from its own hash. ``preference`` lists every member in ring order from there,
    the owner first, so a fallback is as stable as the owner."""

    def __init__(self, members: Iterable[str] = (), virtual_nodes: int = VIRTUAL_NODES):
        self.members = frozenset(members)
        points = sorted((_point(f"{member}#{i}"), member) for member in self.members for i in range(virtual_nodes))
        self._hashes = [point for point, _ in points]
        self._owners = [member for _, member in points]

    def preference(self, key: str) -> list[str]:
        """All members, the key's owner first, then the next distinct owners clockwise."""
        if not self._hashes:
            return []
        start = bisect.bisect_right(self._hashes, _point(key))
        order: list[str] = []
        seen: set[str] = set()
        for offset in range(len(self._owners)):
            member = self._owners[(start + offset) % len(self._owners)]
            if member not in seen:
                seen.add(member)
                order.append(member)
                if len(order) == len(self.members):
                    break
        return order

    def owner(self, key: str) -> str | None:
        order = self.preference(key)
        return order[0] if order else None


# -- the routers of this process, for the ingress's /health and /metrics -------------------------------
_routers: dict[str, Any] = {}
_routers_lock = threading.Lock()


def register_router(app_name: str, router: Any) -> None:
    """Called by a Ray Serve request router (server/ray_router.py) when Ray creates it in this process."""
    with _routers_lock:
        _routers[app_name] = router


def live_replicas(app_name: str) -> list[str]:
    """Ids of the replicas the router of ``app_name`` in this process routes to ([] before its first request)."""
    router = _router(app_name)
    return sorted(replica_id.unique_id for replica_id in list(router.curr_replicas)) if router else []


def queued_requests(app_name: str) -> int:
    """Requests of ``app_name`` waiting in this process's router for a replica that is not saturated."""
    router = _router(app_name)
    return router.num_pending_requests if router else 0


def _router(app_name: str) -> Any:
    with _routers_lock:
        return _routers.get(app_name)
