#!/usr/bin/env python
"""Throughput of `qwenvl serve` and `transformers serve --continuous-batching`, side by side in one run.

    python benchmarks/serve_compare.py [--gguf FILE] [--hf-dir DIR] [--clients 1,8,16] [--max-tokens 64] [--rounds 2]

The prefix cache under a shared system prompt (issue 17): one server with it, one with
`--no-prefix-cache` (the server before prefix caching), every request starting with the same system
prompt of about N tokens:

    python benchmarks/serve_compare.py --skip transformers --no-prefix-cache-peer --system-tokens 1000 \
        --clients 16 --requests-per-client 1 --max-tokens 16 --rounds 2

One server against its Ray Serve replicas (docs/scale-out.md; needs the `ray` extra):

    python benchmarks/serve_compare.py --skip transformers --ray-replicas 2 --ray-max-batch 8 --ray-threads 1 \
        --max-batch 16 --clients 16

Both servers are started on the same model (qwenvl: the GGUF; transformers: its HF export in
bfloat16; transformers serve needs `accelerate` installed), warmed up with one request each, and stay
up while scripts/loadgen.py drives them in turn: each round runs every client count on each server,
the server order alternating from round to round, so a slow spell of a shared machine falls on both
(streamed chat completions, greedy, `--requests-per-client` requests per client; an idle server uses
no CPU). Prints each run, then per client count the mean over the rounds of aggregate tok/s and of
mean time to first token, and the ratio qwenvl ÷ transformers; `--json` writes every run. With
`--ray-replicas N` a third server joins: `qwenvl serve --ray` with N replicas of `--ray-threads` threads
and `--ray-max-batch` each, compared with the one qwenvl server (`--max-batch`, `--threads`), and the Ray
overhead per request is measured as the mean round trip of `--overhead-requests` sequential
GET /v1/models through each (no model work: proxy, ingress and replica hops only). With
`--no-prefix-cache-peer` a `qwenvl serve --no-prefix-cache` server joins, compared with the one qwenvl
server; `--system-tokens N` starts every request with one shared system prompt of about N tokens
(the mean prompt tokens the servers report are printed with each run); each server first answers
one request with it, untimed, so a prefix-caching server holds it as one that has been running does
(requests that arrive together with nothing cached all prefill it: each is admitted, and looks up
the cache, before the first one's prefill registers its blocks). A benchmark, not a test: run
it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import IO

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from loadgen import run_load  # noqa: E402


@dataclass
class Server:
    name: str
    command: list[str]
    port: int
    model: str
    process: subprocess.Popen | None = None
    log: IO[str] | None = None
    stop_group: bool = True  # stop the whole process group (False: the leader, which stops its own)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def wait_healthy(base_url: str, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            with urllib.request.urlopen(base_url + "/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise RuntimeError(f"{base_url} not healthy after {timeout:.0f} s")


def start(server: Server, args: argparse.Namespace) -> None:
    server.log = open(Path(args.log_dir) / f"{server.name}.log", "w")
    server.process = subprocess.Popen(
        server.command, stdout=server.log, stderr=subprocess.STDOUT, start_new_session=True
    )
    wait_healthy(server.base_url, server.process, args.start_timeout)
    run_load(server.base_url, clients=1, requests=1, max_tokens=8, model=server.model)  # warm-up


SYSTEM_RULE = (
    "Rule {n}: read the whole question before answering, keep the answer short and factual, "
    "say so when you are unsure, and never invent an API, a file or a command. "
)


def system_prompt(tokens: int) -> str | None:
    """A system prompt of about ``tokens`` tokens (numbered rules, ~4 characters a token); None for 0."""
    if tokens <= 0:
        return None
    text, number = "You are a careful assistant for a software team. ", 0
    while len(text) < 4 * tokens:
        number += 1
        text += SYSTEM_RULE.format(n=number)
    return text


def measure(servers: list[Server], args: argparse.Namespace) -> list[dict]:
    rows = []
    system = system_prompt(args.system_tokens)
    if system is not None:  # one untimed request each: a running server has seen its system prompt
        for server in servers:
            run_load(server.base_url, clients=1, requests=1, max_tokens=1, model=server.model, system=system)
    for round_index in range(args.rounds):
        order = servers if round_index % 2 == 0 else servers[::-1]
        for clients in args.clients:
            for server in order:
                report, _ = run_load(
                    server.base_url,
                    clients=clients,
                    requests=clients * args.requests_per_client,
                    max_tokens=args.max_tokens,
                    model=server.model,
                    ignore_eos=args.ignore_eos,
                    system=system,
                )
                rows.append({"server": server.name, "round": round_index + 1, **vars(report)})
                print(
                    f"round {round_index + 1} {server.name:>12} {clients:>3} clients: {report.tok_s:7.1f} tok/s, "
                    f"mean TTFT {report.mean_ttft_s or 0:.2f} s, {report.errors} errors, "
                    f"prompt {report.mean_prompt_tokens} tokens, load {os.getloadavg()[0]:.1f}",
                    flush=True,
                )
    return rows


def round_trip_ms(base_url: str, requests: int) -> float:
    """Mean milliseconds of a sequential GET /v1/models (after one not counted)."""
    times = []
    for index in range(requests + 1):
        started = time.perf_counter()
        with urllib.request.urlopen(base_url + "/v1/models", timeout=30) as response:
            response.read()
        if index:
            times.append((time.perf_counter() - started) * 1000)
    return statistics.fmean(times)


def _stop(server: Server) -> None:
    process = server.process
    if process is not None and process.poll() is None:
        if server.stop_group:
            os.killpg(process.pid, signal.SIGTERM)
        else:
            os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(90)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
    if server.log is not None:
        server.log.close()


def main() -> int:
    from qwenvl.defaults import default_gguf_path, default_hf_export_path

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", help="model for qwenvl (default: the embedded GGUF)")
    parser.add_argument("--hf-dir", help="the same model as an HF checkpoint, for transformers (default: its export)")
    parser.add_argument("--clients", default="1,8,16", help="comma-separated client counts")
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="runs of every client count on each server (default 2)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=16, help="qwenvl --max-batch")
    parser.add_argument("--threads", type=int, help="qwenvl --threads (default: physical cores)")
    parser.add_argument("--qwenvl-args", default="", help="extra `qwenvl serve` arguments, e.g. '--kernel dense'")
    parser.add_argument(
        "--ignore-eos", action="store_true", help="ask for exactly --max-tokens tokens (qwenvl only honours it)"
    )
    parser.add_argument("--skip", default="", help="comma-separated servers to skip: qwenvl, transformers")
    parser.add_argument("--ray-replicas", type=int, default=0, help="also run `qwenvl serve --ray` with N replicas")
    parser.add_argument("--ray-max-batch", type=int, default=8, help="--max-batch of each Ray replica (default 8)")
    parser.add_argument("--ray-threads", type=int, default=1, help="threads of each Ray replica (default 1)")
    parser.add_argument("--ray-router", default="prefix", choices=["prefix", "pow2"], help="the replicas' router")
    parser.add_argument("--no-prefix-cache-peer", action="store_true", help="also run `qwenvl serve --no-prefix-cache`")
    parser.add_argument(
        "--system-tokens", type=int, default=0, help="a shared system prompt of about N tokens in every request"
    )
    parser.add_argument("--overhead-requests", type=int, default=50, help="GET /v1/models per server for the overhead")
    parser.add_argument("--start-timeout", type=float, default=600)
    parser.add_argument("--log-dir", default="/tmp")
    parser.add_argument("--json", metavar="FILE", help="write the reports as JSON")
    args = parser.parse_args()
    args.clients = [int(c) for c in args.clients.split(",")]
    skip = set(filter(None, args.skip.split(",")))
    gguf = args.gguf or str(default_gguf_path())
    servers = []
    if "qwenvl" not in skip:
        command = [
            sys.executable,
            "-m",
            "qwenvl",
            "serve",
            gguf,
            "--port",
            "8391",
            "--max-batch",
            str(args.max_batch),
            "--max-tokens",
            str(args.max_tokens),
        ] + (["--threads", str(args.threads)] if args.threads else [])
        servers.append(Server("qwenvl", command + args.qwenvl_args.split(), 8391, "default"))
        if args.no_prefix_cache_peer:
            command = [*command[:6], "8394", *command[7:], *args.qwenvl_args.split(), "--no-prefix-cache"]
            servers.append(Server("qwenvl-no-cache", command, 8394, "default"))
    if args.ray_replicas:
        command = [
            sys.executable,
            "-m",
            "qwenvl",
            "serve",
            gguf,
            "--port",
            "8393",
            "--max-tokens",
            str(args.max_tokens),
            "--ray",
            "--replicas",
            str(args.ray_replicas),
            "--threads-per-replica",
            str(args.ray_threads),
            "--max-batch",
            str(args.ray_max_batch),
            "--router",
            args.ray_router,
            "--log-level",
            "warning",
        ]
        servers.append(Server("qwenvl-ray", command + args.qwenvl_args.split(), 8393, "default", stop_group=False))
    if "transformers" not in skip:
        hf_dir = args.hf_dir or str(default_hf_export_path())  # exported once (2.5 GB) when first needed
        command = [
            "transformers",
            "serve",
            hf_dir,
            "--continuous-batching",
            "--dtype",
            "bfloat16",
            "--port",
            "8392",
            "--host",
            "127.0.0.1",
        ]
        servers.append(Server("transformers", command, 8392, hf_dir))
    try:
        for server in servers:
            start(server, args)
        rows = measure(servers, args)
        overhead = _overhead(servers, args)
    finally:
        for server in servers:
            _stop(server)
    _print_ratios(rows)
    if overhead:
        rows.append(overhead)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


def _overhead(servers: list[Server], args: argparse.Namespace) -> dict | None:
    """The Ray overhead per request: round trips through `qwenvl serve --ray` minus those of `qwenvl serve`."""
    names = {server.name: server for server in servers}
    if not args.ray_replicas or "qwenvl" not in names:
        return None
    plain = round_trip_ms(names["qwenvl"].base_url, args.overhead_requests)
    through_ray = round_trip_ms(names["qwenvl-ray"].base_url, args.overhead_requests)
    print(
        f"Ray overhead per request: {through_ray - plain:.2f} ms (GET /v1/models, mean of "
        f"{args.overhead_requests}: {plain:.2f} ms direct, {through_ray:.2f} ms through Ray Serve)",
        flush=True,
    )
    return {"server": "overhead", "direct_ms": plain, "ray_ms": through_ray, "overhead_ms": through_ray - plain}


def _print_ratios(rows: list[dict]) -> None:
    """Per client count: each server's mean tok/s and mean TTFT over the rounds, and the tok/s ratio."""
    means: dict[tuple[str, int], tuple[float, float, int]] = {}
    for key in sorted({(r["server"], r["clients"]) for r in rows}):
        runs = [r for r in rows if (r["server"], r["clients"]) == key]
        tok_s = statistics.fmean(r["tok_s"] for r in runs)
        means[key] = tok_s, statistics.fmean(r["mean_ttft_s"] or 0 for r in runs), len(runs)
    for (server, clients), (tok_s, ttft, runs) in means.items():
        print(f"{server:>12} {clients:>3} clients, mean of {runs}: {tok_s:7.1f} tok/s, mean TTFT {ttft:.2f} s")
    # (server, the server it is compared with, how the ratio is named)
    pairs = [
        ("qwenvl-ray", "qwenvl", "Ray replicas ÷ one server"),
        ("qwenvl", "qwenvl-no-cache", "prefix cache ÷ --no-prefix-cache"),
        ("qwenvl", "transformers", "qwenvl ÷ transformers"),
    ]
    for server_name, other_name, label in pairs:
        for (server, clients), (tok_s, ttft, _) in means.items():
            other = means.get((other_name, clients))
            if server == server_name and other and other[0]:
                print(
                    f"{clients:>3} clients: {label} tok/s = {tok_s / other[0]:.2f}, "
                    f"TTFT {ttft:.2f} s vs {other[1]:.2f} s"
                )


if __name__ == "__main__":
    raise SystemExit(main())
