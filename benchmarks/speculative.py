"""Prompt-lookup speculative decoding vs plain decoding, side by side, alternating, repeated.

    python benchmarks/speculative.py [--model GGUF] [--spec-tokens 2,5,8] [--repeat 3] [--max-tokens 256]

For each prompt in benchmarks/prompts/ (code_edit.txt: a ~60-line function to return with type hints;
no_copy.txt: a story, nothing to copy), greedy: one plain run, then one run per K, repeated; the
decode tok/s of each (median and spread), the speedup over plain, the acceptance rate and the tokens
drafted per run (rows verified beyond plain decoding's), whether the text
is identical to plain's, and the load average around the runs. --json prints the records.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import qwenvl
from qwenvl import defaults

PROMPTS = Path(__file__).parent / "prompts"


def run_once(model, text: str, max_tokens: int, k: int | None) -> dict:
    options = {"speculative": "ngram", "spec_tokens": k} if k else {}
    result = model.chat([{"role": "user", "content": text}], temperature=0, max_tokens=max_tokens, **options)
    return {
        "tokens": result.token_ids,
        "decode_tok_s": result.decode_tok_s,
        "drafted": result.draft_tokens,
        "accepted": result.accepted_tokens,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="default: the embedded Qwen2.5-Coder-0.5B-Instruct Q4_K_M GGUF")
    parser.add_argument("--spec-tokens", default="5", help="comma-separated K values (default 5)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--prompts", default="code_edit,no_copy")
    parser.add_argument("--threads", type=int, help="threads (default: physical cores)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    model = qwenvl.load(args.model or str(defaults.default_gguf_path()), threads=args.threads)
    ks = [int(k) for k in args.spec_tokens.split(",")]
    records = []
    for name in args.prompts.split(","):
        text = (PROMPTS / f"{name}.txt").read_text()
        run_once(model, text, 16, None)  # warm-up
        runs: dict[int, list[dict]] = {0: [], **{k: [] for k in ks}}
        loads = [os.getloadavg()[0]]
        for _ in range(args.repeat):
            for k in [0, *ks]:  # alternating: plain, K1, K2, …, plain, …
                runs[k].append(run_once(model, text, args.max_tokens, k or None))
                loads.append(os.getloadavg()[0])
                figures = runs[k][-1]
                print(f"  {name} K={k}: {figures['decode_tok_s']:.2f} tok/s, load {loads[-1]:.1f}", file=sys.stderr)
        plain = runs[0]
        plain_rate = statistics.median(r["decode_tok_s"] for r in plain)
        for k, group in runs.items():
            rates = [r["decode_tok_s"] for r in group]
            drafted = sum(r["drafted"] for r in group)
            record = {
                "prompt": name,
                "spec_tokens": k or None,
                "tokens": len(group[0]["tokens"]),
                "decode_tok_s": round(statistics.median(rates), 2),
                "decode_tok_s_runs": [round(r, 2) for r in rates],
                "speedup": round(statistics.median(rates) / plain_rate, 3),
                "acceptance_rate": round(sum(r["accepted"] for r in group) / drafted, 3) if drafted else None,
                "drafted_per_run": round(drafted / len(group), 1),  # tokens verified beyond the plain rows
                "identical_to_plain": all(r["tokens"] == plain[0]["tokens"] for r in group),
                "load_avg": [round(min(loads), 2), round(max(loads), 2)],
            }
            records.append(record)
            if not args.json:
                label = f"K={k}" if k else "plain"
                print(
                    f"{name:10} {label:6} {record['decode_tok_s']:7.2f} tok/s {record['decode_tok_s_runs']} "
                    f"x{record['speedup']:.2f} accept={record['acceptance_rate']} drafted/run={record['drafted_per_run']} "
                    f"identical={record['identical_to_plain']} tokens={record['tokens']} load={record['load_avg']}",
                    flush=True,
                )
    if args.json:
        print(json.dumps(records, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
