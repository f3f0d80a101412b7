"""Engine events → OpenAI responses: whole answers, or server-sent events (``chat.completion.chunk`` /
``text_completion`` chunks, then ``data: [DONE]``). Every path cancels its engine request when it ends,
and a watcher cancels it as soon as the client disconnects."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request

from .errors import APIError, error_body

DONE = "data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass
class Answer:
    """What one request produced (all its events folded together)."""

    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    token_ids: list[int] = field(default_factory=list)

    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


@dataclass
class ResponseMeta:
    """The fields every object of one response shares."""

    model: str
    kind: str  # "chat" or "text"
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))
    # the ``qwenvl`` extension object of the finished answer (images and grounding; docs/serve.md)
    extension: Callable[[Answer], dict[str, Any]] | None = None

    def __post_init__(self) -> None:
        self.id = self.id or f"{'chatcmpl' if self.kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"

    def header(self, object_name: str) -> dict[str, Any]:
        return {"id": self.id, "object": object_name, "created": self.created, "model": self.model}


async def cancel_on_disconnect(request: Request, handle: Any) -> None:
    """Wait for the client to go away, then cancel its engine request (frees its KV slots)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            handle.cancel()
            return


async def collect(request: Request, handle: Any) -> Answer:
    """The whole answer of a non-streamed request."""
    watcher = asyncio.create_task(cancel_on_disconnect(request, handle))
    answer = Answer(prompt_tokens=handle.prompt_tokens)
    pieces = []
    try:
        async for event in handle.aevents():
            pieces.append(event.text)
            _fold(answer, event)
    finally:
        watcher.cancel()
        handle.cancel()
    answer.text = "".join(pieces)
    if answer.finish_reason == "error":
        raise APIError(500, f"generation failed: {answer.error or 'unknown error'}")
    return answer


def _fold(answer: Answer, event: Any) -> None:
    answer.token_ids.extend(event.token_ids)
    answer.prompt_tokens = event.prompt_tokens
    answer.completion_tokens = event.completion_tokens
    if event.finish_reason is not None:
        answer.finish_reason = event.finish_reason
        answer.error = event.error


def chat_completion(meta: ResponseMeta, answer: Answer) -> dict[str, Any]:
    choice = {
        "index": 0,
        "message": {"role": "assistant", "content": answer.text},
        "finish_reason": answer.finish_reason,
        "logprobs": None,
    }
    return {**meta.header("chat.completion"), "choices": [choice], "usage": answer.usage(), **_extension(meta, answer)}


def _extension(meta: ResponseMeta, answer: Answer) -> dict[str, Any]:
    return {"qwenvl": meta.extension(answer)} if meta.extension is not None else {}


def text_completion(meta: ResponseMeta, answer: Answer) -> dict[str, Any]:
    choice = {"index": 0, "text": answer.text, "finish_reason": answer.finish_reason, "logprobs": None}
    return {**meta.header("text_completion"), "choices": [choice], "usage": answer.usage()}


async def stream_events(request: Request, handle: Any, meta: ResponseMeta, include_usage: bool) -> AsyncIterator[str]:
    """SSE lines for one streamed request: content chunks, the finish chunk, usage if asked, [DONE]."""
    watcher = asyncio.create_task(cancel_on_disconnect(request, handle))
    answer = Answer(prompt_tokens=handle.prompt_tokens)
    try:
        if meta.kind == "chat":
            yield _sse(_chunk(meta, {"role": "assistant", "content": ""}, None))
        async for event in handle.aevents():
            _fold(answer, event)
            answer.text += event.text
            if event.text:
                yield _sse(_chunk(meta, {"content": event.text}, None))
            if event.finish_reason == "cancelled":
                return
            if event.finish_reason == "error":
                yield _sse(error_body(500, f"generation failed: {event.error or 'unknown error'}"))
            elif event.finish_reason is not None:
                yield _sse({**_chunk(meta, {}, event.finish_reason), **_extension(meta, answer)})
        if include_usage:
            yield _sse({**meta.header(_chunk_object(meta)), "choices": [], "usage": answer.usage()})
        yield DONE
    finally:
        watcher.cancel()
        handle.cancel()


def _chunk(meta: ResponseMeta, delta: dict[str, Any], finish_reason: str | None) -> dict[str, Any]:
    if meta.kind == "chat":
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
    else:
        choice = {"index": 0, "text": delta.get("content", ""), "finish_reason": finish_reason, "logprobs": None}
    return {**meta.header(_chunk_object(meta)), "choices": [choice]}


def _chunk_object(meta: ResponseMeta) -> str:
    return "chat.completion.chunk" if meta.kind == "chat" else "text_completion"


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"
