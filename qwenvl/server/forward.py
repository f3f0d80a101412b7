"""Carrying HTTP requests to a replica's own ASGI app and its answers back, as plain picklable values.

A replica of `qwenvl serve --ray` runs the whole app of ``create_app`` (every route, middleware and
rule) in its own process; the ingress in front of the replicas hands it a ``ForwardedRequest`` and
gets back the ASGI messages the app sent (``http.response.start``, then ``http.response.body``
pieces). ``serve_forwarded`` drives the app for one request; ``AppLifespan`` runs the app's start-up
and shut-down (its batching engine); ``merge_metrics`` joins the replicas' Prometheus texts into one,
each sample labelled with its replica. No Ray here (qwenvl/deploy.py has that).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from starlette.types import ASGIApp, Message

from .errors import error_body

REPLICA_HEADER = "x-qwenvl-replica"  # names the replica that answered, on every forwarded response
ASGI_VERSION = {"version": "3.0", "spec_version": "2.3"}
SHUTDOWN_WAIT_S = 10.0  # how long an app may take to wind down one request after its client left


@dataclass
class ForwardedRequest:
    """One HTTP request, whole (its body already read), in a form that crosses processes.

    ``route_key``: the key the replica router places it by (routing.prefix_key); ``target``: the id of
    the one replica that must answer (the ingress's per-replica /health and /metrics calls)."""

    method: str
    path: str
    query_string: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    client: tuple[str, int] | None = None
    route_key: str | None = None
    target: str | None = None

    @classmethod
    def from_scope(cls, scope: dict[str, Any], body: bytes, **routing: Any) -> ForwardedRequest:
        client = scope.get("client")
        return cls(
            method=scope["method"],
            path=app_path(scope),
            query_string=scope.get("query_string", b""),
            headers=[(bytes(name), bytes(value)) for name, value in scope.get("headers", [])],
            body=body,
            client=tuple(client) if client else None,
            **routing,
        )

    def scope(self) -> dict[str, Any]:
        return {
            "type": "http",
            "asgi": dict(ASGI_VERSION),
            "http_version": "1.1",
            "method": self.method,
            "scheme": "http",
            "path": self.path,
            "raw_path": self.path.encode(),
            "root_path": "",
            "query_string": self.query_string,
            "headers": list(self.headers),
            "client": self.client,
            "server": None,
            "state": {},
        }


def app_path(scope: dict[str, Any]) -> str:
    """The request's path below the prefix the app is mounted at (``serve run --route-prefix``)."""
    path, root = scope["path"], scope.get("root_path", "")
    return (path[len(root) :] or "/") if root and path.startswith(root) else path


async def serve_forwarded(
    app: ASGIApp, request: ForwardedRequest, extra_headers: list[tuple[bytes, bytes]] = ()
) -> AsyncIterator[Message]:
    """The ASGI messages ``app`` sends for ``request``, ``extra_headers`` added to the response start.

    The app sees the client as connected until this generator is closed or cancelled (the client went
    away, or the caller stopped reading); then it sees ``http.disconnect``, which cancels its engine
    request, and it gets SHUTDOWN_WAIT_S to finish before it is cancelled too."""
    outbox: asyncio.Queue[Message | None] = asyncio.Queue()
    gone = asyncio.Event()
    body_given = False

    async def receive() -> Message:
        nonlocal body_given
        if not body_given:
            body_given = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        if gone.is_set():
            return  # nobody is listening: the app's disconnect watcher is ending the request
        if message["type"] == "http.response.start":
            message = {**message, "headers": list(message.get("headers", [])) + list(extra_headers)}
        await outbox.put(message)

    async def run() -> None:
        try:
            await app(request.scope(), receive, send)
        finally:
            outbox.put_nowait(None)

    task = asyncio.create_task(run())
    started = False
    try:
        while (message := await outbox.get()) is not None:
            started = started or message["type"] == "http.response.start"
            yield message
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                return
        if not started:  # the app ended without an answer (a fault of the app itself)
            for message in error_messages(500, "internal error: the replica's app gave no answer"):
                yield message
    finally:
        gone.set()
        await _settle(task)


def error_messages(status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None):
    """The two ASGI messages of an OpenAI-style JSON error response."""
    body = json.dumps(error_body(status, message, code=code), ensure_ascii=False).encode()
    fields = {"content-type": "application/json", "content-length": str(len(body)), **(headers or {})}
    start = [(name.encode(), value.encode()) for name, value in fields.items()]
    return [
        {"type": "http.response.start", "status": status, "headers": start},
        {"type": "http.response.body", "body": body, "more_body": False},
    ]


async def _settle(task: asyncio.Task) -> None:
    """Let the app finish its request (it has been told the client is gone); cancel it past the wait."""
    done, _ = await asyncio.wait({task}, timeout=SHUTDOWN_WAIT_S)
    if not done:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
    elif not task.cancelled():
        task.exception()  # retrieved: a failure after the answer was sent is not worth a warning


class AppLifespan:
    """Runs an ASGI app's lifespan protocol (its start-up and shut-down handlers) outside a web server."""

    def __init__(self, app: ASGIApp):
        self.app = app
        self._inbox: asyncio.Queue[Message] = asyncio.Queue()
        self._replies: asyncio.Queue[Message] = asyncio.Queue()
        self._task: asyncio.Task | None = None

    async def startup(self) -> None:
        scope = {"type": "lifespan", "asgi": dict(ASGI_VERSION), "state": {}}
        self._task = asyncio.create_task(self.app(scope, self._inbox.get, self._replies.put))
        await self._step("startup")

    async def shutdown(self) -> None:
        if self._task is None or self._task.done():
            return
        await self._step("shutdown")
        await self._task

    async def _step(self, phase: str) -> None:
        await self._inbox.put({"type": f"lifespan.{phase}"})
        reply = await self._replies.get()
        if reply["type"] != f"lifespan.{phase}.complete":
            raise RuntimeError(f"the app's {phase} failed: {reply.get('message') or reply['type']}")


def sse_error(message: str, status: int = 503, code: str | None = None) -> bytes:
    """An OpenAI-style error as one server-sent event (the ``openai`` client raises it as an APIError)."""
    payload = json.dumps(error_body(status, message, code=code), ensure_ascii=False, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()


# -- /metrics of many replicas -------------------------------------------------------------------------
_FAMILY_LINE = re.compile(r"^# (HELP|TYPE|UNIT) (\S+)")
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*?\})?(\s.*)$")
_SUFFIXES = ("_bucket", "_count", "_sum", "_total", "_created", "_info", "_gcount", "_gsum")


def merge_metrics(texts: dict[str, str], label: str = "replica") -> str:
    """Prometheus text expositions of several replicas as one: each family's HELP / TYPE once, then the
    samples of every replica, each carrying ``label="<replica id>"``."""
    order: list[str] = []
    meta: dict[str, list[str]] = {}
    samples: dict[str, list[str]] = {}
    for replica, text in texts.items():
        family = None
        for line in text.splitlines():
            if not line.strip() or line.startswith("# EOF"):
                continue
            head = _FAMILY_LINE.match(line)
            if head:
                family = head.group(2)
                if family not in meta:
                    order.append(family)
                    meta[family], samples[family] = [], []
                if line not in meta[family]:
                    meta[family].append(line)
                continue
            if line.startswith("#"):
                continue
            sample = _SAMPLE.match(line)
            if not sample:
                continue
            name = sample.group(1)
            owner = family if family and _belongs(name, family) else name
            if owner not in meta:
                order.append(owner)
                meta[owner], samples[owner] = [], []
            samples[owner].append(_relabel(sample, label, replica))
    lines = [line for family in order for line in meta[family] + samples[family]]
    return "\n".join(lines) + "\n" if lines else ""


def _belongs(name: str, family: str) -> bool:
    return name == family or any(name == family + suffix for suffix in _SUFFIXES)


def _relabel(sample: re.Match, label: str, value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    labels = sample.group(2)
    inner = f'{label}="{escaped}"' + ("," + labels[1:-1] if labels and labels[1:-1].strip() else "")
    return f"{sample.group(1)}{{{inner}}}{sample.group(3)}"
