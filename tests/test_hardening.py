"""Issue 23's faults, one test (or a few) per item: each is a clear 4xx or exit 2, never a 5xx, a
traceback or a hang.

1. a many-frame GIF is refused before decoding, and decoding never holds the vision lock;
2. extreme sampling values: a 400 outside the documented ranges, a sampled token inside them;
3. mutated config.json files: one line, exit 2, in time; safetensors headers with bad entries;
4. stalled connections are closed by their deadlines; a full queue is a 429, a long wait a 503;
5. --api-key guards every route but /health, with any case of "Bearer";
6. stale ``.NAME.partial-PID`` files of killed runs are removed by the next run;
7. ``from qwenvl import *``.

The big corpora (the full float range for every sampling field, every config field × bad value) are
marked ``fuzz`` (``make test-fuzz``); a fixed-seed sample of each runs here.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from fault_corpus import config_mutations, run_cli, safetensors_mutations
from gguf_fixtures import write_tiny_gguf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from test_server_support import data_uri, live_server, png_bytes

import qwenvl
import qwenvl.cli
from qwenvl.config import PreprocessConfig
from qwenvl.durable import partial_path, remove_stale_partials
from qwenvl.engine.sampler import Sampler, SamplingParams
from qwenvl.errors import MediaError
from qwenvl.media import video as video_module
from qwenvl.media.limits import VideoLimits
from qwenvl.media.video import decode_video, plan_video

ROOT = Path(__file__).resolve().parent.parent
IMAGE_URI = data_uri(png_bytes(56, 56, seed=3))


@pytest.fixture(scope="module")
def vl_model(make_vl):
    return qwenvl.load(make_vl("default"), dtype="float32", context=256)


def gif_bytes(frames: int, size: int = 16) -> bytes:
    """An animated GIF of ``frames`` distinct frames (one pixel moves), 20 ms each."""
    base = np.zeros((size, size, 3), dtype=np.uint8)
    images = []
    for i in range(frames):
        pixels = base.copy()
        pixels[i % size, (i // size) % size] = (255, (7 * i) % 256, (13 * i) % 256)
        images.append(Image.fromarray(pixels))
    buffer = io.BytesIO()
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:], duration=20, loop=0)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def many_frame_gif() -> bytes:
    return gif_bytes(10_000)


def chat_body(*parts: dict, **extra) -> dict:
    return {"messages": [{"role": "user", "content": [*parts, {"type": "text", "text": "what?"}]}], **extra}


IMAGE_PART = {"type": "image_url", "image_url": {"url": IMAGE_URI}}


# -- 1. video limits and the vision lock ---------------------------------------------------------------------


def test_many_frame_gif_refused_fast_while_an_image_request_completes(vl_model, many_frame_gif):
    video = {"type": "video_url", "video_url": {"url": data_uri(many_frame_gif, "video/gif")}}
    with live_server(vl_model, default_max_tokens=4) as server:
        url = server.base_url + "/v1/chat/completions"
        results: dict = {}

        def send_video() -> None:
            started = time.monotonic()
            results["video"] = requests.post(url, json=chat_body(video), timeout=30)
            results["video_s"] = time.monotonic() - started

        thread = threading.Thread(target=send_video)
        thread.start()
        started = time.monotonic()
        image = requests.post(url, json=chat_body(IMAGE_PART, max_tokens=3), timeout=30)
        image_s = time.monotonic() - started
        thread.join(30)
    assert results["video"].status_code == 400
    message = results["video"].json()["error"]["message"]
    assert "10000 frames to decode, more than the 7200-frame limit (--max-video-frames" in message
    assert results["video_s"] < 1.0, results["video_s"]
    assert image.status_code == 200 and image_s < 10, (image.status_code, image_s)


def test_video_decoding_runs_outside_the_vision_lock(vl_model, monkeypatch):
    """A video held up in its decoding does not keep an image request from being answered."""
    decoding, release = threading.Event(), threading.Event()
    real_frame_tensor = video_module._frame_tensor

    def slow_frame_tensor(frame, size):
        decoding.set()
        release.wait(20)
        return real_frame_tensor(frame, size)

    monkeypatch.setattr(video_module, "_frame_tensor", slow_frame_tensor)
    clip = {
        "type": "video_url",
        "video_url": {"url": data_uri(gif_bytes(8, size=56), "video/gif")},
        "min_pixels": 56 * 56,
        "max_pixels": 56 * 56,
    }
    with live_server(vl_model, default_max_tokens=3) as server:
        url = server.base_url + "/v1/chat/completions"
        results: dict = {}
        thread = threading.Thread(target=lambda: results.update(video=requests.post(url, json=chat_body(clip))))
        thread.start()
        assert decoding.wait(20)
        try:
            image = requests.post(url, json=chat_body(IMAGE_PART), timeout=15)
            assert image.status_code == 200, image.text
            assert thread.is_alive()  # the video is still being decoded
        finally:
            release.set()
            thread.join(30)
    assert results["video"].status_code == 200, results["video"].text


def test_video_limits_and_decode_budget(tmp_path):
    data = gif_bytes(300)
    config = PreprocessConfig()
    with pytest.raises(MediaError, match="300 frames to decode, more than the 100-frame limit"):
        plan_video(data, config, limits=VideoLimits(max_frames=100))
    with pytest.raises(MediaError, match=r"6\.0 s of video to decode, more than the 5 s limit"):
        plan_video(data, config, limits=VideoLimits(max_seconds=5))
    plan = plan_video(data, config, video_module.VideoOptions(video_end=1.0), limits=VideoLimits(max_seconds=5))
    assert max(plan.frame_indices) <= 50  # the part to decode ends at 1 s: within the limits
    slow = plan_video(data, config, limits=VideoLimits(decode_timeout=1e-6))
    with pytest.raises(MediaError, match=r"decoding took more than 1e-06 s"):
        decode_video(slow)
    frames = [Image.new("RGB", (56, 56))] * 12
    with pytest.raises(MediaError, match="12 frames to decode, more than the 10-frame limit"):
        plan_video(frames, config, limits=VideoLimits(max_frames=10))


def test_video_limit_flags(vl_model, make_vl, tmp_path, capsys):
    path = tmp_path / "clip.gif"
    path.write_bytes(gif_bytes(40))
    model = str(make_vl("default"))
    status = qwenvl.cli.main(["run", model, "-p", "x", "-n", "1", "--video", str(path), "--max-video-frames", "20"])
    assert status == 2 and "40 frames to decode, more than the 20-frame limit" in capsys.readouterr().err
    assert qwenvl.cli.main(["run", model, "-p", "x", "--max-video-seconds", "0"]) == 2
    assert "--max-video-seconds must be a positive number" in capsys.readouterr().err
    with pytest.raises(MediaError, match=r"0\.8 s of video to decode, more than the 0\.1 s limit"):
        vl_model.chat(
            [{"role": "user", "content": [{"type": "video", "video": str(path)}, {"type": "text", "text": "x"}]}],
            max_tokens=1,
            max_video_seconds=0.1,
        )


# -- 2. extreme sampling values --------------------------------------------------------------------------------

EXTREMES = [0.0, 5e-324, 2.2250738585072014e-308, 1e-300, 1e-5, 0.5, 1.0, 2.0, 1e300, 1.7976931348623157e308]
ANY_FLOAT = st.floats(allow_nan=False, allow_infinity=False, allow_subnormal=True) | st.sampled_from(
    EXTREMES + [-x for x in EXTREMES]
)


def _sampler_params(temperature, top_p, min_p, repetition_penalty, presence, frequency, top_k):
    """The values the schema lets through, squeezed into their ranges as the schema would demand."""
    return SamplingParams(
        max_tokens=4,
        temperature=min(abs(temperature), 2.0),
        top_k=top_k,
        top_p=min(max(abs(top_p), 5e-324), 1.0),
        min_p=min(abs(min_p), 1.0),
        repetition_penalty=max(abs(repetition_penalty), 5e-324),
        presence_penalty=max(min(presence, 2.0), -2.0),
        frequency_penalty=max(min(frequency, 2.0), -2.0),
        seed=0,
    ).validate()


LOGITS = [
    torch.randn(97, generator=torch.Generator().manual_seed(0)) * 4,
    torch.tensor([float("inf"), 1.0, float("inf"), -3.0] * 8),
    torch.tensor([float("-inf")] * 16 + [0.0]),
    torch.full((12,), float("-inf")),
    torch.tensor([float("nan"), 2.0, 1.0, float("nan")]),
    torch.tensor([3e38, -3e38, 0.0, 1e-45]),
]


def _check_sampler(params: SamplingParams) -> None:
    sampler = Sampler(params)
    for logits in LOGITS:
        history = torch.arange(min(6, logits.numel()))
        token = sampler(logits.clone(), history, history[:3])
        assert 0 <= token < logits.numel()
        if not math.isnan(float(logits[token])) and torch.isfinite(logits).any():
            assert not math.isnan(float(logits[token]))


SAMPLER_GIVEN = given(
    temperature=ANY_FLOAT,
    top_p=ANY_FLOAT,
    min_p=ANY_FLOAT,
    repetition_penalty=ANY_FLOAT,
    presence=ANY_FLOAT,
    frequency=ANY_FLOAT,
    top_k=st.integers(0, 2**70),
)


@settings(max_examples=150, deadline=None, derandomize=True)
@SAMPLER_GIVEN
def test_sampler_never_fails_on_extreme_values(
    temperature, top_p, min_p, repetition_penalty, presence, frequency, top_k
):
    _check_sampler(_sampler_params(temperature, top_p, min_p, repetition_penalty, presence, frequency, top_k))


@pytest.mark.fuzz
@settings(max_examples=5000, deadline=None, derandomize=True)
@SAMPLER_GIVEN
def test_sampler_fuzz_full_float_range(temperature, top_p, min_p, repetition_penalty, presence, frequency, top_k):
    _check_sampler(_sampler_params(temperature, top_p, min_p, repetition_penalty, presence, frequency, top_k))


def test_sampler_infinite_scores_share_the_choice():
    """+inf scores after a penalty: only those tokens, each chosen (the limit distribution); NaN never."""
    sampler = Sampler(SamplingParams(temperature=1.0, repetition_penalty=1e-300, seed=1).validate())
    logits = torch.tensor([1.0, 2.0, 0.5, -1.0, float("nan")])
    picks = {sampler(logits, torch.tensor([0, 1, 2]), None) for _ in range(64)}
    assert picks == {0, 1, 2}
    greedy = Sampler(SamplingParams(temperature=0.0, seed=1).validate())
    assert greedy(torch.tensor([float("nan"), 1.0, 3.0]), torch.tensor([], dtype=torch.long)) == 2


# Server side: the schema's ranges, the full float range (subnormals included) for every sampling field.
SAMPLING_RANGES = {
    "temperature": (0.0, 2.0),
    "top_p": (5e-324, 1.0),
    "min_p": (0.0, 1.0),
    "repetition_penalty": (5e-324, 1.7976931348623157e308),
    "presence_penalty": (-2.0, 2.0),
    "frequency_penalty": (-2.0, 2.0),
}
sampling_values = st.fixed_dictionaries(
    {},
    optional={
        **{name: ANY_FLOAT for name in SAMPLING_RANGES},
        "top_k": st.integers(-(2**65), 2**65),
        "seed": st.integers(-(2**65), 2**65),
        "max_tokens": st.integers(-5, 6),
    },
)


@pytest.fixture(scope="module")
def fuzz_server(vl_model):
    with live_server(vl_model, default_max_tokens=4) as server:
        yield server


def _check_sampling_body(server, values: dict, path: str) -> None:
    body = {"max_tokens": 3, **values}
    if path.endswith("chat/completions"):
        body["messages"] = [{"role": "user", "content": "hi"}]
    else:
        body["prompt"] = "hi"
    response = requests.post(server.base_url + path, json=body, timeout=30)
    inside = all(low <= values[name] <= high for name, (low, high) in SAMPLING_RANGES.items() if name in values)
    inside = inside and values.get("top_k", 0) >= -1 and values.get("max_tokens", 1) >= 1
    inside = inside and -(2**63) <= values.get("seed", 0) <= 2**64 - 1
    assert response.status_code < 500, response.text
    if inside:
        assert response.status_code == 200, (values, response.text)
        assert response.json()["choices"][0]["finish_reason"] in ("stop", "length")
    else:
        assert response.status_code == 400, (values, response.text)
        assert response.json()["error"]["param"] in (*SAMPLING_RANGES, "top_k", "seed", "max_tokens")


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(values=sampling_values, path=st.sampled_from(["/v1/chat/completions", "/v1/completions"]))
def test_extreme_sampling_values_are_a_400_or_an_answer(fuzz_server, values, path):
    _check_sampling_body(fuzz_server, values, path)


@pytest.mark.fuzz
@settings(
    max_examples=1500, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(values=sampling_values, path=st.sampled_from(["/v1/chat/completions", "/v1/completions"]))
def test_sampling_fuzz_full_float_range(fuzz_server, values, path):
    _check_sampling_body(fuzz_server, values, path)


def test_issue_extremes_give_answers_not_500s(fuzz_server):
    for penalty in (1e-300, 5e-324, 1e300):
        for extra in ({}, {"temperature": 2.0, "top_p": 5e-324, "min_p": 1.0}, {"temperature": 1e-5, "top_k": 2**70}):
            body = {"prompt": "hello hello hello", "max_tokens": 4, "repetition_penalty": penalty, **extra}
            response = requests.post(fuzz_server.base_url + "/v1/completions", json=body, timeout=30)
            assert response.status_code == 200, (body, response.text)
    too_hot = requests.post(fuzz_server.base_url + "/v1/completions", json={"prompt": "x", "temperature": 2.5})
    assert too_hot.status_code == 400 and too_hot.json()["error"]["param"] == "temperature"


# -- 3. config.json and safetensors headers --------------------------------------------------------------------


def _mutated_dirs(source: Path, target: Path, mutations: list[tuple[str, dict]]) -> list[tuple[str, Path]]:
    dirs = []
    for index, (label, config) in enumerate(mutations):
        directory = target / f"m{index}"
        directory.mkdir()
        for file in source.iterdir():
            (directory / file.name).symlink_to(file)
        (directory / "config.json").unlink()
        (directory / "config.json").write_text(json.dumps(config))
        dirs.append((label, directory))
    return dirs


def _check_config_corpus(make_vl, tmp_path, count: int | None) -> None:
    source = make_vl("default")
    raw = json.loads((source / "config.json").read_text())
    failures = []
    for label, directory in _mutated_dirs(source, tmp_path, config_mutations(raw, count)):
        for argv in (["info", str(directory)], ["run", str(directory), "-p", "hi", "-n", "2", "--temperature", "0"]):
            run = run_cli(argv, timeout=10)
            if not run.clean or run.seconds > 10:
                failures.append((label, argv[0], run.status, run.seconds, (run.exception or run.stderr)[-400:]))
    assert not failures, failures


def test_mutated_configs_exit_2_with_one_line(make_vl, tmp_path):
    _check_config_corpus(make_vl, tmp_path, 40)


@pytest.mark.fuzz
def test_mutated_config_corpus_all_fields(make_vl, tmp_path):
    _check_config_corpus(make_vl, tmp_path, None)


def test_config_errors_name_the_file_and_field(make_vl, tmp_path, capsys):
    source = make_vl("default")
    raw = json.loads((source / "config.json").read_text())
    cases = {
        "vision_config.depth=9223372036854775808": "vision_config.depth: expected an integer from 1 to 4096",
        "text_config.rope_parameters=true": "text_config.rope_parameters: expected a JSON object, got true",
        "text_config.vocab_size=0": "text_config.vocab_size: expected an integer from 1 to 16777216, got 0",
        "vision_config.patch_size=null": None,  # null: the default (14), which the weights do fit
    }
    mutations = [(label, config) for label, config in config_mutations(raw, None) if label in cases]
    assert len(mutations) == len(cases)
    for label, directory in _mutated_dirs(source, tmp_path, mutations):
        status = qwenvl.cli.main(["info", str(directory)])
        err = capsys.readouterr().err
        if cases[label] is None:
            assert status == 0, err
        else:
            assert status == 2 and f"{directory / 'config.json'}: {cases[label]}" in err, err
    depth = json.loads(json.dumps(raw))
    depth["vision_config"]["depth"] = 3
    (tmp_path / "depth").mkdir()
    [(_, directory)] = _mutated_dirs(source, tmp_path / "depth", [("depth", depth)])
    assert qwenvl.cli.main(["run", str(directory), "-p", "x"]) == 2
    assert "vision_config.depth is 3 but the weights hold 2 vision blocks" in capsys.readouterr().err


def test_safetensors_dtype_null_in_info(make_vl, tmp_path, capsys):
    source = make_vl("default")
    data = (source / "model.safetensors").read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    name = next(n for n in header if n != "__metadata__")
    header[name]["dtype"] = None
    body = json.dumps(header).encode()
    directory = tmp_path / "model"
    shutil.copytree(source, directory)
    (directory / "model.safetensors").write_bytes(struct.pack("<Q", len(body)) + body + data[8 + length :])
    for command in ("info", "run"):
        argv = [command, str(directory)] + (["-p", "x"] if command == "run" else [])
        assert qwenvl.cli.main(argv) == 2
        assert f"header entry '{name}': unknown dtype null" in capsys.readouterr().err


def test_mutated_safetensors_sample(make_vl, tmp_path):
    source = make_vl("default")
    failures = []
    for index, (label, blob) in enumerate(safetensors_mutations((source / "model.safetensors").read_bytes(), 12)):
        directory = tmp_path / f"s{index}"
        directory.mkdir()
        for file in source.iterdir():
            if file.name != "model.safetensors":
                (directory / file.name).symlink_to(file)
        (directory / "model.safetensors").write_bytes(blob)
        for argv in (["info", str(directory)], ["run", str(directory), "-p", "hi", "-n", "2"]):
            run = run_cli(argv, timeout=10)
            if not run.clean:
                failures.append((label, argv[0], run.status, (run.exception or run.stderr)[-300:]))
    assert not failures, failures


# -- 4. stalled connections, the concurrency limit and the queue -------------------------------------------------


def _connect(port: int, payload: bytes = b"") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    if payload:
        sock.sendall(payload)
    return sock


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    """True when the server closes the connection within ``seconds`` (whatever it sent before)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            if sock.recv(65536) == b"":
                return True
        except TimeoutError:
            return False
        except ConnectionError:
            return True
    return False


STALLS = {
    "idle": b"",
    "partial headers": b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: applic",
    "stalled body": b'POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 400\r\n\r\n{"messages": ',
    "idle keep-alive": b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n",
}


def test_stalled_connections_are_closed_while_others_are_served(vl_model):
    with live_server(vl_model, header_timeout=1.0, body_timeout=1.0, keep_alive_timeout=1.0) as server:
        stalled = [(kind, _connect(server.port, payload)) for kind, payload in STALLS.items() for _ in range(8)]
        started = time.monotonic()
        served = [
            requests.post(server.base_url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=10)
            for _ in range(3)
        ]
        assert all(r.status_code == 200 for r in served) and time.monotonic() - started < 5
        still_open = [
            kind for kind, sock in stalled if not _closed_within(sock, 1.0 + 4.0 - (time.monotonic() - started))
        ]
        for _, sock in stalled:
            sock.close()
        assert not still_open, still_open
        body = _connect(server.port, STALLS["stalled body"])
        answer = b""
        while chunk := body.recv(65536):  # the server closes the connection after its 408
            answer += chunk
        body.close()
        assert answer.startswith(b"HTTP/1.1 408") and b"--body-timeout" in answer
        assert requests.get(server.base_url + "/health", timeout=5).json()["running"] == 0


def test_concurrency_limit_is_a_503(vl_model):
    with live_server(vl_model, header_timeout=1.0, limit_concurrency=3) as server:
        idle = [_connect(server.port) for _ in range(3)]
        busy = requests.get(server.base_url + "/health", timeout=5)
        assert busy.status_code == 503
        for sock in idle:
            assert _closed_within(sock, 5)
            sock.close()
        assert requests.get(server.base_url + "/health", timeout=5).status_code == 200


def test_full_queue_is_a_429_and_a_long_wait_a_503(vl_model):
    with live_server(vl_model, max_batch=1, max_waiting=1, queue_timeout=1.0) as server:
        engine = server.app.state.engine
        gate = threading.Event()
        decode = engine._decode
        engine._decode = lambda: (gate.wait(20), decode())
        url = server.base_url + "/v1/completions"
        body = {"prompt": "hi", "max_tokens": 3, "ignore_eos": True}
        results: dict = {}
        running = threading.Thread(target=lambda: results.update(running=requests.post(url, json=body, timeout=30)))
        running.start()
        deadline = time.monotonic() + 10
        while requests.get(server.base_url + "/health").json()["running"] != 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        waiting = threading.Thread(target=lambda: results.update(waiting=requests.post(url, json=body, timeout=30)))
        waiting.start()
        while requests.get(server.base_url + "/health").json()["waiting"] != 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        try:
            full = requests.post(url, json=body, timeout=10)
            assert full.status_code == 429 and full.headers["Retry-After"] == "5"
            assert full.json()["error"]["code"] == "queue_full"
            waiting.join(10)
            assert results["waiting"].status_code == 503 and results["waiting"].headers["Retry-After"] == "5"
            assert "--queue-timeout" in results["waiting"].json()["error"]["message"]
        finally:
            gate.set()
            running.join(30)
        assert results["running"].status_code == 200
        deadline = time.monotonic() + 10
        while requests.get(server.base_url + "/health").json()["waiting"] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert requests.get(server.base_url + "/health").json()["waiting"] == 0


# -- 5. the API key ----------------------------------------------------------------------------------------------


def test_api_key_guards_every_route_but_health(vl_model):
    with live_server(vl_model, api_key="s3cret", default_max_tokens=2) as server:
        base = server.base_url
        for path in ("/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect", "/v1/models", "/no-such-route"):
            for auth in (None, "Bearer wrong", "Basic s3cret", "s3cret", "Bearer"):
                headers = {"Authorization": auth} if auth else {}
                response = requests.get(base + path, headers=headers, timeout=5)
                assert response.status_code == 401, (path, auth)
                assert response.headers["WWW-Authenticate"] == "Bearer"
                assert response.json()["error"]["code"] == "invalid_api_key"
        assert requests.get(base + "/health", timeout=5).status_code == 200
        for scheme in ("Bearer", "bearer", "BEARER", "bEaReR"):
            headers = {"Authorization": f"{scheme} s3cret"}
            for path in ("/docs", "/redoc", "/openapi.json", "/v1/models"):
                assert requests.get(base + path, headers=headers, timeout=5).status_code == 200, (path, scheme)
            body = {"messages": [{"role": "user", "content": "hi"}]}
            answer = requests.post(base + "/v1/chat/completions", json=body, headers=headers, timeout=30)
            assert answer.status_code == 200


# -- 6. stale partial files -----------------------------------------------------------------------------------------


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_stale_partials_of_killed_runs_are_removed(tmp_path):
    source = tmp_path / "in.gguf"
    write_tiny_gguf(source)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    # a run killed with SIGKILL while writing (its partial under its own pid)
    code = (
        "import sys, time; from pathlib import Path; from qwenvl.durable import partial_path; "
        "p = partial_path(Path(sys.argv[1])); p.write_bytes(b'x' * 4096); print(p, flush=True); time.sleep(60)"
    )
    killed = subprocess.Popen(
        [sys.executable, "-c", code, str(out_dir / "model.gguf")], stdout=subprocess.PIPE, text=True
    )
    killed_partial = Path(killed.stdout.readline().strip())
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    assert killed_partial.exists()
    dead = out_dir / f".other.gguf.partial-{_dead_pid()}"
    dead.write_bytes(b"y")
    dead_dir = out_dir / f".export.partial-{_dead_pid()}"
    dead_dir.mkdir()
    (dead_dir / "model.safetensors").write_bytes(b"z")
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = out_dir / f".busy.gguf.partial-{alive.pid}"
        live.write_bytes(b"w")
        mine = partial_path(out_dir / "mine.gguf")
        mine.write_bytes(b"v")
        not_ours = out_dir / ".notes.partial-x"
        not_ours.write_bytes(b"u")
        assert qwenvl.cli.main(["quantize", str(source), str(out_dir / "model.gguf"), "q8_0"]) == 0
        assert not killed_partial.exists() and not dead.exists() and not dead_dir.exists()
        assert live.exists() and mine.exists() and not_ours.exists()
        assert (out_dir / "model.gguf").is_file()
        assert remove_stale_partials(out_dir) == []
    finally:
        alive.kill()
        alive.wait()


def test_output_is_flushed_before_and_after_the_rename(tmp_path, monkeypatch):
    source = tmp_path / "in.gguf"
    write_tiny_gguf(source)
    target = tmp_path / "out.gguf"
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        path = Path(os.readlink(f"/proc/self/fd/{fd}"))
        events.append("fsync dir" if path.is_dir() else f"fsync {path.name}")
        return real_fsync(fd)

    def replace(src, dst):
        events.append(f"replace {Path(src).name} -> {Path(dst).name}")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    assert qwenvl.cli.main(["quantize", str(source), str(target), "q8_0"]) == 0
    partial = f".out.gguf.partial-{os.getpid()}"
    assert events == [f"fsync {partial}", f"replace {partial} -> out.gguf", "fsync dir"]


# -- 7. import * ------------------------------------------------------------------------------------------------------


def test_star_import():
    code = "from qwenvl import *; import qwenvl; print(load.__name__, Model.__name__, ChatResult.__name__, __version__)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["load", "Model", "GenerationResult", qwenvl.__version__]
    light = subprocess.run(
        [sys.executable, "-c", "import sys, qwenvl; print('torch' in sys.modules)"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert light.stdout.strip() == "False"
