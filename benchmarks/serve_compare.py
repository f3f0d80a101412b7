#!/usr/bin/env python
"""Throughput of `qwenvl serve` and `transformers serve --continuous-batching`, side by side in one run.

    python benchmarks/serve_compare.py [--gguf FILE] [--hf-dir DIR] [--clients 1,8,16] [--max-tokens 64]

Each server is started in turn on the same model (qwenvl: the GGUF; transformers: its HF export in
bfloat16; transformers serve needs `accelerate` installed), warmed up with one request, then driven by scripts/loadgen.py with each client count
(streamed chat completions, greedy, `--requests-per-client` requests per client). Prints a table of
aggregate tok/s and mean time to first token, and the ratio qwenvl ÷ transformers; `--json` writes
the raw reports. A benchmark, not a test: run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from loadgen import run_load  # noqa: E402


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


def measure(name: str, command: list[str], port: int, model: str, args: argparse.Namespace) -> list[dict]:
    base_url = f"http://127.0.0.1:{port}"
    log = open(Path(args.log_dir) / f"{name}.log", "w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    rows = []
    try:
        wait_healthy(base_url, process, args.start_timeout)
        run_load(base_url, clients=1, requests=1, max_tokens=8, model=model)  # warm-up
        for clients in args.clients:
            report, _ = run_load(base_url, clients=clients, requests=clients * args.requests_per_client,
                                 max_tokens=args.max_tokens, model=model, ignore_eos=args.ignore_eos)
            row = {"server": name, **vars(report)}
            rows.append(row)
            print(f"{name:>12} {clients:>3} clients: {report.tok_s:7.1f} tok/s, mean TTFT "
                  f"{report.mean_ttft_s or 0:.2f} s, {report.errors} errors", flush=True)
    finally:
        _stop(process)
        log.close()
    return rows


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)


def main() -> int:
    from qwenvl.defaults import default_gguf_path, default_hf_export_path

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", help="model for qwenvl (default: the embedded GGUF)")
    parser.add_argument("--hf-dir", help="the same model as an HF checkpoint, for transformers (default: its export)")
    parser.add_argument("--clients", default="1,8,16", help="comma-separated client counts")
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=16, help="qwenvl --max-batch")
    parser.add_argument("--threads", type=int, help="qwenvl --threads (default: physical cores)")
    parser.add_argument("--qwenvl-args", default="", help="extra `qwenvl serve` arguments, e.g. '--kernel dense'")
    parser.add_argument("--ignore-eos", action="store_true", help="ask for exactly --max-tokens tokens (qwenvl only honours it)")
    parser.add_argument("--skip", default="", help="comma-separated servers to skip: qwenvl, transformers")
    parser.add_argument("--start-timeout", type=float, default=600)
    parser.add_argument("--log-dir", default="/tmp")
    parser.add_argument("--json", metavar="FILE", help="write the reports as JSON")
    args = parser.parse_args()
    args.clients = [int(c) for c in args.clients.split(",")]
    skip = set(filter(None, args.skip.split(",")))
    gguf = args.gguf or str(default_gguf_path())
    hf_dir = args.hf_dir or str(default_hf_export_path())
    rows: list[dict] = []
    if "qwenvl" not in skip:
        command = [sys.executable, "-m", "qwenvl", "serve", gguf, "--port", "8391", "--max-batch", str(args.max_batch),
                   "--max-tokens", str(args.max_tokens)] + (["--threads", str(args.threads)] if args.threads else [])
        command += args.qwenvl_args.split()
        rows += measure("qwenvl", command, 8391, "default", args)
    if "transformers" not in skip:
        command = ["transformers", "serve", hf_dir, "--continuous-batching", "--dtype", "bfloat16",
                   "--port", "8392", "--host", "127.0.0.1"]
        rows += measure("transformers", command, 8392, hf_dir, args)
    _print_ratios(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


def _print_ratios(rows: list[dict]) -> None:
    by = {(r["server"], r["clients"]): r for r in rows}
    for (server, clients), row in sorted(by.items()):
        peer = by.get(("transformers", clients))
        if server == "qwenvl" and peer and peer["tok_s"]:
            print(f"{clients:>3} clients: qwenvl ÷ transformers tok/s = {row['tok_s'] / peer['tok_s']:.2f}, "
                  f"TTFT {row['mean_ttft_s'] or 0:.2f} s vs {peer['mean_ttft_s'] or 0:.2f} s")


if __name__ == "__main__":
    raise SystemExit(main())
