"""qwenvl serve with the real openai client on a live 127.0.0.1 server (tiny random Qwen2-VL checkpoint):
text, images, video, streaming, stop strings, seeds, completions, parity with `qwenvl run`, disconnects."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time

import openai
import pytest
import requests
from test_server_support import data_uri, live_server, png_bytes, sse_payloads, video_file

import qwenvl
from qwenvl.cli import main as cli_main

MAX_TOKENS = 12


@pytest.fixture(scope="module")
def vl_dir(make_vl):
    return make_vl("default")


@pytest.fixture(scope="module")
def model(vl_dir):
    return qwenvl.load(vl_dir, dtype="float32")


@pytest.fixture(scope="module")
def server(model):
    with live_server(model, max_batch=4) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=60)


def alone(model, messages, max_tokens=MAX_TOKENS, **media):
    """The greedy answer of the model itself, with nothing else running."""
    prompt = model.prepare(messages, **media)
    generation = model.generate(prompt, temperature=0, max_tokens=max_tokens)
    for _ in generation:
        pass
    return len(prompt.input_ids), generation.result


def image_part(data: bytes) -> dict:
    return {"type": "image_url", "image_url": {"url": data_uri(data)}}


def chat(client, messages, **options):
    options = {"max_tokens": MAX_TOKENS, "temperature": 0, **options}
    return client.chat.completions.create(model="tiny", messages=messages, **options)


def test_models_and_health(client, server, model):
    cards = client.models.list().data
    assert [card.id for card in cards] == ["tiny"]
    health = requests.get(server.base_url + "/health", timeout=10).json()
    assert health["status"] == "ok" and health["running"] == 0 and health["waiting"] == 0


def test_text_chat_equals_the_model_alone(client, model):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    response = chat(client, messages)
    prompt_tokens, expected = alone(model, messages)
    choice = response.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == expected.text
    assert choice.finish_reason == expected.finish_reason
    assert response.usage.prompt_tokens == prompt_tokens
    assert response.usage.completion_tokens == expected.completion_tokens
    assert response.usage.total_tokens == prompt_tokens + expected.completion_tokens
    assert response.model == "tiny" and response.id.startswith("chatcmpl-")


@pytest.mark.parametrize("with_image", [False, True], ids=["text", "image"])
def test_greedy_answer_equals_qwenvl_run(client, vl_dir, capsys, tmp_path, with_image):
    prompt = "Describe this." if with_image else "Say hello."
    image = png_bytes(64, 48, seed=3)
    (tmp_path / "picture.png").write_bytes(image)
    run_args = [
        "run",
        str(vl_dir),
        "-p",
        prompt,
        "--temperature",
        "0",
        "-n",
        str(MAX_TOKENS),
        "--json",
        "--dtype",
        "float32",
    ]
    assert cli_main(run_args + (["--image", str(tmp_path / "picture.png")] if with_image else [])) == 0
    expected = json.loads(capsys.readouterr().out)
    content = [image_part(image), {"type": "text", "text": prompt}] if with_image else prompt
    response = chat(client, [{"role": "user", "content": content}])
    assert response.choices[0].message.content == expected["text"]
    assert response.usage.prompt_tokens == expected["prompt_tokens"]
    assert response.usage.completion_tokens == expected["completion_tokens"]


def test_one_and_two_base64_images(client, model):
    first, second = png_bytes(56, 56, seed=1), png_bytes(84, 56, seed=2)
    one = [{"role": "user", "content": [image_part(first), {"type": "text", "text": "What is it?"}]}]
    two = [{"role": "user", "content": [image_part(first), image_part(second), {"type": "text", "text": "Compare."}]}]
    for messages, sources in ((one, [first]), (two, [first, second])):
        response = chat(client, messages)
        images = [{"type": "image", "image": source} for source in sources]
        local = [{"role": "user", "content": images + [messages[0]["content"][-1]]}]
        prompt_tokens, expected = alone(model, local)
        assert response.usage.prompt_tokens == prompt_tokens
        assert response.choices[0].message.content == expected.text
    assert chat(client, two).usage.prompt_tokens > chat(client, one).usage.prompt_tokens


def test_mm_processor_kwargs_resize_images(client):
    big = png_bytes(224, 224, seed=4)
    messages = [{"role": "user", "content": [image_part(big), {"type": "text", "text": "?"}]}]
    full = chat(client, messages, max_tokens=1).usage.prompt_tokens
    small = chat(client, messages, max_tokens=1, extra_body={"mm_processor_kwargs": {"max_pixels": 56 * 56}})
    assert full - small.usage.prompt_tokens == (224 // 28) ** 2 - 4  # 64 merged tokens become 4


def test_video_url(client, model, tmp_path):
    clip = video_file(tmp_path / "clip.mp4", frames=6).read_bytes()
    part = {"type": "video_url", "video_url": {"url": data_uri(clip, "video/mp4")}}
    messages = [{"role": "user", "content": [part, {"type": "text", "text": "What happens?"}]}]
    response = chat(client, messages, extra_body={"mm_processor_kwargs": {"nframes": 4}})
    prompt_tokens, expected = alone(
        model, [{"role": "user", "content": [{"type": "video", "video": clip}, messages[0]["content"][1]]}], nframes=4
    )
    assert response.usage.prompt_tokens == prompt_tokens
    assert response.choices[0].message.content == expected.text
    # a video item's own keys (qwen-vl-utils names) sit beside video_url
    fewer = chat(client, [{"role": "user", "content": [{**part, "nframes": 2}, {"type": "text", "text": "?"}]}])
    assert fewer.usage.prompt_tokens < response.usage.prompt_tokens


def test_streaming_with_usage_equals_the_whole_answer(client):
    messages = [{"role": "user", "content": "Count to five."}]
    whole = chat(client, messages)
    chunks = list(chat(client, messages, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(chunk.object == "chat.completion.chunk" and chunk.id == chunks[0].id for chunk in chunks)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == whole.choices[0].message.content
    finishes = [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices and chunk.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()
    without_usage = list(chat(client, messages, stream=True))
    assert all(chunk.usage is None for chunk in without_usage)


def test_stream_ends_with_done(server):
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0, "stream": True}
    response = requests.post(server.base_url + "/v1/chat/completions", json=body, timeout=60)
    assert response.headers["content-type"].startswith("text/event-stream")
    payloads = sse_payloads(response.text)
    assert payloads[-1] == "[DONE]" and payloads[-2]["choices"][0]["finish_reason"] in ("stop", "length")


@pytest.mark.parametrize("stream", [False, True])
def test_stop_strings(client, stream):
    messages = [{"role": "user", "content": "Tell me a story."}]
    full = chat(client, messages, max_tokens=24).choices[0].message.content
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    expected = full[: full.find(stop)]
    if stream:
        chunks = list(chat(client, messages, max_tokens=24, stop=[stop, "never-there"], stream=True))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    else:
        response = chat(client, messages, max_tokens=24, stop=stop)
        text, finish = response.choices[0].message.content, [response.choices[0].finish_reason]
    assert text == expected and finish == ["stop"]


def test_seed_reproducibility(client):
    messages = [{"role": "user", "content": "Invent a word."}]

    def sampled(seed):
        return chat(client, messages, temperature=1.0, top_p=1.0, seed=seed, max_tokens=16).choices[0].message.content

    first = sampled(1234)
    assert sampled(1234) == first
    assert sampled(4321) != first


@pytest.mark.parametrize("stream", [False, True])
def test_n_choices_share_the_prompt(client, model, stream):
    """n choices: each is what that seed gives alone; greedy choices are all the greedy answer; the
    usage counts the prompt once. The choices' blocks all go back to the pool."""
    messages = [{"role": "user", "content": "Invent a word."}]
    options = dict(temperature=1.0, top_p=1.0, seed=77, max_tokens=10)
    want = [chat(client, messages, **{**options, "seed": 77 + i}).choices[0].message.content for i in range(3)]
    if stream:
        chunks = list(chat(client, messages, n=3, stream=True, stream_options={"include_usage": True}, **options))
        texts = ["".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == i)
                 for i in range(3)]  # fmt: skip
        finishes = [c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason]
        assert sorted(finishes) == [0, 1, 2]
        usage = chunks[-1].usage
    else:
        response = chat(client, messages, n=3, **options)
        assert [choice.index for choice in response.choices] == [0, 1, 2]
        texts, usage = [choice.message.content for choice in response.choices], response.usage
    assert texts == want and len(set(texts)) > 1
    single = chat(client, messages, **options).usage
    assert usage.prompt_tokens == single.prompt_tokens
    greedy = chat(client, messages, n=2, temperature=0, max_tokens=8)
    assert greedy.choices[0].message.content == greedy.choices[1].message.content
    completion = client.completions.create(model="tiny", prompt="Once upon", n=2, temperature=0, max_tokens=6)
    assert [c.index for c in completion.choices] == [0, 1] and completion.choices[0].text == completion.choices[1].text
    assert not any(model.kv_pool.refs)


def test_completions_string_and_token_ids(client, model):
    text = "The capital of France is"
    ids = model.tokenizer.encode(text)
    generation = model.generate(ids, temperature=0, max_tokens=MAX_TOKENS)
    for _ in generation:
        pass
    for prompt in (text, ids):
        response = client.completions.create(model="tiny", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
        assert response.object == "text_completion"
        assert response.choices[0].text == generation.result.text
        assert response.usage.prompt_tokens == len(ids)
    streamed = client.completions.create(model="tiny", prompt=text, max_tokens=MAX_TOKENS, temperature=0, stream=True)
    assert "".join(chunk.choices[0].text for chunk in streamed if chunk.choices) == generation.result.text


def test_default_max_tokens_and_max_completion_tokens(client):
    messages = [{"role": "user", "content": "Go on forever."}]
    response = client.chat.completions.create(
        model="any-name", messages=messages, temperature=0, max_completion_tokens=5, extra_body={"ignore_eos": True}
    )
    assert response.usage.completion_tokens == 5 and response.choices[0].finish_reason == "length"


def _wait_idle(base_url: str, seconds: float) -> dict:
    deadline = time.monotonic() + seconds
    while True:
        health = requests.get(base_url + "/health", timeout=10).json()
        if health["running"] == 0 and health["waiting"] == 0 or time.monotonic() > deadline:
            return health
        time.sleep(0.05)


@pytest.mark.parametrize("stream", [True, False])
def test_disconnected_client_is_cancelled(server, stream):
    """A long request whose client goes away stops at once (it would take many seconds to finish)."""
    body = {
        "messages": [{"role": "user", "content": "Go."}],
        "max_tokens": 3000,
        "temperature": 0,
        "ignore_eos": True,
        "stream": stream,
    }
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    connection.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    if stream:
        response = connection.getresponse()
        assert response.status == 200
        response.fp.readline()  # the first event has arrived: the request is running
    else:
        deadline = time.monotonic() + 30
        while requests.get(server.base_url + "/health", timeout=10).json()["running"] == 0:
            assert time.monotonic() < deadline
            time.sleep(0.02)
    connection.sock.shutdown(socket.SHUT_RDWR)
    connection.close()
    health = _wait_idle(server.base_url, 5)
    assert health["running"] == 0 and health["waiting"] == 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_serve_command(vl_dir):
    """`qwenvl serve` binds to 127.0.0.1 by default and answers the openai client."""
    port = _free_port()
    command = [
        sys.executable,
        "-m",
        "qwenvl",
        "serve",
        str(vl_dir),
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--max-batch",
        "2",
        "--log-level",
        "warning",
    ]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "QWENVL_API_KEY": ""}
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, process.communicate()[1]
            try:
                if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).ok:
                    break
            except requests.ConnectionError:
                assert time.monotonic() < deadline
                time.sleep(0.2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        assert [card.id for card in client.models.list().data] == [vl_dir.name]
        answer = client.chat.completions.create(
            model=vl_dir.name, messages=[{"role": "user", "content": "Hi"}], max_tokens=3, temperature=0
        )
        assert answer.usage.completion_tokens >= 1
    finally:
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=30)
    assert process.returncode == 0, stderr
    assert f"http://127.0.0.1:{port}/v1" in stderr
    assert "OpenMP wait policy PASSIVE" in stderr and "--threads N to change" in stderr  # docs/engine.md
    assert f"qwenvl: loading {vl_dir.name} … done (" in stderr  # the status lines, always in serve's log


def test_serve_command_user_errors(vl_dir, tmp_path, capsys):
    """Bad flags are one-line errors (exit 2), found before the model is loaded."""
    assert cli_main(["serve", str(vl_dir), "--limit-mm-per-prompt", "audio=1"]) == 2
    assert "--limit-mm-per-prompt" in capsys.readouterr().err
    assert cli_main(["serve", str(vl_dir), "--allowed-local-media-path", str(tmp_path / "nope")]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert cli_main(["serve", str(vl_dir), "--allowed-media-domains", "https://example.com"]) == 2
    assert "host names only" in capsys.readouterr().err
    assert cli_main(["serve", str(vl_dir), "--max-batch", "0"]) == 2
    assert "--max-batch must be a positive number" in capsys.readouterr().err
