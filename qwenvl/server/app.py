"""The FastAPI application: OpenAI-compatible routes over one model and its batching engine."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.types import Receive, Scope, Send

from .. import __version__
from ..api import Model
from ..engine.prompt import Prompt
from .errors import APIKeyMiddleware, BodyLimitMiddleware, install_error_handlers
from .prompts import PromptBuilder, refuse_unsupported
from .schemas import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    ErrorBody,
    ModelList,
    SamplingFields,
)
from .settings import ServerSettings
from .streaming import (
    SSE_HEADERS,
    Answer,
    ResponseMeta,
    chat_completion,
    collect,
    stream_events,
    text_completion,
)
from .ui import install_ui

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {status: {"model": ErrorBody} for status in (400, 401, 413, 500)}


class _CancellingStream(StreamingResponse):
    """A streamed answer that cancels its engine request however the response ends (even unstarted)."""

    def __init__(self, content: AsyncIterator[str], handle: Any):
        super().__init__(content, media_type="text/event-stream", headers=SSE_HEADERS)
        self.handle = handle

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.handle.cancel()


def create_app(model: Model, settings: ServerSettings, *, engine: Any = None, max_batch: int = 8) -> FastAPI:
    """The server app. ``engine``: a started-on-startup BatchEngine (default: a new one over ``model``)."""
    if engine is None:
        from ..engine.scheduler import BatchEngine

        engine = BatchEngine(model, max_batch=max_batch)
    builder = PromptBuilder(model, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            engine.shutdown()

    app = FastAPI(
        title="qwenvl",
        version=__version__,
        lifespan=lifespan,
        description="OpenAI-compatible chat and completions for Qwen2-VL / Qwen2.5-VL / Qwen2 on a CPU.",
    )
    app.state.engine, app.state.model, app.state.settings = engine, model, settings
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(APIKeyMiddleware, api_key=settings.api_key)  # added last: runs first

    async def answer(
        request: Request, body: SamplingFields, prompt: Prompt, requested: int | None, meta: ResponseMeta
    ) -> JSONResponse | StreamingResponse:
        sampling = builder.sampling(body, len(prompt.input_ids), requested)
        handle = engine.submit(prompt, **sampling)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return _CancellingStream(stream_events(request, handle, meta, include_usage), handle)
        result = await collect(request, handle)
        build = chat_completion if meta.kind == "chat" else text_completion
        return JSONResponse(build(meta, result))

    @app.post("/v1/chat/completions", response_model=ChatCompletion, responses=ERROR_RESPONSES)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        """Chat with text, images (``image_url``) and videos (``video_url``); ``stream`` for SSE chunks."""
        refuse_unsupported(body)
        prompt = await run_in_threadpool(builder.chat_prompt, body)
        requested = body.max_completion_tokens or body.max_tokens
        meta = ResponseMeta(settings.model_id, "chat", extension=_qwenvl_extension(model, prompt))
        return await answer(request, body, prompt, requested, meta)

    @app.post("/v1/completions", response_model=Completion, responses=ERROR_RESPONSES)
    async def completions(body: CompletionRequest, request: Request) -> Any:
        """Continue a raw prompt (a string, tokenized without a chat template, or a list of token ids)."""
        refuse_unsupported(body)
        prompt = await run_in_threadpool(builder.completion_prompt, body)
        return await answer(request, body, prompt, body.max_tokens, ResponseMeta(settings.model_id, "text"))

    @app.get("/v1/models", response_model=ModelList, responses=ERROR_RESPONSES)
    async def models() -> Any:
        card = {
            "id": settings.model_id,
            "object": "model",
            "created": settings.started,
            "owned_by": "qwenvl",
            "max_model_len": model.context,
        }
        return {"object": "list", "data": [card]}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        """``ok`` and the engine's counters (running / waiting requests, KV cache bytes, steps)."""
        return {"status": "ok", **engine.stats()}

    if settings.ui:
        install_ui(app)
    return app


def _qwenvl_extension(model: Model, prompt: Prompt) -> Callable[[Answer], dict[str, Any]]:
    """The ``qwenvl`` object of a chat answer: each image's original and resized size, and the boxes and
    points the answer names, in original-image pixels (docs/grounding.md)."""

    def build(answer: Answer) -> dict[str, Any]:
        images, boxes = model.grounding(prompt, answer.token_ids, answer.text)
        return {"images": [image.to_json() for image in images], "boxes": [box.to_json() for box in boxes]}

    return build


def run_server(app: FastAPI, host: str, port: int, log_level: str = "info") -> None:
    """Serve ``app`` until interrupted (Ctrl-C ends the open streams, then the engine)."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
