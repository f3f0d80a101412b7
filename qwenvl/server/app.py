"""The FastAPI application: OpenAI-compatible routes over one model and its batching engine."""

from __future__ import annotations

import dataclasses
import errno
import secrets
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi_offline import FastAPIOffline
from starlette.concurrency import run_in_threadpool
from starlette.types import Receive, Scope, Send

from .. import __version__
from ..api import Model
from ..engine.prompt import Prompt
from ..errors import QwenVLError
from ..tools import tool_names
from .errors import (
    RETRY_AFTER_S,
    APIError,
    APIKeyMiddleware,
    BodyLimitMiddleware,
    install_error_handlers,
    path_redactor,
)
from .metrics import HTTPMetricsMiddleware, ServerMetrics
from .prompts import OutputPlan, PromptBuilder, refuse_unsupported
from .protocol import protocol_class
from .schemas import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorBody,
    ModelCard,
    ModelList,
    SamplingFields,
    TokenizeRequest,
    TokenizeResponse,
)
from .settings import ServerSettings
from .streaming import (
    SSE_HEADERS,
    Answer,
    Choices,
    ResponseMeta,
    chat_completion,
    choices_response,
    collect,
    collect_choices,
    stream_choices,
    stream_events,
    text_completion,
)
from .ui import install_ui

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


def create_app(
    model: Model, settings: ServerSettings, *, engine: Any = None, max_batch: int = 8, speculation: Any = None
) -> FastAPI:
    """The server app. ``engine``: a started-on-startup BatchEngine (default: a new one over ``model``,
    every request with ``speculation``, an ``engine.speculative.Speculation`` or None)."""
    if engine is None:
        from ..engine.scheduler import BatchEngine

        engine = BatchEngine(model, max_batch=max_batch, max_waiting=settings.max_waiting, speculation=speculation)
    builder = PromptBuilder(model, settings)
    metrics = ServerMetrics(engine)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            engine.shutdown()

    app = FastAPIOffline(  # /docs and /redoc load their scripts from this server (offline), not a CDN
        title="qwenvl",
        version=__version__,
        lifespan=lifespan,
        description="OpenAI-compatible chat and completions for Qwen2-VL / Qwen2.5-VL / Qwen2 on a CPU.",
    )
    app.state.engine, app.state.model, app.state.settings = engine, model, settings
    app.state.metrics = metrics
    app.state.redact = path_redactor(model.source, settings.model_id)
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes, timeout=settings.body_timeout)
    app.add_middleware(APIKeyMiddleware, api_key=settings.api_key)
    if settings.cors_origins:  # outside the key check: browsers send preflight requests without the key
        app.add_middleware(
            CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["*"], allow_headers=["*"]
        )
    app.add_middleware(HTTPMetricsMiddleware, metrics=metrics)  # added last: runs first, counts every answer

    async def answer(
        request: Request,
        body: SamplingFields,
        prompt: Prompt,
        requested: int | None,
        meta: ResponseMeta,
        plan: OutputPlan,
    ) -> JSONResponse | StreamingResponse:
        sampling = builder.sampling(body, len(prompt.input_ids), requested)
        constraint = await run_in_threadpool(builder.constraint, plan)
        meta.tokenizer, meta.observer = model.tokenizer, metrics.request()
        meta.tools = tool_names(plan.tools) if plan.parse_tools else None
        meta.logprobs = sampling.get("logprobs") is not None
        if body.n > 1:
            return await answer_choices(request, body, prompt, meta, plan, sampling, constraint)
        handle = await admitted(engine.submit(prompt, constraint=constraint, **sampling))
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return _CancellingStream(stream_events(request, handle, meta, include_usage), handle)
        result = await collect(request, handle, meta)
        build = chat_completion if meta.kind == "chat" else text_completion
        return JSONResponse(build(meta, result))

    async def answer_choices(
        request: Request,
        body: SamplingFields,
        prompt: Prompt,
        meta: ResponseMeta,
        plan: OutputPlan,
        sampling: dict[str, Any],
        constraint: Any,
    ) -> JSONResponse | StreamingResponse:
        """``n`` > 1: the choices share the prompt's prefill and KV blocks (BatchEngine.submit_choices)."""
        constraints = [constraint] + [await run_in_threadpool(builder.constraint, plan) for _ in range(body.n - 1)]
        metas = [meta] + [dataclasses.replace(meta, observer=metrics.request()) for _ in range(body.n - 1)]
        handles = engine.submit_choices(prompt, body.n, constraints, **sampling)
        group = Choices(handles)
        await admitted(handles[0], group)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return _CancellingStream(stream_choices(request, handles, metas, include_usage), group)
        answers = await collect_choices(request, handles, metas)
        return JSONResponse(
            choices_response(chat_completion if meta.kind == "chat" else text_completion, metas, answers)
        )

    async def admitted(handle: Any, group: Any = None) -> Any:
        """The handle once the engine has taken it into its batch; 503 when no slot frees in time."""
        if not await handle.wait_dequeued(settings.queue_timeout):
            (group or handle).cancel()
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
        """Chat with text, images (``image_url``) and videos (``video_url``); ``stream`` for SSE chunks;
        ``tools`` for tool calls, ``response_format`` / ``structured_outputs`` for constrained output."""
        refuse_unsupported(body)
        plan = builder.output_plan(body)
        prompt = await run_in_threadpool(builder.chat_prompt, body, plan)
        requested = body.max_completion_tokens or body.max_tokens
        meta = ResponseMeta(settings.model_id, "chat", extension=_qwenvl_extension(model, prompt))
        return await answer(request, body, prompt, requested, meta, plan)

    @app.post("/v1/completions", response_model=Completion, responses=ERROR_RESPONSES)
    async def completions(body: CompletionRequest, request: Request) -> Any:
        """Continue a raw prompt (a string, tokenized without a chat template, or a list of token ids)."""
        refuse_unsupported(body)
        plan = builder.output_plan(body)
        prompt = await run_in_threadpool(builder.completion_prompt, body)
        meta = ResponseMeta(settings.model_id, "text")
        if body.echo:
            given = body.prompt[0] if isinstance(body.prompt, list) and body.prompt else body.prompt
            meta.echo = given if isinstance(given, str) else model.tokenizer.decode(prompt.input_ids)
            meta.prompt_ids = list(prompt.input_ids)
        return await answer(request, body, prompt, body.max_tokens, meta, plan)

    def model_card() -> dict[str, Any]:
        return {
            "id": settings.model_id,
            "object": "model",
            "created": settings.started,
            "owned_by": "qwenvl",
            "max_model_len": model.context,
        }

    @app.get("/v1/models", response_model=ModelList, responses=ERROR_RESPONSES)
    async def models() -> Any:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id}", response_model=ModelCard, responses={404: {"model": ErrorBody}})
    async def one_model(model_id: str) -> Any:
        """The served model's card; 404 for any other id."""
        if model_id != settings.model_id:
            raise APIError(404, f"no model {model_id!r}: this server serves {settings.model_id!r}", param="model",
                           code="model_not_found")  # fmt: skip
        return model_card()

    def check_key(request: Request) -> None:
        expected = settings.api_key
        if expected and not secrets.compare_digest(
            request.headers.get("authorization", "").encode(), f"Bearer {expected}".encode()
        ):
            raise APIError(401, "invalid or missing API key (send Authorization: Bearer KEY)", code="invalid_api_key")

    @app.post("/tokenize", response_model=TokenizeResponse, responses=ERROR_RESPONSES)
    async def tokenize(body: TokenizeRequest, request: Request) -> Any:
        """vLLM's /tokenize: ``prompt`` (tokenized as is) or ``messages`` (rendered with the chat template;
        images and videos count as the pad tokens they become)."""
        check_key(request)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give either prompt or messages", param="prompt")
        if body.messages is None and (body.tools or body.mm_processor_kwargs):
            raise APIError(400, "tools and mm_processor_kwargs go with messages", param="tools")
        if body.prompt is not None:
            tokens = model.tokenizer.encode(body.prompt)
        else:
            tokens = await run_in_threadpool(builder.tokenize_messages, body)
        strs = (
            [model.tokenizer.token_bytes(t).decode("utf-8", "replace") for t in tokens]
            if body.return_token_strs
            else None
        )
        return {"count": len(tokens), "max_model_len": model.context, "tokens": tokens, "token_strs": strs}

    @app.post("/detokenize", response_model=DetokenizeResponse, responses=ERROR_RESPONSES)
    async def detokenize(body: DetokenizeRequest, request: Request) -> Any:
        """vLLM's /detokenize: token ids → text (special tokens included)."""
        check_key(request)
        vocab = model.config.text.vocab_size
        bad = next((token for token in body.tokens if not 0 <= token < vocab), None)
        if bad is not None:
            raise APIError(400, f"tokens: id {bad} is outside the vocabulary (0..{vocab - 1})", param="tokens")
        return {"prompt": model.tokenizer.decode(body.tokens)}

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        """Prometheus text format: requests by status, tokens, latency histograms, engine gauges."""
        data, content_type = metrics.exposition()
        return Response(data, media_type=content_type)

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


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port (not yet listening), taken before the model loads so that a port
    in use fails at once; QwenVLError (one line) when it cannot be had."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as error:
        raise QwenVLError(f"--host {host}: cannot resolve it ({error.strerror})") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a TIME_WAIT port is free
    try:
        sock.bind(address)
    except OSError as error:
        sock.close()
        hint = " (another server is on it? choose another with --port)" if error.errno == errno.EADDRINUSE else ""
        raise QwenVLError(f"cannot listen on {host}:{port}: {error.strerror}{hint}") from None
    sock.set_inheritable(True)
    return sock


def run_server(app: FastAPI, host: str, port: int, log_level: str = "info", sock: socket.socket | None = None) -> None:
    """Serve ``app`` until interrupted (Ctrl-C ends the open streams, then the engine); on ``sock`` when
    given (bound by ``bind_socket``), else on host:port."""
    import uvicorn

    server = uvicorn.Server(server_config(app, host, port, log_level))
    try:
        server.run(sockets=[sock] if sock is not None else None)
    except KeyboardInterrupt:  # the signal uvicorn re-raises after its graceful shutdown (as uvicorn.run)
        pass
    if not server.started:
        raise SystemExit(3)  # uvicorn's STARTUP_FAILURE, as uvicorn.run exits
