#!/usr/bin/env python
"""What structured outputs cost a busy server: all-plain vs half-JSON-schema load on `qwenvl serve`.

    python benchmarks/structured_serve.py [--gguf FILE] [--clients 16] [--requests-per-client 2]
        [--max-tokens 64] [--rounds 2] [--share 0.5] [--json FILE]

First the grammar mask alone: llguidance's mask and its application to the logits, per decode step of
one constrained row, over a valid answer to the benchmark's schema (scripts/loadgen.py's default: a long
list of objects). Then one `qwenvl serve` on the model (--max-batch = --clients), warmed up with a
plain and a constrained request, driven by scripts/loadgen.py in rounds that alternate the two loads:
every request plain (ignore_eos, exactly --max-tokens tokens), and a share of them (default half)
constrained to the schema, which is long enough that they too run to --max-tokens. Prints each run, the
means and the ratio constrained ÷ plain of aggregate tok/s (issue 16 asks for ≥ 0.9 at 16 clients);
--json writes every run. A benchmark, not a test: run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from loadgen import DEFAULT_SCHEMA, run_load  # noqa: E402
from serve_compare import Server, _stop, start  # noqa: E402

PORT = 8393


def mask_cost(gguf: str) -> dict[str, float]:
    """Mean microseconds per constrained decode step: computing the mask, applying it to the logits."""
    import torch

    from qwenvl.engine.grammar import GrammarCompiler, GrammarSpec, apply_mask
    from qwenvl.weights.checkpoint import open_checkpoint

    checkpoint = open_checkpoint(gguf)
    eos = checkpoint.generation_config.eos_token_ids
    compiler = GrammarCompiler(checkpoint.tokenizer, checkpoint.config.text.vocab_size, eos)
    started = time.perf_counter()
    constraint = compiler.constraint(GrammarSpec("json_schema", DEFAULT_SCHEMA))
    setup_s = time.perf_counter() - started
    item = {"name": "tomatoes", "quantity": 12, "unit": "kg"}
    tokens = checkpoint.tokenizer.encode(json.dumps({"items": [item] * 200}))[:600]  # a prefix: still open
    logits = torch.randn(compiler.vocab_size)
    compute = apply = 0.0
    for token in tokens:
        started = time.perf_counter()
        allowed = constraint.allowed()
        middle = time.perf_counter()
        apply_mask(logits, allowed)
        compute, apply = compute + middle - started, apply + time.perf_counter() - middle
        constraint.accept(token)
    return {
        "steps": len(tokens),
        "compute_us": 1e6 * compute / len(tokens),
        "apply_us": 1e6 * apply / len(tokens),
        "setup_s": setup_s,  # llguidance's tokenizer (once per model) and this schema's compilation
    }


def measure(server: Server, args: argparse.Namespace) -> list[dict]:
    rows = []
    for round_index in range(args.rounds):
        loads = [("plain", 0.0), ("schema", args.share)]
        for name, share in loads if round_index % 2 == 0 else loads[::-1]:
            report, _ = run_load(
                server.base_url,
                clients=args.clients,
                requests=args.clients * args.requests_per_client,
                max_tokens=args.max_tokens,
                model=server.model,
                ignore_eos=True,
                schema_share=share,
            )
            rows.append({"load": name, "round": round_index + 1, "share": share, **vars(report)})
            print(
                f"round {round_index + 1} {name:>6} ({share:.0%} constrained): {report.tok_s:7.1f} tok/s, "
                f"mean TTFT {report.mean_ttft_s or 0:.2f} s, {report.errors} errors",
                flush=True,
            )
    return rows


def main() -> int:
    from qwenvl.defaults import default_gguf_path

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", help="the model (default: the embedded GGUF)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="runs of each load (default 2)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--share", type=float, default=0.5, help="constrained share of the requests (default 0.5)")
    parser.add_argument("--threads", type=int, help="qwenvl --threads (default: physical cores)")
    parser.add_argument("--start-timeout", type=float, default=600)
    parser.add_argument("--log-dir", default="/tmp")
    parser.add_argument("--json", metavar="FILE", help="write the mask cost and every run as JSON")
    args = parser.parse_args()
    gguf = args.gguf or str(default_gguf_path())
    cost = mask_cost(gguf)
    print(
        f"mask per constrained step: {cost['compute_us']:.0f} µs to compute, {cost['apply_us']:.0f} µs to apply "
        f"({cost['steps']} steps; llguidance tokenizer + schema {cost['setup_s']:.2f} s, once)",
        flush=True,
    )
    command = [sys.executable, "-m", "qwenvl", "serve", gguf, "--port", str(PORT), "--max-batch", str(args.clients)]
    command += ["--max-tokens", str(args.max_tokens)] + (["--threads", str(args.threads)] if args.threads else [])
    server = Server("qwenvl", command, PORT, "default")
    try:
        start(server, args)
        run_load(server.base_url, clients=1, requests=1, max_tokens=8, model="default", schema_share=1.0)  # warm-up
        rows = measure(server, args)
    finally:
        _stop(server)
    plain = statistics.fmean(r["tok_s"] for r in rows if r["load"] == "plain")
    constrained = statistics.fmean(r["tok_s"] for r in rows if r["load"] == "schema")
    errors = sum(r["errors"] for r in rows)
    print(f"mean of {args.rounds}: plain {plain:.1f} tok/s, {args.share:.0%} constrained {constrained:.1f} tok/s")
    print(f"constrained ÷ plain = {constrained / plain:.2f} ({args.clients} clients, {errors} errors)")
    if args.json:
        Path(args.json).write_text(json.dumps({"mask": cost, "runs": rows}, indent=2))
    return 0 if errors == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
