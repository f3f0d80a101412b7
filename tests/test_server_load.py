"""Bounded load test: 12 concurrent streaming clients (scripts/loadgen.py) plus image requests, on a server
batching at most 8: every answer equals the same request served alone, no errors, nothing left behind."""

from __future__ import annotations

import gc
import importlib.util
import json
import subprocess
import sys
import threading
from pathlib import Path

import openai
import pytest
import requests
from test_server_support import data_uri, live_server, png_bytes

import qwenvl
from qwenvl.engine.scheduler import RequestHandle

LOADGEN = Path(__file__).resolve().parent.parent / "scripts" / "loadgen.py"
MAX_TOKENS = 16


def load_loadgen():
    spec = importlib.util.spec_from_file_location("loadgen", LOADGEN)
    module = importlib.util.module_from_spec(spec)
    sys.modules["loadgen"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def loadgen():
    return load_loadgen()


@pytest.fixture(scope="module")
def server(make_vl):
    model = qwenvl.load(make_vl("default"), dtype="float32")
    with live_server(model, max_batch=8) as running:
        yield running


def health(server) -> dict:
    return requests.get(server.base_url + "/health", timeout=10).json()


def image_messages(seed: int) -> list[dict]:
    image = {"type": "image_url", "image_url": {"url": data_uri(png_bytes(56 + 28 * seed, 56, seed=seed))}}
    return [{"role": "user", "content": [image, {"type": "text", "text": f"Picture {seed}?"}]}]


def streamed_text(client, messages) -> str:
    chunks = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=MAX_TOKENS, temperature=0, stream=True
    )
    return "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)


def test_concurrent_answers_equal_answers_alone(server, loadgen):
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0, timeout=120)
    # served alone, one after another
    _, alone_text = loadgen.run_load(server.base_url, clients=1, requests=len(loadgen.PROMPTS), max_tokens=MAX_TOKENS)
    expected = {result.prompt: result.text for result in alone_text}
    expected_images = {seed: streamed_text(client, image_messages(seed)) for seed in (1, 2)}
    assert len(set(expected.values())) > 1
    assert health(server)["kv_cache_bytes"] == 0

    # the same requests, 12 clients at once, with two image requests joining the batch mid-way
    image_answers: dict[int, str] = {}
    image_threads = [
        threading.Thread(target=lambda s=seed: image_answers.__setitem__(s, streamed_text(client, image_messages(s))))
        for seed in (1, 2)
    ]
    steps_before = health(server)["steps"]
    timer = threading.Timer(0.3, lambda: [thread.start() for thread in image_threads])
    timer.start()
    report, results = loadgen.run_load(server.base_url, clients=12, requests=36, max_tokens=MAX_TOKENS)
    timer.join()
    for thread in image_threads:
        thread.join(timeout=120)

    assert report.errors == 0 and report.ok == 36, report.error_messages
    assert all(result.status == 200 for result in results)
    for result in results:
        assert result.text == expected[result.prompt], result.index
    assert image_answers == expected_images
    assert report.tok_s > 0 and report.mean_ttft_s is not None
    # decoded together: far fewer engine steps than tokens
    assert health(server)["steps"] - steps_before < report.completion_tokens / 3

    # everything released: no request running or waiting, no KV cache, no request object alive
    after = health(server)
    assert (after["running"], after["waiting"], after["kv_cache_bytes"]) == (0, 0, 0)
    gc.collect()
    assert not [obj for obj in gc.get_objects() if type(obj) is RequestHandle]


def test_loadgen_command_line(server):
    out = subprocess.run(
        [
            sys.executable,
            str(LOADGEN),
            "--base-url",
            server.base_url + "/v1",
            "--clients",
            "3",
            "--requests",
            "4",
            "--max-tokens",
            "4",
            "--ignore-eos",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["ok"] == 4 and report["errors"] == 0 and report["completion_tokens"] == 16
    text = subprocess.run(
        [
            sys.executable,
            str(LOADGEN),
            "--base-url",
            server.base_url,
            "--clients",
            "1",
            "--requests",
            "1",
            "--max-tokens",
            "2",
            "--prompt",
            "Hi",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert text.returncode == 0 and "aggregate" in text.stdout and "mean TTFT" in text.stdout


def test_loadgen_counts_errors(server, loadgen):
    report, results = loadgen.run_load(server.base_url, clients=2, requests=2, max_tokens=10**9)
    assert report.errors == 2 and all(result.status == 400 for result in results)
    assert "beyond the context" in report.error_messages[0]


def test_loadgen_shared_system_prompt(server, loadgen):
    """``system=``: every request starts with that system message (the usage's prompt tokens grow by
    the same amount for every request); the report gives the mean prompt tokens."""
    plain, plain_results = loadgen.run_load(server.base_url, clients=2, requests=2, max_tokens=2, prompt="Hi")
    shared, results = loadgen.run_load(
        server.base_url, clients=2, requests=2, max_tokens=2, prompt="Hi", system="Answer tersely. " * 20
    )
    assert plain.errors == shared.errors == 0
    assert {r.prompt_tokens for r in results} == {shared.mean_prompt_tokens}
    assert shared.mean_prompt_tokens > plain.mean_prompt_tokens + 40
    assert loadgen.chat_body("Hi", 4, "m", 0.0, False, system="S")["messages"][0] == {"role": "system", "content": "S"}
