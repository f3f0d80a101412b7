"""Media URLs of a request, fetched by the server under its rules, so the model only ever sees bytes.

- ``data:`` URIs are decoded (base64 only);
- ``http(s)://`` URLs are fetched only from allowed domains, with a timeout and a size cap; redirects are
  followed by hand (at most ``MAX_REDIRECTS``), each hop's host must be allowed too, and every connection
  goes to an address checked at connect time: a host that resolves to a private, loopback, link-local,
  multicast or reserved address is refused, whatever its name;
- ``file://`` URLs only name files under ``--allowed-local-media-path``, symlinks resolved first.

Anything else is refused: the model never fetches a URL or opens a path itself.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import time
import urllib.parse
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

from ..chat import MEDIA_TYPES
from ..errors import MediaError, RequestError
from ..media.image import _decode_data_uri, _one_line, _short
from .settings import ServerSettings

MAX_REDIRECTS = 5
REDIRECT_STATUSES = (301, 302, 303, 307, 308)
_CHUNK_BYTES = 1 << 16


class ForbiddenAddress(MediaError):
    """A media host resolved to an address the server does not fetch from."""


def is_public_address(ip: str) -> bool:
    """True for globally routable unicast addresses (IPv4-mapped IPv6 judged as the IPv4 inside)."""
    address = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_global and not address.is_multicast


def connect_public(address: tuple[str, int], timeout: float | None, source_address: Any = None) -> socket.socket:
    """``socket.create_connection`` that refuses hosts resolving to non-public addresses.

    The check and the connect use the same resolved addresses, so DNS cannot change the answer in between.
    """
    host, port = address
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    for *_, sockaddr in infos:
        if not is_public_address(sockaddr[0]):
            raise ForbiddenAddress(f"{host} resolves to {sockaddr[0]}, a private or local address: refused")
    error: OSError = OSError(f"no address for {host}")
    for family, kind, proto, _, sockaddr in infos:
        sock = socket.socket(family, kind, proto)
        sock.settimeout(timeout)
        try:
            sock.connect(sockaddr)
            return sock
        except OSError as failure:
            sock.close()
            error = failure
    raise error


class _CheckedHTTPConnection(http.client.HTTPConnection):
    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._create_connection = connect_public  # the socket factory http.client connects with


class _CheckedHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._create_connection = connect_public


class MediaFetcher:
    """Resolves the media of chat messages into bytes, under one server's rules."""

    def __init__(self, settings: ServerSettings):
        self.settings = settings

    # -- messages -----------------------------------------------------------------------------
    def check_counts(self, messages: list[dict[str, Any]]) -> None:
        """Refuse more images / videos than ``--limit-mm-per-prompt`` allows (before fetching any)."""
        counts = Counter(part["type"] for part in media_parts(messages))
        for kind, count in counts.items():
            limit = self.settings.mm_limits.get(kind, 0)
            if count > limit:
                raise RequestError(f"too many {kind}s: {count} in the prompt, at most {limit} allowed")

    def resolve_messages(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Normalized messages (``chat.normalize_messages``) with every media source replaced by its bytes."""
        self.check_counts(messages)
        resolved = []
        for message in messages:
            content = message.get("content")
            if isinstance(content, list):
                message = {**message, "content": [self._resolve_part(part) for part in content]}
            resolved.append(message)
        return resolved

    def _resolve_part(self, part: dict[str, Any]) -> dict[str, Any]:
        kind = part.get("type")
        if kind not in MEDIA_TYPES:
            return part
        return {**part, kind: self.fetch(part[kind])}

    # -- one URL ------------------------------------------------------------------------------
    def fetch(self, url: Any) -> bytes:
        """The bytes a media URL names, or MediaError with a one-line reason."""
        if not isinstance(url, str):
            raise MediaError(f"a media URL must be a string, got {type(url).__name__}")
        scheme = url.split(":", 1)[0].strip().lower() if ":" in url else ""
        if scheme == "data":
            return _decode_data_uri(url, self.settings.max_media_bytes)
        if scheme in ("http", "https"):
            return self._download(url)
        if scheme == "file":
            return self._read_local(url)
        raise MediaError(f"{_short(url)}: unsupported media URL: use data:, http(s):// or file://")

    def _read_local(self, url: str) -> bytes:
        root = self.settings.allowed_local_media_path
        label = _short(url)
        if root is None:
            raise MediaError(f"{label}: local files are disabled (the server has no --allowed-local-media-path)")
        parsed = urllib.parse.urlsplit(url)
        if parsed.netloc not in ("", "localhost"):
            raise MediaError(f"{label}: file:// URLs must name a local file")
        try:
            path = Path(urllib.request.url2pathname(parsed.path)).resolve()
        except (OSError, RuntimeError, ValueError) as error:
            raise MediaError(f"{label}: cannot resolve the path ({_one_line(error)})") from None
        if not path.is_relative_to(root):
            raise MediaError(f"{label}: outside the allowed local media path")
        if not path.is_file():
            raise MediaError(f"{label}: no such file")
        if path.stat().st_size > self.settings.max_media_bytes:
            raise MediaError(f"{label}: larger than the {self.settings.max_media_bytes}-byte limit")
        try:
            return path.read_bytes()
        except OSError as error:
            raise MediaError(f"{label}: cannot read ({_one_line(error)})") from None

    def _download(self, url: str) -> bytes:
        label = _short(url)
        timeout = self.settings.media_timeout
        deadline = time.monotonic() + timeout
        try:
            for _ in range(MAX_REDIRECTS + 1):
                status, location, body = self._get(url, deadline)
                if status not in REDIRECT_STATUSES:
                    return body
                url = urllib.parse.urljoin(url, location)
        except TimeoutError:
            raise MediaError(f"{label}: timed out after {timeout:g} s") from None
        except MediaError as error:
            raise MediaError(f"{label}: {error}") from None
        except (OSError, http.client.HTTPException, ValueError) as error:
            raise MediaError(f"{label}: cannot download ({_one_line(error)})") from None
        raise MediaError(f"{label}: more than {MAX_REDIRECTS} redirects")

    def _get(self, url: str, deadline: float) -> tuple[int, str, bytes]:
        """One GET: (status, redirect location, body). Only a 200's body is read."""
        parsed = urllib.parse.urlsplit(url)
        scheme, host = parsed.scheme.lower(), (parsed.hostname or "")
        if scheme not in ("http", "https"):
            raise MediaError(f"redirected to a {scheme or 'relative'} URL: refused")
        if parsed.username is not None or parsed.password is not None:
            raise MediaError("URLs with credentials are refused")
        if not self._domain_allowed(host):
            raise MediaError(f"the domain {host or '(none)'} is not allowed (--allowed-media-domains)")
        connection_class = _CheckedHTTPSConnection if scheme == "https" else _CheckedHTTPConnection
        remaining = _remaining(deadline)
        connection = connection_class(host, parsed.port, timeout=remaining)
        try:
            target = urllib.parse.urlunsplit(("", "", parsed.path or "/", parsed.query, ""))
            connection.request("GET", target, headers={"User-Agent": "qwenvl-server", "Accept": "*/*"})
            response = connection.getresponse()
            if response.status in REDIRECT_STATUSES:
                location = response.getheader("Location")
                if not location:
                    raise MediaError(f"HTTP {response.status} without a Location")
                return response.status, location, b""
            if response.status != 200:
                raise MediaError(f"HTTP {response.status} {response.reason}")
            return response.status, "", self._read_capped(response, deadline)
        finally:
            connection.close()

    def _read_capped(self, response: http.client.HTTPResponse, deadline: float) -> bytes:
        limit = self.settings.max_media_bytes
        declared = response.getheader("Content-Length", "")
        if declared.isdigit() and int(declared) > limit:
            raise MediaError(f"larger than the {limit}-byte limit")
        chunks, total = [], 0
        # read1 returns what has arrived: a server dripping bytes is cut at the deadline
        while chunk := response.read1(_CHUNK_BYTES):
            total += len(chunk)
            if total > limit:
                raise MediaError(f"larger than the {limit}-byte limit")
            _remaining(deadline)
            chunks.append(chunk)
        return b"".join(chunks)

    def _domain_allowed(self, host: str) -> bool:
        host = host.lower().rstrip(".")
        for allowed in self.settings.allowed_media_domains:
            if allowed.startswith("*.") and host.endswith(allowed[1:]):
                return True
            if host == allowed:
                return True
        return False


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError
    return left


def media_parts(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        part
        for message in messages
        if isinstance(message.get("content"), list)
        for part in message["content"]
        if part.get("type") in MEDIA_TYPES
    ]
