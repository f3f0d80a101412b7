#!/usr/bin/env python
"""Second-turn time to first token of a long chat, cold (prefix cache off) vs warm (the first turn's
KV cached), side by side in one run, with the same answer checked.

    python benchmarks/prefix_cache.py [MODEL] [--history 2000] [--rounds 3] [--max-tokens 16] [--json FILE]

MODEL defaults to the embedded model (the real Qwen2.5-Coder-0.5B-Instruct Q4_K_M GGUF). Two copies of
the model are loaded: one with ``prefix_cache=False`` (cold: every request prefills its whole prompt)
and one with the default prefix cache (warm). Each round builds a new conversation (a system prompt
and earlier turns of about ``--history`` tokens, different per round so nothing of an earlier round is
cached), runs its first turn on the warm model (untimed: it fills the cache), then times the second
turn (the first turn, its answer and a new question) on each model, alternating which goes first.
TTFT is the wall time from the call to the first streamed piece (templating, tokenizing, prefill and
the first sampling step). Prints each round, then the medians and warm ÷ cold. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import qwenvl  # noqa: E402

FILLER = (
    "def parse_record(line: str) -> dict:\n"
    "    fields = line.strip().split(',')\n"
    "    return {'id': int(fields[0]), 'name': fields[1], 'score': float(fields[2])}\n"
)


def conversation(model: qwenvl.Model, round_index: int, history_tokens: int) -> tuple[list[dict], list[dict]]:
    """(first turn's messages, the earlier turns without the last question) about ``history_tokens`` long."""
    system = {"role": "system", "content": f"Session {round_index}. You review Python code tersely."}
    turns: list[dict] = [system]
    number = 0
    while len(model.prepare(turns).input_ids) < history_tokens:
        number += 1
        code = FILLER.replace("parse_record", f"parse_record_{round_index}_{number}") * 3
        turns += [
            {"role": "user", "content": f"Review snippet {number}:\n{code}"},
            {"role": "assistant", "content": f"Snippet {number} looks fine; handle malformed lines."},
        ]
    first = turns + [{"role": "user", "content": "Which snippet is the longest? Answer briefly."}]
    return first, turns


def ttft(model: qwenvl.Model, messages: list[dict], max_tokens: int) -> tuple[float, list[int], int, int]:
    """(seconds to the first piece, answer token ids, prompt tokens, cached prompt tokens)."""
    started = time.perf_counter()
    first = None
    generation = model.stream(messages, temperature=0, max_tokens=max_tokens)
    for _ in generation:
        if first is None:
            first = time.perf_counter() - started
    result = generation.result
    assert result is not None and first is not None
    return first, result.token_ids, result.prompt_tokens, result.cached_tokens


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", help="model (default: the embedded GGUF)")
    parser.add_argument("--history", type=int, default=2000, help="tokens of conversation before the 2nd turn")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens of each answer")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--json", metavar="FILE", help="write every round here")
    args = parser.parse_args()
    cold = qwenvl.load(args.model, threads=args.threads, prefix_cache=False)
    warm = qwenvl.load(args.model, threads=args.threads)
    print(f"{warm.source}; warm: {warm.kv_pool.describe()}; load average {os.getloadavg()[0]:.1f}", flush=True)
    rounds = []
    for index in range(args.rounds):
        first, earlier = conversation(warm, index, args.history)
        answer = warm.chat(first, temperature=0, max_tokens=args.max_tokens)  # turn 1: fills the cache
        second = first + [
            {"role": "assistant", "content": answer.text},
            {"role": "user", "content": "Now add type hints to the first snippet."},
        ]
        order = [("cold", cold), ("warm", warm)] if index % 2 == 0 else [("warm", warm), ("cold", cold)]
        row: dict = {"round": index, "load": os.getloadavg()[0]}
        for name, model in order:
            seconds, ids, prompt_tokens, cached = ttft(model, second, args.max_tokens)
            row[name] = {"ttft_s": seconds, "prompt_tokens": prompt_tokens, "cached_tokens": cached, "ids": ids}
        row["same_answer"] = row["cold"]["ids"] == row["warm"]["ids"]
        rounds.append(row)
        print(
            f"round {index}: prompt {row['cold']['prompt_tokens']} tokens, {row['warm']['cached_tokens']} cached; "
            f"cold {row['cold']['ttft_s']:.2f} s, warm {row['warm']['ttft_s']:.2f} s "
            f"({row['warm']['ttft_s'] / row['cold']['ttft_s']:.3f}x); same answer: {row['same_answer']}; "
            f"load {row['load']:.1f}",
            flush=True,
        )
    cold_s = statistics.median(r["cold"]["ttft_s"] for r in rounds)
    warm_s = statistics.median(r["warm"]["ttft_s"] for r in rounds)
    same = all(r["same_answer"] for r in rounds)
    print(f"median 2nd-turn TTFT: cold {cold_s:.2f} s, warm {warm_s:.2f} s, warm/cold {warm_s / cold_s:.3f}; "
          f"same answers: {same}")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({"rounds": rounds, "cold_s": cold_s, "warm_s": warm_s}, indent=1))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
