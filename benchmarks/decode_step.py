"""The fused decode step against the layer-by-layer path, alternating step by step in one process.

    python benchmarks/decode_step.py [--model PATH] [--dtype float32] [--steps 60] [--threads N]

One request (a 64-token prompt) per path, each with its own KV cache; every iteration decodes one
token on each path in turn (``TextModel.forward`` of one token, then the logits), so load changes on
a shared machine hit both alike. Prints, per path, the median and fastest wall time of a step and the
process CPU time per step. The layer-by-layer path is the one ``ops.decode_layers`` falls back to.
"""

from __future__ import annotations

import argparse
import time

import torch

import qwenvl
from qwenvl import defaults, ops
from qwenvl.engine.kv_cache import KVPool

PROMPT = 64


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a GGUF file (default: the embedded one)")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = qwenvl.load(args.model or defaults.default_gguf_path(), dtype=args.dtype)
    text = model.text_model
    fused = ops.decode_layers
    paths = {"fused": fused, "layers": lambda *a: None}
    walls: dict[str, list[float]] = {name: [] for name in paths}
    cpu = dict.fromkeys(paths, 0.0)
    with torch.inference_mode():
        caches = {}
        for name in paths:
            cache = KVPool(text.config, text.dtype, 128 << 20).sequence()
            ids = torch.arange(100, 100 + PROMPT)[None]
            text(text.embed(ids), torch.arange(PROMPT).expand(3, 1, PROMPT).clone(), cache, start=0)
            caches[name] = cache
        for step in range(args.steps):
            for name, chosen in paths.items():
                ops.decode_layers = chosen
                start = PROMPT + step
                wall, used = time.perf_counter(), time.process_time()
                hidden = text(text.embed(torch.tensor([[7]])), torch.full((3, 1, 1), start), caches[name], start=start)
                text.logits(hidden[0, -1])
                walls[name].append(time.perf_counter() - wall)
                cpu[name] += time.process_time() - used
    ops.decode_layers = fused
    print(f"{model.source} {text.dtype} threads={torch.get_num_threads()} steps={args.steps}")
    for name, times in walls.items():
        times = sorted(times)
        print(
            f"{name:7s} median {times[len(times) // 2] * 1e3:8.1f} ms/step  fastest {times[0] * 1e3:8.1f}  "
            f"cpu {cpu[name] / len(times) * 1e3:8.1f} ms/step"
        )


if __name__ == "__main__":
    main()
