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

from ..engine.generate import TokenLogprob
from ..tools import ToolCallParser, ToolDelta, parse_tool_calls
from .errors import RETRY_AFTER_S, APIError, error_body, public_message
from .output import CompletionLogprobs, chat_logprobs, tool_call_delta

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
    busy: bool = False  # the error is the KV cache's budget (a 503 to retry), not a fault
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None

    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


@dataclass
class ResponseMeta:
    """The fields every object of one response shares, and how to render its answer."""

    model: str
    kind: str  # "chat" or "text"
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))
    # the ``qwenvl`` extension object of the finished answer (images and grounding; docs/serve.md)
    extension: Callable[[Answer], dict[str, Any]] | None = None
    tokenizer: Any = None  # for logprobs: token texts and bytes
    tools: frozenset[str] | None = None  # chat: parse hermes tool calls (to these tools) out of the text
    logprobs: bool = False  # include the tokens' logprobs
    echo: str | None = None  # completions: the prompt's text, returned before the answer
    prompt_ids: list[int] | None = None  # completions with echo and logprobs: the prompt's tokens
    observer: Any = None  # metrics: ``event(event)`` for each engine event, ``finish(answer)`` at the end

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


async def collect(request: Request, handle: Any, meta: ResponseMeta | None = None) -> Answer:
    """The whole answer of a non-streamed request."""
    watcher = asyncio.create_task(cancel_on_disconnect(request, handle))
    try:
        return await _collect(handle, meta)
    finally:
        watcher.cancel()


def _failure(answer: Answer) -> APIError:
    """The error a failed answer gets: a 503 to retry when the KV cache's budget ran out, else a 500."""
    message = f"generation failed: {answer.error or 'unknown error'}"
    if answer.busy:
        return APIError(503, message, code="kv_cache_full", headers={"Retry-After": str(RETRY_AFTER_S)})
    return APIError(500, message)


class Choices:
    """The engine handles of one request's choices, cancelled together."""

    def __init__(self, handles: list[Any]):
        self.handles = handles

    def cancel(self) -> None:
        for handle in self.handles:
            handle.cancel()


async def collect_choices(request: Request, handles: list[Any], metas: list[ResponseMeta]) -> list[Answer]:
    """The whole answers of a non-streamed request's choices (``n``)."""
    watcher = asyncio.create_task(cancel_on_disconnect(request, Choices(handles)))
    try:
        return list(await asyncio.gather(*(_collect(h, m) for h, m in zip(handles, metas))))
    finally:
        watcher.cancel()
        Choices(handles).cancel()


async def _collect(handle: Any, meta: ResponseMeta | None) -> Answer:
    """One engine request's whole answer: its events folded, its failure raised as the API error."""
    answer = Answer(prompt_tokens=handle.prompt_tokens)
    pieces = []
    try:
        async for event in handle.aevents():
            pieces.append(event.text)
            _fold(answer, event, meta)
    finally:
        handle.cancel()
        answer.text = "".join(pieces)
        if meta is not None and meta.observer is not None:
            meta.observer.finish(answer)
    if answer.finish_reason == "error":
        raise _failure(answer)
    return answer


def _fold(answer: Answer, event: Any, meta: ResponseMeta | None) -> None:
    answer.token_ids.extend(event.token_ids)
    answer.prompt_tokens = event.prompt_tokens
    answer.completion_tokens = event.completion_tokens
    if getattr(event, "logprobs", None):
        answer.logprobs.extend(event.logprobs)
    if getattr(event, "prompt_logprobs", None) is not None:
        answer.prompt_logprobs = event.prompt_logprobs
    if event.finish_reason is not None:
        answer.finish_reason = event.finish_reason
        answer.error = event.error
        answer.busy = getattr(event, "busy", False)
    if meta is not None and meta.observer is not None:
        meta.observer.event(event)


def chat_completion(meta: ResponseMeta, answer: Answer) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": answer.text}
    finish = answer.finish_reason
    if meta.tools is not None:
        message["content"], calls, _ = parse_tool_calls(answer.text, finish, bare_names=meta.tools)
        if calls:
            message["tool_calls"] = [call.to_openai() for call in calls]
            finish = "tool_calls" if finish == "stop" else finish
    logprobs = None
    if meta.logprobs:
        logprobs = {"content": chat_logprobs(meta.tokenizer, answer.logprobs), "refusal": None}
    choice = {"index": 0, "message": message, "finish_reason": finish, "logprobs": logprobs}
    return {**meta.header("chat.completion"), "choices": [choice], "usage": answer.usage(), **_extension(meta, answer)}


def _extension(meta: ResponseMeta, answer: Answer) -> dict[str, Any]:
    return {"qwenvl": meta.extension(answer)} if meta.extension is not None else {}


def text_completion(meta: ResponseMeta, answer: Answer) -> dict[str, Any]:
    logprobs = None
    if meta.logprobs:
        builder = CompletionLogprobs(meta.tokenizer)
        parts = [builder.piece(answer.prompt_logprobs, meta.prompt_ids)] if _echo_logprobs(meta, answer) else []
        parts.append(builder.piece(answer.logprobs, [entry.token_id for entry in answer.logprobs]))
        logprobs = {key: [item for part in parts for item in part[key]] for key in parts[0]}
    text = (meta.echo or "") + answer.text
    choice = {"index": 0, "text": text, "finish_reason": answer.finish_reason, "logprobs": logprobs}
    return {**meta.header("text_completion"), "choices": [choice], "usage": answer.usage()}


def _echo_logprobs(meta: ResponseMeta, answer: Answer) -> bool:
    return meta.echo is not None and meta.prompt_ids is not None and answer.prompt_logprobs is not None


async def stream_events(request: Request, handle: Any, meta: ResponseMeta, include_usage: bool) -> AsyncIterator[str]:
    """SSE lines for one streamed request: content chunks, the finish chunk, usage if asked, [DONE]."""
    async for line in stream_choices(request, [handle], [meta], include_usage):
        yield line


async def stream_choices(
    request: Request, handles: list[Any], metas: list[ResponseMeta], include_usage: bool
) -> AsyncIterator[str]:
    """SSE lines for the choices of one streamed request (``n``; one handle and meta per choice, the
    choice's index on its chunks), interleaved as their events come; usage (all choices) if asked, [DONE]."""
    watchers = [asyncio.create_task(cancel_on_disconnect(request, Choices(handles)))]
    answers = [Answer(prompt_tokens=handle.prompt_tokens) for handle in handles]
    builders = [(_ChatChunks if m.kind == "chat" else _TextChunks)(m, i) for i, m in enumerate(metas)]
    events: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
    pumps = [asyncio.create_task(_pump(i, handle, events)) for i, handle in enumerate(handles)]
    try:
        for chunks in builders:
            for payload in chunks.start():
                yield _sse(payload)
        running = len(handles)
        while running:
            index, event = await events.get()
            meta, answer, chunks = metas[index], answers[index], builders[index]
            _fold(answer, event, meta)
            answer.text += event.text
            if event.finish_reason is not None:
                running -= 1
            if event.finish_reason == "cancelled":
                return
            for payload in chunks.event(event, answer):
                yield _sse(payload)
            if event.finish_reason == "error":
                status = 503 if getattr(event, "busy", False) else 500
                message = public_message(request, f"generation failed: {event.error or 'unknown error'}")
                yield _sse(error_body(status, message))
            elif event.finish_reason is not None:
                finish = chunks.finish(event.finish_reason)
                finish[-1].update(_extension(meta, answer))
                for payload in finish:
                    yield _sse(payload)
        if include_usage:
            yield _sse({**metas[0].header(_chunk_object(metas[0])), "choices": [], "usage": usage_of(answers)})
        yield DONE
    finally:
        for task in watchers + pumps:
            task.cancel()
        for handle, meta, answer in zip(handles, metas, answers):
            handle.cancel()
            if meta.observer is not None:
                meta.observer.finish(answer)


async def _pump(index: int, handle: Any, events: asyncio.Queue) -> None:
    async for event in handle.aevents():
        events.put_nowait((index, event))


def usage_of(answers: list[Answer]) -> dict[str, int]:
    """The usage of a request's choices: the prompt once, every choice's tokens."""
    completion = sum(answer.completion_tokens for answer in answers)
    prompt = answers[0].prompt_tokens
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def choices_response(build: Callable[[ResponseMeta, Answer], dict[str, Any]], metas: list[ResponseMeta],
                     answers: list[Answer]) -> dict[str, Any]:  # fmt: skip
    """One response holding each choice's answer (``n``), numbered in order; usage over all."""
    responses = [build(meta, answer) for meta, answer in zip(metas, answers)]
    choices = []
    for index, response in enumerate(responses):
        choices += [{**choice, "index": index} for choice in response["choices"]]
    return {**responses[0], "choices": choices, "usage": usage_of(answers)}


class _ChatChunks:
    """``chat.completion.chunk`` payloads: content deltas, tool-call deltas (parsed as the text comes),
    logprobs on the chunk of the tokens they belong to."""

    def __init__(self, meta: ResponseMeta, index: int = 0):
        self.meta, self.index = meta, index
        self.parser = ToolCallParser(bare_names=meta.tools) if meta.tools is not None else None

    def start(self) -> list[dict[str, Any]]:
        return [self._chunk({"role": "assistant", "content": ""})]

    def event(self, event: Any, answer: Answer) -> list[dict[str, Any]]:
        if self.parser is None:
            deltas = [{"content": event.text}] if event.text else []
        else:
            deltas = self._deltas(self.parser.feed(event.text)) if event.text else []
            if event.finish_reason not in (None, "error", "cancelled"):
                deltas += self._deltas(self.parser.finish(event.finish_reason))
        payloads = [self._chunk(delta) for delta in deltas]
        if self.meta.logprobs and event.logprobs:
            if not payloads:
                payloads.append(self._chunk({"content": ""}))
            content = chat_logprobs(self.meta.tokenizer, event.logprobs)
            payloads[0]["choices"][0]["logprobs"] = {"content": content, "refusal": None}
        return payloads

    def finish(self, reason: str) -> list[dict[str, Any]]:
        if self.parser is not None and self.parser.calls and not self.parser.malformed and reason == "stop":
            reason = "tool_calls"
        return [self._chunk({}, reason)]

    def _deltas(self, parsed: list[ToolDelta]) -> list[dict[str, Any]]:
        out = []
        for delta in parsed:
            if delta.content is not None:
                out.append({"content": delta.content})
            else:
                out.append({"tool_calls": [tool_call_delta(delta)]})
        return out

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        choice = {"index": self.index, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        return {**self.meta.header("chat.completion.chunk"), "choices": [choice]}


class _TextChunks:
    """``text_completion`` payloads: the echoed prompt first (with its logprobs once the first event
    brings them), then the text of each event with its tokens' logprobs."""

    def __init__(self, meta: ResponseMeta, index: int = 0):
        self.meta, self.index = meta, index
        self.logprobs = CompletionLogprobs(meta.tokenizer) if meta.logprobs else None
        self.echo_pending = meta.echo is not None

    def start(self) -> list[dict[str, Any]]:
        if self.echo_pending and not (self.meta.logprobs and self.meta.prompt_ids is not None):
            self.echo_pending = False
            return [self._chunk(self.meta.echo or "", None)]
        return []

    def event(self, event: Any, answer: Answer) -> list[dict[str, Any]]:
        payloads = []
        if self.echo_pending and answer.prompt_logprobs is not None:
            self.echo_pending = False
            assert self.logprobs is not None and self.meta.prompt_ids is not None
            payloads.append(
                self._chunk(self.meta.echo or "", self.logprobs.piece(answer.prompt_logprobs, self.meta.prompt_ids))
            )
        entries = event.logprobs or []
        if event.text or entries:
            piece = self.logprobs.piece(entries, [e.token_id for e in entries]) if self.logprobs else None
            payloads.append(self._chunk(event.text, piece))
        return payloads

    def finish(self, reason: str) -> list[dict[str, Any]]:
        return [self._chunk("", None, reason)]

    def _chunk(self, text: str, logprobs: Any, finish_reason: str | None = None) -> dict[str, Any]:
        choice = {"index": self.index, "text": text, "finish_reason": finish_reason, "logprobs": logprobs}
        return {**self.meta.header("text_completion"), "choices": [choice]}


def _chunk_object(meta: ResponseMeta) -> str:
    return "chat.completion.chunk" if meta.kind == "chat" else "text_completion"


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"
