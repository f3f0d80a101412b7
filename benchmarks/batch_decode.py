"""Aggregate decode speed of the batching engine with 1, 8, 16 concurrent requests.

    python benchmarks/batch_decode.py [--model PATH] [--kernel dense] [--threads N] [--clients 1 8 16]
                                      [--tokens 64] [--repeat 3]

Each client sends a different short chat prompt at the same time (greedy, ignore_eos, max_tokens
tokens). Per run it prints: end-to-end tok/s (all completion tokens / wall time from submit to the
last token, prefills included), decode tok/s (tokens produced while every client was decoding /
that window), the mean time to first token, and the engine's decode steps. Best of --repeat runs
(the machine may be shared: take the best, not the mean).
"""

from __future__ import annotations

import argparse
import threading
import time

import qwenvl
from qwenvl.engine.scheduler import BatchEngine

TOPICS = [
    "binary search",
    "a linked list",
    "quicksort",
    "a hash map",
    "Dijkstra's algorithm",
    "a trie",
    "merge sort",
    "a min-heap",
    "BFS on a grid",
    "an LRU cache",
    "the knapsack problem",
    "a ring buffer",
    "topological sort",
    "union-find",
    "matrix multiplication",
    "a bloom filter",
]


def run(engine: BatchEngine, model: qwenvl.Model, clients: int, tokens: int) -> dict:
    prompts = [
        model.prepare([{"role": "user", "content": f"Write {TOPICS[i % len(TOPICS)]} in Python ({i})."}])
        for i in range(clients)
    ]
    stamps: list[list[tuple[float, int]]] = [[] for _ in range(clients)]
    started = time.perf_counter()
    handles = [engine.submit(p, temperature=0, max_tokens=tokens, ignore_eos=True) for p in prompts]

    def consume(index: int) -> None:
        for event in handles[index].events():
            stamps[index].append((time.perf_counter(), len(event.token_ids)))

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(clients)]
    steps_before = engine.stats()["steps"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    finished = max(s[-1][0] for s in stamps)
    total = sum(n for s in stamps for _, n in s)
    all_decoding = max(s[0][0] for s in stamps)  # every client has its first token
    first_done = min(s[-1][0] for s in stamps)  # until the first one finishes
    window = sum(n for s in stamps for t, n in s if all_decoding < t <= first_done)
    return {
        "clients": clients,
        "end_to_end_tok_s": total / (finished - started),
        "decode_tok_s": window / (first_done - all_decoding) if first_done > all_decoding else float("nan"),
        "ttft_s": sum(s[0][0] - started for s in stamps) / clients,
        "steps": engine.stats()["steps"] - steps_before,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--kernel", default=None, help="GGUF kernel choice passed to qwenvl.load (e.g. dense)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 16])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    options = {"kernel": args.kernel} if args.kernel else {}
    model = qwenvl.load(args.model, threads=args.threads, prefix_cache=False, **options)  # each run prefills whole
    engine = BatchEngine(model, max_batch=max(args.clients))
    engine.start()
    run(engine, model, 2, 4)  # warm-up
    for clients in args.clients:
        runs = [run(engine, model, clients, args.tokens) for _ in range(args.repeat)]
        best = max(runs, key=lambda r: r["end_to_end_tok_s"])
        print(
            f"{clients:3d} clients: end-to-end {best['end_to_end_tok_s']:6.1f} tok/s, "
            f"decode {max(r['decode_tok_s'] for r in runs):6.1f} tok/s, ttft {best['ttft_s']:.2f} s, "
            f"{best['steps']} steps  (best of {args.repeat})",
            flush=True,
        )
    engine.shutdown()


if __name__ == "__main__":
    main()
