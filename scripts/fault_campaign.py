#!/usr/bin/env python
"""Fault and fuzz campaign (issue 23): counts 5xx answers, tracebacks, hangs and crashes.

    python scripts/fault_campaign.py [--streams 300] [--gguf 200] [--safetensors 100] [--configs 40]
                                     [--schemathesis 200] [--seed 0] [--json]

On tiny random checkpoints built in a temporary directory (the tests' fixtures: a Qwen2-VL checkpoint,
converted to a text GGUF and an mmproj GGUF):

- files: mutated GGUF files (text models and mmproj), mutated safetensors files and mutated config.json
  files, each given to ``qwenvl info`` and ``qwenvl run`` in a worker process with a deadline per run
  (a worker that does not answer in time is killed: a hang; one that dies: a crash). A clean run exits 0,
  or 2 with one line on stderr;
- server: ``qwenvl serve`` on 127.0.0.1 only; streamed requests that disconnect at random points (before
  the answer, after some chunks, mid-request), then schemathesis on /v1/chat/completions and
  /v1/completions (valid and invalid bodies generated from the server's own OpenAPI schema); afterwards
  the server must report nothing running, waiting or held, and its log must hold no traceback.

Every loop is bounded in count and time. Exit status 1 when anything is counted as bad.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

RUN_TIMEOUT = 30.0  # one CLI run (a tiny model loads and answers in about a second)
REQUEST_TIMEOUT = 30.0


# ----------------------------------------------------------------------------------------------
# Worker: runs CLI argv lists from stdin, one JSON result per line


def worker() -> None:
    from fault_corpus import run_cli

    for line in sys.stdin:
        argv = json.loads(line)
        run = run_cli(argv, timeout=RUN_TIMEOUT)
        result = {
            "status": run.status,
            "clean": run.clean,
            "traceback": run.traceback,
            "hung": run.hung,
            "seconds": round(run.seconds, 3),
            "stderr": (run.exception or run.stderr)[-600:],
        }
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()
        if run.hung:
            os._exit(3)  # a stuck thread would stay: start afresh


class Worker:
    """A ``--worker`` process; ``run(argv)`` with a deadline (killed and restarted on a hang or crash)."""

    def __init__(self) -> None:
        self.process: subprocess.Popen | None = None

    def _start(self) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, __file__, "--worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            cwd=ROOT,
        )

    def run(self, argv: list[str]) -> dict[str, Any]:
        if self.process is None or self.process.poll() is not None:
            self.process = self._start()
        process = self.process
        assert process.stdin is not None and process.stdout is not None
        process.stdin.write(json.dumps(argv) + "\n")
        process.stdin.flush()
        answer: dict[str, Any] = {}
        reader = threading.Thread(target=lambda: answer.update(line=process.stdout.readline()), daemon=True)
        reader.start()
        reader.join(RUN_TIMEOUT + 60)  # + the worker's own start-up (imports)
        line = answer.get("line")
        if not line:
            hung = reader.is_alive()
            process.kill()
            process.wait()
            self.process = None
            return {"status": None, "clean": False, "traceback": False, "hung": hung, "crash": not hung, "stderr": ""}
        result = json.loads(line)
        if result["hung"]:
            process.wait()
            self.process = None
        return result

    def close(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()


# ----------------------------------------------------------------------------------------------
# Fixtures


def build_models(workdir: Path) -> dict[str, Path]:
    from checkpoints import build_vl
    from tokenizer_fixtures import qwen_tokenizer_dir

    from qwenvl.convert import convert_hf

    tokenizer = qwen_tokenizer_dir(workdir / "tokenizer")
    vl = build_vl(workdir / "vl", tokenizer)
    written = convert_hf(vl, workdir / "gguf", out_type="q8_0", progress=False)
    text = next(f.path for f in written if not f.path.name.startswith("mmproj"))
    mmproj = next(f.path for f in written if f.path.name.startswith("mmproj"))
    return {"vl": vl, "gguf": text, "mmproj": mmproj}


def _link_dir(source: Path, target: Path, skip: str) -> None:
    target.mkdir(parents=True)
    for file in source.iterdir():
        if file.name != skip:
            (target / file.name).symlink_to(file)


# ----------------------------------------------------------------------------------------------
# File campaigns


class Tally:
    def __init__(self, name: str):
        self.name = name
        self.counts: Counter[str] = Counter()
        self.examples: list[str] = []

    def add(self, label: str, argv: list[str], result: dict[str, Any]) -> None:
        self.counts["runs"] += 1
        if result.get("crash"):
            kind = "crashes"
        elif result["hung"]:
            kind = "hangs"
        elif result["traceback"]:
            kind = "tracebacks"
        elif not result["clean"]:
            kind = "unclean"
        else:
            kind = "exit 0" if result["status"] == 0 else "exit 2"
        self.counts[kind] += 1
        if kind in ("crashes", "hangs", "tracebacks", "unclean") and len(self.examples) < 5:
            self.examples.append(f"{label} [{argv[0]}]: {kind}: {result['stderr'][-300:]}")


def file_campaign(name: str, cases: list[tuple[str, list[list[str]]]], worker_: Worker) -> Tally:
    tally = Tally(name)
    for label, argvs in cases:
        for argv in argvs:
            tally.add(label, argv, worker_.run(argv))
    return tally


def run_argvs(model: str, mmproj: str | None = None) -> list[list[str]]:
    extra = ["--mmproj", mmproj] if mmproj else []
    return [["info", model, *extra], ["run", model, *extra, "-p", "hi", "-n", "2", "--temperature", "0"]]


def gguf_cases(models: dict[str, Path], workdir: Path, count: int, seed: int) -> list[tuple[str, list[list[str]]]]:
    from fault_corpus import gguf_mutations

    text_count = count * 7 // 10
    cases = []
    folder = workdir / "gguf-mutated"
    folder.mkdir()
    for index, (label, blob) in enumerate(gguf_mutations(models["gguf"], text_count, seed)):
        path = folder / f"text-{index}.gguf"
        path.write_bytes(blob)
        cases.append((f"text gguf {label}", run_argvs(str(path))))
    for index, (label, blob) in enumerate(gguf_mutations(models["mmproj"], count - text_count, seed + 1)):
        path = folder / f"mmproj-{index}.gguf"
        path.write_bytes(blob)
        cases.append((f"mmproj {label}", [["info", str(path)], *run_argvs(str(models["gguf"]), str(path))[1:]]))
    return cases


def safetensors_cases(models: dict[str, Path], workdir: Path, count: int, seed: int):
    from fault_corpus import safetensors_mutations

    cases = []
    data = (models["vl"] / "model.safetensors").read_bytes()
    for index, (label, blob) in enumerate(safetensors_mutations(data, count, seed)):
        directory = workdir / "safetensors-mutated" / f"s{index}"
        _link_dir(models["vl"], directory, "model.safetensors")
        (directory / "model.safetensors").write_bytes(blob)
        cases.append((f"safetensors {label}", run_argvs(str(directory))))
    return cases


def config_cases(models: dict[str, Path], workdir: Path, count: int, seed: int):
    from fault_corpus import config_mutations

    cases = []
    raw = json.loads((models["vl"] / "config.json").read_text())
    for index, (label, config) in enumerate(config_mutations(raw, count, seed)):
        directory = workdir / "config-mutated" / f"c{index}"
        _link_dir(models["vl"], directory, "config.json")
        (directory / "config.json").write_text(json.dumps(config))
        cases.append((f"config {label}", run_argvs(str(directory))))
    return cases


# ----------------------------------------------------------------------------------------------
# Server campaign


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """``qwenvl serve`` in a subprocess on 127.0.0.1, its log in a file."""

    def __init__(self, model: Path, workdir: Path):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / "serve.log"
        self.log = open(self.log_path, "w")
        argv = [sys.executable, "-m", "qwenvl", "serve", str(model), "--host", "127.0.0.1", "--port", str(self.port),
                "--dtype", "float32", "--ctx", "512", "--max-batch", "4", "--max-tokens", "8", "--log-level", "warning"]  # fmt: skip
        self.process = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                if self.process.poll() is not None:
                    raise RuntimeError(f"qwenvl serve exited: {self.log_path.read_text()[-2000:]}") from None
                time.sleep(0.2)
        raise RuntimeError("qwenvl serve did not start in 120 s")

    def stop(self) -> int:
        self.process.send_signal(signal.SIGINT)
        try:
            return self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return -9
        finally:
            self.log.close()


def stream_campaign(server: Server, count: int, seed: int) -> Counter[str]:
    """``count`` streamed requests that go away at a random point; their statuses and hangs."""
    from test_server_support import data_uri, png_bytes

    image = data_uri(png_bytes(56, 56, seed=4))
    rng = random.Random(seed)
    plans = []
    for index in range(count):
        chat = rng.random() < 0.6
        content: Any = "tell me a story about a fox"
        if chat and rng.random() < 0.4:
            content = [{"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": "what is it?"}]
        body = {"max_tokens": rng.randint(2, 40), "stream": True, "ignore_eos": rng.random() < 0.5}
        body |= {"messages": [{"role": "user", "content": content}]} if chat else {"prompt": "once upon a time"}
        path = "/v1/chat/completions" if chat else "/v1/completions"
        plans.append((index, path, json.dumps(body).encode(), rng.choice(["request", "headers", "chunks", "done"]),
                      rng.randint(0, 6)))  # fmt: skip
    counts: Counter[str] = Counter()
    lock = threading.Lock()

    def one(plan: tuple) -> None:
        _, path, body, stop_at, chunks = plan
        outcome = stream_once(server.port, path, body, stop_at, chunks)
        with lock:
            counts[outcome] += 1

    threads: list[threading.Thread] = []
    for plan in plans:
        while sum(t.is_alive() for t in threads) >= 6:
            time.sleep(0.005)
        thread = threading.Thread(target=one, args=(plan,))
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join(REQUEST_TIMEOUT + 10)
    return counts


def stream_once(port: int, path: str, body: bytes, stop_at: str, chunks: int) -> str:
    """One streamed request, dropped at ``stop_at``: 'request' (half of it sent), 'headers' (after the
    status line), 'chunks' (after some SSE chunks) or 'done' (read to the end). The outcome's name."""
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()  # fmt: skip
    request = head + body
    with socket.create_connection(("127.0.0.1", port), timeout=REQUEST_TIMEOUT) as sock:
        if stop_at == "request":
            sock.sendall(request[: len(request) // 2])
            return "dropped mid-request"
        sock.sendall(request)
        received = b""
        try:
            while b"\r\n\r\n" not in received:
                piece = sock.recv(65536)
                if not piece:
                    return "closed before an answer"
                received += piece
            status = int(received.split(b" ", 2)[1])
            if status >= 500:
                return f"{status}"
            if status != 200 or stop_at == "headers":
                return f"{status} dropped after the headers" if status == 200 else f"{status}"
            while received.count(b"data: ") < (chunks if stop_at == "chunks" else 10**9):
                if b"data: [DONE]" in received:
                    break
                piece = sock.recv(65536)
                if not piece:
                    break
                received += piece
            if b'"server_error"' in received:
                return "error event in the stream"
            if stop_at == "done" and b"data: [DONE]" not in received:
                return "stream ended without [DONE]"
            return "200 dropped mid-stream" if stop_at == "chunks" else "200 complete"
        except TimeoutError:
            return "hang"


def schemathesis_campaign(server: Server, examples: int, seed: int) -> Counter[str]:
    """Bodies generated from the server's OpenAPI schema (valid and invalid ones) for both routes."""
    import requests
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_dict(requests.get(server.base_url + "/openapi.json", timeout=30).json())
    counts: Counter[str] = Counter()
    for path in ("/v1/chat/completions", "/v1/completions"):
        operation = schema[path]["POST"]
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @settings(max_examples=examples // 4, deadline=None, database=None, suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(generation_mode=mode))
            def run(case: Any) -> None:
                try:
                    response = case.call(base_url=server.base_url, timeout=REQUEST_TIMEOUT)
                except requests.Timeout:
                    counts["hang"] += 1
                    return
                except requests.RequestException as error:
                    counts[f"connection error {type(error).__name__}"] += 1
                    return
                counts[f"{response.status_code // 100}xx"] += 1
                if response.status_code >= 500:
                    counts["5xx " + response.text[:200]] += 1

            run()
    return counts


def wait_idle(server: Server, seconds: float = 30) -> dict[str, Any]:
    import requests

    deadline = time.monotonic() + seconds
    while True:
        health = requests.get(server.base_url + "/health", timeout=10).json()
        if (health["running"], health["waiting"], health["kv_cache_bytes"]) == (0, 0, 0) or time.monotonic() > deadline:
            return health
        time.sleep(0.1)


# ----------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=300)
    parser.add_argument("--gguf", type=int, default=200)
    parser.add_argument("--safetensors", type=int, default=100)
    parser.add_argument("--configs", type=int, default=40)
    parser.add_argument("--schemathesis", type=int, default=200, help="generated requests in all (both routes)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker()
        return 0
    started = time.monotonic()
    report: dict[str, Any] = {}
    bad = 0
    with tempfile.TemporaryDirectory(prefix="qwenvl-faults-") as tmp:
        workdir = Path(tmp)
        models = build_models(workdir)
        runner = Worker()
        try:
            for name, build, count in (
                ("gguf", gguf_cases, args.gguf),
                ("safetensors", safetensors_cases, args.safetensors),
                ("configs", config_cases, args.configs),
            ):
                cases = build(models, workdir, count, args.seed)
                tally = file_campaign(name, cases, runner)
                report[name] = {"files": len(cases), **tally.counts, "examples": tally.examples}
                bad += sum(tally.counts[k] for k in ("crashes", "hangs", "tracebacks", "unclean"))
                _progress(name, report[name])
        finally:
            runner.close()
        server = Server(models["vl"], workdir)
        try:
            streams = stream_campaign(server, args.streams, args.seed)
            idle_after_streams = wait_idle(server)
            schema_counts = schemathesis_campaign(server, args.schemathesis, args.seed)
            idle_after_schema = wait_idle(server)
        finally:
            status = server.stop()
        log = server.log_path.read_text()
    fivexx = sum(v for k, v in streams.items() if k[:1] == "5") + schema_counts.get("5xx", 0)
    hangs = streams.get("hang", 0) + schema_counts.get("hang", 0)
    leaks = [
        h
        for h in (idle_after_streams, idle_after_schema)
        if (h["running"], h["waiting"], h["kv_cache_bytes"]) != (0, 0, 0)
    ]
    report["streams"] = dict(streams)
    report["schemathesis"] = dict(schema_counts)
    report["server"] = {
        "5xx": fivexx,
        "hangs": hangs,
        "tracebacks in the log": log.count("Traceback (most recent call last)"),
        "stream errors": streams.get("error event in the stream", 0) + streams.get("stream ended without [DONE]", 0),
        "left running after the campaign": len(leaks),
        "exit status": status,
    }
    bad += fivexx + hangs + report["server"]["tracebacks in the log"] + report["server"]["stream errors"] + len(leaks)
    bad += status != 0
    report["seconds"] = round(time.monotonic() - started, 1)
    report["bad"] = bad
    if args.json:
        print(json.dumps(report))
    else:
        for name in ("streams", "schemathesis", "server"):
            _progress(name, report[name])
        print(f"campaign: {bad} bad outcome(s) in {report['seconds']} s")
    return 1 if bad else 0


def _progress(name: str, counts: dict[str, Any]) -> None:
    shown = {k: v for k, v in counts.items() if k != "examples"}
    print(f"{name}: {json.dumps(shown)}", file=sys.stderr if "--json" in sys.argv else sys.stdout, flush=True)
    for example in counts.get("examples", []):
        print(f"  {example}", file=sys.stderr if "--json" in sys.argv else sys.stdout, flush=True)


if __name__ == "__main__":
    sys.exit(main())
