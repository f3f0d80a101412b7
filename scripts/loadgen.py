#!/usr/bin/env python
"""Load generator for any OpenAI-compatible server (qwenvl serve, llama.cpp's llama-server, vLLM, ...).

    python scripts/loadgen.py --base-url http://127.0.0.1:8000 --clients 8 --requests 32 --max-tokens 64

CLIENTS threads each send streamed /v1/chat/completions requests, one after another, until REQUESTS have
been sent in all. Prints the aggregate decode rate (completion tokens of all requests / wall time), the mean
time to first token (first content chunk) and the errors. ``--json-schema-share 0.5`` sends every other
request with a ``response_format`` JSON schema (``--json-schema FILE``, default: a long list of objects),
the others plain, to measure what structured outputs cost the batch. ``--system-file FILE`` sends that
file's text as a system message before every prompt (a system prompt all requests share, as
applications do). Standard library only.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import threading
import time
import urllib.parse
from dataclasses import asdict, dataclass, field
from typing import Any

PROMPTS = (
    "Write a Python function that checks whether a string is a palindrome.",
    "Explain what a hash map is in three sentences.",
    "List five uses of the Linux command grep.",
    "Write a haiku about compilers.",
    "What is the difference between a process and a thread?",
    "Write a SQL query that counts orders per customer.",
    "Summarize the rules of tic-tac-toe.",
    "Give three tips for writing readable code.",
)


# Long enough that max_tokens, not the schema, ends the answer (as ignore_eos does for plain requests).
DEFAULT_SCHEMA = {
    "type": "object",
    "properties": {
        "items": {
            "type": "array",
            "minItems": 200,
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 16},
                    "quantity": {"type": "integer", "minimum": 0, "maximum": 999},
                    "unit": {"enum": ["kg", "g", "l", "ml", "pieces"]},
                },
                "required": ["name", "quantity", "unit"],
                "additionalProperties": False,
            },
        }
    },
    "required": ["items"],
    "additionalProperties": False,
}
SCHEMA_PROMPT = "List the ingredients of a large party buffet as JSON."


@dataclass
class RequestResult:
    index: int
    prompt: str
    text: str = ""
    completion_tokens: int = 0
    prompt_tokens: int | None = None  # from the usage chunk, when the server sends one
    cached_tokens: int | None = None  # usage.prompt_tokens_details.cached_tokens, when the server sends it
    ttft_s: float | None = None
    total_s: float = 0.0
    finish_reason: str | None = None
    status: int | None = None
    error: str | None = None


@dataclass
class LoadReport:
    clients: int
    requests: int
    ok: int
    errors: int
    wall_s: float
    completion_tokens: int
    tok_s: float
    mean_ttft_s: float | None
    p50_ttft_s: float | None
    p90_ttft_s: float | None
    error_messages: list[str] = field(default_factory=list)
    mean_prompt_tokens: float | None = None  # from the servers' usage chunks


def chat_body(
    prompt: str,
    max_tokens: int,
    model: str,
    temperature: float,
    ignore_eos: bool,
    schema: dict | None = None,
    system: str | None = None,
) -> dict[str, Any]:
    """One streamed chat request; with ``schema``, constrained to it (and without ignore_eos, which a
    grammar does not take); with ``system``, that system message first."""
    messages = [{"role": "system", "content": system}] if system is not None else []
    body: dict[str, Any] = {
        "model": model,
        "messages": messages + [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if schema is not None:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "load", "schema": schema}}
    elif ignore_eos:
        body["ignore_eos"] = True
    return body


def stream_one(base_url: str, body: dict[str, Any], api_key: str | None, timeout: float) -> RequestResult:
    """Send one streamed chat request and read its SSE answer."""
    result = RequestResult(index=-1, prompt=body["messages"][-1]["content"])
    url = urllib.parse.urlsplit(base_url)
    connection_class = http.client.HTTPSConnection if url.scheme == "https" else http.client.HTTPConnection
    connection = connection_class(url.hostname, url.port, timeout=timeout)
    headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    started = time.perf_counter()
    try:
        connection.request("POST", url.path.rstrip("/") + "/v1/chat/completions", json.dumps(body), headers)
        response = connection.getresponse()
        result.status = response.status
        if response.status != 200:
            result.error = f"HTTP {response.status}: {response.read(500).decode(errors='replace')}"
            return result
        _read_events(response, result, started)
    except (OSError, http.client.HTTPException, ValueError) as error:
        result.error = f"{type(error).__name__}: {error}"
    finally:
        result.total_s = time.perf_counter() - started
        connection.close()
    return result


def _read_events(response: http.client.HTTPResponse, result: RequestResult, started: float) -> None:
    pieces, chunks, usage = [], 0, None
    for raw in response:
        line = raw.decode("utf-8").strip()
        if not line.startswith("data:"):
            continue
        data = line[len("data:") :].strip()
        if data == "[DONE]":
            break
        event = json.loads(data)
        if "error" in event:
            result.error = str(event["error"].get("message", event["error"]))
            break
        usage = event.get("usage") or usage
        for choice in event.get("choices", []):
            content = choice.get("delta", {}).get("content") or choice.get("text") or ""
            if content:
                chunks += 1
                pieces.append(content)
                if result.ttft_s is None:
                    result.ttft_s = time.perf_counter() - started
            result.finish_reason = choice.get("finish_reason") or result.finish_reason
    result.text = "".join(pieces)
    result.completion_tokens = usage["completion_tokens"] if usage else chunks
    if usage:
        result.prompt_tokens = usage.get("prompt_tokens")
        result.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")


def run_load(
    base_url: str,
    *,
    clients: int,
    requests: int,
    max_tokens: int,
    api_key: str | None = None,
    model: str = "default",
    prompt: str | None = None,
    temperature: float = 0.0,
    ignore_eos: bool = False,
    timeout: float = 600.0,
    schema: dict | None = None,
    schema_share: float = 0.0,
    system: str | None = None,
) -> tuple[LoadReport, list[RequestResult]]:
    """Send ``requests`` streamed chat requests from ``clients`` threads; the report and every result.
    ``schema_share``: the fraction of requests (spread evenly) constrained to ``schema``; ``system``:
    a system message every request starts with."""
    constrained = [int((i + 1) * schema_share) > int(i * schema_share) for i in range(requests)]
    prompts = [
        SCHEMA_PROMPT if constrained[i] and prompt is None else prompt or PROMPTS[i % len(PROMPTS)]
        for i in range(requests)
    ]
    results: list[RequestResult | None] = [None] * requests
    next_index = iter(range(requests))
    lock = threading.Lock()

    def client() -> None:
        while True:
            with lock:
                index = next(next_index, None)
            if index is None:
                return
            request_schema = (schema or DEFAULT_SCHEMA) if constrained[index] else None
            body = chat_body(prompts[index], max_tokens, model, temperature, ignore_eos, request_schema, system)
            result = stream_one(base_url, body, api_key, timeout)
            result.index = index
            results[index] = result

    started = time.perf_counter()
    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    done = [r for r in results if r is not None]
    return summarize(done, clients, wall), done


def summarize(results: list[RequestResult], clients: int, wall_s: float) -> LoadReport:
    ok = [r for r in results if r.error is None]
    ttfts = sorted(r.ttft_s for r in ok if r.ttft_s is not None)
    tokens = sum(r.completion_tokens for r in ok)
    prompts = [r.prompt_tokens for r in ok if r.prompt_tokens]
    return LoadReport(
        clients=clients,
        requests=len(results),
        ok=len(ok),
        errors=len(results) - len(ok),
        wall_s=round(wall_s, 3),
        completion_tokens=tokens,
        tok_s=round(tokens / wall_s, 2) if wall_s else 0.0,
        mean_ttft_s=round(statistics.fmean(ttfts), 4) if ttfts else None,
        p50_ttft_s=round(ttfts[len(ttfts) // 2], 4) if ttfts else None,
        p90_ttft_s=round(ttfts[min(len(ttfts) - 1, int(len(ttfts) * 0.9))], 4) if ttfts else None,
        error_messages=sorted({r.error for r in results if r.error})[:10],
        mean_prompt_tokens=round(statistics.fmean(prompts), 1) if prompts else None,
    )


def format_report(report: LoadReport) -> str:
    ttft = (
        "n/a"
        if report.mean_ttft_s is None
        else (f"{report.mean_ttft_s:.3f} s (p50 {report.p50_ttft_s:.3f} s, p90 {report.p90_ttft_s:.3f} s)")
    )
    lines = [
        f"clients {report.clients}, requests {report.requests}: {report.ok} ok, {report.errors} errors",
        f"wall {report.wall_s:.2f} s, completion tokens {report.completion_tokens}",
        f"aggregate {report.tok_s:.1f} tok/s",
        f"mean TTFT {ttft}",
    ]
    lines += [f"error: {message}" for message in report.error_messages]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", required=True, help="server root, e.g. http://127.0.0.1:8000 (no /v1)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    parser.add_argument("--requests", type=int, default=32, help="requests in all (default 32)")
    parser.add_argument("--max-tokens", type=int, default=64, help="max_tokens of each request (default 64)")
    parser.add_argument("--api-key", help="sent as Authorization: Bearer KEY")
    parser.add_argument("--model", default="default", help="the request's model field (default 'default')")
    parser.add_argument("--prompt", help="one prompt for every request (default: a rotation of 8 prompts)")
    parser.add_argument("--temperature", type=float, default=0.0, help="default 0 (greedy)")
    parser.add_argument(
        "--ignore-eos", action="store_true", help="ask for exactly max_tokens (vLLM / llama.cpp / qwenvl)"
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per request (default 600)")
    parser.add_argument(
        "--json-schema-share",
        type=float,
        default=0.0,
        metavar="F",
        help="fraction of the requests sent with a response_format JSON schema (default 0)",
    )
    parser.add_argument("--json-schema", metavar="FILE", help="that schema (default: a long list of objects)")
    parser.add_argument("--system-file", metavar="FILE", help="a system message every request starts with")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    args = parser.parse_args(argv)
    if min(args.clients, args.requests, args.max_tokens) < 1:
        parser.error("--clients, --requests and --max-tokens must be at least 1")
    if not 0.0 <= args.json_schema_share <= 1.0:
        parser.error("--json-schema-share must be in [0, 1]")
    schema = None
    if args.json_schema:
        try:
            with open(args.json_schema, encoding="utf-8") as handle:
                schema = json.load(handle)
        except (OSError, ValueError) as error:
            parser.error(f"--json-schema: {error}")
    system = None
    if args.system_file:
        try:
            with open(args.system_file, encoding="utf-8") as handle:
                system = handle.read()
        except (OSError, ValueError) as error:
            parser.error(f"--system-file: {error}")
    base_url = args.base_url.rstrip("/").removesuffix("/v1")
    report, _ = run_load(
        base_url,
        clients=args.clients,
        requests=args.requests,
        max_tokens=args.max_tokens,
        api_key=args.api_key,
        model=args.model,
        prompt=args.prompt,
        temperature=args.temperature,
        ignore_eos=args.ignore_eos,
        timeout=args.timeout,
        schema=schema,
        schema_share=args.json_schema_share,
        system=system,
    )
    print(json.dumps(asdict(report)) if args.json else format_report(report))
    return 0 if report.errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
