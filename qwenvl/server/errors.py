"""OpenAI-style error bodies, the exception handlers that produce them, and the two guard middlewares
(API key; body size and read deadline) that answer before a request reaches a route."""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import BusyError, QwenVLError
from .ui import is_ui_path

log = logging.getLogger("qwenvl.server")

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}
OPEN_PATHS = ("/health",)  # with the chat page (is_open_path), what an --api-key leaves open


class APIError(Exception):
    """An error the server answers with: HTTP status, one-line message, the offending field."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers


def error_body(status: int, message: str, param: str | None = None, code: str | int | None = None) -> dict[str, Any]:
    kind = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(
    status: int,
    message: str,
    param: str | None = None,
    code: str | int | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


RETRY_AFTER_S = 5  # the Retry-After of a 429 (queue full) or a 503 (no batch slot in time)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(BusyError, _busy_error)
    app.add_exception_handler(QwenVLError, _user_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)


def path_redactor(model_source: str, model_id: str) -> Callable[[str], str]:
    """A function that takes this machine's paths out of a message meant for clients: the model file
    (its served name instead), its folder, the cache and the home directory (docs/serve.md, "Errors")."""
    from ..defaults import cache_dir

    source = Path(model_source)
    pairs = {str(source): model_id, str(source.absolute()): model_id, str(source.resolve()): model_id}
    for folder, label in ((source.parent, "<model folder>"), (cache_dir(), "<cache>"), (Path.home(), "~")):
        for spelled in {str(folder), str(folder.absolute()), str(folder.resolve())}:
            if spelled not in ("/", "."):
                pairs.setdefault(spelled, label)
    ordered = sorted(pairs, key=len, reverse=True)  # the longest (most specific) first
    # a file:// URL is the client's own words: left as it was sent
    pattern = re.compile("(?<!file://)(?:" + "|".join(re.escape(path) for path in ordered) + ")")

    def redact(message: str) -> str:
        return pattern.sub(lambda match: pairs[match.group(0)], message)

    return redact


def public_message(request: Request | None, message: str) -> str:
    """``message`` without this machine's paths (the app's redactor); the original is logged here."""
    redact = getattr(request.app.state, "redact", None) if request is not None else None
    public = redact(message) if redact is not None else message
    if public != message:
        log.info("error answered as %r: %s", public, message)
    return public


async def _api_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, APIError)
    message = public_message(request, error.message)
    return error_response(error.status, message, error.param, error.code, error.headers)


async def _user_error(request: Request, error: Exception) -> JSONResponse:
    return error_response(400, public_message(request, " ".join(str(error).split()) or type(error).__name__))


async def _busy_error(request: Request, error: Exception) -> JSONResponse:
    return error_response(429, str(error), code="queue_full", headers={"Retry-After": str(RETRY_AFTER_S)})


async def _validation_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, RequestValidationError)
    first = error.errors()[0] if error.errors() else {"loc": (), "msg": "invalid request"}
    if first.get("type") == "json_invalid":
        return error_response(400, f"invalid JSON body: {first.get('ctx', {}).get('error', first['msg'])}")
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(location) or None
    message = f"{param}: {first['msg']}" if param else str(first["msg"])
    more = len(error.errors()) - 1
    return error_response(400, message + (f" (and {more} more problem(s))" if more > 0 else ""), param)


async def _http_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, StarletteHTTPException)
    return error_response(error.status_code, str(error.detail))


async def _unexpected_error(request: Request, error: Exception) -> JSONResponse:
    log.exception("unexpected error on %s %s", request.method, request.url.path)
    return error_response(500, f"internal error: {type(error).__name__}")


class APIKeyMiddleware:
    """``Authorization: Bearer KEY`` on every route but /health and the chat page's static files (the docs
    and the OpenAPI schema included) when the server has a key; 401 otherwise. The scheme name is
    case-insensitive (RFC 7235). The page holds no secret: it asks the user for the key."""

    def __init__(self, app: ASGIApp, api_key: str | None):
        self.app = app
        self.expected = api_key.encode() if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.expected is None or scope["type"] != "http" or is_open_path(scope["path"]):
            return await self.app(scope, receive, send)
        if not secrets.compare_digest(bearer_token(dict(scope["headers"]).get(b"authorization", b"")), self.expected):
            response = error_response(
                401,
                "invalid or missing API key (send Authorization: Bearer KEY)",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
            return await response(scope, receive, send)
        return await self.app(scope, receive, send)


def is_open_path(path: str) -> bool:
    """Routes answered without the API key: /health, the chat page and its static files."""
    return path in OPEN_PATHS or is_ui_path(path)


def bearer_token(header: bytes) -> bytes:
    """The credentials of an ``Authorization: Bearer TOKEN`` header (any case of "Bearer"), else b""."""
    scheme, _, token = header.strip().partition(b" ")
    return token.strip() if scheme.lower() == b"bearer" else b""


class _TooLarge(Exception):
    pass


class BodyLimitMiddleware:
    """Reads the whole request body first, answering 413 past ``max_bytes`` and 408 (closing the connection)
    when it has not all arrived ``timeout`` seconds after the headers; then replays it to the app.

    After a 413 the rest of the body is read and dropped by uvicorn, for at most the header deadline
    (protocol.HeaderDeadlineProtocol), so the client gets to read the answer."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout: float | None = None):
        self.app = app
        self.max_bytes = max_bytes
        self.timeout = timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await self._too_large(scope, receive, send)
        try:
            async with asyncio.timeout(self.timeout):
                body = await self._read_body(receive)
        except _TooLarge:
            return await self._too_large(scope, receive, send)
        except TimeoutError:
            response = error_response(
                408,
                f"the request body did not arrive within {self.timeout:g} s (--body-timeout)",
                code="request_timeout",
                headers={"Connection": "close"},
            )
            return await response(scope, receive, send)
        if body is None:  # the client went away
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: the client's disconnect, when it comes
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _read_body(self, receive: Receive) -> bytes | None:
        chunks: list[bytes] = []
        total = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            total += len(chunks[-1])
            if total > self.max_bytes:
                raise _TooLarge
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit_mb = self.max_bytes / 2**20
        await error_response(413, f"request body larger than the {limit_mb:g} MiB limit (--max-body-mb)")(
            scope, receive, send
        )
