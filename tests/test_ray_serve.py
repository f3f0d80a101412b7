"""`qwenvl serve --ray` on a local Ray instance: 2 replicas × 1 thread of a tiny checkpoint, driven by the
real `openai` client. Runs when Ray is installed (the `ray` extra, part of the `test` extra): marker `ray`,
`make test-ray` for these alone. Ray is started small (2 CPUs, no dashboard, a 96 MB object store) and
shut down when the module ends."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'qwenvl[ray]')")

import openai  # noqa: E402
import requests  # noqa: E402

from qwenvl import deploy  # noqa: E402
from qwenvl.cli import build_parser, serve_settings  # noqa: E402
from qwenvl.errors import QwenVLError  # noqa: E402
from qwenvl.scaleout import check_ray_arguments  # noqa: E402
from qwenvl.server.forward import REPLICA_HEADER  # noqa: E402
from qwenvl.server.routing import HashRing, prefix_key  # noqa: E402

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parent.parent
KEY = "sesame"
MAX_TOKENS = 16
POOL = [f"Question number {i}: what is {i} + {i}?" for i in range(64)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_args(model: Path, *flags: str):
    args = build_parser().parse_args(["serve", str(model), "--dtype", "float32", "--log-level", "warning", *flags])
    check_ray_arguments(args)
    return args


def conversation(question: str) -> list[dict]:
    return [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": question}]


def streamed(client: openai.OpenAI, messages: list[dict], **fields) -> tuple[str, str]:
    """(the replica that answered, the streamed text)."""
    raw = client.chat.completions.with_raw_response.create(
        model="tiny", messages=messages, max_tokens=MAX_TOKENS, temperature=0, stream=True, **fields
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in raw.parse() if chunk.choices)
    return raw.headers[REPLICA_HEADER], text


def health(base_url: str) -> dict:
    return requests.get(base_url + "/health", timeout=30).json()


def owner(ring: HashRing, messages: list[dict]) -> str:
    """The replica the prefix router places ``messages`` on (the ingress keys the parsed body alike)."""
    return ring.owner(prefix_key("/v1/chat/completions", json.dumps({"messages": messages}).encode()))


# -- without a running cluster ------------------------------------------------------------------------------
def test_the_serve_run_builder_takes_qwenvl_flags(make_qwen2):
    from ray.serve import Application

    model = str(make_qwen2("default"))
    built = deploy.app({"model": model, "replicas": "3", "threads_per_replica": "1", "max_batch": 4, "no_pin": "true"})
    assert isinstance(built, Application)
    with pytest.raises(QwenVLError, match="port: give it to `serve run`"):
        deploy.app({"model": model, "port": "8000"})
    with pytest.raises(QwenVLError, match="invalid qwenvl arguments .unrecognized arguments: --bogus-flag 1"):
        deploy.app({"model": model, "bogus_flag": "1"})
    with pytest.raises(QwenVLError, match="no such model"):
        deploy.app({"model": "/nonexistent/model.gguf"})


def test_the_cli_serves_and_stops_cleanly_on_ctrl_c(make_qwen2):
    """`qwenvl serve --ray` as a user runs it: up, answering, and on Ctrl-C (SIGINT to its process group, as
    a terminal sends it) gone with its whole local Ray instance."""
    port = free_port()
    command = [sys.executable, "-m", "qwenvl", "serve", str(make_qwen2("default")), "--dtype", "float32"]
    command += ["--ray", "--replicas", "1", "--threads-per-replica", "1", "--port", str(port), "--log-level", "warning"]
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        started = time.monotonic()
        lines = []
        for line in process.stderr:
            lines.append(line)
            if line.startswith("qwenvl serve:"):
                break
        assert lines and lines[-1].startswith("qwenvl serve:"), "".join(lines[-20:])
        assert "1 replicas × 1 threads, router prefix" in lines[-1] and f":{port}/v1" in lines[-1]
        print(f"qwenvl serve --ray: up in {time.monotonic() - started:.1f} s")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=120)
        answer = client.chat.completions.create(model="tiny", messages=conversation("hi"), max_tokens=4)
        assert answer.choices[0].finish_reason in ("stop", "length") and answer.usage.completion_tokens > 0
        os.killpg(process.pid, signal.SIGINT)
        stopping = time.monotonic()
        assert process.wait(timeout=90) == 0
        print(f"qwenvl serve --ray: stopped in {time.monotonic() - stopping:.1f} s")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # its Ray processes (same process group) are gone too
            try:
                os.killpg(process.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.5)
        else:
            pytest.fail("processes of the local Ray instance outlived `qwenvl serve --ray`")
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        process.stderr.close()


# -- on a running cluster: 2 replicas × 1 thread ------------------------------------------------------------
@dataclass
class Served:
    base_url: str
    client: openai.OpenAI
    ring: HashRing  # of the replicas at the start
    questions: list[str]  # 8: 4 placed on each replica


@pytest.fixture(scope="module")
def served(make_qwen2):
    port = free_port()
    args = serve_args(
        make_qwen2("default"),
        *("--ray", "--replicas", "2", "--threads-per-replica", "1", "--max-batch", "4"),
        *("--port", str(port), "--api-key", KEY),
    )
    started = time.perf_counter()
    started_here = deploy.start(args, serve_settings(args))
    print(f"local Ray + 2 replicas up in {time.perf_counter() - started:.1f} s")
    try:
        base_url = f"http://127.0.0.1:{port}"
        ring = HashRing(replica["replica"] for replica in health(base_url)["replicas"])
        questions = []
        for replica in sorted(ring.members):
            questions += [q for q in POOL if owner(ring, conversation(q)) == replica][:4]
        assert len(questions) == 8
        client = openai.OpenAI(base_url=base_url + "/v1", api_key=KEY, max_retries=0, timeout=120)
        yield Served(base_url, client, ring, questions)
    finally:
        deploy.disconnect(started_here)


def test_concurrent_streams_equal_the_same_requests_alone_and_both_replicas_serve(served):
    questions = served.questions
    alone = [streamed(served.client, conversation(question)) for question in questions]
    # one at a time, each went where the ring places it
    assert [replica for replica, _ in alone] == [owner(served.ring, conversation(q)) for q in questions]
    with concurrent.futures.ThreadPoolExecutor(len(questions)) as pool:
        together = list(pool.map(lambda question: streamed(served.client, conversation(question)), questions))
    assert [text for _, text in together] == [text for _, text in alone]
    assert len({text for _, text in alone}) > 1 and all(text for _, text in alone)
    assert {replica for replica, _ in together} == served.ring.members  # both replicas served


def test_a_second_turn_lands_on_the_replica_of_its_first_turn(served):
    for question in served.questions[::2]:
        first = conversation(question)
        replica, answer = streamed(served.client, first)
        second = first + [{"role": "assistant", "content": answer}, {"role": "user", "content": "And then?"}]
        assert streamed(served.client, second)[0] == replica
        raw = served.client.chat.completions.with_raw_response.create(
            model="tiny", messages=second + [{"role": "assistant", "content": "x"}, {"role": "user", "content": "?"}]
        )
        assert raw.headers[REPLICA_HEADER] == replica  # not streamed: the same


def test_a_saturated_replica_passes_requests_to_the_least_loaded_one(served):
    first, second = sorted(served.ring.members)
    questions = [q for q in POOL if owner(served.ring, conversation(q)) == first][:6]
    streams, placed = [], []
    try:
        for question in questions:  # one after another: each is running before the next is routed
            raw = served.client.chat.completions.with_raw_response.create(
                model="tiny",
                messages=conversation(question),
                max_tokens=3000,
                stream=True,
                extra_body={"ignore_eos": True},
            )
            streams.append(raw.parse())
            placed.append(raw.headers[REPLICA_HEADER])
    finally:
        for stream in streams:
            stream.close()
    assert placed == [first] * 4 + [second] * 2  # --max-batch 4: the owner is saturated from the 5th on


def test_a_replica_serves_the_whole_api(served):
    models = requests.get(served.base_url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert models.status_code == 200 and models.json()["data"][0]["max_model_len"] == 4096
    assert models.headers[REPLICA_HEADER]
    refused = requests.post(served.base_url + "/v1/chat/completions", json={"messages": []}, timeout=30)
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.BadRequestError) as bad:
        served.client.chat.completions.create(model="tiny", messages=conversation("hi"), max_tokens=-1)
    assert bad.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError, match="local files are disabled"):
        image = {"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}
        served.client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": [image]}])
    completion = served.client.completions.create(model="tiny", prompt="def f(x):", max_tokens=6, temperature=0)
    assert completion.usage.completion_tokens > 0
    too_big = requests.post(
        served.base_url + "/v1/completions", data=b"x" * (33 * 2**20), headers={"Authorization": f"Bearer {KEY}"}
    )
    assert too_big.status_code == 413 and "limit" in too_big.json()["error"]["message"]
    page = requests.get(served.base_url + "/", timeout=30)  # the chat page, from a replica like the rest
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.headers[REPLICA_HEADER]
    missing = requests.get(served.base_url + "/nowhere", headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"
    unkeyed = requests.get(served.base_url + "/metrics", timeout=30)  # the replicas' answer, passed on
    assert unkeyed.status_code == 401 and unkeyed.json()["error"]["code"] == "invalid_api_key"


def test_health_lists_every_replica_and_sums_them(served):
    status = health(served.base_url)
    assert status["status"] == "ok", status
    replicas = status["replicas"]
    assert len(replicas) == 2 and len({replica["replica"] for replica in replicas}) == 2
    for replica in replicas:
        assert replica["status"] == "ok" and replica["threads"] == 1 and replica["max_batch"] == 4
        assert replica["pid"] > 0 and replica["host"] and replica["node_id"]
    assert status["steps"] == sum(replica["steps"] for replica in replicas) > 0
    assert status["running"] == status["waiting"] == status["kv_cache_bytes"] == 0
    pinned = [replica["cpus"] for replica in replicas]
    if len(os.sched_getaffinity(0)) >= 2:  # each replica on a CPU of its own
        assert all(cpus and len(cpus) == 1 for cpus in pinned) and pinned[0] != pinned[1]


def test_metrics_of_every_replica_in_one_exposition(served):
    from prometheus_client.parser import text_string_to_metric_families

    answer = requests.get(served.base_url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/plain")
    families = {family.name: family for family in text_string_to_metric_families(answer.text)}
    samples = [sample for family in families.values() for sample in family.samples]
    assert samples and all("replica" in sample.labels for sample in samples)
    ids = {replica["replica"] for replica in health(served.base_url)["replicas"]}
    assert {sample.labels["replica"] for sample in samples} == ids
    steps = {s.labels["replica"]: s.value for s in samples if s.name.startswith("qwenvl_engine_steps")}
    assert set(steps) == ids and sum(steps.values()) > 0  # each replica's own counters, side by side


def test_a_client_leaving_a_stream_frees_its_replica(served):
    stream = served.client.chat.completions.create(
        model="tiny", messages=conversation("go on"), max_tokens=3000, stream=True, extra_body={"ignore_eos": True}
    )
    for count, _ in enumerate(stream):
        if count == 3:
            break
    stream.close()
    deadline = time.monotonic() + 20
    while health(served.base_url)["running"] and time.monotonic() < deadline:
        time.sleep(0.2)
    status = health(served.base_url)
    assert status["running"] == 0 and status["kv_cache_bytes"] == 0, status


def test_killing_a_replica_mid_answer_ends_its_requests_with_errors_and_the_others_serve(served):
    victim = sorted(served.ring.members)[0]
    streamed_question, whole_question = [q for q in POOL if owner(served.ring, conversation(q)) == victim][:2]
    long_answer = {"max_tokens": 3000, "extra_body": {"ignore_eos": True}}
    whole: dict = {}

    def not_streamed() -> None:
        try:
            served.client.chat.completions.create(model="tiny", messages=conversation(whole_question), **long_answer)
        except openai.APIError as error:
            whole["error"], whole["at"] = error, time.monotonic()

    waiter = threading.Thread(target=not_streamed)
    waiter.start()
    raw = served.client.chat.completions.with_raw_response.create(
        model="tiny", messages=conversation(streamed_question), stream=True, **long_answer
    )
    assert raw.headers[REPLICA_HEADER] == victim
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # both requests running on the victim
        replicas = {replica["replica"]: replica for replica in health(served.base_url)["replicas"]}
        if replicas[victim]["running"] == 2:
            break
        time.sleep(0.1)
    killed_at = None
    chunks = 0
    with pytest.raises(openai.APIError, match=f"replica {victim} stopped") as error:
        for _ in raw.parse():
            chunks += 1
            if chunks == 3:
                os.kill(replicas[victim]["pid"], signal.SIGKILL)
                killed_at = time.monotonic()
    assert killed_at is not None and time.monotonic() - killed_at < 10
    print(f"the stream ended {time.monotonic() - killed_at:.2f} s after the kill: {error.value}")
    waiter.join(timeout=30)
    assert not waiter.is_alive() and isinstance(whole.get("error"), openai.APIStatusError), whole
    assert whole["error"].status_code == 503 and whole["error"].body["code"] == "replica_lost"
    assert whole["at"] - killed_at < 10  # the unstarted answer: a 503 the client may retry
    for question in served.questions[:4]:  # later requests are answered (by the replica left, or the restarted one)
        replica, text = streamed(served.client, conversation(question))
        assert text and replica != victim
    deadline = time.monotonic() + 180  # Ray restarts the dead replica
    while time.monotonic() < deadline:
        status = health(served.base_url)
        if status["status"] == "ok" and len(status["replicas"]) == 2 and victim not in str(status["replicas"]):
            break
        time.sleep(1)
    else:
        pytest.fail(f"the killed replica was not replaced: {status}")
