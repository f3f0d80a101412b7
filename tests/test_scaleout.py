"""The parts of `qwenvl serve --ray` that need no Ray: routing keys, the hash ring, forwarding a request
through a server app in-process, merging /metrics, the flags, CPU pinning, and that plain `qwenvl serve`
never imports Ray. (tests/test_ray_serve.py runs the real thing on a local Ray instance.)"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_server_support import sse_payloads

import qwenvl
from qwenvl.cli import main
from qwenvl.server.forward import (
    REPLICA_HEADER,
    AppLifespan,
    ForwardedRequest,
    app_path,
    merge_metrics,
    serve_forwarded,
)
from qwenvl.server.routing import PREFIX_CHARS, HashRing, prefix_key

ROOT = Path(__file__).resolve().parent.parent
CHAT = "/v1/chat/completions"


def chat_body(messages, **fields) -> bytes:
    return json.dumps({"model": "m", "messages": messages, **fields}).encode()


def image(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


FIRST_TURN = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": [image("data:image/png;base64,AAAA"), {"type": "text", "text": "What is it?"}]},
]


# -- routing keys --------------------------------------------------------------------------------------
def test_every_turn_of_a_conversation_has_the_first_turns_key():
    first = prefix_key(CHAT, chat_body(FIRST_TURN))
    second = FIRST_TURN + [{"role": "assistant", "content": "A cat."}, {"role": "user", "content": "Its colour?"}]
    assert first is not None
    assert prefix_key(CHAT, chat_body(second, stream=True, max_tokens=9, temperature=0.7)) == first
    third = second + [{"role": "assistant", "content": "Grey."}, {"role": "user", "content": [image("https://x/y")]}]
    assert prefix_key(CHAT, chat_body(third)) == first


@pytest.mark.parametrize(
    "changed",
    [
        [{"role": "system", "content": "You are verbose."}, FIRST_TURN[1]],
        [
            FIRST_TURN[0],
            {"role": "user", "content": [image("data:image/png;base64,AAAB"), FIRST_TURN[1]["content"][1]]},
        ],
        [
            FIRST_TURN[0],
            {"role": "user", "content": [image("data:image/png;base64,AAAA"), {"type": "text", "text": "?"}]},
        ],
        [FIRST_TURN[1]],  # no system prompt
        [FIRST_TURN[0], {"role": "developer", "content": "More rules."}, FIRST_TURN[1]],
    ],
)
def test_the_key_changes_with_the_system_prompt_first_message_or_its_images(changed):
    assert prefix_key(CHAT, chat_body(changed)) not in (None, prefix_key(CHAT, chat_body(FIRST_TURN)))


def test_completion_prompts_are_keyed_by_their_beginning():
    base = "x" * PREFIX_CHARS
    key = prefix_key("/v1/completions", json.dumps({"prompt": base + " first"}).encode())
    assert key == prefix_key("/v1/completions", json.dumps({"prompt": base + " second, longer"}).encode())
    assert key != prefix_key("/v1/completions", json.dumps({"prompt": "y" + base}).encode())
    ids = prefix_key("/v1/completions", json.dumps({"prompt": [1, 2, 3]}).encode())
    assert ids is not None and ids != key


@pytest.mark.parametrize(
    "path,body",
    [
        ("/v1/models", b""),
        (CHAT, b"{not json"),
        (CHAT, b"[1, 2]"),
        (CHAT, json.dumps({"messages": "hi"}).encode()),
        (CHAT, json.dumps({"messages": []}).encode()),
        ("/v1/completions", json.dumps({"prompt": ""}).encode()),
        (CHAT, b"\xff\xfe"),
    ],
)
def test_requests_without_a_prefix_have_no_key(path, body):
    assert prefix_key(path, body) is None


# -- the hash ring ---------------------------------------------------------------------------------------
KEYS = [f"key-{i}" for i in range(2000)]


def test_the_ring_ranks_every_member_owner_first_and_spreads_keys():
    ring = HashRing(["a", "b", "c"])
    for key in KEYS[:50]:
        order = ring.preference(key)
        assert sorted(order) == ["a", "b", "c"] and order[0] == ring.owner(key)
    shares = {member: sum(ring.owner(key) == member for key in KEYS) / len(KEYS) for member in "abc"}
    assert all(0.2 < share < 0.47 for share in shares.values()), shares
    assert HashRing().preference("k") == [] and HashRing().owner("k") is None


def test_a_member_leaving_or_joining_moves_only_its_own_keys():
    before = HashRing(["a", "b", "c"])
    after_leave = HashRing(["a", "b"])
    for key in KEYS:
        if before.owner(key) != "c":
            assert after_leave.owner(key) == before.owner(key)
        else:  # its keys go to the next owner clockwise: the fallback the router already used
            assert after_leave.owner(key) == before.preference(key)[1]
    after_join = HashRing(["a", "b", "c", "d"])
    moved = [key for key in KEYS if after_join.owner(key) != before.owner(key)]
    assert all(after_join.owner(key) == "d" for key in moved)
    assert 0.12 < len(moved) / len(KEYS) < 0.38


# -- forwarding a request through the whole app, in-process -----------------------------------------------
@pytest.fixture(scope="module")
def model(make_qwen2):
    return qwenvl.load(make_qwen2("default"), dtype="float32")


@pytest.fixture
def app(model):
    """A new server app (and engine) per test: an app's lifespan runs once."""
    from qwenvl.server import ServerSettings, create_app

    return create_app(model, ServerSettings(model_id="tiny", api_key="sesame"), max_batch=4)


def run(coroutine):
    return asyncio.run(coroutine)


NAMED = (REPLICA_HEADER.encode(), b"r1")


async def forwarded_messages(app, request: ForwardedRequest, stop_after: int | None = None) -> list[dict]:
    lifespan = AppLifespan(app)
    await lifespan.startup()
    messages = []
    try:
        stream = serve_forwarded(app, request, [NAMED])
        async for message in stream:
            messages.append(message)
            if stop_after is not None and len(messages) >= stop_after:
                await stream.aclose()  # the client went away
                break
        if stop_after is not None:
            deadline = time.monotonic() + 10
            while app.state.engine.stats()["running"] and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            messages.append({"type": "stats", **app.state.engine.stats()})
    finally:
        await lifespan.shutdown()
    return messages


def chat_request(body: dict, key: str | None = "sesame") -> ForwardedRequest:
    headers = [(b"content-type", b"application/json")]
    if key:
        headers.append((b"authorization", f"Bearer {key}".encode()))
    return ForwardedRequest("POST", CHAT, headers=headers, body=json.dumps(body).encode(), client=("1.2.3.4", 5))


def test_a_forwarded_request_has_the_path_below_the_route_prefix():
    scope = {"method": "GET", "path": "/qwen/v1/models", "root_path": "/qwen", "headers": [(b"a", b"b")]}
    request = ForwardedRequest.from_scope(scope, b"", route_key="k")
    assert (request.path, request.headers, request.route_key, request.client) == (
        "/v1/models",
        [(b"a", b"b")],
        "k",
        None,
    )
    assert app_path({"path": "/qwen", "root_path": "/qwen"}) == "/" and app_path({"path": "/health"}) == "/health"


def test_a_forwarded_stream_is_the_apps_own_answer_with_the_replica_named(app):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "temperature": 0}

    async def both() -> tuple[list[dict], list[dict]]:
        lifespan = AppLifespan(app)
        await lifespan.startup()
        try:
            whole = [m async for m in serve_forwarded(app, chat_request(body))]
            streamed = [m async for m in serve_forwarded(app, chat_request({**body, "stream": True}), [NAMED])]
        finally:
            await lifespan.shutdown()
        return whole, streamed

    whole, streamed = run(both())
    start = streamed[0]
    assert start["type"] == "http.response.start" and start["status"] == 200
    assert NAMED in [tuple(header) for header in start["headers"]]
    assert NAMED not in [tuple(header) for header in whole[0]["headers"]]
    assert streamed[-1]["type"] == "http.response.body" and not streamed[-1].get("more_body", False)
    events = sse_payloads(b"".join(message.get("body", b"") for message in streamed[1:]).decode())
    assert events[-1] == "[DONE]"
    text = "".join(event["choices"][0]["delta"].get("content") or "" for event in events[:-1] if event["choices"])
    answer = json.loads(b"".join(message.get("body", b"") for message in whole[1:]))
    assert text == answer["choices"][0]["message"]["content"] and text


def test_forwarding_keeps_the_apps_rules(app):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}

    async def both() -> tuple[list[dict], list[dict]]:
        lifespan = AppLifespan(app)
        await lifespan.startup()
        try:
            refused = [m async for m in serve_forwarded(app, chat_request(body, key=None))]
            bad = [m async for m in serve_forwarded(app, chat_request({**body, "max_tokens": -3}))]
        finally:
            await lifespan.shutdown()
        return refused, bad

    refused, bad = run(both())
    assert refused[0]["status"] == 401
    assert json.loads(refused[1]["body"])["error"]["code"] == "invalid_api_key"
    assert bad[0]["status"] == 400 and json.loads(bad[1]["body"])["error"]["param"] == "max_tokens"


def test_a_client_leaving_a_forwarded_stream_cancels_its_request(app):
    body = {"messages": [{"role": "user", "content": "go"}], "max_tokens": 2000, "stream": True, "ignore_eos": True}
    messages = run(forwarded_messages(app, chat_request(body), stop_after=3))
    assert messages[-1]["running"] == 0 and messages[-1]["kv_cache_bytes"] == 0


# -- /metrics of several replicas ---------------------------------------------------------------------------
REPLICA_METRICS = """# HELP qwenvl_requests_total Requests by status.
# TYPE qwenvl_requests_total counter
qwenvl_requests_total{status="200"} {n}.0
qwenvl_requests_total{status="400"} 1.0
# HELP qwenvl_ttft_seconds Time to first token.
# TYPE qwenvl_ttft_seconds histogram
qwenvl_ttft_seconds_bucket{le="0.5"} 2.0
qwenvl_ttft_seconds_bucket{le="+Inf"} {n}.0
qwenvl_ttft_seconds_count {n}.0
qwenvl_ttft_seconds_sum 1.5
# HELP qwenvl_running Requests being decoded.
# TYPE qwenvl_running gauge
qwenvl_running 3.0
"""


def test_metrics_of_replicas_merge_into_one_exposition_labelled_by_replica():
    merged = merge_metrics({"r1": REPLICA_METRICS.replace("{n}", "5"), 'r"2': REPLICA_METRICS.replace("{n}", "7")})
    lines = merged.splitlines()
    for family in ("qwenvl_requests_total", "qwenvl_ttft_seconds", "qwenvl_running"):
        assert sum(line.startswith(f"# TYPE {family} ") for line in lines) == 1
    assert 'qwenvl_requests_total{replica="r1",status="200"} 5.0' in lines
    assert 'qwenvl_requests_total{replica="r\\"2",status="200"} 7.0' in lines
    assert 'qwenvl_ttft_seconds_count{replica="r1"} 5.0' in lines
    assert 'qwenvl_running{replica="r\\"2"} 3.0' in lines
    # every sample follows its own family's TYPE line, all replicas' samples together
    family_of_line = {}
    current = None
    for line in lines:
        if line.startswith("# TYPE "):
            current = line.split()[2]
        elif not line.startswith("#"):
            family_of_line[line] = current
            assert line.split("{")[0].startswith(current)
    assert len(family_of_line) == 2 * 7  # every sample of both replicas, none lost
    assert merge_metrics({}) == ""


def test_merged_metrics_parse_as_prometheus_text_with_every_sample_labelled():
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    texts = {}
    for replica, count in (("a", 2), ("b", 5)):
        registry = CollectorRegistry()
        requests = Counter("qwenvl_requests", "Requests.", ["status"], registry=registry)
        requests.labels("200").inc(count)
        Gauge("qwenvl_running", "Running.", registry=registry).set(count)
        Histogram("qwenvl_ttft_seconds", "TTFT.", registry=registry, buckets=(0.1, 1.0)).observe(0.5)
        texts[replica] = generate_latest(registry).decode()
    families = {family.name: family for family in text_string_to_metric_families(merge_metrics(texts))}
    assert {"qwenvl_requests", "qwenvl_running", "qwenvl_ttft_seconds"} <= set(families)
    totals = {s.labels["replica"]: s.value for s in families["qwenvl_requests"].samples if s.name.endswith("_total")}
    assert totals == {"a": 2.0, "b": 5.0}
    for family in families.values():
        assert all(sample.labels.get("replica") in ("a", "b") for sample in family.samples)


# -- flags, pinning, imports ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "flags,message",
    [
        (["--replicas", "2"], "--replicas needs --ray"),
        (["--ray-address", "auto"], "--ray-address needs --ray"),
        (["--router", "pow2"], "--router needs --ray"),
        (["--ray", "--replicas", "0"], "--replicas must be at least 1"),
        (["--ray", "--threads", "2", "--threads-per-replica", "1"], "disagree"),
        (["--ray", "--header-timeout", "3"], "--header-timeout cannot be applied with --ray"),
    ],
)
def test_ray_flags_are_checked_before_anything_loads(flags, message, capsys):
    assert main(["serve", "/nonexistent/model", *flags]) == 2
    assert message in capsys.readouterr().err


def test_ray_defaults_split_the_cores_between_replicas():
    from qwenvl.cli import build_parser
    from qwenvl.runtime import physical_cores
    from qwenvl.scaleout import check_ray_arguments

    args = build_parser().parse_args(["serve", "--ray"])
    check_ray_arguments(args)
    assert (args.replicas, args.router) == (2, "prefix")
    assert args.threads == args.threads_per_replica == max(1, physical_cores() // 2)
    args = build_parser().parse_args(["serve", "--ray", "--threads", "3", "--replicas", "5"])
    check_ray_arguments(args)
    assert args.threads_per_replica == 3


PIN = """
import json, os, threading
from qwenvl.scaleout import pin_to_cores
before = sorted(os.sched_getaffinity(0))
release = threading.Event()
worker = threading.Thread(target=release.wait)
worker.start()
too_far = pin_to_cores(len(before), 1)
pinned = pin_to_cores(0, 1)
print(json.dumps([too_far, pinned, sorted(os.sched_getaffinity(0)), sorted(os.sched_getaffinity(worker.native_id)), before]))
release.set()
"""


def test_a_replica_is_pinned_to_its_own_slice_of_cpus():
    done = subprocess.run([sys.executable, "-c", PIN], capture_output=True, text=True, check=True)
    too_far, pinned, main_thread, other_thread, before = json.loads(done.stdout)
    assert too_far is None  # the host has no CPU for that slice: nothing pinned
    assert len(pinned) == 1 and pinned[0] in before
    assert main_thread == other_thread == pinned  # every thread, also the ones started before


NO_RAY = """
import sys
import qwenvl.cli as cli
import qwenvl.server as server
served = []
import socket
probe = socket.socket()
probe.bind(("127.0.0.1", 0))  # a free port: serve binds it before loading
port = str(probe.getsockname()[1])
probe.close()
server.run_server = lambda app, host, port, level, sock=None: served.append(app)
assert cli.main(["serve", sys.argv[1], "--dtype", "float32", "--port", port]) == 0 and served
print("ray" in sys.modules, any(name.startswith("ray.") for name in sys.modules))
"""


def test_plain_serve_never_imports_ray(make_qwen2):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", NO_RAY, str(make_qwen2("default"))], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["False", "False"]
