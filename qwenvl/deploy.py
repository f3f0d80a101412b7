"""qwenvl on Ray Serve: `qwenvl serve --ray` and `serve run qwenvl.deploy:app model=... replicas=...`.

Two deployments make the application (docs/scale-out.md):

- ``QwenVLReplica`` × N: each loads the model with T threads (pinned to cores of its own on its host),
  builds the whole server app of `qwenvl serve` (create_app: every route, middleware and media rule, the
  API key) with its own batching engine, and answers forwarded requests through that app. Every answer
  names its replica in the ``x-qwenvl-replica`` header.
- ``QwenVLIngress`` × 1 (no CPU reserved): what Ray's HTTP proxy calls. It reads a request's body, keys
  it by its leading prefix (server/routing.py) and passes it to a replica through a handle whose router
  is PrefixAffinityRouter (server/ray_router.py), then relays the answer as it comes. A replica that dies
  under a request ends that request with an OpenAI-style error (a 503 before the answer started, an
  error event in a started stream); Ray restarts the replica and the others keep serving. /health and
  /metrics are answered from every replica.

Importing this module imports Ray (the `qwenvl[ray]` extra); plain `qwenvl serve` never does.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import dataclasses
import io
import math
import os
import re
import signal
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

import ray
from ray import serve
from ray.exceptions import RayActorError, RayError
from ray.serve.config import RequestRouterConfig
from ray.serve.schema import LoggingConfig
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.types import Message, Receive, Scope, Send

from .errors import QwenVLError
from .server.errors import error_response
from .server.forward import (
    REPLICA_HEADER,
    AppLifespan,
    ForwardedRequest,
    app_path,
    merge_metrics,
    serve_forwarded,
    sse_error,
)
from .server.ray_router import PrefixAffinityRouter
from .server.routing import live_replicas, prefix_key, queued_requests
from .server.settings import ServerSettings

APP_NAME = "qwenvl"
OBJECT_STORE_BYTES = 96 * 2**20  # a local Ray's shared-memory store: requests and answers are small
HEALTH_CHECK_PERIOD_S = 5.0  # Ray calls each replica's check_health this often ...
HEALTH_CHECK_TIMEOUT_S = 30.0  # ... and restarts the replica after this long without an answer
SHUTDOWN_GRACE_S = 5.0  # open requests may finish for this long when the server stops (as `qwenvl serve`)
REPLICA_CALL_TIMEOUT_S = 3.0  # the ingress's per-replica /health and /metrics calls
INGRESS_MAX_ONGOING = 4096  # concurrent HTTP requests the ingress holds (replicas queue them)
STATS = ("running", "waiting", "kv_cache_bytes", "steps")


@serve.deployment(name="QwenVLReplica")
class QwenVLReplica:
    """One copy of the server: the model, its batching engine and the whole OpenAI app over them."""

    async def __init__(self, args: argparse.Namespace, settings: ServerSettings):
        from .cli import serve_app

        context = serve.get_replica_context()
        self.replica_id = context.replica_tag
        rank = getattr(getattr(context, "rank", None), "local_rank", None)
        self.cpus = None
        if not args.no_pin and rank is not None:
            from .scaleout import pin_to_cores

            self.cpus = pin_to_cores(rank, args.threads)
        self.app, loaded = serve_app(args, settings)
        self.engine = self.app.state.engine
        self.lifespan = AppLifespan(self.app)
        await self.lifespan.startup()
        self.identity = {
            "replica": self.replica_id,
            "host": socket.gethostname(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "pid": os.getpid(),
            "threads": args.threads,
            "cpus": self.cpus,
            "max_batch": args.max_batch,
        }
        pinned = f", pinned to CPUs {self.cpus}" if self.cpus else ""
        print(f"qwenvl replica {self.replica_id}: {loaded}, {args.threads} threads{pinned}", file=sys.stderr)

    async def handle(self, request: ForwardedRequest):
        """The ASGI messages of the app's answer to ``request``, streamed as they come."""
        async for message in serve_forwarded(self.app, request, [(REPLICA_HEADER.encode(), self.replica_id.encode())]):
            yield message

    async def describe(self, request: ForwardedRequest) -> dict[str, Any]:
        """Who this replica is and its engine's counters (the ingress's /health)."""
        return {**self.identity, "status": "ok", **self.engine.stats()}

    def check_health(self) -> None:
        """Ray's health check: the engine's loop thread must be alive (else Ray restarts the replica)."""
        thread = getattr(self.engine, "_thread", None)
        if thread is not None and not thread.is_alive():
            raise RuntimeError(f"replica {self.replica_id}: the batching engine's thread has stopped")

    async def __del__(self):
        await self.lifespan.shutdown()


@serve.deployment(name="QwenVLIngress", max_ongoing_requests=INGRESS_MAX_ONGOING, ray_actor_options={"num_cpus": 0})
class QwenVLIngress:
    """The HTTP entry: keys each request, hands it to a replica, relays the answer; /health, /metrics."""

    def __init__(self, replicas: Any, settings: ServerSettings):
        self.replicas = replicas
        self.max_body_bytes = settings.max_body_bytes
        self.body_timeout = settings.body_timeout
        self.limit_concurrency = settings.limit_concurrency
        self.open_requests = 0
        self.app_name = serve.get_replica_context().app_name
        # a first call makes this process's router, which knows the live replicas (/health, /metrics)
        self._first_call = replicas.options(method_name="describe").remote(ForwardedRequest("GET", "/health"))

    async def __call__(self, request: Request) -> Response:
        if self.limit_concurrency is not None and self.open_requests >= self.limit_concurrency:
            return PlainTextResponse("Service Unavailable", status_code=503)  # as uvicorn's --limit-concurrency
        self.open_requests += 1
        response: Response | None = None
        try:
            response = await self._answer(request)
        finally:
            if isinstance(response, _Relay):
                response.on_end = self._closed  # open until its last byte
            else:
                self._closed()
        return response

    def _closed(self) -> None:
        self.open_requests -= 1

    async def _answer(self, request: Request) -> Response:
        path, method = app_path(request.scope), request.method
        if path == "/health" and method in ("GET", "HEAD"):
            return await self.health()
        if path == "/metrics" and method == "GET":
            return await self.metrics(request)
        body = await self._body(request)
        if isinstance(body, Response):
            return body
        forwarded = ForwardedRequest.from_scope(request.scope, body, route_key=prefix_key(path, body))
        return await self.forward(forwarded)

    async def _body(self, request: Request) -> bytes | Response:
        """The whole body, or the 413 / 408 of `qwenvl serve` past its size or time (so that an oversized
        or stalled body is not carried to a replica)."""
        declared = request.headers.get("content-length", "")
        limit_message = f"request body larger than the {self.max_body_bytes / 2**20:g} MiB limit (--max-body-mb)"
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            return error_response(413, limit_message)
        chunks, total = [], 0
        try:
            async with asyncio.timeout(self.body_timeout):
                async for chunk in request.stream():
                    total += len(chunk)
                    if total > self.max_body_bytes:
                        return error_response(413, limit_message)
                    chunks.append(chunk)
        except TimeoutError:
            message = f"the request body did not arrive within {self.body_timeout:g} s (--body-timeout)"
            return error_response(408, message, code="request_timeout", headers={"Connection": "close"})
        return b"".join(chunks)

    async def forward(self, forwarded: ForwardedRequest) -> Response:
        stream = self.replicas.options(stream=True, method_name="handle").remote(forwarded)
        try:
            start = await stream.__anext__()
        except asyncio.CancelledError:
            stream.cancel()
            raise
        except StopAsyncIteration:
            return error_response(502, "the replica ended without an answer")
        except RayError as error:
            return _failed_before_answer(error)
        return _Relay(start, stream)

    async def health(self) -> Response:
        """Every replica's identity and counters, and their sums; 503 when no replica answers."""
        ids = live_replicas(self.app_name)
        # one call at a time: Ray tells the calls of one HTTP request apart by its request id only
        answers = [await self._describe(replica) for replica in ids]
        ok = [answer for answer in answers if answer.get("status") == "ok"]
        status = "ok" if ok and len(ok) == len(answers) else "degraded" if ok else "unavailable"
        body = {
            "status": status,
            **{name: sum(answer.get(name, 0) for answer in ok) for name in STATS},
            "queued_for_a_replica": queued_requests(self.app_name),
            "replicas": answers,
        }
        return JSONResponse(body, status_code=200 if ok else 503)

    async def metrics(self, request: Request) -> Response:
        """Each replica's /metrics in one exposition, every sample labelled replica="<id>"; a replica's own
        answer as it is when none gives metrics (a 401 without the key, for one)."""
        ids = live_replicas(self.app_name)
        probe = ForwardedRequest.from_scope(request.scope, b"")
        answers = [await self._call(dataclasses.replace(probe, target=replica)) for replica in ids]
        texts = {replica: body.decode() for replica, (status, _, body) in zip(ids, answers) if status == 200}
        if texts:
            return Response(merge_metrics(texts), media_type="text/plain; version=0.0.4; charset=utf-8")
        for status, headers, body in answers:
            if status:
                return Response(body, status_code=status, headers=_plain_headers(headers))
        return error_response(503, "no replica answered", code="replica_unavailable")

    async def _describe(self, replica: str) -> dict[str, Any]:
        call = self.replicas.options(method_name="describe").remote(ForwardedRequest("GET", "/health", target=replica))
        try:
            return await asyncio.wait_for(_awaited(call), REPLICA_CALL_TIMEOUT_S)
        except (TimeoutError, RayError) as error:
            call.cancel()
            return {"replica": replica, "status": "unreachable", "error": _one_line(error)}

    async def _call(self, forwarded: ForwardedRequest) -> tuple[int, list, bytes]:
        """One replica's whole answer: status, headers, body (status 0: it did not answer in time)."""
        stream = self.replicas.options(stream=True, method_name="handle").remote(forwarded)
        status, headers, chunks = 0, [], []

        async def collect() -> None:
            nonlocal status, headers
            async for message in stream:
                if message["type"] == "http.response.start":
                    status, headers = message["status"], message.get("headers", [])
                else:
                    chunks.append(message.get("body", b""))

        try:
            await asyncio.wait_for(collect(), REPLICA_CALL_TIMEOUT_S)
        except (TimeoutError, RayError):
            stream.cancel()
            return 0, [], b""
        return status, headers, b"".join(chunks)


class _Relay(Response):
    """A replica's answer, relayed message by message; a replica lost mid-answer ends a stream with an
    OpenAI-style error event (other bodies are cut, as no status can be sent any more)."""

    def __init__(self, start: Message, stream: Any):
        self.start, self.stream = start, stream
        self.background = None
        self.status_code = start["status"]
        self.on_end: Callable[[], None] = lambda: None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self._relay(send)
        finally:
            self.on_end()

    async def _relay(self, send: Send) -> None:
        await send(self.start)
        failure: BaseException | None = None
        try:
            async for message in self.stream:
                await send(message)
                if message["type"] == "http.response.body" and not message.get("more_body", False):
                    return
        except RayError as error:
            failure = error
        except BaseException:
            self.stream.cancel()
            raise
        headers = _plain_headers(self.start.get("headers", []))
        replica = headers.get(REPLICA_HEADER, "?")
        message = f"replica {replica} stopped while answering ({_one_line(failure)}); the others keep serving: retry"
        if not headers.get("content-type", "").startswith("text/event-stream"):
            raise RuntimeError(message)  # cuts the connection: the client sees a broken answer, not a short one
        await send({"type": "http.response.body", "body": sse_error(message, code="replica_lost"), "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def _failed_before_answer(error: RayError) -> Response:
    if isinstance(error, RayActorError):
        response = error_response(
            503, f"the replica serving this request stopped ({_one_line(error)}); retry", code="replica_lost"
        )
        response.headers["Retry-After"] = "1"
        return response
    return error_response(500, f"internal error: {_one_line(error)}")


async def _awaited(response: Any) -> Any:
    return await response


def _one_line(error: BaseException | None) -> str:
    if error is None:
        return "its answer ended early"
    text = " ".join(str(error).split())
    first = text.split(". ")[0] if text else ""
    return f"{type(error).__name__}: {first[:200]}" if first else type(error).__name__


def _plain_headers(headers: list) -> dict[str, str]:
    return {bytes(name).decode("latin-1").lower(): bytes(value).decode("latin-1") for name, value in headers}


# -- building and running the application ------------------------------------------------------------
def build_app(args: argparse.Namespace, settings: ServerSettings) -> Any:
    """The Ray Serve application of checked `qwenvl serve --ray` arguments."""
    replica_args = copy.copy(args)
    replica_args.handler = None
    logging = LoggingConfig(log_level=args.log_level.upper(), enable_access_log=args.log_level in ("info", "debug"))
    router = RequestRouterConfig(
        request_router_class=PrefixAffinityRouter,
        request_router_kwargs={"policy": args.router, "saturation": args.max_batch},
    )
    replica = QwenVLReplica.options(
        num_replicas=args.replicas,
        max_ongoing_requests=args.max_batch + args.max_queue,  # its batch and its queue, as `qwenvl serve`
        ray_actor_options={"num_cpus": args.threads},
        request_router_config=router,
        health_check_period_s=HEALTH_CHECK_PERIOD_S,
        health_check_timeout_s=HEALTH_CHECK_TIMEOUT_S,
        graceful_shutdown_timeout_s=SHUTDOWN_GRACE_S,
        graceful_shutdown_wait_loop_s=0.5,
        logging_config=logging,
    ).bind(replica_args, settings)
    return QwenVLIngress.options(
        logging_config=logging, graceful_shutdown_timeout_s=SHUTDOWN_GRACE_S, graceful_shutdown_wait_loop_s=0.5
    ).bind(replica, settings)


def app(options: dict[str, Any]) -> Any:
    """The builder `serve run qwenvl.deploy:app model=FILE replicas=2 threads_per_replica=1 ...` calls: every
    `qwenvl serve` flag as key=value (a flag without value as flag=true). Ray's `serve run` owns the HTTP
    host and port and the cluster address."""
    from .cli import build_parser, serve_settings
    from .scaleout import check_ray_arguments

    argv = ["serve", "--ray"]
    owned = {"host", "port", "ray_address", "ray"}
    for key, value in options.items():
        name = key.replace("-", "_")
        if name in owned:
            raise QwenVLError(f"{key}: give it to `serve run` (--address, or http_options in a config), not to qwenvl")
        if name == "model":
            argv.insert(1, str(value))
        elif str(value).lower() in ("true", "false"):
            argv += [f"--{name.replace('_', '-')}"] if str(value).lower() == "true" else []
        else:
            argv += [f"--{name.replace('_', '-')}", str(value)]
    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said):
            args = build_parser().parse_args(argv)
    except SystemExit:
        reason = (said.getvalue().strip().splitlines() or [""])[-1].removeprefix("qwenvl: error: ")
        raise QwenVLError(f"invalid qwenvl arguments ({reason}); see `qwenvl serve --help`") from None
    check_ray_arguments(args)
    _check_model(args)
    return build_app(args, serve_settings(args))


def serve_on_ray(args: argparse.Namespace, settings: ServerSettings) -> int:
    """`qwenvl serve --ray`: deploy, print the address, serve until Ctrl-C or SIGTERM, then clean up
    (also when stopped while starting: a Ray instance started here never outlives the command)."""
    # Ctrl-C and SIGTERM stop it (as uvicorn's handlers do for `qwenvl serve`, even where the shell that
    # started it in the background had set SIGINT to be ignored)
    previous = {sig: signal.signal(sig, signal.default_int_handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        began = time.perf_counter()
        started_here = start(args, settings)
        try:
            print(
                f"qwenvl serve: {settings.model_id} on Ray Serve, {args.replicas} replicas × {args.threads} "
                f"threads, router {args.router}, up in {time.perf_counter() - began:.1f} s; "
                f"http://{args.host}:{args.port}/v1",
                file=sys.stderr,
            )
            while True:
                time.sleep(3600)
        finally:
            disconnect(started_here)
    except KeyboardInterrupt:
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def start(args: argparse.Namespace, settings: ServerSettings) -> bool:
    """Connect to (or start) Ray, start Serve's HTTP proxy on --host/--port and deploy the application;
    returns once every replica is up. True when Ray was started here (``disconnect`` stops it)."""
    _check_model(args)
    try:
        started_here = connect(args.ray_address, cpus=args.replicas * args.threads)
    except BaseException:
        ray.shutdown()  # what a stopped ray.init had started already
        raise
    try:
        keep_alive = max(1, math.ceil(args.timeout_keep_alive))  # Ray's proxy takes whole seconds
        serve.start(http_options={"host": args.host, "port": args.port, "keep_alive_timeout_s": keep_alive})
        serve.run(build_app(args, settings), name=APP_NAME, route_prefix="/")
    except RuntimeError as error:
        reason = _why_not_deployed() or _one_line(error)
        disconnect(started_here)
        raise QwenVLError(f"the replicas did not start: {reason}") from None
    except BaseException:
        disconnect(started_here)
        raise
    return started_here


def _why_not_deployed() -> str | None:
    """The last line of the error a failed deployment's replicas raised (a qwenvl error: its message)."""
    try:
        deployments = serve.status().applications[APP_NAME].deployments.values()
    except Exception:  # the status itself is out of reach: say what serve.run said
        return None
    for deployment in deployments:
        lines = [line.strip() for line in (deployment.message or "").splitlines() if line.strip()]
        if str(deployment.status).endswith("DEPLOY_FAILED") and lines:
            return re.sub(r"^qwenvl\.[\w.]+: ", "", lines[-1])
    return None


def connect(address: str | None, cpus: int) -> bool:
    """Join the Ray cluster at ``address``, or start a Ray instance of this machine sized for ``cpus``
    (no dashboard, a small object store); True when it was started here."""
    if address:
        ray.init(address=address, log_to_driver=True)
        return False
    ray.init(
        address="local",
        num_cpus=cpus,
        include_dashboard=False,
        object_store_memory=OBJECT_STORE_BYTES,
        log_to_driver=True,
    )
    return True


def disconnect(started_here: bool) -> None:
    """Remove the application; stop Serve and Ray too when this process started them."""
    try:
        if started_here:
            serve.shutdown()
        else:
            serve.delete(APP_NAME)
    finally:
        ray.shutdown()


def _check_model(args: argparse.Namespace) -> None:
    """Fail here, with one line, on a model every replica would fail on (only its header is read)."""
    from .weights.checkpoint import open_checkpoint

    if args.model is None:
        from .defaults import default_model_path

        default_model_path()  # assembled once here, not by every replica at once
        return
    open_checkpoint(args.model, mmproj=args.mmproj)
