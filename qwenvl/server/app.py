"""The FastAPI application: OpenAI-compatible routes over one model and its batching engine."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.types import Receive, Scope, Send

from .. import __version__
from ..api import Model
from ..engine.prompt import Prompt
from .errors import RETRY_AFTER_S, APIError, APIKeyMiddleware, BodyLimitMiddleware, install_error_handlers
from .prompts import PromptBuilder, refuse_unsupported
from .protocol import protocol_class
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
from .streaming import SSE_HEADERS, ResponseMeta, chat_completion, collect, stream_events, text_completion

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody} for status in (400, 401, 408, 413, 429, 500, 503)
}


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

        engine = BatchEngine(model, max_batch=max_batch, max_waiting=settings.max_waiting)
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
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes, timeout=settings.body_timeout)
    app.add_middleware(APIKeyMiddleware, api_key=settings.api_key)  # added last: runs first

    async def answer(
        request: Request, body: SamplingFields, prompt: Prompt, requested: int | None, meta: ResponseMeta
    ) -> JSONResponse | StreamingResponse:
        sampling = builder.sampling(body, len(prompt.input_ids), requested)
        handle = await admitted(engine.submit(prompt, **sampling))
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return _CancellingStream(stream_events(request, handle, meta, include_usage), handle)
        result = await collect(request, handle)
        build = chat_completion if meta.kind == "chat" else text_completion
        return JSONResponse(build(meta, result))

    async def admitted(handle: Any) -> Any:
        """The handle once the engine has taken it into its batch; 503 when no slot frees in time."""
        if not await handle.wait_dequeued(settings.queue_timeout):
            handle.cancel()
            raise APIError(
                503,
                f"the server is busy: no batch slot came free within {settings.queue_timeout:g} s "
                "(--queue-timeout); try again later",
                code="queue_timeout",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )
        return handle

    @app.post("/v1/chat/completions", response_model=ChatCompletion, responses=ERROR_RESPONSES)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        """Chat with text, images (``image_url``) and videos (``video_url``); ``stream`` for SSE chunks."""
        refuse_unsupported(body)
        prompt = await run_in_threadpool(builder.chat_prompt, body)
        requested = body.max_completion_tokens or body.max_tokens
        return await answer(request, body, prompt, requested, ResponseMeta(settings.model_id, "chat"))

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

    return app


def server_config(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> Any:
    """uvicorn's Config for ``app`` under its settings' connection limits: header deadline, keep-alive
    timeout and concurrency limit (the body deadline is the app's own middleware)."""
    import uvicorn

    settings: ServerSettings = app.state.settings
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        lifespan="on",
        timeout_graceful_shutdown=5,
        timeout_keep_alive=settings.keep_alive_timeout,
        limit_concurrency=settings.limit_concurrency,
        http=protocol_class(settings.header_timeout),
    )


def run_server(app: FastAPI, host: str, port: int, log_level: str = "info") -> None:
    """Serve ``app`` until interrupted (Ctrl-C ends the open streams, then the engine)."""
    import uvicorn

    server = uvicorn.Server(server_config(app, host, port, log_level))
    try:
        server.run()
    except KeyboardInterrupt:  # the signal uvicorn re-raises after its graceful shutdown (as uvicorn.run)
        pass
    if not server.started:
        raise SystemExit(3)  # uvicorn's STARTUP_FAILURE, as uvicorn.run exits
